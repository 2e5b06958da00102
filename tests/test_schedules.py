"""Schedules (conf/discretization), DDPM spacing, zero terminal SNR and the model sampling kinds.

Oracles: k-diffusion's get_sigmas_* and diffusers' schedulers (EulerDiscreteScheduler's
karras / exponential / beta sigmas, timestep spacings and zero-terminal-SNR betas;
LCMScheduler; the AYS tables), all within 1e-5; the schedules named after ComfyUI against
their published definitions written out here; every config file through run.py's composition.
"""

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from sgm.diffusion import DiscreteDenoiser, EpsScaling
from sgm.diffusion.analytic import GaussianMixture
from sgm.diffusion.denoiser import Denoiser, LCMDenoiser
from sgm.diffusion.guiders import IdentityGuider
from sgm.diffusion.discretization import (
    AYS_SIGMAS,
    AlignYourStepsDiscretization,
    BetaDiscretization,
    DDIMUniformDiscretization,
    EDMDiscretization,
    ExponentialDiscretization,
    KLOptimalDiscretization,
    LegacyDDPMDiscretization,
    LinearQuadraticDiscretization,
    NormalDiscretization,
    PolyExponentialDiscretization,
    SGMUniformDiscretization,
    SimpleDiscretization,
    VPDiscretization,
    make_beta_schedule,
)
from sgm.diffusion.scaling import VScaling, X0Scaling
from sgm.diffusion.schedule import for_model, model_sigma_table, sampling_sigmas

CONF = Path(__file__).resolve().parents[1] / "conf"
TOL = dict(rtol=1e-5, atol=1e-6)  # the 1e-5: relative (sigma spans 0.03 .. 4096), 1e-6 absolute
STEPS = [1, 2, 7, 10, 30]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def sdxl():
    """SDXL's denoiser without a stated range: its table's own 0.029167 .. 14.6146."""
    return DiscreteDenoiser(EpsScaling(), 1000, LegacyDDPMDiscretization())


@pytest.fixture(scope="module")
def schedulers():
    """diffusers.schedulers (test-only oracle)."""
    return pytest.importorskip("diffusers.schedulers")


def _euler(schedulers, **config):
    return schedulers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             **config)


def _table(den) -> np.ndarray:
    return den.sigmas.double().numpy()


def _close(ours, theirs, tol=TOL):
    torch.testing.assert_close(ours.double(), torch.as_tensor(theirs, dtype=torch.float64), **tol)


# --- continuous ranges against k-diffusion ------------------------------------------------------
@pytest.mark.parametrize("n", STEPS)
def test_range_schedules_equal_k_diffusion(ksampling, n):
    lo, hi = 0.0292, 14.6146
    # EDM / karras is float32 as sgm computes it: k-diffusion's own float32 result, bit for bit
    torch.testing.assert_close(EDMDiscretization(lo, hi, 7.0)(n), ksampling.get_sigmas_karras(n, lo, hi, 7.0),
                               rtol=0, atol=0)
    float32_cases = [(ExponentialDiscretization(lo, hi), ksampling.get_sigmas_exponential, {}),
                     (PolyExponentialDiscretization(lo, hi, 2.5), ksampling.get_sigmas_polyexponential,
                      dict(rho=2.5))]
    for ours, theirs, knobs in float32_cases:
        _close(ours(n), theirs(n, lo, hi, **knobs))
    # the others are computed in float64 and rounded once: against k-diffusion run in float64 too
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        vp64 = ksampling.get_sigmas_vp(n, 19.9, 0.1, 1e-3)
        poly64 = ksampling.get_sigmas_polyexponential(n, lo, hi, rho=2.5)
    finally:
        torch.set_default_dtype(default)
    _close(VPDiscretization(19.9, 0.1, 1e-3)(n), vp64, dict(rtol=1e-6, atol=0))
    _close(PolyExponentialDiscretization(lo, hi, 2.5)(n), poly64, dict(rtol=1e-6, atol=0))
    _close(VPDiscretization(19.9, 0.1, 1e-3)(n), ksampling.get_sigmas_vp(n), dict(rtol=1e-3, atol=0))  # float32 expm1


