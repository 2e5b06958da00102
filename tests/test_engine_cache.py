"""reuse_engine (sgm.tasks.engine_cache): a multirun's jobs share the loaded model when nothing that built it
changed, sample exactly what a fresh model samples, and never reuse a stale one (LoRA, patch, seed, checkpoint).

Runs go in-process through conftest's ``run_task`` with ``reuse_engine=true`` (a RUN job; ``auto`` turns it on
in MULTIRUN mode, checked directly and through a real ``run.py -m``). Images are compared as the float tensors
``predict_step`` returns (a callback keeps them), not as 8-bit PNGs.
"""

from __future__ import annotations

import gc
import os
import shutil
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT, hydra_job_config, preserved_globals, run_script
from sgm.tasks import common, engine_cache

QUIET = ["~logger", "progress=false", "~metrics", "steps=2", "prompts=[three]"]
LORA_MODULE = "lora_unet_input_blocks_1_1_proj_in"  # a 64 -> 64 linear layer of the shipped digit UNet


class KeepImages(L.Callback):
    """Saves the run's images (float, as predict_step returns them) to ``path``."""

    def __init__(self, path: str):
        self.path, self.images = path, []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.images.append(outputs["images"])

    def on_predict_end(self, trainer, pl_module):
        torch.save(torch.cat(self.images), self.path)


@pytest.fixture(autouse=True)
def empty_cache():
    """Each test starts and ends with no engine kept (other tests' runs must not meet one)."""
    engine_cache.clear()
    yield
    engine_cache.clear()


def sample(run_task, out: Path, *overrides: str) -> tuple[torch.Tensor, object, str]:
    """One in-process run into ``out``: (its images, the model kept afterwards, its job log)."""
    keep = f"+callbacks.keep={{_target_:test_engine_cache.KeepImages,path:'{out / 'images.pt'}'}}"
    run_task("sample", [*QUIET, keep, *overrides], out)
    return torch.load(out / "images.pt"), engine_cache.loaded("model"), (out / "run.log").read_text()


def test_a_bad_reuse_engine_value_is_named_before_any_weight(run_task, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "build_engine", lambda *a, **k: pytest.fail("a model was built"))
    for value, shown in (("maybe", "'maybe'"), ("1", "1")):
        with pytest.raises(ValueError, match=r"reuse_engine must be auto \(keep the loaded model between the jobs of "
                                             rf"a multirun\), true or false, got {shown}$"):
            run_task("sample", [*QUIET, f"reuse_engine={value}"], tmp_path / value, files=False)
        assert not list((tmp_path / value).glob("*.png"))


def test_auto_reuses_in_a_multirun_only(tmp_path):
    cfg = hydra_job_config("sample", [], tmp_path)
    with preserved_globals():
        HydraConfig.instance().set_config(cfg)
        assert engine_cache.check_reuse_engine("auto") is False
        assert engine_cache.check_reuse_engine(True) is True
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(cfg)
        assert engine_cache.check_reuse_engine("auto") is True
        assert engine_cache.check_reuse_engine(False) is False


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_other_scale_and_sampler_reuse_the_model_and_sample_what_a_fresh_one_does(run_task, tmp_path):
    """The first run sets every per-run state there is (img2img, hires, CFG 1); the second, another
    sampler and scale, must sample on the same engine exactly what a fresh engine samples."""
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 200, 200)).save(init)
    _, first, log_a = sample(run_task, tmp_path / "a", "reuse_engine=true", "guider.scale=1", f"init_image='{init}'",
                             "strength=0.5", "hires=latent", "hires.scale=2")
    assert "model built in" in log_a and "reusing" not in log_a
    images, second, log_b = sample(run_task, tmp_path / "b", "reuse_engine=true", "guider.scale=5", "sampler=heun")
    assert second is first and "reusing the loaded model (job 0)" in log_b and "model built in" not in log_b
    assert first._init_image is None and first._hires is None  # as a fresh engine has them
    fresh, kept, log_c = sample(run_task, tmp_path / "c", "reuse_engine=false", "guider.scale=5", "sampler=heun")
    assert kept is None and "model built in" in log_c  # reuse off keeps nothing (and dropped the kept one)
    assert images.shape == (1, 3, 32, 32) and torch.equal(images, fresh)


