"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes",
arXiv:2306.14878), in the form of ComfyUI's ``sample_restart``.

Heun steps (Karras et al. 2022) down the given schedule; on reaching a restart interval's low
end sigma_lo, ``times`` times over: add forward noise up to its high end sigma_hi,
x <- x + s_noise sqrt(sigma_hi^2 - sigma_lo^2) z (z from the per-image generators), and run
``steps`` Heun steps back down to sigma_lo on a Karras (rho = 7) sub-schedule, then carry on
down the main schedule. Both ends of an interval snap to the nearest sigmas of the schedule
(as ComfyUI does), and an interval that does not lie inside the schedule's nonzero part is skipped.

Without ``restart_list`` the intervals are ComfyUI's default, scaled to the schedule's step
count n: none for n < 20, one restart of 9 steps over [0.1, 2] for 20 <= n < 36, two restarts
of n // 4 steps over [0.1, 2] for n >= 36 (ComfyUI writes this {0.1: [restart_steps + 1,
restart_times, 2]}). ComfyUI also shortens its main schedule by the restart steps; here the
main schedule is the run's own (discretization + steps), so restarts cost extra evaluations:

    NFE = 2 n - 1 + sum over intervals of 2 * steps * times

(Heun: two per step, one on the step to sigma 0; a restart step never ends at 0). The default
adds 18 for 20 <= n < 36 and 4 * (n // 4) for n >= 36. With no restart this is
:class:`HeunEDMSampler` (EDM churn included), step for step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import check_int, check_positive
from ..discretization import EDMDiscretization
from ..util import to_d
from .heunpp import run_state
from .karras import HeunEDMSampler

log = logging.getLogger(__name__)

#: ComfyUI's default restart interval, in sigma.
DEFAULT_INTERVAL = (0.1, 2.0)
#: rho of the Karras sub-schedule of a restart.
RESTART_RHO = 7.0


@dataclass(frozen=True)
class Restart:
    """One restart interval: ``times`` restarts from ``sigma_min`` up to ``sigma_max``, each
    followed by ``steps`` Heun steps back down."""

    sigma_min: float
    sigma_max: float
    steps: int
    times: int = 1

    @classmethod
    def parse(cls, value: Any, where: str) -> "Restart":
        if isinstance(value, Restart):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping with sigma_min, sigma_max, steps[, times], got {value!r}")
        unknown = set(value) - {"sigma_min", "sigma_max", "steps", "times"}
        missing = {"sigma_min", "sigma_max", "steps"} - set(value)
        if unknown or missing:
            raise ValueError(f"{where} needs sigma_min, sigma_max, steps (and optionally times); "
                             f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        lo = check_positive(f"{where}.sigma_min", value["sigma_min"])
        hi = check_positive(f"{where}.sigma_max", value["sigma_max"])
        if hi <= lo:
            raise ValueError(f"{where}.sigma_max ({hi}) must be greater than {where}.sigma_min ({lo})")
        steps, times = check_int(f"{where}.steps", value["steps"]), check_int(f"{where}.times", value.get("times", 1))
        return cls(lo, hi, steps, times)


def default_restarts(n: int) -> list[Restart]:
    """ComfyUI's default restart list for an ``n``-step schedule."""
    if n < 20:
        return []
    if n < 36:
        return [Restart(*DEFAULT_INTERVAL, steps=9, times=1)]
    return [Restart(*DEFAULT_INTERVAL, steps=n // 4, times=2)]


class RestartSampler(HeunEDMSampler):
    """Restart sampling (Xu et al. 2023): Heun steps plus forward-noise restarts (see the module doc).

    ``restart_list``: None for ComfyUI's default, or a list of intervals
    ``{sigma_min, sigma_max, steps, times}`` (``[]`` for none); ``s_noise`` scales the restart
    noise (and the churn noise, with ``s_churn`` > 0).
    """

    _plan: dict[float, list[tuple[list[float], int]]] | None = None
    _generator: Any = None

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 s_noise: float = 1.0, restart_list: Sequence[Any] | None = None, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, s_noise=s_noise, **kwargs)
        listed = isinstance(restart_list, Sequence) and not isinstance(restart_list, (str, Mapping))
        if restart_list is not None and not listed:
            raise ValueError(f"restart_list must be a list of intervals or null, got {restart_list!r}")
        self.restart_list = (None if restart_list is None
                             else [Restart.parse(r, f"restart_list[{k}]") for k, r in enumerate(restart_list)])

    def restart_plan(self, sigmas: Sequence[float]) -> dict[float, list[tuple[list[float], int]]]:
        """Restarts by the sigma of the schedule they start from: (sub-schedule from sigma_hi
        down to sigma_lo, times)."""
        n = len(sigmas) - 1
        restarts = default_restarts(n) if self.restart_list is None else self.restart_list
        grid = np.asarray(sigmas, dtype=np.float64)
        plan: dict[float, list[tuple[list[float], int]]] = {}
        for r in restarts:
            lo, hi = int(np.argmin(np.abs(grid - r.sigma_min))), int(np.argmin(np.abs(grid - r.sigma_max)))
            if not (hi < lo and sigmas[lo] > 0 and sigmas[hi] > sigmas[lo]):
                log.debug("restart %s skipped: its interval does not lie inside the schedule", r)
                continue
            sub = EDMDiscretization(sigmas[lo], sigmas[hi], RESTART_RHO).get_sigmas(r.steps + 1).tolist()
            sub[0], sub[-1] = sigmas[hi], sigmas[lo]  # the schedule's own ends, exactly
            plan.setdefault(sigmas[lo], []).append((sub, r.times))
        return plan

    def nfe(self, sigmas: Sequence[float]) -> int:
        """Network evaluations of a run over ``sigmas`` (the module doc's count)."""
        main = 2 * (len(sigmas) - 1) - sum(1 for s in sigmas[1:] if s == 0)
        plan = self.restart_plan(sigmas)
        return main + sum(2 * (len(sub) - 1) * times for runs in plan.values() for sub, times in runs)

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        with run_state(self, _plan=self.restart_plan(sigmas), _generator=generator):
            return super()._loop(denoise, x, sigmas, cond, uc, generator, callback)

    def correction_step(self, denoise, x, d, sigma_hat, sigma_next, cond, uc) -> torch.Tensor:
        x = super().correction_step(denoise, x, d, sigma_hat, sigma_next, cond, uc)
        for sub, times in self._plan.get(sigma_next, ()):
            for _ in range(times):
                x = x + self.noise_like(x, self._generator) * (self.s_noise * math.sqrt(sub[0] ** 2 - sub[-1] ** 2))
                for sigma, sigma_to in zip(sub[:-1], sub[1:]):
                    denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
                    d_k = to_d(x, x.new_full((x.shape[0],), sigma), denoised)
                    x = super().correction_step(denoise, x, d_k, sigma, sigma_to, cond, uc)
        return x
