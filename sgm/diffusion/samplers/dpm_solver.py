"""DPM-Solver in its singlestep forms: fixed budget ("fast") and error-controlled ("adaptive").

Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
Around 10 Steps", arXiv:2206.00927: Algorithms 1 and 2 (DPM-Solver-2 and -3), Sec. 3.4 /
Alg. 4 (DPM-Solver-fast: uniform steps in lambda = -log sigma, mostly of order 3, for a given
number of network evaluations) and Alg. 5 / App. C (DPM-Solver-12 and -23: adaptive step
size from the difference of two embedded orders). In the variance-exploding form used here
(x = x0 + sigma eps), a step from lambda to lambda' = lambda + h is

    DPM-Solver-1: x' = x - sigma' (e^h - 1) eps(x, lambda),

and the second- and third-order steps add corrections from evaluations at lambda + r1 h
(and lambda + r2 h), see :func:`dpm_solver_update`. The optional noise (``eta`` > 0) is
ancestral, as in k-diffusion's ``DPMSolver``: each step goes down to the ancestral sigma_down
and adds fresh noise from the per-image generators.

Both samplers take the run's schedule like every sampler, but integrate on their own grid:
from ``sigmas[0]`` to the smallest nonzero sigma of the slice they are given (so img2img and
refiner slices work); the sigmas in between are not visited. What happens at the end is the
``denoise_to_zero`` knob (the name of Lu et al.'s reference code): with it (default) a slice
that ends at 0 finishes with one evaluation at the smallest sigma whose x0 estimate is the
result, as every other sampler's last step does; without it the result keeps the noise of
that sigma, as k-diffusion's ``sample_dpm_fast`` / ``sample_dpm_adaptive`` (and ComfyUI's
and A1111's use of them) leave it. A slice that does not end at 0 never gets the extra step.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .._checks import check_bool, check_finite, check_int, check_positive
from .base import BaseDiffusionSampler, get_ancestral_step

log = logging.getLogger(__name__)

EpsFn = Callable[[torch.Tensor, float], torch.Tensor]


def dpm_solver_update(x: torch.Tensor, lam: float, lam_next: float, eps: torch.Tensor, eps_fn: EpsFn,
                      order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver step of ``order`` 1, 2 or 3 from lambda to lambda_next (Lu et al. 2022, Alg. 1-2).

    ``eps`` is eps(x, lambda); ``eps_fn(u, lambda)`` evaluates the network at the intermediate
    points (order - 1 evaluations). Returns the solution of ``order`` and the embedded
    lower-order one that the adaptive solver compares it with: DPM-Solver-1 for order 2
    (r1 = 1/2), DPM-Solver-2 with r1 = 1/3 for order 3 (r1 = 1/3, r2 = 2/3), which shares
    the evaluation at r1. With h = lambda_next - lambda and sigma(l) = e^(-l):

        x1 = x - sigma(lambda_next) (e^h - 1) eps
        x2 = x1 - sigma(lambda_next) / (2 r1) (e^h - 1) (eps(u1, s1) - eps)
        x3 = x1 - sigma(lambda_next) / r2 ((e^h - 1) / h - 1) (eps(u2, s2) - eps)

    with s_k = lambda + r_k h, u1 = x - sigma(s1) (e^(r1 h) - 1) eps and
    u2 = x - sigma(s2) (e^(r2 h) - 1) eps - sigma(s2) (r2 / r1) ((e^(r2 h) - 1) / (r2 h) - 1) (eps(u1, s1) - eps).
    """
    h = lam_next - lam
    sigma_next = math.exp(-lam_next)
    first = x - (sigma_next * math.expm1(h)) * eps
    if order == 1:
        return first, first
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    s1 = lam + r1 * h
    u1 = x - (math.exp(-s1) * math.expm1(r1 * h)) * eps
    diff1 = eps_fn(u1, s1) - eps
    second = first - (sigma_next / (2.0 * r1) * math.expm1(h)) * diff1
    if order == 2:
        return second, first
    r2 = 2.0 / 3.0
    s2 = lam + r2 * h
    sigma_s2 = math.exp(-s2)
    u2 = (x - (sigma_s2 * math.expm1(r2 * h)) * eps
          - (sigma_s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0)) * diff1)
    third = first - (sigma_next / r2 * (math.expm1(h) / h - 1.0)) * (eps_fn(u2, s2) - eps)
    return third, second


