"""DDPM, DDIM, LCM and TCD samplers against diffusers' schedulers (the independent oracle).

Conventions bridged in every comparison:

* our samplers work on x = x0 + sigma eps over sigmas, diffusers on x_vp = x / sqrt(1 + sigma^2)
  over integer timesteps with alphas_cumprod (sigma_t = sqrt((1 - abar_t) / abar_t));
* both use SDXL's table (scaled_linear betas 0.00085 .. 0.012, 1000 steps) and the same
  timesteps (LegacyDDPMDiscretization's, or the oracle's own schedule given to us as sigmas);
* diffusers gets its model output from the same exact Gaussian-mixture denoiser at the same
  sigma (as eps = (x - x0) / sigma, the same in both parametrisations, or as the x0 "sample");
* the same noise: diffusers' ``randn_tensor`` (or DDIM's ``variance_noise``) returns draws from
  a second copy of our per-image generators, in the order our sampler makes them;
* the end of the schedule: ours is sigma = 0 (the x0 estimate). diffusers' DDPM, DDIM with
  ``set_alpha_to_one=True`` and LCM end there too; DDIM with ``set_alpha_to_one=False`` and TCD
  end at the table's timestep 0 (sigma 0.0292), which is our schedule ending at that sigma.

Tolerance: 1e-5 (float64 samples; diffusers' alphas_cumprod are float32), over the whole
trajectory (x before every step) and the result.
"""

import math

import pytest
import torch

from sgm.diffusion import EulerEDMSampler, LegacyDDPMDiscretization
from sgm.diffusion.noise import gaussian
from sgm.diffusion.samplers import DDIMSampler, DDPMSampler, LCMSampler, TCDSampler
from sgm.diffusion.schedule import sampling_sigmas
from test_samplers import SDXL_EDM, _denoise, _noise, gm  # noqa: F401 (gm is a fixture)

DISC = LegacyDDPMDiscretization()  # SDXL's DDPM table
TABLE = DISC(DISC.num_timesteps, do_append_zero=False, flip=True).double()  # sigma of timestep t
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SEEDS = [7, 8, 9]
TOL = 1e-5


def _gens(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def dsched():
    """diffusers' scheduler modules (test-only oracle)."""
    pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_lcm, scheduling_tcd

    return {"ddpm": scheduling_ddpm, "ddim": scheduling_ddim, "lcm": scheduling_lcm, "tcd": scheduling_tcd}


def _same_noise(monkeypatch, module, generators):
    """diffusers' ``randn_tensor`` in ``module`` draws from ``generators`` as our samplers do."""
    monkeypatch.setattr(module, "randn_tensor", lambda shape, generator=None, device=None, dtype=None, layout=None:
                        gaussian(shape, generators, dtype=dtype))


def _sigmas(timesteps, end: float = 0.0) -> torch.Tensor:
    """Our schedule for diffusers' timesteps: the table's sigmas, then ``end``."""
    return torch.cat([TABLE[torch.as_tensor(timesteps).long()], TABLE.new_tensor([end])])


def _ours(sampler, gm, noise, sigmas):
    """Our run from unit noise (x = noise * sqrt(1 + sigma_0^2)): the x_vp before every step and at the end."""
    xs = []
    out = sampler.sample(_denoise(gm), noise * math.sqrt(1 + sigmas[0] ** 2), sigmas, {}, generator=_gens(),
                         callback=lambda info: xs.append(info["x"]))
    scales = torch.sqrt(1 + sigmas**2).tolist()
    return [x / s for x, s in zip(xs + [out], scales)]


def _oracle(sched, gm, noise, sigmas, step, prediction="epsilon"):
    """diffusers' loop on x_vp, its model output from our denoiser at the same sigma."""
    trace, sample = [], noise.clone()
    for t, sigma in zip(sched.timesteps, sigmas[:-1].tolist()):
        trace.append(sample)
        x = sample * math.sqrt(1 + sigma**2)
        d = gm(x, x.new_full((x.shape[0],), sigma), {})
        sample = step((x - d) / sigma if prediction == "epsilon" else d, t, sample)
    return trace + [sample]


def _max_deviation(ours, theirs) -> float:
    assert len(ours) == len(theirs)
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs))


def test_the_oracles_table_is_ours(dsched):
    theirs = dsched["ddpm"].DDPMScheduler(**BETAS).alphas_cumprod.double()
    torch.testing.assert_close(theirs, torch.from_numpy(DISC.alphas_cumprod), rtol=2e-6, atol=0)


