"""DPM-Solver++ samplers, ODE and SDE (Lu et al. 2022, arXiv:2211.01095).

Multistep: 2M, 2M SDE and 3M SDE; singlestep: DPM++ SDE (two stages per step). The SDE
samplers draw their noise from one Brownian tree per image (:mod:`sgm.diffusion.brownian`),
seeded from that image's generator, in k-diffusion's formulation.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .._checks import check_positive
from ..brownian import BrownianTreeNoise
from ..noise import Generators
from .base import BaseDiffusionSampler, get_ancestral_step

class DPMPP2MSampler(BaseDiffusionSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in log-sigma time."""

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        old_denoised = None
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            x = self.update(x, denoised, old_denoised, sigmas, i)
            old_denoised = denoised
        return x

    def update(self, x: torch.Tensor, denoised: torch.Tensor, old_denoised: torch.Tensor | None,
               sigmas: Sequence[float], i: int) -> torch.Tensor:
        """The step from ``sigmas[i]`` to ``sigmas[i + 1]`` given this step's and the previous step's
        denoised estimates (first order without a previous one; the denoised estimate at sigma 0)."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            return denoised
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        h = t_next - t
        if old_denoised is None:
            d = denoised
        else:
            r = (t - (-math.log(sigmas[i - 1]))) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        return (sigma_next / sigma) * x - math.expm1(-h) * d


def phi_2(big_h: float) -> float:
    """phi_2 of the exponential integrator, 1 - (1 - e^(-H)) / H: the weight of the first divided difference."""
    return 1.0 + math.expm1(-big_h) / big_h


class BrownianSDESampler(BaseDiffusionSampler):
    """Shared part of the DPM-Solver++ SDE samplers: ``eta`` (1: the reverse SDE, 0: the
    probability-flow ODE), ``s_noise`` and the Brownian trees of a run."""

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 eta: float = 1.0, s_noise: float = 1.0, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, **kwargs)
        self.eta = check_positive("eta", eta, allow_zero=True)
        self.s_noise = check_positive("s_noise", s_noise, allow_zero=True)

    def make_noise(self, x: torch.Tensor, sigmas: Sequence[float], generator: Generators) -> BrownianTreeNoise | None:
        """The Brownian trees of a run (None when no step draws noise)."""
        noisy = self.eta > 0 and self.s_noise > 0 and any(b > 0 for b in sigmas[1:])
        return BrownianTreeNoise.for_schedule(x, sigmas, generator) if noisy else None

    def sde_step(self, x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float
                 ) -> tuple[torch.Tensor, float, float]:
        """The exactly integrated linear part of a reverse-SDE step, first order in D:
        x <- (sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D, h = log(sigma / sigma_next).
        Returns the new x, h and H = (1 + eta) h."""
        h = math.log(sigma) - math.log(sigma_next)
        big_h = h + self.eta * h
        return (sigma_next / sigma) * math.exp(-self.eta * h) * x - math.expm1(-big_h) * denoised, h, big_h

    def sde_noise(self, x: torch.Tensor, noise: BrownianTreeNoise | None, sigma: float, sigma_next: float,
                  h: float) -> torch.Tensor:
        """x plus the step's noise, ``s_noise * sigma_next * sqrt(1 - e^(-2 eta h))`` times the tree's unit noise."""
        if noise is None:
            return x
        return x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2.0 * self.eta * h)) * self.s_noise)


class MultistepSDESampler(BrownianSDESampler):
    """The loop of the DPM-Solver++ multistep SDE samplers: one evaluation per step, the
    :meth:`sde_step`, a correction from the previous denoised estimates (:meth:`correction`),
    the Brownian-tree noise; the step to sigma 0 returns the denoised estimate."""

    #: how many previous (denoised, h) pairs the correction uses
    HISTORY = 1

    def correction(self, denoised: torch.Tensor, history: Sequence[tuple[torch.Tensor, float]], h: float,
                   big_h: float) -> torch.Tensor:
        """What the step adds to the first-order update, given the previous (denoised, h), newest first."""
        raise NotImplementedError

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        noise = self.make_noise(x, sigmas, generator)
        history: list[tuple[torch.Tensor, float]] = []
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            if sigma_next == 0:
                x = denoised  # the step to sigma 0: no further evaluation
                continue
            x, h, big_h = self.sde_step(x, denoised, sigma, sigma_next)
            if history:
                x = x + self.correction(denoised, history, h, big_h)
            x = self.sde_noise(x, noise, sigma, sigma_next, h)
            history = [(denoised, h)] + history[: self.HISTORY - 1]
        return x


class DPMPP2MSDESampler(MultistepSDESampler):
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
        super().__init__(discretization, num_steps, guider, eta=eta, s_noise=s_noise, **kwargs)
        if solver_type not in self.SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {', '.join(map(repr, self.SOLVER_TYPES))}, "
                             f"got {solver_type!r}")
        self.solver_type = str(solver_type)

    def correction(self, denoised, history, h, big_h):
        denoised_1, h_1 = history[0]
        coeff = phi_2(big_h) if self.solver_type == "heun" else -0.5 * math.expm1(-big_h)
        return (coeff * h / h_1) * (denoised - denoised_1)


class DPMPP3MSDESampler(MultistepSDESampler):
    """DPM-Solver++(3M) SDE: third-order multistep on the reverse SDE (Lu et al. 2022,
    arXiv:2211.01095, multistep of Sec. 4 with the SDE's exact linear part), as k-diffusion's
    ``sample_dpmpp_3m_sde``.

    The step is :meth:`BrownianSDESampler.sde_step` plus corrections from the last two
    denoised estimates, with H = (1 + eta) h, r0 = h_1 / h, r1 = h_2 / h,
    phi_2 = 1 - (1 - e^(-H)) / H and phi_3 = phi_2 / H - 1/2:

        d1_0 = (D - D_1) / r0,  d1_1 = (D_1 - D_2) / r1,
        x += phi_2 (d1_0 + (d1_0 - d1_1) r0 / (r0 + r1)) - phi_3 (d1_0 - d1_1) / (r0 + r1),

    (with one previous estimate only, x += phi_2 d1_0; none on the first step), then the
    Brownian-tree noise ``s_noise * sigma_next * sqrt(1 - e^(-2 eta h)) z``. ``eta`` = 0 is
    the DPM-Solver++(3M) ODE solver. One evaluation per step, the step to sigma 0 (which
    returns the denoised estimate) included.

    Order: these are k-diffusion's coefficients (and diffusers' and Lu et al.'s code's), kept
    so that the samples agree. There d2 ~ h^2 D''/2, while the Taylor term that phi_3
    multiplies is h^2 D''; the scheme is therefore second order asymptotically. On the
    analytic mixture (EDM schedule, 0.002..80) its error falls like third order from 16 to 32
    steps (slope 3.8) and like second order from 64 steps on (2.0, 1.9); with d2 doubled it
    would be third order throughout, with larger errors up to about 32 steps.
    """

    HISTORY = 2

    def correction(self, denoised, history, h, big_h):
        p2 = phi_2(big_h)
        denoised_1, h_1 = history[0]
        r0 = h_1 / h
        d1_0 = (denoised - denoised_1) / r0
        if len(history) == 1:
            return p2 * d1_0
        denoised_2, h_2 = history[1]
        r1 = h_2 / h
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return p2 * d1 - (p2 / big_h - 0.5) * d2


class DPMPPSDESampler(BrownianSDESampler):
    """DPM-Solver++ SDE, singlestep (k-diffusion's ``sample_dpmpp_sde``; Lu et al. 2022,
    arXiv:2211.01095, DPM-Solver++(2S) with ancestral noise from a Brownian tree).

    Each step from sigma to sigma_next (lambda = -log sigma, h = lambda_next - lambda) has two
    stages. Stage 1 goes to sigma_s = sigma e^(-r h) by a first-order step down to the
    ancestral sigma_down of (sigma, sigma_s) plus the tree's noise over (sigma, sigma_s) of
    std s_noise * sigma_up, and evaluates D_2 there. Stage 2 takes a first-order step from x
    to the sigma_down of (sigma, sigma_next) with D_d = (1 - 1/(2r)) D + 1/(2r) D_2 and adds
    the tree's noise over (sigma, sigma_next) of std s_noise * sigma_up. A first-order step
    from sigma to sigma_d is x <- (sigma_d / sigma) x + (1 - sigma_d / sigma) D.

    ``eta`` = 0 is the second-order ODE solver DPM-Solver++(2S) (with r = 1/2, dpmpp_2s_a
    with eta = 0). Network evaluations: 2 per step, 1 on the last step to 0 (2n - 1).
    """

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, eta=eta, s_noise=s_noise, **kwargs)
        self.r = check_positive("r", r)
        if self.r > 1:
            raise ValueError(f"r must be in (0, 1] (where in the step the second evaluation lies), got {r!r}")

    def _stage(self, x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float,
               noise: BrownianTreeNoise | None) -> torch.Tensor:
        # first-order step to the ancestral sigma_down of (sigma, sigma_to), then the tree's noise
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_to, self.eta)
        ratio = sigma_down / sigma  # 0 where eta > 1 takes all of sigma_to as noise
        x = ratio * x + (1.0 - ratio) * denoised
        if noise is not None and sigma_up > 0:
            x = x + noise(sigma, sigma_to) * (self.s_noise * sigma_up)
        return x

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        noise = self.make_noise(x, sigmas, generator)
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            if sigma_next == 0:
                x = denoised  # Euler to sigma 0: no further evaluation
                continue
            sigma_s = sigma * math.exp(-self.r * (math.log(sigma) - math.log(sigma_next)))
            x_2 = self._stage(x, denoised, sigma, sigma_s, noise)
            denoised_2 = self.guided_denoise(denoise, x_2, sigma_s, cond, uc)
            fac = 1.0 / (2.0 * self.r)
            x = self._stage(x, (1.0 - fac) * denoised + fac * denoised_2, sigma, sigma_next, noise)
        return x
