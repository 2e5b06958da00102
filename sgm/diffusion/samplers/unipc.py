"""UniPC, the unified predictor-corrector multistep sampler (Zhao et al. 2023, arXiv:2302.04867).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .base import BaseDiffusionSampler
from .multistep import check_order, phi


class UniPCSampler(BaseDiffusionSampler):
    """UniPC with B(h) = h (``variant="bh1"``) or B(h) = e^h - 1 (``"bh2"``), data prediction
    (Zhao et al. 2023, Algorithms 2-3; ComfyUI's ``uni_pc`` and ``uni_pc_bh2``).

    In lambda = -log sigma the ODE is dx/dlambda = D - x. The predictor UniP-p advances from
    sigma_i with the denoised estimates D_i, ..., D_{i-p+1}:

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i + (1 - sigma_{i+1} / sigma_i) D_i
                  - B(h) sum_k a_k (D_{i-k} - D_i) / r_k,   r_k = (lambda_{i-k} - lambda_i) / h,

    with h = lambda_{i+1} - lambda_i and the a_k solving the paper's order conditions
    (a = 1/2 for p = 2). The network then sees x_{i+1} once; the corrector UniC-p reuses that
    evaluation D_{i+1} to redo the same step with it as one more node (order p + 1), and the
    corrected x_{i+1} is what the next predictor starts from. So the corrector costs no
    evaluation: one per step, and none at sigma 0 (the step to 0 returns D).

    ``order`` (1 to 3) is the predictor's; step i of n uses min(order, i + 1, n - i), lower on
    the first steps (warm-up) and the last ones (lower_order_final of the paper's code and diffusers).
    """

    VARIANTS = ("bh1", "bh2")

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 variant: str = "bh1", order: int = 3, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, **kwargs)
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, self.VARIANTS))}, got {variant!r}")
        self.variant = str(variant)
        self.order = check_order("order", order, 3)

    def update(self, x: torch.Tensor, sigmas: Sequence[float], i: int, denoised: Sequence[torch.Tensor],
               order: int, corrector_value: torch.Tensor | None = None) -> torch.Tensor:
        """The step sigma_i -> sigma_{i+1} from ``x`` at sigma_i with ``denoised`` = [..., D_{i-1}, D_i]:
        the predictor UniP-``order``, or with ``corrector_value`` = D_{i+1} the corrector UniC-``order``."""
        lam = [-math.log(sigmas[i - k]) for k in range(order)]
        h = -math.log(sigmas[i + 1]) - lam[0]
        hh = -h  # data prediction integrates e^(-h)
        d_i = denoised[-1]
        rks = [(lam[k] - lam[0]) / h for k in range(1, order)]
        diffs = [(denoised[-1 - k] - d_i) / r for k, r in enumerate(rks, start=1)]
        b_h = hh if self.variant == "bh1" else math.expm1(hh)
        x_base = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(hh) * d_i
        if corrector_value is not None:
            diffs.append(corrector_value - d_i)
            rhos = [0.5] if order == 1 else self._rhos(rks + [1.0], hh, b_h)
        elif order == 1:
            return x_base
        else:
            rhos = [0.5] if order == 2 else self._rhos(rks, hh, b_h)
        return x_base - b_h * sum(rho * diff for rho, diff in zip(rhos, diffs))

    @staticmethod
    def _rhos(rks: list[float], hh: float, b_h: float) -> list[float]:
        """The coefficients solving sum_k a_k r_k^(m-1) = m! h phi_{m+1}(-h) / B(h), m = 1..len(rks)."""
        matrix = np.array([[r ** m for r in rks] for m in range(len(rks))])
        rhs = np.array([hh * math.factorial(m) * phi(m + 1, hh) / b_h for m in range(1, len(rks) + 1)])
        return np.linalg.solve(matrix, rhs).tolist()

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        n = len(sigmas) - 1
        denoised_history: list[torch.Tensor] = []
        x_prev: torch.Tensor | None = None  # x at the start of the last step (corrected)
        prev_order = 0
        for i in self.steps(n):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            if sigma_next == 0:
                x = denoised  # the step to sigma 0 (a corrected x here would not change it)
                continue
            if x_prev is not None:  # UniC: redo the last step with this evaluation
                x = self.update(x_prev, sigmas, i - 1, denoised_history, prev_order, corrector_value=denoised)
            denoised_history = (denoised_history + [denoised])[-self.order:]
            prev_order = min(self.order, i + 1, n - i)
            x_prev = x
            x = self.update(x, sigmas, i, denoised_history, prev_order)
        return x
