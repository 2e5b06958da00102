"""Autoguidance (Karras et al. 2024): the formula on analytic models, diffusers' layer-skip form on the
converted tiny UNet, the second engine through run.py's task, NFE, and the weak checkpoint's errors."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sgm
import sgm.tasks.sample
from sgm.checkpoint import save_checkpoint
from sgm.diffusion import EDMDiscretization, EulerEDMSampler, HeunEDMSampler, VanillaCFG
from sgm.diffusion.analytic import GaussianMixture
from sgm.diffusion.autoguidance import AutoGuidance
from sgm.diffusion.schedule import sampling_sigmas
from sgm.tasks.common import build_engine, build_weak_engine, check_weak_model

from test_catalogue import QUIET, no_weights  # noqa: F401 - a fixture: every weight loader raises
from test_networks import _randomize
from test_patches import _conds, _denoiser, _diffusers_unet, nets  # noqa: F401 - nets is a fixture

log = logging.getLogger(__name__)
MU = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
S_MAIN, S_WEAK = 0.3, 0.6  # the weak "model" knows the data less sharply: a broader Gaussian


def _gaussian(std: float) -> GaussianMixture:
    return GaussianMixture(MU, std=std)


def _counting(fn, calls: list, tag: str):
    def denoise(x, sigma, cond):
        calls.append((tag, x.shape[0]))
        return fn(x, sigma, cond)

    return denoise


def _tilted_x0(x: torch.Tensor, sigma: float, w: float) -> torch.Tensor:
    """The guided x0 in closed form: the score of D_weak + w (D_main - D_weak) is w score_main -
    (w - 1) score_weak, for these Gaussians -(x - mu) [w / (s_m^2 + sigma^2) - (w - 1) / (s_w^2 + sigma^2)],
    and D = x + sigma^2 score."""
    a = w / (S_MAIN**2 + sigma**2) - (w - 1) / (S_WEAK**2 + sigma**2)
    return x - sigma**2 * a * (x - MU)


def _exact_flow(x_start: torch.Tensor, sigma_start: float, sigma_end: float, w: float) -> torch.Tensor:
    """The probability-flow ODE dx/dsigma = (x - D_guided) / sigma solved exactly: x - mu scales by
    ((s_m^2 + s^2) / (s_m^2 + s0^2))^(w/2) ((s_w^2 + s0^2) / (s_w^2 + s^2))^((w-1)/2)."""
    sm, sw, s0, s1 = S_MAIN**2, S_WEAK**2, sigma_start**2, sigma_end**2
    factor = ((sm + s1) / (sm + s0)) ** (w / 2) * ((sw + s0) / (sw + s1)) ** ((w - 1) / 2)
    return MU + (x_start - MU) * factor


# ---------------------------------------------------------------- the formula on analytic models

@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 4.0])
def test_guided_x0_is_the_closed_form_of_eq_2(w):
    main, weak = _gaussian(S_MAIN), _gaussian(S_WEAK)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    calls: list = []
    guider = AutoGuidance(scale=w, weak=_counting(weak.denoise, calls, "weak"))
    for sigma in (0.05, 0.7, 6.0):
        s = torch.full((5,), sigma, dtype=torch.float64)
        guided = guider.guide(_counting(main.denoise, calls, "main"), x, s, {}, {})
        torch.testing.assert_close(guided.x0, _tilted_x0(x, sigma, w), rtol=0, atol=1e-12)
        torch.testing.assert_close(guided.predictions["cond"], main.denoise(x, s), rtol=0, atol=0)
    # scale 1 is D_main alone: the weak model is not evaluated
    assert calls == ([("main", 5)] * 3 if w == 1 else [("main", 5), ("weak", 5)] * 3)


@pytest.mark.parametrize("cls, order", [(EulerEDMSampler, 1), (HeunEDMSampler, 2)])
def test_sampling_converges_to_the_exact_guided_flow(cls, order):
    """Sampling with autoguidance integrates the guided probability-flow ODE: the error against its
    exact solution falls at the sampler's order as the steps double."""
    main, weak = _gaussian(S_MAIN), _gaussian(S_WEAK)
    w = 2.0
    x_start = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 14.6146
    errors = []
    for n in (16, 32, 64, 128):
        sigmas = sampling_sigmas(EDMDiscretization(0.0292, 14.6146, 3.0), n)[:-1].double()  # end at sigma_min
        out = cls(guider=AutoGuidance(scale=w, weak=weak.denoise)).sample(main.denoise, x_start, sigmas, {}, {})
        exact = _exact_flow(x_start, float(sigmas[0]), float(sigmas[-1]), w)
        errors.append(float((out - exact).pow(2).mean().sqrt()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    log.info("%s + autoguidance vs exact flow: RMS errors %s, orders %s", cls.__name__,
             ["%.3g" % e for e in errors], ["%.2f" % s for s in slopes])
    assert all(abs(s - order) < 0.25 for s in slopes), (errors, slopes)
    # the guided flow is not the main model's: guidance sharpens the endpoint (w > 1, broader weak model)
    plain = _exact_flow(x_start, float(sigmas[0]), float(sigmas[-1]), 1.0)
    assert float((exact - MU).std()) < 0.8 * float((plain - MU).std())


def test_cfg_is_autoguidance_by_the_unconditional_model():
    """With the main model's own unconditional branch as the weak model, autoguidance is CFG,
    rescale and guidance interval included."""
    gm = GaussianMixture(torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64), std=0.4)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = {"class_weights": torch.tensor([[0.8, 0.1, 0.1]], dtype=torch.float64).repeat(4, 1)}
    uc = {"class_weights": torch.full((4, 3), 1 / 3, dtype=torch.float64)}
    interval = (0.5, 3.0)
    for kwargs in ({}, {"rescale": 0.7}, {"sigma_interval": interval}, {"rescale": 0.3, "sigma_interval": interval}):
        ag = AutoGuidance(scale=3.0, weak=gm.denoise, weak_conditioning="uncond", **kwargs)
        cfg = VanillaCFG(3.0, **kwargs)
        for sigma in (0.2, 1.0, 5.0):
            s = torch.full((4,), sigma, dtype=torch.float64)
            got, want = ag.guide(gm.denoise, x, s, cond, uc).x0, cfg.guide(gm.denoise, x, s, cond, uc).x0
            torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_rescale_and_interval_compose():
    main, weak = _gaussian(S_MAIN), _gaussian(S_WEAK)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    phi, w = 0.6, 3.0
    calls: list = []
    guider = AutoGuidance(scale=w, weak=_counting(weak.denoise, calls, "weak"), rescale=phi, sigma_interval=(0.5, 2.0))
    for sigma in (0.1, 0.5, 1.0, 2.0, 8.0):
        s = torch.full((3,), sigma, dtype=torch.float64)
        got = guider.guide(_counting(main.denoise, calls, "main"), x, s, {}, {}).x0
        d_main = main.denoise(x, s)
        if not 0.5 <= sigma <= 2.0:  # outside the interval: D_main, and no weak evaluation
            torch.testing.assert_close(got, d_main, rtol=0, atol=0)
            continue
        g = weak.denoise(x, s) + w * (d_main - weak.denoise(x, s))  # Lin et al. 2023, eq. 15-16, on x0
        ratio = d_main.std(dim=1, keepdim=True) / g.std(dim=1, keepdim=True)
        torch.testing.assert_close(got, phi * g * ratio + (1 - phi) * g, rtol=0, atol=1e-13)
    assert [c[0] for c in calls] == ["main", "main", "weak", "main", "weak", "main", "weak", "main"]


def test_guidance_is_deterministic_and_repeatable():
    main, weak = _gaussian(S_MAIN), _gaussian(S_WEAK)
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sampler = EulerEDMSampler(EDMDiscretization(), 6, guider=AutoGuidance(scale=2.0, weak=weak.denoise))
    a, b = sampler(main.denoise, noise, {}), sampler(main.denoise, noise, {})
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, sampler(main.denoise, noise.flip(0), {}))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(rescale=1.5), ValueError, r"rescale \(phi\) must be in \[0, 1\]"),
    (dict(skip="feed_forward"), ValueError, "skip must be one of attention, attention_scores"),
    (dict(weak_conditioning="negative"), ValueError, "weak_conditioning must be one of cond, uncond"),
    (dict(skip_layers=[]), ValueError, "skip_layers must name at least one layer"),
    (dict(skip_layers=[3]), ValueError, "layers must be a list of layer selectors"),
    (dict(skip_layers=["mid"], weak=lambda x, s, c: x), ValueError, "takes no weak model"),
    (dict(weak=42), TypeError, "the weak model must be an engine with denoise"),
    (dict(sigma_interval=(3.0, 1.0)), ValueError, "sigma_interval must be"),
])
def test_bad_values_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        AutoGuidance(**kwargs)


