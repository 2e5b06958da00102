"""Restart, ER-SDE, Heun++ and the CFG++ samplers against their published formulas on the
analytic Gaussian mixture, their measured convergence order and the sampler conventions.

No independent implementation is installable (these are ComfyUI's; k-diffusion 0.1.1 has none),
so each sampler is checked against its formula written out here, against the plain sampler it
reduces to, and by its order (error against its own 1000-step solution as steps double).
"""

import functools
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from scipy import integrate

from sgm.diffusion import EDMDiscretization, IdentityGuider, IntervalCFG, LegacyDDPMDiscretization, VanillaCFG
from sgm.diffusion.analytic import GaussianMixture
from sgm.diffusion.noise import gaussian_like
from sgm.diffusion.samplers import (
    DPMPP2MCFGPPSampler,
    DPMPP2MSampler,
    ERSDESampler,
    EulerAncestralCFGPPSampler,
    EulerAncestralSampler,
    EulerCFGPPSampler,
    EulerEDMSampler,
    HeunEDMSampler,
    HeunPP2Sampler,
    RestartSampler,
)
from sgm.diffusion.samplers.restart import default_restarts
from sgm.diffusion.schedule import sampling_sigmas
from test_samplers import SDXL_EDM, _denoise, _noise, gm  # noqa: F401 (gm is a fixture)
from test_samplers import test_turns_noise_into_the_data_distribution as data_law_check


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def classes():
    """A 3-component mixture with a conditional (class weights) and an unconditional (prior) branch."""
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 1.5, std=0.3)
    weights = torch.tensor([0.8, 0.15, 0.05], dtype=torch.float64)

    def branches(batch):  # (cond, uc) for a batch of `batch` images
        return {"class_weights": weights.expand(batch, -1)}, {"class_weights": mix.weights.expand(batch, -1)}

    return mix, branches


# --- conventions: one table of what each new sampler must do ------------------------------
def _restart_with_two():
    return RestartSampler(SDXL_EDM, 6, restart_list=[{"sigma_min": 0.5, "sigma_max": 3.0, "steps": 3, "times": 2}])


CONVENTIONS = {  # name: (build, NFE of a 6-step run, stochastic, uses CFG)
    "restart": (_restart_with_two, 2 * 6 - 1 + 2 * 3 * 2, True, False),
    "er_sde": (lambda: ERSDESampler(SDXL_EDM, 6), 6, True, False),
    "er_sde_gaussian": (lambda: ERSDESampler(SDXL_EDM, 6, noise="gaussian"), 6, True, False),
    "heunpp2": (lambda: HeunPP2Sampler(SDXL_EDM, 6), 3 * 6 - 3, False, False),
    "euler_cfg_pp": (lambda: EulerCFGPPSampler(SDXL_EDM, 6, guider=VanillaCFG(0.6)), 6, False, True),
    "euler_a_cfg_pp": (lambda: EulerAncestralCFGPPSampler(SDXL_EDM, 6, guider=VanillaCFG(0.6)), 6, True, True),
    "dpmpp_2m_cfg_pp": (lambda: DPMPP2MCFGPPSampler(SDXL_EDM, 6, guider=VanillaCFG(0.6)), 6, False, True),
}


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_conventions(classes, name):
    build, nfe, stochastic, guided = CONVENTIONS[name]
    mix, branches = classes
    cond, uc = branches(3) if guided else ({}, None)
    noise = _noise((3, 2, 4, 4))
    before = noise.clone()
    calls: list[float] = []
    seen: list[int] = []
    out = build()(_denoise(mix, calls), noise, cond, uc, generator=_gens([3, 4, 5]),
                  callback=lambda info: seen.append(info["i"]))
    assert torch.equal(noise, before), "the sampler must not modify its input in place"
    assert seen == list(range(6)), "one callback per step"
    assert len(calls) == nfe, f"{len(calls)} network evaluations, documented {nfe}"
    assert 0.0 not in calls and calls[0] == pytest.approx(14.6146, rel=1e-5)
    x_start = noise * math.sqrt(1 + 14.6146**2)
    x_before = x_start.clone()
    build().sample(_denoise(mix), x_start, sampling_sigmas(SDXL_EDM, 6), cond, uc, generator=_gens([3, 4, 5]))
    assert torch.equal(x_start, x_before)
    torch.manual_seed(0)  # the global RNG plays no part
    again = build()(_denoise(mix), noise, cond, uc, generator=_gens([3, 4, 5]))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    other = build()(_denoise(mix), noise, cond, uc, generator=_gens([6, 7, 8]))
    assert torch.equal(out, other) != stochastic, "another generator: another sample iff the sampler draws noise"


