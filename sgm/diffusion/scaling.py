"""Network preconditionings: ``scaling(sigma) -> (c_skip, c_out, c_in, c_noise)``.

The denoiser computes D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
(Karras et al. 2022, Table 1 and eq. 7).
"""

from __future__ import annotations

import torch

from ._checks import check_positive

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EDMScaling:
    """EDM preconditioning (Karras et al. 2022, Table 1), c_noise = ln(sigma) / 4."""

    c_noise_is_sigma = False  # lets DiscreteDenoiser reuse sigma's level index for c_noise

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = check_positive("sigma_data", sigma_data)

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1 / (sigma**2 + sd2) ** 0.5
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise


class EpsScaling:
    """Epsilon prediction (DDPM / Stable Diffusion): D = x - sigma * eps(x / sqrt(1 + sigma^2))."""

    c_noise_is_sigma = True

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScaling:
    """v prediction (Salimans & Ho 2022) in sigma parametrisation, c_noise = sigma."""

    c_noise_is_sigma = True

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScalingWithEDMcNoise(VScaling):
    """v prediction with EDM's c_noise = ln(sigma) / 4."""

    c_noise_is_sigma = False

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        c_skip, c_out, c_in, _ = super().__call__(sigma)
        return c_skip, c_out, c_in, 0.25 * sigma.log()


class X0Scaling:
    """Direct x0 prediction: D = F(x, sigma) (c_skip 0, c_out 1, c_in 1, c_noise sigma)."""

    c_noise_is_sigma = True

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        return torch.zeros_like(sigma), torch.ones_like(sigma), torch.ones_like(sigma), sigma.clone()
