"""Textual-inversion embeddings for SDXL (Gal et al. 2022, "An Image is Worth One Word").

An SDXL embedding is a safetensors file with one [n, width] tensor per text encoder,
``clip_l`` (CLIP ViT-L, width 768 for SDXL) and ``clip_g`` (OpenCLIP bigG, 1280): n token
embeddings that take the place of n tokens in the prompt. Files live in ``embeddings_dir``
and are named in a prompt as ``embedding:NAME`` (ComfyUI) or, with the a1111 syntax, by the
bare file stem as a word (AUTOMATIC1111). Headers are checked (:func:`check_embedding`)
before any weight is read; the vectors are read when a prompt uses them.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

KEYS = ("clip_l", "clip_g")
COMFY_REFERENCE = re.compile(r"embedding:([\w.\-]+)", re.I)


def available(directory: str | Path | None) -> dict[str, Path]:
    """{stem: path} of the ``*.safetensors`` files in ``directory`` (none when it is unset or missing: the
    default ``embeddings`` folder need not exist); a file given as the folder is an error."""
    if directory is None or not Path(directory).is_dir():
        if directory is not None and Path(directory).exists():
            raise NotADirectoryError(f"embeddings_dir {str(directory)!r} is a file, not a folder: give the folder "
                                     "that holds the NAME.safetensors embeddings (or leave it unset)")
        return {}
    return {p.stem: p for p in sorted(Path(directory).glob("*.safetensors")) if p.is_file()}


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", size_bytes)
        if size > 100_000_000:
            raise ValueError(f"header of {size} bytes")
        return json.loads(f.read(size))


def check_embedding(path: Path, widths: dict[str, int]) -> int:
    """The number of tokens of the embedding file ``path``, from its header alone; ``widths`` maps
    each needed key (``clip_l``/``clip_g``) to the token-embedding width of that encoder."""
    try:
        header = _header(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"embedding {path.stem!r} ({path}) is not a readable safetensors file: {exc}") from None
    counts = set()
    for key, width in widths.items():
        info = header.get(key)
        if not isinstance(info, dict):
            have = sorted(k for k in header if k != "__metadata__")
            raise ValueError(f"embedding {path.stem!r} ({path}) has no {key!r} tensor (it has {have}): an SDXL "
                             f"embedding holds clip_l [n, CLIP-L width] and clip_g [n, bigG width]")
        shape = info.get("shape", [])
        if len(shape) != 2 or shape[1] != width or shape[0] < 1:
            raise ValueError(f"embedding {path.stem!r} ({path}): {key} has shape {shape}, this model's {key} "
                             f"encoder needs [n, {width}] (n >= 1); it was made for another model")
        counts.add(shape[0])
    if len(counts) > 1:
        raise ValueError(f"embedding {path.stem!r} ({path}) has different token counts per encoder: {sorted(counts)}")
    return counts.pop() if counts else 0


@dataclass
class EmbeddingLibrary:
    """The embeddings of ``embeddings_dir``: names, files, and vectors read once when first used."""

    directory: str | Path | None
    files: dict[str, Path] = field(default_factory=dict)
    _vectors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = available(self.directory)

    def path(self, name: str) -> Path:
        if name not in self.files:
            have = ", ".join(sorted(self.files)) or "none"
            raise FileNotFoundError(f"embedding {name!r}: no {name}.safetensors in embeddings_dir "
                                    f"{str(self.directory)!r} (available: {have})")
        return self.files[name]

    def vectors(self, name: str, key: str) -> torch.Tensor:
        """The [n, width] token embeddings of ``name`` for encoder ``key``."""
        if name not in self._vectors:
            from safetensors.torch import load_file

            self._vectors[name] = load_file(str(self.path(name)))
        return self._vectors[name][key]
