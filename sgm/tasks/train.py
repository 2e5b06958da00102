"""The code behind train.py: LoRA or full training of a DiffusionEngine with Trainer.fit."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import save_checkpoint
from ..engine import DiffusionEngine
from .callbacks import EMAWeights, SampleImages, SaveFinalWeights, ValidationLoss
from .sample import apply_runtime_settings, build_engine, make_logger, run_dir
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


def _save_lora_file(engine, path, metadata):
    from ..lora import save_lora

    return save_lora(engine, path, metadata=metadata)


def _save_model_file(engine, path, metadata, dtype):
    return save_checkpoint(engine, path, metadata=metadata, dtype=dtype)


def save_final(mode: str, cfg: DictConfig):
    """The function (picklable, for DDP spawn) that writes the final weights: a kohya LoRA file,
    or in full training a single-file checkpoint in the original layout."""
    metadata = {"sgm_config": OmegaConf.to_yaml(cfg)}
    if mode == "lora":
        return functools.partial(_save_lora_file, metadata=metadata)
    return functools.partial(_save_model_file, metadata=metadata, dtype=cfg.get("save_dtype"))


def cache_encoder(engine: DiffusionEngine):
    """What ``cache_latents`` stores per item: the latent and both conditionings (c and uc)."""

    @torch.no_grad()
    def encode(batch: dict) -> dict[str, torch.Tensor]:
        x = engine.encode_first_stage(batch[engine.input_key].to(engine.device))
        keys = {k: (v.to(engine.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        c = engine.conditioner(keys)
        uc = engine.conditioner(keys, force_zero_embeddings=engine.uc_zero_keys) if engine.uc_zero_keys else \
            engine.conditioner({**keys, "txt": [""] * len(keys["txt"])})
        out = {"latent": x.cpu()}
        for k in c:
            out[k], out[f"uc_{k}"] = c[k].cpu(), uc[k].cpu()
        return out

    return encode


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured engine on the configured data; return the final metrics."""
    apply_runtime_settings(cfg)
    out_dir = run_dir()
    resume = find_resume(cfg.get("resume"), out_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    engine = build_engine(cfg.model, seed=int(cfg.seed))
    engine.loss_fn = instantiate(cfg.loss)
    engine.optimizer_factory = instantiate(cfg.optimizer)
    engine.lr_scheduler_factory = instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
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

    val = cfg.validation
    ema = EMAWeights(float(cfg.ema_decay)) if cfg.get("ema_decay") else None
    callbacks: list[L.Callback] = [*([ema] if ema else []),
        ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="step-{step:06d}", every_n_train_steps=int(cfg.checkpoint_every_n_steps),
                        save_top_k=int(cfg.keep_checkpoints), monitor="step", mode="max", save_last=True,
                        auto_insert_metric_name=False),
        SaveFinalWeights(out_dir / str(cfg.output_name), save_final(mode, cfg), ema=ema),
        ValidationLoss(int(val.every_n_steps)),
    ]
    if int(val.sample_every_n_steps) > 0 and val.prompts:
        callbacks.append(SampleImages(out_dir, val.prompts, val.seeds, int(val.sample_every_n_steps), int(cfg.model.H),
                                      int(cfg.model.W), int(val.steps), float(val.guidance_scale),
                                      OmegaConf.to_container(cfg.model.noise_range), ema=ema))
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
