"""Training images from a folder: discovery, up-front validation, SDXL size conditioning,
aspect-ratio buckets, caption dropout, a held-out split, an on-disk encoding cache, exact
resume and DDP sharding, as one LightningDataModule (:class:`ImageFolderDataModule`).

Batches are dicts::

    {image_key: [B, 3, h, w] float32 in [-1, 1],       # absent once build_cache ran
     "txt": list[str],                                   # "" where caption dropout hit
     "caption_dropped": [B] bool,
     "original_size_as_tuple": [B, 2] float32 (h, w),    # the file's size, before any resize
     "crop_coords_top_left": [B, 2] float32 (top, left), # in the resized image (SDXL paper)
     "target_size_as_tuple": [B, 2] float32 (h, w),      # the output size (the bucket)
     "aesthetic_score": [B, 1] float32,                  # 6.0 unless metadata.jsonl gives one
     "index": [B] int64, "path": list[str]}

plus, after :meth:`ImageFolderDataModule.build_cache`, the cached tensors (e.g. ``latent``,
``crossattn``, ``vector``) in place of the image.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from . import cache as _cache
from .buckets import BatchRequest, BucketBatchSampler, assign_bucket, dist_rank_world, make_buckets

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESAMPLE = Image.Resampling.LANCZOS
_VIEW_VERSION = "v1"  # bump when the pixels a view produces change (resize filter, conversion)


class SkipImage(Exception):
    """An image file that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: its file, caption and displayed size (EXIF orientation applied)."""

    path: str  # absolute
    relpath: str  # relative to its root, POSIX separators
    caption: str
    height: int
    width: int
    file_size: int
    mtime_ns: int
    aesthetic_score: float | None = None
    has_caption: bool = True

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


# -- discovery ---------------------------------------------------------------------------
def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, symlinks followed once), sorted by relative path.
    Hidden files and folders (name starting with ".") are ignored."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_metadata(root: Path, name: str | None) -> dict[Path, dict]:
    """Every ``name`` file under ``root`` (HF imagefolder: JSON lines with ``file_name``
    relative to the metadata file's folder, and ``text`` or ``caption``)."""
    out: dict[Path, dict] = {}
    if not name:
        return out
    for meta in sorted(root.rglob(name)):
        for n, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[(meta.parent / row["file_name"]).resolve()] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                log.warning("%s line %d ignored: %s", meta, n, e if not isinstance(e, KeyError) else "no file_name")
    return out


def inspect_image(path: Path, min_size: int | None = None, full: bool = True) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), or :class:`SkipImage`.

    PIL's ``verify()`` (structure, PNG checksums), then a re-open for the size; ``full``
    also decodes the pixels (at reduced JPEG scale, fast), which catches truncated files
    that ``verify()`` lets through."""
    try:
        if os.path.getsize(path) == 0:
            raise SkipImage("empty file")
        with Image.open(path) as im:
            im.verify()
    except SkipImage:
        raise
    except Exception as e:
        raise SkipImage(f"not a valid image ({type(e).__name__}: {e})") from None
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:
                orientation = 1
            if full:
                im.draft(None, (max(1, w // 8), max(1, h // 8)))
                im.load()
    except Exception as e:
        raise SkipImage(f"cannot be decoded ({type(e).__name__}: {e})") from None
    if orientation in (5, 6, 7, 8):
        h, w = w, h
    if h < 1 or w < 1:
        raise SkipImage(f"empty image ({w}x{h})")
    if min_size is not None and min(h, w) < min_size:
        raise SkipImage(f"too small: {w}x{h} (w x h), short side below min_size {min_size}")
    return h, w


def scan_folder(root: str | Path, caption_ext: str = ".txt", metadata: str | None = "metadata.jsonl",
                min_size: int | None = None, full_check: bool = True, workers: int | None = None
                ) -> tuple[list[ImageRecord], list[tuple[str, str]]]:
    """(usable records sorted by relative path, skipped (path, reason)); warns once per skipped file."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    paths = find_images(root)
    meta = read_metadata(root, metadata)
    workers = workers or min(8, os.cpu_count() or 1)

    def check(p: Path):
        try:
            return inspect_image(p, min_size, full_check)
        except SkipImage as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, paths))
    records, skipped = [], []
    for p, res in zip(paths, results):
        if isinstance(res, SkipImage):
            log.warning("skipping image %s: %s", p, res)
            skipped.append((str(p), str(res)))
            continue
        side = p.with_suffix(caption_ext) if caption_ext else None
        row = meta.get(p.resolve(), {})
        caption, has = "", True
        if side is not None and side.is_file():
            caption = side.read_text(encoding="utf-8", errors="replace").strip()
        elif row.get("text") is not None or row.get("caption") is not None:
            caption = str(row["text"] if row.get("text") is not None else row["caption"]).strip()
        else:
            has = False
        score = row.get("aesthetic_score")
        try:
            score = None if score is None else float(score)
        except (TypeError, ValueError):
            log.warning("%s: aesthetic_score %r in %s is not a number; default used", p, score, metadata)
            score = None
        st = p.stat()
        records.append(ImageRecord(str(p), p.relative_to(root).as_posix(), caption, res[0], res[1], st.st_size,
                                   st.st_mtime_ns, score, has))
    if skipped:
        log.warning("%d of %d image files under %s skipped (unreadable, corrupt or too small)",
                    len(skipped), len(paths), root)
    missing = sum(not r.has_caption for r in records)
    if missing:
        log.warning("%d of %d images under %s have no caption (%s file or %s entry): empty caption used",
                    missing, len(records), root, caption_ext, metadata)
    if not records:
        what = f"{len(skipped)} image files, all skipped" if paths else f"no {'/'.join(IMAGE_EXTENSIONS)} files"
        raise RuntimeError(f"no usable training image under {root} ({what})")
    return records, skipped