def test_exponential_is_polyexponential_rho_1_and_vp_fits_the_models_range(ksampling, sdxl):
    torch.testing.assert_close(ExponentialDiscretization(0.03, 10.0)(9), PolyExponentialDiscretization(0.03, 10.0)(9))
    fitted = for_model(VPDiscretization(None, None, 1e-3), sdxl)
    s = fitted(10)
    assert s[0].item() == pytest.approx(sdxl.sigma_max, rel=1e-6)
    assert s[-2].item() == pytest.approx(sdxl.sigma_min, rel=1e-6)
    beta_d, beta_min = fitted.coefficients()
    _close(s, ksampling.get_sigmas_vp(10, beta_d, beta_min, 1e-3), dict(rtol=1e-4, atol=0))
    with pytest.raises(ValueError, match="monotonically"):  # exp(beta_d t^2 / 2 + beta_min t) would turn down
        VPDiscretization(None, None, 1e-3, sigma_min=5.0, sigma_max=10.0)
    with pytest.raises(ValueError, match="not both"):
        VPDiscretization(19.9, 0.1, sigma_min=0.03)
    with pytest.raises(ValueError, match="neither"):
        VPDiscretization(19.9, None)


@pytest.mark.parametrize("n", STEPS)
def test_kl_optimal_is_tan_of_lerped_atan(n):
    lo, hi = 0.0292, 14.6146
    want = [math.tan(math.atan(hi) if n == 1 else (1 - i / (n - 1)) * math.atan(hi) + i / (n - 1) * math.atan(lo))
            for i in range(n)]
    _close(KLOptimalDiscretization(lo, hi).get_sigmas(n), want)


def _mochi(steps, threshold_noise=0.025, linear_steps=None):
    """Genmo's linear-quadratic schedule as published (flow times 1 .. 0, n + 1 entries)."""
    if steps == 1:
        return [1.0, 0.0]
    linear_steps = steps // 2 if linear_steps is None else linear_steps
    linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * steps
    quadratic_steps = steps - linear_steps
    quad_coef = diff / (linear_steps * quadratic_steps**2)
    lin_coef = threshold_noise / linear_steps - 2 * diff / (quadratic_steps**2)
    const = quad_coef * linear_steps**2
    quad = [quad_coef * i**2 + lin_coef * i + const for i in range(linear_steps, steps)]
    return [1.0 - x for x in linear + quad + [1.0]]


@pytest.mark.parametrize("n", STEPS + [64])
def test_linear_quadratic_is_mochis_schedule_times_sigma_max(n):
    _close(LinearQuadraticDiscretization(14.6146)(n), [14.6146 * s for s in _mochi(n)])
    _close(LinearQuadraticDiscretization(14.6146, 0.1, 3)(8), [14.6146 * s for s in _mochi(8, 0.1, 3)])
    with pytest.raises(ValueError, match="linear_steps"):
        LinearQuadraticDiscretization(14.6146, linear_steps=5)(5)
    with pytest.raises(ValueError, match="threshold_noise"):
        LinearQuadraticDiscretization(14.6146, threshold_noise=0.9)(10)


# --- diffusers' EulerDiscreteScheduler ----------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4, 10, 25, 30])  # diffusers' range is a single sigma at n = 1
def test_karras_exponential_beta_equal_diffusers(schedulers, sdxl, n):
    cases = [("use_karras_sigmas", EDMDiscretization(None, None, 7.0)),
             ("use_exponential_sigmas", ExponentialDiscretization()),
             ("use_beta_sigmas", BetaDiscretization(space="sigma"))]
    for flag, disc in cases:
        euler = _euler(schedulers, **{flag: True})
        euler.set_timesteps(n)
        _close(sampling_sigmas(disc, n, sdxl), euler.sigmas)


