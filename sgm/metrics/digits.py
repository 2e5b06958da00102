"""A small CNN digit classifier: the judge of generated digits and the feature space of
their Fréchet distance. Trained on the MNIST sample's training split only
(``experiments/shipped_model/train_classifier.py``); its weights ship with the package."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
        """[B, 3 or 1, 32, 32] in [-1, 1] -> [B, 1, 32, 32]."""
        return images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images

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


@torch.no_grad()
def digit_metrics(generated: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor,
                  classifier: DigitClassifier | None = None, batch_size: int = 256) -> dict[str, float]:
    """Accuracy of ``generated`` digits ([N, C, 32, 32] in [-1, 1]) against the prompted
    ``labels`` (skipped when None), and the Fréchet distance between generated and
    ``reference`` digits in the classifier's feature space (torchmetrics' FID with a custom
    feature extractor)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    classifier = (classifier or load_digit_classifier()).eval()
    if len(generated) < 2 or len(reference) < 2:
        raise ValueError("the Fréchet distance needs at least two generated and two reference images")
    fid = FrechetInceptionDistance(feature=_FeatureExtractor(classifier), normalize=True)
    out: dict[str, float] = {}
    correct = 0
    for i in range(0, len(generated), batch_size):
        chunk = generated[i:i + batch_size].float()
        fid.update((chunk.clamp(-1, 1) + 1) / 2, real=False)
        if labels is not None:
            correct += int((classifier(chunk).argmax(1).cpu() == labels[i:i + batch_size].cpu()).sum())
    for i in range(0, len(reference), batch_size):
        fid.update((reference[i:i + batch_size].float().clamp(-1, 1) + 1) / 2, real=True)
    if labels is not None:
        out["accuracy"] = correct / len(generated)
    out["frechet_distance"] = float(fid.compute())
    return out


def held_out_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out MNIST digits ([500, 1, 32, 32] in [-1, 1]) and labels: the reference set."""
    import numpy as np

    from ..data.mnist import load_mnist_5k, pad32, split

    images, labels = load_mnist_5k()
    _, held = split(labels)
    x = torch.from_numpy(np.stack([pad32(im) for im in images[held]])).float()[:, None] / 127.5 - 1
    return x, torch.from_numpy(labels[held])
