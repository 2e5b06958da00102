"""Resize, crop and flip, with SDXL's size conditioning: :class:`CropPlan` says how an image of
one size becomes a training view of another, :func:`load_view` produces its pixels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .reading import failure_reason, image_to_tensor, read_image

RESAMPLE = Image.Resampling.LANCZOS
VIEW_VERSION = "v1"  # bump when the pixels a view produces change (resize filter, conversion)


@dataclass(frozen=True)
class CropPlan:
    """How an image of ``original`` (h, w) becomes ``target`` (h, w): resize to ``resized``
    (the smallest size covering the target, aspect kept), crop at (``top``, ``left``), then
    mirror if ``flip``. ``crop_coords`` is the conditioning value: (top, left) of the crop in
    the resized image, as it would be for the mirrored resized image when ``flip``."""

    original: tuple[int, int]
    resized: tuple[int, int]
    target: tuple[int, int]
    top: int
    left: int
    flip: bool = False

    @property
    def crop_coords(self) -> tuple[int, int]:
        """SDXL's ``crop_coords_top_left`` of this view."""
        if self.flip:
            return self.top, self.resized[1] - self.target[1] - self.left
        return self.top, self.left


def plan_crop(original: tuple[int, int], target: tuple[int, int], random_crop: bool = False, flip: bool = False,
              u: tuple[float, float] = (0.5, 0.5)) -> CropPlan:
    """Resize so the image covers ``target`` (short side match), then crop: centred
    (``(resized - target) // 2``) or at ``u`` (two numbers in [0, 1)) of the free range."""
    h, w = original
    th, tw = target
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if random_crop:
        top, left = min(int(u[0] * (rh - th + 1)), rh - th), min(int(u[1] * (rw - tw + 1)), rw - tw)
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    return CropPlan((h, w), (rh, rw), (th, tw), top, left, flip)


def apply_plan(im: Image.Image, plan: CropPlan) -> Image.Image:
    """``plan``'s resize, crop and mirror applied to ``im`` (of size ``plan.original``)."""
    rh, rw = plan.resized
    if im.size != (rw, rh):
        im = im.resize((rw, rh), resample=RESAMPLE, reducing_gap=3.0)
    th, tw = plan.target
    im = im.crop((plan.left, plan.top, plan.left + tw, plan.top + th))
    if plan.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im


def load_view(path: str, plan: CropPlan) -> torch.Tensor:
    """The pixels of ``plan`` for ``path``: [3, h, w] float32 in [-1, 1]."""
    try:
        return image_to_tensor(apply_plan(read_image(path, at_least=plan.resized), plan))
    except Exception as e:
        raise RuntimeError(f"cannot load training image {path} (it passed validation at setup; was it changed?): "
                           f"{failure_reason(e)}") from e
