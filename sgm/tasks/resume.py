"""Resuming a training run: which checkpoint (the newest intact one), whether it belongs to this
run's config, and the command that continues an interrupted run.

* Every checkpoint of train.py holds the run's *identity* (:func:`run_identity`): a hash of the
  config nodes that decide what is trained (:data:`COMPARED`, less :data:`NOT_COMPARED`) and
  their YAML, written by :class:`sgm.tasks.callbacks.ConfigStamp`.
* :func:`find_resume` picks the checkpoint: ``resume=PATH`` that file (damaged: an error naming
  it; another config: a warning, as it was asked for by name), ``resume=auto`` this run folder's
  ``checkpoints/last.ckpt``, else, when that one is damaged, the newest intact ``step-*.ckpt``
  (by step), else nothing (a fresh start, with a warning). ``resume=auto`` refuses a checkpoint
  of another config (:class:`ResumeRefused`, with a key-level diff and the ways out).
* :class:`ResumeGuard` (a Hydra callback) makes that refusal before Hydra writes anything into
  the folder, so a refused run leaves the other run's ``.hydra`` record as it was.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..data.paths import existing_file

log = logging.getLogger(__name__)

CONFIG_HASH_KEY = "sgm_config_hash"
CONFIG_KEY = "sgm_config"
#: the config nodes that decide what a run trains: a checkpoint of another identity is not continued
COMPARED = ("seed", "model", "weights", "lora", "data", "loss", "optimizer", "lr_scheduler")
#: values that decide how long or how fast a run goes, not what it trains (values derived from them,
#: such as ``lr_scheduler.total_steps: ${trainer.max_steps}``, are left out too)
NOT_COMPARED = ("trainer.max_steps", "data.num_workers", "data.check_workers", "data.pin_memory", "data.full_check",
                "data.rank", "data.world_size", "data.cache_dir", "data.size_multiple", "data.val_batch_size")
_MASK = "<not compared>"
_ABSENT = object()
_STEP = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class RunIdentity:
    """What a run trains: ``config`` (YAML of the compared nodes) and its ``hash``."""

    hash: str
    config: str


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue: its file, step and the identity it was saved with (None: none kept)."""

    path: Path
    step: int
    identity: RunIdentity | None


class DamagedCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read (truncated, not a checkpoint); the message names it."""


class ResumeRefused(ValueError):
    """``resume=auto`` found a checkpoint of a run with another config."""


def _drop_masked(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_masked(v) for k, v in node.items() if v != _MASK}
    return node


def run_identity(cfg: DictConfig) -> RunIdentity:
    """The identity of a run config (resolved; see :data:`COMPARED` and :data:`NOT_COMPARED`)."""
    masked = copy.deepcopy(cfg)
    with read_write(masked), open_dict(masked):
        for key in NOT_COMPARED:
            if OmegaConf.select(masked, key, default=_ABSENT) is not _ABSENT:
                OmegaConf.update(masked, key, _MASK, merge=False)
    nodes = {}
    for key in COMPARED:
        if key in masked:
            value = masked[key]
            nodes[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    text = OmegaConf.to_yaml(OmegaConf.create(_drop_masked(nodes)), sort_keys=True)
    return RunIdentity(hashlib.sha256(text.encode()).hexdigest()[:16], text)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _shown(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_diff(saved: str, current: str, limit: int = 10) -> list[str]:
    """``key: saved -> current`` for each dotted key whose value differs between two identity YAMLs."""
    a = _flat(OmegaConf.to_container(OmegaConf.create(saved)))
    b = _flat(OmegaConf.to_container(OmegaConf.create(current)))
    lines = [f"{k}: {_shown(a.get(k, _ABSENT))} -> {_shown(b.get(k, _ABSENT))}"
             for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def read_resume_point(path: str | Path) -> ResumePoint:
    """Step and identity of a checkpoint, read without reading its tensors (memory-mapped);
    :class:`DamagedCheckpoint` names the file when it cannot be read."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - zip, pickle, EOF ...: the file is unusable
        raise DamagedCheckpoint(f"checkpoint {str(path)!r} is damaged (truncated or not a checkpoint: "
                                f"{type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise DamagedCheckpoint(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no global_step)")
    identity = None
    if ckpt.get(CONFIG_HASH_KEY):
        identity = RunIdentity(str(ckpt[CONFIG_HASH_KEY]), str(ckpt.get(CONFIG_KEY, "")))
    return ResumePoint(path, int(ckpt["global_step"]), identity)


