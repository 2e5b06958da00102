"""What a training run shows while it runs (issue 12): a sample before the first step, a
validation loss on held-out images by default, and the learning rate and gradient norm in
metrics.csv. Tiny model, in-process (conftest.run_task); Lightning's own LearningRateMonitor
and ``grad_norm`` utility are the oracles of the logged lr and grad norm."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.utilities import grad_norm
from PIL import Image, ImageDraw

from sgm.tasks.train import build_datamodule, scan_data

from conftest import run_task

TINY = ["model=tiny", "~logger", "progress=false", "cpu_threads=1", "data.batch_size=2", "trainer.log_every_n_steps=1",
        "validation.steps=2", "checkpoint_every_n_steps=100"]
LORA = ["lora.rank=2", "lora.alpha=2"]
CLIP = 1e-4  # far below the tiny model's gradient norms: a norm logged after clipping would read this


class GradNormOracle(L.Callback):
    """Lightning's ``grad_norm`` of the module, before clipping, at every optimizer step."""

    values: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        GradNormOracle.values.append(float(grad_norm(pl_module, 2)["grad_2.0_norm_total"]))


class SeenImages(L.Callback):
    """The image files of every training batch, and the run's held-out files."""

    trained: set[str] = set()
    held_out: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        SeenImages.trained.update(batch["path"])
        SeenImages.held_out = {r.path for r in trainer.datamodule.val_records}


def shapes(root: Path, n: int) -> Path:
    """``n`` 40x40 coloured squares and circles with captions."""
    root.mkdir(parents=True)
    for i in range(n):
        color, shape = [(220, 30, 30), (30, 60, 220), (30, 180, 60)][i % 3], ["square", "circle"][i % 2]
        im = Image.new("RGB", (40, 40), (245, 245, 245))
        draw = ImageDraw.Draw(im)
        (draw.rectangle if shape == "square" else draw.ellipse)([4 + i % 7, 6, 28 + i % 7, 30], fill=color)
        im.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {shape}")
    return root


def rows_by_step(run_dir: Path) -> dict[int, dict[str, str]]:
    """metrics.csv merged per step (Lightning and callbacks log separate rows at one step)."""
    merged: dict[int, dict[str, str]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            merged.setdefault(int(float(row["step"])), {}).update({k: v for k, v in row.items() if v})
    return merged


@pytest.fixture(scope="module")
def folder20(tmp_path_factory) -> Path:
    return shapes(tmp_path_factory.mktemp("shapes") / "twenty", 20)


@pytest.fixture(scope="module")
def watched(folder20, tmp_path_factory) -> Path:
    """12 steps with the default data split, the oracles attached, a 4-step warm-up (the lr changes).
    Full training: the random tiny UNet's output convolution starts at zero (as SDXL's), so no
    gradient reaches a LoRA adapter before it."""
    GradNormOracle.values, SeenImages.trained, SeenImages.held_out = [], set(), set()
    out = tmp_path_factory.mktemp("watched") / "run"
    run_task("train", [*TINY, "~lora", "output_name=model.safetensors", f"data.root={folder20}",
                       "trainer.max_steps=12", "validation.every_n_steps=4",
                       "validation.sample_every_n_steps=6", "lr_scheduler.warmup_steps=4",
                       f"trainer.gradient_clip_val={CLIP}",
                       "+callbacks.lr_oracle._target_=lightning.pytorch.callbacks.LearningRateMonitor",
                       "+callbacks.lr_oracle.logging_interval=step",
                       "+callbacks.grad_oracle._target_=test_train_watch.GradNormOracle",
                       "+callbacks.seen._target_=test_train_watch.SeenImages"], out)
    return out


@pytest.mark.slow
def test_a_fresh_run_samples_before_its_first_step(watched):
    assert sorted(p.name for p in (watched / "samples").glob("*.png")) == \
        ["step_000000.png", "step_000006.png", "step_000012.png"]
    grids = [watched / "samples" / f"step_{s:06d}.png" for s in (0, 6, 12)]
    assert grids[0].stat().st_mtime_ns < grids[1].stat().st_mtime_ns < grids[2].stat().st_mtime_ns
    assert Image.open(grids[0]).size == Image.open(grids[2]).size  # the same prompts x seeds grid


@pytest.mark.slow
def test_metrics_csv_has_the_validation_loss_lr_and_grad_norm(watched):
    rows = rows_by_step(watched)
    assert [s for s, r in rows.items() if "val/loss" in r] == [4, 8, 12]
    trained = [s for s, r in sorted(rows.items()) if "train/loss" in r]
    assert trained == list(range(12))  # log_every_n_steps=1: every optimizer step
    # the lr of each step is the one Lightning's LearningRateMonitor reads: warm-up 1/4, 2/4, ... of 1e-4
    lrs = [float(rows[s]["lr"]) for s in trained]
    assert lrs == pytest.approx([float(rows[s]["lr-AdamW"]) for s in trained], rel=1e-6)  # logged as float32
    assert lrs == pytest.approx([1e-4 * min(1.0, (s + 1) / 4) for s in trained], rel=1e-6)
    # the total grad norm before clipping, as Lightning's grad_norm computes it
    norms = [float(rows[s]["grad_norm"]) for s in trained]
    assert norms == pytest.approx(GradNormOracle.values, rel=1e-4)
    assert min(norms) > 10 * CLIP


@pytest.mark.slow
def test_the_default_split_holds_out_a_tenth_and_never_trains_on_it(watched, folder20):
    assert len(SeenImages.held_out) == 2  # round(0.1 * 20)
    assert SeenImages.trained == {str(p) for p in folder20.glob("*.png")} - SeenImages.held_out


def test_a_small_folder_holds_out_nothing_and_says_so(tmp_path, hydra_runtime, caplog):
    small = shapes(tmp_path / "twelve", 12)
    cfg = hydra_runtime("train", ["model=tiny", f"data.root={small}"])
    dm = build_datamodule(cfg.data, 8)
    with caplog.at_level(logging.INFO, logger="sgm.data.datamodule"):
        scan_data(dm, cfg.data)
    assert dm.val_records == [] and len(dm.train_records) == 12
    assert "(fewer than val_min_images=20): none held out" in caplog.text
    # a folder of held-out images alone (the default fraction yields to it)
    cfg = hydra_runtime("train", ["model=tiny", f"data.root={small}", f"data.val_root={small}"])
    dm = build_datamodule(cfg.data, 8)
    scan_data(dm, cfg.data)
    assert len(dm.val_records) == 12 and len(dm.train_records) == 12


@pytest.mark.slow
def test_a_resumed_run_does_not_sample_again_where_it_continues(folder20, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, *LORA, f"data.root={folder20}", "validation.every_n_steps=0", "validation.sample_every_n_steps=4",
              "checkpoint_every_n_steps=2"]
    run_task("train", [*common, "trainer.max_steps=2"], out)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_000000.png", "step_000002.png"]
    shutil.rmtree(out / "samples")
    run_task("train", [*common, "trainer.max_steps=4", "resume=auto"], out)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_000004.png"]

