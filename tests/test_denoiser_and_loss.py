
import pytest
import torch

from sgm.diffusion import (Denoiser, DiscreteDenoiser, DiscreteSampling, EDMScaling, EDMSampling, EDMWeighting,
                           EpsScaling, EpsWeighting, LegacyDDPMDiscretization, MinSNRWeighting,
                           StandardDiffusionLoss, UnitWeighting, VScaling, VScalingWithEDMcNoise, VWeighting)


def test_scalings_follow_their_definitions():
    s = torch.tensor([0.1, 1.0, 10.0])
    c_skip, c_out, c_in, c_noise = EDMScaling(0.5)(s)
    torch.testing.assert_close(c_skip, 0.25 / (s**2 + 0.25))
    torch.testing.assert_close(c_out, 0.5 * s / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, s.log() / 4)
    c_skip, c_out, c_in, c_noise = EpsScaling()(s)
    assert torch.equal(c_skip, torch.ones(3)) and torch.equal(c_out, -s) and torch.equal(c_noise, s)
    c_skip, c_out, c_in, c_noise = VScaling()(s)
    torch.testing.assert_close(c_skip**2 * (s**2 + 1) + c_out**2, torch.ones(3))  # unit-variance target
    assert torch.equal(VScalingWithEDMcNoise()(s)[3], s.log() / 4)


def test_eps_denoiser_with_perfect_eps_network_recovers_x0():
    x0 = torch.randn(3, 2, 4, 4)
    eps = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.5, 2.0, 9.0])
    x = x0 + sigma[:, None, None, None] * eps
    network = lambda x_in, c_noise, cond: eps  # noqa: E731
    torch.testing.assert_close(Denoiser(EpsScaling())(network, x, sigma, {}), x0)


def test_discrete_denoiser_snaps_sigma_and_passes_the_index():
    den = DiscreteDenoiser(EpsScaling(), 1000, LegacyDDPMDiscretization())
    assert den.sigmas.shape == (1000,) and torch.all(den.sigmas[1:] > den.sigmas[:-1])
    assert "sigmas" not in den.state_dict(), "denoiser.sigmas is computed, not saved"
    seen = {}

    def network(x_in, c_noise, cond):
        seen["c_noise"] = c_noise
        seen["x_in"] = x_in
        return torch.zeros_like(x_in)

    sigma = torch.tensor([14.6146, den.sigmas[500].item() * 1.0001, 0.03])
    x = torch.ones(3, 4)
    den(network, x, sigma, {})
    assert seen["c_noise"].tolist() == [999, 500, 0]
    expected_c_in = 1 / (den.sigmas[seen["c_noise"]] ** 2 + 1).sqrt()
    torch.testing.assert_close(seen["x_in"][:, 0], expected_c_in)


