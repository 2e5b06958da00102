"""Inpainting and outpainting: pixel masks (:mod:`.mask`), latent-mask blending for any model
(:mod:`.blend`), the 9-channel SDXL inpainting UNet's extra input (:mod:`.unet9`), the run's
parameters (:mod:`.setup`) and what the engine applies per batch (:mod:`.job`)."""

from .blend import LatentBlend
from .job import InpaintBatch, Inpainting

__all__ = ["InpaintBatch", "Inpainting", "LatentBlend"]
