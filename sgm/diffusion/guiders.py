"""Guiders: which network branches a step evaluates and how their predictions combine.

The seam (:class:`Guider`): at each step a guider names its :class:`Branch` es (cond, uncond,
perturbed, ...), each with the conditioning it uses and optional network ``options`` (the
``transformer_options`` dict that reaches the UNet's attention, see
:mod:`sgm.networks.patches`); :meth:`Guider.guide` evaluates them (branches that share their
options in one batched network call) and :meth:`Guider.combine` turns every branch's x0
prediction into one x0. :class:`Guided` carries both, for samplers that need a branch
(CFG++ uses the unconditional prediction).

The original sgm API stays for the CFG guiders: ``x, sigma, cond = guider.prepare_inputs(x,
sigma, cond, uc)`` batches uncond and cond and ``x0 = guider(model_output, sigma)`` combines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import build_part
from ..networks.patches import OPTIONS_KEY  # the conditioning key that carries a branch's network options
from ..networks.reuse import reuse
from ._checks import check_finite, check_positive


def _cat_conditionings(uc: dict, c: dict) -> dict:
    """Stack the unconditional and conditional dicts along the batch axis (uc first)."""
    out = {}
    for key, value in c.items():
        if key not in uc:
            raise KeyError(f"conditioning key {key!r} is missing from the unconditional conditioning")
        if isinstance(value, torch.Tensor):  # made once per sampling run (sgm.networks.reuse)
            out[key] = reuse("cat", (uc[key], value), lambda u=uc[key], v=value: torch.cat((u, v), 0))
        else:
            if uc[key] != value:
                raise ValueError(f"non-tensor conditioning {key!r} differs between cond and uc")
            out[key] = value
    return out


@dataclass
class Branch:
    """One network evaluation a guider asks for: a name, its conditioning, its network options."""

    name: str
    cond: dict
    options: dict | None = None


@dataclass
class Guided:
    """A guided step's x0 and every branch's own x0 prediction, by branch name."""

    x0: torch.Tensor
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)


def evaluate_branches(denoise: Callable, x: torch.Tensor, sigma: torch.Tensor,
                      branches: list[Branch]) -> dict[str, torch.Tensor]:
    """Each branch's x0 prediction. Branches with the same options share one batched call
    (concatenated in the order given), so plain CFG stays one network evaluation per step."""
    groups: list[tuple[dict | None, list[Branch]]] = []
    for branch in branches:
        for options, members in groups:
            if options is branch.options or (options is not None and options == branch.options):
                members.append(branch)
                break
        else:
            groups.append((branch.options, [branch]))
    out: dict[str, torch.Tensor] = {}
    n = x.shape[0]
    for options, members in groups:
        cond = members[0].cond
        for other in members[1:]:
            cond = _cat_conditionings(cond, other.cond)
        if options:
            cond = {**cond, OPTIONS_KEY: options}
        k = len(members)
        pred = denoise(torch.cat([x] * k) if k > 1 else x, torch.cat([sigma] * k) if k > 1 else sigma, cond)
        for i, branch in enumerate(members):
            out[branch.name] = pred[i * n : (i + 1) * n]
    return out


class Guider:
    """Base of the guiders: override :meth:`branches` and :meth:`combine` (or :meth:`guide`)."""

    def branches(self, sigma: torch.Tensor, cond: dict, uc: dict | None) -> list[Branch]:
        return [Branch("cond", cond)]

    def combine(self, predictions: dict[str, torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
        return predictions["cond"]

    def guide(self, denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uc: dict | None) -> Guided:
        """Evaluate this step's branches at ``x`` and noise levels ``sigma`` [B]; combine them."""
        predictions = evaluate_branches(denoise, x, sigma, self.branches(sigma, cond, uc))
        return Guided(self.combine(predictions, sigma), predictions)


class IdentityGuider(Guider):
    """No guidance: one conditional network call per step."""

    def prepare_inputs(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uc: dict | None) -> tuple:
        return x, sigma, cond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x


