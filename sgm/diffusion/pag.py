"""Perturbed-attention guidance, PAG (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance").

Besides the CFG branches, PAG evaluates the conditional branch once more with the
self-attention map of chosen layers replaced by the identity (so such a layer outputs
``to_out(to_v(x))``) and pushes away from that degraded prediction:

    x0 = CFG(x0_uncond, x0_cond) + pag_scale * (x0_cond - x0_perturbed)

as diffusers' PAG pipelines combine their noise predictions (the weights sum to 1, so this is
the same in x0 and in eps; CFG rescale, where set, works on x0 here as in VanillaCFG).
diffusers' ``pag_adaptive_scale`` is not implemented. The perturbation is a network patch
that the perturbed branch carries in its options (:mod:`sgm.networks.patches`).

Layer selectors (``layers``) pick self-attention layers by dotted prefix of any of their names:

- our module names: ``middle_block``, ``input_blocks.7``, ``output_blocks.0.1.transformer_blocks.0``;
- diffusers' PAG selectors: ``mid``, ``down``, ``up``, ``down.block_1``, ``up.block_0.attentions_1``
  (``down.block_i.attentions_j`` is ``down_blocks.i.attentions.j``; the form of diffusers'
  pipeline docs, which its current regex matcher no longer finds);
- diffusers' module names: ``down_blocks.2.attentions.1``, ``mid_block`` (prefixes, not regexes).

A selector that matches no layer is an error that names it (raised at the first network call,
when the UNet is known).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..networks.patches import UNetPatch
from ..networks.transformer import BasicTransformerBlock
from ..networks.util import as_list
from ._checks import check_finite
from .guiders import Branch, VanillaCFG


def self_attention_names(unet: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each self-attention layer of ``unet``: its name -> the names a selector may match."""
    positions = getattr(unet, "block_positions", None)
    if positions is None:
        raise TypeError(f"PAG needs sgm's UNetModel (block_positions), got {type(unet).__name__}")
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, BasicTransformerBlock) or module.disable_self_attn:
            continue
        parts = name.split(".")
        block = parts[0] if parts[0] == "middle_block" else ".".join(parts[:2])
        path, i, j = positions[block]
        tail = ".".join(parts[-2:]) + ".attn1"  # transformer_blocks.T.attn1
        if path == "mid":
            aliases = (f"mid.{tail}", f"mid_block.attentions.0.{tail}")
        else:
            aliases = (f"{path}.block_{i}.attentions_{j}.{tail}", f"{path}_blocks.{i}.attentions.{j}.{tail}")
        out[f"{name}.attn1"] = (f"{name}.attn1", *aliases)
    return out


def select_layers(unet: nn.Module, selectors: Sequence[str]) -> frozenset[str]:
    """The names of the self-attention layers that ``selectors`` pick (see the module doc)."""
    layers = self_attention_names(unet)
    chosen: set[str] = set()
    for sel in selectors:
        hits = {name for name, aliases in layers.items()
                if any(a == sel or a.startswith(sel + ".") for a in aliases)}
        if not hits:
            raise ValueError(
                f"PAG layer selector {sel!r} matches no self-attention layer of this UNet; use a prefix of a "
                f"module name (middle_block, input_blocks.7, output_blocks.0) or a diffusers selector "
                f"(mid, down, up, down.block_1, up.block_0.attentions_1)")
        chosen |= hits
    return frozenset(chosen)


class IdentitySelfAttention(UNetPatch):
    """The PAG perturbation: the selected self-attention layers use the identity attention map."""

    def __init__(self, layers: Sequence[str]):
        self.layers = list(layers)
        self._names: frozenset[str] = frozenset()
        self._resolved: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per UNet

    def prepare(self, unet: nn.Module) -> None:
        names = self._resolved.get(unet)
        if names is None:
            names = self._resolved[unet] = select_layers(unet, self.layers)
        self._names = names

    def attention(self, layer: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        if layer.name in self._names:
            return layer.to_out(layer.to_v(x))  # softmax(QK^T) -> I: each token keeps its own value
        return None


_ONE_CALL = ("PAGGuider evaluates branches with different network options: call "
             "guider.guide(denoise, x, sigma, cond, uc), as the samplers do")


def _selectors(layers: Any) -> list[str]:
    seq = [layers] if isinstance(layers, str) else as_list(layers)
    if seq is None or not all(isinstance(s, str) and s for s in seq):
        raise ValueError(f"layers must be a list of layer selectors (strings), got {layers!r}")
    return [str(s) for s in seq]


class PAGGuider(VanillaCFG):
    """Perturbed-attention guidance on top of :class:`~sgm.diffusion.guiders.VanillaCFG` (Ahn et al. 2024).

    Branches: ``uncond`` and ``cond`` (CFG with ``scale``), and ``perturbed`` (cond with identity
    self-attention in ``layers``, default ``["mid"]`` as diffusers' SDXL PAG pipeline). As in
    diffusers, without CFG (``scale`` = 1 or no ``uc``) the uncond branch is skipped and
    x0 = x0_cond + pag_scale * (x0_cond - x0_perturbed); ``pag_scale`` = 0 or no layers skips
    the perturbed branch (plain CFG). ``rescale`` applies, as in diffusers, to the whole guided
    prediction and only with CFG; ``dyn_thresh`` to the CFG part; ``sigma_interval`` limits CFG
    (the PAG term applies at every step). Other than diffusers (CFG only for scale > 1), any
    scale other than 1 runs CFG, as for :class:`VanillaCFG`.
    """

    def __init__(
        self,
        scale: float = 5.0,
        pag_scale: float = 3.0,
        layers: Sequence[str] | str = ("mid",),
        dyn_thresh: Any = None,
        rescale: float = 0.0,
        sigma_interval: tuple[float, float] | None = None,
        *,
        dyn_thresh_config: Any = None,
    ):
        super().__init__(scale, dyn_thresh, rescale, sigma_interval, dyn_thresh_config=dyn_thresh_config)
        self.pag_scale = check_finite("pag_scale", pag_scale)
        self.layers = _selectors(layers)
        self.perturbation = IdentitySelfAttention(self.layers)
        self.options = {"patches": [self.perturbation]}  # one object: evaluate_branches groups by it

    def branches(self, sigma: torch.Tensor, cond: dict, uc: dict | None) -> list[Branch]:
        if uc is not None and self.scale != 1 and self.is_active(sigma):
            out = [Branch("uncond", uc), Branch("cond", cond)]
        else:
            out = [Branch("cond", cond)]
        if self.pag_scale and self.layers:
            out.append(Branch("perturbed", cond, self.options))
        return out

    def combine(self, predictions: dict[str, torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
        x_c = predictions["cond"]
        cfg = "uncond" in predictions
        x = self.dyn_thresh(predictions["uncond"], x_c, self.scale) if cfg else x_c
        if "perturbed" in predictions:
            x = x + self.pag_scale * (x_c - predictions["perturbed"])
        return self.rescaled(x, x_c) if cfg else x

    # the original sgm API has one network call per step: not enough for PAG
    def prepare_inputs(self, *args: Any) -> tuple:
        raise TypeError(_ONE_CALL)

    def __call__(self, *args: Any) -> torch.Tensor:
        raise TypeError(_ONE_CALL)

    def __repr__(self) -> str:
        return (f"PAGGuider(scale={self.scale}, pag_scale={self.pag_scale}, layers={self.layers}, "
                f"rescale={self.rescale}, sigma_interval={self.sigma_interval})")
