"""``python run.py from_image=IMG.png [overrides]``: rerun what produced one of our images.

The PNG's ``config`` text chunk holds the resolved config of the run that wrote it and its
``seed`` chunk the image's own seed (the run's seed + k). The rerun is that config with
``images=[k]`` (only image k of its job list: the same prompt, wildcard draw and seed), so on
the same machine and versions it gives the same pixels. Overrides on the command line win:
value overrides (``steps=20``, ``guider.scale=3``, ``~logger``) and groups placed at their own
key (``sampler=heun``) replace what the image says; groups that write elsewhere
(``model=``, ``+experiment=``) would change what the image is and are refused. Where the
current config links two keys (``sampler.guider: ${guider}``) and the image's resolved values
agree with the link, the link is restored, so ``guider.scale=3`` reaches the sampler's guider
as in a fresh run. Where the outputs go (``callbacks``, whatever interpolates the run folder) is
this run's: a new run folder.

A PNG without our chunks (an AUTOMATIC1111 image) is refused with the command that reruns
its prompt, seed, steps and size by hand: its sampler, model and hashes need not exist here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..data.paths import existing_file
from .a1111 import parse_parameters

log = logging.getLogger(__name__)

_ABSENT = object()
OWN = ("callbacks",)  # nodes of this run, whatever the image says
RUN_LOCATION = "hydra:runtime"  # an interpolation of the run's folder: this run's, whatever the image says


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of ``from_image``; errors name the parameter."""
    from PIL import Image, UnidentifiedImageError

    existing_file(path, "from_image", "PNG file", " (give a PNG written by run.py)")
    try:
        with Image.open(path) as im:
            im.load()
            return dict(getattr(im, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"from_image {str(path)!r} is not a readable image ({exc})") from exc


def _not_ours(path: Path, text: dict[str, str]) -> ValueError:
    if "parameters" not in text:
        return ValueError(f"from_image {str(path)!r} holds no sgm metadata (no 'config' text chunk): give a PNG "
                          "written by run.py")
    from .cli import quoted_override

    p = parse_parameters(text["parameters"])
    texts = (("prompt", p.prompt), ("negative_prompt", p.negative_prompt))
    hint = [quoted_override(k, v) or f"{k}=..." for k, v in texts if v]
    f = p.fields
    hint += [f"seed={f['Seed']}"] * ("Seed" in f) + [f"steps={f['Steps']}"] * ("Steps" in f)
    hint += [f"guider.scale={f['CFG scale']}"] * ("CFG scale" in f)
    if "x" in f.get("Size", ""):
        w, h = f["Size"].split("x", 1)
        hint += [f"W={w}", f"H={h}"]
    return ValueError(f"from_image {str(path)!r} is not an sgm image: it holds an AUTOMATIC1111 'parameters' text "
                      f"(sampler {f.get('Sampler', '?')!r}, model {f.get('Model', '?')!r}) but no sgm config, so it "
                      f"cannot be rerun exactly. Its prompt and numbers by hand: python run.py {' '.join(hint)}")


def _interpolations(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(path, expression) of every interpolation in a config's dict nodes."""
    out = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            if OmegaConf.is_interpolation(node, key):
                out.append((path, node._get_node(key)._value()))
            else:
                out += _interpolations(node._get_node(key), path + ".")
    return out


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _relink(image: DictConfig, current: DictConfig) -> None:
    """Restore the current config's interpolations where the image's resolved values agree with them."""
    for path, expression in _interpolations(current):
        if path.split(".")[0] in OWN:
            continue
        old = OmegaConf.select(image, path, default=_ABSENT)
        if old is _ABSENT:
            continue
        stored = _plain(old)
        OmegaConf.update(image, path, expression, merge=False)
        if RUN_LOCATION in expression:  # where this run writes (trainer.default_root_dir): always this run's
            continue
        try:
            same = _plain(OmegaConf.select(image, path)) == stored
        except Exception:  # noqa: BLE001 - an interpolation that does not resolve here: keep the value
            same = False
        if not same:
            OmegaConf.update(image, path, old, merge=False)


def _apply_overrides(image: DictConfig, current: DictConfig, overrides: list[str]) -> None:
    """The command line's overrides, taken from the composed ``current`` config into ``image``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .common import CONF_DIR

    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_hydra_override() or o.key_or_group == "from_image":
            continue
        key = o.key_or_group
        group = (CONF_DIR / key).is_dir()
        if o.package is not None or (group and _global_group(key)):
            raise ValueError(f"from_image: the override {o.input_line!r} changes what the image is, not how it is "
                             "rerun: run without from_image, or override values (steps=..., guider.scale=...)")
        path = key.replace("/", ".")
        if o.is_delete():
            parent, _, leaf = path.rpartition(".")
            node = OmegaConf.select(image, parent) if parent else image
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        OmegaConf.update(image, path, OmegaConf.select(current, path, default=None), merge=False, force_add=True)


def _global_group(group: str) -> bool:
    from .common import CONF_DIR

    return any(f.read_text().startswith("# @package _global_") for f in (CONF_DIR / group).glob("*.yaml"))


def rerun_config(cfg: DictConfig) -> DictConfig:
    """The config that reproduces ``cfg.from_image`` (see the module docstring), before any weight is read."""
    from hydra.core.hydra_config import HydraConfig

    import sgm
    import torch

    path = Path(str(cfg.from_image))
    text = read_png_text(path)
    if "config" not in text or "seed" not in text:
        raise _not_ours(path, text)
    image = OmegaConf.create(text["config"])
    k = int(text["seed"]) - int(image.seed)
    if k < 0:
        raise ValueError(f"from_image {str(path)!r}: its seed chunk ({text['seed']}) is below its run's seed "
                         f"({image.seed}); the PNG's metadata was edited")
    for key in ("sgm", "torch"):
        here = sgm.__version__ if key == "sgm" else torch.__version__
        if text.get(key) and text[key] != here:
            log.warning("from_image: the image was made with %s %s, this is %s: pixels may differ",
                        key, text[key], here)
    _relink(image, cfg)
    for key in OWN:
        image[key] = cfg.get(key)
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    _apply_overrides(image, cfg, overrides)
    image.from_image = None
    image.images = [k]
    log.info("from_image %s: image %d of its run (seed %s, prompt %r)", path, k, text["seed"], text.get("prompt"))
    return image


def select_images(jobs: list, indices: Any) -> list:
    """``images``: the run's jobs with these indices (null: all), each index checked."""
    if indices is None:
        return jobs
    if not isinstance(indices, (list, tuple, ListConfig)):
        indices = [indices]
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(jobs):
            raise ValueError(f"images: {i!r} is not the index of one of the run's {len(jobs)} images "
                             f"(0..{len(jobs) - 1})")
        out.append(jobs[i])
    return out
