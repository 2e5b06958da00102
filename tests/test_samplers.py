"""Samplers against k-diffusion, against the analytic target distribution, and their order."""

import math

import pytest
import torch

from sgm.diffusion import (
    DPMPP2MSampler,
    DPMPP2SAncestralSampler,
    EDMDiscretization,
    EulerAncestralSampler,
    EulerEDMSampler,
    HeunEDMSampler,
    LegacyDDPMDiscretization,
    LinearMultistepSampler,
    VanillaCFG,
)
from sgm.diffusion.analytic import GaussianMixture
from sgm.diffusion.schedule import img2img_start, initial_latent, sampling_sigmas

SDXL_EDM = EDMDiscretization(0.0292, 14.6146, 3.0)
ALL_SAMPLERS = [EulerEDMSampler, HeunEDMSampler, EulerAncestralSampler, DPMPP2SAncestralSampler,
                DPMPP2MSampler, LinearMultistepSampler]


@pytest.fixture(scope="module")
def gm():
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(torch.randn(3, 2, 4, 4, generator=g), std=0.3)


def _denoise(gm, counter=None):
    def fn(x, sigma, cond):
        if counter is not None:
            counter.append(float(sigma[0]))
        return gm(x, sigma, cond)

    return fn


def _noise(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- agreement with k-diffusion ------------------------------------------------------------
CASES = [
    ("euler", EulerEDMSampler, "sample_euler", {}),
    ("euler_churn", EulerEDMSampler, "sample_euler", dict(s_churn=2.0, s_tmin=0.1, s_tmax=5.0, s_noise=1.003)),
    ("heun", HeunEDMSampler, "sample_heun", {}),
    ("heun_churn", HeunEDMSampler, "sample_heun", dict(s_churn=1.0)),
    ("euler_a", EulerAncestralSampler, "sample_euler_ancestral", {}),
    ("euler_a_eta", EulerAncestralSampler, "sample_euler_ancestral", dict(eta=0.5, s_noise=0.9)),
    ("dpmpp_2s_a", DPMPP2SAncestralSampler, "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp_2m", DPMPP2MSampler, "sample_dpmpp_2m", {}),
    ("lms", LinearMultistepSampler, "sample_lms", {}),
    ("lms_order2", LinearMultistepSampler, "sample_lms", dict(order=2)),
]


@pytest.mark.parametrize("disc", [SDXL_EDM, LegacyDDPMDiscretization()], ids=["edm", "ddpm"])
@pytest.mark.parametrize("name, cls, kfn, knobs", CASES, ids=[c[0] for c in CASES])
def test_agrees_with_k_diffusion(ksampling, gm, disc, name, cls, kfn, knobs, monkeypatch):
    steps = 12
    noise = _noise((5, 2, 4, 4))
    ours = cls(disc, steps, **knobs)(_denoise(gm), noise, {}, generator=torch.Generator().manual_seed(7))

    sigmas = disc(steps).double()
    x_init = noise * torch.sqrt(1 + sigmas[0] ** 2)  # sgm convention, applied for the oracle
    g = torch.Generator().manual_seed(7)
    extra = {}
    if kfn in ("sample_euler", "sample_heun"):
        # k-diffusion draws churn noise every step from randn_like; we draw only when gamma > 0.
        churn, tmin, tmax = knobs.get("s_churn", 0.0), knobs.get("s_tmin", 0.0), knobs.get("s_tmax", math.inf)
        gammas = iter([min(churn / steps, 2**0.5 - 1) if tmin <= s <= tmax else 0.0 for s in sigmas[:-1].tolist()])
        extra.update({k: v for k, v in knobs.items()})

        def fake_randn_like(t, **kw):
            if next(gammas) > 0:
                return torch.randn(t.shape, generator=g, dtype=t.dtype)
            return torch.zeros_like(t)

        monkeypatch.setattr(ksampling.torch, "randn_like", fake_randn_like)
    else:
        extra.update(knobs)
        if kfn in ("sample_euler_ancestral", "sample_dpmpp_2s_ancestral"):
            extra["noise_sampler"] = lambda s, sn: torch.randn(noise.shape, generator=g, dtype=noise.dtype)
    ref = getattr(ksampling, kfn)(lambda x, s: gm(x, s, {}), x_init, sigmas, disable=True, **extra)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# --- conventions ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_conventions(gm, cls):
    noise = _noise((3, 2, 4, 4))
    before = noise.clone()
    calls: list[float] = []
    seen: list[int] = []
    sampler = cls(SDXL_EDM, 6)
    out = sampler(_denoise(gm, calls), noise, {}, generator=torch.Generator().manual_seed(3),
                  callback=lambda info: seen.append(info["i"]))
    assert torch.equal(noise, before), "the sampler must not modify its input in place"
    assert seen == list(range(6))
    assert 0.0 not in calls, "no network evaluation at sigma 0"
    per_step = {HeunEDMSampler: 2, DPMPP2SAncestralSampler: 2}.get(cls, 1)
    assert len(calls) == per_step * 6 - (per_step - 1), "the last step to sigma 0 costs one evaluation"
    # the first evaluation sees the scaled noise at sigma_0
    assert calls[0] == pytest.approx(14.6146, rel=1e-5)
    # same generator seed -> same result; the progress bar can be switched off or on
    again = cls(SDXL_EDM, 6, verbose=True)(_denoise(gm), noise, {}, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, again, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [EulerAncestralSampler, DPMPP2SAncestralSampler])
def test_ancestral_noise_comes_from_generator(gm, cls):
    noise = _noise((2, 2, 4, 4))
    a = cls(SDXL_EDM, 5)(_denoise(gm), noise, {}, generator=torch.Generator().manual_seed(1))
    b = cls(SDXL_EDM, 5)(_denoise(gm), noise, {}, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)
    torch.manual_seed(0)
    c = cls(SDXL_EDM, 5)(_denoise(gm), noise, {}, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_sample_from_intermediate_sigma_continues_the_schedule(gm):
    """sampler.sample starts from a latent already at sigmas[0] (img2img / refiner hand-off)."""
    sampler = EulerEDMSampler(SDXL_EDM, 10)
    noise = _noise((2, 2, 4, 4))
    sigmas = sampling_sigmas(SDXL_EDM, 10)
    trace = []
    full = sampler(_denoise(gm), noise, {}, callback=lambda info: trace.append(info["x"]))
    tail = sampler.sample(_denoise(gm), trace[4], sigmas[4:], {})
    torch.testing.assert_close(full, tail, rtol=0, atol=1e-12)
    # the sgm-style call is the given-schedule entry from the noise start, nothing else
    given = EulerEDMSampler().sample(_denoise(gm), initial_latent(noise, sigmas[0]), sigmas, {})
    torch.testing.assert_close(full, given, rtol=0, atol=0)


def test_a_range_left_to_the_model_comes_from_its_denoiser():
    from sgm.diffusion import DiscreteDenoiser, EpsScaling

    den = DiscreteDenoiser(EpsScaling(), 1000, LegacyDDPMDiscretization(), sigma_min=0.0292, sigma_max=14.6146)
    model_range = EDMDiscretization(sigma_min=None, sigma_max=None, rho=3.0)
    torch.testing.assert_close(sampling_sigmas(model_range, 10, den), sampling_sigmas(SDXL_EDM, 10), rtol=0, atol=0)
    table = DiscreteDenoiser(EpsScaling(), 1000, LegacyDDPMDiscretization())  # no stated range: the table's
    assert table.sigma_min == pytest.approx(0.029167, rel=1e-4) and table.sigma_max == pytest.approx(14.6146, rel=1e-5)
    with pytest.raises(ValueError, match="trained sigma range"):
        sampling_sigmas(model_range, 10, object())
    with pytest.raises(ValueError, match="sigma range"):
        model_range(10)


def test_img2img_rules():
    assert img2img_start(10, 0.6) == 4 and img2img_start(10, 0.6, "sgm") == 5  # 6 steps against 5
    assert img2img_start(10, 1.0, "sgm") == 0 and img2img_start(10, 0.01) == 9
    assert img2img_start(10, 0.05, "sgm") == 10  # sgm keeps only the final 0: no step
    with pytest.raises(ValueError, match="img2img_schedule"):
        img2img_start(10, 0.5, "other")


# --- bad values ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (EulerEDMSampler, dict(num_steps=0), "num_steps"),
        (EulerEDMSampler, dict(num_steps=-3), "num_steps"),
        (EulerEDMSampler, dict(num_steps=4, s_churn=-1), "s_churn"),
        (EulerEDMSampler, dict(num_steps=4, s_noise=float("nan")), "s_noise"),
        (EulerAncestralSampler, dict(num_steps=4, eta=-0.5), "eta"),
        (LinearMultistepSampler, dict(num_steps=4, order=0), "order"),
    ],
)
def test_bad_values_fail_at_construction(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(SDXL_EDM, **kwargs)


def test_missing_steps_and_discretization_are_named(gm):
    with pytest.raises(ValueError, match="num_steps"):
        EulerEDMSampler(SDXL_EDM)(_denoise(gm), _noise((1, 2, 4, 4)), {})
    with pytest.raises(ValueError, match="discretization"):  # only the sgm-style call needs one
        EulerEDMSampler(None, 4)(_denoise(gm), _noise((1, 2, 4, 4)), {})


def test_sgm_style_config_dicts_are_accepted(gm):
    s = EulerEDMSampler(
        discretization_config={"target": "sgm.modules.diffusionmodules.discretizer.EDMDiscretization",
                               "params": {"sigma_min": 0.0292, "sigma_max": 14.6146, "rho": 3.0}},
        num_steps=5,
        guider_config={"target": "sgm.modules.diffusionmodules.guiders.VanillaCFG", "params": {"scale": 5.0}},
    )
    assert isinstance(s.guider, VanillaCFG) and s.guider.scale == 5.0
    assert s.discretization.rho == 3.0


# --- the analytic target distribution ---------------------------------------------------
@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_turns_noise_into_the_data_distribution(cls):
    g = torch.Generator().manual_seed(0)
    gm2 = GaussianMixture(torch.tensor([[-2.0, 0.5], [1.0, 1.5], [2.5, -1.0]]), std=0.4,
                          weights=torch.tensor([0.5, 0.3, 0.2]))
    n = 4000
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = cls(EDMDiscretization(), 100)(_denoise(gm2), noise, {}, generator=torch.Generator().manual_seed(5))
    mean, var = gm2.mean(), gm2.variance()
    se_mean = (var / n).sqrt()
    assert torch.all((out.mean(0) - mean).abs() < 4 * se_mean + 0.02), (out.mean(0), mean)
    assert torch.allclose(out.var(0), var, rtol=0.08), (out.var(0), var)


def _error_table(cls, steps, disc, gm3, x0):
    ref = cls(disc, 1000)(_denoise(gm3), x0, {})
    return [float((cls(disc, n)(_denoise(gm3), x0, {}) - ref).pow(2).mean().sqrt()) for n in steps]


@pytest.mark.parametrize("cls, order", [(EulerEDMSampler, 1), (HeunEDMSampler, 2), (DPMPP2MSampler, 2)])
def test_convergence_order(cls, order):
    g = torch.Generator().manual_seed(0)
    gm3 = GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64), std=0.5)
    x0 = torch.randn(64, 4, generator=g, dtype=torch.float64)
    steps = [16, 32, 64]
    errs = _error_table(cls, steps, EDMDiscretization(), gm3, x0)
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert all(abs(s - order) < 0.35 for s in slopes), (errs, slopes)


@pytest.mark.parametrize("cls", [EulerAncestralSampler, DPMPP2SAncestralSampler])
def test_per_sample_generators_make_each_image_independent_of_its_batch(gm, cls):
    noise = _noise((3, 2, 4, 4))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = cls(SDXL_EDM, 5)(_denoise(gm), noise, {}, generator=gens([10, 11, 12]))
    alone = cls(SDXL_EDM, 5)(_denoise(gm), noise[1:2], {}, generator=gens([11]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="generators"):
        cls(SDXL_EDM, 5)(_denoise(gm), noise, {}, generator=gens([1, 2]))
