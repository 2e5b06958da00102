"""The images of a folder as :class:`ImageRecord` objects: discovery, up-front checks (unusable
files skipped with a warning naming file and reason) and the seeded held-out split."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .captions import aesthetic_score, find_caption, read_metadata
from .reading import SkipImage, inspect_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
        """(height, width) as displayed."""
        return self.height, self.width

    def score(self, default: float) -> float:
        """Its aesthetic score, ``default`` where the metadata gives none."""
        return default if self.aesthetic_score is None else self.aesthetic_score


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


def _check_all(paths: Sequence[Path], min_size: int | None, full_check: bool,
               workers: int) -> list[tuple[int, int] | SkipImage]:
    """:func:`inspect_image` of every path (threads): its (h, w), or the :class:`SkipImage` it raised."""
    def check(p: Path) -> tuple[int, int] | SkipImage:
        try:
            return inspect_image(p, min_size, full_check)
        except SkipImage as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check, paths))


def check_folder(root: str | Path, name: str = "image folder") -> Path:
    """``root`` resolved, or FileNotFoundError / NotADirectoryError naming ``name`` and the path."""
    path = Path(root).expanduser().resolve()
    shown = repr(str(root)) + ("" if str(path) == str(root) else f" ({path})")
    if not path.exists():
        raise FileNotFoundError(f"{name} {shown} does not exist: give the folder of training images")
    if not path.is_dir():
        raise NotADirectoryError(f"{name} {shown} is a file, not a folder of images")
    return path


def scan_folder(root: str | Path, caption_ext: str = ".txt", metadata: str | None = "metadata.jsonl",
                min_size: int | None = None, full_check: bool = True, workers: int | None = None,
                name: str = "image folder") -> tuple[list[ImageRecord], list[tuple[str, str]]]:
    """(usable records sorted by relative path, skipped (path, reason)); warns once per skipped file.
    Errors (no folder, nothing usable) name the folder as ``name`` (the parameter that gave it)."""
    given, root = root, check_folder(root, name)
    paths = find_images(root)
    meta = read_metadata(root, metadata)
    results = _check_all(paths, min_size, full_check, workers or min(8, os.cpu_count() or 1))
    records, skipped = [], []
    for p, res in zip(paths, results):
        if isinstance(res, SkipImage):
            log.warning("skipping image %s: %s", p, res)
            skipped.append((str(p), str(res)))
            continue
        row = meta.get(p.resolve(), {})
        caption = find_caption(p, caption_ext, row)
        st = p.stat()
        records.append(ImageRecord(str(p), p.relative_to(root).as_posix(), caption or "", res[0], res[1],
                                   st.st_size, st.st_mtime_ns, aesthetic_score(p, row, metadata), caption is not None))
    if skipped:
        log.warning("%d of %d image files under %s skipped (unreadable, corrupt or too small)",
                    len(skipped), len(paths), root)
    missing = sum(not r.has_caption for r in records)
    if missing:
        log.warning("%d of %d images under %s have no caption (%s file or %s entry): empty caption used",
                    missing, len(records), root, caption_ext, metadata)
    if not records:
        what = (f"{len(skipped)} image files, all skipped; first: {skipped[0][0]}: {skipped[0][1]}" if paths
                else f"no {'/'.join(IMAGE_EXTENSIONS)} files, searched recursively")
        raise RuntimeError(f"{name} {str(given)!r} holds no usable training image ({what}); folder: {root}")
    return records, skipped


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
