"""Which image sizes a model can take: the one rule for run.py, train.py and the aspect buckets.

An image side must be a multiple of the VAE's downsampling factor times the UNet's total
downsampling (2 ** (levels - 1) each), else a skip connection of the UNet gets a feature
map of another size. SDXL: 8 x 4 = 32 pixels; the shipped digit model: 4 x 2 = 8.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def level_factor(mult: Any) -> int:
    """2 ** (levels - 1) for a per-level multiplier list (``ch_mult`` / ``channel_mult``); 1 without one."""
    return 2 ** (len(mult) - 1) if mult else 1


def _get(node: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def config_pixel_multiple(model: Any) -> int:
    """The size multiple of a model config node (ours, or an sgm ``*_config`` / ``params`` one)."""
    vae = _get(model, "first_stage") or _get(model, "first_stage_config")
    vae_mult = _get(vae, "ddconfig", "ch_mult") or _get(vae, "params", "ddconfig", "ch_mult")
    unet = _get(model, "network") or _get(model, "network_config")
    unet_mult = _get(unet, "channel_mult") or _get(unet, "params", "channel_mult")
    return level_factor(vae_mult) * level_factor(unet_mult)


#: the largest image side (ComfyUI's MAX_RESOLUTION): a 16384-pixel SDXL image is a 2048x2048 latent
MAX_SIDE = 16384


def check_pixel_size(height: Any, width: Any, multiple: int, names: tuple[str, str] = ("H", "W")) -> tuple[int, int]:
    """``(height, width)`` as ints, or a ValueError that names the parameters and the multiple
    (or the bound, :data:`MAX_SIDE`)."""
    sizes = []
    for name, value in zip(names, (height, width)):
        try:
            ok = not isinstance(value, bool) and float(value).is_integer()
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
        sizes.append(int(value))
    h, w = sizes
    if max(h, w) > MAX_SIDE:
        raise ValueError(f"{names[0]} and {names[1]} must be at most {MAX_SIDE} pixels each (ComfyUI's bound), "
                         f"got {h}x{w}: try {min(h, MAX_SIDE)}x{min(w, MAX_SIDE)} or smaller")
    if h < multiple or w < multiple or h % multiple or w % multiple:
        raise ValueError(f"{names[0]} and {names[1]} must be positive multiples of {multiple} for this model "
                         f"(the VAE's and the UNet's downsampling), got {h}x{w}: try "
                         f"{max(multiple, round(h / multiple) * multiple)}x{max(multiple, round(w / multiple) * multiple)}")
    return h, w


def check_size(model: Any, height: Any, width: Any, names: tuple[str, str] = ("H", "W")) -> tuple[int, int]:
    """Fail before any model is built when the size cannot pass the model's VAE and UNet
    (``model``: its config node, a DictConfig or a plain mapping)."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else model
    return check_pixel_size(height, width, config_pixel_multiple(node), names)
