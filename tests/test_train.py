"""train.py end to end on the tiny model (in-process through conftest.run_task): full training,
LoRA, W&B, resume, sampling with the LoRA; DDP and a multirun through the real script (its ``__main__`` in
this process, conftest.run_script; DDP's rank 1 is the process Lightning starts)."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from conftest import run_script
from test_run import sample, wandb_records

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


def train(run_task, out: Path, *overrides: str):
    """``python train.py progress=false cpu_threads=1 OVERRIDES hydra.run.dir=OUT`` in-process."""
    return run_task("train", ["progress=false", "cpu_threads=1", *overrides], out)


def val_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]


COMMON = ["data.batch_size=4", "data.val_fraction=0.25", "validation.every_n_steps=10",
          "validation.sample_every_n_steps=0", "checkpoint_every_n_steps=10"]


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        name, shape = list(COLORS)[i % 3], ["square", "circle"][i // 3 % 2]
        im = Image.new("RGB", (40, 40), (245, 245, 245))
        x, y = (int(v) for v in torch.randint(4, 14, (2,), generator=g))
        draw = ImageDraw.Draw(im)
        (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + 20, y + 20], fill=COLORS[name])
        im.save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {name} {shape}")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


@pytest.fixture(scope="session")
def base_model(run_task, images, tmp_path_factory) -> Path:
    """Full training (all UNet weights) of the tiny model: the base the LoRA tests start from."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(run_task, out, "~lora", "~logger", "output_name=model.safetensors", f"data.root={images}",
          "trainer.max_steps=30", "optimizer.lr=1e-3", *COMMON)
    log = (out / "train.log").read_text()  # the job's log, as Hydra keeps it
    assert "broken.png" in log and "1 skipped" in log  # the corrupt file is named and counted
    return out


