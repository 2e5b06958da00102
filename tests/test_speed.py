"""Speed rules that must not change results: CFG scale 1 without the unconditional call, NCHW
outputs of the spatial transformer, the empty negative prompt without text encoding, fused q/k/v,
the prompt's keys, values and CFG batch made once per sampling run (sgm.networks.reuse)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from hydra.utils import instantiate

from sgm.diffusion.guiders import VanillaCFG
from sgm.diffusion.samplers import EulerCFGPPSampler
from sgm.diffusion.samplers import base as sampler_base
from sgm.networks import reuse
from sgm.networks.attention import CrossAttention
from sgm.networks.compile import fuse_self_attention
from sgm.networks.transformer import BasicTransformerBlock, SpatialTransformer
from sgm.tasks.common import build_engine

STEPS = 3
GUIDERS_SKIPPING = ["cfg", "cfg_rescale", "cfg_interval", "pag", "sag", "apg", "cfg_zero_star", "autoguidance"]


@pytest.fixture(scope="module")
def tiny(compose):
    cfg = compose("sample", ["model=tiny", "sampler=euler", f"steps={STEPS}", "guider=cfg"])
    engine = build_engine(cfg.model, cfg.weights, seed=0)
    return cfg, engine


@pytest.fixture(scope="module")
def digits(compose):
    cfg = compose("sample", ["model=digits"])
    return build_engine(cfg.model, cfg.weights, seed=0)


def _sample(engine, cfg, guider, batch=2):
    """Latents of a short Euler run with ``guider``, the network-call batch sizes and the engine's NFE."""
    sampler = instantiate(cfg.sampler, guider=guider)
    sigmas = engine.schedule(instantiate(cfg.discretization), STEPS)
    cond, uc = engine.get_conditionings(["a red cube"] * batch, [""] * batch, 32, 32)
    batches: list[int] = []
    handle = engine.model.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    engine.network_evaluations = 0
    try:
        z = engine.sample_latents(cond, uc, list(range(batch)), engine.latent_shape(32, 32), sigmas, sampler)
    finally:
        handle.remove()
    return z, batches, engine.network_evaluations


def test_cfg_scale_one_skips_the_unconditional_call(tiny):
    cfg, engine = tiny
    z, batches, nfe = _sample(engine, cfg, VanillaCFG(1.0))
    both = VanillaCFG(1.0)
    both.keep_uncond = True  # the evaluation as it was: uc and c batched, x_u + 1 * (x_c - x_u)
    z_ref, batches_ref, nfe_ref = _sample(engine, cfg, both)
    assert (nfe, batches) == (STEPS, [2] * STEPS)  # one call of batch B per step, not 2B
    assert (nfe_ref, batches_ref) == (STEPS, [4] * STEPS)
    # uc + 1 (c - uc) is c up to float rounding (one ulp at most per step); measured: bit-identical latents here
    # and on the shipped model over 30 steps (max |diff| 0.0)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6 * float(z_ref.abs().max()))


@pytest.mark.parametrize("name", GUIDERS_SKIPPING)
def test_guiders_at_scale_one_evaluate_no_uncond_branch(compose, name):
    guider = instantiate(compose("sample", ["model=tiny", f"guider={name}", "guider.scale=1"]).guider)
    cond, uc = {"crossattn": torch.ones(1, 2, 3)}, {"crossattn": torch.zeros(1, 2, 3)}
    names = [b.name for b in guider.branches(torch.ones(1), cond, uc)]
    assert "uncond" not in names and "cond" in names
    guider.scale = 2.0
    if name != "autoguidance":  # its other branch is the weak model's
        assert "uncond" in [b.name for b in guider.branches(torch.ones(1), cond, uc)]


def test_scale_one_keeps_uncond_where_the_math_needs_it(compose):
    thresholded = instantiate(compose("sample", ["guider=cfg_dynamic_threshold", "guider.scale=1"]).guider)
    cond, uc = {"crossattn": torch.ones(1, 2, 3)}, {"crossattn": torch.zeros(1, 2, 3)}
    assert [b.name for b in thresholded.branches(torch.ones(1), cond, uc)] == ["uncond", "cond"]  # clips at 1 too
    cfg_pp = EulerCFGPPSampler(guider=VanillaCFG(1.0))  # CFG++ at lambda 1 re-noises with the uncond x0
    assert [b.name for b in cfg_pp.guider.branches(torch.ones(1), cond, uc)] == ["uncond", "cond"]
    # the sgm API (prepare_inputs / __call__) stays batched at scale 1, as its callers expect
    x, s, c = VanillaCFG(1.0).prepare_inputs(torch.zeros(1, 4), torch.ones(1), cond, uc)
    assert x.shape[0] == 2 and c["crossattn"].shape[0] == 2