@pytest.mark.parametrize("name", [n for n, spec in CONVENTIONS.items() if spec[2]])
def test_per_sample_generators_make_each_image_independent_of_its_batch(classes, name):
    build, _, _, guided = CONVENTIONS[name]
    mix, branches = classes
    (cond, uc), (cond_1, uc_1) = (branches(3), branches(1)) if guided else (({}, None), ({}, None))
    noise = _noise((3, 2, 4, 4))
    batch = build()(_denoise(mix), noise, cond, uc, generator=_gens([10, 11, 12]))
    alone = build()(_denoise(mix), noise[1:2], cond_1, uc_1, generator=_gens([11]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)


# --- restart ---------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [dict(restart_list=[]), dict(), dict(restart_list=[], s_churn=1.0)],
                         ids=["empty_list", "default_below_20_steps", "churn"])
def test_restart_without_restarts_is_heun(gm, knobs):
    noise = _noise((2, 2, 4, 4))
    ours = RestartSampler(SDXL_EDM, 12, **knobs)(_denoise(gm), noise, {}, generator=_gens([1, 2]))
    heun_knobs = {k: v for k, v in knobs.items() if k != "restart_list"}
    heun = HeunEDMSampler(SDXL_EDM, 12, **heun_knobs)(_denoise(gm), noise, {}, generator=_gens([1, 2]))
    torch.testing.assert_close(ours, heun, rtol=0, atol=0)


@pytest.mark.parametrize("n, expected", [(19, []), (20, [(9, 1)]), (35, [(9, 1)]), (36, [(9, 2)]), (50, [(12, 2)])])
def test_default_restart_list_scales_with_the_step_count(n, expected):
    assert [(r.steps, r.times) for r in default_restarts(n)] == expected
    assert all((r.sigma_min, r.sigma_max) == (0.1, 2.0) for r in default_restarts(n))
    sigmas = sampling_sigmas(SDXL_EDM, n).tolist()
    sampler = RestartSampler()
    extra = sum(2 * steps * times for steps, times in expected)
    assert sampler.nfe(sigmas) == 2 * n - 1 + extra


def test_restart_plan_snaps_to_the_schedule_and_uses_a_karras_subschedule():
    sigmas = sampling_sigmas(SDXL_EDM, 24).tolist()
    sampler = RestartSampler(restart_list=[{"sigma_min": 0.3, "sigma_max": 4.0, "steps": 5},
                                           {"sigma_min": 1e-4, "sigma_max": 0.01, "steps": 3},  # below sigma_min
                                           {"sigma_min": 50.0, "sigma_max": 90.0, "steps": 3}])  # above sigma_max
    plan = sampler.restart_plan(sigmas)
    lo = int(np.argmin([abs(s - 0.3) for s in sigmas]))
    hi = int(np.argmin([abs(s - 4.0) for s in sigmas]))
    assert list(plan) == [sigmas[lo]] and len(plan[sigmas[lo]]) == 1
    sub, times = plan[sigmas[lo]][0]
    assert times == 1 and len(sub) == 6 and (sub[0], sub[-1]) == (sigmas[hi], sigmas[lo])
    ramp = np.linspace(0, 1, 6)  # Karras et al. 2022, eq. 5, rho = 7, written out in float64
    karras = (sigmas[hi] ** (1 / 7) + ramp * (sigmas[lo] ** (1 / 7) - sigmas[hi] ** (1 / 7))) ** 7
    np.testing.assert_allclose(sub, karras, rtol=1e-6)


