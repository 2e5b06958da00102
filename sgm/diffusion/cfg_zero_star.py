"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
Models", sec. 4).

Two changes to CFG, defined on the flow-matching velocity v:

* optimized scale (sec. 4.1): the unconditional prediction is first scaled by
  s* = <v_c, v_u> / ||v_u||^2 (per sample, over all but the batch axis), then
  v = s* v_u + w (v_c - s* v_u);
* zero-init (sec. 4.2): the first K steps of a run output v = 0 (the sample stays where it is);
  they evaluate no network.

``space="flow"`` (the default, the paper's) applies both to v = eps - x0, the velocity of the
rectified-flow path x_t = (1 - t) x0 + t eps (sigma = t / (1 - t)), for any model: a zero
velocity is x0 = x / (1 + sigma). ``space="eps"`` is what diffusers' ``ClassifierFreeZeroStarGuidance``
does with an SDXL (eps) model (a zero eps is x0 = x), ``space="x0"`` is on the denoised
prediction. See :mod:`sgm.diffusion.apg` for the spaces and the run/step counting.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._checks import check_int
from .apg import SpaceCFG, from_space
from .guiders import Guided
from .util import append_dims


class CFGZeroStarGuider(SpaceCFG):
    """CFG-Zero* on top of :class:`~sgm.diffusion.apg.SpaceCFG` (Fan et al. 2025).

    ``scale`` w; ``zero_init_steps`` K (0: off; the paper zeroes about the first 4% of the steps,
    diffusers' default is 1); ``space`` flow (the paper's), eps or x0. Zero-init replaces the
    model's output and is not guidance, so it applies at the run's first K steps whatever
    ``sigma_interval`` says (as in diffusers); those steps' ``Guided.predictions`` hold the zero
    prediction's x0 under the branch names the step would have evaluated. Scale 1 is the
    conditional prediction (no unconditional evaluation).
    """

    def __init__(
        self,
        scale: float = 5.0,
        zero_init_steps: int = 1,
        space: str = "flow",
        rescale: float = 0.0,
        sigma_interval: tuple[float, float] | None = None,
    ):
        super().__init__(scale, space, rescale, sigma_interval)
        self.zero_init_steps = check_int("zero_init_steps", zero_init_steps, minimum=0)

    def is_active(self, sigma: torch.Tensor) -> bool:
        return self.scale != 1 and super().is_active(sigma)

    def guide_step(self, step: int, denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                   uc: dict | None) -> Guided:
        if step >= self.zero_init_steps:
            return super().guide_step(step, denoise, x, sigma, cond, uc)
        x0 = from_space(self.space, torch.zeros_like(x), x, append_dims(sigma, x.ndim))
        return Guided(x0, {branch.name: x0 for branch in self.branches(sigma, cond, uc)})

    def guidance(self, x_u: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
        c, u = x_c.flatten(1).float(), x_u.flatten(1).float()
        s_star = (c * u).sum(dim=1) / (u * u).sum(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        scaled_u = x_u * append_dims(s_star.to(x_u.dtype), x_u.ndim)
        return scaled_u + self.scale * (x_c - scaled_u)

    def __repr__(self) -> str:
        return (f"CFGZeroStarGuider(scale={self.scale}, zero_init_steps={self.zero_init_steps}, space={self.space!r}, "
                f"rescale={self.rescale}, sigma_interval={self.sigma_interval})")