class NoDynamicThresholding:
    """Plain CFG combination ``uc + scale * (c - uc)``."""

    def __call__(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        return uncond + scale * (cond - uncond)


class DynamicThresholding(NoDynamicThresholding):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3) of the guided x0.

    Per sample, s = max(quantile(|x0|, percentile), threshold); x0 is clipped to [-s, s]
    and rescaled by threshold / s.
    """

    def __init__(self, percentile: float = 0.995, threshold: float = 1.0):
        if not 0.0 < float(percentile) <= 1.0:
            raise ValueError(f"percentile must be in (0, 1], got {percentile!r}")
        self.percentile = float(percentile)
        self.threshold = check_positive("threshold", threshold)

    def __call__(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        x0 = super().__call__(uncond, cond, scale)
        flat = x0.reshape(x0.shape[0], -1).abs().float()
        s = torch.quantile(flat, self.percentile, dim=1).clamp(min=self.threshold)
        s = s.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return x0.clamp(-s, s) * (self.threshold / s)


class VanillaCFG(Guider):
    """Classifier-free guidance (Ho & Salimans 2022): x0 = x0_uc + scale * (x0_c - x0_uc).

    Any finite real ``scale``: 1 gives the conditional prediction, 0 the unconditional one,
    a negative scale pushes away from the prompt. Optional refinements:

    * ``rescale`` (phi): CFG rescale of Lin et al. 2023 ("Common diffusion noise schedules
      and sample steps are flawed", eq. 15-16): the guided x0 is scaled so that its per-sample
      standard deviation matches the conditional prediction's, then blended with weight phi.
    * ``sigma_interval`` = (lo, hi): guidance only where lo <= sigma <= hi (Kynkäänniemi et al.
      2024, "Applying guidance in a limited interval improves sample and distribution quality");
      outside it the conditional prediction is used and the unconditional call is skipped.
    * ``dyn_thresh``: a thresholding combiner such as :class:`DynamicThresholding`.
    """

    def __init__(
        self,
        scale: float,
        dyn_thresh: Any = None,
        rescale: float = 0.0,
        sigma_interval: tuple[float, float] | None = None,
        *,
        dyn_thresh_config: Any = None,
    ):
        self.scale = check_finite("scale", scale)
        self.dyn_thresh = build_part("dyn_thresh", dyn_thresh, dyn_thresh_config, default=NoDynamicThresholding)
        self.rescale = check_finite("rescale", rescale)
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"rescale (phi) must be in [0, 1], got {rescale!r}")
        if sigma_interval is not None:
            lo, hi = (check_positive(f"sigma_interval[{i}]", v, allow_zero=True, allow_inf=True)
                      for i, v in enumerate(sigma_interval))
            if lo > hi:
                raise ValueError(f"sigma_interval must be (lo, hi) with lo <= hi, got {tuple(sigma_interval)}")
            sigma_interval = (lo, hi)
        self.sigma_interval = sigma_interval

    def is_active(self, sigma: torch.Tensor) -> bool:
        """Whether guidance applies at this step (all samples of a batch share the schedule)."""
        if self.sigma_interval is None:
            return True
        lo, hi = self.sigma_interval
        s = float(sigma.reshape(-1)[0])
        return lo <= s <= hi

    def unit_scale(self) -> bool:
        """Whether this step's guided x0 is the conditional one by exact math: scale 1, plain
        combination (dynamic thresholding still clips at scale 1), and no sampler that reads the
        unconditional prediction (``keep_uncond``: CFG++). Then :meth:`branches` skips the
        unconditional evaluation: half the network batch (uc + 1 (c - uc) equals c up to rounding)."""
        return self.scale == 1 and type(self.dyn_thresh) is NoDynamicThresholding and not self.keep_uncond

    keep_uncond: bool = False  # set by samplers that use the unconditional x0 themselves (CFG++)

    def branches(self, sigma: torch.Tensor, cond: dict, uc: dict | None) -> list[Branch]:
        if not self.is_active(sigma) or self.unit_scale():
            return [Branch("cond", cond)]
        if uc is None:
            raise ValueError("classifier-free guidance needs an unconditional conditioning (uc)")
        return [Branch("uncond", uc), Branch("cond", cond)]

    def combine(self, predictions: dict[str, torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
        if "uncond" not in predictions:
            return predictions["cond"]
        return self.cfg(predictions["uncond"], predictions["cond"])

    # the original sgm API: one batched call prepared by the guider, then combined
    def prepare_inputs(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uc: dict | None) -> tuple:
        if not self.is_active(sigma):  # the interval only: __call__ below follows the same rule
            return x, sigma, cond
        if uc is None:
            raise ValueError("classifier-free guidance needs an unconditional conditioning (uc)")
        return torch.cat([x, x]), torch.cat([sigma, sigma]), _cat_conditionings(uc, cond)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.is_active(sigma):
            return x
        return self.cfg(*x.chunk(2))

    def cfg(self, x_u: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
        """The guided x0 from the unconditional and conditional predictions."""
        return self.rescaled(self.dyn_thresh(x_u, x_c, self.scale), x_c)

    def rescaled(self, x_pred: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
        """CFG rescale (phi = ``rescale``) of a guided x0 towards the conditional prediction's std."""
        if self.rescale > 0:
            dims = tuple(range(1, x_c.ndim))
            std_c = x_c.std(dim=dims, keepdim=True)
            std_cfg = x_pred.std(dim=dims, keepdim=True).clamp(min=1e-12)
            x_pred = self.rescale * (x_pred * (std_c / std_cfg)) + (1 - self.rescale) * x_pred
        return x_pred

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, rescale={self.rescale}, sigma_interval={self.sigma_interval})"


class RescaledCFG(VanillaCFG):
    """:class:`VanillaCFG` with CFG rescale phi (Lin et al. 2023); phi = 0.7 is the paper's choice."""

    def __init__(self, scale: float, phi: float = 0.7, **kwargs: Any):
        super().__init__(scale, rescale=phi, **kwargs)


class IntervalCFG(VanillaCFG):
    """:class:`VanillaCFG` applied only for sigma in [sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024).

    The default interval brackets the mid-noise range of an SDXL-like schedule; the paper
    tunes it per model, and so should you."""

    def __init__(self, scale: float, sigma_lo: float = 0.28, sigma_hi: float = 5.42, **kwargs: Any):
        super().__init__(scale, sigma_interval=(sigma_lo, sigma_hi), **kwargs)
