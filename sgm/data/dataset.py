"""The items of one split of an image folder (:class:`ImageDataset`) and their batches (:func:`collate`).

Batches are dicts::

    {image_key: [B, 3, h, w] float32 in [-1, 1],       # absent once build_cache ran
     "txt": list[str],                                   # "" where caption dropout hit
     "caption_dropped": [B] bool,
     "original_size_as_tuple": [B, 2] float32 (h, w),    # the file's size, before any resize
     "crop_coords_top_left": [B, 2] float32 (top, left), # in the resized image (SDXL paper)
     "target_size_as_tuple": [B, 2] float32 (h, w),      # the output size (the bucket)
     "aesthetic_score": [B, 1] float32,                  # 6.0 unless metadata.jsonl gives one
     "index": [B] int64, "path": list[str]}

plus, after :meth:`~sgm.data.datamodule.ImageFolderDataModule.build_cache`, the cached
tensors (e.g. ``latent``, ``crossattn``, ``vector``) in place of the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import cache as _cache
from .buckets import BatchRequest
from .records import ImageRecord
from .transforms import CropPlan, load_view, plan_crop


class ImageDataset(Dataset):
    """Items of one split. ``dataset[i]`` is item ``i`` (epoch 0); ``dataset[BatchRequest]`` is the
    list of that batch's items, with the random choices of its epoch.

    Per item, ``numpy.random.default_rng([seed, epoch, index])`` draws, always in this order,
    the caption-dropout number, the flip number and the two crop numbers, so each choice
    depends on (seed, epoch, index) only: not on workers, batch composition or other settings.
    ``train=False`` is the deterministic view: centre crop, no flip, no caption dropout.
    """

    def __init__(self, records: Sequence[ImageRecord], targets: Sequence[tuple[int, int]], *, train: bool,
                 random_crop: bool = False, flip: bool = False, caption_dropout: float = 0.0, seed: int = 0,
                 image_key: str = "jpg", aesthetic_score: float = 6.0):
        self.records, self.targets = list(records), [tuple(int(v) for v in t) for t in targets]
        self.train, self.random_crop, self.flip = train, random_crop, flip
        self.caption_dropout, self.seed, self.image_key = float(caption_dropout), int(seed), image_key
        self.aesthetic_score = float(aesthetic_score)
        self.cache_paths: list[Path] | None = None  # set by build_cache: items come from there

    def deterministic_view(self) -> ImageDataset:
        """The same records and targets with ``train=False`` (centre crop, no flip, no dropout), not cached."""
        return ImageDataset(self.records, self.targets, train=False, seed=self.seed, image_key=self.image_key,
                            aesthetic_score=self.aesthetic_score)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | BatchRequest) -> Any:
        if isinstance(key, BatchRequest):
            return [self.get_item(i, key.epoch) for i in key.indices]
        return self.get_item(int(key), 0)

    def score(self, index: int) -> float:
        """The aesthetic score of item ``index`` (its metadata's, else the dataset default)."""
        return self.records[index].score(self.aesthetic_score)

    def plan(self, index: int, epoch: int = 0, deterministic: bool = False) -> tuple[CropPlan, bool]:
        """(crop plan, caption dropped) of item ``index`` in ``epoch``."""
        rec = self.records[index]
        u = np.random.default_rng([self.seed, int(epoch), int(index)]).random(4)
        live = self.train and not deterministic
        dropped = bool(live and u[0] < self.caption_dropout)
        flip = bool(live and self.flip and u[1] < 0.5)
        return plan_crop(rec.size, self.targets[index], live and self.random_crop, flip, (u[2], u[3])), dropped

    def get_item(self, index: int, epoch: int = 0, deterministic: bool = False, decode: bool | None = None) -> dict:
        """Item ``index`` with the random choices of ``epoch``; ``decode`` reads the image even when cached."""
        rec = self.records[index]
        plan, dropped = self.plan(index, epoch, deterministic)
        cached = self.cache_paths is not None and not decode
        item: dict[str, Any] = {
            # cached text embeddings are of the real caption: keep it, the flag says what to drop
            "txt": "" if dropped and not cached else rec.caption,
            "caption_dropped": dropped,
            "original_size_as_tuple": rec.size,
            "crop_coords_top_left": plan.crop_coords,
            "target_size_as_tuple": plan.target,
            "aesthetic_score": self.score(index),
            "index": index,
            "path": rec.path,
        }
        if cached:
            item.update(_cache.read_entry(self.cache_paths[index]))
        else:
            item[self.image_key] = load_view(rec.path, plan)
        return item


def collate(items: list[dict]) -> dict[str, Any]:
    """Items -> the batch dict of the module docstring (tensors stacked, strings listed)."""
    out: dict[str, Any] = {
        "txt": [it["txt"] for it in items],
        "caption_dropped": torch.tensor([it["caption_dropped"] for it in items], dtype=torch.bool),
        "original_size_as_tuple": torch.tensor([it["original_size_as_tuple"] for it in items], dtype=torch.float32),
        "crop_coords_top_left": torch.tensor([it["crop_coords_top_left"] for it in items], dtype=torch.float32),
        "target_size_as_tuple": torch.tensor([it["target_size_as_tuple"] for it in items], dtype=torch.float32),
        "aesthetic_score": torch.tensor([[it["aesthetic_score"]] for it in items], dtype=torch.float32),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "path": [it["path"] for it in items],
    }
    for k in items[0]:
        if k not in out:
            out[k] = torch.stack([it[k] for it in items])
    return out
