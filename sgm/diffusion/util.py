"""Small tensor helpers shared by the samplers and denoisers."""

from __future__ import annotations

import torch


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dims so that ``x`` broadcasts against a ``target_dims``-D tensor."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
    return x[(...,) + (None,) * missing]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / append_dims(sigma, x.ndim)