def fast_orders(nfe: int) -> list[int]:
    """The orders of DPM-Solver-fast's steps for a budget of ``nfe`` evaluations (Lu et al. 2022, Sec. 3.4).

    floor(nfe / 3) + 1 steps: third order, except that the last ones use up the remainder
    (nfe = 3k: ..., 3, 2, 1; otherwise ..., 3, nfe mod 3). The orders sum to ``nfe``.
    """
    steps = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [nfe % 3]


class PIDStepSizeController:
    """PID step-size control with an arctan limiter (Söderlind 2003, "Digital filters in adaptive
    time-stepping"; Söderlind & Wang 2006), the controller k-diffusion's DPM-Solver uses.

    With inverse errors e_n = 1 / (error_n + eps) of this and the last two accepted steps, the
    step is scaled by limiter(e_n^b1 e_{n-1}^b2 e_{n-2}^b3), b1 = (kP + kI + kD) / order,
    b2 = -(kP + 2 kD) / order, b3 = kD / order, limiter(f) = 1 + atan(f - 1). The step is
    accepted when that factor is >= ``accept_safety``. kI = 1 alone is the classic
    h <- h * error^(-1/order) controller of Lu et al. 2022, Alg. 5.
    """

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float, eps: float = 1e-8):
        self.h = float(h)
        self.exponents = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2.0 * dcoeff) / order, dcoeff / order)
        self.accept_safety = float(accept_safety)
        self.eps = float(eps)
        self.inverse_errors: list[float] = []  # this step's, then those of the last two accepted ones

    def propose_step(self, error: float) -> bool:
        """Rescale ``self.h`` for ``error`` (scaled so that 1 is the tolerance); whether to accept the step."""
        inverse = 1.0 / (error + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        factor = math.prod(e**b for e, b in zip(self.inverse_errors, self.exponents))
        factor = 1.0 + math.atan(factor - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[1:] = self.inverse_errors[:2]
        self.h *= factor
        return accept


class DPMSolverSampler(BaseDiffusionSampler):
    """Shared part of the DPM-Solver samplers: the interval, eps, the ancestral noise and the end.

    ``eta`` (>= 0) scales ancestral noise (0: the probability-flow ODE), ``s_noise`` its std;
    ``denoise_to_zero`` see the module docstring.
    """

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 eta: float = 0.0, s_noise: float = 1.0, denoise_to_zero: bool = True, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, **kwargs)
        self.eta = check_positive("eta", eta, allow_zero=True)
        self.s_noise = check_positive("s_noise", s_noise, allow_zero=True)
        self.denoise_to_zero = check_bool("denoise_to_zero", denoise_to_zero)

    def interval(self, sigmas: Sequence[float]) -> tuple[float, float, bool]:
        """(lambda_start, lambda_end, final): -log of sigmas[0] and of the smallest nonzero sigma,
        and whether a final evaluation denoises to 0."""
        positive = [s for s in sigmas if s > 0]
        if not positive or sigmas[0] <= 0:
            raise ValueError("the schedule must start at a nonzero sigma")
        return -math.log(sigmas[0]), -math.log(min(positive)), self.denoise_to_zero and sigmas[-1] == 0

    def eps_fn(self, denoise, cond: dict, uc: dict) -> Callable[[torch.Tensor, float], tuple[torch.Tensor, ...]]:
        """(x, lambda) -> (eps, x0): one guided evaluation at sigma = e^(-lambda), eps = (x - x0) / sigma."""
        def fn(x: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
            sigma = math.exp(-lam)
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            return (x - denoised) / sigma, denoised
        return fn

    def target(self, lam: float, lam_next: float, lam_end: float) -> tuple[float, float]:
        """Where a step from lambda toward lambda_next integrates to, and the std of the noise that
        then brings x to sigma(lambda_next): (lambda_next, 0) for eta = 0, else the ancestral
        sigma_down (no lower than the end of the interval) and sqrt(sigma_next^2 - sigma_down^2)."""
        if not self.eta:
            return lam_next, 0.0
        sigma_next = math.exp(-lam_next)
        sigma_down, _ = get_ancestral_step(math.exp(-lam), sigma_next, self.eta)
        lam_down = lam_end if sigma_down <= math.exp(-lam_end) else -math.log(sigma_down)
        return lam_down, math.sqrt(max(sigma_next**2 - math.exp(-lam_down) ** 2, 0.0))

    def add_noise(self, x: torch.Tensor, std: float, generator) -> torch.Tensor:
        """x plus fresh noise of std ``s_noise * std`` from the per-image generators (nothing drawn for 0)."""
        if std > 0 and self.s_noise > 0:
            return x + self.noise_like(x, generator) * (self.s_noise * std)
        return x


class DPMSolverFastSampler(DPMSolverSampler):
    """DPM-Solver-fast (Lu et al. 2022, Sec. 3.4): a fixed budget of evaluations spent on steps
    uniform in lambda = -log sigma, third order but for the last (:func:`fast_orders`).

    The budget is the number of steps of the slice given: n = len(sigmas) - 1 evaluations in
    all. With ``denoise_to_zero`` and a slice ending at 0, the solver gets n - 1 of them, from
    sigmas[0] to the smallest nonzero sigma, and the last one denoises there (with n = 1 that
    is the only evaluation: x0 at sigmas[0]). Without it, or for a slice that does not end at
    0, the solver gets all n and its result is x at the smallest nonzero sigma: k-diffusion's
    ``sample_dpm_fast(model, x, sigma_min, sigma_max, n)``. The callback is called once per
    solver step (i = 0.., sigma_next = that step's end) and once for the final denoise.
    Convergence: third order when the solver's budget is 3k + 2 (its last step is of order 2;
    measured slopes 2.8-3.0 from 32 steps on); otherwise its last step is first order, which
    makes the scheme second order asymptotically, though that step's error is scaled by the
    small final sigma and hardly shows at practical step counts.
    """

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        lam_start, lam_end, final = self.interval(sigmas)
        budget = len(sigmas) - 1 - int(final)
        orders = fast_orders(budget) if budget > 0 and lam_end > lam_start else []
        lams = [lam_start + (lam_end - lam_start) * k / len(orders) for k in range(len(orders))] + [lam_end]
        eps_fn = self.eps_fn(denoise, cond, uc)
        for i in self.steps(len(orders) + int(final)):
            lam = lams[i]
            eps, denoised = eps_fn(x, lam)
            sigma = math.exp(-lam)
            if i == len(orders):  # the final denoise, at the smallest sigma
                self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=0.0, x=x, denoised=denoised)
                x = denoised
                break
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=math.exp(-lams[i + 1]), x=x,
                         denoised=denoised)
            lam_to, noise_std = self.target(lam, lams[i + 1], lam_end)
            x, _ = dpm_solver_update(x, lam, lam_to, eps, lambda u, s: eps_fn(u, s)[0], orders[i])
            x = self.add_noise(x, noise_std, generator)
        return x


