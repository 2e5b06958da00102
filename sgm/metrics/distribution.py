"""Distances between a run's images and a reference set in a feature space (torchmetrics).

* :class:`FrechetDistance`: FID (Heusel et al. 2017), ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2),
  torchmetrics' ``FrechetInceptionDistance`` over the space's features (float64).
* :class:`KernelDistance`: KID (Binkowski et al. 2018), the unbiased MMD^2 with the cubic kernel
  (x.y / D + 1)^3, mean and std over random subsets (torchmetrics' ``KernelInceptionDistance``),
  the subsets drawn from ``seed``.

Each returns ``<key>`` and ``<key>_images`` (the images it judged), and the reference count.
The reference is a folder of images or a statistics file (``sgm.metrics.stats``), checked
when the metric is built; a run with fewer than ``min_images`` images is not judged.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .features import FeatureSpace
from .stats import Reference

log = logging.getLogger(__name__)


class _Identity(nn.Module):
    """torchmetrics' custom ``feature`` network for features already computed."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FeatureMetric:
    """A metric of the run's features against a reference: ``reference`` (folder or statistics file),
    ``features`` (a :class:`FeatureSpace`), ``key`` (its name in metrics.json), ``min_images``."""

    needs_prompts = False
    needs_reference_features = False
    default_key = "metric"

    def __init__(self, reference: str | None, features: FeatureSpace, key: str | None = None, min_images: int = 2):
        self.key = key or self.default_key
        if not isinstance(features, FeatureSpace):
            raise TypeError(f"metrics.{self.key}.features must be a feature space (sgm.metrics.features), "
                            f"got {type(features).__name__}")
        if int(min_images) < 2:
            raise ValueError(f"metrics.{self.key}.min_images must be at least 2, got {min_images}")
        self.features, self.min_images = features, int(min_images)
        self.reference = Reference(reference, f"metrics.{self.key}.reference", self.needs_reference_features)
        self.reference.check(features)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        if len(images) < self.min_images:
            log.info("%s skipped: %d images, fewer than min_images=%d", self.key, len(images), self.min_images)
            return {}
        ref = self.reference.stats(self.features)
        out = self.compute(self.features.extract(images), ref)
        return {**out, f"{self.key}_images": len(images)}

    def compute(self, features: torch.Tensor, ref) -> dict[str, float]:  # noqa: ANN001 - FeatureStats
        raise NotImplementedError


class FrechetDistance(FeatureMetric):
    """FID against the reference's mean and covariance."""

    default_key = "fid"

    def compute(self, features: torch.Tensor, ref) -> dict[str, float]:  # noqa: ANN001
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=_Identity(features.shape[1]), sync_on_compute=False)
        n = ref.count
        fid.real_features_sum = ref.mean * n
        fid.real_features_cov_sum = ref.cov * (n - 1) + n * torch.outer(ref.mean, ref.mean)
        fid.real_features_num_samples = torch.tensor(n)
        fid.update(features.double(), real=False)
        return {self.key: float(fid.compute()), f"{self.key}_reference_images": n}


class KernelDistance(FeatureMetric):
    """KID against the reference's feature sample: ``subsets`` subsets of ``subset_size`` (at most the
    smaller of the two sets), polynomial kernel of ``degree``, ``gamma`` (None: 1 / D) and ``coef``."""

    default_key = "kid"
    needs_reference_features = True

    def __init__(self, reference: str | None, features: FeatureSpace, key: str | None = None, min_images: int = 2,
                 subsets: int = 100, subset_size: int = 1000, degree: int = 3, gamma: float | None = None,
                 coef: float = 1.0, seed: int = 0):
        super().__init__(reference, features, key, min_images)
        if int(subsets) < 1 or int(subset_size) < 2:
            raise ValueError(f"metrics.{self.key}: subsets must be >= 1 and subset_size >= 2, "
                             f"got {subsets} and {subset_size}")
        self.subsets, self.subset_size, self.seed = int(subsets), int(subset_size), int(seed)
        self.kernel = {"degree": int(degree), "gamma": gamma, "coef": float(coef)}

    def compute(self, features: torch.Tensor, ref) -> dict[str, float]:  # noqa: ANN001
        from torchmetrics.image.kid import KernelInceptionDistance

        size = min(self.subset_size, len(features), len(ref.features))
        with warnings.catch_warnings():  # its note that it keeps every feature: so do we, by design
            warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save")
            kid = KernelInceptionDistance(feature=_Identity(features.shape[1]), subsets=self.subsets,
                                          subset_size=size, sync_on_compute=False, **self.kernel)
        kid.update(ref.features.double(), real=True)
        kid.update(features.double(), real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            mean, std = kid.compute()
        return {self.key: float(mean), f"{self.key}_std": float(std), f"{self.key}_subset_size": size,
                f"{self.key}_reference_images": len(ref.features)}
