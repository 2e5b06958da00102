"""eval.py (sgm.tasks.evaluate) in-process through conftest.run_task: a folder of images, a run
folder of run.py on the shipped model, the errors, and the digit accuracy moving with CFG."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from conftest import run_script
from sgm.tasks.writer import to_uint8

from test_eval_metrics import tiny_clip  # noqa: F401 - the tiny open_clip model fixture
from test_sample_reliability import no_weights  # noqa: F401 - every weight loader refuses

ROOT = Path(__file__).resolve().parents[1]
# the FID family over a raw-pixel feature space (4 x 4 thumbnails), so no Inception file is needed
PIXELS = ["metrics.features._target_=sgm.metrics.features.ModuleFeatures", "+metrics.features.size=4",
          "+metrics.features.module={_target_:torch.nn.Flatten}", "+metrics.features.name=pixels"]


@pytest.fixture(scope="module")
def digits():
    """Twelve held-out MNIST digits as uint8 RGB and their labels."""
    from sgm.metrics.digits import held_out_digits

    images, labels = held_out_digits()
    return to_uint8(images[::40][:12]), [int(d) for d in labels[::40][:12]]


def write_digits(folder: Path, images, labels, how: str = "txt") -> Path:
    """PNGs with prompts: ``txt`` captions beside them, ``png`` text chunks, or ``none``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (im, d) in enumerate(zip(images, labels)):
        info = PngInfo()
        if how == "png":
            info.add_itxt("prompt", f"a handwritten digit {d}")
        Image.fromarray(im).save(folder / f"d{i:02d}.png", pnginfo=info)
        if how == "txt":
            (folder / f"d{i:02d}.txt").write_text(f"a handwritten digit {d}\n")
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_images_is_judged_into_the_eval_runs_folder(run_task, digits, tmp_path):
    src = write_digits(tmp_path / "imgs", *digits)
    before = snapshot(src)
    out = tmp_path / "eval"
    returned, _ = run_task("eval", [f"images={src}", "~logger"], out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == returned
    assert metrics["images"] == 12 and metrics["source_kind"] == "folder" and metrics["source"] == str(src.resolve())
    assert metrics["labelled_images"] == 12 and metrics["accuracy"] >= 0.9 and metrics["frechet_distance"] > 0
    assert snapshot(src) == before and (out / ".hydra" / "config.yaml").is_file()
    # prompts from PNG text chunks too, and the FID family against another folder, several at once
    src2 = write_digits(tmp_path / "png", *digits, how="png")
    ref = write_digits(tmp_path / "ref", digits[0][::-1], digits[1][::-1], how="none")
    got, _ = run_task("eval", [f"images={src2}", "~logger", "metrics=[digits,fid,kid,precision_recall]", *PIXELS,
                               f"metrics.fid.reference={ref}", f"metrics.kid.reference={ref}",
                               f"metrics.precision_recall.reference={ref}"], tmp_path / "eval2")
    assert got["accuracy"] == metrics["accuracy"]
    assert got["fid"] == pytest.approx(0, abs=1e-6)  # the same twelve digits in another order
    assert got["fid_images"] == got["kid_images"] == got["precision_recall_images"] == 12
    assert (got["precision"], got["recall"]) == (1.0, 1.0)


@pytest.mark.slow  # run.py on the shipped model (4 images), then eval.py
def test_a_run_folder_of_the_shipped_model_is_judged_as_run_py_judged_it(run_task, tmp_path):
    run = tmp_path / "run"
    prompts = "prompts=[a handwritten digit one,a handwritten digit 4,a handwritten digit seven,a handwritten digit 9]"
    sampled, _ = run_task("sample", ["progress=false", "~logger", "steps=8", prompts], run)
    before = snapshot(run)
    out = tmp_path / "eval"
    metrics, _ = run_task("eval", [f"images={run}", "~logger"], out)
    assert metrics["images"] == 4 and metrics["source_kind"] == "run"  # the numbered PNGs, not grid.png
    for key in ("accuracy", "frechet_distance", "labelled_images"):
        assert metrics[key] == sampled[key], key
    assert metrics["judged_run"] == json.loads((run / "metrics.json").read_text())
    assert snapshot(run) == before  # the judged run's files untouched


@pytest.mark.slow  # run.py, then eval.py with a tiny CLIP model and its W&B run
def test_run_py_and_eval_py_merge_several_metrics(run_task, tiny_clip, tmp_path):
    """metrics=[digits,clip_score]: both metrics' keys in run.py's metrics.json, and eval.py of that
    run folder gives the same numbers."""
    arch, weights, _ = tiny_clip
    clip = ["metrics=[digits,clip_score]", f"metrics.clip_score.checkpoint={weights}",
            f"metrics.clip_score.arch={arch}", "metrics.clip_score.quick_gelu=false", "metrics.clip_score.device=cpu"]
    run = tmp_path / "run"
    sampled, _ = run_task("sample", ["progress=false", "~logger", "steps=4",
                                     "prompts=[a handwritten digit 2,a handwritten digit 8]", *clip], run)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "frechet_distance", "labelled_images", "clip_score", "clip_score_images"} <= set(on_disk)
    assert on_disk["clip_score_images"] == on_disk["labelled_images"] == 2
    judged, _ = run_task("eval", [f"images={run}", *clip], tmp_path / "eval")  # W&B offline, in the eval folder
    for key in ("accuracy", "frechet_distance", "clip_score", "clip_score_images"):
        assert judged[key] == on_disk[key], key
    from test_run import wandb_records

    records = wandb_records(tmp_path / "eval")
    keys = {item.key or "/".join(item.nested_key) for h in records.get("history", []) for item in h.history.item}
    assert {"accuracy", "clip_score", "clip_score_images", "images"} <= keys