# --- DDPM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [10, 7])
def test_ddpm_agrees_with_diffusers(dsched, gm, monkeypatch, steps):
    """DDPMScheduler over the same timesteps (``set_timesteps(timesteps=...)``). It draws noise on
    its last step too, with its variance clamped to 1e-20 (std 1e-10); we draw none there."""
    sched = dsched["ddpm"].DDPMScheduler(**BETAS, clip_sample=False)
    sched.set_timesteps(timesteps=DISC.timesteps(steps)[::-1].tolist())
    sigmas = DISC(steps).double()
    torch.testing.assert_close(_sigmas(sched.timesteps), sigmas, rtol=0, atol=0)
    noise = _noise((3, 2, 4, 4))
    _same_noise(monkeypatch, dsched["ddpm"], _gens())
    theirs = _oracle(sched, gm, noise, sigmas, lambda out, t, s: sched.step(out, t, s).prev_sample)
    assert _max_deviation(_ours(DDPMSampler(), gm, noise, sigmas), theirs) < TOL


# --- DDIM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta, alpha_to_one", [(0.0, True), (0.5, True), (1.0, True), (0.5, False)])
def test_ddim_agrees_with_diffusers(dsched, gm, eta, alpha_to_one):
    """DDIMScheduler with ``timestep_spacing="trailing"``: for a step count that divides 1000 its
    timesteps are LegacyDDPMDiscretization's, and its step to ``t - 1000 // n`` is our next sigma.
    ``set_alpha_to_one=True`` ends at abar = 1 (our sigma 0); ``False`` ends at abar_0, which is our
    schedule ending at the table's sigma of timestep 0."""
    steps = 10
    sched = dsched["ddim"].DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=alpha_to_one,
                                         timestep_spacing="trailing")
    sched.set_timesteps(steps)
    sigmas = _sigmas(sched.timesteps, end=0.0 if alpha_to_one else float(TABLE[0]))
    torch.testing.assert_close(sigmas[:-1], DISC(steps).double()[:-1], rtol=0, atol=0)
    noise = _noise((3, 2, 4, 4))
    theirs_gens = _gens()

    def step(out, t, s):
        z = gaussian(s.shape, theirs_gens, dtype=s.dtype) if eta > 0 else None
        return sched.step(out, t, s, eta=eta, variance_noise=z).prev_sample

    theirs = _oracle(sched, gm, noise, sigmas, step)
    assert _max_deviation(_ours(DDIMSampler(eta=eta), gm, noise, sigmas), theirs) < TOL


def test_ddim_without_noise_is_euler_and_draws_nothing(gm):
    """eta = 0: x0 + sigma' eps is the Euler step on the probability-flow ODE (Karras et al. 2022)."""
    noise, g = _noise((2, 2, 4, 4)), torch.Generator().manual_seed(4)
    state = g.get_state()
    ddim = DDIMSampler(DISC, 12)(_denoise(gm), noise, {}, generator=g)
    assert torch.equal(g.get_state(), state), "no noise, no draw"
    torch.testing.assert_close(ddim, EulerEDMSampler(DISC, 12)(_denoise(gm), noise, {}), rtol=0, atol=1e-12)


# --- LCM -------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["ddpm10", "lcm4"])
def test_lcm_agrees_with_diffusers(dsched, gm, monkeypatch, schedule):
    """LCMScheduler over LegacyDDPMDiscretization's 10 timesteps (all on LCM's 50-step distillation
    schedule) or its own 4-step schedule (999, 759, 499, 259), given to us as sigmas. Its boundary
    scalings c_skip, c_out are the consistency model's parametrisation: the oracle's x-prediction F
    is chosen so that c_skip x + c_out F is the denoiser's x0, which is what our ``denoise`` returns."""
    sched = dsched["lcm"].LCMScheduler(**BETAS, prediction_type="sample")
    if schedule == "ddpm10":
        sched.set_timesteps(timesteps=DISC.timesteps(10)[::-1].tolist())
    else:
        sched.set_timesteps(4)
        assert sched.timesteps.tolist() == [999, 759, 499, 259]
    sigmas = _sigmas(sched.timesteps)
    noise = _noise((3, 2, 4, 4))
    _same_noise(monkeypatch, dsched["lcm"], _gens())

    def step(d, t, s):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        return sched.step((d - c_skip * s) / c_out, t, s).prev_sample

    theirs = _oracle(sched, gm, noise, sigmas, step, prediction="sample")
    assert _max_deviation(_ours(LCMSampler(), gm, noise, sigmas), theirs) < TOL