@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("zsnr", [False, True], ids=["", "zsnr"])
def test_timestep_spacing_and_zero_snr_equal_diffusers(schedulers, spacing, offset, zsnr):
    disc = LegacyDDPMDiscretization(timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=zsnr)
    euler = _euler(schedulers, timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=zsnr)
    for n in [1, 3, 10, 30, 50, 61, 999]:
        euler.set_timesteps(n)
        # diffusers' trailing arange overshoots by one timestep (-1) at some n (61): ours are its first n
        theirs_t, theirs_s = euler.timesteps[:n], torch.cat([euler.sigmas[:n], euler.sigmas[-1:]])
        np.testing.assert_allclose(disc.timesteps(n)[::-1], theirs_t.numpy(), rtol=1e-6, atol=1e-4)
        _close(disc(n), theirs_s, dict(rtol=1e-5 if not zsnr else 3e-5, atol=1e-7))


def test_zero_snr_betas_are_lin_et_al_algorithm_1(schedulers):
    from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

    disc = LegacyDDPMDiscretization(rescale_betas_zero_snr=True)
    betas = torch.from_numpy(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    np.testing.assert_allclose(disc.betas, rescale_zero_terminal_snr(betas).numpy(), rtol=1e-12, atol=1e-15)
    assert disc.alphas_cumprod[-1] == 0 and disc.alphas_cumprod[0] == pytest.approx(1 - 0.00085, rel=1e-12)
    sigmas = disc(10)
    assert sigmas[0].item() == pytest.approx(math.sqrt(2**24 - 1), rel=1e-6) and torch.isfinite(sigmas).all()


def test_default_ddpm_is_bit_identical_to_sgms_rule():
    disc = LegacyDDPMDiscretization()
    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    for n in [1, 7, 50, 999, 1000]:
        t = np.arange(n) if n == 1000 else np.linspace(999, 0, n, endpoint=False).astype(int)[::-1]
        sgm = torch.from_numpy((((1 - abar[t]) / abar[t]) ** 0.5)[::-1].copy()).float()
        assert torch.equal(disc.get_sigmas(n), sgm), n
        assert torch.equal(LegacyDDPMDiscretization(timestep_spacing="sgm").get_sigmas(n), sgm)


@pytest.mark.parametrize("kwargs, match", [
    (dict(timestep_spacing="uniform"), "timestep_spacing"),
    (dict(timestep_spacing="trailing", steps_offset=1), "steps_offset"),
    (dict(steps_offset=-1), "steps_offset"),
])
def test_ddpm_spacing_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LegacyDDPMDiscretization(**kwargs)


def test_leading_offset_past_the_last_timestep_is_an_error():
    with pytest.raises(ValueError, match="steps_offset"):
        LegacyDDPMDiscretization(timestep_spacing="leading", steps_offset=1)(1000)


# --- Align Your Steps ---------------------------------------------------------------------------
def test_ays_ten_steps_are_the_published_tables(schedulers):
    published = schedulers.AysSchedules
    for model_type, key in [("SD1", "StableDiffusionSigmas"), ("SDXL", "StableDiffusionXLSigmas"),
                            ("SVD", "StableDiffusionVideoSigmas")]:
        _close(AlignYourStepsDiscretization(model_type)(10), published[key])


@pytest.mark.parametrize("n", [1, 3, 5, 7, 20, 31])
def test_ays_resamples_log_linearly(n):
    knots = AYS_SIGMAS["SDXL"]

    def at(u):  # log-linear between the 11 knots placed evenly on [0, 1]
        pos = u * (len(knots) - 1)
        i = min(int(pos), len(knots) - 2)
        w = pos - i
        return math.exp((1 - w) * math.log(knots[i]) + w * math.log(knots[i + 1]))

    _close(AlignYourStepsDiscretization("SDXL").get_sigmas(n), [at(j / n) for j in range(n)])


def test_ays_keeps_the_knots_where_the_grids_meet():
    knots = AYS_SIGMAS["SDXL"]
    _close(AlignYourStepsDiscretization("SDXL")(20)[:-1:2], knots[:-1])  # every other sigma is a knot
    _close(AlignYourStepsDiscretization("SDXL")(5)[:-1], knots[:-1:2])  # every other knot


def test_ays_warns_about_a_model_of_another_range(caplog):
    edm = Denoiser(EpsScaling(), sigma_min=0.002, sigma_max=80.0)
    with caplog.at_level(logging.WARNING):
        sampling_sigmas(AlignYourStepsDiscretization("SDXL"), 10, edm)
    assert "align_your_steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sampling_sigmas(AlignYourStepsDiscretization("SDXL"), 10, Denoiser(EpsScaling(), 0.0292, 14.6146))
    assert not caplog.text
    with pytest.raises(ValueError, match="model_type"):
        AlignYourStepsDiscretization("SD3")


# --- over the model's noise levels: ComfyUI's definitions ---------------------------------------
def _comfy_sigma(table, t):
    """ComfyUI's ModelSamplingDiscrete.sigma: log-linear between the levels around t."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


def _comfy(name, table, n):
    T = len(table)
    if name == "simple":
        return [table[-(1 + int(x * (T / n)))] for x in range(n)]
    if name == "ddim_uniform":  # the reference loop, where it yields exactly n steps
        return [table[x] for x in range(1, T, T // n)][::-1]
    if name in ("normal", "sgm_uniform"):
        ts = np.linspace(T - 1, 0, n + 1)[:-1] if name == "sgm_uniform" else np.linspace(T - 1, 0, n)
        return [_comfy_sigma(table, float(t)) for t in ts]
    if name == "beta":
        from scipy.stats import beta

        ts = np.rint(beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * (T - 1))
        return [table[int(t)] for t in ts]
    raise KeyError(name)


TABLE_CLASSES = {"simple": SimpleDiscretization, "normal": NormalDiscretization,
                 "sgm_uniform": SGMUniformDiscretization, "ddim_uniform": DDIMUniformDiscretization,
                 "beta": BetaDiscretization}


@pytest.mark.parametrize("name", list(TABLE_CLASSES))
@pytest.mark.parametrize("n", [1, 2, 10, 25, 40])
def test_table_schedules_follow_their_definitions(sdxl, name, n):
    table = _table(sdxl)
    _close(sampling_sigmas(TABLE_CLASSES[name](), n, sdxl)[:-1], _comfy(name, table, n))
    lcm = LCMDenoiser(EpsScaling(), 1000, LegacyDDPMDiscretization())  # over the 50 distilled levels
    m = min(n, 8) if name != "ddim_uniform" else 5
    _close(sampling_sigmas(TABLE_CLASSES[name](), m, lcm)[:-1], _comfy(name, _table(lcm), m))


def test_ddim_uniform_is_leading_spacing_with_offset_1_for_any_n(sdxl):
    for n in [3, 30, 999]:
        ref = LegacyDDPMDiscretization(timestep_spacing="leading", steps_offset=1)(n)
        torch.testing.assert_close(sampling_sigmas(DDIMUniformDiscretization(), n, sdxl), ref, rtol=0, atol=0)


def test_beta_with_too_many_steps_for_distinct_timesteps_says_so(sdxl):
    with pytest.raises(ValueError, match="same timestep"):
        sampling_sigmas(BetaDiscretization(), 300, sdxl)


def test_a_continuous_model_stands_for_log_uniform_levels():
    edm = Denoiser(EpsScaling(), sigma_min=0.002, sigma_max=80.0)
    table = model_sigma_table(edm)
    assert len(table) == 1000 and table[0] == pytest.approx(0.002) and table[-1] == pytest.approx(80.0)
    # uniform in the time variable is uniform in log sigma there: the exponential schedule
    _close(sampling_sigmas(NormalDiscretization(), 12, edm), ExponentialDiscretization(0.002, 80.0)(12),
           dict(rtol=1e-6, atol=0))
    _close(sampling_sigmas(SGMUniformDiscretization(), 12, edm)[:-1], ExponentialDiscretization(0.002, 80.0)(13)[:-2],
           dict(rtol=1e-6, atol=0))
    with pytest.raises(ValueError, match="neither a table"):
        sampling_sigmas(SimpleDiscretization(), 10, Denoiser(EpsScaling()))
    with pytest.raises(ValueError, match="model_sigmas"):
        SimpleDiscretization()(10)


def test_for_model_fills_a_copy():
    disc = NormalDiscretization()
    den = Denoiser(EpsScaling(), sigma_min=0.03, sigma_max=10.0)
    filled = for_model(disc, den)
    assert disc.model_sigmas is None and filled.model_sigmas is not None and filled is not disc
    lq = LinearQuadraticDiscretization()
    assert for_model(lq, den).sigma_max == 10.0 and lq.sigma_max is None
    with pytest.raises(ValueError, match="sigma_max"):
        lq(4)


# --- every config file, as run.py composes it ---------------------------------------------------
@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_every_schedule_config_gives_steps_plus_one_descending_sigmas(compose):
    """``python run.py discretization=NAME``: with the shipped discrete model and the analytic
    continuous one (the same range, so the composed bounds serve both)."""
    names = _options("discretization")
    assert set(TABLE_CLASSES) | {"karras", "exponential", "polyexponential", "vp", "linear_quadratic", "kl_optimal",
                                 "align_your_steps", "ddpm", "ddpm_zsnr", "edm"} <= set(names)
    denoisers = {m: instantiate(compose("sample", [f"model={m}"]).model.denoiser) for m in ("digits", "analytic")}
    assert isinstance(denoisers["digits"], DiscreteDenoiser) and not isinstance(denoisers["analytic"], DiscreteDenoiser)
    for name in names:
        disc = instantiate(compose("sample", [f"discretization={name}"]).discretization)
        counts = (1, 2, 10, 30)
        if hasattr(disc, "given_timesteps"):  # ddpm_timesteps (SDXL-Turbo's): at most its own count
            counts = (1, 2, len(disc.given_timesteps))
        for (model, denoiser), steps in itertools.product(denoisers.items(), counts):
            s = sampling_sigmas(disc, steps, denoiser)
            assert s.shape == (steps + 1,) and s.dtype == torch.float32, (name, model, steps)
            assert s[-1] == 0 and torch.all(s[:-1] > s[1:]) and torch.isfinite(s).all(), (name, model, steps, s)
            if name not in ("ddpm_zsnr", "ddim_uniform"):  # neither starts at the model's sigma_max
                assert s[0].item() == pytest.approx(denoiser.sigma_max, rel=2e-3), (name, model, steps)


# --- model sampling kinds (conf/denoiser) -------------------------------------------------------
@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_every_denoiser_kind_builds_its_prediction(compose):
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = {}

    def network(x_in, c_noise, cond):
        seen["c_noise"], seen["x_in"] = c_noise, x_in
        return out

    def sig(s):
        return s[:, None, None, None]

    expected = {
        "discrete_eps": lambda s: x - sig(s) * out,
        "discrete_v": lambda s: x / (sig(s) ** 2 + 1) - sig(s) / (sig(s) ** 2 + 1).sqrt() * out,
        "discrete_v_zsnr": lambda s: x / (sig(s) ** 2 + 1) - sig(s) / (sig(s) ** 2 + 1).sqrt() * out,
        "discrete_x0": lambda s: out,
    }
    kinds = [n for n in _options("denoiser") if n.startswith("discrete_")]
    assert set(expected) | {"discrete_lcm"} <= set(kinds)
    for name in kinds:
        den = instantiate(compose("sample", [f"+denoiser={name}"]).denoiser)
        assert isinstance(den, DiscreteDenoiser), name
        sigma = den.sigmas[[-1, len(den.sigmas) // 2, 0]].double()
        got = den(network, x, sigma, {})
        assert seen["c_noise"].tolist() == [len(den.sigmas) - 1, len(den.sigmas) // 2, 0] or name == "discrete_lcm"
        if name in expected:
            torch.testing.assert_close(got, expected[name](sigma), rtol=1e-6, atol=1e-6)
    lcm = instantiate(compose("sample", ["+denoiser=discrete_lcm"]).denoiser)
    assert isinstance(lcm, LCMDenoiser) and lcm.timesteps.tolist() == list(range(19, 1000, 20))
    zsnr = instantiate(compose("sample", ["+denoiser=discrete_v_zsnr"]).denoiser)
    assert zsnr.sigma_max == pytest.approx(math.sqrt(2**24 - 1), rel=1e-6) and isinstance(zsnr.scaling, VScaling)
    assert isinstance(instantiate(compose("sample", ["+denoiser=discrete_x0"]).denoiser).scaling, X0Scaling)


def test_lcm_denoiser_equals_diffusers_lcm_scheduler(schedulers):
    sched = schedulers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(4)
    den = LCMDenoiser(EpsScaling(), 1000, LegacyDDPMDiscretization())
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps.tolist():
        sigma = den.sigmas[den.timesteps == t]
        assert len(sigma) == 1, t
        got_t = []
        x = z * (1 + sigma**2).sqrt()  # the same latent in sigma space
        ours = den(lambda x_in, c_noise, cond: got_t.append(c_noise) or eps, x, sigma.expand(2), {})
        theirs = sched.step(eps, t, z, generator=torch.Generator().manual_seed(1)).denoised
        assert got_t[0].tolist() == [t, t]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# --- zero terminal SNR: every sampler from sigma_max = 4096 with v prediction ---------------------
def _v_network(gm, table):
    """The exact v of a Gaussian mixture, as a v-prediction network sees it (VP input, timestep index)."""
    record = []

    def network(x_in, c_noise, cond):
        sigma = table[c_noise].double().reshape(-1, *[1] * (x_in.ndim - 1))
        x = x_in * (1 + sigma**2).sqrt()
        x0 = gm(x, sigma.reshape(-1), None)
        eps = (x - x0) / sigma
        v = (eps - sigma * x0) / (1 + sigma**2).sqrt()
        record.append(v)
        return v

    return network, record


@pytest.fixture(scope="module")
def zsnr(compose):
    """The zero-terminal-SNR v model's denoiser and its schedule, as configured."""
    cfg = compose("sample", ["discretization=ddpm_zsnr", "+denoiser=discrete_v_zsnr"])
    return instantiate(cfg.denoiser), instantiate(cfg.discretization)


@pytest.mark.parametrize("sampler_name", _options("sampler"))
def test_zero_snr_v_prediction_samples_from_sigma_4096_without_nan(compose, zsnr, sampler_name):
    den, disc = zsnr
    sampler = instantiate(compose("sample", [f"sampler={sampler_name}"]).sampler, guider=IdentityGuider(),
                          verbose=False)
    gm = GaussianMixture(torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)), std=0.3)
    network, v = _v_network(gm, den.sigmas)
    sigmas = sampling_sigmas(disc, 8, den).double()
    assert sigmas[0].item() == pytest.approx(4096.0, rel=1e-4)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    first = {}
    out = sampler.sample(lambda x, s, c: den(network, x, s, c), noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, {},
                         generator=[torch.Generator().manual_seed(3 + k) for k in range(2)],
                         callback=lambda info: first.setdefault("x0", info["denoised"]))
    assert torch.isfinite(out).all() and out.abs().max() < 10
    torch.testing.assert_close(first["x0"], -v[0], rtol=0, atol=2e-3)  # x0 = -v at (near) infinite sigma


@pytest.mark.slow
def test_a_run_samples_over_the_models_levels(run_task, tmp_path):
    """``python run.py discretization=beta``: the engine hands its denoiser's levels to the schedule."""
    import json

    out = tmp_path / "run"
    run_task("sample", ["progress=false", "steps=8", "discretization=beta"], out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 10 and metrics["network_evaluations_per_batch"] == 8
    assert metrics["accuracy"] >= 0.8
