"""run.py fails clearly before heavy work: every cheap check (numbers, prompts, wildcards, the init
image, LoRA file headers) runs before a weight file is read; files are read for what they are;
the command line gets a quoting hint instead of a lexer trace."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sgm.tasks.sample as sample
from sgm.data.prompts import make_jobs, read_prompt_file
from sgm.data.reading import image_to_tensor, read_image
from sgm.lora.files import LoRAFileError, check_lora_file
from sgm.tasks.cli import CommandLineError, check_command_line

from conftest import compose, run_task

ROOT = Path(__file__).resolve().parents[1]


class WeightsRead(AssertionError):
    """Raised by every weight loader while a test expects a failure before any weight is read."""


@pytest.fixture
def no_weights(monkeypatch):
    """Every loader that build_engine (and the digit metrics) use raises :class:`WeightsRead`."""

    def refuse(*args, **kwargs):
        raise WeightsRead(f"a weight file was read: {args[:2]}")

    for target in ("sgm.checkpoint.load_checkpoint", "sgm.tasks.common.load_checkpoint",
                   "sgm.checkpoint.open_state_dict", "sgm.checkpoint.safe_open", "sgm.checkpoint._SafetensorsReader",
                   "safetensors.safe_open", "safetensors.torch.load_file", "safetensors.torch.safe_open",
                   "sgm.tasks.common.build_engine"):
        monkeypatch.setattr(target, refuse)


@pytest.fixture
def previous_run(tmp_path):
    """A folder holding an earlier run's files; a failing run pointed at it must leave them as they are."""
    folder = tmp_path / "previous_run"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "00000.png")
    (folder / "metrics.json").write_text('{"images": 1}')
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    yield folder
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert after == before, "the failing run changed the previous run's folder"


QUIET = ["~logger", "progress=false"]


def run_sample(out: Path, *overrides: str) -> dict:
    """``sample.run`` in-process as ``python run.py ~logger progress=false OVERRIDES`` would run it into
    ``out``, without Hydra's own files there (a failing run must leave ``out`` as it was)."""
    return run_task("sample", [*QUIET, *overrides], out, files=False)[0]


def write_lora(path: Path, keys: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path), metadata=metadata)
    return path


KOHYA_SGM = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": (4, 32),
             "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": (32, 4),
             "lora_unet_input_blocks_1_1_proj_in.alpha": ()}
KOHYA_DIFFUSERS = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": (4, 32),
                   "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": (32, 4)}
PEFT = {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": (4, 32),
        "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": (32, 4)}


# ------------------------------------------------------------------ before any weight is read

@pytest.mark.parametrize("overrides, error, message", [
    (["seed=abc"], ValueError, "seed must be an integer >= 0, got 'abc'"),
    (["seed=-1"], ValueError, "seed must be an integer >= 0"),
    (["seed=1.5"], ValueError, "seed"),
    (["steps=0"], ValueError, "steps must be an integer >= 1"),
    (["batch_size=0"], ValueError, "batch_size must be an integer >= 1"),
    (["num_images_per_prompt=two"], ValueError, "num_images_per_prompt"),
    (["grid_columns=0"], ValueError, "grid_columns"),
    (["H=36"], ValueError, "H and W must be positive multiples of 8"),
    (["strength=0"], ValueError, "strength must be in (0, 1]"),
    (["strength=nan"], ValueError, "strength must be finite"),
    (["strength=0.5"], ValueError, "strength=0.5 needs init_image=PATH"),
    (["img2img_schedule=first_steps"], ValueError, "img2img_schedule must be one of"),
    (["refiner_switch=abc"], ValueError, "refiner_switch must be a real number"),
    (["refiner=sdxl_refiner", "refiner_switch=1.5"], ValueError, "refiner_switch must be in (0, 1)"),
    (["refiner=sdxl_refiner", "refiner_switch=0.01"], ValueError, "refiner_switch=0.01 hands over at step 0 of 30"),
    (["aesthetic_score=inf"], ValueError, "aesthetic_score must be finite"),
    (["lora.strengths=[0.5]"], ValueError, "lora.strengths has 1 value(s) for 0 lora.files"),
    (["lora.files=[/nonexistent/a.safetensors]"], FileNotFoundError, "lora.files[0] '/nonexistent/a.safetensors'"),
    (["prompt_file=/nonexistent/prompts.txt"], FileNotFoundError, "prompt_file"),
    (["init_image=/nonexistent.png"], FileNotFoundError, "init_image '/nonexistent.png' does not exist"),
    (["weights.checkpoint=/nonexistent.safetensors"], FileNotFoundError, "weights.checkpoint"),
])
def test_bad_parameters_fail_before_any_weight_is_read(no_weights, previous_run, overrides, error, message):
    with pytest.raises(error) as err:
        run_sample(previous_run, *overrides)
    assert message in str(err.value)


