"""The discrete DDPM noise levels, their timestep spacings and zero-terminal-SNR rescaling."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .._checks import check_int, check_positive
from .base import Discretization, check_steps, make_beta_schedule, to_sigmas

TIMESTEP_SPACINGS = ("sgm", "leading", "trailing", "linspace")

# Zero terminal SNR puts abar_T = 0, i.e. sigma_T = inf. The sigma table uses abar_T = 2^-24 instead
# (diffusers' choice, the smallest positive float16 step above 0): sigma_T = sqrt(2^24 - 1) ~ 4096, a
# finite sigma at which every sampler works in sigma space, with x0 = c_skip x + c_out v ~ -v.
ZERO_SNR_TERMINAL_ALPHA_CUMPROD = 2.0**-24


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2023), "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    shift and scale sqrt(abar) so that it is 0 at the last timestep and unchanged at the first."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def check_spacing(spacing: str, steps_offset: int) -> None:
    """Raise naming the parameter for an unknown spacing, or a steps_offset it does not take."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset applies to timestep_spacing 'leading' only, not {spacing!r}")


def spaced_timesteps(spacing: str, n: int, num_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """The ``n`` timesteps (descending; fractional for ``linspace``) of a DDPM timestep spacing.

    * ``sgm``: Stability's ``linspace(T - 1, 0, n, endpoint=False)`` truncated to integers
      (all T timesteps when n = T).
    * ``leading``: ``k * (T // n) + steps_offset`` (diffusers; DDIM's uniform skip).
    * ``trailing``: ``round(T - k * T / n) - 1`` (diffusers; Lin et al. 2023, Table 2), starting at T - 1.
    * ``linspace``: ``linspace(0, T - 1, n)`` reversed, fractional (diffusers' Euler schedulers
      interpolate sigma linearly between the levels; a single step is t = 0, as there).

    ``steps_offset`` belongs to ``leading`` only, as in diffusers.
    """
    n, total = check_steps(n), num_timesteps
    check_spacing(spacing, steps_offset)
    if n > total:
        raise ValueError(f"n ({n}) cannot exceed num_timesteps ({total})")
    k = np.arange(n)
    if spacing == "sgm":
        if n == total:
            return k[::-1].copy()
        return np.linspace(total - 1, 0, n, endpoint=False).astype(int)
    if spacing == "leading":
        steps = k[::-1] * (total // n) + steps_offset
        if steps[0] > total - 1:
            raise ValueError(f"steps_offset {steps_offset} puts timestep {steps[0]} past the last one ({total - 1}) "
                             f"at {n} steps")
        return steps
    if spacing == "trailing":
        return np.round(total - k * (total / n)).astype(int) - 1
    return np.linspace(0, total - 1, n)[::-1].copy()


class LegacyDDPMDiscretization(Discretization):
    """The discrete DDPM noise levels sigma_t = sqrt((1 - abar_t) / abar_t) of Stable Diffusion.

    ``n`` < num_timesteps steps visit the timesteps of ``timestep_spacing`` (see
    :func:`spaced_timesteps`; default ``sgm``, Stability's rule). ``rescale_betas_zero_snr``
    rescales the betas to zero terminal SNR (Lin et al. 2023, Alg. 1; for v-prediction
    models): ``alphas_cumprod`` then ends at 0 exactly and the sigma table at
    sqrt(2^24 - 1) ~ 4096 (abar_T = 2^-24, as diffusers), so no sampler meets an infinite sigma.
    """

    def __init__(
        self,
        linear_start: float = 0.00085,
        linear_end: float = 0.0120,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        timestep_spacing: str = "sgm",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.linear_start = check_positive("linear_start", linear_start)
        self.linear_end = check_positive("linear_end", linear_end)
        if self.linear_end >= 1 or self.linear_start >= 1:
            raise ValueError("linear_start and linear_end are betas and must be < 1")
        self.num_timesteps = check_int("num_timesteps", num_timesteps)
        self.beta_schedule = beta_schedule
        self.steps_offset = check_int("steps_offset", steps_offset, minimum=0)
        check_spacing(timestep_spacing, self.steps_offset)
        self.timestep_spacing = timestep_spacing
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        betas = make_beta_schedule(beta_schedule, self.num_timesteps, self.linear_start, self.linear_end)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)

    @property
    def table(self) -> np.ndarray:
        """sigma_t for every timestep t = 0 .. T - 1, float64, ascending (finite: see the class notes)."""
        abar = self.alphas_cumprod.copy()
        if self.rescale_betas_zero_snr:
            abar[-1] = ZERO_SNR_TERMINAL_ALPHA_CUMPROD
        return ((1 - abar) / abar) ** 0.5

    def timesteps(self, n: int) -> np.ndarray:
        """The timesteps (ascending) whose sigmas an ``n``-step schedule uses (fractional for ``linspace``)."""
        return spaced_timesteps(self.timestep_spacing, n, self.num_timesteps, self.steps_offset)[::-1].copy()

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        steps = self.timesteps(n)[::-1]
        table = self.table
        sigmas = table[steps] if steps.dtype.kind in "iu" else np.interp(steps, np.arange(len(table)), table)
        return to_sigmas(sigmas, device)

    def __repr__(self) -> str:
        extra = "" if self.timestep_spacing == "sgm" else f", timestep_spacing={self.timestep_spacing!r}"
        extra += f", steps_offset={self.steps_offset}" if self.steps_offset else ""
        extra += ", rescale_betas_zero_snr=True" if self.rescale_betas_zero_snr else ""
        return (
            f"LegacyDDPMDiscretization(linear_start={self.linear_start}, linear_end={self.linear_end}, "
            f"num_timesteps={self.num_timesteps}{extra})"
        )


class DDPMTimestepsDiscretization(LegacyDDPMDiscretization):
    """Given DDPM timesteps: an ``n``-step schedule visits the first ``n`` of ``timesteps``.

    The default is the schedule of Stability's SDXL-Turbo sampler (``SubstepSampler`` of sgm's
    turbo demo: indices 0, 100, 200, 300 of the 1000-level schedule, i.e. t = 999, 899, 799,
    699; Sauer et al. 2023, "Adversarial Diffusion Distillation"), for 1 to 4 steps.
    """

    def __init__(self, timesteps: Sequence[int] = (999, 899, 799, 699), **kwargs: Any):
        super().__init__(**kwargs)
        steps = [check_int(f"timesteps[{i}]", t, minimum=0) for i, t in enumerate(timesteps)]
        if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[0] >= self.num_timesteps:
            raise ValueError(f"timesteps must be strictly descending DDPM timesteps below num_timesteps "
                             f"({self.num_timesteps}), got {list(timesteps)}")
        self.given_timesteps = steps

    def timesteps(self, n: int) -> np.ndarray:
        n = check_steps(n)
        if n > len(self.given_timesteps):
            raise ValueError(f"this schedule has {len(self.given_timesteps)} timesteps "
                             f"({self.given_timesteps}); steps={n} asks for more: use steps<={len(self.given_timesteps)}")
        return np.asarray(self.given_timesteps[:n][::-1])

    def __repr__(self) -> str:
        return f"DDPMTimestepsDiscretization(timesteps={self.given_timesteps})"
