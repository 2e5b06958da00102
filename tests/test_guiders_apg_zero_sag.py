"""APG, CFG-Zero* and SAG guiders against diffusers on the same converted tiny UNet.

The oracle side runs diffusers' UNet2DConditionModel loaded from our UNet's weights
(tests/_nets_convert.py) and diffusers' own code for the method: its guider classes
(``AdaptiveProjectedGuidance``, ``ClassifierFreeZeroStarGuidance``, stepped with ``set_state``
as its modular pipelines do) in a reference Euler loop over the same discrete sigmas, and, for
SAG, ``StableDiffusionSAGPipeline``'s ``CrossAttnStoreProcessor``, ``pred_x0``, ``pred_epsilon``
and ``sag_masking`` with a DDIM scheduler of the same beta table. Our side is the guider on
our UNet through EulerEDMSampler / ``guide()``.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from sgm.diffusion import APGGuider, CFGZeroStarGuider, EulerEDMSampler, SAGGuider, VanillaCFG
from sgm.diffusion.apg import SPACES, SamplingRun, from_space, to_space
from sgm.diffusion.sag import gaussian_blur, token_grid

from test_patches import _conds, _denoiser, _diffusers_unet, nets  # noqa: F401  (nets: a fixture)

log = logging.getLogger(__name__)
LEVELS = [999, 800, 600, 400, 200]  # the discrete DDPM levels the multi-step runs visit, then 0
TOL = 1e-4
R = {"eps": 0.01, "x0": 0.05}  # APG norm thresholds below this UNet's early ||c - u|| (eps 0.08, 0.02; x0 1.1, 0.09)


@pytest.fixture(scope="module")
def theirs(nets):  # noqa: F811
    return _diffusers_unet(nets[1])


def _setup(wrapper, size: int, levels: list[int]) -> SimpleNamespace:
    """Our wrapper, the eps denoiser, (inputs, cond, uc) at latent ``size``, the run's schedule (levels, then 0)."""
    denoiser = _denoiser()
    inp, cond, uc = _conds(size)
    sigmas = torch.cat([denoiser.sigmas[levels], torch.zeros(1)])
    return SimpleNamespace(wrapper=wrapper, denoiser=denoiser, inp=inp, cond=cond, uc=uc, sigmas=sigmas)


@pytest.fixture(scope="module")
def setup(nets):  # noqa: F811
    """The runs compared with diffusers: 16x16 latents, the five LEVELS."""
    return _setup(nets[0], 16, LEVELS)


@pytest.fixture(scope="module")
def small(nets):  # noqa: F811
    """Cheaper runs for the checks among our own guiders: 8x8 latents, three levels."""
    return _setup(nets[0], 8, [999, 600, 200])


def _counting(s):
    """Our denoise function, recording (batch size, whether options travel) per network call."""
    calls = []

    def denoise(x, sigma, c):
        calls.append((x.shape[0], "transformer_options" in c))
        return s.denoiser(s.wrapper, x, sigma, c)

    return denoise, calls


def _ours(s, guider, x_start):
    """Our Euler run: (every step's guided x0, the final x, the network calls)."""
    denoise, calls = _counting(s)
    x0s = []
    sampler = EulerEDMSampler(guider=guider)
    with torch.no_grad():
        out = sampler.sample(denoise, x_start, s.sigmas, s.cond, s.uc, callback=lambda info: x0s.append(info["denoised"]))
    return x0s, out, calls


def _their_eps(theirs, s, x, idx, with_uc: bool):
    """diffusers' UNet at level ``idx``: (eps_uncond or None, eps_cond)."""
    sigma = float(s.denoiser.sigmas[idx])
    x_in = x * (sigma**2 + 1) ** -0.5
    if not with_uc:
        return None, theirs(x_in, idx, encoder_hidden_states=s.inp["context"], class_labels=s.inp["y"]).sample
    ctx = torch.cat([s.uc["crossattn"], s.inp["context"]])
    y = torch.cat([s.uc["vector"], s.inp["y"]])
    return theirs(torch.cat([x_in] * 2), idx, encoder_hidden_states=ctx, class_labels=y).sample.chunk(2)