def test_validate_reads_no_weights_for_a_good_config(no_weights, hydra_runtime, tmp_path):
    lora = write_lora(tmp_path / "a.safetensors", KOHYA_SGM)
    img = tmp_path / "init.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(img)
    cfg = hydra_runtime("sample", [*QUIET, "~metrics", f"lora.files=['{lora}']", "lora.strengths=[0.7]",
                                   f"init_image='{img}'", "strength=0.5", "num_images_per_prompt=2"],
                        tmp_path / "run")
    plan = sample.validate(cfg)
    assert (plan.H, plan.W, plan.seed, plan.steps, len(plan.jobs)) == (32, 32, 42, 30, 20)
    assert plan.lora_files == [str(lora)] and plan.lora_strengths == [0.7]
    assert plan.init_image.shape == (1, 3, 32, 32)
    with pytest.raises(WeightsRead):  # the first weight is read by build_engine, after validate
        sample.run(cfg)


def test_the_error_comes_in_well_under_a_second(no_weights, hydra_runtime, tmp_path):
    cfg = hydra_runtime("sample", [*QUIET, "H=36"], tmp_path / "run")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="H and W"):
        sample.run(cfg)
    assert time.perf_counter() - t0 < 1.0


# ------------------------------------------------------------------ LoRA files: the header only

