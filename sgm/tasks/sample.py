"""The code behind run.py: check the config, build the engine (and refiner), Trainer.predict over the prompts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from ..diffusion._checks import check_int
from ..data.prompts import PromptDataModule, make_jobs, read_prompt_file
from .common import (apply_runtime_settings, build_engine, check_logger, check_size, check_weights, instantiate_callbacks,
                     make_logger, provenance, run_dir)
from .wandb_logger import finish_wandb

log = logging.getLogger(__name__)


def load_prompts(cfg: DictConfig) -> list[str]:
    """The run's prompts: ``prompt_file`` (one per line), else ``prompt``, else ``prompts``."""
    if cfg.get("prompt_file"):
        return read_prompt_file(cfg.prompt_file)
    if cfg.get("prompt") is not None:
        return [str(cfg.prompt)]
    prompts = cfg.get("prompts")
    if not prompts:
        raise ValueError("no prompts: set prompt=..., prompts=[...] or prompt_file=PATH")
    return [str(p) for p in prompts]


def load_init_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file as a [1, 3, H, W] tensor in [-1, 1], resized to the output size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    except OSError as exc:
        raise ValueError(f"init_image {str(path)!r} is not a readable image: {exc}") from exc
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample every prompt with the configured model and sampler; return the metrics."""
    # validate everything cheap before building anything
    prompts = load_prompts(cfg)
    jobs = make_jobs(prompts, str(cfg.negative_prompt or ""), int(cfg.seed), int(cfg.num_images_per_prompt),
                     cfg.get("wildcards_dir"))
    H, W = check_size(cfg.model, cfg.H, cfg.W)
    check_int("steps", cfg.steps)
    check_weights(cfg.get("weights"))
    check_logger(cfg)
    sampler = instantiate(cfg.sampler)
    discretization = instantiate(cfg.discretization)
    for f in (cfg.get("lora") or {}).get("files") or []:
        if not Path(f).is_file():
            raise FileNotFoundError(f"lora file {str(f)!r} does not exist")
    if cfg.get("refiner") is not None:
        check_size(cfg.refiner, H, W)
        check_weights(cfg.get("refiner_weights"), "refiner")
    patches = instantiate(cfg.patches) if cfg.get("patches") else None  # FreeU: the base model only
    image_metrics = instantiate(cfg.metrics) if cfg.get("metrics") is not None else None
    out_dir = run_dir()
    init_image = load_init_image(cfg.init_image, H, W) if cfg.get("init_image") else None

    apply_runtime_settings(cfg)
    engine = build_engine(cfg.model, cfg.get("weights"), seed=int(cfg.seed))
    lora = cfg.get("lora") or {}
    if lora.get("files"):
        from ..lora import load_lora_files

        strengths = list(lora.get("strengths") or [1.0] * len(lora.files))
        load_lora_files(engine, [str(f) for f in lora.files], [float(s) for s in strengths])
    if patches:
        from ..networks.patches import apply_patches

        log.info("network patches: %s", apply_patches(engine, patches))
    refiner = None
    if cfg.get("refiner") is not None:
        refiner = build_engine(cfg.refiner, cfg.get("refiner_weights"), seed=int(cfg.seed), what="refiner")
    engine.configure_prediction(H, W, engine.schedule(discretization, int(cfg.steps)), sampler,
                                strength=float(cfg.strength), img2img_schedule=str(cfg.img2img_schedule),
                                refiner=refiner, refiner_switch=float(cfg.refiner_switch),
                                aesthetic_score=float(cfg.aesthetic_score),
                                negative_aesthetic_score=float(cfg.negative_aesthetic_score))
    if init_image is not None:
        engine.set_init_image(init_image)
    log.info("sampler: %r, schedule: %r, %d steps", sampler, discretization, int(cfg.steps))

    callbacks = instantiate_callbacks(
        cfg.get("callbacks"), total_images=len(jobs), provenance=provenance(cfg), image_metrics=image_metrics,
        extra_metrics={"steps": int(cfg.steps), "sampler": type(sampler).__name__, "seed": int(cfg.seed),
                       "H": H, "W": W})
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=make_logger(cfg, out_dir) or False)
    trainer.predict(engine, datamodule=PromptDataModule(jobs, int(cfg.batch_size)), return_predictions=False)
    finish_wandb(trainer)
    writer = next((cb for cb in callbacks if hasattr(cb, "metrics")), None)
    return writer.metrics if writer is not None else {}
