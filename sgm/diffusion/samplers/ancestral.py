"""Ancestral samplers: a deterministic step down to sigma_down, then fresh noise (k-diffusion).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_positive
from .base import BaseDiffusionSampler, get_ancestral_step

class AncestralSampler(BaseDiffusionSampler):
    """Shared loop of the ancestral samplers: a deterministic step down to sigma_down, then
    fresh noise of std ``s_noise * sigma_up`` (none on the last step). ``eta`` = 0 is deterministic."""

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 eta: float = 1.0, s_noise: float = 1.0, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, **kwargs)
        self.eta = check_positive("eta", eta, allow_zero=True)
        self.s_noise = check_positive("s_noise", s_noise, allow_zero=True)

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, self.eta)
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            x = self.step_down(denoise, x, denoised, sigma, sigma_down, cond, uc)
            if sigma_next > 0 and sigma_up > 0:
                x = x + self.noise_like(x, generator) * (self.s_noise * sigma_up)
        return x

    def step_down(self, denoise, x, denoised, sigma, sigma_down, cond, uc) -> torch.Tensor:
        raise NotImplementedError


class EulerAncestralSampler(AncestralSampler):
    """Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion's euler_ancestral)."""

    def step_down(self, denoise, x, denoised, sigma, sigma_down, cond, uc) -> torch.Tensor:
        return x + (x - denoised) / sigma * (sigma_down - sigma)


class DPMPP2SAncestralSampler(AncestralSampler):
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1 with r = 1/2) plus ancestral noise."""

    def step_down(self, denoise, x, denoised, sigma, sigma_down, cond, uc) -> torch.Tensor:
        if sigma_down == 0:
            return denoised  # Euler to sigma 0: no second evaluation
        t, t_next = -math.log(sigma), -math.log(sigma_down)
        h = t_next - t
        sigma_s = math.exp(-(t + 0.5 * h))
        x_2 = (sigma_s / sigma) * x - math.expm1(-0.5 * h) * denoised
        denoised_2 = self.guided_denoise(denoise, x_2, sigma_s, cond, uc)
        return (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
