"""Reference statistics of the distribution metrics, and the command that writes them once.

A statistics file (safetensors) holds, for one :class:`~sgm.metrics.features.FeatureSpace`:
``mean`` [D] and ``cov`` [D, D] (float64, unbiased covariance, as TF-FID), ``count`` (images)
and ``features`` (float32 [M, D], a seeded sample of at most ``max_features`` rows, for KID and
precision/recall; M = 0 keeps FID only); its metadata records the format, the feature space's
identity (network, weights digest, resize, size), the source folder and the sgm version.
Statistics from another feature space are refused.

    python -m sgm.metrics.stats DIR --out stats.safetensors [--weights INCEPTION.pth] [--resize clean]
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

import sgm

from ..data.reading import SkipImage, inspect_image
from ..data.records import IMAGE_EXTENSIONS, find_images
from .features import FeatureSpace, InceptionFeatures

log = logging.getLogger(__name__)

FORMAT = "sgm-feature-stats/1"
DEFAULT_MAX_FEATURES = 10_000


@dataclass
class FeatureStats:
    """Mean, covariance, count and a feature sample of one image set in one feature space."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    features: torch.Tensor
    identity: str
    source: str = ""

    @classmethod
    def of(cls, features: torch.Tensor, identity: str, source: str = "", max_features: int | None = None,
           seed: int = 0) -> "FeatureStats":
        """Statistics of ``features`` [N, D] (N >= 2); the kept sample is a seeded random subset when
        N exceeds ``max_features`` (None: keep all)."""
        x = features.double()
        if len(x) < 2:
            raise ValueError(f"statistics need at least two images, got {len(x)} ({source or 'features'})")
        keep = x
        if max_features is not None and len(x) > max_features:
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_features]
            keep = x[idx.sort().values]
        return cls(x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1]), len(x), keep.float(), identity, source)

    def check(self, space: FeatureSpace, what: str) -> None:
        """Refuse statistics made in another feature space than ``space``."""
        if self.identity != space.identity:
            raise ValueError(f"{what} {self.source!r} holds statistics of {self.identity}, not of this metric's "
                             f"{space.identity}: statistics are only comparable in one feature space (network, "
                             "weights, resize); write them again with python -m sgm.metrics.stats")

    def save(self, path: str | Path) -> Path:
        """Write the file (refuses to overwrite one)."""
        from ..checkpoint import write_safetensors

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists already; refusing to overwrite it (choose another --out)")
        tensors = {"mean": self.mean, "cov": self.cov, "count": torch.tensor([self.count]),
                   "features": self.features.contiguous()}
        meta = {"format": FORMAT, "feature_space": self.identity, "source": self.source, "images": str(self.count),
                "sgm": sgm.__version__}
        return write_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path, what: str = "reference") -> "FeatureStats":
        """Read a statistics file; errors name ``what`` and the file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - a corrupt header surfaces as several error types
            raise ValueError(f"{what} {str(path)!r} is not a readable safetensors statistics file: {exc}") from None
        if meta.get("format") != FORMAT or not {"mean", "cov", "count", "features"} <= set(tensors):
            raise ValueError(f"{what} {str(path)!r} is not an sgm statistics file ({FORMAT}: mean, cov, count, "
                             "features); write one with python -m sgm.metrics.stats DIR --out FILE")
        mean, cov, feats = tensors["mean"], tensors["cov"], tensors["features"]
        d = mean.shape[0]
        if mean.ndim != 1 or cov.shape != (d, d) or feats.ndim != 2 or (len(feats) and feats.shape[1] != d):
            raise ValueError(f"{what} {str(path)!r} has inconsistent shapes: mean {list(mean.shape)}, cov "
                             f"{list(cov.shape)}, features {list(feats.shape)}")
        return cls(mean.double(), cov.double(), int(tensors["count"].reshape(-1)[0]), feats.float(),
                   meta.get("feature_space", ""), str(meta.get("source") or path))


def image_files(folder: Path, what: str) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted), each checked readable; errors name the file."""
    paths = find_images(folder)
    if not paths:
        raise ValueError(f"{what} {str(folder)!r} holds no image ({'/'.join(IMAGE_EXTENSIONS)}, searched recursively)")
    for p in paths:
        try:
            inspect_image(p)
        except SkipImage as exc:
            raise ValueError(f"{what}: {p} is not a readable image ({exc}); remove or replace it") from None
    return paths