# --- TCD -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("schedule", ["ddpm10", "tcd4"])
def test_tcd_agrees_with_diffusers(dsched, gm, monkeypatch, schedule, gamma):
    """TCDScheduler (``eta`` = gamma) over LegacyDDPMDiscretization's 10 timesteps or its own 4-step
    schedule. diffusers' last step goes to its timestep 0, sigma 0.0292 (``prev_timestep = 0``): the
    equal case is our schedule ending at that sigma. Ending at sigma 0 instead (ours) changes only
    the last step, which then returns that step's x0 estimate."""
    sched = dsched["tcd"].TCDScheduler(**BETAS)
    if schedule == "ddpm10":
        sched.set_timesteps(timesteps=DISC.timesteps(10)[::-1].tolist())
    else:
        sched.set_timesteps(4)
        assert sched.timesteps.tolist() == [999, 759, 499, 259]
    sigmas = _sigmas(sched.timesteps, end=float(TABLE[0]))
    noise = _noise((3, 2, 4, 4))
    _same_noise(monkeypatch, dsched["tcd"], _gens())
    theirs = _oracle(sched, gm, noise, sigmas, lambda out, t, s: sched.step(out, t, s, eta=gamma).prev_sample)
    sampler = TCDSampler(gamma=gamma)
    ours = _ours(sampler, gm, noise, sigmas)
    assert _max_deviation(ours, theirs) < TOL

    # our convention: the same run but for the last step, which ends at the x0 estimate
    to_zero = sigmas.clone()
    to_zero[-1] = 0.0
    seen = []
    out = sampler.sample(_denoise(gm), noise * math.sqrt(1 + sigmas[0] ** 2), to_zero, {}, generator=_gens(),
                         callback=lambda info: seen.append(info))
    assert _max_deviation([i["x"] / math.sqrt(1 + i["sigma"] ** 2) for i in seen], ours[:-1]) < 1e-12
    torch.testing.assert_close(out, seen[-1]["denoised"], rtol=0, atol=0)


def test_tcd_without_noise_is_ddim_on_the_table(gm):
    """gamma = 0: s is the next timestep itself, so the step is DDIM's (eta = 0) and draws nothing."""
    noise, g = _noise((2, 2, 4, 4)), torch.Generator().manual_seed(4)
    state = g.get_state()
    tcd = TCDSampler(DISC, 8, gamma=0.0)(_denoise(gm), noise, {}, generator=g)
    assert torch.equal(g.get_state(), state), "no noise, no draw"
    torch.testing.assert_close(tcd, DDIMSampler(DISC, 8)(_denoise(gm), noise, {}), rtol=0, atol=1e-12)


def test_tcd_off_the_table_goes_back_as_far_as_on_the_table(gm):
    """An EDM schedule's sigmas lie between the table's levels: with t' the nearest timestep and
    s = floor((1 - gamma) t'), sigma_s = sigma_next * sigma(s) / sigma(t') (on the table: sigma(s));
    never above sigma_next (below the table's lowest level, t' = s = 0: sigma_s = sigma_next)."""
    sampler = TCDSampler(gamma=0.3)
    for sigma_next in SDXL_EDM(12).tolist()[1:-1] + DISC(12).tolist()[1:-1]:
        t_next = int((TABLE - sigma_next).abs().argmin())
        expect = sigma_next * float(TABLE[math.floor(0.7 * t_next)] / TABLE[t_next])
        assert sampler.sigma_s(sigma_next) == pytest.approx(expect, rel=1e-12) and expect <= sigma_next
    for sigma_next in DISC(12).tolist()[1:-1]:  # on the table: the level of s itself
        t_next = int((TABLE - sigma_next).abs().argmin())
        assert sampler.sigma_s(sigma_next) == pytest.approx(float(TABLE[math.floor(0.7 * t_next)]), rel=1e-6)
    assert sampler.sigma_s(0.01) == 0.01 and sampler.sigma_s(0.0) == 0.0
    assert TCDSampler(gamma=0.0).sigma_s(SDXL_EDM(12)[3].item()) == SDXL_EDM(12)[3].item()
    out = TCDSampler(SDXL_EDM, 12, gamma=0.3)(_denoise(gm), _noise((2, 2, 4, 4)), {}, generator=_gens([1, 2]))
    assert torch.isfinite(out).all()


