"""DPM-Solver++(2M) SDE and its Brownian-tree noise, against k-diffusion fed the same trees."""

import math

import pytest
import torch

from sgm.diffusion.schedule import sampling_sigmas

from sgm.diffusion import (
    BrownianTreeNoise,
    DPMPP2MSampler,
    DPMPP2MSDESampler,
    EDMDiscretization,
    LegacyDDPMDiscretization,
)
from sgm.diffusion.analytic import GaussianMixture
from sgm.diffusion.brownian import seed_from
from test_samplers import SDXL_EDM, _denoise, _noise, gm  # noqa: F401 (gm is a fixture)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# --- agreement with k-diffusion on the same Brownian trees --------------------------------
CASES = [
    ("midpoint", {}),
    ("midpoint", dict(s_noise=0.9)),
    ("midpoint", dict(eta=0.5, s_noise=1.1)),
    ("heun", {}),
    ("heun", dict(s_noise=0.9)),
    ("heun", dict(eta=0.5, s_noise=1.1)),
    ("midpoint", dict(eta=0.0)),
    ("heun", dict(eta=0.0)),
]


KD_CASES = [("edm", SDXL_EDM, s, k) for s, k in CASES] + [
    ("ddpm", LegacyDDPMDiscretization(), s, dict(s_noise=0.9)) for s in DPMPP2MSDESampler.SOLVER_TYPES]


# k-diffusion's own tree queries warn where torchsde clamps sigma_max to its rounded end; ours do not
@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("disc_name, disc, solver_type, knobs", KD_CASES,
                         ids=[f"{d}-{s}-{k}" for d, _, s, k in KD_CASES])
def test_agrees_with_k_diffusion(ksampling, gm, disc_name, disc, solver_type, knobs):
    steps, seeds = 10, [7, 8, 9]
    noise = _noise((3, 2, 4, 4))
    sampler = DPMPP2MSDESampler(disc, steps, solver_type=solver_type, **knobs)
    ours = sampler(_denoise(gm), noise, {}, generator=_gens(seeds))

    sigmas = disc(steps).double()
    x_init = noise * torch.sqrt(1 + sigmas[0] ** 2)  # sgm convention, applied for the oracle
    tree_seeds = [seed_from(g) for g in _gens(seeds)]  # the entropy our trees drew
    noise_sampler = ksampling.BrownianTreeNoiseSampler(x_init, sigmas[sigmas > 0].min(), sigmas.max(), seed=tree_seeds)
    ref = ksampling.sample_dpmpp_2m_sde(lambda x, s: gm(x, s, {}), x_init, sigmas, disable=True,
                                        noise_sampler=noise_sampler, solver_type=solver_type, **knobs)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
@pytest.mark.parametrize("batched", [True, False])
def test_noise_equals_k_diffusions_brownian_tree_noise_sampler(ksampling, batched):
    sigmas = SDXL_EDM(8).double()
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    seeds = [11, 12, 13] if batched else 11
    ours = BrownianTreeNoise.for_schedule(x, sigmas.tolist(), seeds=seeds)
    theirs = ksampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
        torch.testing.assert_close(ours(s.item(), s_next.item()), theirs(s, s_next), rtol=0, atol=0)
    # either orientation: the increment changes sign, its normalisation does not
    a, b = sigmas[2].item(), sigmas[4].item()
    torch.testing.assert_close(ours(b, a), -ours(a, b), rtol=0, atol=0)


def test_noise_has_unit_variance_and_stays_on_its_device_and_dtype():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.float32)
    noise = BrownianTreeNoise(x, 0.03, 14.6, _gens([1, 2, 3, 4]))
    z = torch.stack([noise(a, b) for a, b in [(14.6, 9.0), (9.0, 2.0), (2.0, 0.5), (0.5, 0.03)]])
    assert z.dtype == torch.float32 and z.shape == (4, *x.shape)
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1.0) < 0.05
    assert torch.equal(noise(1.0, 1.0), torch.zeros_like(x))


# --- the noise is a property of the Brownian path, not of the step count -----------------
def test_intervals_are_the_same_tree_query_whatever_the_step_count():
    """A 10-step and a 19-step EDM schedule share every other sigma and query one path."""
    coarse, fine = SDXL_EDM(10).tolist(), SDXL_EDM(19).tolist()
    x = torch.zeros(2, 3, dtype=torch.float64)
    w_coarse = BrownianTreeNoise.for_schedule(x, coarse, _gens([5, 6]))
    w_fine = BrownianTreeNoise.for_schedule(x, fine, _gens([5, 6]))
    assert w_coarse.seeds == w_fine.seeds
    for i in range(len(coarse) - 2):
        a, b = coarse[i], coarse[i + 1]
        torch.testing.assert_close(w_coarse(a, b), w_fine(a, b), rtol=0, atol=0)
        # the coarse increment is the sum of the two fine ones it spans
        split = w_fine.increment(fine[2 * i], fine[2 * i + 1]) + w_fine.increment(fine[2 * i + 1], fine[2 * i + 2])
        torch.testing.assert_close(w_coarse.increment(a, b), split, rtol=0, atol=1e-6)


