"""The sampling schedule, computed once per run; txt2img, img2img and the refiner use slices of it.

* :func:`sampling_sigmas`: the ``steps + 1`` sigmas (final 0) of a discretization; a range
  left unset (``sigma_min``/``sigma_max`` = None) is the model's trained range, read from its
  denoiser (:func:`model_sigma_range`), so that range is stated once, in the denoiser; a
  schedule over the model's discrete levels (``model_sigmas`` = None) gets the denoiser's
  table (:func:`model_sigma_table`). :func:`for_model` does both.
* :func:`img2img_start`: where img2img enters that schedule, by one of two rules
  (:data:`IMG2IMG_RULES`); :func:`split_index`: where the base hands over to the refiner
  (both in :mod:`sgm.diffusion.step_index`, torch-free, and importable from here).
* :func:`initial_latent`: the latent a sampler starts from at ``sigmas[0]``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from ._checks import check_int
from .discretization import Discretization, as_table, unset_model_fields
from .step_index import IMG2IMG_RULES, img2img_start, split_index  # noqa: F401 - this module's API too

CONTINUOUS_LEVELS = 1000  # the levels a continuous denoiser's range stands for (model_sigma_table)


def model_sigma_range(denoiser: Any) -> tuple[float, float] | None:
    """The trained (sigma_min, sigma_max) of a model's denoiser, or None when it states none."""
    lo, hi = getattr(denoiser, "sigma_min", None), getattr(denoiser, "sigma_max", None)
    return None if lo is None or hi is None else (float(lo), float(hi))


def model_sigma_table(denoiser: Any) -> np.ndarray | None:
    """A model's discrete noise levels, ascending float64, or None when it has neither table nor range.

    A :class:`~sgm.diffusion.denoiser.DiscreteDenoiser` has its table (``denoiser.sigmas``); a
    continuous denoiser with a trained range stands for :data:`CONTINUOUS_LEVELS` log-uniform
    levels over it (ComfyUI's table of continuous EDM models), so that schedules defined over
    timesteps run over log sigma there.
    """
    levels = getattr(denoiser, "sigmas", None)
    if isinstance(levels, torch.Tensor) and levels.numel() > 1:
        return as_table(levels)
    trained = model_sigma_range(denoiser)
    if trained is None:
        return None
    return np.exp(np.linspace(math.log(trained[0]), math.log(trained[1]), CONTINUOUS_LEVELS))


def for_model(discretization: Any, denoiser: Any = None) -> Any:
    """``discretization`` with what it leaves to the model filled from ``denoiser`` (a copy; the input is kept).

    A None ``sigma_min`` / ``sigma_max`` is the model's trained range (:func:`model_sigma_range`),
    a None ``model_sigmas`` its noise levels (:func:`model_sigma_table`); see
    :attr:`sgm.diffusion.discretization.Discretization.MODEL_FIELDS`.
    """
    unset = unset_model_fields(discretization)
    trained = model_sigma_range(denoiser)
    if isinstance(discretization, Discretization) and denoiser is not None:
        discretization.check_model(trained)
    if not unset:
        return discretization
    name = type(discretization).__name__
    values: dict[str, Any] = {}
    if {"sigma_min", "sigma_max"} & set(unset):
        if trained is None:
            raise ValueError(f"{name} leaves {' and '.join(unset)} to the model, but the model's denoiser "
                             "states no trained sigma range: set them in the discretization")
        values.update(sigma_min=trained[0], sigma_max=trained[1])
    if "model_sigmas" in unset:
        values["model_sigmas"] = model_sigma_table(denoiser)
        if values["model_sigmas"] is None:
            raise ValueError(f"{name} runs over the model's noise levels, but the model's denoiser has neither a "
                             "table of levels (a DiscreteDenoiser) nor a trained sigma range: state sigma_min / "
                             "sigma_max in the denoiser, or give the discretization model_sigmas")
    filled = copy.copy(discretization)
    for key in unset:
        setattr(filled, key, values[key])
    if isinstance(filled, Discretization):
        filled.check()
    elif filled.sigma_min >= filled.sigma_max:
        raise ValueError(f"sigma_min ({filled.sigma_min}) must be smaller than sigma_max ({filled.sigma_max})")
    return filled


def sampling_sigmas(discretization: Any, steps: int, denoiser: Any = None, device: Any = "cpu") -> torch.Tensor:
    """The schedule of a ``steps``-step run: ``steps + 1`` descending sigmas ending with 0."""
    return for_model(discretization, denoiser)(check_int("steps", steps), device=device)


def initial_latent(noise: torch.Tensor, sigma: torch.Tensor | float, init_latent: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The latent at noise level ``sigma`` that sampling starts from (sgm's convention).

    From pure noise (txt2img): ``noise * sqrt(1 + sigma^2)``; from an image's latent
    (img2img): ``init_latent + noise * sigma``.
    """
    sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
    if init_latent is None:
        return noise * torch.sqrt(1.0 + sigma**2)
    return init_latent.to(noise.device, noise.dtype) + noise * sigma