# -- pixels ------------------------------------------------------------------------------
def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, 8 bit; transparency composited on white; 16-bit and float grey scaled to 8 bit."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif im.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        im = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


@dataclass(frozen=True)
class CropPlan:
    """How an image of ``original`` (h, w) becomes ``target`` (h, w): resize to ``resized``
    (the smallest size covering the target, aspect kept), crop at (``top``, ``left``), then
    mirror if ``flip``. ``crop_coords`` is the conditioning value: (top, left) of the crop in
    the resized image, as it would be for the mirrored resized image when ``flip``."""

    original: tuple[int, int]
    resized: tuple[int, int]
    target: tuple[int, int]
    top: int
    left: int
    flip: bool = False

    @property
    def crop_coords(self) -> tuple[int, int]:
        if self.flip:
            return self.top, self.resized[1] - self.target[1] - self.left
        return self.top, self.left


def plan_crop(original: tuple[int, int], target: tuple[int, int], random_crop: bool = False, flip: bool = False,
              u: tuple[float, float] = (0.5, 0.5)) -> CropPlan:
    """Resize so the image covers ``target`` (short side match), then crop: centred
    (``(resized - target) // 2``) or at ``u`` (two numbers in [0, 1)) of the free range."""
    h, w = original
    th, tw = target
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if random_crop:
        top, left = min(int(u[0] * (rh - th + 1)), rh - th), min(int(u[1] * (rw - tw + 1)), rw - tw)
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    return CropPlan((h, w), (rh, rw), (th, tw), top, left, flip)


