"""DPM-Solver++ multistep samplers, ODE and SDE (Lu et al. 2022, arXiv:2211.01095).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .._checks import check_positive
from ..brownian import BrownianTreeNoise
from ..noise import Generators
from .base import BaseDiffusionSampler

class DPMPP2MSampler(BaseDiffusionSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in log-sigma time."""

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        old_denoised = None
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            x = self.update(x, denoised, old_denoised, sigmas, i)
            old_denoised = denoised
        return x

    def update(self, x: torch.Tensor, denoised: torch.Tensor, old_denoised: torch.Tensor | None,
               sigmas: Sequence[float], i: int) -> torch.Tensor:
        """The step from ``sigmas[i]`` to ``sigmas[i + 1]`` given this step's and the previous step's
        denoised estimates (first order without a previous one; the denoised estimate at sigma 0)."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            return denoised
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        h = t_next - t
        if old_denoised is None:
            d = denoised
        else:
            r = (t - (-math.log(sigmas[i - 1]))) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        return (sigma_next / sigma) * x - math.expm1(-h) * d


class DPMPP2MSDESampler(BaseDiffusionSampler):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, arXiv:2211.01095), in k-diffusion's formulation.

    Each step from sigma to sigma_next (h = log(sigma / sigma_next)) integrates the linear
    part of the reverse SDE exactly; ``eta`` scales the noise (1: the reverse SDE; 0: the
    probability-flow ODE, where ``"midpoint"`` is exactly DPM++ 2M):

        x <- (sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D
             + second-order correction from the previous denoised estimate
             + s_noise * sigma_next * sqrt(1 - e^(-2 eta h)) * z,

    where the correction is ``0.5 (1 - e^(-H)) / r (D - D_prev)`` for ``solver_type="midpoint"``
    and ``(1 - (1 - e^(-H)) / H) / r (D - D_prev)`` for ``"heun"`` (H = (1 + eta) h,
    r = h_prev / h). The noise z comes from one Brownian tree per image seeded from that
    image's generator (:mod:`sgm.diffusion.brownian`), so runs with different step counts
    follow the same Brownian path. The step to sigma 0 returns the denoised estimate.
    """

    SOLVER_TYPES = ("midpoint", "heun")

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint", **kwargs: Any):
        super().__init__(discretization, num_steps, guider, **kwargs)
        self.eta = check_positive("eta", eta, allow_zero=True)
        self.s_noise = check_positive("s_noise", s_noise, allow_zero=True)
        if solver_type not in self.SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {', '.join(map(repr, self.SOLVER_TYPES))}, "
                             f"got {solver_type!r}")
        self.solver_type = str(solver_type)

    def make_noise(self, x: torch.Tensor, sigmas: Sequence[float], generator: Generators) -> BrownianTreeNoise | None:
        """The Brownian trees of a run (None when no step draws noise)."""
        noisy = self.eta > 0 and self.s_noise > 0 and any(b > 0 for b in sigmas[1:])
        return BrownianTreeNoise.for_schedule(x, sigmas, generator) if noisy else None

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        noise = self.make_noise(x, sigmas, generator)
        old_denoised: torch.Tensor | None = None
        h_last: float | None = None
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            if sigma_next == 0:
                x = denoised  # the step to sigma 0: no further evaluation
            else:
                h = math.log(sigma) - math.log(sigma_next)
                eta_h = self.eta * h
                big_h = h + eta_h
                one_minus = -math.expm1(-big_h)  # 1 - e^(-(1 + eta) h)
                x = (sigma_next / sigma) * math.exp(-eta_h) * x + one_minus * denoised
                if old_denoised is not None:
                    r = h_last / h
                    if self.solver_type == "heun":
                        coeff = (1.0 - one_minus / big_h) / r
                    else:
                        coeff = 0.5 * one_minus / r
                    x = x + coeff * (denoised - old_denoised)
                if noise is not None:
                    std = sigma_next * math.sqrt(-math.expm1(-2.0 * eta_h)) * self.s_noise
                    x = x + noise(sigma, sigma_next) * std
                h_last = h
            old_denoised = denoised
        return x
