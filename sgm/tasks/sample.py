"""The code behind run.py: build the configured parts, sample every prompt, write the run folder."""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sgm

log = logging.getLogger(__name__)


def load_prompts(cfg: DictConfig) -> list[str]:
    """The run's prompts: ``prompt_file`` (one per line), else ``prompt``, else ``prompts``."""
    if cfg.get("prompt_file"):
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file {str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt_file {str(path)!r} has no prompts (one per line)")
        return prompts
    if cfg.get("prompt") is not None:
        return [str(cfg.prompt)]
    prompts = cfg.get("prompts")
    if not prompts:
        raise ValueError("no prompts: set prompt=..., prompts=[...] or prompt_file=PATH")
    return [str(p) for p in prompts]


def make_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one image with ``columns`` columns and a 2-pixel gap."""
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    gap = 2
    grid = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + col * (w + gap)
        grid[y : y + h, x : x + w] = img
    return grid


def provenance(cfg: DictConfig) -> dict[str, str]:
    return {
        "sgm": sgm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": OmegaConf.to_yaml(cfg, resolve=True),
    }


def _save_png(path: Path, image: np.ndarray, text: dict[str, str]) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists already; refusing to overwrite it")
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    Image.fromarray(image).save(path, pnginfo=info)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample all prompts with the configured model and sampler; return the metrics."""
    prompts = load_prompts(cfg)
    n_per = int(cfg.num_images_per_prompt)
    batch_size = int(cfg.batch_size)
    if n_per < 1 or batch_size < 1:
        raise ValueError("num_images_per_prompt and batch_size must be >= 1")
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    sampler = instantiate(cfg.sampler)
    model = instantiate(cfg.model)
    log.info("sampler: %r", sampler)

    jobs = [(p, i) for p in prompts for i in range(n_per)]
    seeds = [int(cfg.seed) + k for k in range(len(jobs))]
    meta = provenance(cfg)
    nfe = 0

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return model(x, sigma, cond)

    images = []
    start = time.perf_counter()
    for b0 in range(0, len(jobs), batch_size):
        batch = jobs[b0 : b0 + batch_size]
        batch_seeds = seeds[b0 : b0 + batch_size]
        noise = torch.stack([
            torch.randn(model.data_shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in batch_seeds
        ])
        cond = model.condition([p for p, _ in batch])
        uc = model.condition([str(cfg.negative_prompt)] * len(batch))
        generator = torch.Generator().manual_seed(batch_seeds[0])
        with torch.inference_mode():
            x = sampler(denoise, noise, cond, uc, generator=generator)
        images.append(model.to_images(x).numpy())
    seconds = time.perf_counter() - start
    images_np = np.concatenate(images)

    for k, ((prompt, _), seed, img) in enumerate(zip(jobs, seeds, images_np)):
        _save_png(out_dir / f"{k:05d}.png", img, {"prompt": prompt, "negative_prompt": str(cfg.negative_prompt),
                                                  "seed": str(seed), **meta})
    _save_png(out_dir / "grid.png", make_grid(images_np, int(cfg.grid_columns)), meta)

    metrics = {
        "images": len(jobs),
        "seconds": seconds,
        "seconds_per_image": seconds / len(jobs),
        "network_evaluations": nfe,
        "network_evaluations_per_batch": nfe / math.ceil(len(jobs) / batch_size),
        "steps": int(cfg.steps),
        "sampler": type(sampler).__name__,
        "seed": int(cfg.seed),
    }
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %d images, grid.png and metrics.json to %s", len(jobs), out_dir)
    return metrics
