"""The Lightning data module of run.py's prompt jobs (kept apart from :mod:`sgm.data.prompts`,
whose checks run before Lightning is imported)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from .prompts import PromptJob, _Jobs, collate_jobs


class PromptDataModule(L.LightningDataModule):
    """Serves prompt jobs for ``Trainer.predict``; with DDP, Lightning's sampler splits them."""

    def __init__(self, jobs: list[PromptJob], batch_size: int = 4):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.jobs, self.batch_size = jobs, batch_size

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Jobs(self.jobs), batch_size=self.batch_size, shuffle=False, collate_fn=collate_jobs)
