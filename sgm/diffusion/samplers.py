"""Samplers: integrate a schedule they are given, from noise to data (k-diffusion's contract).

The one entry is ``sampler.sample(denoise, x, sigmas, cond, uc=None, generator=None,
callback=None)``: ``x`` is already at noise level ``sigmas[0]`` (see
:func:`sgm.diffusion.schedule.initial_latent`), ``sigmas`` is a slice of the run's schedule
(:func:`sgm.diffusion.schedule.sampling_sigmas`) and ``denoise(x, sigma, cond) -> x0`` is one
network evaluation. The sampler's guider decides the branches of each step
(:meth:`BaseDiffusionSampler.guided`). A new sampler is a subclass with one ``_loop`` method
plus a config file in ``conf/sampler/``.

Conventions kept from sgm / k-diffusion: the last step goes to sigma = 0, a step that lands
on sigma = 0 spends no extra network evaluation, and all the randomness a sampler draws
comes from ``generator`` (one per image). The input tensor is never modified in place.
Samplers are still built as ``Sampler(discretization, num_steps, guider)`` so that original
sgm configs import; calling such a sampler (``sampler(denoise, noise, cond, uc)``) computes
its own schedule as sgm does.

References: Karras et al. 2022 (EDM, Algorithms 1-2); Lu et al. 2022 (DPM-Solver++);
Crowson's k-diffusion for the ancestral and linear multistep formulations.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import build_part
from ._checks import check_int, check_positive
from .brownian import BrownianTreeNoise
from .guiders import Guided, IdentityGuider
from .noise import Generators, gaussian_like
from .schedule import initial_latent, sampling_sigmas
from .util import to_d

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


class DPMPP2MSampler(BaseDiffusionSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in log-sigma time."""

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        old_denoised = None
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            if sigma_next == 0:
                x = denoised
            else:
                t, t_next = -math.log(sigma), -math.log(sigma_next)
                h = t_next - t
                if old_denoised is None:
                    d = denoised
                else:
                    r = (t - (-math.log(sigmas[i - 1]))) / h
                    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (sigma_next / sigma) * x - math.expm1(-h) * d
            old_denoised = denoised
        return x


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
