"""The engines of a sampling run, built and prepared, and kept for the next job of a multirun (``reuse_engine``).

Hydra's basic launcher runs a multirun's jobs one after another in one process, each a call of
:func:`sgm.tasks.sample.run`. With ``reuse_engine`` on (``auto``: in MULTIRUN mode) the last
prepared engine of each role (``model``: built, LoRA merged, patches set, compiled; ``refiner``;
``weak``: autoguidance's weak model) stays loaded, under a key of everything that determined
it: the resolved model node, the ``weights`` node with the checkpoint file's path, size and
mtime (the seed for random weights), the LoRA files (path, size, mtime) and strengths,
``patches``, ``compile`` and the Trainer's precision and devices. The next job takes it when its
key is equal; otherwise the old one is dropped before the new one is built (one engine per role
at a time), and a role the job does not use is dropped too. What a run sets on an engine is
cleared on reuse (:meth:`sgm.engine.DiffusionEngine.clear_run_state`); prompt options and the
sampler are set by every run, so a reused engine samples exactly what a fresh one does.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import common  # its builders looked up at call time (tests replace them to catch a weight read)
from .console import CONSOLE

if TYPE_CHECKING:
    from ..engine import DiffusionEngine

log = logging.getLogger(__name__)

REUSE_VALUES = ("auto", True, False)
TRAINER_KEYS = ("accelerator", "devices", "strategy", "precision")  # what Trainer.predict may do to the module
DEPENDENTS = {"model": ("weak",)}  # the weak engine shares the model's conditioner and first stage

Key = dict[str, str]


@dataclasses.dataclass
class Slot:
    key: Key
    engine: Any


_SLOTS: dict[str, Slot] = {}  # role -> the loaded engine; one per role, this process's


def check_reuse_engine(value: Any) -> bool:
    """``reuse_engine`` (auto | true | false) as whether this job may reuse: ``auto`` is on in a
    Hydra multirun (``-m``) only, where the jobs of one process share a model."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    raise ValueError(f"reuse_engine must be auto (keep the loaded model between the jobs of a multirun), true or "
                     f"false, got {value!r}")


def loaded(role: str) -> Any:
    """The engine kept for ``role`` (None when there is none)."""
    slot = _SLOTS.get(role)
    return slot.engine if slot is not None else None


def drop(role: str) -> None:
    """Forget the engine of ``role`` (and those that share its parts) and free its memory."""
    roles = [r for r in (role, *DEPENDENTS.get(role, ())) if r in _SLOTS]
    for r in roles:
        del _SLOTS[r]
    if roles:
        gc.collect()  # the old Trainer and the engine reference each other
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def clear() -> None:
    """Forget every kept engine."""
    for role in list(_SLOTS):
        drop(role)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def file_stamp(path: str | Path) -> dict[str, Any]:
    """A file as a key part: its resolved path, size and modification time (a rewritten file is another)."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def weights_part(weights: Any, seed: int) -> dict[str, Any]:
    """The ``weights`` node plus what it points at: the checkpoint's stamp, or the seed of random weights."""
    node = _plain(weights) or {}
    checkpoint = node.get("checkpoint")
    return {"node": node, **({"file": file_stamp(checkpoint)} if checkpoint else {"seed": seed})}


def make_key(**parts: Any) -> Key:
    """A key: each part as canonical JSON (config nodes resolved), so parts compare by value."""
    return {name: json.dumps(_plain(value), sort_keys=True, default=str) for name, value in parts.items()}


def trainer_part(cfg: DictConfig) -> dict[str, Any]:
    trainer = cfg.get("trainer") or {}
    return {k: _plain(trainer.get(k)) for k in TRAINER_KEYS}


def model_key(cfg: DictConfig, plan: Any) -> Key:
    """The key of the prepared main engine (:func:`model_engine`)."""
    lora = [{"file": file_stamp(f), "strength": s} for f, s in zip(plan.lora_files, plan.lora_strengths)]
    return make_key(model=cfg.model, weights=weights_part(cfg.get("weights"), plan.seed), lora=lora,
                    patches=cfg.get("patches"), compile=dataclasses.asdict(plan.compile), trainer=trainer_part(cfg))