@pytest.mark.parametrize("use_linear", [True, False])
def test_spatial_transformer_returns_nchw(use_linear):
    torch.manual_seed(0)
    block = SpatialTransformer(32, 2, 16, depth=1, context_dim=8, use_linear=use_linear).eval()
    torch.nn.init.normal_(block.proj_out.weight)  # not zero-init, so the transformer's part counts
    x, ctx = torch.randn(2, 32, 4, 6), torch.randn(2, 5, 8)
    with torch.no_grad():
        out = block(x, ctx)
        h = block.norm(x)
        h = h if use_linear else block.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        h = block.proj_in(h) if use_linear else h
        h = block.transformer_blocks[0](h, context=ctx)
        h = block.proj_out(h) if use_linear else h
        h = h.transpose(1, 2).reshape(2, -1, 4, 6)
        h = h if use_linear else block.proj_out(h)
        old = h + x  # the sum as it was written: it took the transposed view's channels-last strides
    assert out.is_contiguous() and not old.is_contiguous()
    assert torch.equal(out, old)


def test_every_unet_convolution_gets_nchw_input(tiny):
    _, engine = tiny
    unet = engine.model.diffusion_model
    layouts: list[bool] = []
    handles = [m.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous()))
               for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 7, 80), torch.randn(1, 224))
    finally:
        for h in handles:
            h.remove()
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} convolutions got another layout"


def _conditionings(engine, negatives, monkeypatch=None):
    """(cond, uc) and how often each text encoder ran; with ``monkeypatch`` the zero shortcut is off
    (``zero_outputs`` returns None, the conditioner's path for embedders that cannot tell their shapes)."""
    calls = {}
    handles = []
    for i, e in enumerate(engine.conditioner.embedders):
        if e.input_key == "txt":
            calls[i] = 0
            handles.append(e.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)))
            if monkeypatch is not None:
                monkeypatch.setattr(e, "zero_outputs", lambda *inputs: None)
    try:
        c, uc = engine.get_conditionings(["a red cube", "a blue sphere"], negatives, 32, 32)
    finally:
        for h in handles:
            h.remove()
    return c, uc, calls


@pytest.mark.parametrize("negatives", [["", ""], ["", "blurry"]])
@pytest.mark.parametrize("model", ["tiny", "digits", "tiny_bf16"])
def test_empty_negative_prompt_skips_the_encoders_bit_for_bit(request, negatives, model, monkeypatch):
    if model == "tiny_bf16":
        engine = request.getfixturevalue("tiny")[1]
        engine.conditioner.to(torch.bfloat16)
        request.addfinalizer(lambda: engine.conditioner.to(torch.float32))
    else:
        engine = request.getfixturevalue(model)[1] if model == "tiny" else request.getfixturevalue(model)
    c, uc, calls = _conditionings(engine, negatives)
    with monkeypatch.context() as mp:
        c_old, uc_old, calls_old = _conditionings(engine, negatives, mp)
    assert calls, "the model has no text encoder"
    for got, want in ((c, c_old), (uc, uc_old)):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    mixed = negatives[1] != ""
    # cond: one run each; uc: none when every negative is empty, one (the non-empty ones' values) when mixed
    assert set(calls.values()) == {2 if mixed else 1}
    assert set(calls_old.values()) == {3 if mixed else 2}


def test_fused_qkv_is_the_same_network(tiny):
    cfg, _ = tiny
    plain = build_engine(cfg.model, cfg.weights, seed=3).model.diffusion_model
    fused = build_engine(cfg.model, cfg.weights, seed=3).model.diffusion_model
    for m in (plain, fused):  # non-zero outputs: zero-initialised projections would hide the attention
        for name, p in m.named_parameters():
            if name.endswith("proj_out.weight") or name.endswith("out.2.weight"):
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    keys = list(fused.state_dict())
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in fused.modules())
    assert fuse_self_attention(fused) == blocks == 7  # one self-attention per transformer block
    assert list(fused.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fused.state_dict().values()))
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 7, 80), torch.randn(2, 224))
    with torch.no_grad():
        want, got = plain(*args), fused(*args)
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # only the summation order of the matmul
        attn = next(m for m in fused.modules() if getattr(m, "qkv", None) is not None)
        attn.to_k.weight.mul_(2)  # an in-place change (a merged LoRA) reaches the fused weight
        assert torch.equal(attn.qkv[attn.to_q.out_features : 2 * attn.to_q.out_features], attn.to_k.weight)
        attn.to_k.weight.div_(2)
        fused.double(), plain.double()  # a cast fuses the cast weights again
        torch.testing.assert_close(fused(*(a.double() for a in args)), plain(*(a.double() for a in args)),
                                   rtol=1e-12, atol=1e-12)
        assert attn.qkv.dtype == torch.float64 and attn.qkv.data_ptr() == attn.to_q.weight.data_ptr()