def test_lora_header_gives_the_naming_without_reading_tensors(monkeypatch, tmp_path):
    files = {name: write_lora(tmp_path / f"{name}.safetensors", keys)
             for name, keys in (("sgm", KOHYA_SGM), ("diffusers", KOHYA_DIFFUSERS), ("peft", PEFT))}
    torch.save({k: torch.zeros(s) for k, s in KOHYA_SGM.items()}, tmp_path / "sgm.pt")

    def refuse(*args, **kwargs):
        raise WeightsRead("a tensor was read")

    monkeypatch.setattr("safetensors.safe_open", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    assert check_lora_file(files["sgm"]) == "kohya (sgm names)"
    assert check_lora_file(files["diffusers"]) == "kohya (diffusers names)"
    assert check_lora_file(files["peft"]) == "PEFT/diffusers"
    assert check_lora_file(tmp_path / "sgm.pt") == "kohya (sgm names)"


def test_a_checkpoint_given_as_lora_is_named(no_weights, previous_run, tmp_path):
    ckpt = write_lora(tmp_path / "model.safetensors", {"model.diffusion_model.out.2.weight": (4, 4),
                                                       "first_stage_model.decoder.conv_in.bias": (4,)})
    with pytest.raises(LoRAFileError) as err:
        run_sample(previous_run, f"lora.files=['{ckpt}']")
    msg = str(err.value)
    assert f"lora.files[0] '{ckpt}' is not a LoRA file" in msg and "model.diffusion_model.out.2.weight" in msg
    assert "weights.checkpoint" in msg


def test_a_text_file_renamed_safetensors_is_named(no_weights, previous_run, tmp_path):
    good = write_lora(tmp_path / "good.safetensors", KOHYA_SGM)
    fake = tmp_path / "notes.safetensors"
    fake.write_text("these are my notes, not a LoRA\n" * 3)
    with pytest.raises(LoRAFileError, match=r"lora.files\[1\] .*notes.safetensors' is not a safetensors file"):
        run_sample(previous_run, f"lora.files=['{good}','{fake}']")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "is not a safetensors file"),
    (lambda p: p.write_bytes((8).to_bytes(8, "little") + b"not json"), "its header is not JSON"),
    (lambda p: p.write_bytes(write_lora(p, KOHYA_SGM).read_bytes()[:-40]), "points outside the file"),
    (lambda p: write_lora(p, {**KOHYA_SGM, "lora_unet_input_blocks_1_1_proj_in.hada_w1_a": (4, 4)}), "LoHa"),
    (lambda p: write_lora(p, {**KOHYA_SGM, "some_other.weight": (4,)}), "not LoRA tensors of a known naming"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_broken_or_foreign_lora_files_are_refused_from_the_header(no_weights, previous_run, tmp_path, make, message):
    path = tmp_path / "x.safetensors"
    make(path)
    with pytest.raises(LoRAFileError) as err:
        run_sample(previous_run, f"lora.files=['{path}']")
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_lora_file_is_named(no_weights, previous_run, tmp_path):
    path = write_lora(tmp_path / "locked.safetensors", KOHYA_SGM)
    path.chmod(0)
    with pytest.raises(LoRAFileError, match="cannot be read"):
        run_sample(previous_run, f"lora.files=['{path}']")


@pytest.mark.parametrize("strengths, message", [
    ("[0.5]", "lora.strengths has 1 value(s) for 2 lora.files"),
    ("[0.5,0.5,0.5]", "lora.strengths has 3 value(s) for 2 lora.files"),
    ("[0.5,nan]", "lora.strengths[1] must be finite"),
    ("[inf,0.5]", "lora.strengths[0] must be finite"),
    ("[0.5,strong]", "lora.strengths[1] must be a real number"),
])
def test_lora_strengths_one_finite_number_per_file(no_weights, previous_run, tmp_path, strengths, message):
    a, b = write_lora(tmp_path / "a.safetensors", KOHYA_SGM), write_lora(tmp_path / "b.safetensors", PEFT)
    with pytest.raises(ValueError) as err:
        run_sample(previous_run, f"lora.files=['{a}','{b}']", f"lora.strengths={strengths}")
    assert message in str(err.value)


# ------------------------------------------------------------------ init images: the one reader

def _gradient() -> np.ndarray:
    y, x = np.mgrid[0:48, 0:40]
    return ((x * 5 + y * 3) % 256).astype(np.uint8)


def test_a_16_bit_png_init_image_is_scaled_like_its_8_bit_version(tmp_path):
    g8 = _gradient()
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really stored as 16 bit
    x8 = sample.load_init_image(tmp_path / "g8.png", 32, 32)
    x16 = sample.load_init_image(tmp_path / "g16.png", 32, 32)
    assert x16.shape == (1, 3, 32, 32)
    torch.testing.assert_close(x16, x8, rtol=0, atol=1e-6)
    assert (x16 >= 0.999).float().mean() < 0.1  # not the near-white the old reader made of it


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK", "F", "I;16"])
def test_init_image_of_any_mode_goes_through_read_image(tmp_path, mode):
    rgb = Image.fromarray(np.stack([_gradient(), _gradient()[::-1], np.full((48, 40), 90, np.uint8)], -1))
    im = {"P": lambda: rgb.quantize(64), "RGBA": lambda: rgb.convert("RGBA"), "LA": lambda: rgb.convert("LA"),
          "CMYK": lambda: rgb.convert("CMYK"),
          "F": lambda: Image.fromarray(_gradient().astype(np.float32) / 255.0),
          "I;16": lambda: Image.fromarray(_gradient().astype(np.uint16) * 257)}[mode]()
    path = tmp_path / ("img.tif" if mode in ("F", "CMYK") else "img.png")
    im.save(path)
    expected = image_to_tensor(read_image(path).resize((24, 16), Image.Resampling.LANCZOS))[None]
    got = sample.load_init_image(path, 16, 24)
    assert got.shape == (1, 3, 16, 24)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("limit", [100, 1000])  # 40x48 = 1920 pixels: over 2x the limit (error), within 2x (warning)
def test_a_decompression_bomb_is_a_clear_error(no_weights, previous_run, monkeypatch, tmp_path, limit):
    img = tmp_path / "huge.png"
    Image.fromarray(_gradient()).save(img)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ValueError) as err:
        run_sample(previous_run, f"init_image='{img}'", "strength=0.5")
    msg = str(err.value)
    assert f"init_image '{img}' is too large to decode safely" in msg and "downscale" in msg


