"""Improved precision and recall (Kynkäänniemi et al. 2019), in the feature space of FID.

Each set's manifold is the union of balls around its samples, each ball's radius the distance to
the sample's k-th nearest neighbour in its own set (itself excluded). Precision is the share of
generated samples inside the reference manifold; recall the share of reference samples inside
the generated manifold. Distances are Euclidean, computed in float64 in row blocks.
"""

from __future__ import annotations

import torch

from .distribution import FeatureMetric
from .features import FeatureSpace


def knn_radii(features: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Distance of each row of ``features`` [N, D] to its k-th nearest other row ([N])."""
    if len(features) <= k:
        raise ValueError(f"the k-NN radius needs more than k={k} samples, got {len(features)}")
    out = [torch.cdist(features[i:i + block], features).kthvalue(k + 1, dim=1).values
           for i in range(0, len(features), block)]
    return torch.cat(out)


def coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Share of ``query`` rows within the radius of at least one ``support`` row."""
    inside = [(torch.cdist(query[i:i + block], support) <= radii[None]).any(dim=1)
              for i in range(0, len(query), block)]
    return torch.cat(inside).double().mean()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of generated ``fake`` features against ``real`` ones ([N, D] each)."""
    real, fake = real.double(), fake.double()
    precision = coverage(fake, real, knn_radii(real, k))
    recall = coverage(real, fake, knn_radii(fake, k))
    return float(precision), float(recall)


class PrecisionRecall(FeatureMetric):
    """``precision`` and ``recall`` (k-NN manifolds, ``k`` = 3 as the paper) against the reference's
    features (a folder, or a statistics file's feature sample). Needs more than k images."""

    default_key = "precision_recall"
    needs_reference_features = True

    def __init__(self, reference: str | None, features: FeatureSpace, key: str | None = None,
                 min_images: int | None = None, k: int = 3):
        if int(k) < 1:
            raise ValueError(f"metrics.{key or self.default_key}.k must be at least 1, got {k}")
        self.k = int(k)
        super().__init__(reference, features, key, max(self.k + 1, 2) if min_images is None else min_images)
        if self.min_images <= self.k:
            raise ValueError(f"metrics.{self.key}.min_images must exceed k={self.k}, got {self.min_images}")
        if self.reference.size <= self.k:
            raise ValueError(f"metrics.{self.key}.reference {str(self.reference.path)!r} gives {self.reference.size} "
                             f"reference features; the k-NN radius needs more than k={self.k}")

    def compute(self, features: torch.Tensor, ref) -> dict[str, float]:  # noqa: ANN001
        precision, recall = precision_recall(ref.features, features, self.k)
        prefix = "" if self.key == self.default_key else f"{self.key}_"
        return {f"{prefix}precision": precision, f"{prefix}recall": recall, f"{self.key}_k": self.k,
                f"{self.key}_reference_images": len(ref.features)}
