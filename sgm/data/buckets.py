"""Aspect-ratio buckets and the batch sampler that serves them (deterministic, resumable, sharded).

A bucket is an output size (h, w), both multiples of ``step``, whose area does not exceed
the training resolution's area. Each image goes to the bucket whose aspect ratio is
closest to its own (in log space), so it loses as little as possible to the crop, and
every batch is drawn from a single bucket, so all tensors of a batch share one shape.

:class:`BucketBatchSampler` makes the whole epoch's list of batches from ``(seed, epoch)``
alone, hands rank ``r`` of ``world_size`` the batches ``r, r + world_size, ...`` of that
list, and can start an epoch at any batch (``start_batch``), which is how a resumed run
continues exactly where an interrupted one stopped.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)


def make_buckets(resolution: tuple[int, int], step: int, max_aspect: float = 2.0,
                 min_size: int | None = None, max_size: int | None = None) -> list[tuple[int, int]]:
    """Bucket sizes (h, w) for a training ``resolution`` (h, w), sorted by aspect ratio h / w.

    ``step`` is the model's size multiple (:mod:`sgm.networks.sizes`: VAE x UNet downsampling)
    or a multiple of it; the data module passes it (``bucket_step``, default the multiple).

    For each height h (a multiple of ``step``) the widest width w (a multiple of ``step``)
    with h * w <= the resolution's area, ``w <= max_size`` and an aspect ratio within
    ``max_aspect`` is a bucket, and so is its transpose. A bucket is dropped when another
    one has the same aspect ratio and a larger area. For 1024 x 1024, step 64 this gives
    SDXL's buckets (1024x1024, 896x1152, 832x1216, 768x1344, 704x1408, ... transposed too).
    """
    H, W = (int(v) for v in resolution)
    step = int(step)
    if step < 1:
        raise ValueError(f"bucket_step must be >= 1, got {step}")
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    for name, v in (("resolution height", H), ("resolution width", W), ("min_bucket_size", min_size),
                    ("max_bucket_size", max_size)):
        if v is not None and (v < step or v % step):
            raise ValueError(f"bucket_step {step} must divide every bucket size: {name} is {v}")
    area = H * W
    lo = min_size if min_size is not None else step
    hi = max_size if max_size is not None else int(math.sqrt(area * max_aspect)) // step * step
    if lo > hi:
        raise ValueError(f"min_bucket_size {lo} > max_bucket_size {hi}")
    found: set[tuple[int, int]] = set()
    if max(H, W) <= max_aspect * min(H, W) and lo <= min(H, W) and max(H, W) <= hi:
        found.add((H, W))
    for h in range(lo, hi + 1, step):
        w = min(area // h, hi, int(h * max_aspect)) // step * step
        if w < lo or max(h, w) > max_aspect * min(h, w) + 1e-9:
            continue
        found.add((h, w))
        found.add((w, h))
    if not found:
        raise ValueError(f"no bucket fits resolution {H}x{W} with step {step}, max_aspect {max_aspect}, "
                         f"sizes in [{lo}, {hi}]")
    best: dict[tuple[int, int], tuple[int, int]] = {}  # reduced aspect -> largest bucket of that aspect
    for h, w in found:
        g = math.gcd(h, w)
        key = (h // g, w // g)
        if key not in best or h * w > best[key][0] * best[key][1]:
            best[key] = (h, w)
    return sorted(best.values(), key=lambda b: (b[0] / b[1], b[0] * b[1]))


def aspect_error(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """|log(h / w) - log(bh / bw)|: how far a bucket's shape is from an image's."""
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def assign_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket with the closest aspect ratio (ties: the larger area, then the first)."""
    return min(range(len(buckets)), key=lambda i: (round(aspect_error(size, buckets[i]), 12),
                                                   -buckets[i][0] * buckets[i][1], i))


