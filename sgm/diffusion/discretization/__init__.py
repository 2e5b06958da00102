"""Noise-level schedules ("discretizations"): which sigmas a sampler visits.

A discretization is called as ``disc(n, do_append_zero=True, device="cpu", flip=False)``
and returns float32 sigmas in descending order (ascending with ``flip``), with a final 0
when ``do_append_zero``. ``disc.get_sigmas(n)`` returns the ``n`` sigmas without the zero.
EDM sigmas are computed in float32 exactly as sgm does; the others in float64, rounded once.

* :mod:`.continuous`: over a sigma range (Karras/EDM, exponential, polyexponential, VP,
  KL-optimal, linear-quadratic, Align Your Steps); a range left None is the model's.
* :mod:`.ddpm`: the DDPM table with its timestep spacings and zero-terminal-SNR rescaling.
* :mod:`.table`: over the model's discrete noise levels (simple, normal, sgm_uniform,
  ddim_uniform, beta).

What a schedule takes from the model (``MODEL_FIELDS`` left None) is filled by
:func:`sgm.diffusion.schedule.for_model`.
"""

from .base import (BETA_SCHEDULES, Discretization, RangeDiscretization, make_beta_schedule,
                   unset_model_fields)
from .continuous import (AYS_SIGMAS, AlignYourStepsDiscretization, EDMDiscretization,
                         ExponentialDiscretization, KLOptimalDiscretization, LinearQuadraticDiscretization,
                         PolyExponentialDiscretization, VPDiscretization, loglinear_interp)
from .ddpm import (TIMESTEP_SPACINGS, ZERO_SNR_TERMINAL_ALPHA_CUMPROD, DDPMTimestepsDiscretization,
                   LegacyDDPMDiscretization,
                   rescale_zero_terminal_snr, spaced_timesteps)
from .table import (BetaDiscretization, DDIMUniformDiscretization, ModelTableDiscretization,
                    NormalDiscretization, SGMUniformDiscretization, SimpleDiscretization, as_table)

__all__ = [name for name in dir() if not name.startswith("_")]