def test_missing_weak_model_and_one_call_api_are_explained():
    x, s = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    guider = AutoGuidance(scale=2.0)
    assert guider.needs_weak_model and guider.engines == []
    with pytest.raises(RuntimeError, match=r"no weak model: .*weak_model / weak_weights.*set_weak.*skip_layers"):
        guider.guide(_gaussian(S_MAIN).denoise, x, s, {}, {})
    with pytest.raises(TypeError, match="guider.guide"):
        guider.prepare_inputs(x, s, {}, {})
    with pytest.raises(ValueError, match="needs an unconditional conditioning"):
        AutoGuidance(scale=2.0, weak=_gaussian(S_WEAK).denoise, weak_conditioning="uncond").guide(
            _gaussian(S_MAIN).denoise, x, s, {}, None)


# ---------------------------------------------------------------- diffusers' layer-skip form

def _diffusers_autoguidance_steps(theirs, fqn, blocks, skip, idxs, x, inp, weak_ctx, scale, stop, denoiser):
    """Euler steps through the DDPM table indices ``idxs`` with diffusers' AutoGuidance: its
    LayerSkipConfig hooks on the second (``pred_uncond``) batch, its combine, its start/stop window."""
    from diffusers.guiders import AutoGuidance as TheirAutoGuidance
    from diffusers.hooks import LayerSkipConfig

    config = LayerSkipConfig(indices=blocks, fqn=fqn, skip_attention=skip == "attention",
                             skip_attention_scores=skip == "attention_scores", skip_ff=False)
    guider = TheirAutoGuidance(guidance_scale=scale, auto_guidance_config=config, stop=stop)
    sigmas = [*denoiser.sigmas[idxs].tolist(), 0.0]
    out = []
    for i, idx in enumerate(idxs):
        sigma = sigmas[i]
        guider.set_state(step=i, num_inference_steps=len(idxs), timestep=torch.tensor(idx))
        batches = guider.prepare_inputs({"encoder_hidden_states": (inp["context"], weak_ctx[0]),
                                         "class_labels": (inp["y"], weak_ctx[1])})
        x_in = x * (sigma**2 + 1) ** -0.5
        for batch in batches:
            guider.prepare_models(theirs)
            batch.noise_pred = theirs(x_in, torch.tensor(idx), encoder_hidden_states=batch.encoder_hidden_states,
                                      class_labels=batch.class_labels).sample
            guider.cleanup_models(theirs)
        x0 = x - sigma * guider(batches).pred
        x = x + (sigmas[i + 1] - sigma) * (x - x0) / sigma
        out.append((x0, len(batches)))
    return out


