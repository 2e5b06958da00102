"""The seams of the redesign: parts through the engine's constructor, the callbacks group,
validation samples that follow the run's sampler / guider / discretization, one
unconditional-branch rule, one noise rule."""

import functools

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from sgm.diffusion.loss import StandardDiffusionLoss
from sgm.diffusion.noise import gaussian, seeded_generators
from sgm.engine import DiffusionEngine
from sgm.networks.wrapper import OpenAIWrapper
from sgm.tasks.callbacks import SampleImages, SaveFinalWeights
from sgm.tasks.common import build_engine, instantiate_callbacks


@pytest.fixture(scope="module")
def tiny_cfg(compose):
    return compose("sample", ["model=tiny"])


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    return build_engine(tiny_cfg.model, tiny_cfg.weights, seed=0)


class CountingWrapper(OpenAIWrapper):
    """A network wrapper of our own, as sgm's ``network_wrapper`` names one."""

    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)


def _engine_with(tiny_cfg, **kwargs) -> DiffusionEngine:
    torch.manual_seed(0)
    return instantiate(tiny_cfg.model, **kwargs)


def test_network_wrapper_is_honoured_or_rejected(tiny_cfg):
    sgm_path = _engine_with(tiny_cfg, network_wrapper="sgm.modules.diffusionmodules.wrappers.OpenAIWrapper")
    assert type(sgm_path.model) is OpenAIWrapper
    ours = _engine_with(tiny_cfg, network_wrapper=f"{__name__}.CountingWrapper")
    assert type(ours.model).__name__ == "CountingWrapper"
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([1.0])
    cond, _ = ours.get_conditionings(["a red cube"], [""], 32, 32)
    before = CountingWrapper.calls
    ours.denoise(x, sigma, cond)
    assert CountingWrapper.calls == before + 1
    with pytest.raises(Exception, match="not an nn.Module class"):
        _engine_with(tiny_cfg, network_wrapper="collections.OrderedDict")
    with pytest.raises(Exception, match="cannot be imported"):
        _engine_with(tiny_cfg, network_wrapper="nowhere.Wrapper")


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_compile_model_keeps_the_original_state_dict_keys(tiny_cfg, tiny):
    compiled = _engine_with(tiny_cfg, compile_model=True)
    assert len(compiled.model._compiled) == 1  # torch.compile is lazy: nothing compiles until a call
    assert set(compiled.state_dict()) == set(tiny.state_dict())


def test_loss_optimizer_and_schedule_reach_the_engine_through_its_constructor(compose):
    cfg = compose("train", ["model=tiny", "lr_scheduler=cosine"])
    engine = build_engine(cfg.model, cfg.weights, loss_fn=cfg.loss, optimizer=cfg.optimizer,
                          lr_scheduler=cfg.lr_scheduler)
    assert isinstance(engine.loss_fn, StandardDiffusionLoss)
    opt = engine.optimizer_factory([nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == cfg.optimizer.lr
    assert engine.lr_scheduler_factory(opt) is not None


def test_sgm_optimizer_config_is_honoured(tiny_cfg):
    engine = _engine_with(tiny_cfg, optimizer_config={"target": "torch.optim.SGD", "params": {"lr": 0.5}})
    assert isinstance(engine.optimizer_factory, functools.partial)
    opt = engine.optimizer_factory([nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.5


def test_validation_samples_follow_the_runs_sampler_guider_and_schedule(hydra_runtime, tiny, tmp_path):
    cfg = hydra_runtime("train", ["model=tiny", "sampler=heun", "guider=cfg_rescale", "guider.scale=2.5",
                                  "discretization.rho=5", "validation.steps=3", "validation.prompts=[a red cube]"])
    callbacks = instantiate_callbacks(cfg.callbacks, mode="lora", run_config="x: 1")
    (sample_images,) = [c for c in callbacks if isinstance(c, SampleImages)]
    (final,) = [c for c in callbacks if isinstance(c, SaveFinalWeights)]
    assert type(sample_images.sampler).__name__ == "HeunEDMSampler"
    assert type(sample_images.sampler.guider).__name__ == "RescaledCFG" and sample_images.sampler.guider.scale == 2.5
    assert sample_images.discretization.rho == 5 and sample_images.steps == 3
    assert sample_images.out_dir == tmp_path / "samples" and final.path.parent == tmp_path
    tiny.network_evaluations = 0
    images = sample_images.sample(tiny)
    assert images.shape == (1, 3, 32, 32)
    assert tiny.network_evaluations == 3 + 2  # Heun: two evaluations a step, none at sigma 0


def test_a_callback_value_the_task_must_fill_is_named(hydra_runtime):
    cfg = hydra_runtime("train", ["model=tiny"])
    with pytest.raises(ValueError, match=r"callbacks.final_weights needs \['mode'\]"):
        instantiate_callbacks(cfg.callbacks, run_config="")


def test_sample_config_attaches_the_image_writer(hydra_runtime, tmp_path):
    cfg = hydra_runtime("sample", ["model=tiny"])
    (writer,) = instantiate_callbacks(cfg.callbacks, total_images=2, provenance={}, extra_metrics={},
                                      image_metrics=None, parameters=None)
    assert type(writer).__name__ == "ImageWriter" and writer.out_dir == tmp_path


def test_one_unconditional_branch_rule(tiny):
    """An empty caption zeroes the text embeddings (uc_zero_keys) per sample, in any batch."""
    batch = tiny.make_batch(["a red cube", ""], 32, 32)
    mixed = tiny.conditioning(batch, tiny.empty_captions(batch["txt"]))
    alone_c = tiny.conditioning(tiny.make_batch(["a red cube"], 32, 32))
    alone_u = tiny.conditioning(tiny.make_batch([""], 32, 32), tiny.empty_captions([""]))
    for k in mixed:
        torch.testing.assert_close(mixed[k][:1], alone_c[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed[k][1:], alone_u[k], rtol=0, atol=1e-6)
    assert torch.count_nonzero(alone_u["crossattn"]) == 0
    _, uc = tiny.get_conditionings(["a red cube"], [""], 32, 32)
    torch.testing.assert_close(uc["crossattn"], alone_u["crossattn"], rtol=0, atol=0)


def test_one_noise_rule_per_image():
    seeds = [3, 4, 5]
    batch = gaussian((3, 2, 4), seeded_generators(seeds))
    assert torch.equal(batch[1], torch.randn((2, 4), generator=torch.Generator().manual_seed(4)))
    assert torch.equal(gaussian((1, 2, 4), seeded_generators([4]))[0], batch[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        gaussian((3, 2), seeded_generators([1, 2]))