def test_restart_is_heun_then_forward_noise_then_heun_again(gm):
    """Xu et al.'s restart algorithm composed from its parts: Heun down to sigma_lo, K times (noise up
    to sigma_hi, Heun back down the sub-schedule), Heun on to 0; the same per-image generators."""
    sigmas = sampling_sigmas(SDXL_EDM, 10)
    sampler = RestartSampler(restart_list=[{"sigma_min": 0.4, "sigma_max": 3.0, "steps": 4, "times": 2}])
    x = initial = _noise((2, 2, 4, 4)) * math.sqrt(1 + float(sigmas[0]) ** 2)
    plan = sampler.restart_plan(sigmas.tolist())
    assert len(plan) == 1
    lo_sigma, [(sub, times)] = next(iter(plan.items()))
    lo = sigmas.tolist().index(lo_sigma)
    ours = sampler.sample(_denoise(gm), initial, sigmas, {}, generator=_gens([5, 6]))

    heun, gens = HeunEDMSampler(), _gens([5, 6])
    x = heun.sample(_denoise(gm), x, sigmas[: lo + 1], {})
    for _ in range(times):
        x = x + gaussian_like(x, gens) * math.sqrt(sub[0] ** 2 - sub[-1] ** 2)
        x = heun.sample(_denoise(gm), x, torch.tensor(sub, dtype=torch.float64), {})
    x = heun.sample(_denoise(gm), x, sigmas[lo:], {})
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)
    # s_noise scales the restart noise
    quiet = RestartSampler(s_noise=0.0, restart_list=[{"sigma_min": 0.4, "sigma_max": 3.0, "steps": 4, "times": 2}])
    assert not torch.allclose(quiet.sample(_denoise(gm), initial, sigmas, {}, generator=_gens([5, 6])), ours)


def test_restart_list_from_the_command_line(compose):
    listed = "sampler.restart_list=[{sigma_min:0.1,sigma_max:2.0,steps:10,times:2}]"
    cfg = compose("sample", ["sampler=restart", listed])
    sampler = instantiate(cfg.sampler)
    assert [(r.sigma_min, r.sigma_max, r.steps, r.times) for r in sampler.restart_list] == [(0.1, 2.0, 10, 2)]
    assert instantiate(compose("sample", ["sampler=restart"]).sampler).restart_list is None


# --- Heun++ ------------------------------------------------------------------------------------
def _heunpp2_by_hand(den, x, sigmas, gammas=None, g=None):
    """Heun++ as published (ComfyUI's sample_heunpp2), with churn noise drawn from g where gamma > 0."""
    s = sigmas.tolist()
    n, end = len(s) - 1, s[-1]
    ones = x.new_ones(x.shape[0])

    def slope(y, sig):
        return (y - den(y, sig * ones, {})) / sig

    for i in range(n):
        gamma = 0.0 if gammas is None else gammas[i]
        sigma_hat = s[i] * (1 + gamma)
        if gamma > 0:
            x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * math.sqrt(sigma_hat**2 - s[i] ** 2)
        d = slope(x, sigma_hat)
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == end:
            x = x + d * dt
        elif s[i + 2] == end:
            d2 = slope(x + d * dt, s[i + 1])
            w2 = s[i + 1] / (2 * s[0])
            x = x + ((1 - w2) * d + w2 * d2) * dt
        else:
            x2 = x + d * dt
            d2 = slope(x2, s[i + 1])
            x3 = x2 + d2 * (s[i + 2] - s[i + 1])
            d3 = slope(x3, s[i + 2])
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