def test_discrete_denoiser_accepts_sgm_config_dicts():
    den = DiscreteDenoiser(
        scaling_config={"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
        num_idx=1000,
        discretization_config={"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
    )
    assert isinstance(den.scaling, EpsScaling) and den.sigma_max == pytest.approx(14.6146, rel=1e-5)


def test_weightings():
    s = torch.tensor([0.1, 1.0, 10.0])
    assert torch.equal(UnitWeighting()(s), torch.ones(3))
    torch.testing.assert_close(EDMWeighting(0.5)(s), (s**2 + 0.25) / (0.5 * s) ** 2)
    torch.testing.assert_close(VWeighting()(s), (s**2 + 1) / s**2)
    torch.testing.assert_close(EpsWeighting()(s), 1 / s**2)
    torch.testing.assert_close(MinSNRWeighting(5.0)(s), torch.tensor([5.0, 1.0, 0.01]))


def test_sigma_samplers():
    g = torch.Generator().manual_seed(0)
    s = EDMSampling(-1.2, 1.2)(20000, generator=g)
    assert abs(float(s.log().mean()) + 1.2) < 0.03 and abs(float(s.log().std()) - 1.2) < 0.03
    d = DiscreteSampling(LegacyDDPMDiscretization(), 1000)
    assert set(d(500, generator=g).tolist()) <= set(d.sigmas.tolist())
    with pytest.raises(ValueError, match="p_std"):
        EDMSampling(p_std=0)


def _loss(**kw):
    return StandardDiffusionLoss(EDMSampling(), EDMWeighting(), **kw)


def test_loss_is_zero_for_the_perfect_denoiser_and_positive_otherwise():
    x0 = torch.randn(4, 3, 8, 8)
    perfect = lambda network, x, sigma, cond: x0  # noqa: E731
    assert torch.all(_loss().compute(None, perfect, {}, x0) == 0)
    identity = lambda network, x, sigma, cond: x  # noqa: E731
    l2 = _loss().compute(None, identity, {}, x0, generator=torch.Generator().manual_seed(0))
    l1 = _loss(loss_type="l1").compute(None, identity, {}, x0, generator=torch.Generator().manual_seed(0))
    assert l2.shape == (4,) and torch.all(l2 > 0) and torch.all(l1 > 0)
    # identity denoiser error is sigma * noise: lambda * sigma^2 * mean(noise^2)
    sig = torch.tensor([0.7, 0.7, 0.7, 0.7])
    noise = torch.randn_like(x0)
    val = _loss().compute(None, identity, {}, x0, noise=noise, sigmas=sig)
    expected = EDMWeighting()(sig) * 0.49 * noise.pow(2).reshape(4, -1).mean(1)
    torch.testing.assert_close(val, expected)


def test_offset_noise_shifts_channel_means():
    loss = _loss(offset_noise_level=1.0)
    x0 = torch.zeros(256, 3, 8, 8)
    n = loss.sample_noise(x0, torch.Generator().manual_seed(0))
    channel_means = n.mean(dim=(2, 3))
    # per-sample, per-channel offsets have std ~1 (plain noise would give ~1/8)
    assert 0.8 < float(channel_means.std()) < 1.25
    plain = _loss().sample_noise(x0, torch.Generator().manual_seed(0)).mean(dim=(2, 3))
    assert float(plain.std()) < 0.2


def test_loss_forward_uses_conditioner_and_is_deterministic_with_a_generator():
    x0 = torch.randn(2, 3, 4, 4)
    calls = []
    conditioner = lambda batch: (calls.append(batch) or {"vector": batch["y"]})  # noqa: E731
    den = lambda network, x, sigma, cond: x * 0.9 + cond["vector"][:, :, None, None] * 0  # noqa: E731
    loss = _loss()
    a = loss(None, den, conditioner, x0, {"y": torch.ones(2, 3)}, generator=torch.Generator().manual_seed(1))
    b = loss(None, den, conditioner, x0, {"y": torch.ones(2, 3)}, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(calls) == 2
    with pytest.raises(ValueError, match="loss_type"):
        _loss(loss_type="huber2")
    with pytest.raises(ValueError, match="offset_noise_level"):
        _loss(offset_noise_level=-0.1)


def test_discrete_denoiser_c_noise_follows_sgm_for_every_scaling():
    """c_noise = index of the scaling's c_noise: sigma's own index for Eps/V, sgm's rule otherwise."""
    seen = {}

    def network(x_in, c_noise, cond):
        seen["c"] = c_noise
        return torch.zeros_like(x_in)

    sigma = torch.tensor([0.5, 7.0])
    for scaling in (EpsScaling(), VScaling(), VScalingWithEDMcNoise(), EDMScaling()):
        den = DiscreteDenoiser(scaling, 1000, LegacyDDPMDiscretization())
        den(network, torch.ones(2, 3), sigma, {})
        q = den.sigmas[den.sigma_to_idx(sigma)]
        expected = den.sigma_to_idx(scaling(q)[3])
        assert torch.equal(seen["c"], expected), type(scaling).__name__
