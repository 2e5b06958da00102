"""The 9-channel SDXL inpainting UNet's extra input (diffusers' ``StableDiffusionXLInpaintPipeline``).

Each network call gets ``cat([latents (4), mask (1), masked-image latents (4)])`` along the
channels, for the conditional and the unconditional branch alike; the sampler itself runs on
the 4-channel latents. The mask is binarized at 0.5 (diffusers' mask processor), the masked
image is ``image * (mask < 0.5)``, encoded like an init image, and the mask is resized to the
latent size by nearest-neighbour interpolation (``prepare_mask_latents``). The extra channels
travel in the conditioning as ``concat``, which :class:`sgm.networks.wrapper.OpenAIWrapper`
appends to the (scaled) latents, as sgm's inpainting models have it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..conditioning.prompt_schedule import CondSchedule
from .mask import binarize

CONCAT_KEY = "concat"
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"  # [model_channels, in_channels, 3, 3]


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image * (mask < 0.5)`` (diffusers): the area to repaint set to 0 (grey in [-1, 1])."""
    return image * (mask < 0.5).to(image.dtype)


def mask_and_masked_latents(engine: Any, image: torch.Tensor, mask: torch.Tensor,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask at latent size [1, 1, h, w], masked-image latents [1, C, h, w]) for a pixel ``mask``
    [1, 1, H, W] and ``image`` [1, 3, H, W] in [-1, 1]; ``generator`` draws a posterior sample as
    diffusers does, else the posterior's mode (as img2img encodes)."""
    hard = binarize(mask)
    latents = engine.encode_first_stage(masked_image(image, hard).to(engine.device), generator)
    small = F.interpolate(hard.to(latents.device), size=latents.shape[-2:])  # nearest, as diffusers
    return small, latents


def extra_channels(engine: Any) -> int:
    """How many input channels the engine's UNet takes beyond the latents (5 for the inpainting UNet)."""
    unet = engine.model.diffusion_model
    return int(getattr(unet, "in_channels", engine.latent_channels)) - int(engine.latent_channels)


def with_concat(cond: dict, concat: torch.Tensor) -> dict:
    """``cond`` with the inpainting channels (one row per image) under ``concat``; a prompt-editing
    :class:`~sgm.conditioning.prompt_schedule.CondSchedule` gets them in every step's conditioning."""
    if isinstance(cond, CondSchedule):
        return CondSchedule(cond.sigmas, cond.ends, [{**c, CONCAT_KEY: concat} for c in cond.conds])
    return {**cond, CONCAT_KEY: concat}
