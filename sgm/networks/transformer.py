"""The UNet's spatial transformer (Rombach et al. 2022, LDM; ldm/sgm ``modules/attention.py`` layout).

SpatialTransformer: GroupNorm -> proj_in (1x1 conv or linear) -> ``depth`` x
BasicTransformerBlock (self-attention, cross-attention, GEGLU feed-forward, each pre-norm
and residual) -> proj_out -> + input.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention
from .util import Checkpointed, as_list, dropout_layer, normalization, zero_module

log = logging.getLogger(__name__)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``proj`` to 2 * dim_out, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net`` = [GEGLU(dim, mult * dim), Dropout, Linear(mult * dim, dim)] (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), dropout_layer(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(Checkpointed):
    """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x).

    With ``disable_self_attn`` attn1 attends to the context too (sgm option).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        backend: str | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout, backend=backend
        )
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, backend=backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, options: dict | None = None) -> torch.Tensor:
        self_context = context if self.disable_self_attn else None
        x = self.attn1(self.norm1(x), context=self_context, transformer_options=options) + x
        x = self.attn2(self.norm2(x), context=context, transformer_options=options) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        return self.maybe_checkpoint(self._forward, x, context, transformer_options)


def block_context_dims(context_dim: Any, depth: int) -> list[int | None]:
    """Context width of each of ``depth`` blocks, following sgm's SpatialTransformer.

    An int applies to every block; a list with one entry per block is used as is; a list
    of another length must hold a single repeated value (the SDXL refiner's [1280] * 4).
    """
    if context_dim is None:
        return [None] * depth
    dims = as_list(context_dim)
    if dims is None:
        return [int(context_dim)] * depth
    if len(dims) == depth:
        return [int(d) for d in dims]
    if len(set(dims)) != 1:
        raise ValueError(
            f"context_dim {dims!r} has {len(dims)} entries for a transformer of depth {depth}; "
            "it must then hold one repeated value"
        )
    return [int(dims[0])] * depth


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context`` (keys of sgm).

    ``use_linear``: proj_in/proj_out are Linear layers applied after flattening (SDXL),
    else 1x1 convolutions before flattening (SD 1.x). ``context`` may be one tensor or a
    list with one tensor per block.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Any = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        backend: str | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, n_heads, d_head, dropout, cdim, disable_self_attn, backend=backend, use_checkpoint=use_checkpoint
            )
            for cdim in block_context_dims(context_dim, depth)
        )
        if use_linear:
            self.proj_out: nn.Module = zero_module(nn.Linear(inner, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        contexts = context if isinstance(context, (list, tuple)) else [context]
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=contexts[i if len(contexts) > 1 else 0], transformer_options=transformer_options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # a view with channels-last strides
        if not self.use_linear:
            x = self.proj_out(x)
        # residual first: the sum takes the input's memory layout (NCHW), not the view's, so the
        # convolutions after this block see the layout they expect (no copy per conv; same values)
        return residual + x if self.nchw_output else x + residual

    nchw_output = True  # False: the sum as sgm writes it (channels-last strides); the benchmark's A/B
