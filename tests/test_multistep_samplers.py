"""UniPC, DEIS, iPNDM (fixed and variable step) and RES multistep.

UniPC and DEIS against diffusers' UniPCMultistepScheduler / DEISMultistepScheduler on the
same schedule; iPNDM and RES against their published formulas written out here, iPNDM-v
against k-diffusion's linear multistep; the exponential-integrator weights against
quadrature; every sampler's convergence order on the analytic denoiser.

Driving diffusers on our schedule: our samplers work on x = x0 + sigma eps over a sigma
schedule, diffusers on x_vp = x / sqrt(1 + sigma^2) over integer timesteps. Its timesteps are
set to the DDPM table's (the ones our LegacyDDPMDiscretization uses) and its sigmas to ours;
the model output it gets is the analytic denoiser's, converted to eps. Its lambda =
log(alpha) - log(sigma_vp) is exactly our -log(sigma). Its step to sigma 0 is compared only
for UniPC-bh2: DEIS's log-rho weights and UniPC-bh1's B(h) = h are infinite there (diffusers
returns nan), while ours returns the denoised estimate; so the runs are compared up to the
last nonzero sigma, and our final x against the denoised estimate of diffusers' last sample.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from sgm.diffusion import EDMDiscretization, LegacyDDPMDiscretization
from sgm.diffusion.analytic import GaussianMixture
from sgm.diffusion.samplers import DEISSampler, IPNDMSampler, IPNDMVSampler, RESMultistepSampler, UniPCSampler
from sgm.diffusion.samplers.multistep import exponential_weights, phi
from sgm.diffusion.schedule import initial_latent, sampling_sigmas
from test_samplers import SDXL_EDM, _denoise, _noise, gm  # noqa: F401 (gm is a fixture)

DDPM = LegacyDDPMDiscretization()  # SDXL's table: scaled_linear betas 0.00085 .. 0.012
SAMPLERS = [
    ("uni_pc", UniPCSampler, dict(variant="bh1")),
    ("uni_pc_bh2", UniPCSampler, dict(variant="bh2")),
    ("deis", DEISSampler, {}),
    ("ipndm", IPNDMSampler, {}),
    ("ipndm_v", IPNDMVSampler, {}),
    ("res_multistep", RESMultistepSampler, {}),
]


def _trajectory(sampler, gm, noise):
    """Our run from unit noise: the x each step evaluated (at sigma_i) and the result."""
    seen: list[torch.Tensor] = []
    out = sampler(_denoise(gm), noise, {}, callback=lambda info: seen.append(info["x"]))
    return seen, out


# --- diffusers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_schedulers():
    pytest.importorskip("diffusers", reason="diffusers is the test-only oracle (make install-test)")
    from diffusers import DEISMultistepScheduler, UniPCMultistepScheduler

    return {"unipc": UniPCMultistepScheduler, "deis": DEISMultistepScheduler}


def _diffusers_run(scheduler, gm, noise, disc, steps, to_zero=False):
    """diffusers' scheduler over our schedule: the VP sample it fed the model at each step and
    the one it reaches at the last nonzero sigma, plus (``to_zero``) its own step to sigma 0."""
    sigmas = sampling_sigmas(disc, steps).double()
    if isinstance(disc, LegacyDDPMDiscretization):
        timesteps = disc.timesteps(steps)[::-1].copy()
    else:  # diffusers reads its timesteps only to count the steps
        timesteps = np.arange(steps)[::-1].copy()
    scheduler.set_timesteps(steps)
    scheduler.timesteps = torch.from_numpy(timesteps).long()
    scheduler.sigmas = sigmas.clone()
    sample, seen = noise.clone(), []  # x_vp at sigma_0 is the unit noise itself
    for i in range(steps):
        seen.append(sample)
        if i == steps - 1 and not to_zero:
            break
        x = sample * torch.sqrt(1 + sigmas[i] ** 2)
        eps = (x - gm(x, sigmas[i].expand(len(x)), {})) / sigmas[i]
        sample = scheduler.step(eps, scheduler.timesteps[i], sample).prev_sample
    return seen, sigmas, sample if to_zero else None


def _compare_with_diffusers(ours, theirs, gm):
    """Our x / sqrt(1 + sigma^2) at every step against diffusers' sample, and our result against
    the denoised estimate of its last one (our step to sigma 0)."""
    (seen, out), (theirs_seen, sigmas, _) = ours, theirs
    assert len(seen) == len(theirs_seen) == len(sigmas) - 1
    for x, x_vp, sigma in zip(seen, theirs_seen, sigmas):
        torch.testing.assert_close(x / torch.sqrt(1 + sigma**2), x_vp, rtol=0, atol=1e-5)
    last_sigma = sigmas[-2]
    x_last = theirs_seen[-1] * torch.sqrt(1 + last_sigma**2)
    torch.testing.assert_close(out, gm(x_last, last_sigma.expand(len(x_last)), {}), rtol=0, atol=1e-5)


UNIPC_CASES = [(v, o) for v in UniPCSampler.VARIANTS for o in (1, 2, 3)]


@pytest.mark.parametrize("disc", [DDPM, SDXL_EDM], ids=["ddpm", "edm"])
@pytest.mark.parametrize("variant, order", UNIPC_CASES, ids=[f"{v}-order{o}" for v, o in UNIPC_CASES])
def test_unipc_agrees_with_diffusers(diffusers_schedulers, gm, disc, variant, order):
    """diffusers' defaults otherwise: predict_x0, lower_order_final (ours always lowers the last
    steps too). With bh2 diffusers' own step to sigma 0 is finite and is compared as well."""
    steps, noise = 10, _noise((5, 2, 4, 4))
    scheduler = diffusers_schedulers["unipc"](beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                              solver_order=order, solver_type=variant, predict_x0=True,
                                              lower_order_final=True, final_sigmas_type="zero")
    ours = _trajectory(UniPCSampler(disc, steps, variant=variant, order=order), gm, noise)
    theirs = _diffusers_run(scheduler, gm, noise, disc, steps, to_zero=variant == "bh2")
    _compare_with_diffusers(ours, theirs, gm)
    if variant == "bh2":
        torch.testing.assert_close(ours[1], theirs[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("disc", [DDPM, SDXL_EDM], ids=["ddpm", "edm"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_agrees_with_diffusers(diffusers_schedulers, gm, disc, order):
    """lower_order_final=False: with fewer than 15 steps diffusers lowers the last two steps'
    order, ours (as the DEIS paper) keeps the full order up to the step to sigma 0."""
    steps, noise = 10, _noise((5, 2, 4, 4))
    scheduler = diffusers_schedulers["deis"](beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             solver_order=order, lower_order_final=False)
    ours = _trajectory(DEISSampler(disc, steps, order=order), gm, noise)
    _compare_with_diffusers(ours, _diffusers_run(scheduler, gm, noise, disc, steps), gm)


# --- the published formulas --------------------------------------------------------------
def _ipndm_published(gm, x, sigmas):
    """iPNDM (Zhang & Chen 2023, App.): Adams-Bashforth in sigma with the constant-step
    weights, lower orders while the history fills, the denoised estimate at sigma 0."""
    weights = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    ds: list[torch.Tensor] = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = gm(x, x.new_full((len(x),), sigma), {})
        if sigma_next == 0:
            return denoised
        ds = [(x - denoised) / sigma] + ds[:3]
        x = x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights[len(ds)], ds))
    return x


def _res_published(gm, x, sigmas):
    """RES 2nd-order multistep (Zhang et al. 2023): x <- e^(-h) x + h (b1 D_i + b2 D_{i-1}),
    b2 = phi_2(-h) / c2, b1 = phi_1(-h) - b2, c2 = (lambda_{i-1} - lambda_i) / h, lambda = -log sigma."""
    old = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = gm(x, x.new_full((len(x),), sigma), {})
        if sigma_next == 0:
            return denoised
        h = math.log(sigma / sigma_next)
        phi_1 = math.expm1(-h) / -h
        phi_2 = (phi_1 - 1) / -h
        if old is None:
            x = math.exp(-h) * x + h * phi_1 * denoised
        else:
            c2 = -math.log(sigmas[i - 1] / sigma) / h
            b2 = phi_2 / c2
            x = math.exp(-h) * x + h * ((phi_1 - b2) * denoised + b2 * old)
        old = denoised
    return x


@pytest.mark.parametrize("disc", [DDPM, SDXL_EDM, EDMDiscretization()], ids=["ddpm", "edm_sdxl", "edm"])
@pytest.mark.parametrize("cls, published", [(IPNDMSampler, _ipndm_published), (RESMultistepSampler, _res_published)],
                         ids=["ipndm", "res_multistep"])
def test_matches_the_published_formula(gm, disc, cls, published):
    steps, noise = 12, _noise((4, 2, 4, 4))
    sigmas = sampling_sigmas(disc, steps).double()
    expected = published(gm, noise * torch.sqrt(1 + sigmas[0] ** 2), sigmas.tolist())
    torch.testing.assert_close(cls(disc, steps)(_denoise(gm), noise, {}), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("disc", [DDPM, SDXL_EDM], ids=["ddpm", "edm"])
def test_ipndm_v_is_variable_step_adams_bashforth(ksampling, gm, disc):
    """k-diffusion's lms (order 4) is the variable-step Adams-Bashforth method; iPNDM-v takes the
    same steps and differs only in the last one, which returns the denoised estimate."""
    steps, noise = 12, _noise((4, 2, 4, 4))
    seen, out = _trajectory(IPNDMVSampler(disc, steps), gm, noise)
    sigmas = sampling_sigmas(disc, steps).double()
    theirs: list[torch.Tensor] = []
    ksampling.sample_lms(lambda x, s: gm(x, s, {}), noise * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True,
                         order=4, callback=lambda info: theirs.append(info["x"]))
    for ours_x, their_x in zip(seen, theirs, strict=True):
        torch.testing.assert_close(ours_x, their_x, rtol=0, atol=1e-8)
    torch.testing.assert_close(out, gm(seen[-1], sigmas[-2].expand(len(out)), {}), rtol=0, atol=0)


def test_ipndm_v_on_a_uniform_grid_is_ipndm(gm):
    sigmas = torch.cat([torch.linspace(8.0, 0.5, 9, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = _noise((3, 2, 4, 4)) * 8.0
    fixed = IPNDMSampler().sample(_denoise(gm), x, sigmas, {})
    variable = IPNDMVSampler().sample(_denoise(gm), x, sigmas, {})
    torch.testing.assert_close(variable, fixed, rtol=0, atol=1e-12)
    noise = _noise((3, 2, 4, 4))  # on a non-uniform grid they differ
    assert not torch.allclose(IPNDMVSampler(SDXL_EDM, 9)(_denoise(gm), noise, {}),
                              IPNDMSampler(SDXL_EDM, 9)(_denoise(gm), noise, {}), rtol=0, atol=1e-4)


def test_exponential_weights_integrate_the_interpolant():
    """Against Gauss-Legendre quadrature of e^(tau - end) l_j(tau), steps of either sign, small and large."""
    rng = np.random.default_rng(0)
    nodes_u, quad_w = np.polynomial.legendre.leggauss(40)
    for span in (1e-3, 0.05, 0.7, 3.0, -1e-3, -0.4, -2.5):
        for order in (1, 2, 3, 4):
            start = float(rng.normal())
            nodes = [start] + [start - span * (k + rng.uniform(0.3, 1.2)) for k in range(order - 1)]  # the past
            end = start + span
            tau = start + (nodes_u + 1) / 2 * span
            for j, node in enumerate(nodes):
                basis = np.prod([(tau - o) / (node - o) for m, o in enumerate(nodes) if m != j], axis=0)
                exact = float(np.sum(quad_w * np.exp(tau - end) * basis) * span / 2)
                got = exponential_weights(nodes, start, end)[j]
                assert got == pytest.approx(exact, rel=1e-9, abs=1e-15), (span, order, j)


@pytest.mark.parametrize("z", [-3.0, -1.0, -0.999, -0.2, -1e-6, 0.0, 1e-6, 0.3, 0.999, 1.0, 2.5])
def test_phi_functions(z):
    """phi_k(z) = int_0^1 e^((1 - t) z) t^(k-1) / (k-1)! dt by quadrature, on both sides of the series' range."""
    t, w = np.polynomial.legendre.leggauss(30)
    t = (t + 1) / 2
    assert phi(0, z) == pytest.approx(math.exp(z), rel=1e-14)
    for k in (1, 2, 3, 4):
        exact = float(np.sum(w * np.exp((1 - t) * z) * t ** (k - 1)) / 2 / math.factorial(k - 1))
        assert phi(k, z) == pytest.approx(exact, rel=1e-12)


# --- conventions -------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls, knobs", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_conventions(gm, name, cls, knobs):
    """Inputs kept, one callback and one evaluation per step (UniPC's corrector reuses the next
    one), none at sigma 0, deterministic (the generator plays no part), either entry point."""
    sigmas = sampling_sigmas(SDXL_EDM, 6)
    noise = _noise((3, 2, 4, 4))
    x_start = initial_latent(noise, sigmas[0])
    kept = noise.clone(), x_start.clone()
    calls: list[float] = []
    steps_seen: list[int] = []
    out = cls(SDXL_EDM, 6, **knobs)(_denoise(gm, calls), noise, {},
                                    callback=lambda info: steps_seen.append(info["i"]))
    given = cls(verbose=True, **knobs).sample(_denoise(gm), x_start, sigmas, {}, generator=torch.Generator().manual_seed(4))
    assert torch.equal(noise, kept[0]) and torch.equal(x_start, kept[1]), "inputs are never modified in place"
    assert steps_seen == list(range(6)) and len(calls) == 6
    assert 0.0 not in calls and calls[0] == pytest.approx(14.6146, rel=1e-5)
    torch.testing.assert_close(given, out, rtol=0, atol=0)
    for tail in (sigmas[-2:], sigmas[-3:]):  # a one- and a two-step slice (img2img's last steps)
        assert torch.isfinite(cls(**knobs).sample(_denoise(gm), x_start / 100, tail, {})).all()


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (UniPCSampler, dict(variant="bh3"), "variant"),
        (UniPCSampler, dict(order=4), "order"),
        (UniPCSampler, dict(order=0), "order"),
        (DEISSampler, dict(order=4), "order"),
        (DEISSampler, dict(order="two"), "order"),
        (IPNDMSampler, dict(order=5), "order"),
        (IPNDMVSampler, dict(order=1.5), "order"),
        (RESMultistepSampler, dict(num_steps=0), "num_steps"),
    ],
)
def test_bad_values_fail_at_construction(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(SDXL_EDM, **{"num_steps": 4, **kwargs})


# --- convergence order ---------------------------------------------------------------------
EDM_PAPER = EDMDiscretization()  # 0.002 .. 80, rho 7
ORDER_CASES = [
    # name, sampler, expected order, schedule, step counts (doubling) where that order shows
    ("res_multistep", RESMultistepSampler, 2, EDM_PAPER, [32, 64, 128]),
    ("deis_order2", functools.partial(DEISSampler, order=2), 2, EDM_PAPER, [32, 64, 128]),
    ("deis", DEISSampler, 3, SDXL_EDM, [32, 64, 128]),
    ("ipndm", IPNDMSampler, 2, EDM_PAPER, [32, 64, 128]),  # constant weights on a non-uniform grid
    ("ipndm_v", IPNDMVSampler, 4, EDM_PAPER, [64, 128, 256]),
    ("uni_pc_order2", functools.partial(UniPCSampler, order=2), 3, EDM_PAPER, [32, 64, 128]),  # UniC adds one
    ("uni_pc", UniPCSampler, 4, EDM_PAPER, [64, 128, 256]),
]


@pytest.fixture(scope="module")
def ode_problem():
    """A 4-D, 3-component mixture, 64 starting points, and ``exact(disc)``: the end of their
    probability-flow ODE over that schedule's range, DOP853 in t = log sigma (dx/dt = x - D)
    at rtol 1e-12 from sigma_max to sigma_min, then the denoised estimate (every sampler's
    step to 0). Its own error is about 2e-11."""
    integrate = pytest.importorskip("scipy.integrate")
    g = torch.Generator().manual_seed(0)
    gm3 = GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64), std=0.5)
    x0 = torch.randn(64, 4, generator=g, dtype=torch.float64)
    cache: dict[int, torch.Tensor] = {}

    def exact(disc) -> torch.Tensor:
        if id(disc) not in cache:
            sigmas = sampling_sigmas(disc, 2).double()
            sigma_max, sigma_min = float(sigmas[0]), float(sigmas[1])

            def rhs(t, y):
                x = torch.from_numpy(y).view(x0.shape)
                return (x - gm3(x, x.new_full((len(x),), math.exp(t)), {})).numpy().ravel()

            sol = integrate.solve_ivp(rhs, (math.log(sigma_max), math.log(sigma_min)),
                                      (x0 * math.sqrt(1 + sigma_max**2)).numpy().ravel(),
                                      method="DOP853", rtol=1e-12, atol=1e-12)
            x_end = torch.from_numpy(sol.y[:, -1]).view(x0.shape)
            cache[id(disc)] = gm3(x_end, x_end.new_full((len(x_end),), sigma_min), {})
        return cache[id(disc)]

    return gm3, x0, exact


@pytest.mark.parametrize("name, cls, order, disc, steps", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_convergence_order(ode_problem, name, cls, order, disc, steps):
    """RMS error against the exact ODE solution as the step count doubles."""
    gm3, x0, exact = ode_problem
    target = exact(disc)
    errs = [float((cls(disc, n)(_denoise(gm3), x0, {}) - target).pow(2).mean().sqrt()) for n in steps]
    slopes = [math.log2(errs[k] / errs[k + 1]) for k in range(len(errs) - 1)]
    assert all(abs(s - order) < 0.4 for s in slopes), (errs, slopes)
