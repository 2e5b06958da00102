"""The loggers beside W&B (``conf/logger/csv.yaml``, ``conf/logger/tensorboard.yaml``): Lightning's
CSVLogger and TensorBoardLogger writing into the run folder, the run's ``tags`` in their hparams.yaml.

Each factory takes, besides its config values, the run's own values that its signature names
(``save_dir``, ``tags``, ``resume_step``; see :func:`sgm.tasks.common.make_logger`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .csv_log import AppendingCSVLogger


def record_tags(logger: Any, tags: Sequence[str] | None) -> Any:
    """Write the run's tags into the logger's hyperparameters (hparams.yaml; TensorBoard's HPARAMS too)."""
    if tags:
        logger.log_hyperparams({"tags": list(tags)})
    return logger


def make_csv_logger(save_dir: str | Path, tags: Sequence[str] | None = None, resume_step: int | None = None,
                    flush_logs_every_n_steps: int = 100) -> AppendingCSVLogger:
    """``metrics.csv`` and ``hparams.yaml`` directly in the run folder; a resumed training run
    continues its metrics.csv (``resume_step``: the step of the checkpoint it continues from)."""
    logger = AppendingCSVLogger(save_dir, resume_step=resume_step, flush_logs_every_n_steps=flush_logs_every_n_steps)
    return record_tags(logger, tags)


def tensorboard_available() -> bool:
    """Whether Lightning's TensorBoardLogger can write: it needs ``tensorboard`` or ``tensorboardX``."""
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

    return bool(_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE)


def check_tensorboard(key: str = "logger.tensorboard") -> None:
    """Fail before any model is built when no TensorBoard writer is installed."""
    if not tensorboard_available():
        raise ModuleNotFoundError(f"{key} needs the tensorboardX (or tensorboard) package, which is not installed: "
                                  "pip install tensorboardX, or leave it out (e.g. logger=csv)")


def make_tensorboard_logger(save_dir: str | Path, tags: Sequence[str] | None = None, folder: str = "tensorboard",
                            prefix: str = "") -> Any:
    """Event files in ``save_dir/folder/`` (one folder per run: no ``version_N`` below it; a resumed
    run adds an event file beside the earlier ones); ``prefix`` goes before every metric name."""
    from lightning.pytorch.loggers import TensorBoardLogger

    check_tensorboard()
    logger = TensorBoardLogger(save_dir=str(save_dir), name=folder, version="", default_hp_metric=False, prefix=prefix)
    return record_tags(logger, tags)
