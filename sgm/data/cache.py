"""On-disk cache of encoded training items: one safetensors file per item.

An entry's name is a hash of everything its tensors depend on: the image file (absolute
path, byte size, modification time), the view of it that was encoded (target size, crop,
flip, resize filter), the caption (text embeddings depend on it) and a caller's ``tag``
(name the encoder there: a new VAE or text encoder needs a new tag or a new cache_dir).
Change any of them and the item gets a new name, so a stale entry is never read; it is
simply left behind. Files are written to a temporary name and renamed (atomic on POSIX),
so a crashed or concurrent writer never leaves a half-written entry under a valid name.

:func:`item_key` names the entry of a dataset item; :func:`cache_dataset` encodes the missing
entries of a dataset (sharded over ``torch.distributed`` ranks) and makes it serve them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .buckets import BatchRequest
from .transforms import RESAMPLE, VIEW_VERSION

if TYPE_CHECKING:
    from .dataset import ImageDataset

CACHE_FORMAT = "sgm-item-cache-1"


def entry_key(fields: Mapping[str, Any]) -> str:
    """sha256 (hex) of the JSON of ``fields`` (sorted keys)."""
    blob = json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def entry_path(cache_dir: str | Path, key: str) -> Path:
    """``cache_dir/ab/abcdef....safetensors`` (two-level, so no folder gets millions of files)."""
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def is_valid(path: Path) -> bool:
    """The entry exists, its header parses and it was written by this format."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta.get("format") == CACHE_FORMAT and len(list(f.keys())) > 0
    except Exception:  # missing, truncated, not safetensors
        return False


def write_entry(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    from ..checkpoint import write_safetensors

    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": CACHE_FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    write_safetensors(data, path, meta)


def read_entry(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an entry; a clear error (delete it, build again) when it cannot be read."""
    try:
        return load_file(str(path))
    except Exception as e:
        raise RuntimeError(f"cache entry {path} cannot be read ({e}); delete it and run build_cache again") from e


# -- dataset items -------------------------------------------------------------------------
def item_key(dataset: ImageDataset, index: int, tag: str = "") -> str:
    """The entry key of item ``index``'s deterministic view (centre crop, no flip, real caption)."""
    rec = dataset.records[index]
    plan, _ = dataset.plan(index, deterministic=True)
    return entry_key({
        "path": rec.path, "file_size": rec.file_size, "mtime_ns": rec.mtime_ns, "view": VIEW_VERSION,
        "resample": RESAMPLE.name, "target": list(plan.target), "crop": [plan.top, plan.left], "flip": False,
        "original": list(plan.original), "caption": rec.caption, "aesthetic_score": dataset.score(index),
        "tag": tag,
    })


def batch_requests(indices: Iterable[int], targets: Sequence[tuple[int, int]], batch_size: int) -> list[BatchRequest]:
    """``indices`` as batches of at most ``batch_size`` items of one target size each (in order of appearance)."""
    by_target: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        by_target.setdefault(tuple(targets[i]), []).append(i)
    return [BatchRequest(tuple(group[s : s + batch_size]), 0, 0)
            for group in by_target.values() for s in range(0, len(group), batch_size)]


def _check_encoded(out: Any, n: int) -> None:
    """``out`` must be a non-empty dict of tensors whose first dimension is the batch size ``n``."""
    if not isinstance(out, Mapping) or not out:
        raise TypeError(f"encode must return a non-empty dict of tensors, got {type(out).__name__}")
    for key, value in out.items():
        if not torch.is_tensor(value) or value.ndim < 1 or value.shape[0] != n:
            raise TypeError(f"encode output {key!r} must be a tensor with batch size {n} first, got "
                            f"{getattr(value, 'shape', type(value).__name__)}")


def cache_dataset(dataset: ImageDataset, cache_dir: str | Path, encode: Callable[[dict], Mapping[str, torch.Tensor]],
                  batch_size: int, tag: str, make_loader: Callable[[ImageDataset, list[BatchRequest]], Iterable[dict]],
                  rank: int = 0, world_size: int = 1) -> dict[str, int]:
    """Encode the items of ``dataset`` that have no valid entry in ``cache_dir``, then serve it from there.

    ``make_loader(dataset, batch_requests)`` iterates batch dicts of the deterministic view;
    ``encode(batch) -> {name: Tensor [B, ...]}``. This rank encodes every ``world_size``-th
    missing item; with ``world_size > 1`` all ranks meet at a barrier before looking for
    missing entries and after writing. Returns ``{"encoded": n, "reused": m}``."""
    paths = [entry_path(cache_dir, item_key(dataset, i, tag)) for i in range(len(dataset))]
    if world_size > 1:  # every rank sees the same missing entries before anyone writes
        torch.distributed.barrier()
    todo = [i for i, p in enumerate(paths) if not is_valid(p)]
    stats = {"encoded": 0, "reused": len(paths) - len(todo)}
    for batch in make_loader(dataset.deterministic_view(), batch_requests(todo[rank::world_size], dataset.targets,
                                                                          batch_size)):
        out = encode(batch)
        n = len(batch["index"])
        _check_encoded(out, n)
        for j, i in enumerate(batch["index"].tolist()):
            write_entry(paths[i], {k: v[j] for k, v in out.items()}, {"path": dataset.records[i].path, "tag": tag})
        stats["encoded"] += n
    if world_size > 1:
        torch.distributed.barrier()
    missing = [dataset.records[i].path for i, p in enumerate(paths) if not is_valid(p)]
    if missing:
        raise RuntimeError(f"{len(missing)} cache entries missing after build_cache, e.g. {missing[0]}")
    dataset.cache_paths = paths
    return stats
