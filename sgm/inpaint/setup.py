"""The inpainting parameters of a run, checked before any weight is read (``sgm.tasks.sample.validate``).

``init_image=IMG mask=MASK`` (white = repaint), ``mask_grow`` (dilate, pixels), ``mask_blur``
(Gaussian sigma, pixels), ``inpaint_paste``, ``inpaint_blend`` and ``outpaint=[left, top, right,
bottom]`` become one :class:`~sgm.inpaint.job.Inpainting`; the UNet's input channels are checked
against the mask and against the checkpoint's header.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from ..data.reading import SkipImage, inspect_image
from ..diffusion._checks import check_int, check_positive
from .job import Inpainting
from .mask import blur, describe, grow, mask_to_tensor, pad_outpaint, read_mask
from .unet9 import FIRST_CONV

log = logging.getLogger(__name__)

INPAINT_KEYS = ("mask", "outpaint")


def check_outpaint(value: Any, H: int, W: int) -> tuple[int, int, int, int] | None:
    """``outpaint`` as (left, top, right, bottom) pixels >= 0, not all 0, leaving the image some room."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple, ListConfig)) or len(value) != 4:
        raise ValueError(f"outpaint must be four pixel counts [left, top, right, bottom], got {value!r}")
    pads = tuple(check_int(f"outpaint[{i}]", v, minimum=0) for i, v in enumerate(value))
    if not any(pads):
        raise ValueError("outpaint=[0, 0, 0, 0] adds nothing: give the pixels to add on each side, or drop outpaint")
    left, top, right, bottom = pads
    if left + right >= W or top + bottom >= H:
        raise ValueError(f"outpaint={list(pads)} leaves no room for init_image in the {W}x{H} output (H, W are the "
                         f"final size, padding included): make W > left + right and H > top + bottom")
    return pads  # type: ignore[return-value]


def _unet_channels(model: Any) -> tuple[int | None, int | None]:
    net = (model or {}).get("network") or {}
    inc, outc = net.get("in_channels"), net.get("out_channels")
    return (None if inc is None else int(inc)), (None if outc is None else int(outc))


def check_checkpoint_channels(model: Any, weights: Any) -> None:
    """The checkpoint's UNet input channels (from the safetensors header alone) against
    ``model.network.in_channels``: a 4-channel file loaded as the 9-channel inpainting model, or the
    reverse, is named with the config to use."""
    path = (weights or {}).get("checkpoint")
    inc, _ = _unet_channels(model)
    if not path or inc is None or Path(str(path)).suffix != ".safetensors":
        return
    from ..lora.files import read_safetensors_header

    header, _ = read_safetensors_header(path, "weights.checkpoint")
    shape = header.get(FIRST_CONV, {}).get("shape")
    if shape is None or len(shape) != 4 or shape[1] == inc:
        return
    fix = ("model=sdxl_inpaint expects the SDXL inpainting UNet (9 input channels); for a 4-channel checkpoint use "
           "its own model (e.g. model=sdxl_base), which inpaints by latent-mask blending with mask=MASK"
           if inc > shape[1] else
           f"this is an inpainting UNet: use model=sdxl_inpaint (or set model.network.in_channels={shape[1]})")
    raise ValueError(f"weights.checkpoint {str(path)!r} has a {shape[1]}-channel UNet input ({FIRST_CONV} {shape}) "
                     f"but model.network.in_channels is {inc}: {fix}")


def _mask_size_rule(path: str, mask_size: tuple[int, int], allowed: dict[str, tuple[int, int]]) -> None:
    if mask_size in allowed.values():
        return
    sizes = ", ".join(f"{w}x{h} ({what})" for what, (w, h) in allowed.items())
    raise ValueError(f"mask {path!r} is {mask_size[0]}x{mask_size[1]} but must match {sizes}: a mask of another "
                     "size would cover another region once resized; resize or crop it to the image first")


def load_inpainting(cfg: DictConfig, H: int, W: int) -> Inpainting | None:
    """The run's :class:`Inpainting` (None without ``mask`` and ``outpaint``); every check names its parameter."""
    from ..tasks.sample import load_init_image  # the one init-image reader

    inc, outc = _unet_channels(cfg.get("model"))
    wants_mask = inc is not None and outc is not None and inc > outc
    given = [k for k in INPAINT_KEYS if cfg.get(k) is not None]
    if not given:
        if wants_mask:
            raise ValueError(f"this model's UNet takes {inc} input channels (the inpainting UNet: latents, mask and "
                             "masked-image latents), so it needs init_image=IMG mask=MASK (or outpaint=[l,t,r,b]); "
                             "for text-to-image use the base model (model=sdxl_base)")
        return None
    if not cfg.get("init_image"):
        raise ValueError(f"{given[0]}= needs init_image=PATH: it marks what to repaint in that image")
    grow_px = check_int("mask_grow", cfg.get("mask_grow", 0) or 0, minimum=0)
    sigma = check_positive("mask_blur", cfg.get("mask_blur", 0) or 0, allow_zero=True)
    pads = check_outpaint(cfg.get("outpaint"), H, W)
    inner_h, inner_w = (H, W) if pads is None else (H - pads[1] - pads[3], W - pads[0] - pads[2])
    image = load_init_image(cfg.init_image, inner_h, inner_w)
    if cfg.get("mask") is not None:
        try:
            h0, w0 = inspect_image(str(cfg.init_image), full=False)
        except SkipImage as exc:
            raise ValueError(f"init_image {str(cfg.init_image)!r} is not a readable image ({exc})") from exc
        pil = read_mask(cfg.mask)
        _mask_size_rule(str(cfg.mask), pil.size, {"init_image": (w0, h0), "the image as resized": (inner_w, inner_h)})
        mask = mask_to_tensor(pil, inner_h, inner_w)
        if float(mask.max()) == 0.0 and pads is None:
            raise ValueError(f"mask {str(cfg.mask)!r} is all black: nothing to repaint (white marks the area to "
                             "repaint; an inverted mask? try it inverted)")
    else:
        mask = torch.zeros(1, 1, inner_h, inner_w)
    if pads is not None:
        image, mask = pad_outpaint(image, mask, pads)
    mask = blur(grow(mask, grow_px), sigma)
    blend = cfg.get("inpaint_blend")
    blend = (not wants_mask) if blend is None else bool(blend)
    paste = bool(cfg.get("inpaint_paste", True))
    log.info("inpainting: %s (grow %d px, blur %g px, blend %s, paste %s%s)", describe(mask), grow_px, sigma, blend,
             paste, "" if pads is None else f", outpaint {list(pads)}")
    return Inpainting(image=image, mask=mask, blend=blend, paste=paste)