class Reference:
    """A metric's ``reference``: a statistics file, read when the metric is built, or a folder of
    images, checked when built and embedded once when first needed (shared by the metrics of a run)."""

    def __init__(self, path: str | None, what: str, needs_features: bool = False):
        if not path:
            raise ValueError(f"{what} is not set: give a folder of reference images or a statistics file "
                             "(python -m sgm.metrics.stats DIR --out FILE)")
        self.path, self.what = Path(str(path)).expanduser(), what
        self.file: FeatureStats | None = None
        self.images: list[Path] = []
        if self.path.is_file():
            self.file = FeatureStats.load(self.path, what)
            if needs_features and len(self.file.features) < 2:
                raise ValueError(f"{what} {str(self.path)!r} keeps no feature sample (needed here): write it "
                                 "with --max-features > 1")
        elif self.path.is_dir():
            self.images = image_files(self.path, what)
            if len(self.images) < 2:
                raise ValueError(f"{what} {str(self.path)!r} holds {len(self.images)} image; at least two are needed")
        else:
            raise FileNotFoundError(f"{what} {str(self.path)!r} does not exist: give a folder of reference images "
                                    "or a statistics file")

    @property
    def size(self) -> int:
        """The reference features a metric gets: the file's kept sample, or the folder's images."""
        return len(self.file.features) if self.file is not None else len(self.images)

    def check(self, space: FeatureSpace) -> None:
        if self.file is not None:
            self.file.check(space, self.what)

    def stats(self, space: FeatureSpace) -> FeatureStats:
        if self.file is not None:
            return self.file
        key = (str(self.path.resolve()), tuple(map(str, self.images)), space.identity)
        if key not in _FOLDERS:
            log.info("embedding %d reference images of %s", len(self.images), self.path)
            _FOLDERS.clear()  # one folder's features at a time
            _FOLDERS[key] = FeatureStats.of(space.extract_files(self.images), space.identity, str(self.path))
        return _FOLDERS[key]


_FOLDERS: dict[tuple, FeatureStats] = {}


def check_paths(folder: str | Path, out: str | Path) -> tuple[Path, Path]:
    """The stats command's folder and output file, checked before any work: ``out`` must not exist."""
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists already; refusing to overwrite it (choose another --out)")
    if not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} is not a folder of images")
    return folder, out


def write_folder_stats(folder: str | Path, out: str | Path, space: FeatureSpace,
                       max_features: int = DEFAULT_MAX_FEATURES, seed: int = 0) -> FeatureStats:
    """Embed every image under ``folder`` in ``space`` and write its statistics to ``out``."""
    folder, out = check_paths(folder, out)
    paths = image_files(folder, "folder")
    stats = FeatureStats.of(space.extract_files(paths), space.identity, str(folder.resolve()), max_features, seed)
    stats.save(out)
    log.info("wrote the statistics of %d images (%s) to %s", stats.count, space.identity, out)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgm.metrics.stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder of reference images (searched recursively)")
    parser.add_argument("--out", required=True, help="statistics file to write (.safetensors; never overwritten)")
    parser.add_argument("--weights", default=None, help="Inception weights (default: torch hub's checkpoints folder)")
    parser.add_argument("--resize", default="clean", help="clean (clean-fid, default) or tf_bilinear")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES,
                        help="features kept for KID and precision/recall (a seeded sample; 0: FID only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kept sample")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        check_paths(args.folder, args.out)
        space = InceptionFeatures(args.weights, args.resize, args.batch_size, args.device, what="--weights")
        write_folder_stats(args.folder, args.out, space, args.max_features, args.seed)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
