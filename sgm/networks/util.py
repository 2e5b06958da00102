"""Building blocks shared by the UNet and the autoencoder: norms, embeddings, checkpointing, config values."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

log = logging.getLogger(__name__)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (the ldm ``normalization`` layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5, num_groups: int = 32) -> GroupNorm32:
    """ldm's 32-group norm; raises a ValueError when ``channels`` is not a multiple of the group count."""
    if channels % num_groups:
        raise ValueError(f"channel count {channels} is not divisible by {num_groups} normalization groups")
    return GroupNorm32(num_groups, channels, eps=eps)


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` when ``p`` is 0: the same function, without a dropout call
    per layer on every forward (29 per call of the tiny UNet). Neither holds weights: keys are unchanged."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module`` in place (works on the meta device) and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps [N] (Vaswani et al. 2017; ADM).

    Frequencies exp(-ln(max_period) i / (dim // 2)), cos half first then sin (diffusers'
    ``flip_sin_to_cos=True, freq_shift=0``), a zero column appended when ``dim`` is odd.
    Computed in float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Timestep(nn.Module):
    """Module form of :func:`timestep_embedding` (sgm's ``Timestep``; no parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class Checkpointed(nn.Module):
    """Mixin: ``self.use_checkpoint`` makes :meth:`maybe_checkpoint` recompute activations in backward."""

    use_checkpoint: bool = False

    def maybe_checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.use_checkpoint and torch.is_grad_enabled():
            return _torch_checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def as_list(value: Any) -> list | None:
    """A Python list from a list, tuple or OmegaConf ListConfig; None stays None; scalars are not lists."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    try:  # ListConfig is a Sequence in recent omegaconf, but be lenient
        from omegaconf import ListConfig

        if isinstance(value, ListConfig):
            return list(value)
    except ImportError:  # pragma: no cover
        pass
    return None


def as_dict(value: Any, name: str) -> dict:
    """A plain dict from a mapping or DictConfig, or a ValueError naming ``name``."""
    if isinstance(value, Mapping):
        return dict(value)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            return dict(OmegaConf.to_container(value, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def per_level(name: str, value: Any, levels: int, minimum: int = 0) -> list[int]:
    """An int or a list of ints, one per resolution level, as a list of ``levels`` ints."""
    seq = as_list(value)
    if seq is None:
        return [check_int(name, value, minimum)] * levels
    if len(seq) != levels:
        raise ValueError(f"{name} must be an int or a list of {levels} ints (one per level), got {value!r}")
    return [check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(seq)]


def ignore_params(owner: str, harmless: Mapping[str, Any], unknown: Mapping[str, Any]) -> None:
    """Log original-config parameters that have no effect here (debug) and unknown ones (warning)."""
    for key, value in harmless.items():
        log.debug("%s: ignoring original parameter %s=%r (no effect in this implementation)", owner, key, value)
    for key, value in unknown.items():
        log.warning("%s: ignoring unknown parameter %s=%r", owner, key, value)
