"""The math of diffusion, without weights: schedules, preconditioning, guidance, samplers, losses.

The names below are loaded on first use (:mod:`sgm._lazy`): importing this package, or a
torch-free module of it such as ``sgm.diffusion._checks``, imports no torch.
"""

from .._lazy import lazy_namespace

_MODULES = {
    ".apg": ["APGGuider"],
    ".autoguidance": ["AutoGuidance"],
    ".brownian": ["BrownianTreeNoise"],
    ".cfg_zero_star": ["CFGZeroStarGuider"],
    ".denoiser": ["Denoiser", "DiscreteDenoiser"],
    ".discretization": ["AlignYourStepsDiscretization", "BetaDiscretization", "DDIMUniformDiscretization",
                        "EDMDiscretization", "ExponentialDiscretization", "KLOptimalDiscretization",
                        "LegacyDDPMDiscretization", "LinearQuadraticDiscretization", "NormalDiscretization",
                        "PolyExponentialDiscretization", "SGMUniformDiscretization", "SimpleDiscretization",
                        "VPDiscretization", "make_beta_schedule"],
    ".guiders": ["DynamicThresholding", "IdentityGuider", "IntervalCFG", "RescaledCFG", "VanillaCFG"],
    ".loss": ["StandardDiffusionLoss"],
    ".loss_weighting": ["EDMWeighting", "EpsWeighting", "MinSNRWeighting", "UnitWeighting", "VWeighting"],
    ".pag": ["PAGGuider"],
    ".sag": ["SAGGuider"],
    ".samplers": ["DPMPP2MSampler", "DPMPP2MSDESampler", "DPMPP2SAncestralSampler", "EulerAncestralSampler",
                  "EulerEDMSampler", "HeunEDMSampler", "LinearMultistepSampler"],
    ".scaling": ["EDMScaling", "EpsScaling", "VScaling", "VScalingWithEDMcNoise", "X0Scaling"],
    ".sigma_sampling": ["DiscreteSampling", "EDMSampling"],
}
__getattr__, __dir__, __all__ = lazy_namespace(__name__, _MODULES)
