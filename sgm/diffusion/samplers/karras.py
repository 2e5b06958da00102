"""Euler and Heun on the probability-flow ODE with EDM's churn (Karras et al. 2022, Alg. 2).
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_positive
from ..util import to_d
from .base import BaseDiffusionSampler

class EulerEDMSampler(BaseDiffusionSampler):
    """Euler steps on the probability-flow ODE with EDM's optional churn (Karras et al. 2022, Alg. 2).

    ``s_churn`` adds noise to raise sigma by gamma = min(s_churn / steps, sqrt(2) - 1) for
    sigma in [s_tmin, s_tmax]; ``s_noise`` scales that noise.
    """

    def __init__(
        self,
        discretization: Any = None,
        num_steps: int | None = None,
        guider: Any = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(discretization, num_steps, guider, **kwargs)
        self.s_churn = check_positive("s_churn", s_churn, allow_zero=True)
        self.s_tmin = check_positive("s_tmin", s_tmin, allow_zero=True, allow_inf=True)
        self.s_tmax = check_positive("s_tmax", s_tmax, allow_zero=True, allow_inf=True)
        self.s_noise = check_positive("s_noise", s_noise, allow_zero=True)

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        n = len(sigmas) - 1
        for i in self.steps(n):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            gamma = min(self.s_churn / n, 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1.0)
            if gamma > 0:
                eps = self.noise_like(x, generator) * self.s_noise
                x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
            denoised = self.guided_denoise(denoise, x, sigma_hat, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma_hat, sigma_next=sigma_next, x=x, denoised=denoised)
            d = to_d(x, x.new_full((x.shape[0],), sigma_hat), denoised)
            x = self.correction_step(denoise, x, d, sigma_hat, sigma_next, cond, uc)
        return x

    def correction_step(self, denoise, x, d, sigma_hat, sigma_next, cond, uc) -> torch.Tensor:
        return x + d * (sigma_next - sigma_hat)


class HeunEDMSampler(EulerEDMSampler):
    """Heun's second-order method (Karras et al. 2022, Alg. 2); plain Euler on the step to 0."""

    def correction_step(self, denoise, x, d, sigma_hat, sigma_next, cond, uc) -> torch.Tensor:
        dt = sigma_next - sigma_hat
        x_euler = x + d * dt
        if sigma_next == 0:
            return x_euler  # no network evaluation at sigma 0
        denoised = self.guided_denoise(denoise, x_euler, sigma_next, cond, uc)
        d_next = to_d(x_euler, x.new_full((x.shape[0],), sigma_next), denoised)
        return x + (d + d_next) / 2 * dt
