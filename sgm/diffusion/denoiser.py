"""Denoisers: wrap a network F into D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import build_part
from .util import append_dims


class Denoiser(nn.Module):
    """Continuous-sigma denoiser with a preconditioning ``scaling`` (see :mod:`sgm.diffusion.scaling`)."""

    def __init__(self, scaling: Any = None, *, scaling_config: Any = None):
        super().__init__()
        self.scaling = build_part("scaling", scaling, scaling_config)

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return c_noise

    def forward(
        self, network: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, cond: dict, **kwargs: Any
    ) -> torch.Tensor:
        """Return the x0 estimate D(x; sigma) for noisy ``x`` at per-sample noise levels ``sigma`` [B]."""
        sigma = self.possibly_quantize_sigma(sigma)
        sigma_shape = sigma.shape
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma, x.ndim))
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma_shape))
        return network(x * c_in, c_noise, cond, **kwargs) * c_out + x * c_skip


class DiscreteDenoiser(Denoiser):
    """Denoiser of a model trained on ``num_idx`` discrete noise levels (SDXL: 1000 DDPM steps).

    Sigma is snapped to the nearest trained level and the network receives that level's
    index as c_noise. The level table is a non-persistent buffer (``denoiser.sigmas`` may
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
        *,
        scaling_config: Any = None,
        discretization_config: Any = None,
    ):
        super().__init__(scaling, scaling_config=scaling_config)
        self.discretization = build_part("discretization", discretization, discretization_config)
        self.num_idx = int(num_idx)
        self.quantize_c_noise = quantize_c_noise
        sigmas = self.discretization(self.num_idx, do_append_zero=do_append_zero, flip=flip)
        self.register_buffer("sigmas", sigmas, persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas.min())

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas.max())

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.to(self.sigmas.dtype) - self.sigmas.reshape(-1, *([1] * sigma.ndim))
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def idx_to_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas[idx]

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.idx_to_sigma(self.sigma_to_idx(sigma)).to(sigma.dtype)

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise

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