def load_view(path: str, plan: CropPlan) -> torch.Tensor:
    """The pixels of ``plan`` for ``path``: [3, h, w] float32 in [-1, 1]."""
    try:
        with Image.open(path) as im:
            rh, rw = plan.resized
            try:
                swap = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            except Exception:
                swap = False
            if im.format == "JPEG":  # decode at reduced DCT scale when much larger than needed
                im.draft(None, (rh, rw) if swap else (rw, rh))
            im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
            if im.size != (rw, rh):
                im = im.resize((rw, rh), resample=RESAMPLE, reducing_gap=3.0)
            th, tw = plan.target
            im = im.crop((plan.left, plan.top, plan.left + tw, plan.top + th))
            if plan.flip:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            arr = np.array(im, dtype=np.uint8)
    except Exception as e:
        raise RuntimeError(f"cannot load training image {path} (it passed validation at setup; was it changed?): "
                           f"{type(e).__name__}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# -- dataset -----------------------------------------------------------------------------
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

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | BatchRequest) -> Any:
        if isinstance(key, BatchRequest):
            return [self.get_item(i, key.epoch) for i in key.indices]
        return self.get_item(int(key), 0)

    def plan(self, index: int, epoch: int = 0, deterministic: bool = False) -> tuple[CropPlan, bool]:
        """(crop plan, caption dropped) of item ``index`` in ``epoch``."""
        rec = self.records[index]
        u = np.random.default_rng([self.seed, int(epoch), int(index)]).random(4)
        live = self.train and not deterministic
        dropped = bool(live and u[0] < self.caption_dropout)
        flip = bool(live and self.flip and u[1] < 0.5)
        return plan_crop(rec.size, self.targets[index], live and self.random_crop, flip, (u[2], u[3])), dropped

    def get_item(self, index: int, epoch: int = 0, deterministic: bool = False, decode: bool | None = None) -> dict:
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
            "aesthetic_score": self.aesthetic_score if rec.aesthetic_score is None else rec.aesthetic_score,
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


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`BucketBatchSampler` that counts the batches it has handed
    out (``position`` = (epoch, batches of that epoch consumed)) and is ``state_dict`` /
    ``load_state_dict``-able through its data module, so Lightning treats it as resumable."""

    def __init__(self, *args: Any, state_owner: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.state_owner = state_owner
        self.position: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing (no worker prefetch either) starts before the first next(), so a
        # set_epoch() after iter() and before the first batch is still honoured
        sampler = self.sampler
        epoch = sampler.epoch
        self.position = (epoch, sampler.first_batch(epoch))
        for batch in super().__iter__():
            self.position = (epoch, self.position[1] + 1)
            yield batch

    def state_dict(self) -> dict:
        return self.state_owner.state_dict() if self.state_owner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.state_owner is not None and state:
            self.state_owner.load_state_dict(state)


# -- the data module ---------------------------------------------------------------------
def _hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, (int, np.integer)):
        return int(resolution), int(resolution)
    h, w = (int(v) for v in resolution)
    return h, w


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

    Randomness (crop, flip, ``caption_dropout``, shuffling) depends on (``seed``, epoch,
    item) only. The held-out set is ``val_root``, or the ``val_fraction`` of images with the
    smallest hash of (seed, relative path): stable, disjoint from training. ``val_dataloader``
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
    which replaces the sampler.

    Cache: with ``cache_dir``, :meth:`build_cache` encodes each item's deterministic view once
    and the loaders then serve the stored tensors (see its docstring).
    """

    def __init__(
        self,
        root: str,
        resolution: int | Sequence[int] = 1024,
        buckets: bool = False,
        bucket_step: int = 64,
        min_bucket_size: int | None = None,
        max_bucket_size: int | None = None,
        max_aspect: float = 2.0,
        random_crop: bool = False,
        flip: bool = False,
        caption_dropout: float = 0.0,
        caption_ext: str = ".txt",
        metadata: str | None = "metadata.jsonl",
        min_size: int | None = None,
        val_fraction: float = 0.0,
        val_root: str | None = None,
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
    ):
        super().__init__()
        if root is None or str(root) in ("", "???"):
            raise ValueError("ImageFolderDataModule needs root: the folder of training images")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction and val_root:
            raise ValueError("give val_fraction or val_root, not both")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {val_batch_size}")
        if cache_dir is not None and (random_crop or flip):
            raise ValueError(
                "cache_dir stores one fixed view per image (centre crop, not mirrored), so random_crop=True "
                "and flip=True cannot be honoured with it: turn them off or set cache_dir=null")
        self.root = str(root)
        self.resolution = _hw(resolution)
        self.buckets = bool(buckets)
        self.bucket_step, self.max_aspect = int(bucket_step), float(max_aspect)
        self.min_bucket_size, self.max_bucket_size = min_bucket_size, max_bucket_size
        if self.buckets:
            self.bucket_sizes = make_buckets(self.resolution, self.bucket_step, self.max_aspect,
                                             min_bucket_size, max_bucket_size)
        else:
            self.bucket_sizes = [self.resolution]
        self.random_crop, self.flip, self.caption_dropout = bool(random_crop), bool(flip), float(caption_dropout)
        self.caption_ext, self.metadata, self.min_size = caption_ext, metadata, min_size
        self.val_fraction, self.val_root, self.seed = float(val_fraction), val_root, int(seed)
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
        records, skipped = scan_folder(self.root, **kw)
        val: list[ImageRecord] = []
        if self.val_root:
            val, vskipped = scan_folder(self.val_root, **kw)
            skipped = skipped + vskipped
        elif self.val_fraction > 0:
            records, val = split_records(records, self.val_fraction, self.seed)
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
            start, rem = divmod(self._resume["global_batches"], sampler.num_replicas)
            if rem:
                log.warning("resuming on %d ranks from a state saved with another world size: batch position "
                            "rounded down (%d batches are repeated)", sampler.num_replicas, rem)
            sampler.resume(self._resume["epoch"], min(start, len(sampler)))
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
            sampler = self._train_loader.sampler
            sampler.resume(self._resume["epoch"],
                           min(self._resume["global_batches"] // sampler.num_replicas, len(sampler)))
            self._train_loader.position = None

    # -- cache -----------------------------------------------------------------------------
    def cache_key(self, dataset: ImageDataset, index: int, tag: str = "") -> str:
        rec = dataset.records[index]
        plan, _ = dataset.plan(index, deterministic=True)
        return _cache.entry_key({
            "path": rec.path, "file_size": rec.file_size, "mtime_ns": rec.mtime_ns, "view": _VIEW_VERSION,
            "resample": RESAMPLE.name, "target": list(plan.target), "crop": [plan.top, plan.left], "flip": False,
            "original": list(plan.original), "caption": rec.caption,
            "aesthetic_score": dataset.aesthetic_score if rec.aesthetic_score is None else rec.aesthetic_score,
            "tag": tag,
        })

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
            if dataset is None:
                continue
            view = ImageDataset(dataset.records, dataset.targets, train=False, seed=self.seed,
                                image_key=self.image_key, aesthetic_score=self.aesthetic_score)
            paths = [_cache.entry_path(self.cache_dir, self.cache_key(dataset, i, tag)) for i in range(len(dataset))]
            if world > 1:  # every rank sees the same missing entries before anyone writes
                torch.distributed.barrier()
            todo = [i for i, p in enumerate(paths) if not _cache.is_valid(p)]
            stats["reused"] += len(paths) - len(todo)
            mine = todo[rank::world]
            requests, by_target = [], {}
            for i in mine:
                by_target.setdefault(dataset.targets[i], []).append(i)
            for group in by_target.values():
                requests += [BatchRequest(tuple(group[s : s + batch_size]), 0, 0) for s in range(0, len(group), batch_size)]
            for batch in self._loader(view, requests):
                out = encode(batch)
                if not isinstance(out, Mapping) or not out:
                    raise TypeError(f"encode must return a non-empty dict of tensors, got {type(out).__name__}")
                n = len(batch["index"])
                for key, value in out.items():
                    if not torch.is_tensor(value) or value.ndim < 1 or value.shape[0] != n:
                        raise TypeError(f"encode output {key!r} must be a tensor with batch size {n} first, got "
                                        f"{getattr(value, 'shape', type(value).__name__)}")
                for j, i in enumerate(batch["index"].tolist()):
                    _cache.write_entry(paths[i], {k: v[j] for k, v in out.items()},
                                       {"path": dataset.records[i].path, "tag": tag})
                stats["encoded"] += n
            if world > 1:
                torch.distributed.barrier()
            missing = [dataset.records[i].path for i, p in enumerate(paths) if not _cache.is_valid(p)]
            if missing:
                raise RuntimeError(f"{len(missing)} cache entries missing after build_cache, e.g. {missing[0]}")
            dataset.cache_paths = paths
        self.cache_stats = stats
        log.info("cache %s: %d items encoded, %d reused", self.cache_dir, stats["encoded"], stats["reused"])
        return stats


def split_records(records: Sequence[ImageRecord], fraction: float, seed: int
                  ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held out): the round(fraction * n) records (at least 1) with the smallest
    sha256(seed, relative path). Depends on seed and relative paths only, so the same images
    are held out wherever the folder lives, in every run and on every rank."""
    n = len(records)
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"val_fraction {fraction} of {n} images leaves no training image")
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{records[i].relpath}".encode()).hexdigest())
    held = set(rank[:k])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
