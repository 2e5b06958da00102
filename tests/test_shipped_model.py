"""The shipped default: sgm/assets/digits.safetensors, judged by the shipped digit classifier."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors import safe_open

from sgm import asset
from sgm.metrics.digits import DIGIT_WORDS, DigitMetrics
from sgm.tasks.common import build_engine

WEIGHTS = Path(asset("digits.safetensors"))


@pytest.fixture(scope="module")
def cfg(compose):
    return compose("sample")


@pytest.fixture(scope="module")
def shipped(cfg):
    return build_engine(cfg.model, cfg.weights, seed=0)


def _sample(engine, cfg, prompts, seeds):
    sampler = instantiate(cfg.sampler)
    with torch.no_grad():
        c, uc = engine.get_conditionings(prompts, [""] * len(prompts), cfg.H, cfg.W)
        sigmas = engine.schedule(instantiate(cfg.discretization), cfg.steps)
        z = engine.sample_latents(c, uc, seeds, engine.latent_shape(cfg.H, cfg.W), sigmas, sampler)
        return engine.decode_first_stage(z).clamp(-1, 1)


def test_shipped_file_is_small_single_file_in_the_original_layout(cfg, shipped):
    assert cfg.weights.checkpoint == str(WEIGHTS) and WEIGHTS.is_file()
    assert WEIGHTS.stat().st_size < 20 * 2**20
    with safe_open(str(WEIGHTS), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16
        assert "sgm_config" in f.metadata()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "conditioner", "first_stage_model"}
    # both text-encoder kinds, in the layouts of the original SDXL file
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # size conditioning (vector input)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert all(p.dtype == torch.float32 for p in shipped.parameters())  # weights.dtype=float32


@pytest.mark.slow  # 120 images at the default 30 steps
def test_default_settings_draw_the_prompted_digits(compose, cfg, shipped):
    """The default run's prompts and sampler, 10 seeds each: the classifier agrees >= 95%, and the
    Frechet distance is a tenth of an untrained model's (two images per digit in 5 steps: its distance is
    that of noise, far beyond the threshold whatever the sample size or step count)."""
    prompts = [p for p in cfg.prompts for _ in range(10)]
    images = _sample(shipped, cfg, prompts, list(range(len(prompts))))
    metrics = DigitMetrics()(images, prompts)
    assert metrics["accuracy"] >= 0.95, metrics
    untrained_cfg = compose("sample", ["weights.checkpoint=null", "weights.random=true", "steps=5"])
    untrained = build_engine(untrained_cfg.model, untrained_cfg.weights, seed=0)
    baseline = DigitMetrics()(_sample(untrained, untrained_cfg, prompts[::5], list(range(0, len(prompts), 5))),
                              prompts[::5])
    assert metrics["frechet_distance"] < 0.1 * baseline["frechet_distance"], (metrics, baseline)


@pytest.mark.slow  # 30 images at the default 30 steps
def test_numerals_and_words_name_the_same_digit(cfg, shipped):
    prompts = [f"a handwritten digit {d}" for d in range(10) for _ in range(3)]
    images = _sample(shipped, cfg, prompts, list(range(100, 130)))
    assert DigitMetrics()(images, prompts)["accuracy"] >= 0.9
    assert DIGIT_WORDS[3] == "three"