def test_diffusers_pipeline_on_our_weights_samples_our_latents(compose):
    """The premise of the cpu_vs_diffusers benchmark: diffusers' SDXL pipeline on our (shared) weights, with
    SDXL's Euler scheduler, makes the latents our sampler makes from the same noise."""
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import benchmark_diffusers as bd
    import diffusers_sdxl

    cfg = compose("sample", ["model=tiny", *diffusers_sdxl.MATCHING_SCHEDULE, "guider=cfg", f"steps={STEPS}"])
    engine = build_engine(cfg.model, cfg.weights, seed=0)
    for name, p in engine.model.diffusion_model.named_parameters():  # zero-init outputs would hide the UNet
        if name.endswith("proj_out.weight") or name.endswith("out_layers.3.weight") or name == "out.2.weight":
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    pipe = diffusers_sdxl.pipeline(engine, cfg)
    ours_conv = engine.model.diffusion_model.input_blocks[0][0].weight
    assert pipe.unet.conv_in.weight.data_ptr() == ours_conv.data_ptr()  # shared, not copied
    sigmas = engine.schedule(instantiate(cfg.discretization), STEPS)
    pipe.scheduler.set_timesteps(STEPS)
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), sigmas.float(), rtol=1e-5, atol=1e-6)
    _, ours = bd.run_ours(engine, instantiate(cfg.sampler), sigmas, 2, 32, 32)
    _, theirs = bd.run_diffusers(pipe, STEPS, 5.0, bd.unit_noise(engine, 2, 32, 32), 32, 32)
    assert ours.std() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * float(ours.abs().max()))


def _projection_calls(engine) -> tuple[list, list]:
    """Hooks counting the key projections of the cross-attention layers (those given a context)."""
    calls: list[int] = []
    handles = [m.to_k.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]))
               for m in engine.model.diffusion_model.modules() if isinstance(m, CrossAttention)]
    return calls, handles


@pytest.mark.parametrize("guider", ["cfg", "pag"])
def test_prompt_projections_are_made_once_per_run_with_the_same_latents(tiny, guider, compose, monkeypatch):
    cfg, _ = tiny
    engine = build_engine(cfg.model, cfg.weights, seed=5)
    g = instantiate(compose("sample", ["model=tiny", f"guider={guider}"]).guider)
    for name, p in engine.model.diffusion_model.named_parameters():  # non-zero outputs of every block
        if name.endswith("proj_out.weight") or name.endswith("out.2.weight"):
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    calls, handles = _projection_calls(engine)
    try:
        z, batches, nfe = _sample(engine, cfg, g)
        context_calls = [n for n in calls if n == 77]  # the prompt's 77 tokens; self-attention has 64 positions
        layers = sum(isinstance(m, CrossAttention) for m in engine.model.diffusion_model.modules()) // 2
        # one per cross-attention layer and distinct conditioning batch (PAG: CFG's pair and the perturbed cond)
        assert len(context_calls) == layers * (2 if guider == "pag" else 1)
        if guider == "cfg":  # (PAG's perturbed layers take no self-attention keys)
            assert len(calls) - len(context_calls) == layers * nfe  # self-attention: every call
        calls.clear()
        monkeypatch.setattr(sampler_base, "sampling_run", contextlib.nullcontext)  # each step computes them
        z_plain, _, _ = _sample(engine, cfg, g)
        assert len([n for n in calls if n == 77]) == layers * nfe  # one batched call per branch group
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(z, z_plain)  # the same operations on the same inputs


def test_reuse_only_inside_a_run_without_gradients_and_forgets_freed_inputs():
    made: list[int] = []

    def compute():
        made.append(1)
        return len(made)

    a = torch.ones(3)
    assert reuse.reuse("t", (a,), compute) == 1 and reuse.reuse("t", (a,), compute) == 2  # outside a run
    with reuse.sampling_run():
        entries = reuse._RUN.get()
        with torch.no_grad():
            assert reuse.reuse("t", (a,), compute) == 3
            assert reuse.reuse("t", (a,), compute) == 3  # same tag, same tensor object
            assert reuse.reuse("u", (a,), compute) == 4
            assert reuse.reuse("t", (a.clone(),), compute) == 5  # equal values, another tensor: computed
            with reuse.sampling_run():  # a nested run shares the outer one's entries
                assert reuse.reuse("t", (a,), compute) == 3
        assert reuse.reuse("t", (a,), compute) == 6  # gradients enabled (training): never reused
        del a
        gc.collect()
        assert not [k for k in entries if k[0] == "t"]  # freed input: its entries went with it
    assert reuse._RUN.get() is None and not entries
