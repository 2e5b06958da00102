"""Training images from a folder for ``Trainer.fit``: :class:`ImageFolderDataModule` (discovery
and checks, SDXL size conditioning, aspect-ratio buckets, caption dropout, a held-out split,
an on-disk encoding cache, exact resume and DDP sharding). The batch format is described in
:mod:`sgm.data.dataset`."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..diffusion._checks import check_bool, check_int
from ..networks.sizes import check_pixel_size
from . import cache as _cache
from .buckets import BucketBatchSampler, assign_bucket, dist_rank_world, make_buckets
from .captions import check_caption_ext
from .dataset import ImageDataset, collate
from .loader import ResumableDataLoader
from .records import ImageRecord, scan_folder, split_records

log = logging.getLogger(__name__)


def _hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    """An int or [h, w] resolution as (h, w)."""
    if isinstance(resolution, (int, np.integer)):
        return int(resolution), int(resolution)
    h, w = (int(v) for v in resolution)
    return h, w


def _bucket_step(bucket_step: int | None, size_multiple: int) -> int:
    """The bucket step: ``size_multiple`` (the model's) by default, else a multiple of it (one size rule)."""
    if bucket_step is None:
        return size_multiple
    step = check_int("bucket_step", bucket_step)
    if step % size_multiple:
        raise ValueError(f"bucket_step {step} must be a multiple of {size_multiple}, the model's size multiple "
                         f"(VAE x UNet downsampling): try {-(-step // size_multiple) * size_multiple} or null")
    return step


AUTO_VAL_FRACTION = 0.1  # the held-out share when val_fraction is None (enough images, no val_root)


class ImageFolderDataModule(L.LightningDataModule):
    """Images (png/jpg/jpeg/webp/bmp, recursive) and captions under ``root`` for ``Trainer.fit``.

    Captions: ``name.txt`` beside ``name.jpg`` (``caption_ext``), else the ``text`` (or
    ``caption``) of ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}`` in any folder
    (HF imagefolder convention; ``file_name`` relative to that folder; an optional
    ``aesthetic_score`` there overrides ``aesthetic_score``), else "" (counted and logged).

    ``setup()`` opens and checks every file once, on every rank (deterministically, so all
    ranks agree): corrupt, truncated, empty or too small (short side < ``min_size``) files are
    skipped with a warning naming file and reason, listed in ``self.skipped`` as (path,
    reason), and counted in one summary line. Nothing usable raises an error naming ``root``.

    Each image is resized to cover its target size (aspect kept), then cropped to it
    (centred, or at a random place with ``random_crop``) and mirrored with probability 1/2
    with ``flip``. The batch records the file's size, the crop's (top, left) in the resized
    image and the target size, SDXL's size conditioning; a mirrored image gets the crop
    coordinates of its crop within the mirrored resized image (``resized_w - w - left``).
    The target is ``resolution`` (int or [h, w]) or, with ``buckets``, the aspect-ratio
    bucket (multiples of ``bucket_step``, area <= resolution's, aspect <= ``max_aspect``,
    sides within [``min_bucket_size``, ``max_bucket_size``]) closest to the image's aspect.
    ``size_multiple`` is the model's size multiple (VAE x UNet downsampling,
    :func:`sgm.networks.sizes.config_pixel_multiple`; train.py passes it): ``resolution`` must
    be a multiple of it, and so must ``bucket_step``, which defaults to it.

    Errors name the parameter (``batch_size must be ...``, ``root '/x' does not exist``), so
    that a task can prefix its config node (``data.``).

    Randomness (crop, flip, ``caption_dropout``, shuffling) depends on (``seed``, epoch,
    item) only. The held-out set is ``val_root``, or the ``val_fraction`` of images with the
    smallest hash of (seed, relative path): stable, disjoint from training. ``val_fraction=None``
    (conf/data/image_folder.yaml's default) is :data:`AUTO_VAL_FRACTION` of a folder of at least
    ``val_min_images`` images, and none for a smaller folder or with ``val_root``. ``val_dataloader``
    is the deterministic view (centre crop, no flip, no dropout, fixed order).

    Resume: ``state_dict()`` = {"epoch", "batches_consumed", ...}: the epoch in progress and
    how many of its batches (per rank) were trained on; after ``load_state_dict`` the train
    loader starts that epoch at that batch, so the run continues with exactly the batches an
    uninterrupted run would have seen. Lightning saves / restores it with checkpoints; while a
    trainer is fitting, the count is its own (batches processed), else the loader's.

    DDP: every rank builds the same epoch batch list from (seed, epoch) and takes batches
    ``rank, rank + world_size, ...`` (see :class:`~sgm.data.buckets.BucketBatchSampler`);
    rank and world size come from ``rank`` / ``world_size`` if given, else the attached
    trainer, else ``torch.distributed``. Every rank runs the same number of steps: the epoch's
    list is padded with its own first batches to a multiple of world_size (``drop_last``: cut
    instead), so only padded batches appear twice. The held-out loader is sharded the same
    way. The sampler is a ``DistributedSampler``, so Lightning keeps it
    (``use_distributed_sampler`` may stay on). Not supported: ``Trainer(overfit_batches=...)``,
    which replaces the sampler (train.py runs it as ``limit_train_batches`` with ``shuffle=False``:
    :func:`sgm.tasks.debug.apply_overfit`).

    Cache: with ``cache_dir``, :meth:`build_cache` encodes each item's deterministic view once
    and the loaders then serve the stored tensors (see its docstring).
    """

    def __init__(
        self,
        root: str,
        resolution: int | Sequence[int] = 1024,
        buckets: bool = False,
        bucket_step: int | None = None,
        min_bucket_size: int | None = None,
        max_bucket_size: int | None = None,
        max_aspect: float = 2.0,
        random_crop: bool = False,
        flip: bool = False,
        caption_dropout: float = 0.0,
        caption_ext: str = ".txt",
        metadata: str | None = "metadata.jsonl",
        min_size: int | None = None,
        val_fraction: float | None = 0.0,
        val_root: str | None = None,
        val_min_images: int = 20,
        seed: int = 0,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        image_key: str = "jpg",
        cache_dir: str | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        aesthetic_score: float = 6.0,
        full_check: bool = True,
        check_workers: int | None = None,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        size_multiple: int = 1,
    ):
        super().__init__()
        if root is None or str(root) in ("", "???"):
            raise ValueError("root is not set: give the folder of training images")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1) (or null: {AUTO_VAL_FRACTION} of a large enough "
                             f"folder), got {val_fraction}")
        if val_fraction and val_root:
            raise ValueError("val_fraction and val_root are both set: give one of them")
        for name, flag in (("buckets", buckets), ("random_crop", random_crop), ("flip", flip), ("shuffle", shuffle),
                           ("drop_last", drop_last), ("full_check", full_check), ("pin_memory", pin_memory)):
            check_bool(name, flag)  # a string such as "no" would read as true
        caption_ext = check_caption_ext(caption_ext)
        batch_size = check_int("batch_size", batch_size)
        val_batch_size = None if val_batch_size is None else check_int("val_batch_size", val_batch_size)
        num_workers = check_int("num_workers", num_workers, minimum=0)
        self.val_min_images = check_int("val_min_images", val_min_images)
        if cache_dir is not None and (random_crop or flip):
            raise ValueError(
                "cache_dir stores one fixed view per image (centre crop, not mirrored), so random_crop=True "
                "and flip=True cannot be honoured with it: turn them off or set cache_dir=null")
        self.root = str(root)
        self.size_multiple = check_int("size_multiple", size_multiple)
        self.resolution = check_pixel_size(*_hw(resolution), self.size_multiple, ("resolution height", "width"))
        self.buckets = bool(buckets)
        self.bucket_step, self.max_aspect = _bucket_step(bucket_step, self.size_multiple), float(max_aspect)
        self.min_bucket_size, self.max_bucket_size = min_bucket_size, max_bucket_size
        if self.buckets:
            self.bucket_sizes = make_buckets(self.resolution, self.bucket_step, self.max_aspect,
                                             min_bucket_size, max_bucket_size)
        else:
            self.bucket_sizes = [self.resolution]
        self.random_crop, self.flip, self.caption_dropout = bool(random_crop), bool(flip), float(caption_dropout)
        self.caption_ext, self.metadata, self.min_size = caption_ext, metadata, min_size
        self.val_fraction = None if val_fraction is None else float(val_fraction)
        self.val_root, self.seed = val_root, int(seed)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or batch_size)
        self.num_workers, self.image_key, self.shuffle, self.drop_last = int(num_workers), image_key, shuffle, drop_last
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.aesthetic_score, self.full_check, self.check_workers = float(aesthetic_score), full_check, check_workers
        self.pin_memory, self.rank, self.world_size = pin_memory, rank, world_size
        self.skipped: list[tuple[str, str]] = []
        self.missing_captions: list[str] = []
        self.train_records: list[ImageRecord] = []
        self.val_records: list[ImageRecord] = []
        self.train_dataset: ImageDataset | None = None
        self.val_dataset: ImageDataset | None = None
        self.cache_stats: dict[str, int] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._resume: dict | None = None  # {"epoch", "global_batches"} from load_state_dict

    # -- setup -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Scan and check the folders once (later calls do nothing)."""
        if self.train_dataset is not None:
            return
        kw = dict(caption_ext=self.caption_ext, metadata=self.metadata, min_size=self.min_size,
                  full_check=self.full_check, workers=self.check_workers)
        records, skipped = scan_folder(self.root, name="root", **kw)
        val: list[ImageRecord] = []
        if self.val_root:
            val, vskipped = scan_folder(self.val_root, name="val_root", **kw)
            skipped = skipped + vskipped
        elif (fraction := self._held_out_fraction(len(records))) > 0:
            records, val = split_records(records, fraction, self.seed)
        self.skipped = skipped
        self.missing_captions = [r.path for r in records + val if not r.has_caption]
        self.train_records, self.val_records = records, val
        common = dict(seed=self.seed, image_key=self.image_key, aesthetic_score=self.aesthetic_score)
        self.train_dataset = ImageDataset(records, self._targets(records), train=True, random_crop=self.random_crop,
                                          flip=self.flip, caption_dropout=self.caption_dropout, **common)
        self.val_dataset = ImageDataset(val, self._targets(val), train=False, **common) if val else None
        log.info("%s: %d training and %d held-out images from %s, %d skipped, %d without caption, %d bucket(s)",
                 type(self).__name__, len(records), len(val), self.root, len(skipped), len(self.missing_captions),
                 len({t for t in self.train_dataset.targets}))

    def _held_out_fraction(self, n: int) -> float:
        """The share of ``n`` scanned images to hold out (no ``val_root``): ``val_fraction``, or for
        None :data:`AUTO_VAL_FRACTION` from ``val_min_images`` images on."""
        if self.val_fraction is not None:
            return self.val_fraction
        if n >= self.val_min_images:
            return AUTO_VAL_FRACTION
        log.info("%d images under %s (fewer than val_min_images=%d): none held out, so no validation loss; "
                 "data.val_fraction=0.1 holds out some anyway, data.val_root=DIR uses another folder",
                 n, self.root, self.val_min_images)
        return 0.0

    def _targets(self, records: Sequence[ImageRecord]) -> list[tuple[int, int]]:
        return [self.bucket_sizes[assign_bucket(r.size, self.bucket_sizes)] for r in records]

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            self.setup("fit")

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            return int(self.rank or 0), int(self.world_size or 1)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return dist_rank_world()

    # -- loaders ---------------------------------------------------------------------------
    def _sampler(self, dataset: ImageDataset, batch_size: int, train: bool) -> BucketBatchSampler:
        rank, world = self._rank_world()
        return BucketBatchSampler([self.bucket_sizes.index(t) for t in dataset.targets], batch_size,
                                  shuffle=train and self.shuffle, seed=self.seed, drop_last=train and self.drop_last,
                                  rank=rank, world_size=world)

    def _loader(self, dataset: ImageDataset, sampler: BucketBatchSampler, cls: type = DataLoader, **kw: Any):
        return cls(dataset, sampler=sampler, batch_size=None, collate_fn=collate, num_workers=self.num_workers,
                   pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, **kw)

    def train_dataloader(self) -> ResumableDataLoader:
        self._require_setup()
        sampler = self._sampler(self.train_dataset, self.batch_size, train=True)
        if self._resume is not None:
            rem = self._resume_sampler(sampler)
            if rem:
                log.warning("resuming on %d ranks from a state saved with another world size: batch position "
                            "rounded down (%d batches are repeated)", sampler.num_replicas, rem)
        self._train_loader = self._loader(self.train_dataset, sampler, ResumableDataLoader, state_owner=self)
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self._sampler(self.val_dataset, self.val_batch_size, train=False))

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"epoch": e, "batches_consumed": k, ...}: the train loader continues at batch k (of each
        rank) of epoch e. A finished epoch is saved as (e + 1, 0)."""
        epoch, consumed = self._position()
        _, world = self._rank_world()
        loader = self._train_loader
        per_epoch = len(loader.sampler) if loader is not None else None
        limit = getattr(getattr(self, "trainer", None), "num_training_batches", None)
        if per_epoch is not None and isinstance(limit, int) and 0 < limit < per_epoch:
            per_epoch = limit  # limit_train_batches ends Lightning's epochs early
        if per_epoch is not None and consumed >= per_epoch:
            epoch, consumed = epoch + 1, 0
        return {"epoch": int(epoch), "batches_consumed": int(consumed), "world_size": world, "seed": self.seed,
                "batch_size": self.batch_size, "num_train_items": len(self.train_records),
                "batches_per_epoch": per_epoch}

    def _position(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        fit_loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
        if fit_loop is not None and self._train_loader is not None and getattr(trainer.state, "fn", None) == "fit":
            # Lightning's own counters: ``completed`` epochs is the one in progress (it is counted
            # after on_train_epoch_end); between on_train_epoch_start and the first batch the batch
            # counter still holds the previous epoch's value, hence the started > completed test.
            epochs = fit_loop.epoch_progress.current
            in_epoch = epochs.started > epochs.completed
            return epochs.completed, fit_loop.epoch_loop.batch_progress.current.processed if in_epoch else 0
        if self._train_loader is not None and self._train_loader.position is not None:
            return self._train_loader.position
        if self._resume is not None:
            _, world = self._rank_world()
            return self._resume["epoch"], self._resume["global_batches"] // world
        return 0, 0

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at ``state``'s position (applies to the current train loader too, if any)."""
        if not state:
            return
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                          ("num_train_items", len(self.train_records) if self.train_dataset is not None else None)):
            if mine is not None and state.get(key) is not None and state[key] != mine:
                log.warning("data state was saved with %s=%s, now %s: the resumed batches will differ from the "
                            "interrupted run's", key, state[key], mine)
        self._resume = {"epoch": int(state["epoch"]),
                        "global_batches": int(state["batches_consumed"]) * int(state.get("world_size") or 1)}
        if self._train_loader is not None:
            self._resume_sampler(self._train_loader.sampler)
            self._train_loader.position = None

    def _resume_sampler(self, sampler: BucketBatchSampler) -> int:
        """Point ``sampler`` at the saved position (this rank's share of the global batch count,
        at most the epoch's length); returns the global batches that did not divide evenly."""
        start, rem = divmod(self._resume["global_batches"], sampler.num_replicas)
        sampler.resume(self._resume["epoch"], min(start, len(sampler)))
        return rem

    # -- cache -----------------------------------------------------------------------------
    def cache_key(self, dataset: ImageDataset, index: int, tag: str = "") -> str:
        """The cache entry key of item ``index`` of ``dataset`` (see :func:`sgm.data.cache.item_key`)."""
        return _cache.item_key(dataset, index, tag)

    def build_cache(self, encode: Callable[[dict], Mapping[str, torch.Tensor]], batch_size: int | None = None,
                    tag: str = "") -> dict[str, int]:
        """Encode every train and held-out item's deterministic view (centre crop, no flip, real
        caption) once, store it in ``cache_dir`` and serve it from then on.

        ``encode(batch) -> {name: Tensor [B, ...]}`` gets a batch dict as the loaders make it
        (one target size per batch, at most ``batch_size`` items, default the module's) and
        returns per-item tensors, e.g. ``latent``, ``crossattn``, ``vector``. Each item is
        stored as ``cache_dir/<h[:2]>/<h>.safetensors``, ``h`` the hash of the file (path,
        size, mtime), the view (size, crop, resize filter), caption, aesthetic score and
        ``tag`` (name your encoders there). Valid entries are reused (not encoded again);
        writes are atomic. Afterwards batches hold those tensors plus txt, sizes,
        aesthetic_score, index, path, caption_dropped, and no image.

        Caption dropout with a cache: the stored text embeddings belong to the real caption,
        so ``txt`` keeps the caption and ``caption_dropped`` ([B] bool, same seeded draw as
        without cache) says which items the caller should treat as unconditional (e.g. zero
        their text embeddings, as SDXL's unconditional branch does).

        Under ``torch.distributed`` each rank encodes every world_size-th missing item and
        all ranks wait for each other (barrier) before serving. Returns
        ``{"encoded": n, "reused": m}`` (also ``self.cache_stats``).
        """
        if self.cache_dir is None:
            raise RuntimeError("build_cache needs cache_dir")
        self._require_setup()
        batch_size = int(batch_size or self.batch_size)
        rank, world = dist_rank_world()
        stats = {"encoded": 0, "reused": 0}
        for dataset in (self.train_dataset, self.val_dataset):
            if dataset is not None:
                got = _cache.cache_dataset(dataset, self.cache_dir, encode, batch_size, tag, self._loader, rank, world)
                stats = {key: stats[key] + got[key] for key in stats}
        self.cache_stats = stats
        log.info("cache %s: %d items encoded, %d reused", self.cache_dir, stats["encoded"], stats["reused"])
        return stats
