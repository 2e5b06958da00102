"""Per-sigma weights lambda(sigma) of the x0-space loss lambda * ||D(x; sigma) - x0||^2."""

from __future__ import annotations

import torch

from ._checks import check_positive


class UnitWeighting:
    """lambda = 1: plain x0 regression."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)


class EDMWeighting:
    """lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Table 1)."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = check_positive("sigma_data", sigma_data)

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VWeighting(EDMWeighting):
    """The v-prediction loss in x0 space: EDM weighting with sigma_data = 1."""

    def __init__(self) -> None:
        super().__init__(sigma_data=1.0)


class EpsWeighting:
    """lambda = 1 / sigma^2: the epsilon-prediction loss in x0 space."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma**-2.0


class MinSNRWeighting:
    """Min-SNR-gamma (Hang et al. 2023): lambda = min(SNR, gamma) with SNR = 1 / sigma^2.

    In x0 space the paper's weight is the same for eps-, v- and x0-prediction networks.
    """

    def __init__(self, gamma: float = 5.0):
        self.gamma = check_positive("gamma", gamma)

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**-2.0).clamp(max=self.gamma)
