"""The denoising loss used for training (sgm's StandardDiffusionLoss, with working offset noise)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import build_part
from ._checks import check_positive
from .noise import gaussian, gaussian_like
from .util import append_dims

LOSS_TYPES = ("l2", "l1")


class StandardDiffusionLoss(nn.Module):
    """E_{sigma, n} [ lambda(sigma) * |D(x0 + sigma n; sigma) - x0|^p ], per sample.

    ``offset_noise_level`` adds a per-sample, per-channel constant to the noise
    (Guttenberg 2023, "Diffusion with offset noise"), so that the model can learn to change
    an image's mean brightness.
    """

    def __init__(
        self,
        sigma_sampler: Any = None,
        loss_weighting: Any = None,
        loss_type: str = "l2",
        offset_noise_level: float = 0.0,
        batch2model_keys: list[str] | str | None = None,
        *,
        sigma_sampler_config: Any = None,
        loss_weighting_config: Any = None,
    ):
        super().__init__()
        self.sigma_sampler = build_part("sigma_sampler", sigma_sampler, sigma_sampler_config)
        self.loss_weighting = build_part("loss_weighting", loss_weighting, loss_weighting_config)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}")
        self.loss_type = loss_type
        self.offset_noise_level = check_positive("offset_noise_level", offset_noise_level, allow_zero=True)
        if isinstance(batch2model_keys, str):
            batch2model_keys = [batch2model_keys]
        self.batch2model_keys = set(batch2model_keys or [])

    def forward(self, network: Callable, denoiser: Callable, conditioner: Callable, input: torch.Tensor,
                batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample loss [B] of ``denoiser(network, ...)`` on clean latents ``input``."""
        cond = conditioner(batch)
        extra = {k: batch[k] for k in self.batch2model_keys.intersection(batch)}
        return self.compute(network, denoiser, cond, input, generator=generator, **extra)

    def sample_noise(self, input: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian noise, plus the offset-noise term when configured."""
        noise = gaussian_like(input, generator)
        if self.offset_noise_level > 0.0:
            offset = gaussian(input.shape[:2], generator, input.device, input.dtype)
            noise = noise + self.offset_noise_level * append_dims(offset, input.ndim)
        return noise

    def compute(self, network: Callable, denoiser: Callable, cond: dict, input: torch.Tensor,
                noise: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
                generator: torch.Generator | None = None, **model_kwargs: Any) -> torch.Tensor:
        """The loss with given (or freshly drawn) ``noise`` and ``sigmas``: fix both for a deterministic value."""
        if sigmas is None:
            sigmas = self.sigma_sampler(input.shape[0], generator=generator)
        sigmas = sigmas.to(input)
        if noise is None:
            noise = self.sample_noise(input, generator)
        noised = input + noise * append_dims(sigmas, input.ndim)
        model_output = denoiser(network, noised, sigmas, cond, **model_kwargs)
        w = append_dims(self.loss_weighting(sigmas), input.ndim)
        return self.get_loss(model_output, input, w)

    def get_loss(self, model_output: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        diff = model_output - target
        err = diff**2 if self.loss_type == "l2" else diff.abs()
        return (w * err).reshape(target.shape[0], -1).mean(1)