def refiner_key(cfg: DictConfig, plan: Any) -> Key:
    return make_key(model=cfg.refiner, weights=weights_part(cfg.get("refiner_weights"), plan.seed),
                    compile=dataclasses.asdict(plan.compile), trainer=trainer_part(cfg))


def weak_key(cfg: DictConfig, plan: Any) -> Key:
    return make_key(model=cfg.weak_model, weights=weights_part(cfg.get("weak_weights"), plan.seed + 1),
                    main=model_key(cfg, plan))


def cached(role: str, key: Key, reuse: bool, build: Callable[[], DiffusionEngine]) -> DiffusionEngine:
    """The engine of ``role`` for ``key``: the kept one when ``reuse`` and its key is equal (its run
    state cleared), else a new one from ``build`` (kept when ``reuse``; any other dropped first)."""
    slot = _SLOTS.get(role)
    if reuse and slot is not None and slot.key == key:
        job = HydraConfig.get().job.num if HydraConfig.initialized() else 0
        log.info("reusing the loaded %s (job %s)", role, job, extra=CONSOLE)
        slot.engine.clear_run_state()
        return slot.engine
    if slot is not None:
        if reuse:
            changed = ", ".join(k for k in key if slot.key.get(k) != key[k])
            log.info("reuse_engine: the %s's %s changed since the last job: building it again", role, changed)
        drop(role)
    start = time.perf_counter()
    engine = build()
    log.info("%s built in %.2f s", role, time.perf_counter() - start)
    if reuse:
        _SLOTS[role] = Slot(key, engine)
    return engine


def model_engine(cfg: DictConfig, plan: Any) -> DiffusionEngine:
    """The run's main engine: built, its LoRA files merged, ``patches`` set and ``compile`` applied
    (after LoRA merges and patches: fused weights are made of the final ones)."""

    def build() -> DiffusionEngine:
        engine = common.build_engine(cfg.model, cfg.get("weights"), seed=plan.seed)
        if plan.lora_files:
            from ..lora import load_lora_files

            load_lora_files(engine, plan.lora_files, plan.lora_strengths)
        if plan.patches:
            from ..networks.patches import apply_patches

            log.info("network patches: %s", apply_patches(engine, plan.patches))
        return _compiled(engine, plan)

    return cached("model", model_key(cfg, plan) if plan.reuse_engine else {}, plan.reuse_engine, build)


def refiner_engine(cfg: DictConfig, plan: Any) -> DiffusionEngine | None:
    """The refiner (None without one: a kept refiner is dropped), with the run's prompt options."""
    if cfg.get("refiner") is None:
        drop("refiner")
        return None

    def build() -> DiffusionEngine:
        refiner = common.build_engine(cfg.refiner, cfg.get("refiner_weights"), seed=plan.seed, what="refiner")
        return _compiled(refiner, plan)

    key = refiner_key(cfg, plan) if plan.reuse_engine else {}
    refiner = cached("refiner", key, plan.reuse_engine, build)
    refiner.set_prompt_options(plan.prompt_options)
    return refiner


def weak_engine(cfg: DictConfig, plan: Any, main: DiffusionEngine) -> DiffusionEngine | None:
    """Autoguidance's weak engine when the guider wants one (None otherwise: a kept one is dropped),
    seeded apart from the main model, so a random weak UNet of its shape is another one."""
    if not plan.weak_model:
        drop("weak")
        return None

    def build() -> DiffusionEngine:
        weak = common.build_weak_engine(cfg.weak_model, cfg.get("weak_weights"), main, seed=plan.seed + 1)
        log.info("autoguidance: weak UNet with %d parameters", sum(p.numel() for p in weak.model.parameters()))
        return weak

    return cached("weak", weak_key(cfg, plan) if plan.reuse_engine else {}, plan.reuse_engine, build)


def _compiled(engine: DiffusionEngine, plan: Any) -> DiffusionEngine:
    if plan.compile.active:
        from ..networks.compile import apply_compile

        log.info("compile: %s", apply_compile(engine, plan.compile))
    return engine
