"""Resizing an image to a feature network's input, the step FID numbers depend on.

* ``clean`` (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
  Evaluation", clean-fid): each channel of the uint8 image as a float32 PIL image (mode "F"),
  resized with PIL's bicubic filter (antialiased), clipped to [0, 255] and not quantised again.
* ``tf_bilinear``: the original TensorFlow FID's resize, TF 1.x bilinear without antialiasing,
  on the float image (torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``); what
  torch-fidelity and torchmetrics (``antialias=False``) feed their Inception.

Both take ``[H, W, 3]`` uint8 and give ``[3, size, size]`` float32 in [0, 255].
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image


def clean_resize(image: np.ndarray, size: int) -> torch.Tensor:
    """clean-fid's resize: PIL bicubic per channel in float, no quantisation."""
    if image.shape[:2] == (size, size):
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32)).resize(
        (size, size), Image.Resampling.BICUBIC)) for c in range(image.shape[2])]
    return torch.from_numpy(np.stack(channels).clip(0, 255).astype(np.float32))


def tf_bilinear_resize(image: np.ndarray, size: int) -> torch.Tensor:
    """TF 1.x bilinear (align_corners=False), as torch-fidelity resizes for its Inception."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None]
    return interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)[0]


RESIZES: dict[str, Callable[[np.ndarray, int], torch.Tensor]] = {
    "clean": clean_resize,
    "tf_bilinear": tf_bilinear_resize,
}


def get_resize(name: str, what: str = "resize") -> Callable[[np.ndarray, int], torch.Tensor]:
    """The resize function called ``name``; a ValueError names ``what`` and the choices."""
    if name not in RESIZES:
        raise ValueError(f"{what}={name!r} is not a resize: use one of {', '.join(RESIZES)}")
    return RESIZES[name]