def checkpoints_newest_first(folder: Path) -> list[Path]:
    """``last.ckpt``, then the ``step-*.ckpt`` files by step, highest first."""
    steps = []
    for p in folder.glob("step-*.ckpt"):
        m = _STEP.match(p.name)
        if m:
            steps.append((int(m.group(1)), p.name, p))
    last = folder / "last.ckpt"
    return ([last] if last.is_file() else []) + [p for _, _, p in sorted(steps, reverse=True)]


def differences(point: ResumePoint, identity: RunIdentity | None) -> list[str]:
    """How ``point``'s config differs from ``identity`` (key-level); empty when it is the same run
    (or either side has no record to compare)."""
    if identity is None or point.identity is None or point.identity.hash == identity.hash:
        return []
    return config_diff(point.identity.config, identity.config) or ["(equal values, other YAML)"]


def refusal(point: ResumePoint, diff: Sequence[str]) -> str:
    """The message of a refused ``resume=auto``: what differs and how to proceed."""
    folder = point.path.parent.parent
    return (f"resume=auto: {str(point.path)!r} (step {point.step}) belongs to a run with another config "
            f"(checkpoint -> now):\n  " + "\n  ".join(diff) +
            f"\nTo start a new run with this config, leave resume unset (a fresh folder) or set "
            f"hydra.run.dir=NEW_FOLDER. To continue that run, rerun with its config (its overrides: "
            f"{folder / '.hydra' / 'overrides.yaml'}), or pass resume={point.path} to continue it with "
            f"this config on purpose.")


def find_resume(resume: Any, out_dir: Path, identity: RunIdentity | None = None, warn: bool = True
                ) -> ResumePoint | None:
    """The checkpoint ``resume`` continues (see the module docstring); None: a fresh start.
    ``warn=False`` logs the fallbacks at debug level only (the Hydra guard's dry run)."""
    say = log.warning if warn else log.debug
    if resume in (None, "", "null", "None"):
        return None
    if str(resume) != "auto":
        path = existing_file(resume, "resume checkpoint", "checkpoint file", " (or use resume=auto)")
        try:
            point = read_resume_point(path)
        except DamagedCheckpoint as exc:
            others = [str(p) for p in checkpoints_newest_first(path.parent) if p != path][:3]
            hint = f"; other checkpoints there: {', '.join(others)}" if others else ""
            raise DamagedCheckpoint(f"resume: {exc}: pass another one, or resume=auto{hint}") from None
        diff = differences(point, identity)
        if diff:
            say("resume=%s was saved with another config (checkpoint -> now): %s; continuing it with this "
                "config, as asked", path, "; ".join(diff))
        return point
    folder = out_dir / "checkpoints"
    candidates = checkpoints_newest_first(folder)
    for i, path in enumerate(candidates):
        try:
            point = read_resume_point(path)
        except DamagedCheckpoint as exc:
            say("resume=auto: %s; trying the next newest checkpoint", exc)
            continue
        if i:
            say("resume=auto: continuing from %s (step %d), the newest intact checkpoint", path, point.step)
        diff = differences(point, identity)
        if diff:
            raise ResumeRefused(refusal(point, diff))
        if point.identity is None and identity is not None:
            say("resume=auto: %s was saved without a config record: cannot check that it belongs to this config",
                path)
        log.info("resume=auto: continuing %s (step %d)", path, point.step)
        return point
    if candidates:
        say("resume=auto: no intact checkpoint in %s (%d damaged): starting fresh", folder, len(candidates))
    else:
        log.info("resume=auto: no checkpoint in %s, starting fresh", folder)
    return None


def resume_command(overrides: Sequence[str], folder: Path) -> str:
    """The command line that continues the run in ``folder`` with the same ``overrides``."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("resume", "hydra.run.dir")]
    return " ".join(["python", "train.py", *map(shlex.quote, kept), shlex.quote(f"hydra.run.dir={folder}"),
                     "resume=auto"])


class ResumeRefusedExit(SystemExit):
    """:class:`ResumeRefused` as a Hydra callback raises it: exit status 1, the message on stderr."""


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    _Callback = object  # type: ignore[misc,assignment]


class ResumeGuard(_Callback):  # type: ignore[misc]
    """Hydra callback: a ``resume=auto`` run whose folder's checkpoint belongs to another config
    stops before Hydra writes into that folder (the task repeats the check in-process)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        if str(config.get("resume")) != "auto":
            return
        try:
            identity = run_identity(config)
        except Exception as exc:  # noqa: BLE001 - e.g. ${hydra:...} not resolvable yet: the task checks
            log.debug("resume guard: identity not computed before the run (%s)", exc)
            return
        try:
            find_resume("auto", Path(str(config.hydra.run.dir)), identity, warn=False)
        except ResumeRefused as exc:
            raise ResumeRefusedExit(f"{exc}\nNothing was written.") from None