MID = "mid_block.attentions.0.transformer_blocks"  # TINY: two transformer blocks at the second level and mid


@pytest.fixture(scope="module")
def theirs_unet(nets):  # noqa: F811
    return _diffusers_unet(nets[1])


@pytest.mark.parametrize("skip, ours, fqn, blocks, weak_conditioning, stop", [
    ("attention", ["mid"], MID, [0, 1], "uncond", 1.0),
    ("attention_scores", ["mid"], MID, [0, 1], "uncond", 1.0),
    ("attention", [f"{MID}.1"], MID, [1], "cond", 1.0),
    ("attention", ["down_blocks.1.attentions.0"], "down_blocks.1.attentions.0.transformer_blocks", [0, 1], "cond", 1.0),
    ("attention_scores", ["up.block_0.attentions_1"], "up_blocks.0.attentions.1.transformer_blocks", [0, 1], "cond",
     1.0),
    ("attention", ["mid"], MID, [0, 1], "uncond", 0.5),  # the guidance interval against diffusers' stop
])
def test_layer_skip_form_matches_diffusers(nets, theirs_unet, skip, ours, fqn, blocks, weak_conditioning,  # noqa: F811
                                           stop):
    wrapper, _ = nets
    denoiser = _denoiser()
    inp, cond, uc = _conds(8)
    idxs = [950, 700, 450, 200]
    sigmas = denoiser.sigmas[idxs].tolist()
    interval = None if stop == 1.0 else ((sigmas[1] + sigmas[2]) / 2, math.inf)  # steps 0 and 1, as stop=0.5
    guider = AutoGuidance(scale=2.5, skip_layers=ours, skip=skip, weak_conditioning=weak_conditioning,
                          sigma_interval=interval)
    assert not guider.needs_weak_model
    calls = []

    def denoise(x, s, c):
        calls.append("transformer_options" in c)
        return denoiser(wrapper, x, s, c)

    weak_ctx = (uc["crossattn"], uc["vector"]) if weak_conditioning == "uncond" else (inp["context"], inp["y"])
    x = inp["x"] * 3.0
    with torch.no_grad():
        theirs = _diffusers_autoguidance_steps(theirs_unet, fqn, blocks, skip, idxs, x, inp, weak_ctx, 2.5, stop,
                                               denoiser)
        worst = 0.0
        for i, sigma in enumerate(sigmas):
            guided = guider.guide(denoise, x, torch.full((2,), sigma), cond, uc)
            ref, n_batches = theirs[i]
            assert len(guided.predictions) == n_batches
            worst = max(worst, float((guided.x0 - ref).abs().max()))
            if "weak" in guided.predictions:
                assert float((guided.predictions["cond"] - guided.predictions["weak"]).abs().max()) > 2e-4
            nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
            x = x + (nxt - sigma) * (x - guided.x0) / sigma
    log.info("layer skip %s %s (%s, stop %s): max |x0 ours - diffusers| over 4 steps = %.3g", skip, ours,
             weak_conditioning, stop, worst)
    assert worst < 1e-4
    guided_steps = 4 if stop == 1.0 else 2
    assert calls == [False, True] * guided_steps + [False] * (4 - guided_steps)  # the weak branch: its own call


