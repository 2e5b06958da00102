"""Run conventions of lightning-hydra-template (its ``extras``, ``tags``, ``debug`` and ``trainer``
groups), for run.py and train.py.

* :func:`check_conventions`: the checks of the validate step: ``tags``, the ``trainer`` device
  (``trainer=gpu`` without CUDA names ``trainer=cpu``), and a ``debug=`` config in a sweep.
* :func:`record_config`: the resolved config as a rich tree, always into the run folder's
  ``config_tree.log`` and, with ``print_config=true``, once through logging (rank 0 only).
"""

from __future__ import annotations

import datetime
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

MAX_TAG_LENGTH = 64  # W&B's limit (wandb.Settings: every tag 1 to 64 characters)
TREE_FILE = "config_tree.log"
#: the branches shown first (the template's print_order); the config's other keys follow in their order
TREE_ORDER = ("model", "weights", "data", "lora", "sampler", "guider", "discretization", "trainer", "logger",
              "callbacks")
TREE_WIDTH = 120


def check_tags(value: Any) -> list[str]:
    """``tags`` as a list of strings (a single word is one tag; null: none), each 1 to 64 characters
    as W&B takes them, duplicates dropped."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, int, float)) else value
    if not isinstance(items, (list, tuple, ListConfig)):
        raise ValueError(f"tags must be a list of words, e.g. tags=[dev,lora], got {value!r}")
    tags: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"tags[{i}] must be a word, got {item!r}: write tags=[dev,lora]")
        tag = str(item).strip()
        if not 1 <= len(tag) <= MAX_TAG_LENGTH:
            raise ValueError(f"tags[{i}] {tag!r} has {len(tag)} characters: a tag takes 1 to {MAX_TAG_LENGTH} "
                             "(W&B's limit); shorten or drop it")
        if tag not in tags:
            tags.append(tag)
    return tags


def check_trainer(node: Any) -> None:
    """The accelerator the ``trainer`` node asks for exists here (before any weight is read):
    ``trainer=gpu`` on a machine without CUDA names ``trainer=cpu``; more GPUs than there are too."""
    node = node or {}
    accelerator = str(node.get("accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"trainer.accelerator={accelerator} but this machine has no usable CUDA GPU (torch "
                             f"{torch.__version__}, {build}): use trainer=cpu (or trainer.accelerator=cpu)")
        devices, available = node.get("devices"), torch.cuda.device_count()
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > available:
            raise ValueError(f"trainer.devices={devices} but this machine has {available} CUDA GPU(s): use "
                             f"trainer.devices={available} (or trainer.devices=auto)")
    elif accelerator == "mps" and not torch.backends.mps.is_available():
        raise ValueError("trainer.accelerator=mps but Apple's MPS backend is not available here: use trainer=cpu")


def check_debug() -> str | None:
    """The ``debug`` config of the run (None: none); a debug config in a multirun is refused."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    name = hc.runtime.choices.get("debug")
    if name and hc.mode == RunMode.MULTIRUN:
        raise ValueError(f"debug={name} is for one run, not a sweep: drop -m/--multirun (or drop debug= for the "
                         "sweep)")
    return name


def check_conventions(cfg: DictConfig) -> list[str]:
    """The validate step's checks of ``debug``, ``trainer`` and ``tags``; returns the tags."""
    name = check_debug()
    check_trainer(cfg.get("trainer"))
    tags = check_tags(cfg.get("tags"))
    log.debug("debug=%s, tags %s", name, tags)
    return tags


def config_tree(cfg: DictConfig, order: Sequence[str] = TREE_ORDER) -> Any:
    """The resolved config as a ``rich.tree.Tree``: one branch per top-level node (``order`` first),
    its YAML beneath; top-level values as ``key: value`` leaves."""
    from rich.text import Text
    from rich.tree import Tree

    tree = Tree(Text("CONFIG"))
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        value = "???" if OmegaConf.is_missing(cfg, key) else cfg[key]  # cfg[key] resolves an interpolation
        if isinstance(value, (DictConfig, ListConfig)) and len(value):
            tree.add(Text(str(key))).add(Text(OmegaConf.to_yaml(value, resolve=True).rstrip()))
        else:
            tree.add(Text(OmegaConf.to_yaml({key: value}).rstrip()))
    return tree


def render(renderable: Any, width: int = TREE_WIDTH) -> str:
    """Plain text of a rich renderable (no colour codes: it goes to a file and through logging)."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False).print(renderable)
    return buffer.getvalue()


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def record_config(cfg: DictConfig, out_dir: Path | str) -> Path | None:
    """Rank 0: the config tree into ``out_dir/config_tree.log`` (a resumed run appends its own
    under a dated line, keeping the earlier ones) and, with ``print_config``, the same text through
    logging. Other ranks: nothing (None)."""
    if not _is_rank_zero():
        return None
    text = render(config_tree(cfg))
    path = Path(out_dir) / TREE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        if f.tell():
            f.write(f"\n--- {datetime.datetime.now():%Y-%m-%d %H:%M:%S}: the run continued with ---\n")
        f.write(text)
    if cfg.get("print_config"):
        log.info("config (also in %s):\n%s", path, text.rstrip())
    return path
