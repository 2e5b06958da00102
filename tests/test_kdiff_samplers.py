"""dpm_2, dpm_2_a, dpm_fast, dpm_adaptive, dpmpp_sde, dpmpp_3m_sde against k-diffusion 0.1.1.

Same noise on both sides: Brownian trees with the entropy our generators give
(``seed_from``), ancestral noise through k-diffusion's ``noise_sampler`` drawing from a
generator seeded as ours, EDM churn through a patched ``randn_like`` (as in test_samplers.py).
Then the conventions, the evaluation counts, and the convergence order of the ODE solvers
against a scipy DOP853 solution of the probability-flow ODE on the analytic mixture.
"""

import logging
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from sgm.diffusion import DPMPP2SAncestralSampler, EDMDiscretization, LegacyDDPMDiscretization
from sgm.diffusion.analytic import GaussianMixture
from sgm.diffusion.brownian import seed_from
from sgm.diffusion.samplers import (
    DPM2AncestralSampler,
    DPM2Sampler,
    DPMPP3MSDESampler,
    DPMPPSDESampler,
    DPMSolverAdaptiveSampler,
    DPMSolverFastSampler,
)
from sgm.diffusion.samplers.dpm_solver import fast_orders
from sgm.diffusion.schedule import initial_latent, sampling_sigmas
from test_samplers import SDXL_EDM, _denoise, _noise, gm  # noqa: F401 (gm is a fixture)

DISCS = [SDXL_EDM, LegacyDDPMDiscretization()]
DISC_IDS = ["edm", "ddpm"]
# k-diffusion's trees warn where torchsde clamps sigma_max to its rounded end; ours do not
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _kd(gm):
    return lambda x, s: gm(x, s, {})


@contextmanager
def _float64_default():
    """k-diffusion's DPMSolver builds its lambda grid with torch.linspace and its tolerances with
    torch.tensor, both in the default dtype: run the oracle in float64, as we compute."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _setup(disc, steps, shape=(3, 2, 4, 4)):
    noise = _noise(shape)
    sigmas = disc(steps).double()
    return noise, sigmas, noise * torch.sqrt(1 + sigmas[0] ** 2)


# --- agreement with k-diffusion: fixed-schedule samplers -----------------------------------
ANCESTRAL_CASES = [("dpm_2_a", {}), ("dpm_2_a", dict(eta=0.5, s_noise=0.9)), ("dpm_2_a", dict(eta=0.0))]
TREE_CASES = [("dpmpp_sde", {}), ("dpmpp_sde", dict(eta=0.5, s_noise=1.1)), ("dpmpp_sde", dict(r=0.3)),
              ("dpmpp_sde", dict(eta=0.0)), ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", dict(eta=0.5, s_noise=1.1)),
              ("dpmpp_3m_sde", dict(eta=0.0))]
CHURN_CASES = [("dpm_2", {}), ("dpm_2", dict(s_churn=2.0, s_tmin=0.1, s_tmax=5.0, s_noise=1.003))]
FIXED = {"dpm_2": (DPM2Sampler, "sample_dpm_2"), "dpm_2_a": (DPM2AncestralSampler, "sample_dpm_2_ancestral"),
         "dpmpp_sde": (DPMPPSDESampler, "sample_dpmpp_sde"), "dpmpp_3m_sde": (DPMPP3MSDESampler, "sample_dpmpp_3m_sde")}
FIXED_CASES = CHURN_CASES + ANCESTRAL_CASES + TREE_CASES


@pytest.mark.parametrize("disc", DISCS, ids=DISC_IDS)
@pytest.mark.parametrize("name, knobs", FIXED_CASES, ids=[f"{n}-{k}" for n, k in FIXED_CASES])
def test_fixed_schedule_samplers_agree_with_k_diffusion(ksampling, gm, disc, name, knobs, monkeypatch):
    cls, kfn = FIXED[name]
    tree = name in ("dpmpp_sde", "dpmpp_3m_sde")
    steps, seeds = 10, [7, 8]  # two images, two trees: torchsde's tree queries are the cost
    noise, sigmas, x_init = _setup(disc, steps, (2, 2, 4, 4))
    generator = _gens(seeds) if tree else torch.Generator().manual_seed(7)
    ours = cls(disc, steps, **knobs)(_denoise(gm), noise, {}, generator=generator)

    g = torch.Generator().manual_seed(7)
    extra = dict(knobs)
    if tree and knobs.get("eta", 1.0) == 0:  # k-diffusion still queries its noise, times 0
        extra["noise_sampler"] = lambda s, sn: torch.zeros_like(x_init)
    elif tree:
        extra["noise_sampler"] = ksampling.BrownianTreeNoiseSampler(
            x_init, sigmas[sigmas > 0].min(), sigmas.max(), seed=[seed_from(t) for t in _gens(seeds)])
    elif name == "dpm_2_a":
        extra["noise_sampler"] = lambda s, sn: torch.randn(noise.shape, generator=g, dtype=noise.dtype)
    else:  # k-diffusion draws churn noise every step from randn_like; we draw only when gamma > 0
        churn, tmin, tmax = knobs.get("s_churn", 0.0), knobs.get("s_tmin", 0.0), knobs.get("s_tmax", math.inf)
        gammas = iter([churn > 0 and tmin <= s <= tmax for s in sigmas[:-1].tolist()])
        monkeypatch.setattr(ksampling.torch, "randn_like", lambda t, **kw: torch.randn(
            t.shape, generator=g, dtype=t.dtype) if next(gammas) else torch.zeros_like(t))
    ref = getattr(ksampling, kfn)(_kd(gm), x_init, sigmas, disable=True, **extra)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# --- agreement with k-diffusion: DPM-Solver fast and adaptive --------------------------------
def _kd_dpm_solver(ksampling, gm, kind, x, sigma_min, sigma_max, n, knobs, g):
    """k-diffusion's sample_dpm_fast / sample_dpm_adaptive in float64, ancestral noise drawn from g."""
    noise_sampler = lambda s, sn: torch.randn(x.shape, generator=g, dtype=x.dtype)  # noqa: E731
    with _float64_default():
        if kind == "fast":
            return ksampling.sample_dpm_fast(_kd(gm), x, sigma_min, sigma_max, n, disable=True,
                                             noise_sampler=noise_sampler, **knobs), None
        return ksampling.sample_dpm_adaptive(_kd(gm), x, sigma_min, sigma_max, disable=True, return_info=True,
                                             noise_sampler=noise_sampler, **knobs)


