"""run.py end to end (in-process through conftest.run_task): prompts, wildcards, the run folder,
W&B offline; DDP on two CPU processes through the real script (rank 0 in this process, conftest.run_script;
Lightning starts rank 1 as ``python run.py ...``)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_script
from sgm.data.prompts import make_jobs, resolve_wildcards


def sample(run_task, out: Path, *overrides: str):
    """``python run.py progress=false OVERRIDES hydra.run.dir=OUT`` in-process: (metrics, cfg)."""
    return run_task("sample", ["progress=false", *overrides], out)


def _leveldb_records(blob: bytes, block: int = 32768):
    """Records of W&B's transaction log: a 7-byte header, then the LevelDB log format
    (7-byte chunk headers: crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST)."""
    assert blob[:4] == b":W&B", "not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(blob):
        room = block - pos % block
        if room < 7:  # block trailer padding
            pos += room
            continue
        length = int.from_bytes(blob[pos + 4 : pos + 6], "little")
        kind = blob[pos + 6]
        data = blob[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            yield pending
            pending = b""


def wandb_records(run_dir: Path) -> dict[str, list]:
    """Parse an offline W&B run's .wandb log into {record type: [records]}."""
    from wandb.proto import wandb_internal_pb2

    (path,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    out: dict[str, list] = {}
    for data in _leveldb_records(path.read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        out.setdefault(rec.WhichOneof("record_type"), []).append(rec)
    return out


def test_tiny_model_writes_images_grid_metrics_and_a_wandb_run(run_task, tmp_path):
    out = tmp_path / "run"
    returned, _ = sample(run_task, out, "model=tiny", "steps=3", "sampler=heun", "num_images_per_prompt=2")
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 4 and (out / "grid.png").is_file()
    meta = Image.open(pngs[2]).text
    assert meta["prompt"] == "a blue sphere" and meta["seed"] == "44"
    assert "model:" in meta["config"] and meta["torch"] and meta["sgm"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["network_evaluations_per_batch"] == 3 * 2 - 1
    assert metrics["seconds_per_image"] > 0
    assert json.dumps(returned, sort_keys=True) == json.dumps(metrics, sort_keys=True)  # run()'s return (NaN too)
    records = wandb_records(out)
    config_keys = {item.key for rec in records["run"] for item in rec.run.config.update}
    assert {"sampler", "model", "guider"} <= config_keys
    history_keys = {item.key or "/".join(item.nested_key) for rec in records["history"] for item in rec.history.item}
    assert {"seconds_per_image", "network_evaluations"} <= history_keys
    assert any("samples/grid" in k for k in history_keys)
    assert list(out.glob("wandb/offline-run-*/files/media/images/samples/grid_*.png"))


def test_sampling_overrides_reach_the_tiny_model(run_task, tmp_path):
    out = tmp_path / "run"
    sample(run_task, out, "model=tiny", "steps=2", "sampler=dpmpp_2m", "discretization=edm", "discretization.rho=5",
           "guider=cfg_rescale", "~logger")
    cfg = (out / ".hydra" / "config.yaml").read_text()
    assert "rho: 5" in cfg and "RescaledCFG" in cfg


def test_prompt_file_and_wildcards(run_task, tmp_path):
    (tmp_path / "wc").mkdir()
    (tmp_path / "wc" / "digit.txt").write_text("3\n7\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit __digit__\n\n a digit 1 \n")
    out = tmp_path / "run"
    sample(run_task, out, f"prompt_file={prompts}", f"wildcards_dir={tmp_path / 'wc'}", "num_images_per_prompt=3",
           "steps=3", "~logger")
    texts = [Image.open(p).text["prompt"] for p in sorted(out.glob("0*.png"))]
    assert len(texts) == 6 and texts[3:] == ["a digit 1"] * 3
    assert all(t in ("a digit 3", "a digit 7") for t in texts[:3])


def test_wildcards_are_seeded_and_missing_files_named(tmp_path):
    (tmp_path / "color.txt").write_text("red\ngreen\nblue\n__shade__\n")
    (tmp_path / "shade.txt").write_text("dark\n")
    a = make_jobs(["a __color__ cube"], seed=5, num_images_per_prompt=8, wildcards_dir=tmp_path)
    b = make_jobs(["a __color__ cube"], seed=5, num_images_per_prompt=8, wildcards_dir=tmp_path)
    assert [j.prompt for j in a] == [j.prompt for j in b]
    assert len({j.prompt for j in a}) > 1 and [j.seed for j in a] == list(range(5, 13))
    import random

    assert resolve_wildcards("__shade__ __shade__", random.Random(0), tmp_path) == "dark dark"
    with pytest.raises(FileNotFoundError, match="__texture__"):
        make_jobs(["a __texture__ cube"], wildcards_dir=tmp_path)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["prompt_file=/nonexistent/prompts.txt"], FileNotFoundError, "prompt_file"),
        (["model=tiny", "H=36"], ValueError, "multiples of 8"),
        (["model=tiny", "init_image=/nonexistent.png"], FileNotFoundError, "init_image"),
        (["strength=1.5"], ValueError, "strength"),
        (["model=tiny", "weights.checkpoint=/nonexistent.safetensors"], FileNotFoundError, "nonexistent.safetensors"),
    ],
)
def test_bad_input_fails_early_with_a_named_problem(run_task, tmp_path, args, error, message):
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        sample(run_task, out, *args, "~logger")
    assert not list(out.glob("*.png"))


def test_corrupt_init_image_is_named(run_task, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png") as err:
        sample(run_task, tmp_path / "run", "model=tiny", f"init_image={bad}", "strength=0.5", "~logger")
    assert "not a readable image" in str(err.value)


def test_img2img_from_an_image_file(run_task, tmp_path):
    img = tmp_path / "init.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(img)
    out = tmp_path / "run"
    sample(run_task, out, "model=tiny", "steps=4", f"init_image={img}", "strength=0.5", "~logger")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["network_evaluations_per_batch"] == 2  # round(0.5 * 4) steps


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_each_image_once(tmp_path, capfd):
    out = tmp_path / "run"
    code = run_script("run.py", ["progress=false", "cpu_threads=1", "trainer=ddp_cpu", "steps=4", "batch_size=2",
                                 f"hydra.run.dir={out}"])
    assert code == 0, capfd.readouterr().err[-3000:]
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(10)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 10 and metrics["labelled_images"] == 10  # rank 0 judged all ten digits
    assert len(list(out.glob("wandb/offline-run-*"))) == 1