# ---------------------------------------------------------------- the second engine

def _pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))}


TINY_AG = ["model=tiny", "guider=autoguidance", "steps=3", "~metrics", *QUIET]
RANDOM_WEAK = ["weak_weights.checkpoint=null", "weak_weights.random=true"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, compose):
    """A tiny main model (a single file) and a weak UNet (a UNet-only file), every weight random: seeded
    random engines have zero output convolutions, so both would predict x0 = x and guidance would vanish."""
    root = tmp_path_factory.mktemp("tiny_pair")
    cfg = compose("sample", ["model=tiny", "guider=autoguidance"])
    main = build_engine(cfg.model, cfg.weights, seed=0)
    _randomize(main.model.diffusion_model, seed=0)
    weak = build_weak_engine(cfg.weak_model, {"random": True}, main, seed=1)
    _randomize(weak.model.diffusion_model, seed=1)
    save_checkpoint(main, root / "main.safetensors")
    save_checkpoint({k: v for k, v in weak.state_dict().items() if k.startswith("model.diffusion_model.")},
                    root / "weak.safetensors")
    return main, weak, [f"weights.checkpoint={root / 'main.safetensors'}", "weights.random=false",
                        f"weak_weights.checkpoint={root / 'weak.safetensors'}"]


def test_weak_engine_shares_the_conditioning_and_counts_its_evaluations(tiny_pair, compose):
    main, weak, _ = tiny_pair
    assert weak.conditioner is main.conditioner and weak.first_stage_model is main.first_stage_model
    assert weak.model.diffusion_model.model_channels == 32 and weak.model is not main.model
    x, s = torch.randn(1, 4, 8, 8), torch.ones(1)
    cond, _ = main.get_conditionings(["a red cube"], [""], 32, 32)
    before = weak.network_evaluations, main.network_evaluations
    with torch.no_grad():
        d_weak, d_main = weak.denoise(x, s, cond), main.denoise(x, s, cond)
    assert (weak.network_evaluations - before[0], main.network_evaluations - before[1]) == (1, 1)
    assert float((d_weak - d_main).abs().max()) > 1e-2
    cfg = compose("sample", ["model=tiny", "guider=autoguidance"])  # seeded: the same weak UNet again
    again, other = (build_weak_engine(cfg.weak_model, {"random": True}, main, seed=k) for k in (7, 7))
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), other.model.parameters()))


