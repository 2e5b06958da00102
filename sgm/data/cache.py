"""On-disk cache of encoded training items: one safetensors file per item.

An entry's name is a hash of everything its tensors depend on: the image file (absolute
path, byte size, modification time), the view of it that was encoded (target size, crop,
flip, resize filter), the caption (text embeddings depend on it) and a caller's ``tag``
(name the encoder there: a new VAE or text encoder needs a new tag or a new cache_dir).
Change any of them and the item gets a new name, so a stale entry is never read; it is
simply left behind. Files are written to a temporary name and renamed (atomic on POSIX),
so a crashed or concurrent writer never leaves a half-written entry under a valid name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file

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
    try:
        return load_file(str(path))
    except Exception as e:
        raise RuntimeError(f"cache entry {path} cannot be read ({e}); delete it and run build_cache again") from e
