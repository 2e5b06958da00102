"""The code behind train.py: LoRA or full training of a DiffusionEngine with Trainer.fit.

Order of work: everything that needs no weight file comes first, so that a bad input fails in
well under a second: the config values (sizes, numbers, the LoRA spec, conflicts), the data
module's arguments and callbacks, the resume checkpoint (intact? this run's config?), the
image folder scan. Only then is the engine built and its weights read.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ..checkpoint import parse_dtype
from ..diffusion._checks import check_bool, check_finite, check_int, check_positive
from ..engine import DiffusionEngine
from ..lora.spec import LoRASpec
from ..networks.sizes import config_pixel_multiple
from .callbacks import ConfigStamp
from .console import CONSOLE, model_name, quiet_libraries
from .progress import train_progress_bars
from .checkpoint_io import AtomicCheckpointIO
from .common import (apply_runtime_settings, build_engine, check_logger, check_size, check_weights, instantiate_callbacks,
                     logger_nodes, make_logger, run_dir)
from .csv_log import AppendingCSVLogger
from .debug import apply_overfit
from .extras import check_conventions, check_tags, record_config
from .loggers import make_csv_logger
from .resume import ResumePoint, find_resume, resume_command, run_identity
from .wandb_logger import finish_wandb, folder_run_id

log = logging.getLogger(__name__)


def _resolution(value: Any) -> tuple[Any, Any]:
    """``data.resolution`` (a size or [height, width]) as (height, width), unchecked."""
    if isinstance(value, (list, tuple, ListConfig)):
        if len(value) != 2:
            raise ValueError(f"data.resolution must be a size or [height, width], got {list(value)!r}")
        return value[0], value[1]
    return value, value


def lora_spec(node: Any) -> LoRASpec | None:
    """The run's :class:`LoRASpec` from its ``lora`` node (None: full training); errors name ``lora.*``."""
    if node is None:
        return None
    params = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    target = params.pop("_target_", "sgm.lora.LoRASpec")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, LoRASpec)):
        raise TypeError(f"lora._target_ {target!r} is not a LoRASpec")
    return cls.from_params(params)


def check_train_config(cfg: DictConfig) -> tuple[int, LoRASpec | None]:
    """Fail on a bad config value, naming it, before anything is built or read; returns the model's
    size multiple (VAE x UNet downsampling) and the LoRA spec (None: full training)."""
    check_size(cfg.model, cfg.H, cfg.W)
    check_size(cfg.model, *_resolution(cfg.data.get("resolution")), names=("data.resolution height", "width"))
    multiple = config_pixel_multiple(OmegaConf.to_container(cfg.model, resolve=True))
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ValueError("data.root is not set: give the folder of training images, data.root=DIR")
    check_int("trainer.max_steps", cfg.trainer.get("max_steps"))
    check_int("trainer.accumulate_grad_batches", cfg.trainer.get("accumulate_grad_batches", 1))
    if cfg.optimizer.get("lr") is not None:
        check_positive("optimizer.lr", cfg.optimizer.lr)
    decay = cfg.get("ema_decay")
    if decay is not None and not 0.0 < check_finite("ema_decay", decay) < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), e.g. 0.999 (or null for no EMA), got {decay!r}")
    check_int("checkpoint_every_n_steps", cfg.checkpoint_every_n_steps)
    check_int("keep_checkpoints", cfg.keep_checkpoints, minimum=-1)
    check_int("validation.every_n_steps", cfg.validation.every_n_steps, minimum=0)
    every = check_int("validation.sample_every_n_steps", cfg.validation.sample_every_n_steps, minimum=0)
    flags = {key: check_bool(key, OmegaConf.select(cfg, key, default=False))
             for key in ("gradient_checkpointing", "cache_latents", "validation.sample_at_first")}
    samples = bool(cfg.validation.get("prompts")) and (every > 0 or flags["validation.sample_at_first"])
    check_validation_seeds(cfg.validation.get("seeds"), samples)
    spec = lora_spec(cfg.get("lora"))
    check_output(cfg.get("output_name"), cfg.get("save_dtype"), lora=spec is not None)
    if cfg.get("cache_latents"):
        if spec is not None and spec.train_text_encoders:
            raise ValueError("cache_latents=true caches the text encoders' outputs, so their LoRA "
                             "(lora.train_text_encoders) could not train: use cache_latents=false with lora=text_encoders")
        if not cfg.data.get("cache_dir"):
            raise ValueError("cache_latents=true needs data.cache_dir=DIR, the folder that keeps the encodings")
    return multiple, spec


