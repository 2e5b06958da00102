"""Heun++ ("heunpp2"): Heun's method with a third evaluation one schedule step further ahead.

The 2023 k-diffusion community sampler (Carzit's sd-webui-samplers-scheduler, ComfyUI's
``sample_heunpp2``). A step from sigma_i (sigma_hat with EDM churn) to sigma_{i+1} takes the
Euler chain x_2 = x + d (sigma_{i+1} - sigma_hat), x_3 = x_2 + d_2 (sigma_{i+2} - sigma_{i+1})
with d_k = (x_k - D(x_k; sigma_k)) / sigma_k, and moves by

    x_next = x + (sigma_{i+1} - sigma_hat) (w_1 d + w_2 d_2 + w_3 d_3),
    w_2 = sigma_{i+1} / (3 sigma_0),  w_3 = sigma_{i+2} / (3 sigma_0),  w_1 = 1 - w_2 - w_3.

When sigma_{i+2} is the schedule's last sigma only d_2 is taken (w_2 = sigma_{i+1} / (2 sigma_0));
the step to the last sigma is plain Euler. The weights do not depend on the step size, so the
method is consistent but first order (measured in tests/test_restart_cfg_pp.py).
NFE = 3 n - 3 for n >= 2 steps (1 for n = 1); none at the last sigma.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..util import to_d
from .karras import EulerEDMSampler


@contextmanager
def run_state(sampler: Any, **state: Any) -> Iterator[None]:
    """Attributes a step hook reads during one ``_loop`` (the schedule, a plan, the generator)."""
    for key, value in state.items():
        setattr(sampler, key, value)
    try:
        yield
    finally:
        for key in state:
            setattr(sampler, key, None)


class HeunPP2Sampler(EulerEDMSampler):
    """Heun++ (ComfyUI's ``heunpp2``): up to three evaluations per step, weighted by sigma / sigma_0.

    EDM churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) as in :class:`EulerEDMSampler`.
    """

    _schedule: list[float] | None = None
    _index: dict[float, int] | None = None

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        with run_state(self, _schedule=sigmas, _index={s: j for j, s in enumerate(sigmas)}):
            return super()._loop(denoise, x, sigmas, cond, uc, generator, callback)

    def correction_step(self, denoise, x, d, sigma_hat, sigma_next, cond, uc) -> torch.Tensor:
        sigmas, j = self._schedule, self._index[sigma_next]
        ahead = sigmas[j : min(j + 2, len(sigmas) - 1)]  # sigma_{i+1}[, sigma_{i+2}], never the last sigma
        dt = sigma_next - sigma_hat
        y, slopes, start = x, [d], sigma_hat
        for sigma_k in ahead:
            y = y + slopes[-1] * (sigma_k - start)
            denoised = self.guided_denoise(denoise, y, sigma_k, cond, uc)
            slopes.append(to_d(y, y.new_full((y.shape[0],), sigma_k), denoised))
            start = sigma_k
        weights = [s / (len(slopes) * sigmas[0]) for s in ahead]
        slope = (1.0 - sum(weights)) * d + sum(w * s for w, s in zip(weights, slopes[1:]))
        return x + slope * dt
