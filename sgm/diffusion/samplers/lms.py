"""Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE (k-diffusion's lms).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import check_int
from .base import BaseDiffusionSampler, linear_multistep_coeff

class LinearMultistepSampler(BaseDiffusionSampler):
    """Linear multistep (Adams-Bashforth in sigma) of order ``order`` on the probability-flow ODE."""

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 order: int = 4, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, **kwargs)
        self.order = check_int("order", order)

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        t = np.asarray(sigmas, dtype=np.float64)
        ds: list[torch.Tensor] = []
        for i in self.steps(len(sigmas) - 1):
            sigma = sigmas[i]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigmas[i + 1], x=x, denoised=denoised)
            ds.append((x - denoised) / sigma)
            if len(ds) > self.order:
                ds.pop(0)
            cur_order = min(i + 1, self.order)
            coeffs = [linear_multistep_coeff(cur_order, t, i, j) for j in range(cur_order)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        return x
