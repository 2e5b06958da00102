"""Few-step presets (conf/experiment): each recipe's schedule, step count, sampler and guidance.

They need real distilled weights to draw anything; what is tested is that the recipe samples
the schedule its authors publish, checked against diffusers' schedulers where they have it.
"""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from sgm.diffusion import IdentityGuider, VanillaCFG
from sgm.diffusion.discretization import LegacyDDPMDiscretization
from sgm.diffusion.samplers import EulerAncestralSampler, EulerEDMSampler, LCMSampler
from sgm.diffusion.schedule import sampling_sigmas

SDXL_TABLE = LegacyDDPMDiscretization().table  # sigma_t, t = 0 .. 999


def _recipe(compose, name, steps=None):
    cfg = compose("sample", [f"+experiment={name}"] + ([f"steps={steps}"] if steps else []))
    sigmas = sampling_sigmas(instantiate(cfg.discretization), cfg.steps, instantiate(cfg.model.denoiser))
    return cfg, sigmas


def _timesteps(sigmas):
    return [int(np.abs(SDXL_TABLE - float(s)).argmin()) for s in sigmas[:-1]]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_sdxl_turbo_follows_stabilitys_turbo_sampler(compose, steps):
    cfg, sigmas = _recipe(compose, "sdxl_turbo", steps)
    assert cfg.model.network.get("adm_in_channels") == 2816 and (cfg.H, cfg.W) == (512, 512)
    assert isinstance(instantiate(cfg.sampler), EulerAncestralSampler)
    assert isinstance(instantiate(cfg.guider), IdentityGuider)
    # sgm's turbo demo: indices [0, 100, 200, 300][:n] + [1000] of the 1000-step schedule (+ zero)
    full = LegacyDDPMDiscretization()(1000)
    want = full[[0, 100, 200, 300][:steps] + [1000]]
    torch.testing.assert_close(sigmas, want, rtol=0, atol=0)
    assert _timesteps(sigmas) == [999, 899, 799, 699][:steps]


def test_sdxl_turbo_refuses_more_steps_than_its_timesteps(compose):
    cfg = compose("sample", ["+experiment=sdxl_turbo", "steps=5"])
    with pytest.raises(ValueError, match="steps<=4"):
        sampling_sigmas(instantiate(cfg.discretization), cfg.steps)


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_sdxl_lightning_uses_diffusers_trailing_euler_schedule(compose, steps):
    from diffusers import EulerDiscreteScheduler

    cfg, sigmas = _recipe(compose, "sdxl_lightning", steps)
    assert isinstance(instantiate(cfg.sampler), EulerEDMSampler) and isinstance(instantiate(cfg.guider), IdentityGuider)
    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 timestep_spacing="trailing")
    ref.set_timesteps(steps)
    torch.testing.assert_close(sigmas, ref.sigmas.float(), rtol=1e-5, atol=1e-6)
    assert cfg.steps == steps


def test_sdxl_lightning_default_is_the_4_step_recipe(compose):
    cfg, sigmas = _recipe(compose, "sdxl_lightning")
    assert cfg.steps == 4 and _timesteps(sigmas) == [999, 749, 499, 249]


@pytest.mark.parametrize("steps", [2, 4, 6, 8])
def test_lcm_lora_visits_lcm_schedulers_timesteps(compose, steps):
    from diffusers import LCMScheduler

    cfg, sigmas = _recipe(compose, "lcm_lora", steps)
    assert isinstance(instantiate(cfg.sampler), LCMSampler)
    guider = instantiate(cfg.guider)
    assert isinstance(guider, VanillaCFG) and 1.0 <= guider.scale <= 2.0
    ref = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref.set_timesteps(steps)
    assert _timesteps(sigmas) == ref.timesteps.tolist()
    torch.testing.assert_close(sigmas[:-1], torch.from_numpy(SDXL_TABLE[ref.timesteps.numpy()]).float(),
                               rtol=1e-6, atol=0)
    assert type(instantiate(cfg.model.denoiser)).__name__ == "LCMDenoiser"


@pytest.mark.parametrize("timesteps", [[], [699, 999], [999, 999], [1000], [999, -1]])
def test_given_timesteps_are_checked(timesteps):
    from sgm.diffusion.discretization import DDPMTimestepsDiscretization

    with pytest.raises(ValueError, match="timesteps"):
        DDPMTimestepsDiscretization(timesteps)
