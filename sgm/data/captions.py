"""Captions and per-image metadata: ``name.txt`` sidecars and HF imagefolder ``metadata.jsonl`` files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


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


def check_caption_ext(value: Any, what: str = "caption_ext") -> str | None:
    """``caption_ext``: a file suffix with its dot (``.txt``, ``.caption``), or null/empty for no sidecar captions."""
    if value is None or value == "":
        return None
    text = str(value)
    if not isinstance(value, str) or not text.startswith(".") or len(text) < 2 or "/" in text or "\\" in text:
        raise ValueError(f"{what} must be a file suffix with its dot, such as .txt (or null for no caption files), "
                         f"got {value!r}")
    return text


def find_caption(image: Path, caption_ext: str | None, row: Mapping[str, Any]) -> str | None:
    """The caption of ``image``: its sidecar (``image`` with suffix ``caption_ext``), else the
    ``text`` (or ``caption``) of its metadata ``row``, stripped; None when it has neither."""
    side = image.with_suffix(caption_ext) if caption_ext else None
    if side is not None and side.is_file():
        return side.read_text(encoding="utf-8", errors="replace").strip()
    for key in ("text", "caption"):
        if row.get(key) is not None:
            return str(row[key]).strip()
    return None


def aesthetic_score(image: Path, row: Mapping[str, Any], source: str | None) -> float | None:
    """The ``aesthetic_score`` of a metadata ``row`` as a number; None (with a warning naming
    ``image`` and the metadata file ``source``) when absent or not a number."""
    score = row.get("aesthetic_score")
    try:
        return None if score is None else float(score)
    except (TypeError, ValueError):
        log.warning("%s: aesthetic_score %r in %s is not a number; default used", image, score, source)
        return None
