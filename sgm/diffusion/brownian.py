"""Brownian-tree noise for SDE samplers: one fixed Brownian path per image, queried per step.

An SDE sampler such as DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095) needs the increment of
a Wiener process W over each step (sigma, sigma_next). Drawing those from a Brownian tree
(torchsde's :class:`torchsde.BrownianTree`, Li et al. 2020) instead of fresh Gaussians makes
the noise a property of the *path*, not of the schedule: a 50-step and a 100-step run with
the same seed see the same Brownian motion, so they converge to the same sample.

Conventions follow k-diffusion's ``BrownianTreeNoiseSampler`` with the identity transform
(time t = sigma), so both can be fed the same trees: the tree spans [sigma_min, sigma_max]
of the schedule (its nonzero part), starts from W = 0 at sigma_min, and a query
``noise(sigma, sigma_next)`` returns (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|),
i.e. unit-variance Gaussian noise.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence, Union

import torch

log = logging.getLogger(__name__)

Generators = Union[torch.Generator, Sequence[torch.Generator], None]

#: Entropy is drawn in [0, 2**63 - 1), as k-diffusion draws its default seed.
_SEED_HIGH = 2**63 - 1
#: Resolution of the tree's bisection in sigma (torchsde's default).
DEFAULT_TOL = 1e-6


def seed_from(generator: torch.Generator | None) -> int:
    """One deterministic int drawn from ``generator`` (torch's default generator if None).

    This is the tree's entropy: the same generator state always gives the same tree.
    """
    if generator is None:
        return int(torch.randint(0, _SEED_HIGH, ()).item())
    return int(torch.randint(0, _SEED_HIGH, (), generator=generator, device=generator.device).item())


def _tree_dtype(dtype: torch.dtype) -> torch.dtype:
    # Reduced-precision latents get float32 paths (then cast), so the path does not depend on
    # which half type a model runs in.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class BrownianTreeNoise:
    """Unit-variance Brownian increments over intervals of [sigma_min, sigma_max].

    ``generator`` is a list with one generator per image (one tree per image, so image k's
    noise depends on its own generator only, whatever the batch), a single generator (one
    tree for the whole batch) or None (one tree seeded from torch's default generator).
    Each tree's entropy is one int drawn from its generator at construction (:func:`seed_from`).
    Alternatively give ``seeds`` instead of generators (an int: one tree; a list: one per
    image), as k-diffusion's ``BrownianTreeNoiseSampler`` takes them.

    The trees are built on first use, on their generator's device (x's device for None or
    ``seeds``: with the CPU generators sgm uses, the path does not depend on where the model
    runs), and the noise is returned on x's device and dtype.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: float,
        sigma_max: float,
        generator: Generators = None,
        *,
        seeds: int | Sequence[int] | None = None,
        tol: float = DEFAULT_TOL,
    ):
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not 0 <= sigma_min <= sigma_max:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if generator is not None and seeds is not None:
            raise ValueError("give generator or seeds, not both")
        self.sigma_min, self.sigma_max, self.tol = sigma_min, sigma_max, float(tol)
        self.shape, self.device, self.dtype = tuple(x.shape), x.device, x.dtype
        if seeds is not None:
            self.batched = isinstance(seeds, (list, tuple))
            self.seeds: list[int] = [int(s) for s in seeds] if self.batched else [int(seeds)]
            self._devices = [x.device] * len(self.seeds)
            count, what = len(self.seeds), "seeds"
        else:
            self.batched = isinstance(generator, (list, tuple))
            gens = list(generator) if self.batched else [generator]
            count, what = len(gens), "generators"
            if not self.batched or count == x.shape[0]:
                self.seeds = [seed_from(g) for g in gens]
                self._devices = [g.device if g is not None else x.device for g in gens]
        if self.batched and count != x.shape[0]:
            raise ValueError(f"got {count} {what} for a batch of {x.shape[0]}")
        self._trees: list[Any] | None = None  # built on first query

    @classmethod
    def for_schedule(cls, x: torch.Tensor, sigmas: Sequence[float], generator: Generators = None,
                     **kwargs: Any) -> "BrownianTreeNoise":
        """Trees over the nonzero part of ``sigmas``, as k-diffusion's SDE samplers use."""
        positive = [float(s) for s in sigmas if s > 0]
        if not positive:
            raise ValueError("the schedule has no nonzero sigma")
        return cls(x, min(positive), max(positive), generator, **kwargs)

    def _build(self) -> list[Any]:
        import torchsde  # lazy: only SDE sampling pays for the import

        per_tree = self.shape[1:] if self.batched else self.shape
        dtype = _tree_dtype(self.dtype)
        trees = []
        for seed, device in zip(self.seeds, self._devices):
            w0 = torch.zeros(per_tree, dtype=dtype, device=device)
            trees.append(torchsde.BrownianTree(self.sigma_min, w0, self.sigma_max, entropy=seed, tol=self.tol))
        log.debug("built %d Brownian tree(s) over [%g, %g]", len(trees), self.sigma_min, self.sigma_max)
        return trees

    def _query(self, sigma: float, sigma_next: float) -> torch.Tensor:
        # W(sigma_next) - W(sigma) in the trees' dtype, on x's device
        if self._trees is None:
            self._trees = self._build()
        lo, hi = min(sigma, sigma_next), max(sigma, sigma_next)
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to its tolerance and clamps (with a warning) the
            # schedule's own sigma_min / sigma_max that fall a hair outside; k-diffusion's
            # trees do the same, so the clamp is kept and only the warning is dropped.
            warnings.filterwarnings("ignore", message=r"Should have t", category=UserWarning)
            parts = [tree(lo, hi).to(self.device) for tree in self._trees]
        w = torch.stack(parts) if self.batched else parts[0]
        return w if sigma <= sigma_next else -w

    def increment(self, sigma: float, sigma_next: float) -> torch.Tensor:
        """W(sigma_next) - W(sigma) of each image's path (variance |sigma_next - sigma|)."""
        return self._query(float(sigma), float(sigma_next)).to(self.dtype)

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        """Unit-variance noise of the interval (sigma, sigma_next); zeros for an empty interval."""
        sigma, sigma_next = float(sigma), float(sigma_next)
        if sigma == sigma_next:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return (self._query(sigma, sigma_next) / abs(sigma_next - sigma) ** 0.5).to(self.dtype)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}, trees={len(self.seeds)})")
