"""The seed note's tables (../shared/seed) reproduced to 1e-6 relative."""

import numpy as np
import pytest
import torch

from sgm.diffusion import EDMDiscretization, LegacyDDPMDiscretization, make_beta_schedule

SEED_BETAS_20 = [
    0.0001, 0.00028618196189870196, 0.0005680513081478406, 0.0009456080387474158,
    0.0014188521536974274, 0.001987783652997876, 0.002652402536648761, 0.003412708804650082,
    0.004268702457001841, 0.0052203834937040354, 0.006267751914756668, 0.007410807720159736,
    0.008649550909913243, 0.009983981484017183, 0.011414099442471562, 0.012939904785276376,
    0.014561397512431625, 0.016278577623937317, 0.01809144511979344, 0.02,
]
SEED_EDM_20 = [
    79.99998474121094, 59.657501220703125, 43.920257568359375, 31.88442039489746,
    22.794111251831055, 16.02229881286621, 11.05366325378418, 7.468902587890625,
    4.930656909942627, 3.1708412170410156, 1.979400634765625, 1.1943087577819824,
    0.6928236484527588, 0.3838551640510559, 0.20140404999256134, 0.09897341579198837,
    0.04488256946206093, 0.01840081810951233, 0.006621698383241892, 0.0019999996293336153,
]
SEED_DDPM_50 = [
    14.614641189575195, 12.966320991516113, 11.542771339416504, 10.309401512145996,
    9.237422943115234, 8.302803039550781, 7.485421180725098, 6.768382549285889,
    6.137460708618164, 5.580644607543945, 5.08776330947876, 4.650183200836182,
    4.260556697845459, 3.9126131534576416, 3.6009886264801025, 3.3210830688476562,
    3.0689430236816406, 2.8411612510681152, 2.634795665740967, 2.4472994804382324,
    2.276463031768799, 2.1203653812408447, 1.977332353591919, 1.8459018468856812,
    1.7247940301895142, 1.6128861904144287, 1.5091912746429443, 1.4128390550613403,
    1.3230608701705933, 1.2391756772994995, 1.1605783700942993, 1.0867294073104858,
    1.0171462297439575, 0.9513954520225525, 0.8890852332115173, 0.8298594951629639,
    0.773391842842102, 0.7193796038627625, 0.6675384640693665, 0.6175960898399353,
    0.5692849159240723, 0.5223334431648254, 0.47645437717437744, 0.4313262701034546,
    0.3865651786327362, 0.3416738212108612, 0.29594171047210693, 0.24822042882442474,
    0.19630272686481476, 0.13445067405700684,
]


def test_linear_beta_schedule_matches_seed():
    betas = make_beta_schedule("linear", 20, linear_start=1e-4, linear_end=2e-2)
    np.testing.assert_allclose(betas, SEED_BETAS_20, rtol=1e-6, atol=0)


def test_linear_is_sqrt_space_interpolation_not_plain():
    betas = make_beta_schedule("linear", 20, 1e-4, 2e-2)
    plain = np.linspace(1e-4, 2e-2, 20)
    assert np.all(betas[1:-1] < plain[1:-1])


def test_cosine_schedule_is_valid():
    betas = make_beta_schedule("cosine", 1000)
    assert betas.shape == (1000,) and np.all(betas > 0) and np.all(betas <= 0.999)
    abar = np.cumprod(1 - betas)
    assert np.all(np.diff(abar) < 0)


def test_edm_sigmas_match_seed():
    sigmas = EDMDiscretization(sigma_min=0.002, sigma_max=80.0, rho=7.0).get_sigmas(20)
    assert sigmas.dtype == torch.float32
    np.testing.assert_allclose(sigmas.numpy(), SEED_EDM_20, rtol=1e-6, atol=0)


def test_legacy_ddpm_sigmas_match_seed():
    sigmas = LegacyDDPMDiscretization()(50, do_append_zero=False)
    np.testing.assert_allclose(sigmas.numpy(), SEED_DDPM_50, rtol=1e-6, atol=0)


@pytest.mark.parametrize("disc", [EDMDiscretization(), LegacyDDPMDiscretization()])
def test_call_conventions(disc):
    s = disc(10)
    assert s.shape == (11,) and s[-1] == 0 and s.dtype == torch.float32
    assert torch.all(s[:-1] > s[1:])
    assert torch.equal(disc(10, flip=True), s.flip(0))
    assert torch.equal(disc(10, do_append_zero=False), disc.get_sigmas(10))


def test_ddpm_full_schedule_covers_trained_range():
    s = LegacyDDPMDiscretization().get_sigmas(1000)
    assert s[0] == pytest.approx(14.6146, rel=1e-5) and s[-1] == pytest.approx(0.0292, rel=1e-2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma_min=1.0, sigma_max=1.0), "sigma_min"),
        (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (dict(rho=0.0), "rho"),
        (dict(rho=-3.0), "rho"),
        (dict(sigma_min=float("nan")), "sigma_min"),
        (dict(sigma_max=-1.0), "sigma_max"),
    ],
)
def test_edm_bad_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EDMDiscretization(**kwargs)


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_bad_step_counts(n):
    with pytest.raises(ValueError, match="number of steps"):
        EDMDiscretization()(n)


def test_ddpm_bad_values():
    with pytest.raises(ValueError, match="num_timesteps"):
        LegacyDDPMDiscretization(num_timesteps=0)
    with pytest.raises(ValueError, match="cannot exceed"):
        LegacyDDPMDiscretization(num_timesteps=10)(11)
    with pytest.raises(ValueError, match="schedule"):
        make_beta_schedule("quadratic", 10)
