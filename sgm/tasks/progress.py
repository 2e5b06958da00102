"""train.py's progress bar: Lightning's rich bar labelled with the step, not ``Epoch 16/-2``.

train.py stops at ``max_steps`` with ``max_epochs=-1`` (unbounded); Lightning's
:class:`~lightning.pytorch.callbacks.RichProgressBar` labels its bar ``Epoch {epoch}/{max_epochs - 1}``,
which then reads ``Epoch 16/-2``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class StepProgressBar(RichProgressBar):
    """The rich bar with ``step S/max_steps, epoch E`` as the training description."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        return f"step {trainer.global_step}/{trainer.max_steps}, epoch {current_epoch}"


def train_progress_bars(progress: bool) -> list[Any]:
    """The progress-bar callback a training Trainer gets: :class:`StepProgressBar` when bars are
    on and ``rich`` is installed; else none (Lightning's own, or no bar with ``progress=false``)."""
    return [StepProgressBar()] if progress and _RICH_AVAILABLE else []
