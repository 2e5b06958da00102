"""Schedules over the selected model's discrete noise levels (ComfyUI's scheduler names).

Each reads the model's ascending sigma table ``model_sigmas`` (index = timestep t = 0 .. T - 1),
filled by :func:`sgm.diffusion.schedule.for_model` from the denoiser: a
:class:`~sgm.diffusion.denoiser.DiscreteDenoiser`'s ``sigmas``; for a continuous denoiser, T = 1000
log-uniform levels over its trained range (ComfyUI's table of continuous EDM models), so there
its time variable is log sigma and ``simple`` / ``normal`` / ``sgm_uniform`` are exponential schedules.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import check_positive
from .base import Discretization, check_steps, to_sigmas
from .ddpm import spaced_timesteps


def as_table(levels: Any) -> np.ndarray:
    """A model's noise levels as an ascending float64 array of the positive ones."""
    if isinstance(levels, torch.Tensor):
        levels = levels.detach().cpu().double().numpy()
    table = np.sort(np.asarray(levels, dtype=np.float64).reshape(-1))
    table = table[table > 0]
    if len(table) < 2 or not np.all(np.isfinite(table)):
        raise ValueError("model_sigmas must hold at least two positive, finite noise levels")
    return table


class ModelTableDiscretization(Discretization):
    """Base of the schedules over the model's table; ``model_sigmas`` None is the selected model's."""

    MODEL_FIELDS = ("model_sigmas",)

    def __init__(self, model_sigmas: Any = None):
        self.model_sigmas = None if model_sigmas is None else as_table(model_sigmas)

    def table(self) -> np.ndarray:
        """The ascending table, or a ValueError naming the fix when it is not set yet."""
        if self.model_sigmas is None:
            raise ValueError(f"{type(self).__name__} runs over the model's noise levels: let "
                             "sgm.diffusion.schedule.sampling_sigmas fill model_sigmas from the model's denoiser, "
                             "or give model_sigmas")
        return self.model_sigmas

    def at_timesteps(self, steps: np.ndarray, device: str | torch.device) -> torch.Tensor:
        """sigma at (possibly fractional) timesteps: log-linear between neighbouring levels
        (exact at integers; ComfyUI's ``ModelSamplingDiscrete.sigma``)."""
        table = self.table()
        if steps.dtype.kind in "iu":
            return to_sigmas(table[steps], device)
        return to_sigmas(np.exp(np.interp(steps, np.arange(len(table)), np.log(table))), device)


class SimpleDiscretization(ModelTableDiscretization):
    """ComfyUI's ``simple``: every (T/n)-th level from the top, t_k = T - 1 - floor(k T / n)."""

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n, total = check_steps(n), len(self.table())
        if n > total:
            raise ValueError(f"n ({n}) cannot exceed the model's {total} noise levels")
        return self.at_timesteps(total - 1 - np.floor(np.arange(n) * (total / n)).astype(int), device)


class NormalDiscretization(ModelTableDiscretization):
    """ComfyUI's ``normal``: timesteps uniform in the model's time variable, t = linspace(T - 1, 0, n)."""

    def spaced(self, n: int, total: int) -> np.ndarray:
        return np.linspace(total - 1, 0, n)

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.at_timesteps(self.spaced(check_steps(n), len(self.table())), device)


class SGMUniformDiscretization(NormalDiscretization):
    """ComfyUI's ``sgm_uniform`` (Stability's uniform timesteps): linspace(T - 1, 0, n + 1) without its end."""

    def spaced(self, n: int, total: int) -> np.ndarray:
        return np.linspace(total - 1, 0, n + 1)[:-1]


class DDIMUniformDiscretization(ModelTableDiscretization):
    """DDIM's uniform skip (Song et al. 2021; LDM's ``make_ddim_timesteps``, ComfyUI's ``ddim_uniform``):
    t_k = 1 + k * (T // n), k = 0 .. n - 1, i.e. diffusers' ``leading`` spacing with steps_offset 1.

    The reference loops take every (T // n)-th timestep while below T, which is more than n
    steps when n does not divide T (T = 1000, n = 30: 31); here exactly n are taken.
    """

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n, total = check_steps(n), len(self.table())
        if n >= total:
            raise ValueError(f"n ({n}) must be smaller than the model's {total} noise levels")
        return self.at_timesteps(spaced_timesteps("leading", n, total, steps_offset=1), device)


class BetaDiscretization(ModelTableDiscretization):
    """Beta sampling (Lee et al. 2024, "Beta Sampling is All You Need"): steps placed at the quantiles
    of a Beta(alpha, beta) distribution, dense at both ends of the schedule for alpha, beta < 1.

    ``space="timesteps"`` (default; the paper, ComfyUI's ``beta``): t_k = rint(ppf(1 - k/n) (T - 1)),
    sigma = the model's level at t_k; two steps on the same level are an error (fewer steps, or
    alpha / beta nearer 1). ``space="sigma"`` (diffusers' ``use_beta_sigmas``):
    sigma_k = sigma_min + ppf(1 - k/(n-1)) (sigma_max - sigma_min) over the table's range.
    Needs scipy (``scipy.stats.beta.ppf``).
    """

    SPACES = ("timesteps", "sigma")

    def __init__(self, alpha: float = 0.6, beta: float = 0.6, space: str = "timesteps", model_sigmas: Any = None):
        super().__init__(model_sigmas)
        self.alpha = check_positive("alpha", alpha)
        self.beta = check_positive("beta", beta)
        if space not in self.SPACES:
            raise ValueError(f"space must be one of {', '.join(self.SPACES)}, got {space!r}")
        self.space = space

    def quantiles(self, u: np.ndarray) -> np.ndarray:
        try:
            from scipy.stats import beta as beta_distribution
        except ImportError as err:  # pragma: no cover - scipy is installed with the test extra
            raise ImportError("discretization=beta needs scipy: pip install scipy") from err
        return beta_distribution.ppf(u, self.alpha, self.beta)

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n, table = check_steps(n), self.table()
        if self.space == "sigma":
            lo, hi = table[0], table[-1]
            return to_sigmas(lo + self.quantiles(1.0 - np.linspace(0.0, 1.0, n)) * (hi - lo), device)
        steps = np.rint(self.quantiles(1.0 - np.arange(n) / n) * (len(table) - 1)).astype(int)
        if np.any(np.diff(steps) >= 0):
            raise ValueError(f"{n} beta-spaced steps (alpha={self.alpha}, beta={self.beta}) fall on the same "
                             f"timestep of the model's {len(table)}: use fewer steps, or alpha / beta closer to 1")
        return self.at_timesteps(steps, device)