@pytest.mark.parametrize("disc", [SDXL_EDM, LegacyDDPMDiscretization()], ids=["edm", "ddpm"])
@pytest.mark.parametrize("churn", [0.0, 1.0])
def test_heunpp2_is_the_published_formula(gm, disc, churn):
    steps = 7
    sigmas = sampling_sigmas(disc, steps).double()
    x = _noise((3, 2, 4, 4)) * torch.sqrt(1 + sigmas[0] ** 2)
    ours = HeunPP2Sampler(s_churn=churn).sample(_denoise(gm), x, sigmas, {}, generator=torch.Generator().manual_seed(4))
    gammas = [min(churn / steps, 2**0.5 - 1)] * steps
    ref = _heunpp2_by_hand(gm, x, sigmas, gammas, torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # a slice that ends above 0 (a refiner hand-off) takes an Euler step to its last sigma, as ComfyUI does
    ours = HeunPP2Sampler().sample(_denoise(gm), x, sigmas[:5], {})
    torch.testing.assert_close(ours, _heunpp2_by_hand(gm, x, sigmas[:5]), rtol=0, atol=1e-12)


# --- ER-SDE --------------------------------------------------------------------------------------
def _phi_er_sde(v):
    return v * (math.exp(v**0.3) + 10.0)


def _er_sde_by_hand(den, x, sigmas, phi, draws=None, max_stage=3):
    """ER-SDE-Solver-3 (Cui et al. 2024, eq. 13-15 in sigma), integrals by adaptive quadrature (scipy)."""
    s = sigmas.tolist()
    ones = x.new_ones(x.shape[0])
    x0s, d1 = [], []
    for i in range(len(s) - 1):
        x0 = den(x, s[i] * ones, {})
        if s[i + 1] == 0:
            return x0
        sig, nxt = s[i], s[i + 1]
        r = phi(nxt) / phi(sig)
        x_new = r * x + (1 - r) * x0
        if min(max_stage, i + 1) >= 2:
            i1 = integrate.quad(lambda v: 1 / phi(v), nxt, sig, epsabs=0, epsrel=1e-13)[0]
            d1.append((x0 - x0s[-1]) / (sig - s[i - 1]))
            x_new = x_new + ((nxt - sig) + phi(nxt) * i1) * d1[-1]
            if min(max_stage, i + 1) >= 3:
                i2 = integrate.quad(lambda v: (v - sig) / phi(v), nxt, sig, epsabs=0, epsrel=1e-13)[0]
                d2 = (d1[-1] - d1[-2]) / ((sig - s[i - 2]) / 2)
                x_new = x_new + ((nxt - sig) ** 2 / 2 + phi(nxt) * i2) * d2
        if draws is not None:
            x_new = x_new + next(draws) * math.sqrt(nxt**2 - (r * sig) ** 2)
        x0s.append(x0)
        x = x_new
    return x


@pytest.mark.parametrize("noisy", [False, True])
def test_er_sde_is_the_published_formula(gm, noisy):
    sigmas = sampling_sigmas(SDXL_EDM, 8).double()
    x = _noise((3, 2, 4, 4)) * torch.sqrt(1 + sigmas[0] ** 2)
    sampler = ERSDESampler(s_noise=1.0 if noisy else 0.0, noise="gaussian")
    ours = sampler.sample(_denoise(gm), x, sigmas, {}, generator=_gens([1, 2, 3]))
    gens = _gens([1, 2, 3])
    draws = (gaussian_like(x, gens) for _ in range(8)) if noisy else None
    ref = _er_sde_by_hand(gm, x, sigmas, _phi_er_sde, draws)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_er_sde_stage_coefficients_against_quadrature_and_closed_form():
    sampler, ode = ERSDESampler(), ERSDESampler(solver_type="ode")
    for sig, nxt in [(14.6, 9.0), (14.6, 2.0), (3.0, 2.9), (0.5, 0.03), (0.04, 0.0292)]:
        r, c2, c3, std = sampler.coefficients(sig, nxt)
        i1 = integrate.quad(lambda v: 1 / _phi_er_sde(v) - 1 / _phi_er_sde(nxt), nxt, sig, epsabs=0, epsrel=1e-13)[0]
        i2 = integrate.quad(lambda v: (v - sig) * (1 / _phi_er_sde(v) - 1 / _phi_er_sde(nxt)), nxt, sig,
                            epsabs=0, epsrel=1e-13)[0]
        assert r == pytest.approx(_phi_er_sde(nxt) / _phi_er_sde(sig), rel=1e-14)
        assert c2 == pytest.approx(_phi_er_sde(nxt) * i1, rel=1e-10)
        assert c3 == pytest.approx(_phi_er_sde(nxt) * i2, rel=1e-10)
        assert std == pytest.approx(math.sqrt(nxt**2 - (r * sig) ** 2), rel=1e-12) and std > 0
        # phi(x) = x: the probability-flow ODE, closed-form coefficients and no noise
        r, c2, c3, std = ode.coefficients(sig, nxt)
        log = math.log(sig / nxt)
        assert r == pytest.approx(nxt / sig, rel=1e-14) and std == 0
        assert c2 == pytest.approx(nxt * log - (sig - nxt), rel=1e-10)
        assert c3 == pytest.approx(nxt * ((sig - nxt) - sig * log) + (sig - nxt) ** 2 / 2, rel=1e-9)


def test_er_sde_first_stage_is_euler_and_euler_ancestral(gm):
    noise = _noise((3, 2, 4, 4))
    ode = ERSDESampler(SDXL_EDM, 9, solver_type="ode", max_stage=1)(_denoise(gm), noise, {})
    torch.testing.assert_close(ode, EulerEDMSampler(SDXL_EDM, 9)(_denoise(gm), noise, {}), rtol=0, atol=1e-12)
    sde = ERSDESampler(SDXL_EDM, 9, solver_type="reverse_sde", eta=1.0, max_stage=1, noise="gaussian", s_noise=0.9)
    ancestral = EulerAncestralSampler(SDXL_EDM, 9, s_noise=0.9)
    torch.testing.assert_close(sde(_denoise(gm), noise, {}, generator=_gens([1, 2, 3])),
                               ancestral(_denoise(gm), noise, {}, generator=_gens([1, 2, 3])), rtol=0, atol=1e-10)


def test_er_sde_without_noise_draws_nothing(gm):
    noise = _noise((2, 2, 4, 4))
    for sampler in [ERSDESampler(SDXL_EDM, 5, solver_type="ode"), ERSDESampler(SDXL_EDM, 5, s_noise=0.0),
                    ERSDESampler(SDXL_EDM, 5, solver_type="reverse_sde", eta=0.0)]:
        g = torch.Generator().manual_seed(9)
        state = g.get_state()
        sampler(_denoise(gm), noise, {}, generator=g)
        assert torch.equal(g.get_state(), state) and not sampler.stochastic


def test_er_sde_runs_with_different_step_counts_follow_the_same_brownian_path():
    """With Brownian-tree noise a 20- and a 40-step run of one seed approach the same sample;
    with fresh Gaussian draws they are about as far apart as two seeds."""
    g = torch.Generator().manual_seed(0)
    single = GaussianMixture(torch.randn(1, 4, generator=g, dtype=torch.float64), std=0.5)
    x0 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    runs = {(noise, n, seed): ERSDESampler(SDXL_EDM, n, noise=noise)(
                _denoise(single), x0, {}, generator=torch.Generator().manual_seed(seed))
            for noise in ERSDESampler.NOISE_TYPES for n, seed in [(20, 3), (40, 3), (40, 4)]}

    def rms(noise, other):
        return float((runs[noise, 20, 3] - runs[(noise, *other)]).pow(2).mean().sqrt())

    assert rms("brownian", (40, 3)) < 0.1 * rms("brownian", (40, 4))  # measured 0.02
    assert rms("gaussian", (40, 3)) > 0.3 * rms("gaussian", (40, 4))  # measured 0.46


# --- convergence order on the probability-flow ODE ---------------------------------------------
def _orders(build, steps=(16, 32, 64), reference=400):
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64), std=0.5)
    x0 = torch.randn(64, 4, generator=g, dtype=torch.float64)
    disc = EDMDiscretization()
    ref = build(disc, reference)(_denoise(mix), x0, {})
    errs = [float((build(disc, n)(_denoise(mix), x0, {}) - ref).pow(2).mean().sqrt()) for n in steps]
    return errs, [math.log2(errs[k] / errs[k + 1]) for k in range(len(errs) - 1)]


