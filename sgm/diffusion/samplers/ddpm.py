"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020) on a sigma schedule.

Both are usually written for the variance-preserving latent ``x_vp = sqrt(abar) x`` over
integer timesteps. With ``abar = 1 / (1 + sigma^2)`` (so ``x = x0 + sigma eps``) the DDIM
update of Song et al. 2021, eq. 12, from abar_t to abar_prev,

    x_vp' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z,
    s^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev),

divided by ``sqrt(abar_prev)``, reads ``x' = x0 + sigma_down eps + sigma_up z`` with

    sigma_up^2 = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2,   sigma_down^2 = sigma'^2 - sigma_up^2:

exactly the ancestral split of :func:`~sgm.diffusion.samplers.base.get_ancestral_step` and
an Euler step down to ``sigma_down`` (``x0 + sigma_down eps`` is that step written out). So
DDIM *is* Euler ancestral with its ``eta``, and eta = 0 is Euler on the probability-flow ODE
(the observation of Karras et al. 2022, sec. 3). With eta = 1, ``s^2`` is the variance of the
DDPM posterior q(x_prev | x_t, x0) and the mean is its mean (Ho et al. 2020, eqs. 6-7, over
the strided chain), so DDPM is DDIM with eta = 1. The classes below are those samplers under
their names; the loop and the split are the ones of :mod:`.ancestral` (one copy of the rule).
"""

from __future__ import annotations

from typing import Any

from .ancestral import EulerAncestralSampler


class DDIMSampler(EulerAncestralSampler):
    """DDIM (Song et al. 2021, eq. 12) with ``eta`` in [0, 1]: 0 deterministic (the default, as
    in diffusers' ``DDIMScheduler.step``), 1 the DDPM posterior. One network evaluation per
    step; fresh noise (only when eta > 0) from the per-image generators, none on the step to
    sigma 0, whose result is the x0 estimate (diffusers' ``set_alpha_to_one=True``)."""

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 eta: float = 0.0, s_noise: float = 1.0, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, eta=eta, s_noise=s_noise, **kwargs)


class DDPMSampler(DDIMSampler):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): each step draws x_prev from the
    posterior q(x_prev | x_t, x0 = D(x_t)) of the (strided) forward chain, i.e. DDIM with
    eta = 1. One network evaluation per step; fresh noise every step from the per-image
    generators, none on the step to sigma 0 (where the posterior is the point x0)."""

    def __init__(self, discretization: Any = None, num_steps: int | None = None, guider: Any = None,
                 s_noise: float = 1.0, **kwargs: Any):
        super().__init__(discretization, num_steps, guider, eta=1.0, s_noise=s_noise, **kwargs)
