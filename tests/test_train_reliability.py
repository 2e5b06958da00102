"""train.py reliability, in-process: every bad input fails before any weight file is read, naming
the parameter; resume survives damaged checkpoints and refuses another config's; checkpoint
writes are atomic; Ctrl-C leaves a resumable checkpoint, the adapter and the resume command;
a resumed run continues its metrics.csv and W&B run."""

from __future__ import annotations

import csv
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import sgm.checkpoint
import sgm.tasks.common
import sgm.tasks.wandb_logger
from sgm.tasks.checkpoint_io import AtomicCheckpointIO
from sgm.tasks.csv_log import AppendingWriter
from sgm.tasks.resume import (ResumeGuard, ResumeRefused, ResumeRefusedExit, find_resume, read_resume_point,
                              run_identity)
from sgm.tasks.train import build_datamodule, run

from conftest import run_task

TINY = ["model=tiny", "~logger", "progress=false", "cpu_threads=1", "trainer.max_steps=4", "checkpoint_every_n_steps=2",
        "keep_checkpoints=-1", "validation.every_n_steps=0", "validation.sample_every_n_steps=0", "data.batch_size=2",
        "trainer.log_every_n_steps=1", "lora.rank=2", "lora.alpha=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six 40x40 coloured squares and circles with captions."""
    root = tmp_path_factory.mktemp("images")
    for i in range(6):
        color, shape = [(220, 30, 30), (30, 60, 220), (30, 180, 60)][i % 3], ["square", "circle"][i % 2]
        im = Image.new("RGB", (40, 40), (245, 245, 245))
        (ImageDraw.Draw(im).rectangle if shape == "square" else ImageDraw.Draw(im).ellipse)([8, 8, 30, 30], fill=color)
        im.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {shape}")
    return root


def train(out_dir: Path, images: Path, *overrides: str, base: list[str] = TINY) -> dict[str, Any]:
    """A tiny in-process training run in ``out_dir`` (``python train.py BASE data.root=IMAGES OVERRIDES``)."""
    return run_task("train", [*base, f"data.root={images}", *overrides], out_dir)[0]


def steps_logged(out_dir: Path) -> list[int]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- 1. every cheap check before any weight file is read ----------------------------------------

@pytest.fixture
def no_weights(monkeypatch):
    """Reading a weight file fails the test (the shipped digit model has one)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was read")

    for target in (sgm.checkpoint, sgm.tasks.common):
        monkeypatch.setattr(target, "load_checkpoint", refuse)
    monkeypatch.setattr("safetensors.safe_open", refuse)
    monkeypatch.setattr(sgm.checkpoint, "safe_open", refuse)


@pytest.fixture(scope="module")
def broken_only(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    (root / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


BAD = [
    (["data.root=/nowhere"], FileNotFoundError, r"data\.root '/nowhere' does not exist"),
    (["data.root=EMPTY"], RuntimeError, r"data\.root '.*' holds no usable training image \(no \.png"),
    (["data.root=BROKEN"], RuntimeError, r"data\.root '.*' holds no usable training image \(1 image files, all skipped"),
    (["data.resolution=36"], ValueError, r"data\.resolution height and width must be positive multiples of 8"),
    (["data.resolution=[32,36]"], ValueError, r"data\.resolution height and width .* got 32x36: try 32x32"),
    (["data.buckets=true", "data.bucket_step=12"], ValueError, r"data\.bucket_step 12 must be a multiple of 8"),
    (["data.batch_size=0"], ValueError, r"data\.batch_size must be an integer >= 1, got 0"),
    (["data.val_fraction=0.2", "data.val_root=/x"], ValueError, r"data\.val_fraction and val_root are both set"),
    (["+data.colour=red"], TypeError, r"data: .*unexpected keyword argument 'colour'"),
    (["lora.rank=0"], ValueError, r"lora\.rank must be >= 1, got 0"),
    (["lora.alpha=-1"], ValueError, r"lora\.alpha must be > 0"),
    (["lora.dropout=1.5"], ValueError, r"lora\.dropout must be in \[0, 1\)"),
    (["+lora.rnak=4"], ValueError, r"lora has no parameter rnak"),
    (["trainer.max_steps=0"], ValueError, r"trainer\.max_steps must be an integer >= 1, got 0"),
    (["trainer.max_steps=-1"], ValueError, r"trainer\.max_steps must be an integer >= 1"),
    (["optimizer.lr=0"], ValueError, r"optimizer\.lr must be > 0"),
    (["optimizer.lr=nan"], ValueError, r"optimizer\.lr must be finite"),
    (["optimizer.lr=fast"], ValueError, r"optimizer\.lr must be a real number, got 'fast'"),
    (["ema_decay=1.5"], ValueError, r"ema_decay must be in \(0, 1\)"),
    (["checkpoint_every_n_steps=0"], ValueError, r"checkpoint_every_n_steps must be an integer >= 1"),
    (["cache_latents=true", "lora=text_encoders", "data.cache_dir=/tmp/c"], ValueError,
     r"cache_latents=true caches the text encoders' outputs"),
    (["cache_latents=true"], ValueError, r"cache_latents=true needs data\.cache_dir"),
    (["H=36"], ValueError, r"H and W must be positive multiples of 8"),
]


@pytest.mark.parametrize("overrides, error, message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_a_bad_input_fails_naming_it_before_any_weight_file_is_read(overrides, error, message, images, broken_only,
                                                                     tmp_path, no_weights, hydra_runtime):
    empty = tmp_path / "empty"
    empty.mkdir()
    named = {"EMPTY": str(empty), "BROKEN": str(broken_only)}
    overrides = [o.split("=")[0] + "=" + named.get(o.split("=", 1)[1], o.split("=", 1)[1]) for o in overrides]
    cfg = hydra_runtime("train", ["model=digits", "~logger", "progress=false", f"data.root={images}", *overrides],
                        tmp_path / "run")
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        run(cfg)
    assert time.perf_counter() - start < 5.0  # no model was built


def test_a_good_config_would_read_the_weights_next(images, tmp_path, no_weights, hydra_runtime):
    """The guard of the test above works: with nothing wrong, the next thing is reading weights."""
    cfg = hydra_runtime("train", ["model=digits", "~logger", "progress=false", f"data.root={images}"], tmp_path / "run")
    with pytest.raises(AssertionError, match="a weight file was read"):
        run(cfg)


def test_aspect_buckets_follow_the_models_size_multiple(images, hydra_runtime):
    cfg = hydra_runtime("train", ["model=tiny", f"data.root={images}", "data.buckets=true", "data.resolution=32"])
    dm = build_datamodule(cfg.data, 8)
    assert dm.bucket_step == 8 and all(h % 8 == 0 and w % 8 == 0 for h, w in dm.bucket_sizes)
    assert (32, 32) in dm.bucket_sizes and len(dm.bucket_sizes) > 1


# -- 2. atomic checkpoint writes; resume past damaged checkpoints --------------------------------

def test_an_interrupted_checkpoint_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(64)}, path)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f)
        f.seek(0)
        f.truncate(f.tell() + 100)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="injected"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(64)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(64))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> Path:
    """A finished 4-step LoRA run with checkpoints at steps 2 and 4 (and last.ckpt)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(out, images)
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(trained, images, tmp_path, caplog, hydra_runtime):
    out = copy_run(trained, tmp_path)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-000002.ckpt", "step-000004.ckpt"]
    identity = run_identity(hydra_runtime("train", [*TINY, f"data.root={images}"], out))
    truncate(ckpts / "last.ckpt")
    with caplog.at_level(logging.WARNING):
        point = find_resume("auto", out, identity)
    assert point.path == ckpts / "step-000004.ckpt" and point.step == 4
    assert str(ckpts / "last.ckpt") in caplog.text and "damaged" in caplog.text
    truncate(ckpts / "step-000004.ckpt")
    assert find_resume("auto", out, identity).path == ckpts / "step-000002.ckpt"
    truncate(ckpts / "step-000002.ckpt")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert find_resume("auto", out, identity) is None
    assert "no intact checkpoint" in caplog.text and "starting fresh" in caplog.text
    with pytest.raises(RuntimeError, match=r"resume: checkpoint '.*last\.ckpt' is damaged"):
        find_resume(str(ckpts / "last.ckpt"), out, identity)


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_a_run_resumed_past_a_truncated_last_ckpt_continues_its_folder(trained, images, tmp_path):
    out = copy_run(trained, tmp_path)
    truncate(out / "checkpoints" / "last.ckpt")
    (out / "checkpoints" / "step-000004.ckpt").unlink()
    before = steps_logged(out)
    train(out, images, "resume=auto", "trainer.max_steps=6")
    assert read_resume_point(out / "checkpoints" / "last.ckpt").step == 6
    after = steps_logged(out)
    assert max(before) >= 3 and after[: len([s for s in before if s <= 2])] == [s for s in before if s <= 2]
    assert sorted(after) == after and len(after) == len(set(after)) and max(after) >= 5  # no step twice


# -- 3. resume=auto continues only its own config's run ------------------------------------------

def test_resume_auto_refuses_a_checkpoint_of_another_config(trained, images, tmp_path, hydra_runtime):
    out = copy_run(trained, tmp_path)
    with pytest.raises(ResumeRefused) as err:
        train(out, images, "resume=auto", "optimizer.lr=0.01", "lora.rank=4")
    text = str(err.value)
    assert "last.ckpt" in text and "optimizer.lr: 0.0001 -> 0.01" in text and "lora.rank: 2 -> 4" in text
    assert "hydra.run.dir=NEW_FOLDER" in text and "resume=" in text and "max_steps" not in text
    # not compared: how long it runs, how many workers load the data
    same = run_identity(hydra_runtime("train", [*TINY, f"data.root={images}", "trainer.max_steps=50",
                                                "data.num_workers=2", "validation.every_n_steps=7"], out))
    assert find_resume("auto", out, same).step == 4
    # resume=PATH is an explicit choice: a warning, not a refusal
    other = run_identity(hydra_runtime("train", [*TINY, f"data.root={images}", "optimizer.lr=0.01"], out))
    assert find_resume(str(out / "checkpoints" / "last.ckpt"), out, other).step == 4


def test_the_hydra_guard_refuses_before_hydra_writes(compose, trained, images, tmp_path):
    out = copy_run(trained, tmp_path)
    config = compose("train", [*TINY, f"data.root={images}", "resume=auto", "optimizer.lr=0.01",
                               f"hydra.run.dir={out}"], hydra=True)
    with pytest.raises(ResumeRefusedExit, match=r"(?s)optimizer\.lr: 0\.0001 -> 0\.01.*Nothing was written"):
        ResumeGuard().on_run_start(config)
    config = compose("train", [*TINY, f"data.root={images}", "resume=auto", f"hydra.run.dir={out}"], hydra=True)
    ResumeGuard().on_run_start(config)  # the same config: no objection


def test_metrics_csv_is_continued_not_replaced(tmp_path):
    """Rows past the resumed checkpoint (step 2) are dropped; Lightning's row at step 2 is the batch
    after that checkpoint (it carries ``epoch``), a callback's ``val/loss`` at step 2 came before it."""
    (tmp_path / "metrics.csv").write_text("epoch,train/loss,step,val/loss\n0,1.0,1,\n0,0.9,2,\n,,2,0.6\n"
                                          "0,0.8,3,\n")
    writer = AppendingWriter(str(tmp_path), keep_until_step=2)
    writer.log_metrics({"train/loss": 0.7, "epoch": 0}, step=2)
    writer.log_metrics({"val/loss": 0.5}, step=4)
    writer.save()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [(r["step"], r["train/loss"], r["val/loss"]) for r in csv.DictReader(f)]
    assert rows == [("1", "1.0", ""), ("2", "", "0.6"), ("2", "0.7", ""), ("4", "", "0.5")]


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_a_resumed_run_continues_its_wandb_run(images, tmp_path, monkeypatch):
    calls = []

    def fake_wandb_logger(**kwargs):
        calls.append(kwargs)

    monkeypatch.setattr(sgm.tasks.wandb_logger, "make_wandb_logger", fake_wandb_logger)
    out, base = tmp_path / "run", [o for o in TINY if o != "~logger"]
    train(out, images, "logger.wandb.mode=offline", "trainer.max_steps=2", base=base)
    train(out, images, "logger.wandb.mode=offline", "trainer.max_steps=3", "resume=auto", base=base)
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert len(calls) == 2 and [c["id"] for c in calls] == [run_id, run_id]
    assert all(c["resume"] == "allow" for c in calls)


# -- 4. Ctrl-C ----------------------------------------------------------------------------------

class CtrlCAt(L.Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) after optimizer step ``step`` (``inside=False``) or
    inside the next batch, between its forward and backward pass (``inside=True``)."""

    def __init__(self, step: int, inside: bool = False):
        self.step, self.inside = step, inside

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.inside:
            raise KeyboardInterrupt

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step and self.inside:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> Path:
    """A 6-step run, never interrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(out, images, "trainer.max_steps=6", "checkpoint_every_n_steps=4")
    return out


def assert_same_adapter(a_path: Path, b_path: Path) -> None:
    with safe_open(str(a_path), "pt") as a, safe_open(str(b_path), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
@pytest.mark.parametrize("inside", [False, True], ids=["after a step", "inside a batch"])
def test_ctrl_c_saves_a_resumable_checkpoint_the_adapter_and_says_how_to_resume(inside, images, straight, tmp_path,
                                                                                caplog):
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit):
        train(out, images, "trainer.max_steps=6", "checkpoint_every_n_steps=4",  # one more callback, as on the CLI
              f"+callbacks.ctrl_c._target_={__name__}.CtrlCAt", "+callbacks.ctrl_c.step=3",
              f"+callbacks.ctrl_c.inside={str(inside).lower()}")
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again after the run
    assert read_resume_point(out / "checkpoints" / "last.ckpt").step == 3
    assert (out / "lora.safetensors").is_file()
    assert "interrupted at step 3" in caplog.text
    command = next(line.strip() for line in caplog.text.splitlines() if line.strip().startswith("python train.py"))
    assert f"hydra.run.dir={out}" in command and command.endswith("resume=auto") and "trainer.max_steps=6" in command
    adapter_at_3 = (out / "lora.safetensors").read_bytes()
    train(out, images, "trainer.max_steps=6", "checkpoint_every_n_steps=4", "resume=auto")
    assert read_resume_point(out / "checkpoints" / "last.ckpt").step == 6
    assert (out / "lora.safetensors").read_bytes() != adapter_at_3
    logged = steps_logged(out)
    assert steps_logged(straight) == list(range(6)) and logged == sorted(set(logged))  # none twice
    # every step's row, but for a batch interrupted in on_train_batch_end: Lightning logs it after that hook
    assert set(range(6)) - set(logged) == (set() if inside else {2})
    assert_same_adapter(out / "lora.safetensors", straight / "lora.safetensors")
