"""The CPU convolution policy (``cpu_onednn``, sgm/networks/onednn.py): the rule, the scoped switch,
equal latents with and without oneDNN, and run.py's use of it."""

import logging

import pytest
import torch

from sgm.networks.onednn import (SMALL_BATCH_POSITIONS, auto_onednn, check_cpu_onednn, onednn_context,
                                 resolve_onednn)


@pytest.fixture(scope="module")
def tiny(compose):
    """The tiny model's engine (random weights) with the output convolution randomised too (it is
    zero-initialised, which would make every UNet output 0 whatever the convolutions compute)."""
    from sgm.tasks.common import build_engine

    cfg = compose("sample", ["model=tiny", "guider=cfg", "guider.scale=5.0", "steps=3", "progress=false"])
    engine = build_engine(cfg.model, cfg.weights, seed=0).eval()
    with torch.no_grad():
        for p in engine.model.diffusion_model.out.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return cfg, engine


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("AUTO", "auto"), (None, "auto"), (True, True),
                                             (False, False)])
def test_check_accepts(value, expected):
    assert check_cpu_onednn(value) == expected


@pytest.mark.parametrize("value", ["yes", 1, 0, "off"])
def test_check_names_the_parameter(value):
    with pytest.raises(ValueError, match="cpu_onednn must be auto, true or false"):
        check_cpu_onednn(value)


def test_auto_rule():
    per_image = 8 * 8  # the shipped model / tiny at 32x32 pixels
    assert SMALL_BATCH_POSITIONS == 2 * per_image
    assert auto_onednn((1, 4, 8, 8), torch.float32) is False  # one or two images: ATen's kernels
    assert auto_onednn((2, 4, 8, 8), torch.float32) is False
    assert auto_onednn((3, 4, 8, 8), torch.float32) is True  # from three images (CFG batch 6): oneDNN
    assert auto_onednn((8, 4, 8, 8), torch.float32) is True  # a batch of 8 images
    assert auto_onednn((1, 4, 16, 16), torch.float32) is True  # one 64x64 image
    assert auto_onednn((1, 4, 128, 128), torch.float32) is True  # SDXL at 1024x1024
    assert auto_onednn((2, 4, 8, 8), torch.bfloat16) is True


def test_resolve():
    x = torch.zeros(1, 4, 4, 4)
    assert resolve_onednn(None, x, torch.float32) is None  # a library engine: torch's setting stays
    assert resolve_onednn("auto", x, torch.float32) is False
    assert resolve_onednn(True, x, torch.float32) is True
    assert resolve_onednn("auto", torch.zeros(1, 4, 32, 32), torch.float32) is True
    assert resolve_onednn(False, torch.zeros(1, 4, 4, 4, device="meta"), torch.float32) is None  # not a CPU latent


def test_context_is_scoped():
    mk = torch.backends.mkldnn
    before = (mk.enabled, mk.deterministic, mk.allow_tf32)
    with onednn_context(not before[0]):
        assert mk.enabled is (not before[0])
        assert (mk.deterministic, mk.allow_tf32) == before[1:]  # only the on/off flag changes
    assert (mk.enabled, mk.deterministic, mk.allow_tf32) == before
    with pytest.raises(RuntimeError), onednn_context(not before[0]):
        raise RuntimeError("inside")
    assert mk.enabled is before[0]
    with onednn_context(None):
        assert mk.enabled is before[0]


def _sample(engine, cfg, setting):
    """Latents of a 3-step CFG run at 32x32 pixels, and the oneDNN flag seen by each network call."""
    from hydra.utils import instantiate

    seen = []
    handle = engine.model.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.mkldnn.enabled))
    engine.cpu_onednn = setting
    try:
        with torch.inference_mode():
            cond, uc = engine.get_conditionings(["a photo"], [""], 32, 32)
            z = engine.sample_latents(cond, uc, [0], engine.latent_shape(32, 32),
                                      engine.schedule(instantiate(cfg.discretization), 3), instantiate(cfg.sampler))
    finally:
        handle.remove()
        engine.cpu_onednn = None
    return z, seen


def test_sampling_with_and_without_onednn_agree(tiny):
    cfg, engine = tiny
    assert torch.backends.mkldnn.enabled
    z_on, seen_on = _sample(engine, cfg, True)
    z_off, seen_off = _sample(engine, cfg, False)
    z_auto, seen_auto = _sample(engine, cfg, "auto")
    assert seen_on == [True] * 3 and seen_off == [False] * 3 and seen_auto == [False] * 3  # 4x4 latent: off
    assert torch.backends.mkldnn.enabled  # restored after sampling
    assert torch.equal(z_off, z_auto)
    gap = float((z_on - z_off).abs().max() / z_on.abs().max())
    assert 0 < z_on.abs().max() and gap < 1e-5, gap  # float rounding only (measured ~3e-7)


def test_run_applies_the_policy(run_task, tmp_path, caplog):
    """run.py's default (``cpu_onednn: auto``) samples one of the shipped model's 8x8 latents without oneDNN
    and a batch of four with it; ``cpu_onednn=true`` keeps it; a bad value fails in the validate step, before
    the run folder has images."""
    quiet = ["progress=false", "~logger", "~metrics", "steps=2", "prompts=[three]"]
    with caplog.at_level(logging.DEBUG, logger="sgm.networks.onednn"):
        run_task("sample", quiet, tmp_path / "auto")
        assert "CPU convolutions without oneDNN (cpu_onednn=auto" in caplog.text
        caplog.clear()
        run_task("sample", [*quiet, "num_images_per_prompt=4"], tmp_path / "batch")
        assert "CPU convolutions with oneDNN (cpu_onednn=auto, latent (4, 4, 8, 8)" in caplog.text
        caplog.clear()
        run_task("sample", [*quiet, "cpu_onednn=true"], tmp_path / "on")
        assert "CPU convolutions with oneDNN (cpu_onednn=True" in caplog.text
    assert torch.backends.mkldnn.enabled
    with pytest.raises(ValueError, match="cpu_onednn must be auto, true or false"):
        run_task("sample", [*quiet, "cpu_onednn=maybe"], tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("**/*.png"))
