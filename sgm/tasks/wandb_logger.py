"""A W&B logger that never blocks or fails a run: offline without credentials."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def make_wandb_logger(project: str = "sgm", save_dir: str = ".", mode: str = "auto", name: str | None = None,
                      group: str | None = None, job_type: str | None = None, tags: list[str] | None = None,
                      run_config: dict | None = None) -> Any:
    """A Lightning ``WandbLogger``; ``mode`` auto = online with credentials, else offline.

    Returns None (with a warning) if wandb cannot start: logging must not cost the run.
    """
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
    if mode == "disabled":
        return None
    try:
        from lightning.pytorch.loggers import WandbLogger

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        import wandb

        return WandbLogger(project=project, save_dir=save_dir, offline=(mode == "offline"), name=name, group=group,
                           job_type=job_type, tags=tags, config=run_config,
                           settings=wandb.Settings(init_timeout=60, silent=True))
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B logger unavailable (%s); continuing without it", exc)
        return None


def finish_wandb(trainer: Any) -> None:
    """Close the job's W&B run (rank 0), so that each job of a multirun gets its own run."""
    if not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                lg.experiment.finish()
            except Exception as exc:  # noqa: BLE001 - W&B must never fail the run
                log.warning("could not close the W&B run: %s", exc)
