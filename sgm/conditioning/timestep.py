"""Size and score embedders: each scalar gets a sinusoidal timestep embedding (no weights).

reference/FORMATS.md, "Conditioning": each value of a size tuple (original size (h, w),
crop (top, left), target size (h, w)) or the refiner's aesthetic score is embedded
separately, on its raw value, with the timestep embedding of width 256 (cos half first,
then sin; frequencies exp(-ln(10000) i / 128)), and the embeddings are concatenated.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .embedders import AbstractEmbModel


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] values -> [N, dim] float32: [cos(t f_i), sin(t f_i)], f_i = exp(-ln(max_period) i / (dim // 2)).

    An odd ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """[B, N] numbers (or [B]) -> [B, N * outdim]: each number embedded by :func:`timestep_embedding`."""

    def __init__(self, outdim: int = 256, **kwargs: Any):
        super().__init__(**kwargs)
        if int(outdim) < 1:
            raise ValueError(f"outdim must be positive, got {outdim!r}")
        self.outdim = int(outdim)

    def forward(self, x: Any) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float32)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"expected [B, N] or [B] values, got shape {tuple(x.shape)}")
        b, n = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, n * self.outdim)

    def output_widths(self, input_width: int | None = None) -> dict[str, int]:
        if input_width is None:
            raise ValueError("ConcatTimestepEmbedderND's width depends on the number of values per sample")
        return {"vector": int(input_width) * self.outdim}