class BatchRequest(NamedTuple):
    """What the sampler yields: the dataset indices of one batch, the epoch and the batch's position
    in this rank's epoch. The dataset uses ``epoch`` to seed its random choices (crop, flip, caption
    dropout), so they are right in worker processes too."""

    indices: tuple[int, ...]
    epoch: int
    position: int


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BucketBatchSampler(DistributedSampler):
    """Batches of indices, each from one bucket; the order depends only on (seed, epoch).

    Use it as a DataLoader's ``sampler`` with ``batch_size=None``: it yields
    :class:`BatchRequest` objects, the dataset turns each into a list of items. It subclasses
    ``DistributedSampler`` because it *is* one (it does its own sharding), and so that
    Lightning, seeing a distributed sampler, does not replace it with its own.

    * Epoch ``e`` (``shuffle=True``): every bucket's indices are permuted and cut into
      batches (``drop_last`` drops each bucket's partial batch), then the batch order is
      permuted, with ``numpy.random.default_rng([seed, e])``. ``shuffle=False`` keeps bucket,
      index and batch order.
    * Sharding: rank ``r`` gets batches ``r, r + world_size, ...`` of the epoch's list. So that
      every rank runs the same number of steps, the list is first padded with its own first
      batches to a multiple of ``world_size`` (``drop_last=True``: cut down to one instead).
      Without padding the shards are disjoint and together cover the epoch.
    * ``rank`` / ``world_size`` default to the initialised ``torch.distributed`` group.
    * ``resume(epoch, start_batch)``: when ``epoch`` is iterated, its first ``start_batch``
      batches (of this rank) are skipped; ``len()`` stays the full epoch length, as Lightning
      expects of a resumed loader.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None,
                 epoch: int = 0, start_batch: int = 0):
        # DistributedSampler.__init__ is not called: it needs a dataset and an initialised group
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is None:
            rank, world_size = dist_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.bucket_ids = np.asarray(list(bucket_ids), dtype=np.int64)
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), bool(shuffle), int(seed), drop_last
        self.rank, self.num_replicas = int(rank), int(world_size)
        self.epoch = int(epoch)
        self.resume_epoch, self.start_batch = int(epoch), int(start_batch)
        self._groups = [np.flatnonzero(self.bucket_ids == b) for b in np.unique(self.bucket_ids)]
        n = sum(len(g) // self.batch_size if drop_last else math.ceil(len(g) / self.batch_size) for g in self._groups)
        self.num_global_batches = n
        self.num_batches = n // self.num_replicas if drop_last else math.ceil(n / self.num_replicas)
        if self.num_batches == 0:
            raise ValueError(f"no batch for rank {rank} of {world_size}: {len(self.bucket_ids)} items in "
                             f"{len(self._groups)} buckets, batch_size {batch_size}, drop_last {drop_last}")
        self.num_samples = self.num_batches  # DistributedSampler's attribute
        self.total_size = self.num_batches * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, start_batch: int) -> None:
        """Continue at batch ``start_batch`` of this rank's ``epoch``; also makes ``epoch`` the current one."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} not in [0, {self.num_batches}]")
        self.epoch = self.resume_epoch = int(epoch)
        self.start_batch = int(start_batch)

    def first_batch(self, epoch: int) -> int:
        return self.start_batch if epoch == self.resume_epoch else 0

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` (every rank's), in order, before padding."""
        rng = np.random.default_rng([self.seed, int(epoch)]) if self.shuffle else None
        batches: list[list[int]] = []
        for group in self._groups:
            idx = rng.permutation(group) if rng is not None else group
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append([int(i) for i in chunk])
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (padded / cut as described in the class docstring)."""
        batches = self.global_batches(epoch)
        total = self.num_batches * self.num_replicas
        while len(batches) < total:
            batches = batches + batches[: total - len(batches)]
        return batches[:total][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch = self.epoch
        batches = self.rank_batches(epoch)
        for pos in range(self.first_batch(epoch), len(batches)):
            yield BatchRequest(tuple(batches[pos]), epoch, pos)

    def __len__(self) -> int:
        return self.num_batches