@pytest.mark.slow
def test_two_tiny_engines_through_run_task(run_task, tiny_pair, tmp_path):
    """run.py guider=autoguidance with a main and a weak checkpoint: NFE = main + weak evaluations, a
    seed repeats the images, the guidance changes them, the interval skips the weak model outside it."""
    files = tiny_pair[2]
    m1, _ = run_task("sample", [*TINY_AG, *files], tmp_path / "a")
    m2, _ = run_task("sample", [*TINY_AG, *files], tmp_path / "b")
    assert m1["network_evaluations_per_batch"] == m2["network_evaluations_per_batch"] == 3 + 3  # 2 prompts, 1 batch
    a, b = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert len(a) == 2 and all(np.array_equal(a[k], b[k]) for k in a)
    m3, _ = run_task("sample", [*TINY_AG, *files, "guider.sigma_interval=[0,1]"], tmp_path / "c")
    assert m3["network_evaluations_per_batch"] == 3 + 1  # only the last step (sigma 0.0292) is guided
    m4, _ = run_task("sample", [*TINY_AG, *files, "guider.scale=1"], tmp_path / "d")
    assert m4["network_evaluations_per_batch"] == 3  # scale 1: the main model alone
    c, d = _pngs(tmp_path / "c"), _pngs(tmp_path / "d")
    assert all(not np.array_equal(a[k], d[k]) and not np.array_equal(c[k], d[k]) for k in a)


def test_random_weak_weights_through_run_task(run_task, tmp_path):
    metrics, cfg = run_task("sample", [*TINY_AG, *RANDOM_WEAK], tmp_path / "run")
    assert metrics["network_evaluations_per_batch"] == 3 + 3 and cfg.weak_weights.random


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_layer_skip_form_runs_without_a_second_model(run_task, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weak engine was built for the layer-skip form")

    monkeypatch.setattr("sgm.tasks.common.build_weak_engine", refuse)
    metrics, _ = run_task("sample", [*TINY_AG, *RANDOM_WEAK, "guider.skip_layers=[mid]"], tmp_path / "run")
    assert metrics["network_evaluations_per_batch"] == 3 * 2


@pytest.mark.slow
def test_shipped_model_with_its_weak_model(run_task, tmp_path, compose):
    cfg = compose("sample", ["guider=autoguidance"])
    assert cfg.weak_weights.checkpoint.endswith("sgm/assets/digits_weak.safetensors")
    metrics, _ = run_task("sample", ["guider=autoguidance", "steps=4", *QUIET], tmp_path / "run")
    assert metrics["images"] == 10 and metrics["network_evaluations_per_batch"] == 4 + 4
    assert metrics["accuracy"] > 0.5  # a few steps already make digits; docs/autoguidance.md has the real numbers


# ---------------------------------------------------------------- the weak checkpoint's errors

def no_weights_error(*args, **kwargs):
    raise AssertionError("a weight reader or the weak engine's builder ran before the checks")


@pytest.fixture(scope="module")
def weak_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("weak")
    (root / "notes.safetensors").write_text("not a tensor file")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 7, 3, 3)}, str(root / "wrong.safetensors"))
    (root / "folder").mkdir()
    return {"text": str(root / "notes.safetensors"), "wrong": str(root / "wrong.safetensors"),
            "folder": str(root / "folder"), "main": sgm.asset("digits.safetensors")}


