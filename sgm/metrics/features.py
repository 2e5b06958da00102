"""Feature spaces of the distribution metrics (FID, KID, precision/recall): images -> [N, D].

A :class:`FeatureSpace` resizes each uint8 image to its network's input (``sgm.metrics.resize``,
``clean`` by default) and embeds batches of them. Its :attr:`~FeatureSpace.identity` (network,
weights digest, resize, input size) is written into statistics files, and statistics made in
another space are refused. The features of the last image tensor are kept, so FID, KID and
precision/recall of one run embed its images once.

* :class:`InceptionFeatures`: the 2048-d pool features of torch-fidelity's Inception v3 with the
  TF-FID weights of 2015-12-05 (``pt_inception-2015-12-05-6726825d.pth``, the file torch-fidelity
  and pytorch-fid download; read here from a local path only).
* :class:`ModuleFeatures`: any ``nn.Module`` taking float images in [0, 1] (custom networks, tests).
"""

from __future__ import annotations

import hashlib
import io
import logging
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.reading import read_image
from ..tasks.writer import to_uint8
from .resize import get_resize

log = logging.getLogger(__name__)

INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"  # the published file's digest prefix (torch hub naming)


def pick_device(device: str | None) -> torch.device:
    """``device`` as a torch device; None: CUDA when available, else the CPU."""
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureSpace:
    """Images -> features. Subclasses set :attr:`network`, :attr:`dim` and implement :meth:`embed`."""

    network: str = "features"
    dim: int

    def __init__(self, size: int, resize: str = "clean", batch_size: int = 32, device: str | None = None,
                 what: str = "metrics.features"):
        if int(size) < 1 or int(batch_size) < 1:
            raise ValueError(f"{what}: size and batch_size must be positive, got {size} and {batch_size}")
        self.size, self.batch_size, self.resize = int(size), int(batch_size), str(resize)
        self._resize = get_resize(self.resize, f"{what}.resize")
        self.device = pick_device(device)
        self.digest = ""

    @property
    def identity(self) -> str:
        """What made a feature: network, weights digest, resize and input size (recorded in stats files)."""
        return f"{self.network}[{self.digest}]/resize={self.resize}@{self.size}"

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, size, size]`` float in [0, 255] -> ``[B, dim]``."""
        raise NotImplementedError

    @torch.no_grad()
    def embed_uint8(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` images (any sizes) -> float64 ``[N, dim]`` on the CPU."""
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self._resize(im, self.size) for im in images[i:i + self.batch_size]])
            out.append(self.embed(batch.to(self.device)).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim, dtype=torch.float64)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a run's images (``[N, C, H, W]`` in [-1, 1]), float64 ``[N, dim]``; the
        last tensor's features are reused while it is unchanged (several metrics, one pass)."""
        ref, version, identity, feats = _LAST[0] if _LAST[0] is not None else (None, None, None, None)
        if ref is not None and ref() is images and version == images._version and identity == self.identity:
            return feats
        feats = self.embed_uint8(list(to_uint8(images.detach().cpu())))
        _LAST[0] = (weakref.ref(images), images._version, self.identity, feats)
        return feats

    def extract_files(self, paths: Sequence[Path]) -> torch.Tensor:
        """Features of image files (the project's reader: EXIF orientation, 8-bit RGB), read a batch at a time."""
        out = [self.embed_uint8([np.asarray(read_image(p)) for p in paths[i:i + self.batch_size]])
               for i in range(0, len(paths), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim, dtype=torch.float64)


_LAST: list = [None]  # (weakref to the image tensor, its version, feature space identity, features)


class ModuleFeatures(FeatureSpace):
    """A custom feature network: ``module(images)`` with float images in [0, 1] of ``size`` x ``size``
    -> ``[B, D]``, its state dict optionally from ``weights`` (a local file, exact keys). Its
    :attr:`identity` holds ``name`` and the weights' digest: give a new name when untracked weights change."""

    def __init__(self, module: nn.Module, size: int, name: str | None = None, weights: str | None = None,
                 resize: str = "clean", batch_size: int = 32, device: str | None = None,
                 what: str = "metrics.features"):
        super().__init__(size, resize, batch_size, device, what)
        if not name and not weights:
            raise ValueError(f"{what}.name is not set: name the feature network (statistics files record it), "
                             f"or give its {what}.weights file")
        digest = []
        if weights:
            path = weights_file(weights, f"{what}.weights", "the feature network's state dict")
            _load_state_dict(module, path, f"{what}.weights", f"the state dict of {type(module).__name__}")
            digest.append(f"sha256:{sha256_of(path)[:16]}")
        self.module = module.eval().to(self.device)
        self.network, self.digest = "module", ", ".join([str(name)] * bool(name) + digest)
        with torch.no_grad():
            self.dim = int(self.module(torch.zeros(1, 3, self.size, self.size, device=self.device)).shape[-1])

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch / 255.0).flatten(1)