def test_a_corrupt_init_image_is_named(no_weights, previous_run, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="init_image '.*broken.png' is not a readable image"):
        run_sample(previous_run, f"init_image='{bad}'", "strength=0.5")


# ------------------------------------------------------------------ prompt files and wildcards

def test_a_prompt_file_that_is_not_utf8_names_file_and_byte(no_weights, previous_run, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a digit 3\na café\n".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        run_sample(previous_run, f"prompt_file='{path}'")
    msg = str(err.value)
    assert f"prompt_file '{path}' is not UTF-8 text: byte 15 (line 2, 0xe9)" in msg and "save the file as UTF-8" in msg


def test_a_utf8_prompt_file_with_a_bom_and_emoji_reads_as_written(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa cat 🐱\n\n a café \n".encode("utf-8"))
    assert read_prompt_file(path) == ["a cat 🐱", "a café"]


def test_a_wildcard_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "colour.txt").write_bytes(b"red\n\xff\n")
    with pytest.raises(ValueError, match=r"wildcard file of __colour__ .*colour.txt' is not UTF-8 text: byte 4"):
        make_jobs(["a __colour__ cube"], wildcards_dir=tmp_path)


@pytest.fixture
def wildcards(tmp_path):
    """wildcards/ with colour.txt and an alias link to it; secret.txt outside; links leading out."""
    wc, outside = tmp_path / "wildcards", tmp_path / "outside"
    wc.mkdir()
    outside.mkdir()
    (wc / "colour.txt").write_text("red\n")
    (wc / "alias.txt").symlink_to(wc / "colour.txt")
    (outside / "secret.txt").write_text("SECRET\n")
    (tmp_path / "secret.txt").write_text("SECRET\n")
    (wc / "leak.txt").symlink_to(outside / "secret.txt")
    (wc / "sub").symlink_to(outside, target_is_directory=True)
    return wc


@pytest.mark.parametrize("name", ["ABS", "leak", "sub/secret"])
def test_wildcards_outside_the_folder_are_an_error(wildcards, name):
    name = str(wildcards.parent / "outside" / "secret") if name == "ABS" else name
    with pytest.raises(ValueError) as err:
        make_jobs([f"a __{name}__ cube"], wildcards_dir=wildcards)
    msg = str(err.value)
    assert f"wildcard __{name}__ leads outside wildcards_dir '{wildcards}'" in msg and "SECRET" not in msg


def test_dot_dot_stays_plain_text_and_links_inside_the_folder_are_read(wildcards):
    jobs = make_jobs(["a __../secret__ cube", "a __alias__ cube"], wildcards_dir=wildcards)
    assert [j.prompt for j in jobs] == ["a __../secret__ cube", "a red cube"]
    linked = wildcards.parent / "linked_wildcards"
    linked.symlink_to(wildcards, target_is_directory=True)  # the folder itself may be a link
    assert make_jobs(["a __colour__ cube"], wildcards_dir=linked)[0].prompt == "a red cube"


def test_an_absolute_wildcard_stops_the_run_before_any_weight(no_weights, previous_run, wildcards):
    secret = wildcards.parent / "outside" / "secret"
    with pytest.raises(ValueError, match="leads outside wildcards_dir"):
        run_sample(previous_run, f"prompt='a __{secret}__'", f"wildcards_dir='{wildcards}'")


# ------------------------------------------------------------------ the command line

@pytest.mark.parametrize("argv, expected", [
    (["prompt=a cat 🐱"], """(this one holds 🐱). Quote it for Hydra, inside the shell's quotes: 'prompt="a cat 🐱"'"""),
    (["prompt=a (cat:1.2)"], """'prompt="a (cat:1.2)"'"""),
    (['prompt=a "big" cat 🐱'], """'prompt="a \\"big\\" cat 🐱"'"""),
    (["steps=3", "prompt=a", "cat", "🐱"], """'cat', '🐱' are not overrides: the shell split the value of prompt at """
                                           """its spaces. Quote the whole override: 'prompt="a cat 🐱"'"""),
    (['prompt="a cat 🐱'], "A quoted value must end with the quote it starts with"),
])
def test_overrides_hydra_cannot_parse_get_the_quoting_that_works(argv, expected):
    with pytest.raises(CommandLineError) as err:
        check_command_line(argv, prog="run.py")
    assert expected in str(err.value.code) and str(err.value.code).startswith("run.py: ")


@pytest.mark.parametrize("argv", [
    ['prompt="a cat 🐱"'], ["prompt='a café'"], ["-m", "prompt=a,b", "steps=3"], ["~logger", "+x=1", "--cfg", "job"],
    ["-cn", "sample", "hydra/launcher=parallel"], [],
])
def test_overrides_hydra_parses_are_left_alone(argv):
    check_command_line(argv, prog="run.py")


@pytest.mark.parametrize("launcher, module, package", [
    ("parallel", "hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
])
def test_a_launcher_without_its_plugin_names_the_extra(monkeypatch, launcher, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the plugin finds
    with pytest.raises(CommandLineError) as err:
        check_command_line(["-m", f"hydra/launcher={launcher}", "guider.scale=0,1"], prog="run.py")
    msg = str(err.value.code)
    assert f"hydra/launcher={launcher} needs the {package} package" in msg and 'pip install -e ".[sweeps]"' in msg


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def test_run_and_train_print_the_hint_and_the_readme_quoting_works():
    res = _cli("run.py", "prompt=a cat 🐱")
    assert res.returncode == 1 and """'prompt="a cat 🐱"'""" in res.stderr and "Traceback" not in res.stderr
    res = _cli("train.py", "data.root=my images (2024)")
    assert res.returncode == 1 and """'data.root="my images (2024)"'""" in res.stderr
    for arg, value in (('prompt="a cat 🐱 (watercolour)"', "a cat 🐱 (watercolour)"), ("prompt=\"a café\"", "a café")):
        check_command_line([arg, "--cfg", "job"], prog="run.py")  # what run.py checks before Hydra parses
        assert compose("sample", [arg]).prompt == value  # Hydra's own override parser, in-process


# ------------------------------------------------------------------ and a good run still runs

@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_img2img_with_a_16_bit_init_image_and_a_lora_file_runs(tmp_path):
    from sgm.lora import LoRASpec, inject_lora, save_lora
    from sgm.tasks.common import build_engine

    cfg = compose("sample", ["model=tiny"])
    engine = build_engine(cfg.model, cfg.weights, seed=0)
    inject_lora(engine, LoRASpec(rank=2, alpha=2.0))
    lora = save_lora(engine, tmp_path / "tiny_lora.safetensors")
    assert check_lora_file(lora) == "kohya (sgm names)"
    img = tmp_path / "init16.png"
    Image.fromarray(_gradient().astype(np.uint16) * 257).save(img)
    out = tmp_path / "run"
    metrics = run_sample(out, "model=tiny", "~metrics", "steps=4", "prompt=a red cube", f"init_image='{img}'",
                         "strength=0.5", f"lora.files=['{lora}']", "lora.strengths=[0.5]")
    assert metrics["images"] == 1 and metrics["network_evaluations_per_batch"] == 2  # round(0.5 * 4) steps
    assert (out / "00000.png").is_file() and math.isfinite(metrics["seconds_per_image"])


def test_sigterm_stops_sampling_at_once_and_keeps_the_written_images(tmp_path, monkeypatch):
    """SIGTERM (timeout, kill, a scheduler's preemption) in the second of three batches: the run stops
    there with exit code 143 (Lightning's own handler only records the signal), the first batch's image
    stays, and the handler in place before the run is back afterwards."""
    import signal

    from sgm.engine import DiffusionEngine

    predict_step = DiffusionEngine.predict_step

    def terminated_in_the_second_batch(self, batch, batch_idx=0):
        if batch_idx == 1:
            signal.raise_signal(signal.SIGTERM)
        return predict_step(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionEngine, "predict_step", terminated_in_the_second_batch)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        run_task("sample", ["steps=2", "batch_size=1", "prompts=[one, two, three]", "~logger", "progress=false"],
                 tmp_path / "run")
    assert stopped.value.code == 143
    assert [p.name for p in (tmp_path / "run").glob("0*.png")] == ["00000.png"]
    assert signal.getsignal(signal.SIGTERM) is before
