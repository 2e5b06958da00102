"""Denoisers: wrap a network F into D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import build_part
from ._checks import check_int, check_positive
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


class LCMDenoiser(DiscreteDenoiser):
    """Latent consistency model (Luo et al. 2023) over a distilled subset of the DDPM levels.

    ComfyUI's "lcm" model sampling: the ``num_idx``-level table of ``discretization`` keeps
    ``original_timesteps`` levels, at t = T - 1 - k T / original_timesteps (SD/SDXL LCM:
    19, 39, .., 999); sigma is snapped to the nearest of them and the network receives that
    level's original timestep. The network's x0 estimate (``scaling``, eps prediction for LCM)
    is combined with the consistency boundary condition (Song et al. 2023, "Consistency Models"):

        D = c_out(t) x0_hat + c_skip(t) z,  c_skip = sd^2 / ((s t)^2 + sd^2),  c_out = s t / sqrt((s t)^2 + sd^2),

    with z = x / sqrt(1 + sigma^2) the variance-preserving latent, sd = ``sigma_data`` (0.5)
    and s = ``timestep_scaling`` (10), as in diffusers' ``LCMScheduler``. (ComfyUI applies
    c_skip to x itself; c_skip is below 7e-6 at every LCM timestep, so the two differ by
    less than 7e-6 |x|.)
    """

    timesteps: torch.Tensor

    def __init__(
        self,
        scaling: Any = None,
        num_idx: int = 1000,
        discretization: Any = None,
        original_timesteps: int = 50,
        sigma_data: float = 0.5,
        timestep_scaling: float = 10.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        *,
        scaling_config: Any = None,
        discretization_config: Any = None,
    ):
        super().__init__(scaling, num_idx, discretization, sigma_min=sigma_min, sigma_max=sigma_max,
                         scaling_config=scaling_config, discretization_config=discretization_config)
        self.original_timesteps = check_int("original_timesteps", original_timesteps)
        skip = self.num_idx // self.original_timesteps
        if skip < 1:
            raise ValueError(f"original_timesteps ({original_timesteps}) cannot exceed num_idx ({num_idx})")
        self.sigma_data = check_positive("sigma_data", sigma_data)
        self.timestep_scaling = check_positive("timestep_scaling", timestep_scaling)
        timesteps = self.num_idx - 1 - skip * torch.arange(self.original_timesteps - 1, -1, -1)
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.sigmas = self.sigmas[timesteps]

    def boundary(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) of the consistency boundary condition at the original ``timestep``."""
        scaled = timestep * self.timestep_scaling
        sd2 = self.sigma_data**2
        return sd2 / (scaled**2 + sd2), scaled / (scaled**2 + sd2) ** 0.5

    def forward(self, network: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                **kwargs: Any) -> torch.Tensor:
        """D(x; sigma) at the nearest distilled level; the network gets that level's original timestep."""
        idx = self.sigma_to_idx(sigma)
        timestep = self.timesteps[idx]
        sigma_q = append_dims(self.sigmas[idx].to(x.dtype), x.ndim)
        c_skip, c_out, c_in, _ = self.scaling(sigma_q)
        x0 = network(x * c_in, timestep, cond, **kwargs) * c_out + x * c_skip
        b_skip, b_out = self.boundary(append_dims(timestep.to(x.dtype), x.ndim))
        return b_out * x0 + b_skip * x / (1.0 + sigma_q**2) ** 0.5