class DPMSolverAdaptiveSampler(DPMSolverSampler):
    """DPM-Solver-12 / -23 with adaptive step size (Lu et al. 2022, Alg. 5; App. C).

    Each attempted step from lambda = s with step h computes the solutions of orders
    ``order`` and ``order`` - 1 (:func:`dpm_solver_update`, sharing evaluations) and their
    scaled RMS difference E = rms((x_low - x_high) / delta), delta = max(atol, rtol *
    max(|x_low|, |x_prev|)) (x_prev: the last accepted low-order solution). A
    :class:`PIDStepSizeController` rescales h and accepts or rejects; an accepted step keeps
    x_high (plus ancestral noise for ``eta`` > 0, the controller's order then 1.5).

    It integrates from sigmas[0] to the smallest nonzero sigma of the slice and ignores the
    step count and the sigmas in between: its cost is whatever the error control spends.
    Network evaluations: ``order`` per accepted step and ``order`` - 1 per rejected one (the
    evaluation at s is kept across a rejection; k-diffusion spends it again, with the same
    result), plus 1 for ``denoise_to_zero``. The callback is called once per accepted step
    (i = 0, 1, ...; sigma_next = that step's end) and once for the final denoise; the counts
    are logged at INFO and kept in ``last_stats`` (accepted, rejected, evaluations). The error
    is one norm over the whole batch, as in k-diffusion: the images of a batch share their steps.
    """

    ORDERS = (2, 3)

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                 eta: float = 0.0, s_noise: float = 1.0, denoise_to_zero: bool = True, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, eta=eta, s_noise=s_noise,
                         denoise_to_zero=denoise_to_zero, **kwargs)
        if check_int("order", order, minimum=2) not in self.ORDERS:
            raise ValueError(f"order must be 2 or 3, got {order!r}")
        self.order = int(order)
        self.rtol = check_positive("rtol", rtol, allow_zero=True)
        self.atol = check_positive("atol", atol, allow_zero=True)
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("rtol and atol cannot both be 0")
        self.h_init = check_positive("h_init", h_init)
        self.pcoeff, self.icoeff, self.dcoeff = (check_finite(k, v) for k, v in
                                                 (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff)))
        self.accept_safety = check_positive("accept_safety", accept_safety)
        self.last_stats: dict[str, int] = {}

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        lam_start, lam_end, final = self.interval(sigmas)
        evaluations = 0

        def eps_fn(u: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal evaluations
            evaluations += 1
            return guided(u, lam)

        guided = self.eps_fn(denoise, cond, uc)
        pid = PIDStepSizeController(self.h_init, self.pcoeff, self.icoeff, self.dcoeff,
                                    1.5 if self.eta else self.order, self.accept_safety)
        s, x_prev, at_s = lam_start, x, None
        accepted = rejected = 0
        bar = tqdm(total=lam_end - lam_start, desc=type(self).__name__, disable=not self.verbose, leave=False,
                   bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} of log sigma [{elapsed}<{remaining}]")
        while s < lam_end - 1e-5:
            t = min(lam_end, s + pid.h)
            lam_to, noise_std = self.target(s, t, lam_end)
            if at_s is None:
                at_s = eps_fn(x, s)  # (eps, x0) at s, kept while steps from s are rejected
            x_high, x_low = dpm_solver_update(x, s, lam_to, at_s[0], lambda u, l: eps_fn(u, l)[0], self.order)
            delta = torch.maximum(x_low.abs(), x_prev.abs()).mul(self.rtol).clamp(min=self.atol)
            error = float(((x_low - x_high) / delta).pow(2).mean().sqrt())
            if not math.isfinite(error):
                raise FloatingPointError(f"{type(self).__name__}: the error estimate is {error} at "
                                         f"sigma={math.exp(-s):.6g}; the denoiser returned non-finite values?")
            if pid.propose_step(error):
                self._report(callback, i=accepted, sigma=math.exp(-s), sigma_hat=math.exp(-s), sigma_next=math.exp(-t),
                             x=x, denoised=at_s[1])
                x_prev, x = x_low, self.add_noise(x_high, noise_std, generator)
                bar.update(t - s)
                s, at_s = t, None
                accepted += 1
            else:
                rejected += 1
        if final:
            sigma = math.exp(-s)
            _, denoised = eps_fn(x, s)
            self._report(callback, i=accepted, sigma=sigma, sigma_hat=sigma, sigma_next=0.0, x=x, denoised=denoised)
            x = denoised
        bar.close()
        self.last_stats = {"accepted": accepted, "rejected": rejected, "evaluations": evaluations}
        log.info("DPM-Solver-%d%d adaptive: %d accepted and %d rejected steps, %d evaluations (sigma %.4g -> %.4g%s)",
                 self.order - 1, self.order, accepted, rejected, evaluations, math.exp(-lam_start), math.exp(-s),
                 ", then denoised to 0" if final else "")
        return x
