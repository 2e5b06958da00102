"""The project's catalogue of bad input (docs/reliability.md), in-process and fast.

Each case runs run.py's or train.py's task on the shipped digit model (which has a checkpoint)
with every weight loader made to raise, and asserts: the error class, a message that names the
parameter or file, that it came before any weight file was opened, and that an earlier run's
folder is unchanged. Run-folder and resume cases go through the Hydra callbacks that guard them.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import hydra_job_config
from sgm.tasks.run_folder import RunFolderGuard, RunFolderOccupied

TASK = {"sample": "sgm.tasks.sample", "train": "sgm.tasks.train"}
QUIET = ["~logger", "progress=false", "cpu_threads=1"]


class WeightsRead(AssertionError):
    """A weight file was opened while the case expected an earlier failure."""


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise WeightsRead(f"a weight file was read: {args[:2]}")

    for target in ("sgm.checkpoint.load_checkpoint", "sgm.tasks.common.load_checkpoint", "sgm.checkpoint.safe_open",
                   "safetensors.safe_open", "safetensors.torch.load_file", "sgm.tasks.common.build_engine",
                   "sgm.tasks.train.build_engine"):
        monkeypatch.setattr(target, refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The files the cases point at (each made once)."""
    root = tmp_path_factory.mktemp("catalogue")
    out: dict[str, str] = {}
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (200, 30 * i, 30)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a handwritten digit 3")
    out["images"] = str(images)
    (root / "empty").mkdir()
    out["empty"] = str(root / "empty")
    broken = root / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out["broken"] = str(broken)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(root / "model.safetensors"))
    out["model_as_lora"] = str(root / "model.safetensors")
    (root / "notes.safetensors").write_text("not a tensor file")
    out["text_as_lora"] = str(root / "notes.safetensors")
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(root / "ok.safetensors"))
    out["lora"] = str(root / "ok.safetensors")
    (root / "latin1.txt").write_bytes("a digit\ncaf\xe9\n".encode("latin-1"))
    out["latin1"] = str(root / "latin1.txt")
    (root / "utf16.txt").write_bytes("a digit\n".encode("utf-16-le"))  # no BOM: valid UTF-8, with NUL bytes
    out["utf16"] = str(root / "utf16.txt")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out["corrupt_png"] = str(root / "corrupt.png")
    wc = root / "wildcards"
    wc.mkdir()
    (root / "secret.txt").write_text("outside\n")
    (wc / "leak.txt").symlink_to(root / "secret.txt")
    out["wildcards"], out["secret"] = str(wc), str(root / "secret")
    (root / "ckpt_dir").mkdir()
    out["ckpt_dir"] = str(root / "ckpt_dir")
    return out


