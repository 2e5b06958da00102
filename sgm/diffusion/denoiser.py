"""Denoisers: wrap a network F into D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import build_part
from ._checks import check_positive
from .util import append_dims


class Denoiser(nn.Module):
    """Continuous-sigma denoiser with a preconditioning ``scaling`` (see :mod:`sgm.diffusion.scaling`)."""

    def __init__(self, scaling: Any = None, sigma_min: float | None = None, sigma_max: float | None = None, *,
                 scaling_config: Any = None):
        super().__init__()
        self.scaling = build_part("scaling", scaling, scaling_config)
        if (sigma_min is None) != (sigma_max is None):
            raise ValueError("give the trained sigma range as both sigma_min and sigma_max, or neither")
        self._range = None if sigma_min is None else (check_positive("sigma_min", sigma_min),
                                                      check_positive("sigma_max", sigma_max))

    @property
    def sigma_min(self) -> float | None:
        """The lowest noise level the model was trained on (None: not stated)."""
        return None if self._range is None else self._range[0]

    @property
    def sigma_max(self) -> float | None:
        """The highest noise level the model was trained on (None: not stated)."""
        return None if self._range is None else self._range[1]

    def forward(
        self, network: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, cond: dict, **kwargs: Any
    ) -> torch.Tensor:
        """Return the x0 estimate D(x; sigma) for noisy ``x`` at per-sample noise levels ``sigma`` [B]."""
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma, x.ndim))
        return network(x * c_in, c_noise.reshape(sigma.shape), cond, **kwargs) * c_out + x * c_skip


class DiscreteDenoiser(Denoiser):
    """Denoiser of a model trained on ``num_idx`` discrete noise levels (SDXL: 1000 DDPM steps).

    Sigma is snapped to the nearest trained level and the network receives that level's
    index as c_noise. ``sigma_min`` / ``sigma_max`` state the range samplers use (a schedule
    that leaves its range to the model reads it here); by default the table's own range. The level table is a non-persistent buffer (``denoiser.sigmas`` may
    be absent from checkpoints).
    """

    sigmas: torch.Tensor

    def __init__(
        self,
        scaling: Any = None,
        num_idx: int = 1000,
        discretization: Any = None,
        do_append_zero: bool = False,
        quantize_c_noise: bool = True,
        flip: bool = True,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        *,
        scaling_config: Any = None,
        discretization_config: Any = None,
    ):
        super().__init__(scaling, sigma_min, sigma_max, scaling_config=scaling_config)
        self.discretization = build_part("discretization", discretization, discretization_config)
        self.num_idx = int(num_idx)
        self.quantize_c_noise = quantize_c_noise
        sigmas = self.discretization(self.num_idx, do_append_zero=do_append_zero, flip=flip)
        self.register_buffer("sigmas", sigmas, persistent=False)

    @property
    def sigma_min(self) -> float:
        """The stated lowest noise level for sampling, else the table's lowest (SDXL: 0.0292)."""
        return float(self.sigmas.min()) if self._range is None else self._range[0]

    @property
    def sigma_max(self) -> float:
        """The stated highest noise level for sampling, else the table's highest (SDXL: 14.6146)."""
        return float(self.sigmas.max()) if self._range is None else self._range[1]

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.to(self.sigmas.dtype) - self.sigmas.reshape(-1, *([1] * sigma.ndim))
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def idx_to_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas[idx]

    def forward(self, network: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                **kwargs: Any) -> torch.Tensor:
        """As :meth:`Denoiser.forward`, with the nearest-level search done once per call when the
        scaling's c_noise is sigma itself (Eps/V scalings): its index is then c_noise."""
        idx = self.sigma_to_idx(sigma)
        sigma_q = self.sigmas[idx].to(sigma.dtype)
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma_q, x.ndim))
        c_noise = c_noise.reshape(sigma.shape)
        if self.quantize_c_noise:  # no device sync: the scaling says whether c_noise is sigma
            c_noise = idx if getattr(self.scaling, "c_noise_is_sigma", False) else self.sigma_to_idx(c_noise)
        return network(x * c_in, c_noise, cond, **kwargs) * c_out + x * c_skip
