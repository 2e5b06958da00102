"""Adaptive projected guidance, APG (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts
of High Guidance Scales in Diffusion Models", sec. 3 and Algorithm 1), and what the guiders
that combine in a chosen prediction space share (:class:`SpaceCFG`, :class:`SamplingRun`).

APG works on the denoised prediction D (x0). With the CFG update dD = D_c - D_u:

1. momentum (beta < 0 in the paper): dD <- dD + beta * (the previous step's dD), a
   running average reset at the start of every sampling run;
2. rescaling: dD <- dD * min(1, r / ||dD||) (norm over all but the batch axis);
3. projection: dD = dD_par + dD_orth, parallel and orthogonal to D_c;
4. D = D_c + (w - 1) * (dD_orth + eta * dD_par).

With eta = 1, beta = 0 and r = 0 this is CFG. ``formulation="diffusers"`` gives diffusers'
``AdaptiveProjectedGuidance`` default, D_u + w * (dD_orth + eta * dD_par): it differs from the
paper's by (dD_orth + eta * dD_par) - dD, zero only for eta = 1 without momentum and rescaling.
diffusers' ``use_original_formulation=True`` with guidance scale w - 1 is the paper's. The
projection runs in float64 as in the paper's code (float32 on MPS, which has no float64).

Prediction spaces (``space``): our branches predict x0 at (x, sigma) with x = x0 + sigma * eps;
a guider can combine them as ``x0``, as ``eps`` = (x - x0) / sigma (what diffusers' guiders see
for an SDXL eps model), or as the flow velocity ``flow`` = eps - x0 (rectified flow, x_t =
(1 - t) x0 + t eps with sigma = t / (1 - t), what they see for a flow model). CFG itself is the
same in every space; APG's projection, norm and momentum are not: ``x0`` is the paper's.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._checks import check_finite, check_positive
from .guiders import Guided, VanillaCFG, evaluate_branches
from .util import append_dims

SPACES = ("x0", "eps", "flow")
# EDM churn raises sigma by at most (1 + gamma) with gamma <= sqrt(2) - 1 (Karras et al. 2022, Algorithm 2):
# within a run, no call's sigma exceeds the previous call's by more than this factor
_CHURN_BOUND = math.sqrt(2.0)


def check_space(space: Any) -> str:
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    return str(space)


def to_space(space: str, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """An x0 prediction at (x, sigma) as the prediction of ``space`` (sigma broadcast to x)."""
    if space == "x0":
        return x0
    eps = (x - x0) / sigma
    return eps if space == "eps" else eps - x0


def from_space(space: str, pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The x0 of a prediction in ``space`` at (x, sigma): the inverse of :func:`to_space`."""
    if space == "x0":
        return pred
    if space == "eps":
        return x - sigma * pred
    return (x - sigma * pred) / (1 + sigma)  # v = (x - x0) / sigma - x0


