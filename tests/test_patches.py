"""The guider/network seam: transformer_options and network patches, PAG and FreeU against diffusers."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from hydra.utils import instantiate

from sgm.diffusion import DiscreteDenoiser, EpsScaling, LegacyDDPMDiscretization, VanillaCFG
from sgm.diffusion.pag import PAGGuider, select_layers
from sgm.diffusion.schedule import initial_latent, sampling_sigmas
from sgm.networks import CrossAttention, UNetModel
from sgm.networks.freeu import FreeU
from sgm.networks.patches import UNetPatch, apply_patches
from sgm.networks.wrapper import OpenAIWrapper

from _nets_convert import diffusers_unet_config, unet_to_diffusers
from test_networks import SDXL_BASE, TINY, _randomize, _shapes, _tsv, _unet_inputs

log = logging.getLogger(__name__)
ATTN_LEVELS = [False, True]  # TINY: attention at the second level only


@pytest.fixture(scope="module")
def nets():
    """Our tiny SDXL-like UNet at random weights, in its wrapper, and the diffusers state dict of it."""
    unet = UNetModel(**TINY).eval()
    _randomize(unet)
    sd = unet_to_diffusers(unet.state_dict(), TINY["num_res_blocks"], len(TINY["channel_mult"]))
    return OpenAIWrapper(unet), sd


def _diffusers_unet(sd):
    from diffusers import UNet2DConditionModel

    theirs = UNet2DConditionModel(**diffusers_unet_config(TINY, ATTN_LEVELS)).eval()
    theirs.load_state_dict(sd, strict=True)
    return theirs


def _conds(size: int = 16):
    inp = _unet_inputs(TINY, size=size)
    g = torch.Generator().manual_seed(2)
    cond = {"crossattn": inp["context"], "vector": inp["y"]}
    uc = {"crossattn": torch.randn(inp["context"].shape, generator=g), "vector": torch.randn(inp["y"].shape, generator=g)}
    return inp, cond, uc


# ---------------------------------------------------------------- plumbing

def test_state_dict_keys_unchanged_and_layers_named():
    with torch.device("meta"):
        model = UNetModel(**SDXL_BASE)
    assert _shapes(model) == _tsv("sd_xl_base_1.0", "model.diffusion_model.")
    names = {name for name, m in model.named_modules() if isinstance(m, CrossAttention)}
    assert all(m.name == name for name, m in model.named_modules() if isinstance(m, CrossAttention))
    assert "middle_block.1.transformer_blocks.0.attn1" in names and len(names) == 2 * 70
    assert model.block_positions["middle_block"] == ("mid", 0, 0)
    assert model.block_positions["input_blocks.7"] == ("down", 2, 0)
    assert model.block_positions["output_blocks.0"] == ("up", 0, 0)


class _Recorder(torch.nn.Module):
    """A network without a transformer_options argument, recording what it gets."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls: list[dict] = []

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        self.calls.append(kwargs)
        return x * self.w


def test_no_patches_pass_no_options():
    net = _Recorder()
    wrapper = OpenAIWrapper(net)
    x, t = torch.randn(2, 4, 2, 2), torch.ones(2)
    wrapper(x, t, {"crossattn": torch.randn(2, 3, 8)})
    assert net.calls[-1] == {}
    guider = VanillaCFG(5.0)
    guider.guide(lambda x, s, c: wrapper(x, s, c), x, t, {"vector": torch.ones(2, 3)}, {"vector": torch.zeros(2, 3)})
    assert net.calls[-1] == {}  # plain CFG: one call, no options

    branch_patch, net_patch = UNetPatch(), FreeU()
    wrapper(x, t, {"transformer_options": {"patches": [branch_patch], "tag": 1}})
    assert net.calls[-1] == {"transformer_options": {"patches": [branch_patch], "tag": 1}}
    wrapper.patches = [net_patch]
    wrapper(x, t, {"transformer_options": {"patches": [branch_patch], "tag": 1}})
    assert net.calls[-1]["transformer_options"] == {"patches": [net_patch, branch_patch], "tag": 1}
    wrapper(x, t, {})
    assert net.calls[-1]["transformer_options"] == {"patches": [net_patch]}


def test_no_op_patch_changes_nothing(nets):
    wrapper, _ = nets
    inp, cond, _ = _conds()
    with torch.no_grad():
        plain = wrapper(inp["x"], inp["timesteps"], cond)
        patched = wrapper(inp["x"], inp["timesteps"], {**cond, "transformer_options": {"patches": [UNetPatch()]}})
    torch.testing.assert_close(patched, plain, rtol=0, atol=0)


