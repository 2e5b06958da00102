"""Network patches: per-call changes to the UNet's computation that leave its weights alone.

The role of ComfyUI's ``transformer_options`` patches and diffusers' attention processors,
used by perturbed-attention guidance (:mod:`sgm.diffusion.pag`), self-attention guidance
(:mod:`sgm.diffusion.sag`, through :class:`SelfAttentionCapture`) and FreeU
(:mod:`sgm.networks.freeu`).

How a patch reaches the UNet
----------------------------
``transformer_options`` is a dict that travels with one network call. A guider branch sets
it (:class:`sgm.diffusion.guiders.Branch` ``options``, put into the conditioning under
:data:`OPTIONS_KEY`); :class:`~sgm.networks.wrapper.OpenAIWrapper` puts its own network-level
``patches`` (``wrapper.patches = [FreeU()]``, see :func:`apply_patches`) in front of the
branch's ``options["patches"]`` and passes ``transformer_options=`` to the UNet only when
there is something to pass, so a call without options and patches runs exactly as before
(and a UNet class without that argument keeps working). ``UNetModel.forward`` ->
``TimestepEmbedSequential`` -> ``SpatialTransformer`` -> ``BasicTransformerBlock`` ->
``CrossAttention`` carry the dict on, through gradient checkpointing too.

Keys: ``"patches"``, a list of :class:`UNetPatch`; any other key is free for patches to read.

Hooks (all no-ops in :class:`UNetPatch`; patches run in list order)
-------------------------------------------------------------------
- ``prepare(unet)``: at the start of every UNet forward that carries the patch, e.g. to
  resolve and check layer names against this UNet.
- ``attention(layer, x, context)``: before a ``CrossAttention`` computes, with its (normed)
  input ``x`` [B, N, C] and ``context`` (None for self-attention). Return a tensor to
  replace the layer's output (the first patch that does wins), or None to leave it.
- ``output_block(name, stage, h, skip)``: on the up path, before output block ``name``
  (``"output_blocks.K"``) concatenates the backbone features ``h`` with the skip features
  ``skip``; returns the pair to concatenate. ``stage`` is the up-path resolution stage,
  diffusers' ``up_blocks`` index (0: the lowest resolution).

Layer names: each ``CrossAttention`` has ``.name``, its qualified module name inside the
UNet (``middle_block.1.transformer_blocks.0.attn1``); ``UNetModel.block_positions`` maps
each block name to its place in diffusers' layout. Both are plain attributes, not state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import weakref

import torch
from torch import nn

OPTIONS_KEY = "transformer_options"  # the conditioning key that carries one call's network options


class UNetPatch:
    """Base class of the patches: override the hooks you need (see the module doc)."""

    def prepare(self, unet: nn.Module) -> None:
        """Called at the start of each UNet forward that carries this patch."""

    def attention(self, layer: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        """A replacement for ``layer(x, context)``'s output, or None to compute it as usual."""
        return None

    def output_block(self, name: str, stage: int, h: torch.Tensor,
                     skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone and skip features that output block ``name`` concatenates."""
        return h, skip

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def merge_options(options: dict | None, patches: list[UNetPatch]) -> dict | None:
    """``options`` with ``patches`` in front of its own ``"patches"`` (``options`` itself when none)."""
    if not patches:
        return options
    options = dict(options or {})
    options["patches"] = [*patches, *options.get("patches", ())]
    return options


def apply_patches(target: nn.Module, patches: Iterable[UNetPatch] | Mapping[str, UNetPatch] | None) -> list[UNetPatch]:
    """Set the network-level patches of an engine (its ``model``) or of an ``OpenAIWrapper``.

    ``patches``: a list, a mapping such as Hydra's multi-selected config group
    (``{"freeu": FreeU(...)}``: its values, in order), or None for none. Returns the list set.
    """
    wrapper: Any = target if hasattr(target, "diffusion_model") else getattr(target, "model", None)
    if wrapper is None or not hasattr(wrapper, "patches"):
        raise TypeError(f"{type(target).__name__} is neither an OpenAIWrapper nor an engine with one as .model")
    items = list(patches.values() if isinstance(patches, Mapping) else patches or [])
    for p in items:
        if not isinstance(p, UNetPatch):
            raise TypeError(f"a network patch must be a UNetPatch, got {type(p).__name__}")
    wrapper.patches = items
    return items


class SelfAttentionCapture(UNetPatch):
    """Keeps the attention probabilities of one self-attention layer (the role of diffusers'
    ``CrossAttnStoreProcessor``), for self-attention guidance (:mod:`sgm.diffusion.sag`).

    The layer named ``layer`` (a ``CrossAttention`` name, see the module doc) computes its
    attention explicitly, softmax(Q K^T / sqrt(d)) in float32, and :attr:`maps` holds the
    probabilities of the last call averaged over heads, [B, N_query, N_key]; the layer's output
    is the usual one. Each UNet forward that carries the patch clears :attr:`maps` first, so a
    map is never one of an earlier call. A name that is not a self-attention layer of the UNet
    is an error naming it (at the first call).
    """

    def __init__(self, layer: str = "middle_block.1.transformer_blocks.0.attn1"):
        self.layer = str(layer)
        self.maps: torch.Tensor | None = None
        self._checked: weakref.WeakSet = weakref.WeakSet()  # UNets whose layer names were checked

    def prepare(self, unet: nn.Module) -> None:
        self.maps = None
        if unet in self._checked:
            return
        names = {getattr(m, "name", None) for m in unet.modules()}
        if self.layer not in names or not self.layer.endswith("attn1"):
            raise ValueError(f"attention capture: {self.layer!r} is not a self-attention layer (a CrossAttention "
                             f"named ...attn1) of this UNet, e.g. 'middle_block.1.transformer_blocks.0.attn1'")
        self._checked.add(unet)

    def attention(self, layer: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        if layer.name != self.layer:
            return None
        if context is not None:
            raise ValueError(f"attention capture: {self.layer!r} attends to a context (disable_self_attn), "
                             "not to itself")
        b, n, _ = x.shape
        heads = layer.heads
        q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2).float() for t in (layer.to_q(x), layer.to_k(x), layer.to_v(x)))
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # [B, heads, N, N]
        self.maps = probs.mean(dim=1)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1).to(x.dtype)
        return layer.to_out(out)
