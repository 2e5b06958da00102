"""Schedules over a continuous sigma range: Karras (EDM), (poly)exponential, VP, KL-optimal,
linear-quadratic (Mochi) and Align Your Steps.

Each takes the selected model's trained range when its bounds are left None (see
:class:`~sgm.diffusion.discretization.base.RangeDiscretization`). EDM sigmas are computed in
float32 exactly as sgm and k-diffusion compute them; the others in float64, rounded once.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from .._checks import check_int, check_positive
from .base import Discretization, RangeDiscretization, check_steps, to_sigmas

log = logging.getLogger(__name__)


class EDMDiscretization(RangeDiscretization):
    """Karras et al. (2022), eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho.

    The class defaults are the EDM paper's. ``sigma_min`` / ``sigma_max`` = None means "the
    model's trained range": :func:`sgm.diffusion.schedule.sampling_sigmas` fills them from the
    model's denoiser (SDXL: 0.0292 .. 14.6146), which is how ``conf/discretization/edm.yaml``
    (rho 3) and ``karras.yaml`` (rho 7, k-diffusion's and ComfyUI's ``karras``) use it.
    """

    def __init__(self, sigma_min: float | None = 0.002, sigma_max: float | None = 80.0, rho: float = 7.0):
        super().__init__(sigma_min, sigma_max)
        self.rho = check_positive("rho", rho)

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n = check_steps(n)
        sigma_min, sigma_max = self.sigma_range()
        # float32 on purpose: bit-compatible with sgm's schedule (and the seed note's table)
        ramp = torch.linspace(0, 1, n, dtype=torch.float32, device=device)
        min_inv, max_inv = sigma_min ** (1 / self.rho), sigma_max ** (1 / self.rho)
        return (max_inv + ramp * (min_inv - max_inv)) ** self.rho


class PolyExponentialDiscretization(RangeDiscretization):
    """Polynomial in log sigma (k-diffusion's ``get_sigmas_polyexponential``):
    ln sigma_i = ln sigma_min + (1 - i/(n-1))^rho (ln sigma_max - ln sigma_min). rho = 1 is exponential."""

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 1.0):
        super().__init__(sigma_min, sigma_max)
        self.rho = check_positive("rho", rho)

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n = check_steps(n)
        lo, hi = (math.log(s) for s in self.sigma_range())
        return to_sigmas(torch.exp(lo + (1.0 - self.ramp(n)) ** self.rho * (hi - lo)), device)


class ExponentialDiscretization(PolyExponentialDiscretization):
    """Log-uniform sigmas from sigma_max to sigma_min (k-diffusion's ``get_sigmas_exponential``)."""

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None):
        super().__init__(sigma_min, sigma_max, rho=1.0)


class KLOptimalDiscretization(RangeDiscretization):
    """KL-optimal schedule (Sabour et al. 2024, "Align Your Steps", appendix):
    sigma_i = tan((1 - i/(n-1)) atan(sigma_max) + i/(n-1) atan(sigma_min))."""

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n = check_steps(n)
        lo, hi = (math.atan(s) for s in self.sigma_range())
        ramp = self.ramp(n)
        return to_sigmas(torch.tan((1.0 - ramp) * hi + ramp * lo), device)


class VPDiscretization(RangeDiscretization):
    """Variance-preserving SDE schedule (Song et al. 2021, the VP SDE; k-diffusion's ``get_sigmas_vp``):
    sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1 at t = linspace(1, eps_s, n).

    Give ``beta_d`` and ``beta_min`` (the paper's 19.9 and 0.1 are the class defaults), or leave
    both None to fit them to a sigma range: sigma(1) = sigma_max and sigma(eps_s) = sigma_min,
    which is linear in (beta_d, beta_min); the range itself None is the model's trained range
    (``conf/discretization/vp.yaml``).
    """

    def __init__(self, beta_d: float | None = 19.9, beta_min: float | None = 0.1, eps_s: float = 1e-3,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        if (beta_d is None) != (beta_min is None):
            raise ValueError("give both beta_d and beta_min, or neither (then they fit sigma_min / sigma_max)")
        if beta_d is not None and (sigma_min is not None or sigma_max is not None):
            raise ValueError("give beta_d and beta_min, or the range sigma_min / sigma_max they are fitted to, "
                             "not both")
        self.beta_d = None if beta_d is None else check_positive("beta_d", beta_d, allow_zero=True)
        self.beta_min = None if beta_min is None else check_positive("beta_min", beta_min, allow_zero=True)
        self.eps_s = check_positive("eps_s", eps_s)
        if self.eps_s >= 1:
            raise ValueError(f"eps_s must be in (0, 1), got {eps_s!r}")
        super().__init__(sigma_min, sigma_max)  # runs check()

    def unset_model_fields(self) -> list[str]:
        return [] if self.beta_d is not None else super().unset_model_fields()

    def check(self) -> None:
        super().check()
        if self.beta_d is not None or (self.sigma_min is not None and self.sigma_max is not None):
            self.coefficients()

    def coefficients(self) -> tuple[float, float]:
        """(beta_d, beta_min): as given, or fitted to the range; sigma(t) must increase on [eps_s, 1]."""
        eps = self.eps_s
        if self.beta_d is not None:
            beta_d, beta_min = self.beta_d, self.beta_min
            what = f"beta_d={beta_d}, beta_min={beta_min}"
        else:
            sigma_min, sigma_max = self.sigma_range()
            top, bottom = math.log1p(sigma_max**2), math.log1p(sigma_min**2)  # the exponent at t = 1 and t = eps
            beta_d = 2.0 * (eps * top - bottom) / (eps * (1.0 - eps))
            beta_min = top - beta_d / 2.0
            what = f"sigma {sigma_min} .. {sigma_max}"
        if beta_d * eps + beta_min <= 0 or beta_d + beta_min <= 0:  # d/dt of the exponent at both ends
            raise ValueError(f"no VP schedule with eps_s={eps} and {what} increases monotonically: choose another "
                             "eps_s, beta_d or beta_min")
        return beta_d, beta_min

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n = check_steps(n)
        beta_d, beta_min = self.coefficients()
        t = torch.linspace(1.0, self.eps_s, n, dtype=torch.float64)
        return to_sigmas(torch.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt(), device)


class LinearQuadraticDiscretization(Discretization):
    """Mochi's linear-quadratic schedule (Genmo 2024), as ComfyUI's ``linear_quadratic``, scaled by sigma_max.

    In flow time s in [0, 1]: the first ``linear_steps`` (default n // 2) steps go linearly
    from 1 toward 1 - threshold_noise (reached at step linear_steps), the rest follow the
    quadratic through that point (with the same slope) to 0 at step n; sigma_i = sigma_max * s_i. ``sigma_max`` None is
    the model's. Only sigma_max is used: the last sigma before 0 is sigma_max * s_{n-1}.
    """

    MODEL_FIELDS = ("sigma_max",)

    def __init__(self, sigma_max: float | None = None, threshold_noise: float = 0.025, linear_steps: int | None = None):
        self.sigma_max = None if sigma_max is None else check_positive("sigma_max", sigma_max)
        self.threshold_noise = check_positive("threshold_noise", threshold_noise)
        if self.threshold_noise >= 1:
            raise ValueError(f"threshold_noise must be in (0, 1), got {threshold_noise!r}")
        self.linear_steps = None if linear_steps is None else check_int("linear_steps", linear_steps)

    def flow_times(self, n: int) -> np.ndarray:
        """s_0 .. s_{n-1} (flow time, descending from 1), float64."""
        n = check_steps(n)
        if n == 1:
            return np.ones(1)
        lin = n // 2 if self.linear_steps is None else self.linear_steps
        if lin >= n:
            raise ValueError(f"linear_steps ({lin}) must be smaller than the number of steps ({n})")
        thr = self.threshold_noise
        i = np.arange(n, dtype=np.float64)
        quad_steps = n - lin
        excess = lin - thr * n
        quad_coef = excess / (lin * quad_steps**2)
        lin_coef = thr / lin - 2 * excess / quad_steps**2
        ramp = np.where(i < lin, i * thr / lin, quad_coef * i**2 + lin_coef * i + quad_coef * lin**2)
        times = 1.0 - ramp
        if not (np.all(np.diff(times) < 0) and times[-1] > 0):
            raise ValueError(f"threshold_noise {thr} with linear_steps {lin} of {n} steps gives no decreasing "
                             "schedule: lower threshold_noise")
        return times

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        if self.sigma_max is None:
            raise ValueError("LinearQuadraticDiscretization has no sigma_max: set it, or let "
                             "sgm.diffusion.schedule.sampling_sigmas fill it from the model's denoiser")
        return to_sigmas(self.flow_times(n) * self.sigma_max, device)


# Align Your Steps (Sabour et al. 2024): the published 10-step sigmas (as diffusers'
# ``AysSchedules`` lists them) and the terminal sigma_min the schedule ends at before 0
# (the paper's how-to page). The final knot is the 11th noise level; the 10-step run's last step goes to 0.
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "SD1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "SDXL": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "SVD": (700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def loglinear_interp(knots: Any, num: int) -> np.ndarray:
    """Resample a descending sequence to ``num`` points: linear interpolation of log values over
    equally spaced positions in [0, 1] (Sabour et al. 2024, how-to; ComfyUI's ``loglinear_interp``)."""
    knots = np.asarray(knots, dtype=np.float64)
    where = np.linspace(0.0, 1.0, len(knots))
    return np.exp(np.interp(np.linspace(0.0, 1.0, num), where, np.log(knots[::-1])))[::-1].copy()


class AlignYourStepsDiscretization(Discretization):
    """Align Your Steps (Sabour et al. 2024): the published optimised 10-step schedule of a model
    family (``model_type``: SD1, SDXL, SVD), resampled to ``n`` steps by log-linear interpolation
    of its 11 noise levels onto n + 1, the last of which becomes the final 0.

    The table is the named model's own trained range (SD1 / SDXL: 14.615 .. 0.029); it is not
    stretched to another model's range, and a model whose stated range differs is warned about.
    """

    def __init__(self, model_type: str = "SDXL"):
        if model_type not in AYS_SIGMAS:
            raise ValueError(f"model_type must be one of {', '.join(AYS_SIGMAS)}, got {model_type!r}")
        self.model_type = model_type

    @property
    def knots(self) -> tuple[float, ...]:
        return AYS_SIGMAS[self.model_type]

    def check_model(self, trained: tuple[float, float] | None) -> None:
        """Log a warning when the model's trained range is not this table's (beyond 1 %)."""
        if trained is None:
            return
        lo, hi = trained
        if not (math.isclose(hi, self.knots[0], rel_tol=1e-2) and math.isclose(lo, self.knots[-1], rel_tol=1e-2)):
            log.warning("align_your_steps (%s) spans sigma %g .. %g, but the model's trained range is %g .. %g",
                        self.model_type, self.knots[-1], self.knots[0], lo, hi)

    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        n = check_steps(n)
        return to_sigmas(loglinear_interp(self.knots, n + 1)[:n], device)
