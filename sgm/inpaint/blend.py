"""Latent-mask blending: inpainting with any model and any sampler (RePaint-style known-region replacement).

The known region (mask 0) is not sampled: it is the init image's latent ``z0`` noised to the
noise level the network is evaluated at, with one noise tensor per image for the whole run
(the run's start noise, seeded per image), and the network's x0 prediction there is ``z0``:

    x_in = m * x + (1 - m) * (z0 + sigma * noise)        (before each network call)
    D    = m * D(x_in) + (1 - m) * z0                     (after it)

and the sampler's result gets ``x = m * x + (1 - m) * z0``, so the known region ends exactly at
``z0``. This is ComfyUI's ``KSamplerX0Inpaint`` (it blends the input and the ``denoised`` output);
diffusers and A1111 instead blend ``x`` after each step with ``z0 + sigma_next * noise``. For a
sampler with one evaluation per step the two agree (the next step's input blend is that step's
blend at ``sigma_next``); the wrapper also covers the intermediate evaluations of multi-stage
samplers (Heun, DPM++ SDE, Restart), which a per-step blend never sees, and needs no change in
any sampler: they all reach the model only through ``denoise``.
"""

from __future__ import annotations

from typing import Callable

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


class LatentBlend:
    """The blend of one batch: ``mask`` [B or 1, 1, h, w] (1 = repaint), ``init_latent`` [B, C, h, w]
    and ``noise`` (the batch's start noise, set by :meth:`with_noise` before sampling)."""

    def __init__(self, mask: torch.Tensor, init_latent: torch.Tensor, noise: torch.Tensor | None = None):
        self.mask = mask
        self.init_latent = init_latent
        self.noise = noise

    def with_noise(self, noise: torch.Tensor) -> "LatentBlend":
        self.noise = noise
        return self

    def _repeated(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` (one row per image, or one for all) on ``x``'s device, repeated to ``x``'s batch:
        guiders evaluate the uc and c branches of the same images in one call."""
        t = t.to(x.device, x.dtype)
        return t if t.shape[0] == x.shape[0] else t.repeat(x.shape[0] // t.shape[0], 1, 1, 1)

    def known(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The known region's latent at noise level ``sigma`` [B] for a call on ``x``: ``z0 + sigma * noise``."""
        if self.noise is None:
            raise RuntimeError("LatentBlend has no noise: call with_noise(start_noise) before sampling")
        s = sigma.to(x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return self._repeated(self.init_latent, x) + s * self._repeated(self.noise, x)

    def wrap(self, denoise: DenoiseFn) -> DenoiseFn:
        """``denoise`` with the known region fixed on the way in and out (see the module docstring)."""

        def blended(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
            m = self._repeated(self.mask, x)
            x_in = m * x + (1 - m) * self.known(x, sigma)
            return m * denoise(x_in, sigma, cond) + (1 - m) * self._repeated(self.init_latent, x)

        return blended

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's result with the known region set to the init latent."""
        m = self._repeated(self.mask, x)
        return m * x + (1 - m) * self._repeated(self.init_latent, x)
