"""Samplers: integrate a schedule they are given, from noise to data (k-diffusion's contract).

The one entry is ``sampler.sample(denoise, x, sigmas, cond, uc=None, generator=None,
callback=None)``: ``x`` is already at noise level ``sigmas[0]`` (see
:func:`sgm.diffusion.schedule.initial_latent`), ``sigmas`` is a slice of the run's schedule
(:func:`sgm.diffusion.schedule.sampling_sigmas`) and ``denoise(x, sigma, cond) -> x0`` is one
network evaluation. The sampler's guider decides the branches of each step
(:meth:`BaseDiffusionSampler.guided`). A new sampler is a subclass with one ``_loop`` method
in a module of this package (re-exported here) plus a config file in ``conf/sampler/``.

Conventions kept from sgm / k-diffusion: the last step goes to sigma = 0, a step that lands
on sigma = 0 spends no extra network evaluation, and all the randomness a sampler draws
comes from ``generator`` (one per image). The input tensor is never modified in place.
Samplers are still built as ``Sampler(discretization, num_steps, guider)`` so that original
sgm configs import; calling such a sampler (``sampler(denoise, noise, cond, uc)``) computes
its own schedule as sgm does.

References: Karras et al. 2022 (EDM, Algorithms 1-2); Lu et al. 2022 (DPM-Solver++);
Crowson's k-diffusion for the ancestral and linear multistep formulations.
"""

from .ancestral import AncestralSampler, DPMPP2SAncestralSampler, EulerAncestralSampler
from .base import BaseDiffusionSampler, Callback, DenoiseFn, get_ancestral_step, linear_multistep_coeff
from .cfg_pp import DPMPP2MCFGPPSampler, EulerAncestralCFGPPSampler, EulerCFGPPSampler
from .consistency import LCMSampler, TCDSampler
from .ddpm import DDIMSampler, DDPMSampler
from .dpm import DPM2AncestralSampler, DPM2Sampler
from .dpm_solver import DPMSolverAdaptiveSampler, DPMSolverFastSampler
from .dpmpp import (BrownianSDESampler, DPMPP2MSampler, DPMPP2MSDESampler, DPMPP3MSDESampler, DPMPPSDESampler,
                    MultistepSDESampler)
from .er_sde import ERSDESampler
from .heunpp import HeunPP2Sampler
from .karras import EulerEDMSampler, HeunEDMSampler
from .lms import LinearMultistepSampler
from .multistep import DEISSampler, IPNDMSampler, IPNDMVSampler, RESMultistepSampler
from .restart import RestartSampler
from .unipc import UniPCSampler

__all__ = [name for name in dir() if not name.startswith("_")]
