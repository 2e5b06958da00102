"""Writes what Trainer.predict produces: one PNG per image, a grid, metrics.json, W&B media.

Each image's PNG holds its prompt, negative prompt, seed and the run's provenance (versions, the
resolved config) as iTXt chunks, and, given the run's ``parameters`` fields, AUTOMATIC1111's
``parameters`` text (:mod:`sgm.tasks.a1111`) that image browsers and civitai read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..checkpoint import default_file_mode
from .a1111 import format_parameters
from .console import CONSOLE

log = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, 3]."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def make_grid(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] with ``columns`` columns and a white gap."""
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + col * (w + gap)
        grid[y : y + h, x : x + w] = img
    return grid


def save_png_once(path: Path, image: np.ndarray, text: dict[str, str]) -> bool:
    """Write ``path`` atomically unless it exists (returns False then: nothing is overwritten)."""
    info = PngInfo()
    for key, value in text.items():  # the web UI writes its infotext as tEXt (iTXt beyond Latin-1)
        (info.add_text if key == "parameters" else info.add_itxt)(key, str(value))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.chmod(tmp, default_file_mode())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


class ImageWriter(BasePredictionWriter):
    """Per-batch PNG writing on every rank; grid, metrics.json and W&B logging on rank 0."""

    def __init__(self, out_dir: str | Path, total_images: int, provenance: dict[str, str], grid_columns: int = 8,
                 extra_metrics: dict[str, Any] | None = None,
                 image_metrics: Callable[[torch.Tensor, list[str]], dict[str, float]] | None = None,
                 parameters: dict[str, str | None] | None = None):
        super().__init__(write_interval="batch")
        self.parameters = parameters
        self.image_metrics = image_metrics
        self.out_dir = Path(out_dir)
        self.total_images = total_images
        self.provenance = provenance
        self.grid_columns = grid_columns
        # plain values for metrics.json (Hydra hands a run's dict over as a DictConfig)
        self.extra_metrics = (OmegaConf.to_container(extra_metrics) if OmegaConf.is_config(extra_metrics)
                              else dict(extra_metrics or {}))
        self.seconds = 0.0
        self.nfe_per_batch: list[int] = []
        self.written = 0
        self.metrics: dict[str, Any] = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.seconds += prediction["seconds"]
        self.nfe_per_batch.append(prediction["nfe"])
        for img, index, seed, prompt, neg in zip(to_uint8(prediction["images"]), prediction["index"],
                                                 prediction["seed"], prediction["prompt"], prediction["negative_prompt"]):
            text = {"prompt": prompt, "negative_prompt": neg, "seed": str(seed), **self.provenance}
            if self.parameters is not None:
                text["parameters"] = format_parameters(prompt, neg, {**self.parameters, "Seed": str(seed)})
            self.written += save_png_once(self.out_dir / f"{int(index):05d}.png", img, text)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = torch.tensor([self.seconds, float(sum(self.nfe_per_batch)), float(len(self.nfe_per_batch))],
                              dtype=torch.float64, device=pl_module.device)
        gathered = trainer.strategy.all_gather(totals)
        if gathered.ndim == 2:  # [world, 3]
            seconds, nfe, batches = gathered[:, 0].max().item(), gathered[:, 1].sum().item(), gathered[:, 2].sum().item()
        else:
            seconds, nfe, batches = (v.item() for v in gathered)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return
        files = sorted(self.out_dir.glob("[0-9][0-9][0-9][0-9][0-9].png"))
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        grid = make_grid(images, self.grid_columns)
        save_png_once(self.out_dir / "grid.png", grid, self.provenance) or log.warning("grid.png exists; kept")
        self.metrics = {
            "images": len(files),
            "seconds": seconds,
            "seconds_per_image": seconds / max(1, self.total_images),
            "network_evaluations": int(nfe),
            "network_evaluations_per_batch": nfe / max(1.0, batches),
            **self.extra_metrics,
        }
        if self.image_metrics is not None and len(files):
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            prompts = [Image.open(f).text.get("prompt", "") for f in files]
            judged = self.image_metrics(x, prompts)
            log.info("image metrics: %s", ", ".join(f"{k} {v:.4g}" for k, v in judged.items()))
            self.metrics.update(judged)
        path = self.out_dir / "metrics.json"
        if path.exists():
            raise FileExistsError(f"{path} exists already; refusing to overwrite it")
        path.write_text(json.dumps(self.metrics, indent=2) + "\n")
        log.info("wrote %d images, grid.png and metrics.json to %s", len(files), self.out_dir, extra=CONSOLE)
        for logger in trainer.loggers:
            try:
                logger.log_metrics({k: v for k, v in self.metrics.items() if isinstance(v, (int, float))})
                if hasattr(logger, "log_image"):
                    logger.log_image(key="samples/grid", images=[Image.fromarray(grid)])
                    captions = [Image.open(f).text.get("prompt", "") for f in files[:64]]
                    logger.log_image(key="samples/images", images=[Image.open(f) for f in files[:64]], caption=captions)
            except Exception as exc:  # noqa: BLE001 - W&B must never fail the run
                log.warning("logging to %s failed: %s", type(logger).__name__, exc)
