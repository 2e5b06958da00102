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