# the oracle's own conversions: (eps -> the space's prediction, the space's prediction -> x0) at (x, sigma)
_REF_SPACES = {
    "eps": (lambda e, x, sig: e, lambda p, x, sig: x - sig * p),
    "x0": (lambda e, x, sig: x - sig * e, lambda p, x, sig: p),
    "flow": (lambda e, x, sig: (1 + sig) * e - x, lambda p, x, sig: (x - sig * p) / (1 + sig)),  # v = eps - x0
}


def _their_run(theirs, s, guider, space: str, x_start):
    """The reference loop: diffusers' guider stepped as its pipelines do, fed ``space`` predictions of
    diffusers' UNet, the same Euler steps. Returns (every step's guided x0, the final x)."""
    x, x0s = x_start, []
    n = len(LEVELS)
    with torch.no_grad():
        for i, idx in enumerate(LEVELS):
            sigma = float(s.sigmas[i])
            guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(idx))
            guider.prepare_inputs({})  # APG: a fresh momentum buffer at step 0
            eps_u, eps_c = _their_eps(theirs, s, x, idx, guider.num_conditions > 1)
            into, back = _REF_SPACES[space]
            pred = {k: into(e, x, sigma) for k, e in (("u", eps_u), ("c", eps_c)) if e is not None}
            x0 = back(guider.forward(pred_cond=pred["c"], pred_uncond=pred.get("u")).pred, x, sigma)
            x0s.append(x0)
            x = x + (float(s.sigmas[i + 1]) - sigma) * (x - x0) / sigma
    return x0s, x


def _start(s):
    return s.inp["x"] * float(s.sigmas[0] ** 2 + 1) ** 0.5


def _compare(ours, ref, what: str) -> float:
    (x0s, out), (rx0s, rout) = ours, ref
    assert len(x0s) == len(rx0s) == len(LEVELS)
    diffs = [float((a - b).abs().max()) for a, b in zip(x0s, rx0s)]
    final = float((out - rout).abs().max())
    log.info("%s: max |x0 ours - diffusers| per step %s, final x %.3g", what, ["%.2g" % d for d in diffs], final)
    assert max(diffs) < TOL and final < TOL
    return max(diffs)


# ---------------------------------------------------------------- APG

def _apg_diffusers(**kw):
    from diffusers.guiders import AdaptiveProjectedGuidance

    return AdaptiveProjectedGuidance(**kw)


@pytest.mark.parametrize("ours_kw,theirs_kw", [
    # the paper's formulation is diffusers' original formulation at guidance scale w - 1; norm_threshold
    # True: R[space], a threshold that clips the early steps' update of this UNet
    (dict(scale=6.0, eta=0.0, momentum=-0.5, norm_threshold=True),
     dict(guidance_scale=5.0, eta=0.0, adaptive_projected_guidance_momentum=-0.5, use_original_formulation=True)),
    (dict(scale=6.0, eta=0.3, momentum=-0.7, norm_threshold=False, formulation="diffusers"),
     dict(guidance_scale=6.0, eta=0.3, adaptive_projected_guidance_momentum=-0.7)),
    # composes with CFG rescale (diffusers' guidance_rescale, in the same space)
    (dict(scale=6.0, eta=0.0, momentum=-0.5, norm_threshold=True, rescale=0.7),
     dict(guidance_scale=5.0, eta=0.0, adaptive_projected_guidance_momentum=-0.5, use_original_formulation=True,
          guidance_rescale=0.7)),
])
@pytest.mark.parametrize("space", ["eps", "x0"])
def test_apg_matches_diffusers_over_a_run(setup, theirs, space, ours_kw, theirs_kw):
    """eps: what diffusers' guider sees of an SDXL model; x0 (our default, the paper's): the same
    guider fed the x0 predictions. Five steps, so the momentum is exercised."""
    s = setup
    x_start = _start(s)
    r = R[space] if ours_kw["norm_threshold"] else 0.0
    ours_kw = {**ours_kw, "norm_threshold": r}
    x0s, out, calls = _ours(s, APGGuider(space=space, **ours_kw), x_start)
    ref = _their_run(theirs, s, _apg_diffusers(adaptive_projected_guidance_rescale=r, **theirs_kw), space, x_start)
    _compare((x0s, out), ref, f"APG {space} {ours_kw}")
    assert calls == [(4, False)] * len(LEVELS)