WEAK_CASES = [
    (["weak_weights.checkpoint=/nonexistent/weak.safetensors"], FileNotFoundError,
     r"weak_weights\.checkpoint '/nonexistent/weak\.safetensors' does not exist: give the weak UNet's file "
     r"\(experiments/shipped_model/train_weak\.sh.*weak_weights\.random=true"),
    (["weak_weights.checkpoint={folder}"], IsADirectoryError, r"weak_weights\.checkpoint '.*folder' is a directory"),
    (["weak_weights.checkpoint={text}"], ValueError, r"weak_weights\.checkpoint '.*notes\.safetensors' is not a "
                                                     r"safetensors file"),
    (["weak_weights.checkpoint={main}"], ValueError, r"(?s)unexpected key.*conditioner\..*weak_weights\.checkpoint "
                                                     r"must hold the weak UNet alone \(model\.diffusion_model\.\*\)"),
    (["weak_weights.checkpoint={wrong}"], ValueError, r"(?s)missing key.*out\.2\.weight: model \[4, 32, 3, 3\], "
                                                      r"file \[4, 7, 3, 3\]"),
    (["weak_weights.checkpoint=null"], ValueError, r"expects a checkpoint: set weak_weights\.checkpoint=PATH"),
    (["weak_weights.dtype=float8"], ValueError, r"unknown dtype 'float8'"),
    (["weak_model.network.context_dim=64"], ValueError, r"weak_model\.network\.context_dim is 64 but "
                                                        r"model\.network\.context_dim is 80"),
    (["weak_model.network.channel_mult=[1,1,1,1,1]"], ValueError, r"H \(weak model\) and W must be positive multiples"),
    (["~weak_model"], ValueError, r"the guider needs a weak model but the config has no weak_model"),
    (["refiner=sdxl_refiner", "refiner_weights.random=true", "H=64", "W=64"], ValueError,
     r"weak model guides the base model only"),
]


@pytest.mark.parametrize("overrides, error, message", WEAK_CASES, ids=[" ".join(c[0]) for c in WEAK_CASES])
def test_bad_weak_model_fails_before_any_weight_is_read(hydra_runtime, no_weights, weak_files,  # noqa: F811
                                                        monkeypatch, tmp_path, overrides, error, message):
    monkeypatch.setattr("sgm.tasks.common.build_weak_engine", no_weights_error)
    filled = [o.format(**weak_files) for o in overrides]
    cfg = hydra_runtime("sample", [*QUIET, "guider=autoguidance", *filled], tmp_path / "new")
    with pytest.raises(error, match=message):
        sgm.tasks.sample.run(cfg)
    assert not list((tmp_path / "new").glob("*.png"))


def test_checkpoint_header_check_reads_no_tensor(tmp_path, compose, monkeypatch):
    """The good shipped weak file passes the checks with every tensor reader refused."""
    cfg = compose("sample", ["guider=autoguidance"])
    for target in ("sgm.checkpoint.safe_open", "safetensors.safe_open", "safetensors.torch.load_file"):
        monkeypatch.setattr(target, no_weights_error)
    assert str(check_weak_model(cfg.weak_model, cfg.weak_weights, cfg.model)) == cfg.weak_weights.checkpoint
