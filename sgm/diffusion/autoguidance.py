"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
arXiv:2406.02507).

Guide the model with a weaker version of itself instead of its unconditional branch (eq. 2):

    x0 = D_weak(x; sigma, c) + scale * (D_main(x; sigma, c) - D_weak(x; sigma, c))

with both branches conditional. The weights sum to 1, so the rule is the same on x0, on eps
and on the score (D = x + sigma^2 grad log p): it guides by the ratio p_main / p_weak, which
sharpens what the main model knows better than the weak one without pulling every sample
towards the prompt's mode as CFG does.

Two forms of the weak model:

* **a second engine** (the paper's: a smaller and/or shorter-trained model with its own
  weights, sharing the main model's conditioning). ``run.py guider=autoguidance`` builds it
  from ``weak_model`` / ``weak_weights`` (:func:`sgm.tasks.common.build_weak_engine`) and hands
  it over with :meth:`AutoGuidance.set_weak`; its ``denoise`` counts its own network
  evaluations, and the engine counts them into the run's NFE (``guider.engines``).
* **the main UNet with layers skipped** (``skip_layers``, diffusers' ``AutoGuidance`` with a
  ``LayerSkipConfig``): the weak branch is the main network with the self-attention of the
  selected layers replaced (``skip="attention"``: the layer outputs its input, diffusers'
  ``skip_attention=True, skip_ff=False``; ``skip="attention_scores"``: the identity attention
  map, diffusers' ``skip_attention_scores=True``, PAG's perturbation). Layer selectors are
  PAG's (:mod:`sgm.diffusion.pag`). Skipping whole transformer blocks or feed-forward layers
  (diffusers' other ``LayerSkipConfig`` modes) has no hook on this seam.

``weak_conditioning="uncond"`` feeds the weak branch the unconditional conditioning instead,
as diffusers' ``AutoGuidance`` does (its second batch takes the negative embeddings): that is
CFG with a degraded unconditional branch, not eq. 2. ``rescale`` (CFG rescale phi, on x0 as
:class:`~sgm.diffusion.guiders.VanillaCFG`) and ``sigma_interval`` (outside it only D_main is
evaluated) compose as for CFG; ``scale`` = 1 is D_main alone, also without a weak evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from .guiders import Branch, Guided, VanillaCFG, evaluate_branches
from .pag import IdentitySelfAttention, _selectors

WEAK = "weak"  # the weak branch's name in Guided.predictions


class SkipSelfAttention(IdentitySelfAttention):
    """The selected self-attention layers return their (normed) input: diffusers' layer skip of an
    attention processor (``LayerSkipConfig(skip_attention=True, skip_ff=False)``), so the block's
    residual adds that input instead of the attention output."""

    def attention(self, layer: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        return x if layer.name in self._names else None


SKIPS = {"attention": SkipSelfAttention, "attention_scores": IdentitySelfAttention}
CONDITIONINGS = ("cond", "uncond")

_ONE_CALL = ("AutoGuidance evaluates a second network (or the main one with other options): call "
             "guider.guide(denoise, x, sigma, cond, uc), as the samplers do")


class AutoGuidance(VanillaCFG):
    """x0 = D_weak + scale * (D_main - D_weak) (Karras et al. 2024, eq. 2), on the CFG guider's seam.

    ``weak``: the weak model, an engine (anything with ``denoise(x, sigma, cond)``; a
    :class:`~sgm.engine.DiffusionEngine` also counts its evaluations) or a denoise function; it
    may come later through :meth:`set_weak`. ``skip_layers``: instead of a weak model, PAG-style
    layer selectors of the main UNet whose self-attention the weak branch skips (``skip``:
    ``attention`` or ``attention_scores``). ``weak_conditioning``: ``cond`` (eq. 2) or ``uncond``
    (diffusers' AutoGuidance). ``rescale`` and ``sigma_interval`` as in :class:`VanillaCFG`.
    Per guided step: one main and one weak evaluation; outside the interval or at scale 1, one.
    """

    def __init__(
        self,
        scale: float = 2.0,
        weak: Any = None,
        skip_layers: Sequence[str] | str | None = None,
        skip: str = "attention",
        weak_conditioning: str = "cond",
        rescale: float = 0.0,
        sigma_interval: tuple[float, float] | None = None,
    ):
        super().__init__(scale, rescale=rescale, sigma_interval=sigma_interval)
        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {', '.join(SKIPS)}, got {skip!r}")
        if weak_conditioning not in CONDITIONINGS:
            raise ValueError(f"weak_conditioning must be one of {', '.join(CONDITIONINGS)}, got {weak_conditioning!r}")
        self.skip, self.weak_conditioning = skip, weak_conditioning
        self.skip_layers = None if skip_layers is None else _selectors(skip_layers)
        if self.skip_layers is not None and not self.skip_layers:
            raise ValueError("skip_layers must name at least one layer (e.g. [mid]), or be null for a weak model")
        # one options object: evaluate_branches groups branches by it
        self.options = {"patches": [SKIPS[skip](self.skip_layers)]} if self.skip_layers else None
        self._weak_denoise: Callable | None = None
        self._weak_engine: nn.Module | None = None
        if weak is not None:
            self.set_weak(weak)

    @property
    def needs_weak_model(self) -> bool:
        """Whether a second engine is wanted (not the layer-skip form) and not given yet."""
        return self.skip_layers is None and self._weak_denoise is None

    @property
    def engines(self) -> list[nn.Module]:
        """The other engines this guider evaluates (the weak one): they follow the main engine's
        device and their evaluations count in its NFE."""
        return [self._weak_engine] if self._weak_engine is not None else []

    def set_weak(self, weak: Any) -> None:
        """Use ``weak`` (an engine with ``denoise``, or a denoise function) as the weak model."""
        if self.skip_layers is not None:
            raise ValueError("this AutoGuidance skips layers of the main model (skip_layers): it takes no weak model; "
                             "set guider.skip_layers=null to guide with a second model")
        denoise = getattr(weak, "denoise", None)
        if callable(denoise):
            self._weak_denoise = denoise
            self._weak_engine = weak if isinstance(weak, nn.Module) else None
        elif callable(weak):
            self._weak_denoise, self._weak_engine = weak, None
        else:
            raise TypeError(f"the weak model must be an engine with denoise(x, sigma, cond) or a denoise function, "
                            f"got {type(weak).__name__}")

    def branches(self, sigma: torch.Tensor, cond: dict, uc: dict | None) -> list[Branch]:
        if self.scale == 1 or not self.is_active(sigma):
            return [Branch("cond", cond)]
        if self.weak_conditioning == "uncond":
            if uc is None:
                raise ValueError("weak_conditioning=uncond needs an unconditional conditioning (uc)")
            return [Branch("cond", cond), Branch(WEAK, uc, self.options)]
        return [Branch("cond", cond), Branch(WEAK, cond, self.options)]

    def guide(self, denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uc: dict | None) -> Guided:
        """D_main through ``denoise``; D_weak through the weak model, or through ``denoise`` with the
        layer-skip options."""
        branches = self.branches(sigma, cond, uc)
        on_weak = [b for b in branches if b.name == WEAK and self.skip_layers is None]
        if on_weak and self._weak_denoise is None:
            raise RuntimeError(
                "AutoGuidance has no weak model: run.py builds it from weak_model / weak_weights "
                "(guider=autoguidance); in code, guider.set_weak(engine). Or skip layers of the main model "
                "instead: guider.skip_layers=[mid]")
        predictions = evaluate_branches(denoise, x, sigma, [b for b in branches if b.name != WEAK or not on_weak])
        if on_weak:
            predictions.update(evaluate_branches(self._weak_denoise, x, sigma, on_weak))
        return Guided(self.combine(predictions, sigma), predictions)

    def combine(self, predictions: dict[str, torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
        if WEAK not in predictions:
            return predictions["cond"]
        return self.cfg(predictions[WEAK], predictions["cond"])  # weak + scale (main - weak), then rescale

    # the original sgm API has one network call per step: not enough for a second model
    def prepare_inputs(self, *args: Any) -> tuple:
        raise TypeError(_ONE_CALL)

    def __call__(self, *args: Any) -> torch.Tensor:
        raise TypeError(_ONE_CALL)

    def __repr__(self) -> str:
        weak = f"skip_layers={self.skip_layers}, skip={self.skip!r}" if self.skip_layers else (
            f"weak={type(self._weak_engine).__name__ if self._weak_engine is not None else self._weak_denoise}")
        return (f"AutoGuidance(scale={self.scale}, {weak}, weak_conditioning={self.weak_conditioning!r}, "
                f"rescale={self.rescale}, sigma_interval={self.sigma_interval})")