ORDERS = {  # name: (build, measured order)
    "restart_without_restarts": (lambda d, n: RestartSampler(d, n, restart_list=[]), 2),
    "heunpp2": (lambda d, n: HeunPP2Sampler(d, n), 1),
    "er_sde_ode_stage1": (lambda d, n: ERSDESampler(d, n, solver_type="ode", max_stage=1), 1),
    "er_sde_ode_stage2": (lambda d, n: ERSDESampler(d, n, solver_type="ode", max_stage=2), 2),
    "er_sde_ode_stage3": (lambda d, n: ERSDESampler(d, n, solver_type="ode", max_stage=3), 2),
    "er_sde_no_noise": (lambda d, n: ERSDESampler(d, n, s_noise=0.0), 2),
}


@pytest.mark.parametrize("name", list(ORDERS))
def test_convergence_order(name):
    build, order = ORDERS[name]
    errs, slopes = _orders(build)
    assert all(abs(s - order) < 0.35 for s in slopes), (errs, slopes)


# --- the data distribution ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", [RestartSampler, functools.partial(ERSDESampler, noise="gaussian"), HeunPP2Sampler],
                         ids=["restart", "er_sde", "heunpp2"])
def test_turns_noise_into_the_data_distribution(cls):
    data_law_check(cls)  # test_samplers' check: 100 steps, 4000 samples of a 2-D mixture


# --- CFG++ -------------------------------------------------------------------------------------
def _branches(mix, x, sigma, cond, uc, lam):
    s = x.new_full((x.shape[0],), sigma)
    x0_u, x0_c = mix(x, s, uc), mix(x, s, cond)
    return x0_u + lam * (x0_c - x0_u), x0_u