def test_gradient_checkpointing_with_options():
    model = UNetModel(**dict(TINY, num_res_blocks=1))
    _randomize(model)
    inp = _unet_inputs(TINY, size=8)
    options = {"patches": [FreeU(), PAGGuider(layers=["down", "mid"]).perturbation]}

    def grads(enabled: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        model(**inp, transformer_options=options).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, ckpt = grads(False), grads(True)
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- FreeU

@pytest.mark.parametrize("size", [16, 12])  # 12: stages at 6x6 and 12x12, not powers of two
def test_freeu_matches_diffusers(nets, size):
    wrapper, sd = nets
    theirs = _diffusers_unet(sd)
    b1, b2, s1, s2 = 1.3, 1.4, 0.9, 0.2
    theirs.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    inp, cond, _ = _conds(size)
    with torch.no_grad():
        plain = wrapper(inp["x"], inp["timesteps"], cond)
        apply_patches(wrapper, [FreeU(b1, b2, s1, s2)])
        try:
            ours = wrapper(inp["x"], inp["timesteps"], cond)
        finally:
            apply_patches(wrapper, None)
        ref = theirs(inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"], class_labels=inp["y"]).sample
    diff = float((ours - ref).abs().max())
    log.info("FreeU size %d: max |ours - diffusers| = %.3g (output max %.3g)", size, diff, float(ref.abs().max()))
    assert diff < 1e-4
    assert float((plain - ref).abs().max()) > 1e-2  # FreeU changed the output


def test_freeu_config_group_and_apply_patches(compose, nets):
    """`patches=[freeu]` as the run config selects it: a list-valued group, one key per option."""
    assert compose("sample").get("patches") is None
    cfg = compose("sample", ["patches=[freeu]", "patches.freeu.b1=1.1"])
    patches = apply_patches(nets[0], instantiate(cfg.patches))
    try:
        assert len(patches) == 1 and isinstance(patches[0], FreeU)
        assert (patches[0].b1, patches[0].b2, patches[0].s1, patches[0].s2) == (1.1, 1.4, 0.9, 0.2)
        assert nets[0].patches == patches
    finally:
        apply_patches(nets[0], [])
    with pytest.raises(TypeError, match="UNetPatch"):
        apply_patches(nets[0], ["freeu"])


# ---------------------------------------------------------------- PAG

def _denoiser() -> DiscreteDenoiser:
    return DiscreteDenoiser(scaling=EpsScaling(), discretization=LegacyDDPMDiscretization())


def _diffusers_pag_x0(theirs, layer_ids, x, sigma, idx, inp, uc, scale, pag_scale):
    """One step of diffusers' PAG: its processors on ``layer_ids``, its batching and combine formula."""
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    class Pipe(PAGMixin):
        def __init__(self, unet):
            self.unet, self._pag_scale, self._pag_adaptive_scale = unet, pag_scale, 0.0

    pipe = Pipe(theirs)
    do_cfg = scale > 1  # diffusers' SDXL pipelines: CFG only for guidance_scale > 1
    pipe.set_pag_applied_layers(layer_ids)
    pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_cfg)
    ctx = pipe._prepare_perturbed_attention_guidance(inp["context"], uc["crossattn"], do_cfg)
    y = pipe._prepare_perturbed_attention_guidance(inp["y"], uc["vector"], do_cfg)
    n = ctx.shape[0] // x.shape[0]
    c_in = (sigma**2 + 1) ** -0.5
    eps = theirs(torch.cat([x * c_in[:, None, None, None]] * n), idx, encoder_hidden_states=ctx, class_labels=y).sample
    eps = pipe._apply_perturbed_attention_guidance(eps, do_cfg, scale, idx)
    return x - sigma[:, None, None, None] * eps, len(pipe.pag_attn_processors)


@pytest.mark.parametrize("scale,ours,diffusers_ids", [
    (5.0, ["mid"], ["mid"]),
    (1.0, ["mid"], ["mid"]),  # no CFG: cond + pag_scale * (cond - perturbed)
    (5.0, ["down.block_1", "up.block_0.attentions_1"], ["down_blocks.1", "up_blocks.0.attentions.1"]),
    (4.0, ["input_blocks.4", "output_blocks.2", "middle_block"], ["down_blocks.1.attentions.0", "up_blocks.0.attentions.2", "mid"]),
    (5.0, ["up"], ["up"]),
])
def test_pag_matches_diffusers(nets, scale, ours, diffusers_ids):
    wrapper, sd = nets
    denoiser = _denoiser()
    inp, cond, uc = _conds()
    idx = 600
    x = inp["x"] * 2.0
    sigma = denoiser.sigmas[idx].expand(2).clone()
    guider = PAGGuider(scale=scale, pag_scale=3.0, layers=ours)
    calls = []

    def denoise(x, s, c):
        calls.append((x.shape[0], "transformer_options" in c))
        return denoiser(wrapper, x, s, c)

    with torch.no_grad():
        guided = guider.guide(denoise, x, sigma, cond, uc)
        ref, n_layers = _diffusers_pag_x0(_diffusers_unet(sd), diffusers_ids, x, sigma, idx, inp, uc, scale, 3.0)
    assert calls == ([(4, False)] if scale != 1 else [(2, False)]) + [(2, True)]
    assert len(select_layers(wrapper.diffusion_model, ours)) == n_layers > 0
    diff = float((guided.x0 - ref).abs().max())
    log.info("PAG scale %s layers %s: max |x0 ours - diffusers| = %.3g (x0 max %.3g, eps diff %.3g)", scale, ours,
             diff, float(ref.abs().max()), diff / float(sigma[0]))
    assert diff < 1e-4
    assert float((guided.predictions["cond"] - guided.predictions["perturbed"]).abs().max()) > 1e-3


def test_pag_scale_zero_is_plain_cfg(nets):
    wrapper, _ = nets
    denoiser = _denoiser()
    inp, cond, uc = _conds()
    sigma = denoiser.sigmas[300].expand(2).clone()
    calls = []

    def denoise(x, s, c):
        calls.append(x.shape[0])
        return denoiser(wrapper, x, s, c)

    with torch.no_grad():
        pag = PAGGuider(scale=5.0, pag_scale=0.0, rescale=0.5).guide(denoise, inp["x"], sigma, cond, uc)
        cfg = VanillaCFG(5.0, rescale=0.5).guide(denoise, inp["x"], sigma, cond, uc)
    torch.testing.assert_close(pag.x0, cfg.x0, rtol=0, atol=0)
    assert calls == [4, 4] and set(pag.predictions) == {"uncond", "cond"}


def test_bad_layer_selector_names_itself(nets):
    wrapper, _ = nets
    inp, cond, uc = _conds()
    guider = PAGGuider(layers=["mid", "up.block_7"])
    with pytest.raises(ValueError, match=r"'up\.block_7'"):
        guider.guide(lambda x, s, c: wrapper(x, s, c), inp["x"], inp["timesteps"], cond, uc)
    with pytest.raises(ValueError, match=r"'input_blocks\.1'"):  # TINY: no attention at level 0
        select_layers(wrapper.diffusion_model, ["input_blocks.1"])
    assert select_layers(wrapper.diffusion_model, ["input_blocks.4"]) == {
        "input_blocks.4.1.transformer_blocks.0.attn1", "input_blocks.4.1.transformer_blocks.1.attn1"}
    for bad in ([""], [3], None):
        with pytest.raises(ValueError, match="layers"):
            PAGGuider(layers=bad)
    with pytest.raises(TypeError, match="guide"):
        guider.prepare_inputs(inp["x"], inp["timesteps"], cond, uc)


def test_pag_config_reaches_the_sampler(compose, nets):
    cfg = compose("sample", ["guider=pag", "guider.pag_scale=2", "guider.layers=[up.block_0,mid]", "steps=2"])
    sampler = instantiate(cfg.sampler)
    guider = sampler.guider
    assert isinstance(guider, PAGGuider) and guider.pag_scale == 2.0 and guider.layers == ["up.block_0", "mid"]
    assert guider.scale == 5.0
    wrapper, _ = nets
    denoiser = _denoiser()
    _, cond, uc = _conds(size=8)
    calls = []

    def denoise(x, s, c):
        calls.append((x.shape[0], "transformer_options" in c))
        return denoiser(wrapper, x, s, c)

    sigmas = sampling_sigmas(instantiate(cfg.discretization), cfg.steps, denoiser)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = sampler.sample(denoise, initial_latent(noise, sigmas[0]), sigmas, cond, uc)
    assert torch.isfinite(out).all()
    assert calls == [(4, False), (2, True)] * 2  # both steps evaluate the perturbed branch


def test_pag_without_uc_skips_the_uncond_branch(nets):
    wrapper, _ = nets
    denoiser = _denoiser()
    inp, cond, _ = _conds(size=8)
    sigma = denoiser.sigmas[100].expand(2).clone()
    guider = PAGGuider(scale=5.0, pag_scale=2.0)
    with torch.no_grad():
        out = guider.guide(partial(denoiser, wrapper), inp["x"], sigma, cond, None)
    p = out.predictions
    assert set(p) == {"cond", "perturbed"}
    torch.testing.assert_close(out.x0, p["cond"] + 2.0 * (p["cond"] - p["perturbed"]))
