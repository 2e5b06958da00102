"""The code behind run.py: build the engine (and refiner), then Trainer.predict over the prompts."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import sgm

from ..checkpoint import load_checkpoint, parse_dtype
from ..data.prompts import PromptDataModule, make_jobs, read_prompt_file
from ..engine import DiffusionEngine
from .wandb_logger import finish_wandb
from .writer import ImageWriter

log = logging.getLogger(__name__)

# keys of a model node that say how to load and sample it, not engine arguments
NON_ENGINE_KEYS = ("checkpoint", "weight_dtype", "noise_range", "H", "W", "default_prompts")


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


def engine_node(model_cfg: Any) -> dict:
    """A model node without the keys that configure loading and sampling (what Hydra may build)."""
    node = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    return {k: v for k, v in node.items() if k not in NON_ENGINE_KEYS}


def build_engine(model_cfg: DictConfig, seed: int = 0) -> DiffusionEngine:
    """Instantiate a model node; with ``checkpoint`` set, build on the meta device and load the file.

    ``weight_dtype`` (float32 / float16 / bfloat16) casts the weights; a VAE that is not
    fp16-safe stays float32 when the rest is float16.
    """
    node = OmegaConf.to_container(model_cfg, resolve=True)
    checkpoint, dtype = node.get("checkpoint"), parse_dtype(node.get("weight_dtype"))
    node = engine_node(node)
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"model.checkpoint {str(path)!r} does not exist")
        with torch.device("meta"):
            engine = instantiate(node)
        keep = ("first_stage_model.",) if dtype == torch.float16 and not engine.first_stage_fp16_safe else ()
        load_checkpoint(engine, path, dtype=dtype, keep_float32=keep)
        engine.to("cpu")  # no copy (the weights are on the CPU now); resets Lightning's device record
    else:
        torch.manual_seed(seed)
        engine = instantiate(node)
        if dtype is not None:  # weights only: the denoiser's sigma table stays float32
            vae_dtype = torch.float32 if dtype == torch.float16 and not engine.first_stage_fp16_safe else dtype
            engine.model.to(dtype)
            engine.conditioner.to(dtype)
            engine.first_stage_model.to(vae_dtype)
    return engine.eval()


def apply_runtime_settings(cfg: DictConfig) -> None:
    """Global switches: the attention backend and the number of CPU threads."""
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    if cfg.get("attention"):
        from ..networks.attention import set_attention_backend

        set_attention_backend(str(cfg.attention), force=True)


def check_size(model_cfg: DictConfig, height: int, width: int) -> None:
    """Fail before any model is built when H or W cannot map to whole latent pixels."""
    ch_mult = OmegaConf.select(model_cfg, "first_stage.ddconfig.ch_mult")
    factor = 2 ** (len(ch_mult) - 1) if ch_mult else 1
    if height < factor or width < factor or height % factor or width % factor:
        raise ValueError(f"H and W must be multiples of {factor} for this model, got {height}x{width}")


def provenance(cfg: DictConfig) -> dict[str, str]:
    import lightning

    return {"sgm": sgm.__version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": platform.python_version(), "config": OmegaConf.to_yaml(cfg, resolve=True)}


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


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def make_logger(cfg: DictConfig, out_dir: Path) -> Any:
    if cfg.get("logger") is None:
        return None
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).name if multirun else None
    name = f"{group}/{hc.job.num}" if multirun else out_dir.name
    factory = instantiate(cfg.logger, _partial_=True)  # partial: the run config must not be instantiated
    return factory(save_dir=str(out_dir), name=name, group=group, run_config=OmegaConf.to_container(cfg, resolve=True))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample every prompt with the configured model and sampler; return the metrics."""
    # validate everything cheap before building anything
    prompts = load_prompts(cfg)
    jobs = make_jobs(prompts, str(cfg.negative_prompt or ""), int(cfg.seed), int(cfg.num_images_per_prompt),
                     cfg.get("wildcards_dir"))
    sampler = instantiate(cfg.sampler)
    check_size(cfg.model, int(cfg.H), int(cfg.W))
    for f in (cfg.get("lora") or {}).get("files") or []:
        if not Path(f).is_file():
            raise FileNotFoundError(f"lora file {str(f)!r} does not exist")
    image_metrics = instantiate(cfg.metrics) if cfg.get("metrics") is not None else None
    out_dir = run_dir()
    init_image = load_init_image(cfg.init_image, int(cfg.H), int(cfg.W)) if cfg.get("init_image") else None

    apply_runtime_settings(cfg)
    engine = build_engine(cfg.model, seed=int(cfg.seed))
    engine.sampler = sampler
    lora = cfg.get("lora") or {}
    if lora.get("files"):
        from ..lora import load_lora_files

        strengths = list(lora.get("strengths") or [1.0] * len(lora.files))
        load_lora_files(engine, [str(f) for f in lora.files], [float(s) for s in strengths])
    refiner = None
    if cfg.get("refiner") is not None:
        refiner = build_engine(cfg.refiner, seed=int(cfg.seed))
    engine.configure_prediction(int(cfg.H), int(cfg.W), strength=float(cfg.strength), refiner=refiner,
                                refiner_switch=float(cfg.refiner_switch), aesthetic_score=float(cfg.aesthetic_score),
                                negative_aesthetic_score=float(cfg.negative_aesthetic_score))
    if init_image is not None:
        engine.set_init_image(init_image)
    log.info("sampler: %r", sampler)

    writer = ImageWriter(out_dir, len(jobs), provenance(cfg), int(cfg.grid_columns),
                         extra_metrics={"steps": int(cfg.steps), "sampler": type(sampler).__name__,
                                        "seed": int(cfg.seed), "H": int(cfg.H), "W": int(cfg.W)},
                         image_metrics=image_metrics)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[writer], logger=make_logger(cfg, out_dir) or False)
    trainer.predict(engine, datamodule=PromptDataModule(jobs, int(cfg.batch_size)), return_predictions=False)
    finish_wandb(trainer)
    return writer.metrics