# --- conventions -------------------------------------------------------------------------------
STOCHASTIC = [("ddpm", DDPMSampler, {}), ("ddim_eta", DDIMSampler, dict(eta=0.7)), ("lcm", LCMSampler, {}),
              ("tcd", TCDSampler, dict(gamma=0.3))]
DETERMINISTIC = [("ddim", DDIMSampler, {}), ("tcd_gamma0", TCDSampler, dict(gamma=0.0))]


@pytest.mark.parametrize("name, cls, knobs", STOCHASTIC + DETERMINISTIC,
                         ids=[c[0] for c in STOCHASTIC + DETERMINISTIC])
@pytest.mark.parametrize("disc", [DISC, SDXL_EDM], ids=["ddpm", "edm"])
def test_conventions(gm, disc, name, cls, knobs):
    noise = _noise((3, 2, 4, 4))
    before = noise.clone()
    calls: list[float] = []
    seen: list[int] = []
    sampler = cls(disc, 6, **knobs)
    out = sampler(_denoise(gm, calls), noise, {}, generator=_gens(), callback=lambda info: seen.append(info["i"]))
    assert torch.equal(noise, before), "the sampler must not modify its input in place"
    assert seen == list(range(6))
    assert len(calls) == 6, "one network evaluation per step (NFE = steps)"
    assert 0.0 not in calls and calls[0] == pytest.approx(float(disc(6)[0]), rel=1e-6)
    x_start = noise * math.sqrt(1 + calls[0] ** 2)
    x_before = x_start.clone()
    sampler.sample(_denoise(gm), x_start, sampling_sigmas(disc, 6), {}, generator=_gens())
    assert torch.equal(x_start, x_before)
    # same seeds -> same result, whatever the global RNG; the progress bar on or off
    torch.manual_seed(0)
    again = cls(disc, 6, verbose=True, **knobs)(_denoise(gm), noise, {}, generator=_gens())
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    other = sampler(_denoise(gm), noise, {}, generator=_gens([1, 2, 3]))
    if name in {c[0] for c in STOCHASTIC}:
        assert not torch.allclose(out, other), "another generator, another sample"
    else:
        torch.testing.assert_close(out, other, rtol=0, atol=0)


@pytest.mark.parametrize("name, cls, knobs", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_noise_is_fresh_every_step_but_the_last(gm, name, cls, knobs):
    """One draw per image per step, none on the step to sigma 0; each image's draws are its own."""
    g = _gens([5])
    cls(DISC, 5, **knobs)(_denoise(gm), _noise((1, 2, 4, 4)), {}, generator=g)
    replay = torch.Generator().manual_seed(5)
    for _ in range(4):
        torch.randn((2, 4, 4), generator=replay, dtype=torch.float64)
    assert torch.equal(g[0].get_state(), replay.get_state()), "4 draws for 5 steps"
    noise = _noise((3, 2, 4, 4))
    batch = cls(DISC, 5, **knobs)(_denoise(gm), noise, {}, generator=_gens([10, 11, 12]))
    alone = cls(DISC, 5, **knobs)(_denoise(gm), noise[1:2], {}, generator=_gens([11]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)


# --- construction and config ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (DDIMSampler, dict(eta=-0.5), "eta"),
        (DDIMSampler, dict(eta=float("nan")), "eta"),
        (DDPMSampler, dict(s_noise=-1.0), "s_noise"),
        (LCMSampler, dict(num_steps=0), "num_steps"),
        (TCDSampler, dict(gamma=-0.1), "gamma"),
        (TCDSampler, dict(gamma=1.5), "gamma"),
        (TCDSampler, dict(gamma="much"), "gamma"),
        (TCDSampler, dict(table=SDXL_EDM), "table"),
    ],
)
def test_bad_values_fail_at_construction(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(DISC, **{"num_steps": 4, **kwargs})


@pytest.mark.parametrize("model, table", [("digits", True), ("analytic", False)])
def test_tcd_config_takes_the_models_table(compose, model, table):
    from hydra.utils import instantiate

    cfg = compose("sample", [f"model={model}", "sampler=tcd", "sampler.gamma=0.5"])
    sampler = instantiate(cfg.sampler)
    assert isinstance(sampler, TCDSampler) and sampler.gamma == 0.5
    assert (cfg.sampler.table is not None) == table  # analytic: a continuous denoiser, SDXL's table
    assert isinstance(sampler.table, LegacyDDPMDiscretization)
    torch.testing.assert_close(torch.from_numpy(sampler.levels), TABLE, rtol=0, atol=0)
