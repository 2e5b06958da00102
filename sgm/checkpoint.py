"""Single-file checkpoints in the original SDXL layout (see shared/reference/FORMATS.md).

Loading matches keys exactly: the only tolerated differences are the allow-listed ones
(a ``position_ids`` buffer the file may carry, ``denoiser.sigmas`` which is computed).
Anything else fails with one error listing the missing, unexpected and wrong-shape keys,
before any weight is copied. Safetensors files are read tensor by tensor into a model
built on the meta device, so no second full copy of the weights is ever held. Pickle
files (``.ckpt``/``.pt``) are only read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .data.paths import existing_file

log = logging.getLogger(__name__)

# keys a file may have that the model need not (computed or version-dependent buffers)
ALLOWED_EXTRA = (re.compile(r"(^|\.)position_ids$"), re.compile(r"^denoiser\.sigmas$"))
# keys the model has that a file may lack
ALLOWED_MISSING = (re.compile(r"^denoiser\.sigmas$"), re.compile(r"(^|\.)position_ids$"))

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointMismatchError(ValueError):
    """The file's keys or shapes do not match the model."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsReader:
    """Reads one tensor at a time with ``pread`` into its own buffer (no memory map): used when
    every tensor is cast anyway, so that the file is never resident beside the cast copy."""

    def __init__(self, path: Path):
        import struct

        self.fd = os.open(path, os.O_RDONLY)
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.header = json.loads(os.pread(self.fd, n, 8))
        self.header.pop("__metadata__", None)
        self.base = 8 + n

    def get(self, key: str) -> torch.Tensor:
        info = self.header[key]
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key} has dtype {info['dtype']}, which this reader does not support")
        buf = bytearray(end - start)
        view, done = memoryview(buf), 0
        while done < len(buf):
            chunk = os.preadv(self.fd, [view[done:]], self.base + start + done)
            if chunk <= 0:
                raise ValueError(f"file ends inside tensor {key}")
            done += chunk
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def open_state_dict(path: str | os.PathLike, stream: bool = False
                    ) -> Iterator[tuple[dict[str, tuple[tuple[int, ...], str]], Any]]:
    """Yield ``(index, get)``: key -> (shape, dtype name) without reading data, and ``get(key)``.

    Safetensors tensors are views of a memory map (weights become resident on first use, shared
    with the page cache) unless ``stream``: then each is read into its own buffer, which is what
    a cast-while-loading wants (peak = the cast copy plus one tensor)."""
    path = existing_file(path, "checkpoint", "checkpoint file")
    if path.suffix == ".safetensors":
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
            index = {}
            for k in f.keys():
                sl = f.get_slice(k)
                index[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as exc:  # noqa: BLE001 - a corrupt header surfaces as several error types
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        if not stream:
            yield index, f.get_tensor
            return
        reader = _SafetensorsReader(path)
        try:
            yield index, reader.get
        finally:
            reader.close()
        return
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means: refuse
            raise ValueError(
                f"{path} could not be read with torch.load(weights_only=True) ({exc}); pickle files "
                f"with code are refused. Convert it to .safetensors."
            ) from exc
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds no state dict")
        index = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items() if torch.is_tensor(v)}
        yield index, sd.__getitem__
        return
    raise ValueError(f"unsupported checkpoint type {path.suffix!r} for {path}: use .safetensors (or .ckpt/.pt)")


def _allowed(key: str, patterns) -> bool:
    return any(p.search(key) for p in patterns)


def compare_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> dict[str, list]:
    """Missing, unexpected and wrong-shape keys between the model (expected) and a file (found)."""
    missing = sorted(k for k in expected if k not in found and not _allowed(k, ALLOWED_MISSING))
    unexpected = sorted(k for k in found if k not in expected and not _allowed(k, ALLOWED_EXTRA))
    wrong = sorted(
        (k, tuple(expected[k]), tuple(found[k])) for k in expected if k in found and tuple(expected[k]) != tuple(found[k])
    )
    return {"missing": missing, "unexpected": unexpected, "wrong_shape": wrong}


def format_mismatch(path: Any, report: dict[str, list], limit: int = 20) -> str:
    lines = [f"checkpoint {path} does not match the model:"]
    for name, items in report.items():
        if not items:
            continue
        lines.append(f"  {len(items)} {name.replace('_', '-')} key(s):")
        for item in items[:limit]:
            if name == "wrong_shape":
                k, want, got = item
                lines.append(f"    {k}: model {list(want)}, file {list(got)}")
            else:
                lines.append(f"    {item}")
        if len(items) > limit:
            lines.append(f"    ... and {len(items) - limit} more")
    lines.append("Check that the config (model=...) matches the file, e.g. sdxl_base vs sdxl_refiner.")
    return "\n".join(lines)


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    keep_float32: tuple[str, ...] = (),
) -> nn.Module:
    """Load ``path`` into ``model`` (built on the meta device or not) with exact key matching.

    ``dtype`` casts floating-point weights; keys under a prefix in ``keep_float32`` stay
    float32 (e.g. ``first_stage_model.`` for a VAE that is not fp16-safe).
    """
    dtype = parse_dtype(dtype)
    model_sd = model.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in model_sd.items()}
    with open_state_dict(path, stream=dtype is not None or bool(keep_float32)) as (index, get):
        report = compare_keys(expected, {k: shape for k, (shape, _) in index.items()})
        if any(report.values()):
            raise CheckpointMismatchError(format_mismatch(path, report))
        on_meta = any(v.is_meta for v in model_sd.values())
        loaded = {}
        for key in expected:
            if key not in index:
                continue
            t = get(key)
            if t.is_floating_point():
                target = torch.float32 if any(key.startswith(p) for p in keep_float32) else dtype
                if target is None:
                    target = model_sd[key].dtype if not model_sd[key].is_meta else t.dtype
                t = t.to(target)
            loaded[key] = t
        result = model.load_state_dict(loaded, strict=False, assign=on_meta)
    missing = [k for k in result.missing_keys if k in expected and not _allowed(k, ALLOWED_MISSING)]
    if missing:  # state_dict hooks may rename keys; this is a last guard
        raise CheckpointMismatchError(format_mismatch(path, {"missing": missing, "unexpected": [], "wrong_shape": []}))
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointMismatchError(f"after loading {path}, these tensors have no data: {leftover[:20]}")
    log.info("loaded %d tensors from %s", len(loaded), path)
    return model


def save_checkpoint(model: nn.Module | dict, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as one safetensors file in the original key layout (atomic)."""
    dtype = parse_dtype(dtype)
    sd = model if isinstance(model, dict) else model.state_dict()
    out = {}
    for k, v in sd.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().cpu()
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    return write_safetensors(out, path, meta)


def default_file_mode() -> int:
    """0o666 minus the process umask: what a plain ``open(path, "w")`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (a temporary file beside it, then ``os.replace``),
    with ordinary permissions; an interrupted write never leaves a partial file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
