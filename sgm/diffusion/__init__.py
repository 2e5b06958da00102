"""The math of diffusion, without weights: schedules, preconditioning, guidance, samplers, losses."""

from .apg import APGGuider
from .autoguidance import AutoGuidance
from .brownian import BrownianTreeNoise
from .cfg_zero_star import CFGZeroStarGuider
from .denoiser import Denoiser, DiscreteDenoiser
from .discretization import (AlignYourStepsDiscretization, BetaDiscretization, DDIMUniformDiscretization,
                             EDMDiscretization, ExponentialDiscretization, KLOptimalDiscretization,
                             LegacyDDPMDiscretization, LinearQuadraticDiscretization, NormalDiscretization,
                             PolyExponentialDiscretization, SGMUniformDiscretization, SimpleDiscretization,
                             VPDiscretization, make_beta_schedule)
from .guiders import DynamicThresholding, IdentityGuider, IntervalCFG, RescaledCFG, VanillaCFG
from .loss import StandardDiffusionLoss
from .loss_weighting import EDMWeighting, EpsWeighting, MinSNRWeighting, UnitWeighting, VWeighting
from .pag import PAGGuider
from .sag import SAGGuider
from .samplers import (
    DPMPP2MSampler,
    DPMPP2MSDESampler,
    DPMPP2SAncestralSampler,
    EulerAncestralSampler,
    EulerEDMSampler,
    HeunEDMSampler,
    LinearMultistepSampler,
)
from .scaling import EDMScaling, EpsScaling, VScaling, VScalingWithEDMcNoise, X0Scaling
from .sigma_sampling import DiscreteSampling, EDMSampling

__all__ = [name for name in dir() if not name.startswith("_")]
