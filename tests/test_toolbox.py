"""Every sampler, schedule and guider config composes and samples with the shipped digit model.

Each part's oracle (k-diffusion, diffusers, its formula) is in its own test file; this file checks
the configs as ``python run.py sampler=NAME`` (and ``discretization=``, ``guider=``) builds them,
on the real shipped weights, with the engine's network-evaluation count.
"""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from sgm.tasks.common import build_engine

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
# guiders that need more than the run's own model (a second engine) are tested in their own files
NEEDS_MORE = {"guider": {"autoguidance"}}


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem not in NEEDS_MORE.get(group, ()))


@pytest.fixture(scope="module")
def shipped(compose):
    cfg = compose("sample")
    return build_engine(cfg.model, cfg.weights, seed=0)


def _sample(engine, cfg):
    sampler = instantiate(cfg.sampler)
    engine.network_evaluations = 0
    with torch.no_grad():
        c, uc = engine.get_conditionings(PROMPTS, [""] * len(PROMPTS), cfg.H, cfg.W)
        sigmas = engine.schedule(instantiate(cfg.discretization), cfg.steps)
        z = engine.sample_latents(c, uc, [0, 1], engine.latent_shape(cfg.H, cfg.W), sigmas, sampler)
    return z, engine.network_evaluations


@pytest.mark.parametrize("group, name", [(g, n) for g in ("sampler", "discretization", "guider") for n in _options(g)])
def test_config_samples_the_shipped_model(compose, shipped, group, name):
    """Every option composes, builds an sgm class (a sampler integrates the schedule it is given) and samples."""
    cfg = compose("sample", [f"{group}={name}", "steps=4", "progress=false"])
    obj = instantiate(cfg[group])
    assert type(obj).__module__.startswith("sgm."), (group, name, obj)
    if group == "sampler":
        assert obj.discretization is None and obj.num_steps is None
    z, nfe = _sample(shipped, cfg)
    assert z.shape == (2, *shipped.latent_shape(cfg.H, cfg.W)) and torch.isfinite(z).all(), (group, name)
    assert nfe >= 1, (group, name)