class SamplingRun:
    """Where a stateful guider is in its sampling run, seen from the noise levels it is called at.

    A guider only sees sigma, so a run starts at the first call and again when a call's sigma is
    at or above the run's first one (the same schedule again), or more than sqrt(2) times the
    previous call's (EDM churn raises sigma by less within a run). :meth:`reset` starts one by
    hand. The step index counts arrivals at a new lowest sigma: a sampler's corrector evaluation
    at the next level (Heun, DPM++ 2S) belongs to the next step, as in diffusers' counting.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.lowest: float | None = None
        self.index = -1

    def observe(self, sigma: torch.Tensor) -> tuple[int, bool]:
        """Record a call at ``sigma`` [B] (one level per batch): (its step index, whether a run starts)."""
        s = float(sigma.reshape(-1)[0])
        new = self.first is None or s >= self.first or s > _CHURN_BOUND * self.last
        if new:
            self.reset()
            self.first = s
        if self.lowest is None or s < self.lowest:
            self.lowest = s
            self.index += 1
        self.last = s
        return self.index, new


class SpaceCFG(VanillaCFG):
    """A CFG guider that combines its branches in a prediction ``space`` (see the module doc)
    and knows its sampling run (:class:`SamplingRun`). Subclasses write :meth:`guidance`.

    ``rescale`` (CFG rescale phi, Lin et al. 2023) acts in the same space, on the guided
    prediction against the conditional one (diffusers' ``guidance_rescale`` on eps with
    ``space="eps"``); ``sigma_interval`` as in :class:`~sgm.diffusion.guiders.VanillaCFG`:
    outside it the conditional prediction, no unconditional evaluation. Call :meth:`guide`
    (as the samplers do): the original sgm API has no x to convert with and no run.
    """

    def __init__(self, scale: float, space: str = "x0", rescale: float = 0.0,
                 sigma_interval: tuple[float, float] | None = None):
        super().__init__(scale, rescale=rescale, sigma_interval=sigma_interval)
        self.space = check_space(space)
        self.run = SamplingRun()

    def start_run(self) -> None:
        """Called when a new sampling run starts: reset per-run state here."""

    def observe(self, sigma: torch.Tensor) -> int:
        """This call's step index in its run; :meth:`start_run` first when a run starts."""
        index, new = self.run.observe(sigma)
        if new:
            self.start_run()
        return index

    def guide(self, denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uc: dict | None) -> Guided:
        return self.guide_step(self.observe(sigma), denoise, x, sigma, cond, uc)

    def guide_step(self, step: int, denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                   uc: dict | None) -> Guided:
        """:meth:`guide` at step index ``step`` of the run (already observed)."""
        predictions = evaluate_branches(denoise, x, sigma, self.branches(sigma, cond, uc))
        return Guided(self.combine(predictions, sigma, x), predictions)

    def combine(self, predictions: dict[str, torch.Tensor], sigma: torch.Tensor,
                x: torch.Tensor | None = None) -> torch.Tensor:
        """The guided x0 from the branches' x0 predictions at ``x`` (needed unless ``space="x0"``)."""
        if "uncond" not in predictions:
            return predictions["cond"]
        if self.space == "x0":
            return self.cfg(predictions["uncond"], predictions["cond"])
        if x is None:
            raise ValueError(f"{type(self).__name__} with space={self.space!r} needs x to combine: call guide()")
        s = append_dims(sigma, x.ndim)
        u, c = (to_space(self.space, predictions[name], x, s) for name in ("uncond", "cond"))
        return from_space(self.space, self.cfg(u, c), x, s)

    def cfg(self, x_u: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
        """The guided prediction (in ``space``) from the unconditional and conditional ones."""
        return self.rescaled(self.guidance(x_u, x_c), x_c)

    def guidance(self, x_u: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare_inputs(self, *args: Any) -> tuple:
        raise TypeError(f"{type(self).__name__} combines at (x, sigma) over a run: call "
                        "guider.guide(denoise, x, sigma, cond, uc), as the samplers do")

    __call__ = prepare_inputs


class APGGuider(SpaceCFG):
    """Adaptive projected guidance (Sadat et al. 2024), see the module doc.

    ``scale`` w; ``eta`` the weight of the parallel component (0: the paper's choice, 1: none
    removed); ``momentum`` beta (0: off; the paper uses negative values); ``norm_threshold`` r
    (0: off); ``space`` x0 (the paper's), eps or flow; ``formulation`` ``"paper"`` or
    ``"diffusers"``. Scale 1 is the conditional prediction (no unconditional evaluation).
    """

    def __init__(
        self,
        scale: float = 5.0,
        eta: float = 0.0,
        momentum: float = -0.5,
        norm_threshold: float = 0.0,
        space: str = "x0",
        formulation: str = "paper",
        rescale: float = 0.0,
        sigma_interval: tuple[float, float] | None = None,
    ):
        super().__init__(scale, space, rescale, sigma_interval)
        self.eta = check_finite("eta", eta)
        self.momentum = check_finite("momentum", momentum)
        self.norm_threshold = check_positive("norm_threshold", norm_threshold, allow_zero=True)
        if formulation not in ("paper", "diffusers"):
            raise ValueError(f"formulation must be 'paper' or 'diffusers', got {formulation!r}")
        self.formulation = formulation
        self.running: torch.Tensor | None = None

    def start_run(self) -> None:
        self.running = None

    def is_active(self, sigma: torch.Tensor) -> bool:
        return self.scale != 1 and super().is_active(sigma)

    def guidance(self, x_u: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x_c.ndim))
        update = x_c - x_u
        if self.momentum:
            if self.running is not None and self.running.shape == update.shape:
                update = update + self.momentum * self.running
            self.running = update
        if self.norm_threshold > 0:
            norm = update.norm(p=2, dim=dims, keepdim=True)
            update = update * (self.norm_threshold / norm).clamp(max=1.0)
        work = torch.float32 if update.device.type == "mps" else torch.float64
        u, c = update.to(work), x_c.to(work)
        direction = c / c.norm(p=2, dim=dims, keepdim=True).clamp(min=1e-12)
        parallel = (u * direction).sum(dim=dims, keepdim=True) * direction
        update = ((u - parallel) + self.eta * parallel).to(update.dtype)
        if self.formulation == "paper":
            return x_c + (self.scale - 1) * update
        return x_u + self.scale * update

    def __repr__(self) -> str:
        return (f"APGGuider(scale={self.scale}, eta={self.eta}, momentum={self.momentum}, "
                f"norm_threshold={self.norm_threshold}, space={self.space!r}, formulation={self.formulation!r}, "
                f"rescale={self.rescale}, sigma_interval={self.sigma_interval})")