def check_validation_seeds(seeds: Any, samples: bool) -> list[int]:
    """``validation.seeds``: integers >= 0, each validation prompt sampled once per seed; one at least when the run
    ``samples`` (validation prompts and sample_every_n_steps or sample_at_first)."""
    values = [] if seeds is None else list(seeds) if isinstance(seeds, (list, tuple, ListConfig)) else [seeds]
    if samples and not values:
        raise ValueError("validation.seeds is empty: give at least one seed, e.g. validation.seeds=[0] (to sample no "
                         "images, set validation.sample_every_n_steps=0 validation.sample_at_first=false)")
    return [check_int(f"validation.seeds[{i}]", s, minimum=0) for i, s in enumerate(values)]


def check_output(name: Any, save_dtype: Any, lora: bool) -> None:
    """``output_name``: a ``.safetensors`` file name, written in the run folder (no folder of its own, so the final
    file cannot land outside the run); ``save_dtype``: a dtype name, set only for full training (a LoRA file keeps
    the trained dtype), so that a bad value fails now and not after the last training step."""
    text = str(name or "")
    if not text or Path(text).name != text:  # "." has no name; ".." fails the suffix rule below
        raise ValueError(f"output_name must be a file name such as lora.safetensors, got {name!r}: the file is "
                         "written in the run folder (choose that with hydra.run.dir=DIR)")
    if not text.lower().endswith(".safetensors"):
        raise ValueError(f"output_name {text!r} must end in .safetensors: the final weights are a safetensors file, "
                         "and diffusers, ComfyUI and kohya's tools pick the reader by that suffix")
    try:
        parse_dtype(save_dtype)
    except ValueError as exc:
        raise ValueError(f"save_dtype: {exc}") from None
    if lora and save_dtype is not None:
        raise ValueError(f"save_dtype={save_dtype} sets the dtype of a full-training checkpoint (~lora); a LoRA file "
                         "keeps the dtype its adapters trained in: remove save_dtype, or train the whole UNet with ~lora")


@contextlib.contextmanager
def named_errors(prefix: str, node: Mapping) -> Iterator[None]:
    """Re-raise an error of the code built from config ``node`` with the node's name: a message that
    starts with one of its keys (``batch_size must be ...``) becomes ``prefix.batch_size must be ...``."""
    try:
        yield
    except (InstantiationException, ValueError, TypeError, OSError, RuntimeError) as exc:
        err = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ is not None else exc
        text = str(err)
        text = f"{prefix}.{text}" if text.split(" ", 1)[0] in node else f"{prefix}: {text}"
        try:
            renamed = type(err)(text)
        except Exception:  # noqa: BLE001 - an exception type that takes other arguments
            renamed = RuntimeError(text)
        raise renamed from None


def build_datamodule(node: DictConfig, size_multiple: int) -> L.LightningDataModule:
    """The data module of the ``data`` node, given the model's size multiple where it takes one."""
    extra = {"size_multiple": size_multiple} if "size_multiple" in node else {}
    with named_errors("data", node):
        return instantiate(node, **extra)


def scan_data(datamodule: L.LightningDataModule, node: DictConfig) -> None:
    """The data module's folder scan and checks (``setup("fit")``), done before any weights are read."""
    with named_errors("data", node):
        datamodule.setup("fit")