SOLVER_CASES = [("fast", {}), ("fast", dict(eta=0.5, s_noise=0.9)), ("adaptive", {}), ("adaptive", dict(order=2)),
                ("adaptive", dict(rtol=0.01, atol=0.001, h_init=0.1, pcoeff=0.1, icoeff=0.9, dcoeff=0.05)),
                ("adaptive", dict(eta=0.5, s_noise=0.9))]


@pytest.mark.parametrize("denoise_to_zero", [True, False], ids=["to_zero", "at_sigma_min"])
@pytest.mark.parametrize("disc", DISCS, ids=DISC_IDS)
@pytest.mark.parametrize("kind, knobs", SOLVER_CASES, ids=[f"{k}-{v}" for k, v in SOLVER_CASES])
def test_dpm_solver_agrees_with_k_diffusion(ksampling, gm, disc, kind, knobs, denoise_to_zero):
    """k-diffusion integrates (sigma_min, sigma_max) with n evaluations and stops at sigma_min;
    ours spends the last of the n on the denoise to 0 when asked (fast), or adds it (adaptive)."""
    cls = DPMSolverFastSampler if kind == "fast" else DPMSolverAdaptiveSampler
    steps = 11
    noise, sigmas, x_init = _setup(disc, steps)
    calls: list[float] = []
    sampler = cls(disc, steps, denoise_to_zero=denoise_to_zero, **knobs)
    ours = sampler(_denoise(gm, calls), noise, {}, generator=torch.Generator().manual_seed(7))

    sigma_min, sigma_max = float(sigmas[-2]), float(sigmas[0])
    budget = steps - 1 if denoise_to_zero else steps
    ref, info = _kd_dpm_solver(ksampling, gm, kind, x_init, sigma_min, sigma_max, budget, knobs,
                               torch.Generator().manual_seed(7))
    if denoise_to_zero:
        ref = gm(ref, torch.full((ref.shape[0],), sigma_min, dtype=ref.dtype), {})
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    if kind == "fast":
        assert len(calls) == steps
    else:  # same steps accepted and rejected; k-diffusion re-evaluates at s after each rejection
        stats = sampler.last_stats
        assert (stats["accepted"], stats["rejected"]) == (info["n_accept"], info["n_reject"])
        order = knobs.get("order", 3)
        assert info["nfe"] == order * (info["n_accept"] + info["n_reject"])
        assert len(calls) == stats["evaluations"] == info["nfe"] - info["n_reject"] + int(denoise_to_zero)