def test_euler_cfg_pp_step_is_the_papers_ddim_update(classes):
    """Chung et al. 2024, the DDIM update in its variance-preserving form: x_{t-1} = sqrt(a_{t-1}) x0_lam +
    sqrt(1 - a_{t-1}) eps_u, with a = 1 / (1 + sigma^2) and x_vp = x / sqrt(1 + sigma^2)."""
    mix, branches = classes
    cond, uc = branches(2)
    sigma, sigma_next, lam = 3.0, 1.2, 0.6
    x = _noise((2, 2, 4, 4)) * 3.0
    step = torch.tensor([sigma, sigma_next], dtype=torch.float64)
    ours = EulerCFGPPSampler(guider=VanillaCFG(lam)).sample(_denoise(mix), x, step, cond, uc)
    a_t, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    x_vp = x * math.sqrt(a_t)
    x0_lam, x0_u = _branches(mix, x, sigma, cond, uc, lam)
    eps_u = (x_vp - math.sqrt(a_t) * x0_u) / math.sqrt(1 - a_t)
    x_next_vp = math.sqrt(a_next) * x0_lam + math.sqrt(1 - a_next) * eps_u
    torch.testing.assert_close(ours, x_next_vp / math.sqrt(a_next), rtol=0, atol=1e-12)


def test_euler_a_cfg_pp_step_is_the_published_update(classes):
    """x_next = x0_lam + sigma_down (x - x0_u) / sigma + sigma_up z (the authors' euler_a_cfg++)."""
    mix, branches = classes
    cond, uc = branches(2)
    sigma, sigma_next, lam, eta = 3.0, 1.2, 0.8, 0.7
    x = _noise((2, 2, 4, 4)) * 3.0
    sampler = EulerAncestralCFGPPSampler(guider=VanillaCFG(lam), eta=eta)
    step = torch.tensor([sigma, sigma_next], dtype=torch.float64)
    ours = sampler.sample(_denoise(mix), x, step, cond, uc, generator=_gens([1, 2]))
    sigma_up = eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    x0_lam, x0_u = _branches(mix, x, sigma, cond, uc, lam)
    ref = x0_lam + sigma_down * (x - x0_u) / sigma + sigma_up * gaussian_like(x, _gens([1, 2]))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_dpmpp_2m_cfg_pp_is_the_published_update(classes):
    """The authors' dpm++_2m_cfg++ (and ComfyUI's): with h = log(sigma / sigma_next), r = h_prev / h,
    x_next = x0_lam - e^-h x0_u + e^-h x - expm1(-h) (x0_lam - x0_u_prev) / (2 r), first step and
    step to 0 without the last term."""
    mix, branches = classes
    cond, uc = branches(2)
    lam = 0.7
    sigmas = sampling_sigmas(SDXL_EDM, 6).double()
    x = _noise((2, 2, 4, 4)) * torch.sqrt(1 + sigmas[0] ** 2)
    ours = DPMPP2MCFGPPSampler(guider=VanillaCFG(lam)).sample(_denoise(mix), x, sigmas, cond, uc)
    s, prev_u = sigmas.tolist(), None
    for i in range(len(s) - 1):
        x0_lam, x0_u = _branches(mix, x, s[i], cond, uc, lam)
        if s[i + 1] == 0:
            x = x0_lam
            break
        h = math.log(s[i] / s[i + 1])
        x_next = x0_lam - math.exp(-h) * x0_u + math.exp(-h) * x
        if prev_u is not None:
            r = math.log(s[i - 1] / s[i]) / h
            x_next = x_next - math.expm1(-h) * (x0_lam - prev_u) / (2 * r)
        x, prev_u = x_next, x0_u
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)


def test_euler_cfg_pp_is_euler_cfg_at_a_per_step_scale(classes):
    """CFG++ at lam is plain CFG at omega_i = lam sigma_i / (sigma_i - sigma_{i+1}): scale 1 is not
    the plain sampler at scale 1 (the noise is re-estimated unconditionally)."""
    mix, branches = classes
    cond, uc = branches(2)
    sigmas = sampling_sigmas(SDXL_EDM, 5).double()
    x0 = _noise((2, 2, 4, 4)) * torch.sqrt(1 + sigmas[0] ** 2)
    for lam in (0.6, 1.0):
        ours = EulerCFGPPSampler(guider=VanillaCFG(lam)).sample(_denoise(mix), x0, sigmas, cond, uc)
        x, s = x0, sigmas.tolist()
        for i in range(len(s) - 1):
            omega = lam * s[i] / (s[i] - s[i + 1])
            x = EulerEDMSampler(guider=VanillaCFG(omega)).sample(_denoise(mix), x, sigmas[i : i + 2], cond, uc)
        torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)
    plain = EulerEDMSampler(guider=VanillaCFG(1.0)).sample(_denoise(mix), x0, sigmas, cond, uc)
    assert not torch.allclose(ours, plain, atol=1e-3)