S, T = "sample", "train"
CASES = [
    # typed values
    (S, ["seed=abc"], ValueError, r"seed must be an integer >= 0, got 'abc'"),
    (S, ["H=big"], ValueError, r"H must be a whole number of pixels, got 'big'"),
    (S, ["steps=0"], ValueError, r"steps must be an integer >= 1"),
    (S, ["batch_size=0"], ValueError, r"batch_size must be an integer >= 1"),
    (S, ["steps=1000000000"], ValueError, r"steps must be at most 10000 \(ComfyUI.s bound\), got 1000000000"),
    (S, ["cpu_threads=-1"], ValueError, r"cpu_threads must be null .* or an integer >= 1, got -1"),
    (T, ["cpu_threads=two"], ValueError, r"cpu_threads must be null .* or an integer >= 1, got 'two'"),
    (S, ["num_images_per_prompt=two"], ValueError, r"num_images_per_prompt"),
    (S, ["strength=nan"], ValueError, r"strength must be finite"),
    (S, ["aesthetic_score=inf"], ValueError, r"aesthetic_score must be finite"),
    (S, ["guider.scale=nan"], Exception, r"scale"),
    (S, ["discretization.rho=0"], Exception, r"rho"),
    (T, ["optimizer.lr=fast"], ValueError, r"optimizer\.lr must be a real number, got 'fast'"),
    (T, ["optimizer.lr=nan"], ValueError, r"optimizer\.lr must be finite"),
    (T, ["trainer.max_steps=-1"], ValueError, r"trainer\.max_steps must be an integer >= 1"),
    (T, ["ema_decay=1.5"], ValueError, r"ema_decay must be in \(0, 1\)"),
    (T, ["lora.rank=0"], ValueError, r"lora\.rank must be >= 1, got 0"),
    (T, ["lora.dropout=1.5"], ValueError, r"lora\.dropout must be in \[0, 1\)"),
    (T, ["data.batch_size=0"], ValueError, r"data\.batch_size must be an integer >= 1"),
    (T, ["data.caption_ext=txt"], ValueError, r"data\.caption_ext must be a file suffix with its dot, such as \.txt"),
    (T, ["data.flip=maybe"], ValueError, r"data\.flip must be true or false, got 'maybe'"),
    (T, ["gradient_checkpointing=maybe"], ValueError, r"gradient_checkpointing must be true or false, got 'maybe'"),
    (T, ["validation.seeds=[]"], ValueError, r"validation\.seeds is empty: give at least one seed"),
    (T, ["validation.seeds=[-1]"], ValueError, r"validation\.seeds\[0\] must be an integer >= 0"),
    # the final file: inside the run folder, a safetensors name, a dtype it can take (not found after training)
    (T, ["output_name=../../x.safetensors"], ValueError, r"output_name must be a file name .* written in the run"),
    (T, ["output_name=x.txt"], ValueError, r"output_name 'x\.txt' must end in \.safetensors"),
    (T, ["~lora", "save_dtype=int8"], ValueError, r"save_dtype: unknown dtype 'int8'"),
    (T, ["save_dtype=float16"], ValueError, r"save_dtype=float16 sets the dtype of a full-training checkpoint"),
    # sizes the network cannot take (one rule: VAE factor x UNet downsampling)
    (S, ["H=36"], ValueError, r"H and W must be positive multiples of 8 .* got 36x32: try 32x32"),
    (S, ["W=4"], ValueError, r"H and W must be positive multiples of 8"),
    (S, ["H=100000"], ValueError, r"H and W must be at most 16384 pixels each .* got 100000x32: try 16384x32"),
    (T, ["data.resolution=20000"], ValueError, r"data\.resolution height and width must be at most 16384 pixels"),
    (T, ["data.resolution=36"], ValueError, r"data\.resolution height and width must be positive multiples of 8"),
    (T, ["data.buckets=true", "data.bucket_step=12"], ValueError, r"data\.bucket_step 12 must be a multiple of 8"),
    # inconsistent options
    (S, ["strength=0.5"], ValueError, r"strength=0\.5 needs init_image=PATH"),
    (S, ["img2img_schedule=first_steps"], ValueError, r"img2img_schedule must be one of"),
    (S, ["refiner=sdxl_refiner", "refiner_switch=1.5"], ValueError, r"refiner_switch must be in \(0, 1\)"),
    (S, ["lora.strengths=[0.5]"], ValueError, r"lora\.strengths has 1 value\(s\) for 0 lora\.files"),
    (S, ["lora.files=[{lora}]", "lora.strengths=[nan]"], ValueError, r"lora\.strengths\[0\] must be finite"),
    (T, ["cache_latents=true", "lora=text_encoders", "data.cache_dir={empty}"], ValueError,
     r"cache_latents=true caches the text encoders' outputs"),
    (T, ["cache_latents=true"], ValueError, r"cache_latents=true needs data\.cache_dir"),
    # files read for what they are
    (S, ["weights.checkpoint=/nonexistent.safetensors"], FileNotFoundError, r"weights\.checkpoint '/nonexistent"),
    (S, ["weights.checkpoint={ckpt_dir}"], IsADirectoryError, r"weights\.checkpoint '.*ckpt_dir' is a directory"),
    (S, ["lora.files=[/nonexistent/a.safetensors]"], FileNotFoundError, r"lora\.files\[0\] '/nonexistent/a"),
    (S, ["lora.files=[{model_as_lora}]"], Exception, r"lora\.files\[0\] '.*model\.safetensors' is not a LoRA file"),
    (S, ["lora.files=[{text_as_lora}]"], Exception, r"lora\.files\[0\] '.*notes\.safetensors' is not a safetensors"),
    (S, ["init_image=/nonexistent.png", "strength=0.5"], FileNotFoundError, r"init_image '/nonexistent\.png'"),
    (S, ["init_image={corrupt_png}", "strength=0.5"], ValueError, r"init_image '.*corrupt\.png' is not a readable"),
    (S, ["prompt_file=/nonexistent/prompts.txt"], FileNotFoundError, r"prompt_file '/nonexistent/prompts\.txt' does not"),
    # a folder where a file belongs is called a folder, not missing (sgm.data.paths.existing_file)
    (S, ["prompt_file={ckpt_dir}"], IsADirectoryError, r"prompt_file '.*ckpt_dir' is a directory, not a text file"),
    (S, ["from_image={ckpt_dir}"], IsADirectoryError, r"from_image '.*ckpt_dir' is a directory, not a PNG file"),
    (S, ["init_image={ckpt_dir}", "strength=0.5"], IsADirectoryError, r"init_image '.*ckpt_dir' is a directory"),
    (S, ["embeddings_dir={corrupt_png}"], NotADirectoryError, r"embeddings_dir '.*corrupt\.png' is a file, not a folder"),
    (T, ["resume={ckpt_dir}"], IsADirectoryError, r"resume checkpoint '.*ckpt_dir' is a directory, not a checkpoint"),
    (S, ["from_image=/nonexistent.png"], FileNotFoundError, r"from_image '/nonexistent\.png' does not exist"),
    (S, ["from_image={corrupt_png}"], ValueError, r"from_image '.*corrupt\.png' is not a readable image"),
    (S, ["images=[10]"], ValueError, r"images: 10 is not the index of one of the run's 10 images"),
    (S, ["model.first_stage.tiled_mode=seamless"], ValueError, r"model\.first_stage\.tiled_mode must be one of"),
    (S, ["prompt_file={model_as_lora}"], ValueError, r"prompt_file '.*model\.safetensors' is not text: byte 1 \(line 1\)"),
    (S, ["prompt_file={utf16}"], ValueError, r"prompt_file '.*utf16\.txt' is not text: .* NUL byte, as in a binary or UTF-16"),
    (S, ["prompt_file={latin1}"], ValueError, r"prompt_file '.*latin1\.txt' is not UTF-8 text: byte \d+"),
    # models that expect weights
    (S, ["model=sdxl_base"], ValueError, r"expects a checkpoint: set weights\.checkpoint=PATH"),
    (T, ["model=sdxl_base", "data.root={images}"], ValueError, r"expects a checkpoint: set weights\.checkpoint"),
    # training data
    (T, ["data.root=/nowhere"], FileNotFoundError, r"data\.root '/nowhere' does not exist"),
    (T, ["data.root={empty}"], RuntimeError, r"data\.root '.*empty' holds no usable training image"),
    (T, ["data.root={broken}"], RuntimeError, r"data\.root '.*broken' holds no usable training image"),
    # wildcards stay inside their folder
    (S, ["prompt=a __{secret}__ digit", "wildcards_dir={wildcards}"], Exception, r"leads outside wildcards_dir"),
    (S, ["prompt=a __leak__ digit", "wildcards_dir={wildcards}"], Exception, r"leads outside wildcards_dir"),
    (S, ["prompt=a __missing__ digit", "wildcards_dir={wildcards}"], FileNotFoundError, r"__missing__"),
]


