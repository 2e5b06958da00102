"""Opening and decoding image files: the project's one image reader.

:func:`read_image` gives any file Pillow opens as the picture a viewer shows: EXIF
orientation applied, 8-bit RGB (:func:`to_rgb`: palette, 16-bit and float grey, CMYK,
transparency composited on white). :func:`image_to_tensor` turns it into the models'
``[3, h, w]`` float32 in [-1, 1]. :func:`inspect_image` checks a file once, up front (structure,
decodability, size), and raises :class:`SkipImage` with the reason when it is unusable.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .paths import existing_file

#: EXIF orientations that swap width and height (the transposing and 90-degree ones).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


class SkipImage(Exception):
    """An image file that cannot be used; the message is the reason."""


class ImageReadError(RuntimeError):
    """A file that cannot be read as an image; names the file, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], cause: BaseException):
        self.path = str(path)
        self.reason = f"{type(cause).__name__}: {cause}"
        super().__init__(f"cannot read image {self.path}: {self.reason}")


def failure_reason(error: BaseException) -> str:
    """``"Type: message"`` of the error behind a failed read (the cause an :class:`ImageReadError` names)."""
    if isinstance(error, ImageReadError):
        return error.reason
    return f"{type(error).__name__}: {error}"


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored; also when the EXIF block cannot be parsed)."""
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1


def inspect_image(path: str | os.PathLike[str], min_size: int | None = None, full: bool = True) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), or :class:`SkipImage`.

    PIL's ``verify()`` (structure, PNG checksums), then a re-open for the size; ``full``
    also decodes the pixels (at reduced JPEG scale, fast), which catches truncated files
    that ``verify()`` lets through."""
    try:
        if os.path.getsize(path) == 0:
            raise SkipImage("empty file")
        with Image.open(path) as im:
            im.verify()
    except SkipImage:
        raise
    except Exception as e:
        raise SkipImage(f"not a valid image ({type(e).__name__}: {e})") from None
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = exif_orientation(im)
            if full:
                im.draft(None, (max(1, w // 8), max(1, h // 8)))
                im.load()
    except Exception as e:
        raise SkipImage(f"cannot be decoded ({type(e).__name__}: {e})") from None
    if orientation in SWAPPING_ORIENTATIONS:
        h, w = w, h
    if h < 1 or w < 1:
        raise SkipImage(f"empty image ({w}x{h})")
    if min_size is not None and min(h, w) < min_size:
        raise SkipImage(f"too small: {w}x{h} (w x h), short side below min_size {min_size}")
    return h, w


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    """An integer ("I", "I;16*") or float ("F") grey image as 8-bit "L".

    16-bit (``I;16*``, and ``I`` holding values above 255) is divided by 257, so 65535 is 255;
    float in [0, 1] is multiplied by 255; anything else is taken as 0..255. Rounded, clipped."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0
    elif im.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, 8 bit; transparency composited on white; 16-bit and float grey scaled to 8 bit."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode.startswith("I") or im.mode == "F":
        im = _grey_to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def image_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` to an existing file; errors name the parameter ``what``."""
    return existing_file(path, what, "image file")


def read_image(path: str | os.PathLike[str], at_least: tuple[int, int] | None = None) -> Image.Image:
    """The image in ``path`` as displayed: EXIF orientation applied, 8-bit RGB (:func:`to_rgb`).

    ``at_least`` (h, w as displayed): the size the caller will resize to; a JPEG much larger
    than that is decoded at a reduced DCT scale no smaller than it (faster, same result
    after the resize). Any failure raises :class:`ImageReadError` naming the file."""
    try:
        with Image.open(path) as im:
            if at_least is not None and im.format == "JPEG":
                h, w = at_least
                im.draft(None, (h, w) if exif_orientation(im) in SWAPPING_ORIENTATIONS else (w, h))
            out = to_rgb(ImageOps.exif_transpose(im))
            out.load()
            return out
    except Exception as e:
        raise ImageReadError(path, e) from e


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """An RGB image as ``[3, h, w]`` float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    arr = np.array(im, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
