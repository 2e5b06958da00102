"""Multistep ODE samplers: DEIS, iPNDM (fixed and variable step) and RES multistep.

Each integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma with one
network evaluation per step, reusing the evaluations of up to ``order - 1`` earlier steps
(fewer while they are not there yet). The step to sigma = 0 returns the denoised estimate
(the Euler step to 0), so no evaluation is spent at sigma 0.

The exponential integrators (DEIS, RES, and UniPC in :mod:`.unipc`) integrate a polynomial
interpolant of the model's output against an exponential weight; the weights of that
integral are :func:`exponential_weights`, built on the phi functions :func:`phi`.

References: Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
Integrator" (DEIS and iPNDM, arXiv:2204.13902); Zhang et al. 2023, "Improved order analysis
and design of exponential integrator for diffusion models" (RES, arXiv:2308.02157).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .._checks import check_int
from .base import BaseDiffusionSampler, linear_multistep_coeff


def check_order(name: str, value: Any, highest: int) -> int:
    """``value`` as an int in 1..``highest``, or a ValueError naming ``name``."""
    order = check_int(name, value)
    if order > highest:
        raise ValueError(f"{name} must be an integer from 1 to {highest}, got {value!r}")
    return order


def phi(k: int, z: float) -> float:
    """The exponential-integrator function phi_k(z) = sum_{m >= 0} z^m / (m + k)!.

    phi_0(z) = e^z and phi_{k+1}(z) = (phi_k(z) - 1/k!) / z; near 0, where that recursion
    cancels, the series is summed instead.
    """
    if k == 0:
        return math.exp(z)
    if abs(z) < 1.0:
        term = total = 1.0 / math.factorial(k)
        m = 0
        while abs(term) > 1e-18 * abs(total):
            m += 1
            term *= z / (m + k)
            total += term
        return total
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def exponential_weights(nodes: Sequence[float], start: float, end: float) -> list[float]:
    """Weights w_j = integral from ``start`` to ``end`` of e^(tau - end) l_j(tau) dtau, where
    l_j is the Lagrange basis polynomial of ``nodes[j]`` among ``nodes``.

    For values v_j at the nodes, sum_j w_j v_j integrates their interpolant against
    e^(tau - end) over one step: the coefficients of exponential multistep integrators
    (Zhang & Chen 2023, eq. 14). Expanding l_j in powers of u = tau - start, each power
    integrates exactly: int_0^H e^(u - H) u^k du = k! H^(k+1) phi_{k+1}(-H), H = end - start.
    """
    span = end - start
    moments = [math.factorial(k) * span ** (k + 1) * phi(k + 1, -span) for k in range(len(nodes))]
    shifted = [node - start for node in nodes]
    weights = []
    for j, node in enumerate(shifted):
        others = [other for m, other in enumerate(shifted) if m != j]
        coeffs = np.polynomial.polynomial.polyfromroots(others) if others else np.ones(1)  # ascending powers
        weights.append(float(np.dot(coeffs, moments[: len(coeffs)])) / math.prod(node - o for o in others))
    return weights


def adams_bashforth_coefficients(order: int) -> list[float]:
    """The fixed-step Adams-Bashforth weights, newest value first (order 4: 55, -59, 37, -9 over 24):
    the Lagrange basis integrated over one step of a uniform grid."""
    grid = np.arange(order + 1, dtype=np.float64)
    return [linear_multistep_coeff(order, grid, order - 1, j) for j in range(order)]


class _MultistepSampler(BaseDiffusionSampler):
    """One evaluation per step; a step combines the model values of the last ``order`` steps.

    Subclasses say which value is kept (:meth:`value`), the weights of the combination
    (:meth:`weights`, newest first) and how it advances x (:meth:`advance`).
    """

    MAX_ORDER = 4

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 order: int = 2, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, **kwargs)
        self.order = check_order("order", order, self.MAX_ORDER)

    def value(self, x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
        """The model value the method interpolates: here the ODE derivative (x - D) / sigma."""
        return (x - denoised) / sigma

    def weights(self, sigmas: Sequence[float], i: int, order: int) -> list[float]:
        raise NotImplementedError

    def advance(self, x: torch.Tensor, sigma: float, sigma_next: float, combined: torch.Tensor) -> torch.Tensor:
        return x + combined

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        values: list[torch.Tensor] = []
        for i in self.steps(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.guided_denoise(denoise, x, sigma, cond, uc)
            self._report(callback, i=i, sigma=sigma, sigma_hat=sigma, sigma_next=sigma_next, x=x, denoised=denoised)
            if sigma_next == 0:
                x = denoised  # the Euler step to sigma 0
                continue
            values = (values + [self.value(x, denoised, sigma)])[-self.order:]
            weights = self.weights(sigmas, i, len(values))
            x = self.advance(x, sigma, sigma_next, sum(w * v for w, v in zip(weights, reversed(values))))
        return x


class IPNDMSampler(_MultistepSampler):
    """iPNDM (Zhang & Chen 2023, arXiv:2204.13902, Sec. 4 / App.): fixed-step Adams-Bashforth in sigma.

    x <- x + (sigma_next - sigma) sum_j c_j d_{i-j} with d = (x - D) / sigma and the
    constant-step weights c of order min(order, i + 1) (order 4: 55, -59, 37, -9 over 24),
    whatever the spacing of the schedule (ComfyUI's ``ipndm``).
    """

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 order: int = 4, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, order=order, **kwargs)
        self._coefficients = [adams_bashforth_coefficients(k) for k in range(1, self.order + 1)]

    def weights(self, sigmas, i, order):
        return [(sigmas[i + 1] - sigmas[i]) * c for c in self._coefficients[order - 1]]


class IPNDMVSampler(_MultistepSampler):
    """Variable-step iPNDM: Adams-Bashforth in sigma with the weights of the actual step sizes.

    The variable-step version of :class:`IPNDMSampler` ("the variable-step Adams-Bashforth
    methods" of Zhou et al. 2024, arXiv:2312.00094, and ComfyUI's ``ipndm_v``), with the exact
    weights: x <- x + sum_j w_j d_{i-j}, w_j the integral over [sigma_i, sigma_{i+1}] of the
    Lagrange basis of sigma_{i-j} (:func:`linear_multistep_coeff`). On a uniform grid it is
    iPNDM; it differs from k-diffusion's ``lms`` only in the step to sigma 0 (Euler here).
    ComfyUI's code approximates the third- and fourth-order weights: they do not reduce to
    Adams-Bashforth 4 on a uniform grid, and its fourth-order weights do not sum to one on a
    non-uniform one.
    """

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 order: int = 4, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, order=order, **kwargs)

    def weights(self, sigmas, i, order):
        return [linear_multistep_coeff(order, sigmas, i, j) for j in range(order)]


class DEISSampler(_MultistepSampler):
    """DEIS multistep (Zhang & Chen 2023, arXiv:2204.13902, eq. 14), noise prediction in log-sigma.

    The ODE in sigma is dx/dsigma = eps(x, sigma) with eps = (x - D) / sigma; DEIS integrates
    the Lagrange interpolant of the last min(order, i + 1) eps values in u = log sigma exactly:
    x <- x + sigma_next sum_j w_j eps_{i-j}, w = :func:`exponential_weights` over
    [log sigma_i, log sigma_{i+1}] (the "log-rho" DEIS of diffusers' DEISMultistepScheduler;
    order 1 is DDIM). ``order``: 1 to 3.
    """

    MAX_ORDER = 3

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 order: int = 3, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, order=order, **kwargs)

    def weights(self, sigmas, i, order):
        nodes = [math.log(sigmas[i - j]) for j in range(order)]
        return [sigmas[i + 1] * w for w in exponential_weights(nodes, nodes[0], math.log(sigmas[i + 1]))]


class RESMultistepSampler(_MultistepSampler):
    """RES second-order multistep (Zhang et al. 2023, arXiv:2308.02157), data prediction in lambda = -log sigma.

    With lambda = -log sigma the ODE is dx/dlambda = D - x, so
    x_next = (sigma_next / sigma) x + int e^(tau - lambda_next) D(tau) dtau; RES integrates the
    linear interpolant of the last two denoised estimates exactly (b1 = phi_1 - phi_2 / c2,
    b2 = phi_2 / c2 in the paper's notation; ComfyUI's ``res_multistep``). The first step is
    first order (DDIM).
    """

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 **kwargs: Any):
        super().__init__(discretization, num_steps, guider, order=2, **kwargs)

    def value(self, x, denoised, sigma):
        return denoised

    def weights(self, sigmas, i, order):
        nodes = [-math.log(sigmas[i - j]) for j in range(order)]
        return exponential_weights(nodes, nodes[0], -math.log(sigmas[i + 1]))

    def advance(self, x, sigma, sigma_next, combined):
        return (sigma_next / sigma) * x + combined