def test_apg_space_and_momentum_matter(small):
    s = small
    x_start = _start(s)
    runs = {k: _ours(s, APGGuider(scale=6.0, **kw), x_start)[1] for k, kw in {
        "x0": dict(space="x0"), "eps": dict(space="eps"), "no_momentum": dict(space="x0", momentum=0.0),
        "plain_cfg": dict(eta=1.0, momentum=0.0), "clipped": dict(eta=1.0, momentum=0.0, norm_threshold=R["x0"]),
        "projected": dict(eta=0.0, momentum=0.0)}.items()}
    assert float((runs["x0"] - runs["eps"]).abs().max()) > 1e-2
    assert float((runs["x0"] - runs["no_momentum"]).abs().max()) > 1e-2
    for part in ("clipped", "projected"):  # each of APG's changes to CFG moves the result
        assert float((runs[part] - runs["plain_cfg"]).abs().max()) > 1e-3, part


def test_apg_with_eta_one_and_nothing_else_is_cfg(small):
    s = small
    x_start = _start(s)
    apg = _ours(s, APGGuider(scale=4.0, eta=1.0, momentum=0.0, norm_threshold=0.0), x_start)[1]
    cfg = _ours(s, VanillaCFG(4.0), x_start)[1]
    torch.testing.assert_close(apg, cfg, rtol=1e-5, atol=1e-5)


def test_apg_guidance_interval_matches_diffusers_start_stop(setup, theirs):
    """Outside sigma_interval: the conditional prediction, no unconditional call, no momentum update;
    diffusers' start/stop fractions select the same steps (1..3 of 0..4)."""
    s = setup
    lo, hi = float(s.sigmas[3]), float(s.sigmas[1])
    x_start = _start(s)
    x0s, out, calls = _ours(s, APGGuider(scale=6.0, momentum=-0.5, norm_threshold=R["eps"], space="eps",
                                         sigma_interval=(lo, hi)), x_start)
    ref = _their_run(theirs, s, _apg_diffusers(guidance_scale=5.0, eta=0.0, adaptive_projected_guidance_momentum=-0.5,
                                               adaptive_projected_guidance_rescale=R["eps"], use_original_formulation=True,
                                               start=0.2, stop=0.8), "eps", x_start)
    _compare((x0s, out), ref, "APG eps, interval")
    assert calls == [(2, False), (4, False), (4, False), (4, False), (2, False)]


def test_apg_runs_are_independent(small):
    """The momentum restarts with each run: the same run twice, and a run starting lower
    (img2img-like) after it, equal fresh guiders' runs."""
    s = small
    x_start = _start(s)
    guider = APGGuider(scale=6.0, momentum=-0.7, norm_threshold=R["x0"])
    first, second = _ours(s, guider, x_start)[1], _ours(s, guider, x_start)[1]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    short = SimpleNamespace(**{**vars(s), "sigmas": s.sigmas[1:]})
    x_mid = s.inp["x"] * float(short.sigmas[0] ** 2 + 1) ** 0.5
    again = _ours(short, guider, x_mid)[1]
    fresh = _ours(short, APGGuider(scale=6.0, momentum=-0.7, norm_threshold=R["x0"]), x_mid)[1]
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_prediction_spaces():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    sigma = torch.tensor([0.3, 7.0])[:, None, None, None]
    x = x0 + sigma * eps
    t = sigma / (1 + sigma)  # the flow path x_t = (1 - t) x0 + t eps is x / (1 + sigma)
    torch.testing.assert_close(x / (1 + sigma), (1 - t) * x0 + t * eps)
    torch.testing.assert_close(to_space("eps", x0, x, sigma), eps)
    torch.testing.assert_close(to_space("flow", x0, x, sigma), eps - x0)  # d x_t / dt
    for space in SPACES:
        torch.testing.assert_close(from_space(space, to_space(space, x0, x, sigma), x, sigma), x0)