@pytest.mark.parametrize("kind", ["fast", "adaptive"])
@pytest.mark.parametrize("part", ["img2img", "refiner_base"])
def test_dpm_solver_integrates_the_slice_it_is_given(ksampling, gm, kind, part):
    """A slice from sigmas[4] (img2img, refiner) runs to the smallest nonzero sigma; a slice that
    does not end at 0 (the base's part of a refiner hand-off) ends at its last sigma, not denoised."""
    cls = DPMSolverFastSampler if kind == "fast" else DPMSolverAdaptiveSampler
    sigmas = sampling_sigmas(SDXL_EDM, 10).double()
    part_sigmas = sigmas[4:] if part == "img2img" else sigmas[:6]
    x = _noise((2, 2, 4, 4)) * part_sigmas[0]
    calls: list[float] = []
    ours = cls().sample(_denoise(gm, calls), x, part_sigmas, {})
    lo, n = float(part_sigmas[part_sigmas > 0].min()), len(part_sigmas) - 1
    ref, _ = _kd_dpm_solver(ksampling, gm, kind, x, lo, float(part_sigmas[0]), n - (part == "img2img"), {}, None)
    if part == "img2img":
        ref = gm(ref, torch.full((2,), lo, dtype=ref.dtype), {})
        assert calls[-1] == pytest.approx(lo, rel=1e-4)
    else:
        assert all(c >= lo * (1 - 1e-9) for c in calls)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    if kind == "fast":
        assert len(calls) == n


def test_dpm_fast_budgets():
    assert [fast_orders(n) for n in (1, 2, 3, 4, 5, 6, 10)] == [
        [1], [2], [2, 1], [3, 1], [3, 2], [3, 2, 1], [3, 3, 3, 1]]
    assert all(sum(fast_orders(n)) == n for n in range(1, 40))


@pytest.mark.parametrize("cls", [DPMSolverFastSampler, DPMSolverAdaptiveSampler])
def test_a_one_step_slice_to_zero_is_one_denoise(gm, cls):
    """[sigma_min, 0] (img2img at a tiny strength): the interval is empty; denoise_to_zero spends
    the one evaluation on x0, without it x is returned as it came."""
    x = _noise((2, 2, 4, 4)) * 0.0292
    sigmas = torch.tensor([0.0292, 0.0], dtype=torch.float64)
    calls: list[float] = []
    out = cls().sample(_denoise(gm, calls), x, sigmas, {})
    torch.testing.assert_close(out, gm(x, torch.full((2,), 0.0292, dtype=x.dtype), {}), rtol=0, atol=1e-12)
    assert calls == [pytest.approx(0.0292)]
    assert torch.equal(cls(denoise_to_zero=False).sample(_denoise(gm), x, sigmas, {}), x)


# --- conventions and evaluation counts -------------------------------------------------------
def _fast_calls(n, to_zero=True):
    return len(fast_orders(n - to_zero)) + to_zero


CONVENTION_CASES = [
    # (id, class, knobs, stochastic, evaluations for 6 steps, callback calls for 6 steps)
    ("dpm_2", DPM2Sampler, {}, False, 2 * 6 - 1, 6),
    ("dpm_2_churn", DPM2Sampler, dict(s_churn=1.0), True, 2 * 6 - 1, 6),
    ("dpm_2_a", DPM2AncestralSampler, {}, True, 2 * 6 - 1, 6),
    ("dpmpp_sde", DPMPPSDESampler, {}, True, 2 * 6 - 1, 6),
    ("dpmpp_3m_sde", DPMPP3MSDESampler, {}, True, 6, 6),
    ("dpm_fast", DPMSolverFastSampler, {}, False, 6, _fast_calls(6)),
    ("dpm_fast_eta", DPMSolverFastSampler, dict(eta=1.0), True, 6, _fast_calls(6)),
    ("dpm_fast_at_sigma_min", DPMSolverFastSampler, dict(denoise_to_zero=False), False, 6, _fast_calls(6, False)),
    ("dpm_adaptive", DPMSolverAdaptiveSampler, {}, False, None, None),
    ("dpm_adaptive_eta", DPMSolverAdaptiveSampler, dict(eta=1.0, order=2), True, None, None),
]


@pytest.mark.parametrize("name, cls, knobs, stochastic, nfe, reports", CONVENTION_CASES,
                         ids=[c[0] for c in CONVENTION_CASES])
