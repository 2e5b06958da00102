"""A small CNN digit classifier: the judge of generated digits and the feature space of
their Fréchet distance. Trained on the MNIST sample's training split only
(``experiments/shipped_model/train_classifier.py``); its weights ship with the package."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.mnist import DIGIT_WORDS

log = logging.getLogger(__name__)
WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "digit_classifier.safetensors"


class DigitClassifier(nn.Module):
    """32x32 grayscale digits in [-1, 1] -> 10 logits; ``features`` gives the 128-d penultimate layer."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(32), nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 8 * 8, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)
        self.dropout = nn.Dropout(0.3)

    @staticmethod
    def to_gray(images: torch.Tensor) -> torch.Tensor:
        """[B, 3 or 1, 32, 32] in [-1, 1] -> [B, 1, 32, 32]: the ink intensity (brightest
        channel), so a digit in coloured ink on black reads as the same digit in white."""
        return images.amax(dim=1, keepdim=True) if images.shape[1] == 3 else images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.to_gray(images)
        x = F.max_pool2d(F.relu(self.bn1(self.conv2(F.relu(self.conv1(x))))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv4(F.relu(self.conv3(x))))), 2)
        return F.relu(self.fc1(self.dropout(x.flatten(1))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(images)))


def load_digit_classifier(path: str | Path = WEIGHTS) -> DigitClassifier:
    """The shipped classifier (eval mode)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run experiments/shipped_model/train_classifier.py")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


class _FeatureExtractor(nn.Module):
    """torchmetrics' custom-feature interface: float images in [0, 1] -> classifier features."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.feature_dim

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images01.float() * 2 - 1)


REFERENCE_STATS = WEIGHTS.parent / "digit_reference_stats.safetensors"
_STAT_KEYS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def _fid(classifier: DigitClassifier):
    from torchmetrics.image.fid import FrechetInceptionDistance

    # local statistics: under DDP only rank 0 judges the gathered images, so no cross-rank sync
    return FrechetInceptionDistance(feature=_FeatureExtractor(classifier), normalize=True, sync_on_compute=False)


@torch.no_grad()
def reference_stats(reference: torch.Tensor, classifier: DigitClassifier | None = None) -> dict[str, torch.Tensor]:
    """torchmetrics' real-image FID states (feature sum, feature outer-product sum, count) of
    ``reference`` digits: what ships as ``digit_reference_stats.safetensors``."""
    fid = _fid((classifier or load_digit_classifier()).eval())
    fid.update((reference.float().clamp(-1, 1) + 1) / 2, real=True)
    return {k: getattr(fid, k).detach().clone().reshape(-1) if k.endswith("samples") else getattr(fid, k).detach().clone()
            for k in _STAT_KEYS}


def load_reference_stats(path: str | Path = REFERENCE_STATS) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run experiments/shipped_model/train_classifier.py --stats-only")
    return load_file(str(path))


@torch.no_grad()
def digit_metrics(generated: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None = None,
                  classifier: DigitClassifier | None = None, batch_size: int = 256,
                  stats: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Accuracy of ``generated`` digits ([N, C, 32, 32] in [-1, 1]) against the prompted
    ``labels`` (skipped when None), and the Fréchet distance between generated and reference
    digits in the classifier's feature space (torchmetrics' FID with a custom feature
    extractor). The reference is ``reference`` images, else ``stats`` from
    :func:`reference_stats`, else the shipped statistics of the 500 held-out digits."""
    classifier = (classifier or load_digit_classifier()).eval()
    if len(generated) < 2:
        raise ValueError("the Fréchet distance needs at least two generated images")
    fid = _fid(classifier)
    out: dict[str, float] = {}
    correct = 0
    for i in range(0, len(generated), batch_size):
        chunk = generated[i:i + batch_size].float()
        fid.update((chunk.clamp(-1, 1) + 1) / 2, real=False)
        if labels is not None:
            correct += int((classifier(chunk).argmax(1).cpu() == labels[i:i + batch_size].cpu()).sum())
    if reference is not None:
        if len(reference) < 2:
            raise ValueError("the Fréchet distance needs at least two reference images")
        for i in range(0, len(reference), batch_size):
            fid.update((reference[i:i + batch_size].float().clamp(-1, 1) + 1) / 2, real=True)
    else:
        stats = stats if stats is not None else load_reference_stats()
        for k in _STAT_KEYS:
            state = getattr(fid, k)
            setattr(fid, k, stats[k].to(state.dtype).reshape(state.shape))
    if labels is not None:
        out["accuracy"] = correct / len(generated)
    out["frechet_distance"] = float(fid.compute())
    return out


_NUMBER = {w: i for i, w in enumerate(DIGIT_WORDS)}
_DIGIT_TOKEN = re.compile(r"(?<![\w.])(" + "|".join(DIGIT_WORDS) + r"|[0-9])(?!\w|\.\d)", re.IGNORECASE)


def digit_from_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for ("a handwritten digit seven", "a handwritten digit 7"),
    or None when it names none or several different ones."""
    found = {_NUMBER.get(m.lower(), None) if not m.isdigit() else int(m) for m in _DIGIT_TOKEN.findall(prompt)}
    return found.pop() if len(found) == 1 else None


