"""The run folder's ``metrics.csv``, continued (not replaced) when a run is resumed."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def _step(row: dict[str, str]) -> float | None:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return None


def _before_checkpoint(row: dict[str, str], step: int) -> bool:
    """Whether ``row`` was logged before the checkpoint at optimizer step ``step`` was written.

    Lightning logs a batch's metrics (``self.log``; such rows carry ``epoch``) at the number of
    optimizer steps *before* that batch, so its row at ``step`` belongs to the batch after the
    checkpoint; rows logged directly by callbacks after step ``step`` (``val/loss``) come before it.
    """
    s = _step(row)
    return s is None or s < step or (s == step and not row.get("epoch"))


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept and appended to
    (Lightning's deletes it). With ``keep_until_step`` (the step of the checkpoint a run resumes
    from) the rows the interrupted session logged after that checkpoint are dropped: the resumed
    run logs them again, so the file reads as one uninterrupted run."""

    def __init__(self, log_dir: str, keep_until_step: int | None = None):
        self.keep_until_step = keep_until_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__: here, load instead of delete
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), list(reader.fieldnames or [])
        self.metrics_keys = sorted(header)
        if self.keep_until_step is None:
            return
        kept = [r for r in rows if _before_checkpoint(r, self.keep_until_step)]
        if len(kept) == len(rows):
            return
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)


class AppendingCSVLogger(CSVLogger):
    """``metrics.csv`` directly in ``save_dir`` (the run folder), continued across resumes;
    ``resume_step``: the step of the checkpoint the run continues from (see :class:`AppendingWriter`)."""

    def __init__(self, save_dir: str | Path, resume_step: int | None = None, **kwargs: Any):
        super().__init__(save_dir=save_dir, name="", version="", **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(self.log_dir, self.resume_step)
        return self._experiment
