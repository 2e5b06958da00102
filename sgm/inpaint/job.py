"""What an inpainting (or outpainting) run hands the engine: the image, the processed mask and
the switches; :meth:`Inpainting.batch` turns them into one batch's blend, concat channels and
paste-back (see :mod:`sgm.inpaint.blend` and :mod:`sgm.inpaint.unet9`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .blend import LatentBlend
from .mask import latent_mask
from .unet9 import extra_channels, mask_and_masked_latents, with_concat


@dataclass
class Inpainting:
    """``image`` [1, 3, H, W] in [-1, 1] (padded when outpainting) and ``mask`` [1, 1, H, W] in [0, 1]
    (1 = repaint, grown and blurred). ``blend``: latent-mask blending (any model); ``paste``: put the
    unmasked pixels of ``image`` back after decoding (A1111's overlay), through the soft mask."""

    image: torch.Tensor
    mask: torch.Tensor
    blend: bool = True
    paste: bool = True
    _concat: dict = field(default_factory=dict, repr=False)

    def batch(self, engine: Any, init_latent: torch.Tensor) -> "InpaintBatch":
        """The pieces for one batch whose init latents are ``init_latent`` [B, C, h, w]."""
        n = init_latent.shape[0]
        concat = None
        if extra_channels(engine) > 0:
            if "tensor" not in self._concat:  # the same for every batch of the run: encode once
                small, latents = mask_and_masked_latents(engine, self.image, self.mask)
                self._concat["tensor"] = torch.cat([small, latents], dim=1)
            concat = self._concat["tensor"].expand(n, -1, -1, -1)
        blend = None
        if self.blend:
            m = latent_mask(self.mask.to(init_latent.device), tuple(init_latent.shape[-2:]))
            blend = LatentBlend(m, init_latent)
        return InpaintBatch(blend, concat, self.image, self.mask if self.paste else None)


@dataclass
class InpaintBatch:
    blend: LatentBlend | None
    concat: torch.Tensor | None
    image: torch.Tensor
    paste_mask: torch.Tensor | None

    def conditioning(self, cond: dict) -> dict:
        """``cond`` (or ``uc``) with the 9-channel UNet's mask and masked-image latents, if it takes them."""
        return cond if self.concat is None else with_concat(cond, self.concat)

    def paste(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded ``images`` [B, 3, H, W] with the unmasked pixels of the init image put back (soft mask)."""
        if self.paste_mask is None:
            return images
        m = self.paste_mask.to(images.device, images.dtype)
        return m * images + (1 - m) * self.image.to(images.device, images.dtype)