def test_conventions(gm, name, cls, knobs, stochastic, nfe, reports):
    noise = _noise((3, 2, 4, 4))
    before = noise.clone()
    calls: list[float] = []
    seen: list[dict] = []
    sampler = cls(SDXL_EDM, 6, **knobs)
    out = sampler(_denoise(gm, calls), noise, {}, generator=torch.Generator().manual_seed(3),
                  callback=lambda info: seen.append(info))
    assert torch.equal(noise, before), "the sampler must not modify its input in place"
    x_start = initial_latent(noise, 14.6146)
    x_copy = x_start.clone()
    sampler.sample(_denoise(gm), x_start, sampling_sigmas(SDXL_EDM, 6), {}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_start, x_copy)
    assert 0.0 not in calls, "no network evaluation at sigma 0"
    assert seen[0]["sigma"] == pytest.approx(14.6146, rel=1e-5)
    assert calls[0] == pytest.approx(seen[0]["sigma_hat"], rel=1e-12)  # sigma raised by churn where s_churn > 0
    if cls is DPMSolverAdaptiveSampler:  # the error control decides; the counts are reported
        stats = sampler.last_stats
        order = knobs.get("order", 3)
        nfe = stats["accepted"] + (order - 1) * (stats["accepted"] + stats["rejected"]) + 1
        reports = stats["accepted"] + 1
        assert stats["evaluations"] == nfe
        assert stats["rejected"] > 0 or knobs, "this case should see a rejected step (its evaluation is reused)"
    assert len(calls) == nfe
    assert [info["i"] for info in seen] == list(range(reports))
    assert {"i", "sigma", "sigma_hat", "sigma_next", "x", "denoised"} <= set(seen[0])
    assert all(info["sigma_next"] > 0 for info in seen[:-1])
    assert all(a["sigma_next"] == pytest.approx(b["sigma"], rel=1e-12) for a, b in zip(seen, seen[1:])), \
        "each report starts where the previous one's step ended"
    if knobs.get("denoise_to_zero", True):  # the last report's x0 is the result
        assert seen[-1]["sigma_next"] == 0.0
        torch.testing.assert_close(seen[-1]["denoised"], out, rtol=0, atol=0)
    else:
        assert seen[-1]["sigma_next"] == pytest.approx(0.0292, rel=1e-5)
    # same generator seed -> same result, whatever the global RNG; progress bar on or off
    torch.manual_seed(0)
    again = cls(SDXL_EDM, 6, verbose=True, **knobs)(_denoise(gm), noise, {}, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    other = sampler(_denoise(gm), noise, {}, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, other) != stochastic


def test_dpm_fast_callback_walks_a_uniform_log_sigma_grid(gm):
    seen: list[dict] = []
    DPMSolverFastSampler(SDXL_EDM, 12)(_denoise(gm), _noise((1, 2, 4, 4)), {}, callback=seen.append)
    lams = [-math.log(info["sigma"]) for info in seen[:-1]] + [-math.log(seen[-2]["sigma_next"])]
    assert len(lams) == len(fast_orders(11)) + 1
    np.testing.assert_allclose(np.diff(lams), np.diff(lams)[0], rtol=1e-9)
    assert lams[0] == pytest.approx(-math.log(14.6146), abs=1e-5)
    assert lams[-1] == pytest.approx(-math.log(0.0292), abs=1e-5)  # the float32 schedule's ends


def test_dpm_adaptive_logs_its_steps_and_tighter_tolerances_cost_more_and_err_less(gm, caplog):
    noise = _noise((2, 2, 4, 4))
    ref = _ode_reference(gm, initial_latent(noise, 14.6146), 14.6146, 0.0292)
    results = {}
    for rtol in (0.05, 0.005):
        sampler = DPMSolverAdaptiveSampler(SDXL_EDM, 4, rtol=rtol, atol=rtol / 10, denoise_to_zero=False)
        with caplog.at_level(logging.INFO, logger="sgm.diffusion.samplers.dpm_solver"):
            caplog.clear()
            out = sampler(_denoise(gm), noise, {})
        stats = sampler.last_stats
        assert f"{stats['accepted']} accepted and {stats['rejected']} rejected steps, " \
               f"{stats['evaluations']} evaluations" in caplog.text
        results[rtol] = (stats["evaluations"], float((out - ref).abs().max()))
    (cheap_nfe, cheap_err), (tight_nfe, tight_err) = results[0.05], results[0.005]
    assert tight_nfe > cheap_nfe and tight_err < cheap_err / 3, results


def test_dpm_adaptive_stops_on_a_non_finite_error_estimate(gm):
    def broken(x, sigma, cond):
        return torch.full_like(x, math.nan) if float(sigma[0]) < 5 else gm(x, sigma, cond)

    with pytest.raises(FloatingPointError, match="non-finite"):
        DPMSolverAdaptiveSampler(SDXL_EDM, 4)(broken, _noise((1, 2, 4, 4)), {})


# --- equivalences -----------------------------------------------------------------------------
def test_eta_zero_equivalences(gm):
    noise = _noise((2, 2, 4, 4))
    g = torch.Generator().manual_seed(9)
    state = g.get_state()
    sde = DPMPPSDESampler(SDXL_EDM, 8, eta=0.0)(_denoise(gm), noise, {}, generator=g)
    twos = DPMPP2SAncestralSampler(SDXL_EDM, 8, eta=0.0)(_denoise(gm), noise, {})
    torch.testing.assert_close(sde, twos, rtol=0, atol=1e-12)  # DPM-Solver++(2S)
    a = DPM2AncestralSampler(SDXL_EDM, 8, eta=0.0)(_denoise(gm), noise, {}, generator=g)
    torch.testing.assert_close(a, DPM2Sampler(SDXL_EDM, 8)(_denoise(gm), noise, {}), rtol=0, atol=1e-12)
    DPMPP3MSDESampler(SDXL_EDM, 8, eta=0.0)(_denoise(gm), noise, {}, generator=g)
    DPMSolverFastSampler(SDXL_EDM, 8)(_denoise(gm), noise, {}, generator=g)
    assert torch.equal(g.get_state(), state), "no noise, no draw"


@pytest.mark.parametrize("cls", [DPM2AncestralSampler, DPMPPSDESampler, DPMPP3MSDESampler])
def test_per_sample_generators_make_each_image_independent_of_its_batch(gm, cls):
    noise = _noise((3, 2, 4, 4))
    batch = cls(SDXL_EDM, 5)(_denoise(gm), noise, {}, generator=_gens([10, 11, 12]))
    alone = cls(SDXL_EDM, 5)(_denoise(gm), noise[1:2], {}, generator=_gens([11]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="generators"):
        cls(SDXL_EDM, 5)(_denoise(gm), noise, {}, generator=_gens([1, 2]))


@pytest.mark.slow  # about 7 s: torchsde's tree queries
def test_tree_samplers_with_different_step_counts_follow_the_same_path():
    """Same generator seed: 40 and 80 steps land close (one Brownian path); another seed does not."""
    g = torch.Generator().manual_seed(0)
    gauss = GaussianMixture(torch.randn(1, 4, generator=g, dtype=torch.float64), std=0.5)
    x0 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    for cls in (DPMPPSDESampler, DPMPP3MSDESampler):
        out = {(n, seed): cls(SDXL_EDM, n)(_denoise(gauss), x0, {}, generator=torch.Generator().manual_seed(seed))
               for n, seed in [(40, 3), (80, 3), (80, 4)]}
        same, other = (float((out[40, 3] - out[key]).pow(2).mean().sqrt()) for key in [(80, 3), (80, 4)])
        assert same < 0.1 * other, (cls.__name__, same, other)


STOCHASTIC = [(DPM2AncestralSampler, {}), (DPMSolverFastSampler, dict(eta=1.0)),
              (DPMSolverAdaptiveSampler, dict(eta=1.0, order=2)),
              pytest.param(DPMPPSDESampler, {}, marks=pytest.mark.slow),  # 6 s and 3 s: torchsde's tree queries
              pytest.param(DPMPP3MSDESampler, {}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("cls, knobs", STOCHASTIC)
def test_turns_noise_into_the_data_distribution(cls, knobs):
    g = torch.Generator().manual_seed(0)
    gm2 = GaussianMixture(torch.tensor([[-2.0, 0.5], [1.0, 1.5], [2.5, -1.0]]), std=0.4,
                          weights=torch.tensor([0.5, 0.3, 0.2]))
    n = 4000
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = cls(EDMDiscretization(), 40, **knobs)(_denoise(gm2), noise, {}, generator=torch.Generator().manual_seed(5))
    mean, var = gm2.mean(), gm2.variance()
    assert torch.all((out.mean(0) - mean).abs() < 4 * (var / n).sqrt() + 0.02), (out.mean(0), mean)
    assert torch.allclose(out.var(0), var, rtol=0.08), (out.var(0), var)


# --- convergence order against a tight solution of the probability-flow ODE ------------------
def _ode_reference(gm, x, sigma_start, sigma_end):
    """x(sigma_end) of dx/dsigma = (x - D(x; sigma)) / sigma from x at sigma_start: scipy's DOP853
    in u = log sigma (dx/du = x - D), rtol = atol = 1e-12."""
    shape = x.shape

    def rhs(u, y):
        xt = torch.from_numpy(y).reshape(shape)
        return (xt - gm(xt, torch.full((shape[0],), math.exp(u), dtype=xt.dtype), {})).reshape(-1).numpy()

    sol = solve_ivp(rhs, (math.log(sigma_start), math.log(sigma_end)), x.reshape(-1).numpy(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    assert sol.success, sol.message
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


@pytest.fixture(scope="module")
def ode_problem():
    g = torch.Generator().manual_seed(0)
    gm3 = GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64), std=0.5)
    disc = EDMDiscretization()  # 0.002 .. 80, rho 7
    x = initial_latent(torch.randn(32, 4, generator=g, dtype=torch.float64), 80.0)
    x_end = _ode_reference(gm3, x, 80.0, 0.002)
    return gm3, disc, x, x_end, gm3(x_end, torch.full((32,), 0.002, dtype=torch.float64), {})


ORDER_CASES = [
    # (id, class, knobs, step counts, expected order); all but dpm_fast end with x0 at sigma_min
    ("dpm_2", DPM2Sampler, {}, [16, 32, 64], 2),
    ("dpmpp_sde", DPMPPSDESampler, dict(eta=0.0), [16, 32, 64], 2),
    # DPM-Solver++(3M) as k-diffusion (and diffusers, and Lu et al.'s code) write it: its
    # second-difference term D2 = (d1_0 - d1_1) / (r0 + r1) is h^2 D''/2 where the phi_3
    # coefficient's Taylor term wants h^2 D'': slopes 3.8 at 16 -> 32 steps, then 2.4, 2.0, 1.9
    ("dpmpp_3m_sde", DPMPP3MSDESampler, dict(eta=0.0), [64, 128, 256], 2),
    # n = 3k + 2 evaluations: third-order steps and a last one of second order (32, 64, 128 steps)
    ("dpm_fast", DPMSolverFastSampler, dict(denoise_to_zero=False), [95, 191, 383], 3),
]


@pytest.mark.parametrize("name, cls, knobs, steps, order", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_convergence_order(ode_problem, name, cls, knobs, steps, order):
    gm3, disc, x, x_end, x0_end = ode_problem
    target = x_end if knobs.get("denoise_to_zero", True) is False else x0_end
    errs = [float((cls(disc, n, **knobs).sample(_denoise(gm3), x, sampling_sigmas(disc, n).double(), {})
                   - target).pow(2).mean().sqrt()) for n in steps]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert all(abs(s - order) < 0.35 for s in slopes), (errs, slopes)


# --- bad values --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (DPM2Sampler, dict(s_churn=-1), "s_churn"),
        (DPM2AncestralSampler, dict(eta=-0.5), "eta"),
        (DPMPPSDESampler, dict(r=0), "r"),
        (DPMPPSDESampler, dict(r=1.5), "r"),
        (DPMPPSDESampler, dict(s_noise=float("nan")), "s_noise"),
        (DPMPP3MSDESampler, dict(eta=-1), "eta"),
        (DPMSolverFastSampler, dict(eta=-1), "eta"),
        (DPMSolverFastSampler, dict(denoise_to_zero="yes"), "denoise_to_zero"),
        (DPMSolverAdaptiveSampler, dict(order=4), "order"),
        (DPMSolverAdaptiveSampler, dict(order=1), "order"),
        (DPMSolverAdaptiveSampler, dict(rtol=-0.1), "rtol"),
        (DPMSolverAdaptiveSampler, dict(rtol=0, atol=0), "rtol and atol"),
        (DPMSolverAdaptiveSampler, dict(h_init=0), "h_init"),
        (DPMSolverAdaptiveSampler, dict(pcoeff=float("inf")), "pcoeff"),
        (DPMSolverAdaptiveSampler, dict(accept_safety=0), "accept_safety"),
    ],
)
def test_bad_values_fail_at_construction(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(SDXL_EDM, 4, **kwargs)