def prepare_trainable(engine: DiffusionEngine, cfg: DictConfig, spec: LoRASpec | None) -> str:
    """Freeze the engine, then make trainable what the run trains: LoRA adapters (``spec``), or the whole UNet."""
    engine.requires_grad_(False)
    if spec is not None:
        from ..lora import inject_lora

        names = inject_lora(engine, spec)
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


def wandb_resume_settings(cfg: DictConfig, out_dir: Path) -> None:
    """The W&B logger continues the run folder's W&B run (its id is kept in the folder)."""
    for node in logger_nodes(cfg).values():
        if str(node._target_).endswith("make_wandb_logger"):
            with open_dict(cfg):
                node.id = folder_run_id(out_dir)
                node.resume = "allow"


def make_trainer(cfg: DictConfig, callbacks: list, out_dir: Path, point: ResumePoint | None) -> L.Trainer:
    """The Trainer: metrics.csv continued in the run folder (always; ``logger=csv`` sets its options),
    the W&B run continued, the other loggers of the ``logger`` group, atomic checkpoints."""
    resume_step, loggers = point.step if point else None, []
    if not cfg.trainer.get("fast_dev_run"):  # which gets Lightning's DummyLogger in place of any: make none
        wandb_resume_settings(cfg, out_dir)
        loggers = make_logger(cfg, out_dir, resume_step=resume_step)
        if not any(isinstance(lg, AppendingCSVLogger) for lg in loggers):
            loggers.insert(0, make_csv_logger(out_dir, tags=check_tags(cfg.get("tags")), resume_step=resume_step))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, enable_checkpointing=True,
                       plugins=[AtomicCheckpointIO()])


def _interrupted(trainer: L.Trainer, out_dir: Path) -> None:
    """Say how an interrupted run continues."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    log.warning("training interrupted at step %d (run folder %s). Continue it with:\n  %s", trainer.global_step,
                out_dir, resume_command(overrides, out_dir))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured engine on the configured data; return the final metrics."""
    apply_overfit(cfg)
    multiple, spec = check_train_config(cfg)
    check_weights(cfg.get("weights"))
    check_logger(cfg)
    check_conventions(cfg)
    apply_runtime_settings(cfg)
    quiet_libraries()
    out_dir = run_dir()
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = build_datamodule(cfg.data, multiple)
    mode = "lora" if spec is not None else "full"
    callbacks = instantiate_callbacks(cfg.get("callbacks"), mode=mode, run_config=OmegaConf.to_yaml(cfg))
    identity = run_identity(cfg)
    callbacks.append(ConfigStamp(identity.hash, identity.config))
    callbacks += train_progress_bars(bool(cfg.trainer.get("enable_progress_bar", True)))
    point = find_resume(cfg.get("resume"), out_dir, identity)
    scan_data(datamodule, cfg.data)  # the folder scan, before any weight file is read
    record_config(cfg, out_dir)

    engine = build_engine(cfg.model, cfg.get("weights"), seed=int(cfg.seed), loss_fn=cfg.loss,
                          optimizer=cfg.optimizer, lr_scheduler=cfg.get("lr_scheduler"))
    engine.train_seed = int(cfg.seed)
    prepare_trainable(engine, cfg, spec)
    if cfg.get("cache_latents"):
        import hashlib

        tag = hashlib.sha256(OmegaConf.to_yaml(cfg.model, resolve=True).encode()).hexdigest()[:16]
        datamodule.build_cache(cache_encoder(engine), tag=tag)  # another model: another cache

    trainer = make_trainer(cfg, callbacks, out_dir, point)
    log.info("training model=%s (%s) on %s for %s steps -> %s", model_name(), mode, cfg.data.root,
             cfg.trainer.get("max_steps"), out_dir, extra=CONSOLE)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(engine, datamodule=datamodule, ckpt_path=str(point.path) if point else None)
    except SystemExit:
        if trainer.interrupted:  # Ctrl-C: the callbacks wrote last.ckpt and the weights so far
            _interrupted(trainer, out_dir)
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C from its first one on
        finish_wandb(trainer)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
