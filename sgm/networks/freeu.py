"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"), a network patch.

On the first two up-path stages (the two lowest resolutions: diffusers' ``up_blocks.0`` and
``up_blocks.1``), before each output block concatenates its inputs, FreeU multiplies the
first half of the backbone feature channels by ``b`` and scales the lowest frequencies of
the skip features by ``s`` (a Fourier filter with threshold 1). This is the plain variant
of diffusers' ``enable_freeu(s1, s2, b1, b2)``, not the structure-based (mean-map) scaling
of the paper's code or ComfyUI's FreeU_V2. The FFT runs in float32 (fp16/bf16 FFTs are
unstable or unsupported) and its result is cast back.

Use: ``wrapper.patches = [FreeU()]`` or :func:`sgm.networks.patches.apply_patches`.
"""

from __future__ import annotations

import torch

from .patches import UNetPatch


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the centred 2*threshold x 2*threshold lowest frequencies of ``x`` [B, C, H, W] by ``scale``."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = freq.shape[-2:]
    mask = torch.ones(h, w, device=x.device)
    mask[h // 2 - threshold : h // 2 + threshold, w // 2 - threshold : w // 2 + threshold] = scale
    out = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


class FreeU(UNetPatch):
    """FreeU backbone (``b1``, ``b2``) and skip (``s1``, ``s2``) factors of up stages 0 and 1.

    Defaults: the SDXL values of the FreeU README.
    """

    def __init__(self, b1: float = 1.3, b2: float = 1.4, s1: float = 0.9, s2: float = 0.2):
        self.b1, self.b2, self.s1, self.s2 = float(b1), float(b2), float(s1), float(s2)

    def output_block(self, name: str, stage: int, h: torch.Tensor,
                     skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if stage > 1:
            return h, skip
        b, s = (self.b1, self.s1) if stage == 0 else (self.b2, self.s2)
        half = h.shape[1] // 2
        h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
        return h, fourier_filter(skip, threshold=1, scale=s)