def weights_file(weights: str | Path, what: str, kind: str) -> Path:
    """``weights`` as an existing file; FileNotFoundError naming ``what`` otherwise."""
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is {'a directory' if path.is_dir() else 'missing'}: "
                                f"give {kind}")
    return path


def _load_state_dict(module: nn.Module, path: Path | str, what: str, kind: str) -> None:
    """:func:`sgm.checkpoint.load_checkpoint` (exact keys, ``weights_only`` pickles), errors naming ``what``."""
    from ..checkpoint import CheckpointMismatchError, load_checkpoint

    try:
        load_checkpoint(module, path)
    except CheckpointMismatchError as exc:
        raise ValueError(f"{what}: {str(exc).rsplit(chr(10), 1)[0]}\n{what} must be {kind}") from None
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def default_inception_path() -> Path | None:
    """The Inception weights in torch hub's checkpoint folder (where torch-fidelity and pytorch-fid
    keep them), or None."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return next((folder / n for n in INCEPTION_FILES if (folder / n).is_file()), None)


def _inception_class() -> type:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class InceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's Inception v3, built without weights: the constructor's own load gets an
        empty state dict (no download, no pickle from disk); :func:`sgm.checkpoint.load_checkpoint`
        fills it from the local file."""

        def __init__(self) -> None:
            buffer = io.BytesIO()
            torch.save({}, buffer)
            buffer.seek(0)
            super().__init__("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ANN001
            if not state_dict:  # the constructor's load of the empty buffer
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return InceptionV3


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=2)
def _load_inception(path: str, mtime_ns: int, size: int, what: str) -> tuple[nn.Module, str]:
    """(network, sha256) of an Inception weights file; cached per file version, so several metrics share it."""
    with torch.device("meta"):
        net = _inception_class()()
    _load_state_dict(net, path, what, f"the Inception v3 state dict torch-fidelity uses ({INCEPTION_FILES[0]})")
    return net.eval().requires_grad_(False), sha256_of(Path(path))


class InceptionFeatures(FeatureSpace):
    """Inception v3 pool features (2048-d, Heusel et al. 2017's FID space) from a local weights file.

    ``weights``: a ``.pth`` (read with ``torch.load(weights_only=True)``) or ``.safetensors``
    state dict of torch-fidelity's network; null: the file in torch hub's checkpoints folder.
    Images are resized by ``resize`` (default ``clean``) to 299 x 299 and scaled to [-1, 1]
    as (x - 128) / 128; a file whose digest is not the published one gives a warning (its
    numbers are not comparable with published FIDs)."""

    network = "inception_v3_2048"
    dim = 2048

    def __init__(self, weights: str | None = None, resize: str = "clean", batch_size: int = 32,
                 device: str | None = None, what: str = "metrics.features.weights"):
        super().__init__(299, resize, batch_size, device, what.rsplit(".", 1)[0])
        path = weights if weights else default_inception_path()
        if path is None:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

            raise FileNotFoundError(
                f"{what} is not set and torch hub's folder {Path(torch.hub.get_dir()) / 'checkpoints'} holds no "
                f"{INCEPTION_FILES[0]}: nothing is downloaded at run time. Download it once ({URL_INCEPTION_V3}) "
                f"and give {what}=PATH, or put it in that folder")
        path = weights_file(path, what, f"the Inception weights file ({INCEPTION_FILES[0]})")
        stat = path.stat()
        net, sha = _load_inception(str(path.resolve()), stat.st_mtime_ns, stat.st_size, what)
        self.net = net.to(self.device)
        self.weights, self.digest = str(path), f"sha256:{sha[:16]}"
        if not sha.startswith(INCEPTION_SHA256_PREFIX):
            log.warning("%s %s is not the published Inception file (sha256 %s...): its FIDs are not comparable "
                        "with published ones", what, path, sha[:16])

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """The pool features: torch-fidelity's blocks in order up to the average pool (its ``forward``
        asks for uint8 and resizes itself; here the resize is done and the input stays float)."""
        x = (batch.float() - 128) / 128
        for name, block in self.net.named_children():
            if name == "fc":
                break
            x = block(x)
        return x.flatten(1)
