"""A quiet console (issue 14): run.py shows what runs, the progress bar and where the results went;
Lightning's device lines and advert, W&B's warnings and library deprecations reach run.log only."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sgm.tasks.console import CONSOLE, ConsoleFilter, quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
       "OMP_NUM_THREADS": "1"}
BAR = re.compile(r"\d+/\d+ \[")  # a tqdm frame: "3/4 [00:01<00:00, ...]"


def record(name: str, level: int, **extra) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    rec.__dict__.update(extra)
    return rec


def test_console_filter_passes_warnings_and_marked_lines_only():
    keep = ConsoleFilter().filter
    assert keep(record("sgm.tasks.writer", logging.INFO, **CONSOLE))
    assert keep(record("sgm.tasks.sample", logging.WARNING)) and keep(record("lightning.pytorch", logging.ERROR))
    assert not keep(record("sgm.checkpoint", logging.INFO))
    assert not keep(record("lightning.pytorch.utilities.rank_zero", logging.INFO))
    assert not keep(record("py.warnings", logging.WARNING))  # library deprecations: run.log only


def test_quiet_libraries_removes_lightnings_console_handler():
    import lightning  # noqa: F401 - adds its StreamHandler to the "lightning" logger

    logger = logging.getLogger("lightning")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    quiet_libraries()
    assert handler not in logger.handlers and logger.propagate


def console_lines(text: str) -> list[str]:
    """The console's lines without the progress bar's frames (tqdm redraws with carriage returns)."""
    lines = []
    for line in text.splitlines():
        frames = [f for f in line.split("\r") if f.strip() and not BAR.search(f)]
        lines += frames
    return lines


@pytest.mark.slow
def test_run_py_console_has_three_lines_and_run_log_the_details(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "run.py", "steps=2", "prompts=[three, seven]", f"hydra.run.dir={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr
    lines = console_lines(res.stdout + res.stderr)
    assert len(lines) <= 3, lines
    assert lines[0].startswith("sampling 2 image(s) of model=digits with EulerEDMSampler") and str(out) in lines[0]
    assert lines[-1] == f"wrote 2 images, grid.png and metrics.json to {out}"
    assert "EulerEDMSampler" in res.stderr  # the progress bar is still there
    log = (out / "run.log").read_text()
    for detail in ("GPU available", "loaded 683 tensors", "is not downloaded", "image metrics:"):
        assert detail in log, detail


def test_training_bar_is_labelled_with_the_step_not_epoch_minus_two(capsys):
    import lightning as L
    import torch

    from sgm.tasks.progress import StepProgressBar, train_progress_bars

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.w(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    bar = StepProgressBar()
    trainer = L.Trainer(max_steps=3, max_epochs=-1, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Tiny(), data)
    shown = capsys.readouterr().out
    assert "step 2/3, epoch 1" in shown and "/-2" not in shown  # 2 batches an epoch: epoch 1 starts at step 2
    assert train_progress_bars(False) == []
