"""Hires fix (A1111's two-pass "highres fix"): sample at H x W, upscale, then img2img at the larger size.

The first pass is the run as configured. Its latents are upscaled, either in latent space
(``mode=latent``: ``torch.nn.functional.interpolate``, ``bilinear`` / ``bicubic`` /
``nearest-exact``) or in pixels (``mode=pixel``: decode, the user's ``upscaler`` module if given
([B, 3, H, W] in [-1, 1] -> a larger image), Lanczos (PIL, float) to the target size, encode).
The second pass is img2img through the engine's img2img path (``img2img_start`` of a
``steps``-step schedule, the run's sampler and rule) with the same prompts and seeds; its size
conditioning is the new size. The target size is ``scale`` times H and W rounded to the model's
size multiple (logged when rounding changed it).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from ..diffusion._checks import check_finite, check_int
from ..diffusion.schedule import img2img_start
from ..networks.sizes import config_pixel_multiple
from .common import check_size

log = logging.getLogger(__name__)

LATENT_METHODS = ("bilinear", "bicubic", "nearest-exact")
PIXEL_METHODS = ("lanczos",)
MODES = ("latent", "pixel")


def lanczos_resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, C, h, w] float images resized with PIL's Lanczos filter, channel by channel in float ("F")."""
    out = []
    for image in images.detach().float().cpu():
        channels = [np.asarray(Image.fromarray(c.numpy(), "F").resize((width, height), Image.Resampling.LANCZOS))
                    for c in image]
        out.append(torch.from_numpy(np.stack(channels)))
    return torch.stack(out).to(images.device, images.dtype)


class HiresFix:
    """The second pass; ``hires=latent|pixel`` (conf/hires). ``steps`` None: the run's ``steps``."""

    def __init__(self, mode: str = "latent", scale: float = 1.5, strength: float = 0.5, steps: int | None = None,
                 upscale_method: str = "bicubic", upscaler: nn.Module | None = None):
        if mode not in MODES:
            raise ValueError(f"hires.mode must be one of {MODES}, got {mode!r}")
        methods = LATENT_METHODS if mode == "latent" else PIXEL_METHODS
        if upscale_method not in methods:
            raise ValueError(f"hires.upscale_method for hires={mode} must be one of {methods}, got {upscale_method!r}")
        if upscaler is not None and mode != "pixel":
            raise ValueError("hires.upscaler works on pixels: use hires=pixel with it")
        if upscaler is not None and not callable(upscaler):
            raise ValueError(f"hires.upscaler must be an nn.Module (or callable) on [B, 3, H, W], got {upscaler!r}")
        self.scale = check_finite("hires.scale", scale)
        if self.scale <= 1:
            raise ValueError(f"hires.scale must be > 1 (the second pass is larger), got {scale!r}")
        self.strength = check_finite("hires.strength", strength)
        if not 0 < self.strength <= 1:
            raise ValueError(f"hires.strength must be in (0, 1], got {strength!r}")
        self.steps = None if steps is None else check_int("hires.steps", steps)
        self.mode, self.upscale_method, self.upscaler = mode, upscale_method, upscaler
        self.size: tuple[int, int] | None = None
        self.sigmas: torch.Tensor | None = None
        self.img2img_schedule = "last_steps"

    def target_size(self, H: int, W: int, multiple: int) -> tuple[int, int]:
        """``scale`` x (H, W) rounded to the nearest multiple of ``multiple`` (at least one step larger)."""
        size = []
        for side in (H, W):
            exact = side * self.scale
            rounded = max(side + multiple, int(round(exact / multiple)) * multiple)
            if rounded != exact:
                log.info("hires: %g x %d = %g rounded to %d (a multiple of %d)", self.scale, side, exact, rounded,
                         multiple)
            size.append(rounded)
        return size[0], size[1]

    def configure(self, engine: Any, discretization: Any, steps: int, img2img_schedule: str = "last_steps") -> None:
        """Fix the second pass's size and schedule for ``engine`` (run after ``configure_prediction``)."""
        opts = engine.predict_options
        self.size = self.target_size(opts["H"], opts["W"], engine.pixel_multiple)
        engine.latent_shape(*self.size)
        self.sigmas = engine.schedule(discretization, self.steps or steps)
        self.img2img_schedule = img2img_schedule
        n = len(self.sigmas) - 1
        log.info("hires: %dx%d -> %dx%d, %d of %d steps (strength %g), %s %s", opts["W"], opts["H"], self.size[1],
                 self.size[0], n - img2img_start(n, self.strength, img2img_schedule), n, self.strength, self.mode,
                 self.upscale_method if self.upscaler is None else type(self.upscaler).__name__)

    @torch.no_grad()
    def upscale(self, engine: Any, z: torch.Tensor) -> torch.Tensor:
        """The first pass's latents ``z`` as latents of the target size."""
        H2, W2 = self.size
        f = engine.downsample_factor
        if self.mode == "latent":
            extra = {} if self.upscale_method == "nearest-exact" else {"align_corners": False}
            return F.interpolate(z, size=(H2 // f, W2 // f), mode=self.upscale_method, **extra)
        x = engine.decode_first_stage(z).clamp(-1, 1)
        if self.upscaler is not None:
            x = self.upscaler(x).float().clamp(-1, 1)
        if tuple(x.shape[-2:]) != (H2, W2):
            x = lanczos_resize(x, H2, W2)
        return engine.encode_first_stage(x.to(engine.device))

    @torch.no_grad()
    def __call__(self, engine: Any, batch: dict, z: torch.Tensor) -> torch.Tensor:
        """The second pass for one batch: upscale ``z``, then img2img at the target size."""
        if self.sigmas is None:
            raise RuntimeError("call HiresFix.configure() before sampling")
        opts = engine.predict_options
        H2, W2 = self.size
        cond, uc = engine.get_conditionings(batch["prompt"], batch["negative_prompt"], H2, W2,
                                            aesthetic_score=opts["aesthetic_score"],
                                            negative_aesthetic_score=opts["negative_aesthetic_score"])
        n = len(self.sigmas) - 1
        start = img2img_start(n, self.strength, self.img2img_schedule)
        return engine.sample_latents(cond, uc, batch["seed"], engine.latent_shape(H2, W2), self.sigmas[start:],
                                     init_latent=self.upscale(engine, z), noise_seed_offset=2)


def check_hires(cfg: Any, H: int, W: int, inpaint: Any = None) -> HiresFix | None:
    """``cfg.hires`` built and its target size checked against the model (no weights read); None when off."""
    if cfg.get("hires") is None:
        return None
    if inpaint is not None:
        raise ValueError("hires with mask/outpaint is not supported: inpaint first, then run hires on the result "
                         "(init_image=RESULT strength=... or hires=latent on a new prompt run)")
    try:
        hires = instantiate(cfg.hires)
    except InstantiationException as exc:  # Hydra wraps the constructor's error: raise the one naming the parameter
        raise (exc.__cause__ if isinstance(exc.__cause__, ValueError) else exc) from None
    if not isinstance(hires, HiresFix):
        raise ValueError(f"hires must build a sgm.tasks.hires.HiresFix (conf/hires/*.yaml), got {type(hires).__name__}")
    H2, W2 = hires.target_size(H, W, config_pixel_multiple(OmegaConf.to_container(cfg.model, resolve=True)))
    check_size(cfg.model, H2, W2, names=("hires H", "hires W"))
    return hires