def _fill(overrides: list[str], files: dict[str, str]) -> list[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: files[m.group(1)], o) for o in overrides]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def previous_run(tmp_path) -> Path:
    """An earlier run's folder (images, metrics, an adapter, Hydra's record); no case may touch it."""
    folder = tmp_path / "previous"
    (folder / ".hydra").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "00000.png")
    (folder / "metrics.json").write_text('{"images": 1}')
    (folder / "lora.safetensors").write_bytes(b"earlier adapter")
    (folder / ".hydra" / "config.yaml").write_text("seed: 1\n")
    before = _snapshot(folder)
    yield folder
    assert _snapshot(folder) == before, "a failing run changed the previous run's folder"


@pytest.mark.parametrize("task, overrides, error, message", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_fails_clearly_before_any_weight_is_read(hydra_runtime, no_weights, files, previous_run, tmp_path,
                                                           task, overrides, error, message):
    base = QUIET + ([f"data.root={files['images']}", "validation.sample_every_n_steps=0"] if task == T else [])
    out = tmp_path / "new"
    cfg = hydra_runtime(task, base + _fill(overrides, files), out)
    with pytest.raises(error, match=message):
        importlib.import_module(TASK[task]).run(cfg)
    assert not list(out.glob("*.png")) and not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("task, extra", [(S, []), (T, []), (T, ["resume=auto"])])
def test_a_run_into_an_occupied_folder_stops_before_hydra_writes(previous_run, task, extra):
    config = hydra_job_config(task, [f"hydra.run.dir={previous_run}", *extra], previous_run)
    with pytest.raises(RunFolderOccupied, match=re.escape(str(previous_run)) + r".*already holds a run.*nothing was"):
        RunFolderGuard().on_run_start(config)


def test_an_invalid_wandb_mode_is_named_before_any_model(hydra_runtime, no_weights, previous_run, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    cfg = hydra_runtime(S, ["progress=false"], tmp_path / "new")
    with pytest.raises(ValueError, match=r"WANDB_MODE='sometimes' is not a W&B mode"):
        importlib.import_module(TASK[S]).run(cfg)


def test_the_catalogue_is_at_least_forty_cases():
    assert len(CASES) + 5 >= 40


def test_credentials_without_a_reachable_server_go_offline_within_seconds(monkeypatch, tmp_path, caplog):
    """A ~/.netrc or WANDB_API_KEY on a node without internet: a refused port, then offline."""
    import socket
    import time

    from sgm.tasks.wandb_logger import make_wandb_logger

    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.perf_counter()
    with caplog.at_level("WARNING", logger="sgm.tasks.wandb_logger"):
        logger = make_wandb_logger(save_dir=str(tmp_path), mode="auto")
    assert time.perf_counter() - start < 10
    assert logger is not None and logger._offline
    assert any("not reachable" in r.getMessage() and "wandb sync" in r.getMessage() for r in caplog.records)


def test_validation_seeds_may_be_empty_only_when_nothing_is_sampled():
    from sgm.tasks.train import check_validation_seeds

    assert check_validation_seeds([], samples=False) == [] and check_validation_seeds([3, 0], samples=True) == [3, 0]
    assert check_validation_seeds(7, samples=True) == [7]
    with pytest.raises(ValueError, match="validation.seeds is empty"):
        check_validation_seeds(None, samples=True)


def test_cpu_threads_values():
    """null and 0 leave the choice to the task (as before); counts may come as strings from a command line."""
    from sgm.tasks.threads import check_cpu_threads

    assert check_cpu_threads(None) is None and check_cpu_threads(0) is None
    assert check_cpu_threads(2) == 2 and check_cpu_threads("3") == 3
    for bad in (-1, 1.5, True, "two"):
        with pytest.raises(ValueError, match="cpu_threads must be null"):
            check_cpu_threads(bad)
