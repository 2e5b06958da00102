"""Hires fix (sgm.tasks.hires): sizes, step counts (network calls), the second pass's size
conditioning and seeds, latent and pixel upscaling, and its parameters checked before weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sgm.engine import DiffusionEngine
from sgm.tasks.hires import HiresFix, lanczos_resize

from test_sample_reliability import QUIET, WeightsRead, no_weights, previous_run, run_sample  # noqa: F401

RUN = ["~metrics", "steps=6", "prompt=a handwritten digit two", "num_images_per_prompt=1"]


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture
def sizes_seen(monkeypatch):
    """The (height, width) of every conditioning batch the engine makes (its size conditioning)."""
    seen = []
    original = DiffusionEngine.make_batch

    def spy(self, prompts, height, width, *args, **kwargs):
        seen.append((height, width))
        return original(self, prompts, height, width, *args, **kwargs)

    monkeypatch.setattr(DiffusionEngine, "make_batch", spy)
    return seen


@pytest.mark.parametrize("overrides, nfe", [
    (["hires=latent"], 6 + 3),                                   # round(0.5 * 6)
    (["hires=latent", "hires.steps=10", "hires.strength=0.3"], 6 + 3),  # round(0.3 * 10)
    (["hires=latent", "hires.upscale_method=nearest-exact", "hires.strength=1"], 6 + 6),
])
def test_latent_hires_runs_the_second_pass_at_the_larger_size(tmp_path, sizes_seen, overrides, nfe):
    out = tmp_path / "run"
    run_sample(out, *RUN, *overrides)
    assert Image.open(out / "00000.png").size == (48, 48)  # 32 x 1.5
    metrics = _metrics(out)
    assert metrics["network_evaluations_per_batch"] == nfe and (metrics["hires_H"], metrics["hires_W"]) == (48, 48)
    assert sizes_seen == [(32, 32)] * 2 + [(48, 48)] * 2  # cond and uc of each pass


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_pixel_hires_with_an_upscaler_module_then_lanczos(tmp_path):
    out = tmp_path / "up"
    run_sample(out, *RUN, "hires=pixel", "hires.scale=2", "hires.upscaler={_target_:torch.nn.Upsample,scale_factor:3}",
               "hires.strength=0.5")  # 32 -> 96 by the module -> 64 by Lanczos
    assert Image.open(out / "00000.png").size == (64, 64) and _metrics(out)["network_evaluations_per_batch"] == 9


@pytest.mark.slow
def test_hires_is_seeded(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run_sample(out, *RUN, "hires=latent", "hires.scale=1.25")  # 40: a multiple of 8
    assert Image.open(a / "00000.png").size == (40, 40)
    assert np.array_equal(np.asarray(Image.open(a / "00000.png")), np.asarray(Image.open(b / "00000.png")))


def test_target_size_rounds_to_the_size_multiple(caplog):
    hires = HiresFix(scale=1.3)
    with caplog.at_level("INFO", logger="sgm.tasks.hires"):
        assert hires.target_size(32, 48, 8) == (40, 64)  # 41.6 -> 40, 62.4 -> 64
    assert "41.6 rounded to 40" in caplog.text
    assert HiresFix(scale=1.01).target_size(32, 32, 8) == (40, 40)  # always at least one multiple larger


def test_lanczos_resize_is_pils_on_float_images():
    x = torch.rand(2, 3, 8, 10, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = lanczos_resize(x, 12, 15)
    ref = Image.fromarray(x[1, 2].numpy(), "F").resize((15, 12), Image.Resampling.LANCZOS)
    assert out.shape == (2, 3, 12, 15)
    np.testing.assert_array_equal(out[1, 2].numpy(), np.asarray(ref))


@pytest.mark.parametrize("overrides, message", [
    (["hires=latent", "hires.scale=1"], "hires.scale must be > 1"),
    (["hires=latent", "hires.scale=0.5"], "hires.scale must be > 1"),
    (["hires=latent", "hires.strength=0"], r"hires.strength must be in \(0, 1\]"),
    (["hires=latent", "hires.strength=1.5"], r"hires.strength must be in \(0, 1\]"),
    (["hires=latent", "hires.steps=0"], "hires.steps must be an integer >= 1"),
    (["hires=latent", "hires.upscale_method=lanczos"], "upscale_method for hires=latent must be one of"),
    (["hires=pixel", "hires.upscale_method=bicubic"], "upscale_method for hires=pixel must be one of"),
])
def test_bad_hires_input_fails_before_weights(no_weights, previous_run, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_sample(previous_run, *overrides)


def test_hires_with_a_mask_is_refused(no_weights, previous_run, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "i.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match="hires with mask/outpaint is not supported"):
        run_sample(previous_run, "hires=latent", f"init_image={tmp_path / 'i.png'}", f"mask={tmp_path / 'm.png'}")