class DigitMetrics:
    """``conf/metrics/digits.yaml``: judges a run's images with the digit classifier.

    With ``only_digit_prompts`` a run none of whose prompts names a digit is not judged.

    Called with the run's images ([N, 3, H, W] in [-1, 1]; resized to 32x32 when needed) and
    their prompts, returns ``accuracy`` (over the images whose prompt names one digit, see
    :func:`digit_from_prompt`), ``frechet_distance`` to the held-out digits (shipped feature
    statistics; needs at least ``min_images`` images) and ``labelled_images``."""

    metric_names = ("labelled_images", "accuracy", "frechet_distance")  # what a call may return

    def __init__(self, min_images: int = 2, reference_stats: str | None = None, classifier: str | None = None,
                 only_digit_prompts: bool = True):
        if int(min_images) < 2:
            raise ValueError(f"min_images must be at least 2 (a covariance needs two images), got {min_images}")
        self.min_images = int(min_images)
        self.only_digit_prompts = bool(only_digit_prompts)
        # load now: a missing file is an error before any sampling starts
        self.classifier = load_digit_classifier(classifier or WEIGHTS)
        self.stats = load_reference_stats(reference_stats or REFERENCE_STATS)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        classifier, stats = self.classifier, self.stats
        labels = [digit_from_prompt(p) for p in prompts]
        keep = [i for i, d in enumerate(labels) if d is not None]
        if self.only_digit_prompts and not keep:
            log.info("digit metrics skipped: no prompt names a digit (metrics.only_digit_prompts=false forces them)")
            return {}
        x = images.float()
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        out: dict[str, float] = {"labelled_images": len(keep)}
        if keep:
            with torch.no_grad():
                pred = classifier(x[keep]).argmax(1)
            out["accuracy"] = float((pred == torch.tensor([labels[i] for i in keep])).float().mean())
        if len(x) >= max(2, self.min_images):
            out["frechet_distance"] = digit_metrics(x, None, classifier=classifier, stats=stats)["frechet_distance"]
        return out


def held_out_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out MNIST digits ([500, 1, 32, 32] in [-1, 1]) and labels: the reference set."""
    from ..data.mnist import load_mnist_5k, split, to_tensor

    images, labels = load_mnist_5k()
    _, held = split(labels)
    return to_tensor(images[held]), torch.from_numpy(labels[held])


def ink_colour(images: torch.Tensor, threshold: float = 0.35) -> torch.Tensor:
    """Mean RGB colour in [0, 1] of each image's ink ([N, 3, H, W] in [-1, 1] -> [N, 3]): the
    pixels whose brightest channel exceeds ``threshold`` (all pixels if none does)."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    ink = (x.amax(dim=1) > threshold).float()
    ink = torch.where(ink.sum(dim=(1, 2), keepdim=True) > 0, ink, torch.ones_like(ink))
    return (x * ink[:, None]).sum(dim=(2, 3)) / ink.sum(dim=(1, 2))[:, None]


def red_ink_share(images: torch.Tensor, margin: float = 0.25) -> float:
    """Share of images whose ink is red: mean ink R exceeds both G and B by ``margin``."""
    c = ink_colour(images)
    return float(((c[:, 0] - c[:, 1:].amax(dim=1)) > margin).float().mean())