PLAIN = [(EulerCFGPPSampler, EulerEDMSampler), (EulerAncestralCFGPPSampler, EulerAncestralSampler),
         (DPMPP2MCFGPPSampler, DPMPP2MSampler)]


@pytest.mark.parametrize("cfgpp, plain", PLAIN, ids=["euler", "euler_a", "dpmpp_2m"])
def test_cfg_pp_without_an_unconditional_branch_is_the_plain_sampler(classes, cfgpp, plain):
    mix, branches = classes
    cond, uc = branches(2)
    noise = _noise((2, 2, 4, 4))

    def run(cls, guider):
        return cls(SDXL_EDM, 8, guider=guider)(_denoise(mix), noise, cond, uc, generator=_gens([1, 2]))

    reference = run(plain, IdentityGuider())
    for guider in [IdentityGuider(), IntervalCFG(0.6, sigma_lo=20.0, sigma_hi=30.0)]:  # no step inside the interval
        torch.testing.assert_close(run(cfgpp, guider), reference, rtol=0, atol=0)
    # lam = 0 is unconditional sampling either way; a guidance interval inside the schedule changes the result
    torch.testing.assert_close(run(cfgpp, VanillaCFG(0.0)), run(plain, VanillaCFG(0.0)), rtol=0, atol=0)
    assert not torch.allclose(run(cfgpp, IntervalCFG(0.6, sigma_lo=0.5, sigma_hi=5.0)), reference)


@pytest.mark.parametrize("cfgpp, plain", PLAIN, ids=["euler", "euler_a", "dpmpp_2m"])
def test_cfg_pp_with_equal_branches_is_the_plain_sampler(classes, cfgpp, plain):
    """When the unconditional branch predicts what the conditional one does, x0_lam = x0_u."""
    mix, branches = classes
    cond, _ = branches(2)
    noise = _noise((2, 2, 4, 4))
    ours = cfgpp(SDXL_EDM, 8, guider=VanillaCFG(0.7))(_denoise(mix), noise, cond, cond, generator=_gens([1, 2]))
    ref = plain(SDXL_EDM, 8, guider=VanillaCFG(0.7))(_denoise(mix), noise, cond, cond, generator=_gens([1, 2]))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


# --- bad values ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (RestartSampler, dict(restart_list={"sigma_min": 0.1}), "restart_list"),
        (RestartSampler, dict(restart_list=[[0.1, 2.0, 5, 1]]), r"restart_list\[0\]"),
        (RestartSampler, dict(restart_list=[{"sigma_min": 0.1, "steps": 5}]), r"restart_list\[0\].*sigma_max"),
        (RestartSampler, dict(restart_list=[{"sigma_min": 2.0, "sigma_max": 0.1, "steps": 5}]), "sigma_max"),
        (RestartSampler, dict(restart_list=[{"sigma_min": 0.1, "sigma_max": 2.0, "steps": 0}]),
         r"restart_list\[0\].steps"),
        (RestartSampler, dict(restart_list=[{"sigma_min": -1, "sigma_max": 2.0, "steps": 3}]), "sigma_min"),
        (RestartSampler, dict(s_noise=-1.0), "s_noise"),
        (ERSDESampler, dict(solver_type="sde"), "solver_type"),
        (ERSDESampler, dict(noise="uniform"), "noise"),
        (ERSDESampler, dict(max_stage=4), "max_stage"),
        (ERSDESampler, dict(max_stage=0), "max_stage"),
        (ERSDESampler, dict(eta=-0.5), "eta"),
        (ERSDESampler, dict(s_noise=float("nan")), "s_noise"),
        (HeunPP2Sampler, dict(s_churn=-1.0), "s_churn"),
        (EulerAncestralCFGPPSampler, dict(eta=-1.0), "eta"),
    ],
)
def test_bad_values_fail_at_construction(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(SDXL_EDM, 4, **kwargs)
