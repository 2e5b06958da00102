"""lightning-hydra-template's conventions: the debug group, tags, several loggers, trainer=cpu|gpu
and the config tree (sgm.tasks.extras, sgm.tasks.loggers, sgm.tasks.debug), in-process on the tiny
model and the tiny image folder of test_train.py."""

import csv
import json
import struct
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from omegaconf import OmegaConf, read_write

from conftest import run_script
from sgm.tasks import extras
from sgm.tasks.common import CONF_DIR, logger_nodes, make_logger
from test_catalogue import no_weights  # noqa: F401 - the fixture: no weight file may be read
from test_run import sample, wandb_records
from test_train import images, train  # noqa: F401 - the session's tiny image folder



class Probe(L.Callback):
    """Test observer: writes what each training batch of the real run was (JSON lines at ``path``)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "batches_per_epoch": trainer.num_training_batches, "captions": list(batch["txt"]),
               "pixels": float(batch["jpg"].double().sum()), "anomaly": torch.is_anomaly_enabled(),
               "accelerator": type(trainer.accelerator).__name__, "world_size": trainer.world_size}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def probed(tmp_path: Path) -> tuple[list[str], Path]:
    path = tmp_path / "probe.jsonl"
    return ["+callbacks.probe._target_=test_conventions.Probe", f"+callbacks.probe.path={path}"], path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tiny_train(images: Path, *extra: str) -> list[str]:
    return ["model=tiny", "~logger", f"data.root={images}", "data.batch_size=2", "data.val_fraction=0.25",
            "validation.sample_every_n_steps=0", "validation.steps=2", *extra]


# Anomaly detection stores a Python stack per autograd op, which under pytest's deep stack makes a step
# several times slower. debug=default and debug=anomaly run with it (their tests below); the tests of
# the other debug configs check their own part with it off, and test_every_debug_config_detects_anomalies
# holds each composed config to it.
WITHOUT_ANOMALY = "trainer.detect_anomaly=false"


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# -- debug configs (train.py) -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml")))
def test_every_debug_config_detects_anomalies(compose, name):
    assert compose("train", [f"debug={name}"]).trainer.detect_anomaly is True


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_debug_default_runs_one_cpu_process_with_anomaly_detection(run_task, images, tmp_path, compose):
    probe, path = probed(tmp_path)
    out = tmp_path / "run"
    # trainer=ddp_cpu would start two processes; debug=default makes it one, in this process
    train(run_task, out, *tiny_train(images, "trainer=ddp_cpu", "debug=default", "trainer.max_steps=1", *probe))
    seen = rows(path)
    assert [r["step"] for r in seen] == [0]
    assert all(r["anomaly"] and r["world_size"] == 1 and r["accelerator"] == "CPUAccelerator" for r in seen)
    cfg = compose("train", ["debug=default"], hydra=True)
    assert list(cfg.tags) == ["debug"] and list(cfg.hydra.verbose) == ["sgm"]
    assert cfg.hydra.run.dir.startswith("outputs/debug/")
    assert (out / "lora.safetensors").is_file()


def test_a_debug_config_refuses_a_sweep(hydra_runtime, images, tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = hydra_runtime("train", tiny_train(images, "debug=fdr"))
    assert extras.check_debug() == "fdr"
    with read_write(HydraConfig.get()):
        HydraConfig.get().mode = RunMode.MULTIRUN
    with pytest.raises(ValueError, match=r"debug=fdr is for one run, not a sweep: drop -m"):
        extras.check_conventions(cfg)


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_debug_fdr_runs_one_step_and_leaves_no_checkpoint_weights_or_logs(run_task, images, tmp_path):
    probe, path = probed(tmp_path)
    out = tmp_path / "run"
    args = [a for a in tiny_train(images, "debug=fdr", *probe) if a != "~logger"]  # W&B on: still no run
    metrics, _ = train(run_task, out, *args)
    assert [r["step"] for r in rows(path)] == [0]
    assert "val/loss" in metrics  # the validation loss ran once, at the end
    made = files(out)
    assert not any(f.endswith((".ckpt", ".safetensors")) for f in made), made
    assert not any(f.startswith("wandb") or f in ("metrics.csv", "hparams.yaml", "wandb_run_id.txt") for f in made)
    assert "config_tree.log" in made


def test_debug_overfit_trains_on_one_fixed_batch(run_task, images, tmp_path):
    probe, path = probed(tmp_path)
    out = tmp_path / "run"
    train(run_task, out, *tiny_train(images, "debug=overfit", WITHOUT_ANOMALY, "trainer.max_steps=4", *probe))
    seen = rows(path)
    assert [r["epoch"] for r in seen] == [0, 1, 2, 3] and {r["batches_per_epoch"] for r in seen} == {1}
    assert len({(tuple(r["captions"]), r["pixels"]) for r in seen}) == 1, "one batch, the same every step"
    assert "trainer.overfit_batches=1: the first 1 training batch(es), unshuffled" in (out / "train.log").read_text()


@pytest.mark.slow  # 20 steps, two checkpoints, two sample grids
def test_debug_limit_runs_every_part_in_twenty_steps(run_task, images, tmp_path):
    probe, path = probed(tmp_path)
    out = tmp_path / "run"
    # validation.sample_every_n_steps=10: limit.yaml's value, back after tiny_train's 0
    train(run_task, out, *tiny_train(images, "debug=limit", WITHOUT_ANOMALY, *probe),
          "validation.sample_every_n_steps=10")
    seen = rows(path)
    assert len(seen) == 20 and {r["batches_per_epoch"] for r in seen} == {4}
    assert max(r["epoch"] for r in seen) == 4
    assert len({(tuple(r["captions"]), r["pixels"]) for r in seen}) > 1  # unlike overfit: many batches
    made = files(out)
    assert {"checkpoints/step-000010.ckpt", "checkpoints/step-000020.ckpt", "checkpoints/last.ckpt",
            "samples/step_000010.png", "samples/step_000020.png", "lora.safetensors"} <= made, made
    with open(out / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f) if r.get("val/loss")] == ["10", "20"]


def test_debug_profiler_writes_its_table_into_the_run_folder(run_task, images, tmp_path):
    out = tmp_path / "run"
    train(run_task, out, *tiny_train(images, "debug=profiler", WITHOUT_ANOMALY, "trainer.max_steps=3"))
    (report,) = [p for p in out.glob("*profile*.txt")]
    text = report.read_text()
    assert "run_training_batch" in text and "Mean duration" in text


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_debug_anomaly_keeps_the_run_device_settings(run_task, images, tmp_path, compose):
    probe, path = probed(tmp_path)
    cfg = compose("train", ["trainer=gpu", "debug=anomaly"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.detect_anomaly  # not moved to the CPU
    train(run_task, tmp_path / "run", *tiny_train(images, "debug=anomaly", "trainer.max_steps=1", *probe))
    assert rows(path)[0]["anomaly"]


# -- tags and loggers ---------------------------------------------------------------------------

def tf_events(folder: Path):
    """The events of a TensorBoard folder: TFRecord frames (length u64, its CRC u32, data, CRC u32)
    holding ``Event`` protos (tensorboardX's copy of TensorFlow's event.proto)."""
    from tensorboardX.proto import event_pb2

    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            yield event


def scalars(folder: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for event in tf_events(folder):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append(value.simple_value)
    return out


def test_run_py_with_three_loggers_records_the_tags_everywhere(run_task, tmp_path):
    out = tmp_path / "run"
    returned, _ = sample(run_task, out, "model=tiny", "steps=2", "trainer=cpu", "logger=[wandb,csv,tensorboard]",
                         "tags=[dev,cfg-sweep]")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tags"] == returned["tags"] == ["dev", "cfg-sweep"]
    assert list(wandb_records(out)["run"][0].run.tags) == ["dev", "cfg-sweep"]
    assert yaml.safe_load((out / "hparams.yaml").read_text())["tags"] == ["dev", "cfg-sweep"]
    with open(out / "metrics.csv") as f:
        header = f.readline().strip().split(",")
    assert {"seconds_per_image", "network_evaluations"} <= set(header)
    assert yaml.safe_load((out / "tensorboard" / "hparams.yaml").read_text())["tags"] == ["dev", "cfg-sweep"]
    assert scalars(out / "tensorboard")["network_evaluations"] == [metrics["network_evaluations"]]
    assert "cfg-sweep" in (out / "config_tree.log").read_text()


def test_train_py_logger_csv_is_its_one_metrics_csv_and_tensorboard_gets_the_losses(run_task, images, tmp_path):
    probe, path = probed(tmp_path)
    out = tmp_path / "run"
    args = [a for a in tiny_train(images, "trainer.max_steps=4", "trainer.log_every_n_steps=1", *probe)
            if a != "~logger"]
    train(run_task, out, *args, "logger=[csv,tensorboard]", "logger.csv.flush_logs_every_n_steps=1", "tags=[lora-a]")
    assert not rows(path)[0]["anomaly"]  # only the debug configs turn anomaly detection on
    assert [p.name for p in out.rglob("metrics.csv")] == ["metrics.csv"]
    with open(out / "metrics.csv") as f:
        assert sum(1 for r in csv.DictReader(f) if r.get("train/loss")) == 4  # one row per step
    assert yaml.safe_load((out / "hparams.yaml").read_text())["tags"] == ["lora-a"]
    assert len(scalars(out / "tensorboard")["train/loss"]) == 4
    assert not (out / "wandb").exists()
    log = (out / "train.log").read_text()
    assert log.count("config (also in") == 1 and "lora-a" in (out / "config_tree.log").read_text()


def test_logger_group_keys_merge_and_make_logger_returns_a_list(compose, hydra_runtime, tmp_path):
    assert set(logger_nodes(compose("sample"))) == {"wandb"}
    assert set(logger_nodes(compose("sample", ["logger=[csv,tensorboard]"]))) == {"csv", "tensorboard"}
    assert set(logger_nodes(compose("train", ["logger=[wandb,csv]"]))) == {"wandb", "csv"}
    cfg = hydra_runtime("sample", ["~logger"])
    assert logger_nodes(cfg) == {} and make_logger(cfg, tmp_path) == []
    cfg = hydra_runtime("sample", ["logger=csv"])
    (made,) = make_logger(cfg, tmp_path)
    assert type(made).__name__ == "AppendingCSVLogger" and Path(made.log_dir) == tmp_path
    with pytest.raises(ValueError, match=r"logger holds one node with a _target_ .* but mode is not one"):
        logger_nodes(compose("sample", ["logger=csv", "+logger.mode=offline"]))


def test_a_bad_wandb_mode_names_its_key(hydra_runtime, tmp_path, monkeypatch):
    from sgm.tasks.common import check_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = hydra_runtime("sample", ["logger.wandb.mode=sometimes"])
    with pytest.raises(ValueError, match=r"logger.wandb.mode='sometimes' is not a W&B mode"):
        check_logger(cfg)


@pytest.mark.parametrize("value, message", [
    ({"a": 1}, "tags must be a list"), ([["x"]], r"tags\[0\] must be a word"), ([""], r"tags\[0\] '' has 0"),
    (["x" * 65], r"has 65 characters: a tag takes 1 to 64"), ([True], r"tags\[0\] must be a word")])
def test_bad_tags_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        extras.check_tags(value)


def test_tags_forms():
    assert extras.check_tags(None) == [] and extras.check_tags("dev") == ["dev"]
    assert extras.check_tags(OmegaConf.create(["dev", 3, "dev", " sweep "])) == ["dev", "3", "sweep"]


def test_bad_tags_stop_the_run_before_any_weight(run_task, tmp_path, no_weights):  # noqa: F811
    with pytest.raises(ValueError, match="tags"):
        sample(run_task, tmp_path / "run", "~logger", "tags=[" + "x" * 70 + "]")
    assert not list((tmp_path / "run").glob("*.png"))


# -- trainer=cpu|gpu ----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("task", ["sample", "train"])
def test_trainer_gpu_without_cuda_stops_before_any_weight_naming_trainer_cpu(run_task, images, tmp_path, task,
                                                                            no_weights):  # noqa: F811
    args = ["~logger", "trainer=gpu"] + ([f"data.root={images}", "model=tiny"] if task == "train" else [])
    with pytest.raises(ValueError, match=r"trainer.accelerator=gpu but this machine has no usable CUDA GPU.*"
                                         r"use trainer=cpu"):
        run_task(task, args, tmp_path / "run")
    assert not (tmp_path / "run" / "config_tree.log").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_gpu_samples_on_the_gpu(run_task, tmp_path):
    out = tmp_path / "run"
    sample(run_task, out, "model=tiny", "steps=2", "~logger", "trainer=gpu")
    assert len(list(out.glob("0*.png"))) == 2
    with pytest.raises(ValueError, match=r"trainer.devices=\d+ but this machine has"):
        extras.check_trainer({"accelerator": "gpu", "devices": torch.cuda.device_count() + 1})


# -- the config tree ----------------------------------------------------------------------------

def test_run_py_writes_the_tree_to_the_run_folder_and_prints_it_only_when_asked(run_task, tmp_path):
    quiet, loud = tmp_path / "quiet", tmp_path / "loud"
    sample(run_task, quiet, "model=tiny", "steps=2", "~logger")
    sample(run_task, loud, "model=tiny", "steps=2", "~logger", "print_config=true")
    tree = (quiet / "config_tree.log").read_text()
    assert tree.startswith("CONFIG") and "sigma_max: 14.6146" in tree  # resolved: ${oc.select:model.denoiser...}
    branches = [line[4:].split(":")[0] for line in tree.splitlines() if line[:4] in ("├── ", "└── ")]
    assert branches.index("model") < branches.index("sampler") < branches.index("trainer") < branches.index("seed")
    assert "config (also in" not in (quiet / "run.log").read_text()
    assert (loud / "run.log").read_text().count("config (also in") == 1


def test_a_continued_run_appends_its_tree_and_other_ranks_write_none(hydra_runtime, tmp_path, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    cfg = hydra_runtime("sample", ["model=tiny", "~logger"])
    path = extras.record_config(cfg, tmp_path)
    first = path.read_text()
    extras.record_config(cfg, tmp_path)
    text = path.read_text()
    assert text.startswith(first) and "the run continued with" in text and text.count("CONFIG") == 2
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert extras.record_config(cfg, tmp_path / "rank1") is None and not (tmp_path / "rank1").exists()


@pytest.mark.slow
def test_cli_debug_fdr_logs_sgm_debug_records_and_one_tree(images, tmp_path):
    """``python train.py debug=fdr ...``: the script's own ``__main__`` in this process (conftest.run_script), so
    Hydra's job logging is configured from the debug config as on the command line."""
    out = tmp_path / "run"
    code = run_script("train.py", ["progress=false", "cpu_threads=1", "model=tiny", "debug=fdr", f"data.root={images}",
                                   "data.val_fraction=0.25", "validation.steps=2", f"hydra.run.dir={out}"])
    assert code == 0
    log = (out / "train.log").read_text()
    assert "[sgm.tasks.extras][DEBUG] - debug=fdr" in log
    assert log.count("config (also in") == 1 and not (out / "lora.safetensors").exists()
