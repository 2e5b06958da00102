"""The discretization base class, the DDPM beta schedules and the helpers the schedules share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from .._checks import check_int, check_positive
from ..util import append_zero

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Per-step betas of a DDPM forward process, float64, shape ``[n_timestep]``.

    ``"linear"`` (alias ``"scaled_linear"``) interpolates linearly between
    ``sqrt(linear_start)`` and ``sqrt(linear_end)`` and squares (the Stable Diffusion
    schedule); ``"cosine"`` is Nichol & Dhariwal (2021), eq. 17, betas clipped to 0.999;
    ``"sqrt_linear"`` interpolates the betas themselves and ``"sqrt"`` takes their root.
    """
    n_timestep = check_int("n_timestep", n_timestep)
    if schedule in ("linear", "scaled_linear"):
        return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        t = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep
        f = np.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0.0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"schedule {schedule!r} is unknown; choose one of {', '.join(BETA_SCHEDULES)}")


def check_steps(n: Any) -> int:
    """The step count of a ``get_sigmas(n)`` call, checked."""
    return check_int("n (number of steps)", n)


def to_sigmas(values: Any, device: str | torch.device = "cpu") -> torch.Tensor:
    """float64 values (numpy or torch, computed on the CPU) as the float32 sigmas of a schedule, rounded once."""
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(values))
    return tensor.to(dtype=torch.float32).to(device)


def unset_model_fields(discretization: Any) -> list[str]:
    """The attributes of ``discretization`` that are None and mean "the selected model's"."""
    if isinstance(discretization, Discretization):
        return discretization.unset_model_fields()
    # a duck-typed schedule (not a Discretization): a None sigma_min / sigma_max is the model's range
    return [k for k in ("sigma_min", "sigma_max") if hasattr(discretization, k) and getattr(discretization, k) is None]


class Discretization(ABC):
    """Base class: subclasses implement :meth:`get_sigmas` (descending, no final zero).

    :attr:`MODEL_FIELDS` names the attributes that, left None, are the selected model's:
    ``sigma_min`` / ``sigma_max`` (its trained range) and ``model_sigmas`` (its table of
    discrete noise levels, ascending). :func:`sgm.diffusion.schedule.for_model` fills them from
    the model's denoiser and then calls :meth:`check`.
    """

    MODEL_FIELDS: tuple[str, ...] = ()

    def __call__(
        self, n: int, do_append_zero: bool = True, device: str | torch.device = "cpu", flip: bool = False
    ) -> torch.Tensor:
        sigmas = self.get_sigmas(n, device=device)
        if do_append_zero:
            sigmas = append_zero(sigmas)
        return sigmas.flip(0) if flip else sigmas

    @abstractmethod
    def get_sigmas(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The ``n`` sigmas of an ``n``-step schedule, descending, float32."""

    def unset_model_fields(self) -> list[str]:
        """The :attr:`MODEL_FIELDS` still None (to be filled from the model)."""
        return [k for k in self.MODEL_FIELDS if getattr(self, k) is None]

    def check(self) -> None:
        """Raise ValueError if the (filled) settings are inconsistent; called after filling."""

    def check_model(self, trained: tuple[float, float] | None) -> None:
        """Called by ``for_model`` with the model's trained range (None: not stated); default: nothing."""

    def __repr__(self) -> str:
        def show(value: Any) -> str:
            return f"<{len(value)} levels>" if isinstance(value, np.ndarray) else repr(value)

        fields = ", ".join(f"{k}={show(v)}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class RangeDiscretization(Discretization):
    """A schedule over a continuous sigma range [sigma_min, sigma_max].

    None for a bound means "the selected model's trained range": :func:`sgm.diffusion.schedule.sampling_sigmas`
    fills it from the model's denoiser (SDXL: 0.0292 .. 14.6146).
    """

    MODEL_FIELDS = ("sigma_min", "sigma_max")

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None):
        self.sigma_min = None if sigma_min is None else check_positive("sigma_min", sigma_min)
        self.sigma_max = None if sigma_max is None else check_positive("sigma_max", sigma_max)
        self.check()

    def check(self) -> None:
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be smaller than sigma_max ({self.sigma_max})")

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max), or a ValueError naming the fix when the range is not set yet."""
        if self.sigma_min is None or self.sigma_max is None:
            raise ValueError(f"{type(self).__name__} has no sigma range: set sigma_min and sigma_max, or let "
                             "sgm.diffusion.schedule.sampling_sigmas fill them from the model's denoiser")
        return self.sigma_min, self.sigma_max

    @staticmethod
    def ramp(n: int) -> torch.Tensor:
        """i / (n - 1) for i = 0 .. n - 1, float64 (a single step: [0], the schedule's sigma_max)."""
        return torch.linspace(0.0, 1.0, n, dtype=torch.float64)
