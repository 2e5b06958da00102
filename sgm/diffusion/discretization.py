"""Noise-level schedules ("discretizations"): which sigmas a sampler visits.

A discretization is called as ``disc(n, do_append_zero=True, device="cpu", flip=False)``
and returns float32 sigmas in descending order (ascending with ``flip``), with a final 0
when ``do_append_zero``. ``disc.get_sigmas(n)`` returns the ``n`` sigmas without the zero.
EDM sigmas are computed in float32 exactly as sgm does; DDPM sigmas in float64, rounded once.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from ._checks import check_int, check_positive
from .util import append_zero

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Per-step betas of a DDPM forward process, float64, shape ``[n_timestep]``.

    ``"linear"`` (alias ``"scaled_linear"``) interpolates linearly between
    ``sqrt(linear_start)`` and ``sqrt(linear_end)`` and squares (the Stable Diffusion
    schedule); ``"cosine"`` is Nichol & Dhariwal (2021), eq. 17, betas clipped to 0.999;
    ``"sqrt_linear"`` interpolates the betas themselves and ``"sqrt"`` takes their root.
    """
    n_timestep = check_int("n_timestep", n_timestep)
    if schedule in ("linear", "scaled_linear"):
        return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        t = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep
        f = np.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0.0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"schedule {schedule!r} is unknown; choose one of {', '.join(BETA_SCHEDULES)}")


class Discretization(ABC):
    """Base class: subclasses implement :meth:`get_sigmas` (descending, no final zero)."""

    def __call__(
        self, n: int, do_append_zero: bool = True, device: str | torch.device = "cpu", flip: bool = False
    ) -> torch.Tensor:
        sigmas = self.get_sigmas(n, device=device)
        if do_append_zero:
            sigmas = append_zero(sigmas)
        return sigmas.flip(0) if flip else sigmas

    @abstractmethod
    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The ``n`` sigmas of an ``n``-step schedule, descending, float32."""


class EDMDiscretization(Discretization):
    """Karras et al. (2022), eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho.

    The class defaults are the EDM paper's. ``sigma_min`` / ``sigma_max`` = None means "the
    model's trained range": :func:`sgm.diffusion.schedule.sampling_sigmas` fills them from the
    model's denoiser (SDXL: 0.0292 .. 14.6146), which is how ``conf/discretization/edm.yaml``
    uses it.
    """

    def __init__(self, sigma_min: float | None = 0.002, sigma_max: float | None = 80.0, rho: float = 7.0):
        self.sigma_min = None if sigma_min is None else check_positive("sigma_min", sigma_min)
        self.sigma_max = None if sigma_max is None else check_positive("sigma_max", sigma_max)
        self.rho = check_positive("rho", rho)
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(
                f"sigma_min ({self.sigma_min}) must be smaller than sigma_max ({self.sigma_max})"
            )

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n = check_int("n (number of steps)", n)
        if self.sigma_min is None or self.sigma_max is None:
            raise ValueError("EDMDiscretization has no sigma range: set sigma_min and sigma_max, or let "
                             "sgm.diffusion.schedule.sampling_sigmas fill them from the model's denoiser")
        # float32 on purpose: bit-compatible with sgm's schedule (and the seed note's table)
        ramp = torch.linspace(0, 1, n, dtype=torch.float32, device=device)
        min_inv, max_inv = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (max_inv + ramp * (min_inv - max_inv)) ** self.rho

    def __repr__(self) -> str:
        return f"EDMDiscretization(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"


class LegacyDDPMDiscretization(Discretization):
    """The discrete DDPM noise levels sigma_t = sqrt((1 - abar_t) / abar_t) of Stable Diffusion.

    ``n < num_timesteps`` picks ``n`` roughly equally spaced timesteps (sgm's
    ``linspace(T - 1, 0, n, endpoint=False)``, truncated to integers).
    """

    def __init__(
        self,
        linear_start: float = 0.00085,
        linear_end: float = 0.0120,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
    ):
        self.linear_start = check_positive("linear_start", linear_start)
        self.linear_end = check_positive("linear_end", linear_end)
        if self.linear_end >= 1 or self.linear_start >= 1:
            raise ValueError("linear_start and linear_end are betas and must be < 1")
        self.num_timesteps = check_int("num_timesteps", num_timesteps)
        self.beta_schedule = beta_schedule
        betas = make_beta_schedule(beta_schedule, self.num_timesteps, self.linear_start, self.linear_end)
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)

    def timesteps(self, n: int) -> np.ndarray:
        """The integer timesteps (ascending) whose sigmas an ``n``-step schedule uses."""
        n = check_int("n (number of steps)", n)
        if n > self.num_timesteps:
            raise ValueError(f"n ({n}) cannot exceed num_timesteps ({self.num_timesteps})")
        if n == self.num_timesteps:
            return np.arange(n)
        return np.linspace(self.num_timesteps - 1, 0, n, endpoint=False).astype(int)[::-1].copy()

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        abar = self.alphas_cumprod[self.timesteps(n)]
        sigmas = ((1 - abar) / abar) ** 0.5
        return torch.from_numpy(sigmas[::-1].copy()).to(device=device, dtype=torch.float32)

    def __repr__(self) -> str:
        return (
            f"LegacyDDPMDiscretization(linear_start={self.linear_start}, linear_end={self.linear_end}, "
            f"num_timesteps={self.num_timesteps})"
        )
