"""Inpainting masks in pixel space: reading, growing, blurring, outpaint padding, latent size.

Convention (A1111, diffusers): white = repaint, black = keep. A file with transparency gives
its transparent area as the mask (1 - alpha, ComfyUI's ``LoadImage`` mask); any other file is
read as luminance (16-bit, palette and CMYK as :func:`sgm.data.reading.to_rgb` reads them).
Masks here are float ``[1, 1, H, W]`` tensors in [0, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..data.reading import image_file, to_rgb

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def mask_from_pil(im: Image.Image) -> Image.Image:
    """An 8-bit "L" mask of a PIL image: 255 - alpha where the image has transparency, else luminance."""
    im = ImageOps.exif_transpose(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        alpha = im.getchannel("A")
        if alpha.getextrema()[0] < 255:  # some transparency: the transparent area is the mask
            return ImageOps.invert(alpha.convert("L"))
    return to_rgb(im).convert("L")


def read_mask(path: str | Path) -> Image.Image:
    """The mask file as an 8-bit "L" image (:func:`mask_from_pil`); errors name ``mask`` and the file."""
    path = image_file(path, "mask")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                out = mask_from_pil(im)
                out.load()
        return out
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"mask {str(path)!r} is too large to decode safely ({exc}): downscale it first") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure: the file is not a usable image
        raise ValueError(f"mask {str(path)!r} is not a readable image ({type(exc).__name__}: {exc})") from exc


def mask_to_tensor(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """An "L" mask resized to ``width`` x ``height`` (Lanczos, as diffusers' mask processor) -> [1, 1, H, W] in [0, 1]."""
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate by ``pixels``: each pixel takes the maximum within a disk of that radius (grey dilation)."""
    if pixels <= 0:
        return mask
    r = int(pixels)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disk = (yy**2 + xx**2 <= r * r).flatten()
    padded = F.pad(mask, (r, r, r, r), value=0.0)
    patches = F.unfold(padded, 2 * r + 1)[:, disk]  # [1, |disk|, H*W]
    return patches.amax(1).reshape(mask.shape)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalized 1-D Gaussian of std ``sigma``, truncated at 4 sigma (scipy.ndimage's default)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of std ``sigma`` pixels; borders reflect (scipy.ndimage's ``reflect``)."""
    if sigma <= 0:
        return mask
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = mask
    for dim in (2, 3):
        n = out.shape[dim]
        idx = torch.arange(-r, n + r)
        idx = _reflect(idx, n)
        out = out.index_select(dim, idx)
        shape = [1, 1, 1, 1]
        shape[dim] = len(k)
        out = F.conv2d(out, k.reshape(shape))
    return out.clamp(0.0, 1.0)


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) with the edge repeated (d c b a | a b c d | d c b a)."""
    period = 2 * n
    idx = idx % period
    return torch.where(idx < n, idx, period - 1 - idx)


def pad_outpaint(image: torch.Tensor, mask: torch.Tensor, pads: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Outpainting as padding plus a mask: ``pads`` = (left, top, right, bottom) pixels added around
    ``image`` [1, 3, h, w] (filled by extending its edge pixels) and its ``mask``; the new area is
    masked (1)."""
    left, top, right, bottom = (int(p) for p in pads)
    padded = F.pad(image, (left, right, top, bottom), mode="replicate")
    return padded, F.pad(mask, (left, right, top, bottom), value=1.0)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask averaged over each latent cell ([1, 1, h, w]): the share of the cell to repaint.
    Soft values blend the two regions (ComfyUI's noise mask is soft too)."""
    return F.adaptive_avg_pool2d(mask, size) if tuple(mask.shape[-2:]) != tuple(size) else mask


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """diffusers' mask processor (``do_binarize``): 1 where mask >= 0.5, else 0."""
    return (mask >= 0.5).to(mask.dtype)


def describe(mask: torch.Tensor) -> str:
    """A short log line: the share of pixels to repaint."""
    return f"the mask repaints {100 * float(mask.mean()):.1f}% of the image"
