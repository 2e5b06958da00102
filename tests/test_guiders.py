import pytest
import torch

from sgm.diffusion import (DynamicThresholding, EDMDiscretization, EulerEDMSampler, IdentityGuider,
                           IntervalCFG, RescaledCFG, VanillaCFG)
from sgm.diffusion.analytic import GaussianMixture


def _pair(b=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, 4, 4, generator=g), torch.randn(b, 3, 4, 4, generator=g)


def test_prepare_inputs_batches_uc_first():
    x = torch.randn(2, 3)
    sigma = torch.full((2,), 1.5)
    cond = {"crossattn": torch.ones(2, 4, 8), "vector": torch.ones(2, 5), "tag": "a"}
    uc = {"crossattn": torch.zeros(2, 4, 8), "vector": torch.zeros(2, 5), "tag": "a"}
    xx, ss, cc = VanillaCFG(5.0).prepare_inputs(x, sigma, cond, uc)
    assert xx.shape == (4, 3) and ss.shape == (4,) and cc["tag"] == "a"
    assert torch.equal(cc["crossattn"][:2], uc["crossattn"]) and torch.equal(cc["vector"][2:], cond["vector"])
    assert IdentityGuider().prepare_inputs(x, sigma, cond, uc)[2] is cond


@pytest.mark.parametrize("scale", [0.0, 1.0, 7.5, -2.0])
def test_cfg_formula_any_real_scale(scale):
    x_u, x_c = _pair()
    out = VanillaCFG(scale)(torch.cat([x_u, x_c]), torch.ones(4))
    torch.testing.assert_close(out, x_u + scale * (x_c - x_u))
    if scale == 0.0:
        torch.testing.assert_close(out, x_u)
    if scale == 1.0:
        torch.testing.assert_close(out, x_c)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "high", None])
def test_bad_scale_is_named(bad):
    with pytest.raises(ValueError, match="scale"):
        VanillaCFG(bad)


def test_rescale_matches_conditional_std():
    x_u, x_c = _pair()
    x = torch.cat([x_u, x_c])
    cfg = VanillaCFG(7.0)(x, torch.ones(4))
    full = RescaledCFG(7.0, phi=1.0)(x, torch.ones(4))
    std = lambda t: t.std(dim=(1, 2, 3))  # noqa: E731
    torch.testing.assert_close(std(full), std(x_c))
    half = RescaledCFG(7.0, phi=0.5)(x, torch.ones(4))
    torch.testing.assert_close(half, 0.5 * full + 0.5 * cfg)
    torch.testing.assert_close(RescaledCFG(7.0, phi=0.0)(x, torch.ones(4)), cfg)
    with pytest.raises(ValueError, match="rescale"):
        RescaledCFG(7.0, phi=1.5)


def test_interval_guidance_skips_unconditional_calls_outside():
    guider = IntervalCFG(4.0, sigma_lo=0.5, sigma_hi=3.0)
    sampler = EulerEDMSampler(EDMDiscretization(0.0292, 14.6146, 3.0), 10, guider=guider)
    batches = []

    def denoise(x, sigma, cond):
        batches.append((float(sigma[0]), x.shape[0]))
        return x * 0.5

    cond, uc = {"vector": torch.ones(2, 3)}, {"vector": torch.zeros(2, 3)}
    sampler(denoise, torch.randn(2, 4), cond, uc)
    for sigma, b in batches:
        assert b == (4 if 0.5 <= sigma <= 3.0 else 2), (sigma, b)
    assert {b for _, b in batches} == {2, 4}
    with pytest.raises(ValueError, match="sigma_interval"):
        IntervalCFG(4.0, sigma_lo=3.0, sigma_hi=1.0)


def test_dynamic_thresholding_bounds_output():
    x_u, x_c = _pair()
    out = VanillaCFG(20.0, dyn_thresh=DynamicThresholding(percentile=0.9, threshold=1.0))(torch.cat([x_u, x_c]), torch.ones(4))
    assert out.abs().max() <= 1.0 + 1e-6


def test_cfg_on_analytic_mixture_sharpens_towards_the_prompted_class():
    """Classifier-free guidance on a mixture: the prompted component wins more often as scale grows."""
    gm = GaussianMixture(torch.tensor([[-1.0], [1.0]]), std=0.6)
    cond = {"class_weights": torch.tensor([1.0, 0.0])}
    uc = {"class_weights": torch.tensor([0.5, 0.5])}

    def denoise(x, sigma, c):
        half = x.shape[0] // 2
        if x.shape[0] == 2 * half and "class_weights" in c and c["class_weights"].ndim == 2:
            return torch.cat([gm(x[:half], sigma[:half], {"class_weights": c["class_weights"][0]}),
                              gm(x[half:], sigma[half:], {"class_weights": c["class_weights"][-1]})])
        return gm(x, sigma, c)

    def frac_left(scale):
        c = {"class_weights": cond["class_weights"].expand(2000, 2)}
        u = {"class_weights": uc["class_weights"].expand(2000, 2)}
        noise = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out = EulerEDMSampler(EDMDiscretization(), 30, guider=VanillaCFG(scale))(denoise, noise, c, u)
        return float((out < 0).double().mean())

    f0, f1, f3 = frac_left(0.0), frac_left(1.0), frac_left(3.0)
    assert 0.4 < f0 < 0.6 and f1 > 0.85 and f3 > f1
