"""Gaussian noise drawn from given generators: the one rule every sampler, loss and VAE uses."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def gaussian(shape: Sequence[int], generator: Generators = None, device: Any = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit Gaussian noise of ``shape``, drawn on the generator's own device, returned on ``device``.

    ``generator`` may be a list with one generator per sample (the first axis): each sample's
    noise then depends on its own seed only, whatever the batch it is drawn in.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([gaussian(shape[1:], g, device, dtype) for g in generator])
    source = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=source, dtype=dtype)
    return noise if device is None else noise.to(device)


def gaussian_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Unit Gaussian noise shaped like ``x``, on its device and in its dtype."""
    return gaussian(x.shape, generator, x.device, x.dtype)


def seeded_generators(seeds: Sequence[int], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per image, seeded ``seed + offset`` (so images never share noise)."""
    return [torch.Generator().manual_seed(int(s) + offset) for s in seeds]
