"""Samplers for consistency-distilled models: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024).

Both take one network evaluation per step and move along the schedule in two moves: from
``x`` at sigma back to a lower noise level sigma_s along the step's own trajectory estimate,
``x_s = x0 + sigma_s eps`` with ``eps = (x - x0) / sigma`` (the DDIM map), then forward to
sigma_next with fresh noise, ``x' = x_s + sqrt(sigma_next^2 - sigma_s^2) z``. In the
variance-preserving latent this is ``sqrt(abar'/abar_s) x_s,vp + sqrt(1 - abar'/abar_s) z``,
the forward process from s to the next timestep. LCM goes all the way back (sigma_s = 0);
TCD's ``gamma`` picks sigma_s. The noise z comes from the per-image generators, drawn only
when sigma_s < sigma_next, never on the step to sigma 0 (whose result is x_s, there x0).

A consistency model's boundary scalings (c_skip, c_out of the consistency function) belong to
the model's parametrisation: ``denoise`` returns its x0 (the consistency function's value).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._checks import check_int, check_positive
from ..discretization import LegacyDDPMDiscretization
from .base import BaseDiffusionSampler


class LCMSampler(BaseDiffusionSampler):
    """Multistep latent consistency sampling (Luo et al. 2023, arXiv:2310.04378; Song et al.
    2023, Alg. 1): denoise to the x0 estimate, then re-noise it to the next sigma with fresh
    noise, ``x' = D(x; sigma) + sigma_next z``. One network evaluation per step; the step to
    sigma 0 returns the x0 estimate and draws nothing."""

    def sigma_s(self, sigma_next: float) -> float:
        """The noise level a step goes back to before re-noising to ``sigma_next`` (LCM: 0)."""
        return 0.0

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            sigma_s = self.sigma_s(sigma_next)
            x = denoised + (x - denoised) * (sigma_s / sigma)  # x0 + sigma_s eps
            if sigma_next > sigma_s:
                x = x + self.noise_like(x, generator) * math.sqrt(sigma_next**2 - sigma_s**2)
        return x


class TCDSampler(LCMSampler):
    """Strategic stochastic sampling of Trajectory Consistency Distillation (Zheng et al. 2024,
    arXiv:2402.19159) with ``gamma`` in [0, 1].

    A step to timestep t' goes back to s = floor((1 - gamma) t'), the noise level of that
    timestep in ``table`` (the model's discrete training schedule, default SDXL's
    :class:`~sgm.diffusion.discretization.LegacyDDPMDiscretization`), then forward to t' with
    fresh noise. t' is the table index nearest to sigma_next (as the discrete denoiser snaps
    sigma) and ``sigma_s = sigma_next * sigma(s) / sigma(t')``: on the table exactly the level
    of s (diffusers' rule), between its levels (an EDM schedule) the same log-sigma distance
    back, so that sigma_s <= sigma_next always. gamma = 0 is deterministic (DDIM); larger gamma
    adds more noise each step. The step to sigma 0 ends at the x0 estimate (s = 0 is clean here;
    diffusers' ``TCDScheduler`` ends at its timestep 0, sigma 0.0292 for SDXL). One network
    evaluation per step; fresh noise every step to sigma_next > 0 when gamma > 0.
    """

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 gamma: float = 0.3, table: Any = None, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, **kwargs)
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        if self.gamma > 1:
            raise ValueError(f"gamma must be <= 1, got {gamma!r}")
        self.table = LegacyDDPMDiscretization() if table is None else table
        if not hasattr(self.table, "num_timesteps") or not callable(self.table):
            raise ValueError("table must be a discrete training schedule with num_timesteps "
                             f"(e.g. LegacyDDPMDiscretization), got {self.table!r}")
        count = check_int("table.num_timesteps", self.table.num_timesteps)
        # sigma of timestep t, ascending: the levels a discrete denoiser snaps to
        self.levels = self.table(count, do_append_zero=False, flip=True).double().numpy()

    def sigma_s(self, sigma_next: float) -> float:
        if sigma_next == 0:
            return 0.0
        t_next = int(np.abs(self.levels - sigma_next).argmin())
        t_s = math.floor((1.0 - self.gamma) * t_next)
        return sigma_next * float(self.levels[t_s] / self.levels[t_next])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gamma={self.gamma}, guider={self.guider!r})"
