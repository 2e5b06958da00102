"""The LoRA weight update and its merge into a base weight: the one copy of both rules.

``delta = scale * up @ down`` (``scale`` = alpha / rank, times a strength when merging a
file), shaped like the base weight: Linear ``[out, in]``, Conv2d ``[out, in, kh, kw]``
(``down`` [r, in, kh, kw] carries the kernel, ``up`` is [out, r, 1, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lora_delta(up: torch.Tensor, down: torch.Tensor, scale: float,
               shape: Sequence[int] | None = None) -> torch.Tensor:
    """``scale * up @ down`` (both flattened to matrices) in their dtype and device, differentiable.

    ``shape``: the layout wanted (e.g. a 1x1 conv LoRA onto a Linear); default the natural
    one, ``[out, in]`` or, for a 4-d ``down``, ``[out, in, kh, kw]``."""
    delta = up.flatten(1) @ down.flatten(1)
    if shape is not None:
        delta = delta.reshape(tuple(shape))
    elif down.ndim == 4:
        delta = delta.reshape(up.shape[0], *down.shape[1:])
    return delta * scale


@torch.no_grad()
def merge_delta(weight: torch.Tensor, delta: torch.Tensor, unmerge: bool = False) -> None:
    """``weight += delta`` in place (``unmerge``: ``-=``), ``delta`` cast to the weight's device and dtype."""
    delta = delta.to(device=weight.device, dtype=weight.dtype)
    if unmerge:
        weight.sub_(delta)
    else:
        weight.add_(delta)
