"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance
for Diffusion Models", arXiv:2406.08070): Euler, Euler ancestral and DPM-Solver++(2M).

CFG++ keeps the guided x0 estimate x0_lam = x0_u + lam (x0_c - x0_u) but re-noises with the
*unconditional* noise estimate eps_u = (x - x0_u) / sigma. The paper's DDIM step
in sgm's sigma parametrisation is

    x_next = x0_lam + sigma_next * (x - x0_u) / sigma,

which is the plain Euler step taken from the shifted point x + (x0_lam - x0_u): the point whose
decomposition into x0 and noise has the guided x0 and the unconditional noise. That is how all
three samplers here are built: the plain sampler's step, from that shifted point. Euler
ancestral steps to sigma_down (then adds its fresh noise), and DPM++ 2M's second-order term
uses the previous step's *unconditional* x0, as the authors' code (their ``dpm++_2m_cfg++``)
and ComfyUI's ``sample_dpmpp_2m_cfg_pp`` do.

lam is the guider's ``scale`` (``guider=cfg guider.scale=0.6``), exactly as ComfyUI uses its
CFG scale with these samplers and the authors' code its ``cfg_guidance``: lam in [0, 1] does
what a CFG scale of about 1 to 12.5 does with the plain samplers (the authors' README). Euler
CFG++ at lam is plain Euler CFG at the per-step scale lam * sigma / (sigma - sigma_next), so
lam = 1 is not the plain sampler at scale 1; lam = 0 is unconditional sampling, as with CFG.
Where the guider evaluates no unconditional branch (the identity guider, outside a guidance
interval) a step is the plain sampler's. One guided evaluation per step, none at sigma 0:
NFE = steps.
"""

from __future__ import annotations

import torch

from .ancestral import EulerAncestralSampler
from .base import DenoiseFn
from .dpmpp import DPMPP2MSampler
from .karras import EulerEDMSampler


class CFGPPMixin:
    """CFG++ for a plain sampler: each step's guided evaluation also records the guidance
    vector x0_lam - x0_u and the unconditional x0, which the step hooks use (:meth:`shifted`)."""

    _guidance: torch.Tensor | None = None  # x0_lam - x0_u of the current step (None: no uncond branch)
    _uncond: torch.Tensor | None = None  # the unconditional x0 of the current step (x0 where there is none)
    _prev_uncond: torch.Tensor | None = None  # ... and of the previous step

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # lam = 1 is not the plain step here: a CFG guider must evaluate uncond even at scale 1
        self.guider.keep_uncond = True

    def guided_denoise(self, denoise: DenoiseFn, x: torch.Tensor, sigma: float, cond: dict, uc: dict) -> torch.Tensor:
        guided = self.guided(denoise, x, sigma, cond, uc)
        uncond = guided.predictions.get("uncond")
        self._prev_uncond, self._uncond = self._uncond, guided.x0 if uncond is None else uncond
        self._guidance = None if uncond is None else guided.x0 - uncond
        return guided.x0

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """x + (x0_lam - x0_u): the point the plain step starts from."""
        return x if self._guidance is None else x + self._guidance


class EulerCFGPPSampler(CFGPPMixin, EulerEDMSampler):
    """Euler with CFG++ (Chung et al. 2024, the DDIM update): x_next = x0_lam + sigma_next (x - x0_u) / sigma."""

    def correction_step(self, denoise, x, d, sigma_hat, sigma_next, cond, uc) -> torch.Tensor:
        if self._guidance is not None:  # the derivative from the shifted point: (x - x0_u) / sigma
            x, d = self.shifted(x), d + self._guidance / sigma_hat
        return super().correction_step(denoise, x, d, sigma_hat, sigma_next, cond, uc)


class EulerAncestralCFGPPSampler(CFGPPMixin, EulerAncestralSampler):
    """Euler ancestral with CFG++: x0_lam + sigma_down (x - x0_u) / sigma, then fresh noise of std sigma_up."""

    def step_down(self, denoise, x, denoised, sigma, sigma_down, cond, uc) -> torch.Tensor:
        return super().step_down(denoise, self.shifted(x), denoised, sigma, sigma_down, cond, uc)


class DPMPP2MCFGPPSampler(CFGPPMixin, DPMPP2MSampler):
    """DPM-Solver++(2M) with CFG++: the 2M step from the shifted point, with the guided x0 of
    this step and the unconditional x0 of the previous one."""

    def update(self, x, denoised, old_denoised, sigmas, i) -> torch.Tensor:
        history = None if old_denoised is None else self._prev_uncond
        return super().update(self.shifted(x), denoised, history, sigmas, i)