@pytest.mark.slow
def test_full_training_lowers_the_validation_loss_and_writes_a_loadable_model(base_model):
    losses = val_losses(base_model)
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    with safe_open(str(base_model / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.out.2.weight" in keys and "lora_network" not in " ".join(keys)


@pytest.mark.slow
def test_lora_training_logs_to_wandb_and_writes_a_kohya_file(run_task, images, base_model, tmp_path):
    out = tmp_path / "run"
    metrics, _ = train(run_task, out, f"weights.checkpoint={base_model / 'model.safetensors'}", f"data.root={images}",
                       "trainer.max_steps=30", "optimizer.lr=3e-3", *COMMON, "validation.sample_every_n_steps=15",
                       "validation.steps=3")
    losses = val_losses(out)
    assert metrics["val/loss"] == pytest.approx(losses[-1])  # what run() returns: the last logged values
    assert losses[-1] < losses[0], losses
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        up = f.get_tensor("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight")
    assert {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version"} <= set(meta)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert up.abs().sum() > 0, "the adapter trained"
    # the base model's own grid first (validation.sample_at_first), then every 15 steps
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_000000.png", "step_000015.png",
                                                                       "step_000030.png"]
    records = wandb_records(out)
    keys = {i.key or "/".join(i.nested_key) for r in records["history"] for i in r.history.item}
    assert {"train/loss", "val/loss"} <= keys and any(k.startswith("samples/grid") for k in keys)


@pytest.mark.slow
def test_sampling_with_the_trained_lora(run_task, images, base_model, tmp_path):
    lora_run = tmp_path / "lora"
    train(run_task, lora_run, f"weights.checkpoint={base_model / 'model.safetensors'}", f"data.root={images}",
          "~logger", "trainer.max_steps=10", "optimizer.lr=1e-2", *COMMON)

    def image(name, *extra):
        out = tmp_path / name
        sample(run_task, out, "model=tiny", f"weights.checkpoint={base_model / 'model.safetensors'}", "steps=4",
               "~logger", "prompt=a red square", *extra)
        return torch.tensor(np.asarray(Image.open(out / "00000.png")), dtype=torch.float32)

    base = image("base")
    with_lora = image("with", f"lora.files=[{lora_run / 'lora.safetensors'}]", "lora.strengths=[1.0]")
    zero = image("zero", f"lora.files=[{lora_run / 'lora.safetensors'}]", "lora.strengths=[0.0]")
    assert torch.equal(zero, base)
    assert (with_lora - base).abs().max() > 0


@pytest.mark.slow
def test_interrupted_then_resumed_run_ends_with_the_same_weights(run_task, images, base_model, tmp_path):
    args = [f"weights.checkpoint={base_model / 'model.safetensors'}", f"data.root={images}", "~logger",
            "optimizer.lr=3e-3", "lora.dropout=0.1", "data.caption_dropout=0.2", "data.random_crop=true",
            "data.flip=true", "data.val_fraction=0.25", "data.batch_size=2", "validation.sample_every_n_steps=0",
            "validation.every_n_steps=100", "checkpoint_every_n_steps=5"]
    full, part, resumed = tmp_path / "full", tmp_path / "part", tmp_path / "resumed"
    train(run_task, full, *args, "trainer.max_steps=12")
    train(run_task, part, *args, "trainer.max_steps=5")
    train(run_task, resumed, *args, "trainer.max_steps=12", f"resume={part / 'checkpoints' / 'last.ckpt'}")
    ckpt = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith("lora_network.") for k in ckpt["state_dict"]), "adapter-only checkpoints"
    with safe_open(str(full / "lora.safetensors"), "pt") as a, safe_open(str(resumed / "lora.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k), rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_cached_latents_train_and_text_encoder_lora_is_refused_with_them(run_task, images, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    train(run_task, out, f"data.root={images}", "~logger",  # random tiny weights: no trained base needed
          "cache_latents=true", f"data.cache_dir={cache}", "trainer.max_steps=4", "data.caption_dropout=0.3",
          "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.5", *COMMON)
    assert len(list(cache.rglob("*.safetensors"))) == 12 and (out / "lora.safetensors").is_file()
    with pytest.raises(ValueError, match="cache_latents"):
        train(run_task, tmp_path / "refused", f"data.root={images}", "~logger", "lora=text_encoders",
              "cache_latents=true", f"data.cache_dir={cache}")


def test_bad_training_input_fails_early(run_task, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(run_task, tmp_path / "run", f"data.root={tmp_path / 'nowhere'}", "~logger")
    with pytest.raises(FileNotFoundError, match="nonexistent.ckpt"):
        train(run_task, tmp_path / "r2", f"data.root={tmp_path}", "~logger", "resume=/nonexistent.ckpt")


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_gives_one_folder_and_one_wandb_run(images, base_model, tmp_path, capfd):
    out = tmp_path / "run"
    code = run_script("train.py", ["progress=false", "cpu_threads=1", "trainer=ddp_cpu",
                                   f"weights.checkpoint={base_model / 'model.safetensors'}", f"data.root={images}",
                                   "trainer.max_steps=4", *COMMON, f"hydra.run.dir={out}"])
    assert code == 0, capfd.readouterr().err[-3000:]
    assert (out / "lora.safetensors").is_file()
    assert len(list(out.glob("wandb/offline-run-*"))) == 1
    assert not list(tmp_path.glob("run*/**/rank*"))


@pytest.mark.slow
def test_multirun_gives_one_wandb_run_per_job(images, base_model, tmp_path):
    sweep = tmp_path / "sweep"
    # the script's own __main__ in this process (conftest.run_script), as `python train.py -m ...` starts it
    code = run_script("train.py", ["-m", "progress=false", "cpu_threads=1", "optimizer.lr=1e-3,2e-3",
                                   f"weights.checkpoint={base_model / 'model.safetensors'}", f"data.root={images}",
                                   "trainer.max_steps=2", *COMMON, f"hydra.sweep.dir={sweep}"])
    assert code == 0
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2
    groups = set()
    for job in sorted(sweep.glob("[0-9]")):
        run = wandb_records(job)["run"][0].run
        groups.add(run.run_group)
    assert groups == {sweep.name}
