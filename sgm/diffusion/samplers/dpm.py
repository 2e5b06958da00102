"""DPM-Solver-2 steps on the probability-flow ODE: plain (with EDM churn) and ancestral.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv:2206.00364, Alg. 2 and its discussion of DPM-Solver) with the second-order step of
Lu et al. 2022 ("DPM-Solver", arXiv:2206.00927, DPM-Solver-2 with r1 = 1/2), written in
sigma as k-diffusion's ``sample_dpm_2`` / ``sample_dpm_2_ancestral``.
"""

from __future__ import annotations

import math

import torch

from .ancestral import AncestralSampler
from .base import BaseDiffusionSampler
from .karras import EulerEDMSampler


def dpm2_step(sampler: BaseDiffusionSampler, denoise, x: torch.Tensor, d: torch.Tensor, sigma: float,
              sigma_to: float, cond: dict, uc: dict) -> torch.Tensor:
    """One DPM-Solver-2 step from ``sigma`` to ``sigma_to`` given the slope ``d = (x - D) / sigma``.

    An Euler half-step to the geometric midpoint sigma_mid = sqrt(sigma * sigma_to) (the
    midpoint in log sigma), one evaluation there, then the full step with the midpoint's slope:

        x_mid = x + d (sigma_mid - sigma),   x <- x + d(x_mid; sigma_mid) (sigma_to - sigma).

    To ``sigma_to = 0`` it is an Euler step (x <- D), which spends no evaluation at sigma 0.
    """
    if sigma_to == 0:
        return x - d * sigma
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_mid = x + d * (sigma_mid - sigma)
    denoised_mid = sampler.guided_denoise(denoise, x_mid, sigma_mid, cond, uc)
    return x + (x_mid - denoised_mid) * ((sigma_to - sigma) / sigma_mid)


class DPM2Sampler(EulerEDMSampler):
    """DPM-Solver-2 on the probability-flow ODE with EDM's optional churn (k-diffusion's ``dpm_2``).

    Each step evaluates at sigma_hat (= sigma without churn) and at the log-midpoint toward
    sigma_next (:func:`dpm2_step`); the step to sigma 0 is Euler. Network evaluations: 2 per
    step, 1 on the last step to 0 (2n - 1 for an n-step schedule ending at 0). Second order.
    The churn knobs (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) are those of
    :class:`~sgm.diffusion.samplers.karras.EulerEDMSampler`.
    """

    def correction_step(self, denoise, x, d, sigma_hat, sigma_next, cond, uc) -> torch.Tensor:
        return dpm2_step(self, denoise, x, d, sigma_hat, sigma_next, cond, uc)


class DPM2AncestralSampler(AncestralSampler):
    """DPM-Solver-2 down to sigma_down, then fresh noise of std ``s_noise * sigma_up``
    (k-diffusion's ``dpm_2_ancestral``); ``eta`` = 0 is :class:`DPM2Sampler` without churn.

    Network evaluations: 2 per step, 1 on the last step to 0 (2n - 1). One departure from
    k-diffusion, reachable only with eta > 1: where sigma_down is 0 but sigma_next is not,
    k-diffusion returns the denoised estimate without noise; here the noise of std sigma_up
    (= sigma_next) is added, as every ancestral sampler of this package does.
    """

    def step_down(self, denoise, x, denoised, sigma, sigma_down, cond, uc) -> torch.Tensor:
        return dpm2_step(self, denoise, x, (x - denoised) / sigma, sigma, sigma_down, cond, uc)