def test_sampling_run_counts_steps_and_restarts():
    run = SamplingRun()
    t = lambda v: torch.tensor([v])  # noqa: E731
    # Heun with EDM churn: sigma_hat above the corrector's level, within sqrt(2) of it
    seen = [run.observe(t(v)) for v in (14.0, 9.0, 11.0, 6.0, 7.5, 3.0)]
    assert seen == [(0, True), (1, False), (1, False), (2, False), (2, False), (3, False)]
    assert run.observe(t(14.0)) == (0, True)  # the same schedule again
    assert run.observe(t(0.5)) == (1, False)
    assert run.observe(t(2.0)) == (0, True)  # a lower start, but far above the last call
    for bad in (dict(eta=float("nan")), dict(norm_threshold=-1), dict(space="v"), dict(formulation="comfy")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            APGGuider(**bad)
    with pytest.raises(TypeError, match="guide"):
        APGGuider().prepare_inputs(None, None, None, None)


# ---------------------------------------------------------------- CFG-Zero*

def _zero_star_diffusers(**kw):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    return ClassifierFreeZeroStarGuidance(**kw)


@pytest.mark.parametrize("space", ["eps", "flow"])
@pytest.mark.parametrize("ours_kw,theirs_kw", [
    (dict(scale=5.0, zero_init_steps=1), dict(guidance_scale=5.0, zero_init_steps=1)),
    (dict(scale=4.0, zero_init_steps=2, interval_steps=(3, 5)),  # zero-init wins over the interval
     dict(guidance_scale=4.0, zero_init_steps=2, start=0.6, stop=1.0)),
    (dict(scale=5.0, zero_init_steps=0, rescale=0.7), dict(guidance_scale=5.0, zero_init_steps=0, guidance_rescale=0.7)),
])
def test_cfg_zero_star_matches_diffusers_over_a_run(setup, theirs, space, ours_kw, theirs_kw):
    """eps: diffusers' guider on an SDXL model's output; flow (our default, the paper's): the same
    guider fed the velocity eps - x0 of the same predictions."""
    s = setup
    x_start = _start(s)
    ours_kw = dict(ours_kw)
    lo, hi = 0.0, math.inf
    if "interval_steps" in ours_kw:  # steps a..b-1 guided: diffusers' start = a / n, stop = b / n
        a, b = ours_kw.pop("interval_steps")
        lo, hi = float(s.sigmas[b - 1]), float(s.sigmas[a])
        ours_kw["sigma_interval"] = (lo, hi)
    x0s, out, calls = _ours(s, CFGZeroStarGuider(space=space, **ours_kw), x_start)
    ref = _their_run(theirs, s, _zero_star_diffusers(**theirs_kw), space, x_start)
    _compare((x0s, out), ref, f"CFG-Zero* {space} {ours_kw}")
    k = ours_kw["zero_init_steps"]
    expect = [(4 if lo <= float(sig) <= hi else 2, False) for sig in s.sigmas[k:-1]]
    assert calls == expect  # zero-init steps evaluate nothing
    x = x_start
    for i in range(k):  # a zero prediction keeps x (eps: in the VE frame; flow: x / (1 + sigma))
        want = x if space == "eps" else x / (1 + s.sigmas[i])
        torch.testing.assert_close(x0s[i], want)
        x = x + (s.sigmas[i + 1] - s.sigmas[i]) * (x - x0s[i]) / s.sigmas[i]


def test_cfg_zero_star_runs_are_independent_and_checked(small):
    s = small
    x_start = _start(s)
    guider = CFGZeroStarGuider(scale=5.0, zero_init_steps=2)
    first, second = _ours(s, guider, x_start), _ours(s, guider, x_start)
    torch.testing.assert_close(first[1], second[1], rtol=0, atol=0)
    assert first[2] == second[2] == [(4, False)]  # three steps, two of them zero-init
    plain = _ours(s, CFGZeroStarGuider(scale=5.0, zero_init_steps=0), x_start)[1]
    assert float((plain - first[1]).abs().max()) > 1e-2
    for space in ("flow", "eps"):  # s* != 1 moves every step away from CFG (flow: by ~3e-3 here, eps: ~3e-2)
        star = _ours(s, CFGZeroStarGuider(scale=5.0, zero_init_steps=0, space=space), x_start)[0]
        cfg = _ours(s, VanillaCFG(5.0), x_start)[0]
        assert min(float((a - b).abs().max()) for a, b in zip(star, cfg)) > 1e-3, space
    for bad in (dict(zero_init_steps=-1), dict(zero_init_steps=1.5), dict(space="v"), dict(rescale=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CFGZeroStarGuider(**bad)


# ---------------------------------------------------------------- SAG

def _sag_reference(theirs, s, x, idx, scale, sag_scale, branch):
    """One step of StableDiffusionSAGPipeline's loop body on diffusers' UNet, with its own capture
    processor, map-size hook, pred_x0 / pred_epsilon / sag_masking (DDIM scheduler, our beta
    table). Returns (guided x0, the head-mean attention map of the degraded branch)."""
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        CrossAttnStoreProcessor, StableDiffusionSAGPipeline as Pipe)

    pipe = SimpleNamespace(unet=theirs, scheduler=DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    t = torch.tensor(idx)
    sigma = float(s.denoiser.sigmas[idx])
    latents = x * (sigma**2 + 1) ** -0.5
    original = theirs.attn_processors
    store = CrossAttnStoreProcessor()
    theirs.mid_block.attentions[0].transformer_blocks[0].attn1.processor = store
    map_size = None

    def get_map_size(module, inputs, output):
        nonlocal map_size
        map_size = output[0].shape[-2:]

    cfg = scale != 1
    try:
        with torch.no_grad(), theirs.mid_block.attentions[0].register_forward_hook(get_map_size):
            if cfg:
                ctx = torch.cat([s.uc["crossattn"], s.inp["context"]])
                y = torch.cat([s.uc["vector"], s.inp["y"]])
                eps_u, eps_c = theirs(torch.cat([latents] * 2), t, encoder_hidden_states=ctx, class_labels=y).sample.chunk(2)
                noise_pred = eps_u + scale * (eps_c - eps_u)
                attn_u, attn_c = store.attention_probs.chunk(2)
            else:
                eps_c = noise_pred = theirs(latents, t, encoder_hidden_states=s.inp["context"],
                                            class_labels=s.inp["y"]).sample
                attn_c = store.attention_probs
            use_uc = cfg and branch == "uncond"
            eps_b, attn = (eps_u, attn_u) if use_uc else (eps_c, attn_c)
            pred_x0 = Pipe.pred_x0(pipe, latents, eps_b, t)
            degraded = Pipe.sag_masking(pipe, pred_x0, attn, map_size, t, Pipe.pred_epsilon(pipe, latents, eps_b, t))
            emb, vec = (s.uc["crossattn"], s.uc["vector"]) if use_uc else (s.inp["context"], s.inp["y"])
            degraded_pred = theirs(degraded, t, encoder_hidden_states=emb, class_labels=vec).sample
            noise_pred = noise_pred + sag_scale * (eps_b - degraded_pred)
    finally:
        theirs.set_attn_processor(original)
    heads = theirs.config.attention_head_dim[-1]
    return x - sigma * noise_pred, attn.reshape(x.shape[0], heads, *attn.shape[1:]).mean(1)


@pytest.mark.parametrize("scale,branch,idx", [(5.0, "uncond", 600), (5.0, "uncond", 150), (1.0, "uncond", 600),
                                              (5.0, "cond", 400)])
def test_sag_matches_diffusers_pipeline(setup, theirs, scale, branch, idx):
    """The whole guided x0 of one step, against the pipeline's own functions on diffusers' UNet
    (the SD1 pipeline's code reused on tensors of our SDXL-style tiny UNet, class labels as its
    vector conditioning), and the captured attention map against its CrossAttnStoreProcessor's."""
    s = setup
    sigma = s.denoiser.sigmas[idx].expand(2).clone()
    x = s.inp["x"] * float(sigma[0] ** 2 + 1) ** 0.5
    guider = SAGGuider(scale=scale, sag_scale=0.75, branch=branch)
    denoise, calls = _counting(s)
    with torch.no_grad():
        guided = guider.guide(denoise, x, sigma, s.cond, s.uc)
    ref, ref_map = _sag_reference(theirs, s, x, idx, scale, 0.75, branch)
    rows = 0 if scale != 1 and branch == "uncond" else (2 if scale != 1 else 0)
    ours_map = guider.capture.maps[rows : rows + 2]
    map_diff = float((ours_map - ref_map).abs().max())
    mask = (ours_map.sum(1) > 1.0).float().mean()
    diff = float((guided.x0 - ref).abs().max())
    log.info("SAG scale %s %s level %d: max |x0 ours - diffusers| = %.3g (x0 max %.3g), map diff %.2g, mask on %.2f",
             scale, branch, idx, diff, float(ref.abs().max()), map_diff, float(mask))
    assert map_diff < 1e-5 and 0 < mask < 1  # the mask blurs part of the latent
    assert diff < TOL
    assert calls == [(4 if scale != 1 else 2, True), (2, False)]  # one extra evaluation per step
    sag_term = guided.x0 - guider.dyn_thresh(guided.predictions["uncond"], guided.predictions["cond"], scale) \
        if scale != 1 else guided.x0 - guided.predictions["cond"]
    assert float(sag_term.abs().max()) > 1e-3


def test_sag_composes_with_rescale_and_interval(setup):
    s = setup
    sigma = s.denoiser.sigmas[500].expand(2).clone()
    x = s.inp["x"] * float(sigma[0] ** 2 + 1) ** 0.5
    denoise, calls = _counting(s)
    with torch.no_grad():
        plain = SAGGuider(scale=5.0).guide(denoise, x, sigma, s.cond, s.uc)
        rescaled = SAGGuider(scale=5.0, rescale=0.7).guide(denoise, x, sigma, s.cond, s.uc)
        inside = SAGGuider(scale=5.0, sigma_interval=(0.0, 100.0)).guide(denoise, x, sigma, s.cond, s.uc)
        calls.clear()
        outside = SAGGuider(scale=5.0, sigma_interval=(0.0, 0.5)).guide(denoise, x, sigma, s.cond, s.uc)
        assert calls == [(2, False)]  # the conditional prediction alone: no uncond, no SAG call
        calls.clear()
        off = SAGGuider(scale=5.0, sag_scale=0.0).guide(denoise, x, sigma, s.cond, s.uc)
        assert calls == [(4, False)]
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    torch.testing.assert_close(rescaled.x0, rescale_noise_cfg(plain.x0, plain.predictions["cond"], 0.7))
    torch.testing.assert_close(inside.x0, plain.x0, rtol=0, atol=0)
    assert outside.x0 is outside.predictions["cond"] and set(outside.predictions) == {"cond"}
    torch.testing.assert_close(outside.x0, plain.predictions["cond"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off.x0, VanillaCFG(5.0).combine(off.predictions, sigma), rtol=0, atol=0)


def test_sag_helpers_and_checks(nets):  # noqa: F811
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

    img = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gaussian_blur(img, 9, 1.0), gaussian_blur_2d(img, 9, 1.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gaussian_blur(img, 5, 0.7), gaussian_blur_2d(img, 5, 0.7), rtol=1e-5, atol=1e-6)
    assert token_grid(64, 16, 16) == (8, 8) and token_grid(12, 7, 5) == (4, 3) and token_grid(6, 7, 5) == (3, 2)
    with pytest.raises(ValueError, match="tokens"):
        token_grid(7, 16, 16)
    with pytest.raises(ValueError, match="blur_kernel"):
        gaussian_blur(torch.zeros(1, 1, 4, 4), 9, 1.0)
    for bad in (dict(blur_kernel=8), dict(blur_sigma=0), dict(branch="both"), dict(sag_scale=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SAGGuider(**bad)
    wrapper = nets[0]
    inp, cond, uc = _conds(size=8)
    with pytest.raises(ValueError, match="input_blocks.9"):
        SAGGuider(layer="input_blocks.9.1.transformer_blocks.0.attn1").guide(
            partial(_denoiser(), wrapper), inp["x"], torch.ones(2), cond, uc)
    with pytest.raises(TypeError, match="guide"):
        SAGGuider()(None, None)


# ---------------------------------------------------------------- configs and the shipped model

GUIDERS = {"apg": (APGGuider, 3), "cfg_zero_star": (CFGZeroStarGuider, 2), "sag": (SAGGuider, 6)}


def test_configs_compose_and_build_the_guiders(compose):
    spaces = {}
    for name, (cls, _) in GUIDERS.items():
        cfg = compose("sample", [f"guider={name}", "guider.scale=3"])
        guider = instantiate(cfg.sampler).guider
        assert type(guider) is cls and guider.scale == 3.0 and guider.sigma_interval is None
        spaces[name] = getattr(guider, "space", None)
    assert spaces == {"apg": "x0", "cfg_zero_star": "flow", "sag": None}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GUIDERS))
def test_config_samples_the_digit_model(run_task, tmp_path, name):
    """A 3-step run of the shipped model with ``guider=NAME`` writes its image, and metrics.json counts
    the network calls the guider documents (CFG-Zero*: the zero-init step calls nothing; SAG: one
    more per step)."""
    out = tmp_path / "run"
    metrics, _ = run_task("sample", ["progress=false", "~logger", "~metrics", f"guider={name}", "steps=3",
                                     "prompt='a handwritten digit three'"], out)
    assert len(list(out.glob("0*.png"))) == 1
    assert metrics["network_evaluations_per_batch"] == GUIDERS[name][1]
