"""The sampler base class and the step formulas several samplers share.

:class:`BaseDiffusionSampler` holds what every sampler has: the guider, the progress bar,
the callback, noise from the per-image generators, and the two entries (``sample`` over a
given schedule, sgm's ``__call__`` over its own).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ...conditioning.prompt_schedule import at_sigma
from ...config import build_part
from ...networks.reuse import sampling_run
from .._checks import check_int
from ..guiders import Guided, IdentityGuider
from ..noise import Generators, gaussian_like
from ..schedule import initial_latent, sampling_sigmas

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
Callback = Callable[[dict], None]


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma_from -> sigma_to into a deterministic part down to ``sigma_down``
    and fresh noise of std ``sigma_up`` (sigma_down^2 + sigma_up^2 = sigma_to^2)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def linear_multistep_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial of node t_{i-j}
    among the nodes t_i, ..., t_{i-order+1} (exact polynomial integration)."""
    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")
    nodes = [float(t[i - k]) for k in range(order) if k != j]
    basis = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
    denom = math.prod(float(t[i - j]) - node for node in nodes)
    antiderivative = basis.integ()
    return float((antiderivative(float(t[i + 1])) - antiderivative(float(t[i]))) / denom)


class BaseDiffusionSampler:
    """Shared machinery: guidance, progress bar, callback, noise. Subclasses implement ``_loop``."""

    def __init__(
        self,
        discretization: Any = None,
        num_steps: int | None = None,
        guider: Any = None,
        verbose: bool = False,
        device: Any = None,
        *,
        discretization_config: Any = None,
        guider_config: Any = None,
    ):
        # discretization and num_steps serve only the sgm-style call (__call__); runs give a schedule
        self.discretization = (build_part("discretization", discretization, discretization_config)
                               if discretization is not None or discretization_config is not None else None)
        self.guider = build_part("guider", guider, guider_config, default=IdentityGuider)
        self.num_steps = None if num_steps is None else check_int("num_steps", num_steps)
        self.verbose = bool(verbose)
        self.device = device  # accepted for sgm configs; sampling follows the input's device

    def sample(
        self,
        denoise: DenoiseFn,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        cond: dict,
        uc: dict | None = None,
        generator: Generators = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """Integrate ``x`` (already at noise level ``sigmas[0]``) through ``sigmas``; returns x at the last one."""
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError("sigmas must be a 1-D schedule with at least two entries")
        uc = cond if uc is None else uc
        with sampling_run():  # the prompt's batches and attention keys made once (sgm.networks.reuse)
            return self._loop(denoise, x, sigmas.tolist(), cond, uc, generator, callback)

    def __call__(self, denoise: DenoiseFn, x: torch.Tensor, cond: dict, uc: dict | None = None,
                 num_steps: int | None = None, generator: Generators = None,
                 callback: Callback | None = None) -> torch.Tensor:
        """sgm's call: unit noise ``x`` through this sampler's own discretization and step count."""
        if self.discretization is None:
            raise ValueError("this sampler has no discretization: give it one, or call sample() with a schedule")
        steps = num_steps if num_steps is not None else self.num_steps
        if steps is None:
            raise ValueError("num_steps is not set: give it to the sampler or to the call")
        sigmas = sampling_sigmas(self.discretization, steps, device=x.device)
        return self.sample(denoise, initial_latent(x, sigmas[0]), sigmas, cond, uc, generator, callback)

    # -- pieces for subclasses -------------------------------------------------------
    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback) -> torch.Tensor:
        raise NotImplementedError

    def guided(self, denoise: DenoiseFn, x: torch.Tensor, sigma: float, cond: dict, uc: dict) -> Guided:
        """The guider's step at scalar noise level ``sigma``: the x0 and every branch's prediction."""
        s = x.new_full((x.shape[0],), sigma)
        cond, uc = at_sigma(cond, sigma), at_sigma(uc, sigma)  # prompt editing: this step's conditioning
        if hasattr(self.guider, "guide"):
            return self.guider.guide(denoise, x, s, cond, uc)
        x_in, s_in, c_in = self.guider.prepare_inputs(x, s, cond, uc)  # a guider with only sgm's API
        return Guided(self.guider(denoise(x_in, s_in, c_in), s))

    def guided_denoise(self, denoise: DenoiseFn, x: torch.Tensor, sigma: float, cond: dict, uc: dict) -> torch.Tensor:
        """One guided x0 estimate at scalar noise level ``sigma`` for the whole batch."""
        return self.guided(denoise, x, sigma, cond, uc).x0

    def steps(self, n: int):
        return tqdm(range(n), desc=type(self).__name__, disable=not self.verbose, leave=False)

    @staticmethod
    def noise_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Unit Gaussian noise shaped like ``x`` (see :func:`sgm.diffusion.noise.gaussian`)."""
        return gaussian_like(x, generator)

    @staticmethod
    def _report(callback: Callback | None, **info: Any) -> None:
        if callback is not None:
            callback(info)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(guider={self.guider!r})"
