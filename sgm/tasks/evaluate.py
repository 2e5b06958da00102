"""The code behind eval.py: judge a folder of images, or an earlier run's folder, without sampling.

:func:`validate` checks everything before a metric's weights are read: the folder, every image
(readable, one size), the prompts the metrics need (a PNG's ``prompt`` text chunk as run.py
writes it, else a ``NAME.txt`` caption or a ``metadata.jsonl`` row), the W&B mode and the
output folder. :func:`run` then builds the metrics (``conf/metrics``, as run.py does), judges the
images and writes ``metrics.json`` into the eval run's own folder; the judged folder is only read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from ..data.captions import check_caption_ext, find_caption, read_metadata
from ..data.reading import SkipImage, image_to_tensor, inspect_image, read_image
from ..data.records import find_images
from ..metrics.collection import metrics_needing_prompts
from .common import apply_runtime_settings, check_logger, make_logger, run_dir

log = logging.getLogger(__name__)

RUN_IMAGES = "[0-9][0-9][0-9][0-9][0-9].png"  # what ImageWriter names a run's images


@dataclass
class EvalPlan:
    """What :func:`validate` checked: the judged folder, its images and prompts, the output folder."""

    source: Path
    is_run: bool
    files: list[Path]
    prompts: list[str | None]
    out_dir: Path


def judged_files(folder: Path) -> tuple[list[Path], bool]:
    """(image files, whether ``folder`` is a run folder): a run's numbered PNGs, else every image
    under the folder (recursive, sorted)."""
    is_run = (folder / "metrics.json").is_file() or (folder / ".hydra" / "config.yaml").is_file()
    numbered = sorted(folder.glob(RUN_IMAGES))
    if is_run and numbered:
        return numbered, True
    return find_images(folder), False


def image_prompt(path: Path, caption_ext: str | None, row: dict) -> str | None:
    """The prompt of an image: its PNG ``prompt`` text chunk, else its caption file or metadata row."""
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}) or {}
    except OSError:
        text = {}
    if text.get("prompt"):
        return str(text["prompt"])
    return find_caption(path, caption_ext, row) or None


def check_images(files: list[Path], what: str) -> None:
    """Every file readable and all of one size; errors name the file."""
    sizes: dict[tuple[int, int], Path] = {}
    for f in files:
        try:
            sizes.setdefault(inspect_image(f), f)
        except SkipImage as exc:
            raise ValueError(f"{what}: {f} is not a readable image ({exc}); remove or replace it") from None
    if len(sizes) > 1:
        (a, fa), (b, fb) = list(sizes.items())[:2]
        raise ValueError(f"{what}: the images differ in size ({fa.name} {a[1]}x{a[0]}, {fb.name} {b[1]}x{b[0]}): "
                         "a run's images are judged together; resize them to one size first")


def validate(cfg: DictConfig) -> EvalPlan:
    """Every check of an eval run that needs no metric weights, each error naming the parameter or file."""
    if not cfg.get("images"):
        raise ValueError("images is not set: give a folder of images or a run folder of run.py (images=DIR)")
    source = Path(str(cfg.images)).expanduser()
    if not source.is_dir():
        raise (NotADirectoryError if source.exists() else FileNotFoundError)(
            f"images={str(cfg.images)!r} is {'a file' if source.exists() else 'missing'}: give a folder of images "
            "or a run folder of run.py")
    out_dir = run_dir()
    if out_dir.resolve() == source.resolve():
        raise ValueError(f"the eval run's folder is the judged folder {str(source)!r}: its files are never "
                         "overwritten; leave hydra.run.dir unset for a fresh folder")
    files, is_run = judged_files(source)
    if not files:
        raise ValueError(f"images={str(cfg.images)!r} holds no image (.png/.jpg/.jpeg/.webp/.bmp, searched "
                         "recursively)")
    check_images(files, f"images={str(cfg.images)!r}")
    caption_ext = check_caption_ext(cfg.get("caption_ext"))
    rows = read_metadata(source.resolve(), cfg.get("metadata"))
    prompts = [image_prompt(f, caption_ext, rows.get(f.resolve(), {})) for f in files]
    need = metrics_needing_prompts(cfg.get("metrics"))
    missing = [f for f, p in zip(files, prompts) if p is None]
    if need and missing:
        raise ValueError(f"metrics {', '.join(need)} judge images against their prompts, but {len(missing)} of "
                         f"{len(files)} images have none (first: {missing[0]}): give PNGs with a 'prompt' text "
                         f"chunk (as run.py writes), a {caption_ext} caption beside each image or a "
                         f"{cfg.get('metadata')} file, or drop those metrics")
    check_logger(cfg)
    return EvalPlan(source=source, is_run=is_run, files=files, prompts=prompts, out_dir=out_dir)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists already; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Judge the images of ``cfg.images`` with ``cfg.metrics``; write and return the metrics."""
    plan = validate(cfg)
    apply_runtime_settings(cfg)
    judge = instantiate(cfg.metrics) if cfg.get("metrics") is not None else None
    images = torch.stack([image_to_tensor(read_image(f)) for f in plan.files])
    metrics: dict[str, Any] = {"images": len(plan.files), "source": str(plan.source.resolve()),
                               "source_kind": "run" if plan.is_run else "folder"}
    if judge is not None:
        judged = judge(images, [p or "" for p in plan.prompts])
        log.info("image metrics: %s", ", ".join(f"{k} {v:.4g}" for k, v in judged.items()))
        metrics.update(judged)
    if plan.is_run and (plan.source / "metrics.json").is_file():
        metrics["judged_run"] = json.loads((plan.source / "metrics.json").read_text())
    write_metrics(plan.out_dir / "metrics.json", metrics)
    log.info("judged %d images of %s; wrote %s", len(plan.files), plan.source, plan.out_dir / "metrics.json")
    for logger in make_logger(cfg, plan.out_dir):
        try:
            logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            logger.finalize("success")  # CSV / TensorBoard write their files
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.finish()  # one W&B run per eval job (each job of a multirun gets its own)
        except Exception as exc:  # noqa: BLE001 - a logger must never fail the run
            log.warning("logging to %s failed: %s", type(logger).__name__, exc)
    return metrics
