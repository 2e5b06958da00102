"""The code behind train.py: LoRA or full training of a DiffusionEngine with Trainer.fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..engine import DiffusionEngine
from .common import (apply_runtime_settings, build_engine, check_logger, check_size, check_weights, instantiate_callbacks,
                     make_logger, run_dir)
from .wandb_logger import finish_wandb

log = logging.getLogger(__name__)


def find_resume(resume: str | None, out_dir: Path) -> str | None:
    """``resume``: a checkpoint path, or ``auto`` = this run folder's last.ckpt, else the newest
    ``last.ckpt`` of earlier runs beside it; None when there is nothing to resume."""
    if not resume:
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise FileNotFoundError(f"resume checkpoint {resume!r} does not exist (or use resume=auto)")
        return str(resume)
    own = out_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return str(own)
    candidates = sorted(out_dir.parent.parent.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if candidates:
        log.info("resume=auto: continuing %s", candidates[-1])
        return str(candidates[-1])
    log.info("resume=auto: no earlier checkpoint, starting fresh")
    return None


def prepare_trainable(engine: DiffusionEngine, cfg: DictConfig) -> str:
    """Freeze the engine, then make trainable what the run trains: LoRA adapters, or the whole UNet."""
    engine.requires_grad_(False)
    if cfg.get("lora") is not None:
        from ..lora import inject_lora

        names = inject_lora(engine, instantiate(cfg.lora))
        log.info("LoRA on %d modules", len(names))
        mode = "lora"
    else:
        engine.model.diffusion_model.requires_grad_(True)
        mode = "full"
    engine.train()  # frozen embedders stay in eval mode (AbstractEmbModel.train)
    if cfg.get("gradient_checkpointing"):
        engine.model.diffusion_model.set_gradient_checkpointing(True)
    n_train = sum(p.numel() for p in engine.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in engine.parameters())
    log.info("training %s: %d of %d parameters (%.2f%%)", mode, n_train, n_all, 100 * n_train / max(1, n_all))
    return mode


def cache_encoder(engine: DiffusionEngine):
    """What ``cache_latents`` stores per item: the latent and both conditionings (c and uc)."""

    @torch.no_grad()
    def encode(batch: dict) -> dict[str, torch.Tensor]:
        x = engine.encode_first_stage(batch[engine.input_key].to(engine.device))
        keys = {k: (v.to(engine.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        c = engine.conditioner(keys)
        empty = [""] * len(keys["txt"])
        uc = engine.conditioning({**keys, "txt": empty}, engine.empty_captions(empty))
        out = {"latent": x.cpu()}
        for k in c:
            out[k], out[f"uc_{k}"] = c[k].cpu(), uc[k].cpu()
        return out

    return encode


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured engine on the configured data; return the final metrics."""
    check_size(cfg.model, cfg.H, cfg.W)
    check_weights(cfg.get("weights"))
    check_logger(cfg)
    apply_runtime_settings(cfg)
    out_dir = run_dir()
    resume = find_resume(cfg.get("resume"), out_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    engine = build_engine(cfg.model, cfg.get("weights"), seed=int(cfg.seed), loss_fn=cfg.loss,
                          optimizer=cfg.optimizer, lr_scheduler=cfg.get("lr_scheduler"))
    engine.train_seed = int(cfg.seed)
    mode = prepare_trainable(engine, cfg)
    if cfg.get("cache_latents"):
        if cfg.get("lora") is not None and cfg.lora.get("train_text_encoders"):
            raise ValueError("cache_latents=true caches the text encoders' outputs, so their LoRA could not "
                             "train: use cache_latents=false with lora=text_encoders")
        datamodule.setup("fit")
        import hashlib

        tag = hashlib.sha256(OmegaConf.to_yaml(cfg.model, resolve=True).encode()).hexdigest()[:16]
        datamodule.build_cache(cache_encoder(engine), tag=tag)  # another model: another cache

    callbacks = instantiate_callbacks(cfg.get("callbacks"), mode=mode, run_config=OmegaConf.to_yaml(cfg))
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(save_dir=out_dir, name="", version="")]  # metrics.csv in the run folder
    wandb_logger = make_logger(cfg, out_dir)
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, enable_checkpointing=True)
    trainer.fit(engine, datamodule=datamodule, ckpt_path=resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    finish_wandb(trainer)
    return metrics