def test_runs_with_different_step_counts_follow_the_same_path():
    g = torch.Generator().manual_seed(0)
    gauss = GaussianMixture(torch.randn(1, 4, generator=g, dtype=torch.float64), std=0.5)
    x0 = torch.randn(8, 4, generator=g, dtype=torch.float64)

    def run(n, seed):
        return DPMPP2MSDESampler(SDXL_EDM, n)(_denoise(gauss), x0, {}, generator=torch.Generator().manual_seed(seed))

    coarse = run(50, 3)
    same = float((coarse - run(100, 3)).pow(2).mean().sqrt())  # same generator seed: same trees
    other = float((coarse - run(100, 4)).pow(2).mean().sqrt())  # another path, another sample
    assert same < 0.1 * other, (same, other)


# --- conventions ---------------------------------------------------------------------------
@pytest.mark.parametrize("solver_type", DPMPP2MSDESampler.SOLVER_TYPES)
def test_conventions(gm, solver_type):
    noise = _noise((3, 2, 4, 4))
    before = noise.clone()
    calls: list[float] = []
    seen: list[int] = []
    sampler = DPMPP2MSDESampler(SDXL_EDM, 6, solver_type=solver_type)
    out = sampler(_denoise(gm, calls), noise, {}, generator=torch.Generator().manual_seed(3),
                  callback=lambda info: seen.append(info["i"]))
    assert torch.equal(noise, before), "the sampler must not modify its input in place"
    assert seen == list(range(6))
    assert len(calls) == 6, "one evaluation per step, the step to sigma 0 included"
    assert 0.0 not in calls and calls[0] == pytest.approx(14.6146, rel=1e-5)
    x_start = noise * math.sqrt(1 + 14.6146**2)
    x_before = x_start.clone()
    sampler.sample(_denoise(gm), x_start, sampling_sigmas(SDXL_EDM, 6), {}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_start, x_before)
    # same seed -> same result (the global RNG plays no part); another seed -> another sample
    torch.manual_seed(0)
    again = DPMPP2MSDESampler(SDXL_EDM, 6, solver_type=solver_type, verbose=True)(
        _denoise(gm), noise, {}, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    other = sampler(_denoise(gm), noise, {}, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(out, other)


def test_per_sample_generators_make_each_image_independent_of_its_batch(gm):
    noise = _noise((3, 2, 4, 4))
    sampler = DPMPP2MSDESampler(SDXL_EDM, 5)
    batch = sampler(_denoise(gm), noise, {}, generator=_gens([10, 11, 12]))
    alone = sampler(_denoise(gm), noise[1:2], {}, generator=_gens([11]))
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="generators"):
        sampler(_denoise(gm), noise, {}, generator=_gens([1, 2]))


def test_without_a_generator_the_trees_are_seeded_from_torchs_default_generator(gm):
    noise = _noise((2, 2, 4, 4))
    sampler = DPMPP2MSDESampler(SDXL_EDM, 4)
    torch.manual_seed(123)
    a = sampler(_denoise(gm), noise, {})
    torch.manual_seed(123)
    b = sampler(_denoise(gm), noise, {})
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eta_zero_is_dpmpp_2m_and_draws_nothing(gm):
    noise = _noise((2, 2, 4, 4))
    g = torch.Generator().manual_seed(9)
    state = g.get_state()
    ode = DPMPP2MSDESampler(SDXL_EDM, 8, eta=0.0)(_denoise(gm), noise, {}, generator=g)
    assert torch.equal(g.get_state(), state), "no noise, no draw"
    torch.testing.assert_close(ode, DPMPP2MSampler(SDXL_EDM, 8)(_denoise(gm), noise, {}), rtol=0, atol=1e-12)


def test_turns_noise_into_the_data_distribution():
    g = torch.Generator().manual_seed(0)
    gm2 = GaussianMixture(torch.tensor([[-2.0, 0.5], [1.0, 1.5], [2.5, -1.0]]), std=0.4,
                          weights=torch.tensor([0.5, 0.3, 0.2]))
    n = 4000
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    sampler = DPMPP2MSDESampler(EDMDiscretization(), 50)
    out = sampler(_denoise(gm2), noise, {}, generator=torch.Generator().manual_seed(5))
    mean, var = gm2.mean(), gm2.variance()
    assert torch.all((out.mean(0) - mean).abs() < 4 * (var / n).sqrt() + 0.02), (out.mean(0), mean)
    assert torch.allclose(out.var(0), var, rtol=0.08), (out.var(0), var)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(solver_type="euler"), "solver_type"),
        (dict(eta=-0.1), "eta"),
        (dict(s_noise=float("nan")), "s_noise"),
        (dict(num_steps=0), "num_steps"),
    ],
)
def test_bad_values_fail_at_construction(kwargs, name):
    kwargs = {"num_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        DPMPP2MSDESampler(SDXL_EDM, **kwargs)


def test_bad_noise_arguments_are_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="seeds"):
        BrownianTreeNoise(x, 0.1, 1.0, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="not both"):
        BrownianTreeNoise(x, 0.1, 1.0, torch.Generator(), seeds=3)
    with pytest.raises(ValueError, match="sigma_min"):
        BrownianTreeNoise(x, 2.0, 1.0)
    with pytest.raises(ValueError, match="nonzero"):
        BrownianTreeNoise.for_schedule(x, [0.0])