def _random_lora(path: Path) -> Path:
    """A kohya LoRA file for one layer of the shipped digit UNet, with weights that move its images."""
    g = torch.Generator().manual_seed(0)
    save_file({f"{LORA_MODULE}.lora_down.weight": 0.3 * torch.randn(4, 64, generator=g),
               f"{LORA_MODULE}.lora_up.weight": 0.3 * torch.randn(64, 4, generator=g),
               f"{LORA_MODULE}.alpha": torch.tensor(4.0)}, str(path))
    return path


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_lora_and_patch_build_anew_and_a_later_plain_run_is_not_polluted(run_task, tmp_path):
    plain, e0, _ = sample(run_task, tmp_path / "plain", "reuse_engine=true")
    ref = weakref.ref(e0)
    del e0
    lora = _random_lora(tmp_path / "lora.safetensors")
    with_lora, e1, log = sample(run_task, tmp_path / "lora", "reuse_engine=true", f"lora.files=['{lora}']")
    assert "the model's lora changed since the last job" in log and "model built in" in log
    gc.collect()
    assert ref() is None  # the old engine was dropped, not kept beside the new one
    assert not torch.equal(with_lora, plain)  # the LoRA moved the images
    again, e2, log = sample(run_task, tmp_path / "again", "reuse_engine=true")
    assert e2 is not e1 and "model built in" in log and torch.equal(again, plain)  # no merged LoRA left behind
    freeu, e3, log = sample(run_task, tmp_path / "freeu", "reuse_engine=true", "patches=[freeu]")
    assert e3 is not e2 and "the model's patches changed" in log and e3.model.patches
    assert not torch.equal(freeu, plain)
    after, e4, log = sample(run_task, tmp_path / "after", "reuse_engine=true")
    assert e4 is not e3 and not e4.model.patches and torch.equal(after, plain)


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_random_weights_of_another_seed_build_anew(run_task, tmp_path):
    _, e0, _ = sample(run_task, tmp_path / "a", "model=tiny", "reuse_engine=true", "seed=1")
    seed1 = {k: v.clone() for k, v in e0.state_dict().items()}
    _, e1, log = sample(run_task, tmp_path / "b", "model=tiny", "reuse_engine=true", "seed=1", "guider.scale=2")
    assert e1 is e0 and "reusing the loaded model" in log
    _, e2, log = sample(run_task, tmp_path / "c", "model=tiny", "reuse_engine=true", "seed=2")
    assert e2 is not e1 and "the model's weights changed" in log
    assert any(not torch.equal(v, seed1[k]) for k, v in e2.state_dict().items())  # seed 2's weights


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_another_or_a_rewritten_checkpoint_builds_anew(run_task, tmp_path):
    ckpt = tmp_path / "digits_copy.safetensors"
    shutil.copyfile(ROOT / "sgm" / "assets" / "digits.safetensors", ckpt)
    shipped, e0, _ = sample(run_task, tmp_path / "shipped", "reuse_engine=true")
    copy, e1, log = sample(run_task, tmp_path / "copy", "reuse_engine=true", f"weights.checkpoint='{ckpt}'")
    assert e1 is not e0 and "the model's weights changed" in log
    same, e2, log = sample(run_task, tmp_path / "same", "reuse_engine=true", f"weights.checkpoint='{ckpt}'")
    assert e2 is e1 and "reusing the loaded model" in log
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file rewritten in place
    _, e3, log = sample(run_task, tmp_path / "touched", "reuse_engine=true", f"weights.checkpoint='{ckpt}'")
    assert e3 is not e2 and "the model's weights changed" in log
    assert torch.equal(shipped, copy) and torch.equal(copy, same)  # the same tensors, however loaded


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_weak_model_is_reused_with_the_model_and_dropped_without_it(run_task, tmp_path):
    images, e0, _ = sample(run_task, tmp_path / "a", "reuse_engine=true", "guider=autoguidance")
    weak = engine_cache.loaded("weak")
    assert weak is not None and weak.conditioner is e0.conditioner
    again, e1, log = sample(run_task, tmp_path / "b", "reuse_engine=true", "guider=autoguidance")
    assert e1 is e0 and engine_cache.loaded("weak") is weak and "reusing the loaded weak (job 0)" in log
    assert torch.equal(images, again)
    sample(run_task, tmp_path / "c", "reuse_engine=true")
    assert engine_cache.loaded("weak") is None and engine_cache.loaded("model") is e0


@pytest.mark.slow
def test_a_real_multirun_reuses_the_model_for_job_1(tmp_path, capfd):
    """``python run.py -m guider.scale=1,5``: the script's own ``__main__`` in this process (conftest.run_script),
    Hydra's sweeper and basic launcher running both jobs in it, as they do in ``python run.py -m``."""
    code = run_script("run.py", ["-m", "guider.scale=1,5", *QUIET, "cpu_threads=1", f"hydra.sweep.dir={tmp_path}"])
    shown = capfd.readouterr()
    assert code == 0, shown.err[-3000:]
    job0, job1 = ((tmp_path / str(n) / "run.log").read_text() for n in (0, 1))
    assert "model built in" in job0 and "reusing" not in job0
    assert "reusing the loaded model (job 1)" in job1 and "model built in" not in job1
    assert "reusing the loaded model (job 1)" in shown.out + shown.err  # on the console too
