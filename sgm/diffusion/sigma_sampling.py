"""Training-time noise-level samplers: ``sampler(n) -> sigmas [n]``."""

from __future__ import annotations

from typing import Any

import torch

from ..config import build_part
from ._checks import check_finite, check_int, check_positive


class EDMSampling:
    """Log-normal sigmas, ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022, sec. 5)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean = check_finite("p_mean", p_mean)
        self.p_std = check_positive("p_std", p_std)

    def __call__(self, n_samples: int, rand: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if rand is None:
            rand = torch.randn((n_samples,), generator=generator)
        return (self.p_mean + self.p_std * rand).exp()


class DiscreteSampling:
    """Uniform over the ``num_idx`` discrete sigmas of a discretization (DDPM-style training)."""

    def __init__(self, discretization: Any = None, num_idx: int = 1000, do_append_zero: bool = False,
                 flip: bool = True, *, discretization_config: Any = None):
        self.num_idx = check_int("num_idx", num_idx)
        disc = build_part("discretization", discretization, discretization_config)
        self.sigmas = disc(self.num_idx, do_append_zero=do_append_zero, flip=flip)

    def idx_to_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas[idx]

    def __call__(self, n_samples: int, rand: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        idx = rand if rand is not None else torch.randint(0, self.num_idx, (n_samples,), generator=generator)
        return self.idx_to_sigma(idx)