def test_run_py_names_a_missing_metric_weight_before_the_model_is_read(no_weights, tmp_path, monkeypatch):
    from hydra.errors import InstantiationException

    from conftest import run_task as run

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no Inception file there
    ref = write_digits(tmp_path / "ref", [np.zeros((8, 8, 3), np.uint8)] * 2, [0, 1])
    with pytest.raises(InstantiationException, match="metrics.features.weights is not set"):
        run("sample", ["~logger", "progress=false", "metrics=[fid]", f"metrics.fid.reference={ref}"], tmp_path / "out",
            files=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two runs of ten images
def test_digit_accuracy_rises_with_the_guidance_scale(run_task, tmp_path):
    """Scale 0 ignores the prompt (chance, about 10%), scale 5 follows it (docs/shipped_model.md: 10.5% vs 100%
    on 200 images; 1 vs 5 is 94% vs 100%, too close to separate with ten images)."""
    from sgm.tasks.sweep_summary import collect

    accuracy = {}
    for job, scale in enumerate((0, 5)):
        run_task("sample", ["progress=false", "~logger", "steps=10", f"guider.scale={scale}"], tmp_path / f"run{scale}")
        accuracy[scale] = run_task("eval", [f"images={tmp_path / f'run{scale}'}", "~logger"],
                                   tmp_path / "sweep" / str(job))[0]["accuracy"]
    assert accuracy[5] >= 0.9 and accuracy[0] <= 0.4, accuracy
    # eval jobs summarize like run.py's: the swept value (images=) and each job's numbers
    swept, rows = collect(tmp_path / "sweep")
    assert swept == ["images"] and [r["accuracy"] for r in rows] == [accuracy[0], accuracy[5]]


def test_bad_input_is_named_before_any_metric_is_built(run_task, digits, tmp_path):
    def fails(match, *overrides, out=None, error=ValueError):
        with pytest.raises(error, match=match):
            run_task("eval", ["~logger", *overrides], out or tmp_path / "out", files=False)
        assert not (out or tmp_path / "out").exists() or not any((out or tmp_path / "out").iterdir())

    fails("images is not set")
    fails("images=.*missing", f"images={tmp_path / 'nowhere'}", error=FileNotFoundError)
    (tmp_path / "a.png").write_bytes(b"x")
    fails("images=.*is a file", f"images={tmp_path / 'a.png'}", error=NotADirectoryError)
    (tmp_path / "empty").mkdir()
    fails("holds no image", f"images={tmp_path / 'empty'}")
    broken = write_digits(tmp_path / "broken", *digits)
    (broken / "d03.png").write_bytes(b"\x89PNG truncated")
    fails(r"d03.png is not a readable image", f"images={broken}")
    mixed = write_digits(tmp_path / "mixed", *digits)
    Image.fromarray(np.zeros((40, 32, 3), np.uint8)).save(mixed / "d05.png")
    fails(r"the images differ in size \(d00.png 32x32, d05.png 32x40\)", f"images={mixed}")
    fails(r"caption_ext must be a file suffix with its dot, such as \.txt .* got 'txt'",
          f"images={write_digits(tmp_path / 'suffix', *digits)}", "caption_ext=txt")
    bare = write_digits(tmp_path / "bare", *digits, how="none")
    # clip_score has no checkpoint either: the prompts are checked first, before its weights
    fails(r"metrics clip_score judge images against their prompts, but 12 of 12 images have none \(first: .*d00.png\)",
          f"images={bare}", "metrics=[clip_score]")
    src = write_digits(tmp_path / "judged", *digits)
    before = snapshot(src)
    with pytest.raises(ValueError, match="the eval run's folder is the judged folder"):
        run_task("eval", ["~logger", f"images={src}"], src, files=False)
    assert snapshot(src) == before


@pytest.mark.slow  # the real script in a process
def test_eval_py_runs_as_a_script(digits, tmp_path, capfd):
    src = write_digits(tmp_path / "imgs", *digits)
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(Path.home())}
    res = subprocess.run([sys.executable, "eval.py", f"images={src}", "~logger", f"hydra.run.dir={tmp_path / 'e'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["accuracy"] >= 0.9
    assert (tmp_path / "e" / "eval.log").is_file()
    # the same command again, in this process (conftest.run_script: the script's own __main__): refused
    again = run_script("eval.py", [f"images={src}", "~logger", f"hydra.run.dir={tmp_path / 'e'}"])
    assert again == 1 and "already holds a run" in capfd.readouterr().err
