"""An analytic "model": data from an isotropic Gaussian mixture, whose ideal denoiser is exact.

For data x0 ~ sum_k w_k N(mu_k, s^2 I) and x = x0 + sigma n, the minimum-MSE denoiser is

    D(x; sigma) = sum_k r_k(x) (s^2 x + sigma^2 mu_k) / (s^2 + sigma^2),
    r_k(x) ∝ w_k exp(-|x - mu_k|^2 / (2 (s^2 + sigma^2))),

so samplers can be checked against a known target distribution without any weights, and
classifier-free guidance is meaningful: the conditioning ``{"class_weights": [B, K]}``
picks mixture components, the unconditional branch uses the prior weights.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_positive


class GaussianMixture:
    """Isotropic Gaussian mixture over tensors of shape ``means.shape[1:]``."""

    def __init__(self, means: torch.Tensor, std: float = 0.1, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim < 2:
            raise ValueError("means must have shape [K, *data_shape]")
        self.std = check_positive("std", std)
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-6):
            raise ValueError("weights must be K non-negative numbers summing to 1")
        w = w / w.sum()
        self.weights = w

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def _weights_for(self, cond: dict | None, batch: int) -> torch.Tensor:
        w = None if cond is None else cond.get("class_weights")
        if w is None:
            return self.weights.expand(batch, -1)
        return torch.as_tensor(w, dtype=torch.float64).expand(batch, -1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """Exact posterior mean E[x0 | x] at per-sample noise levels ``sigma`` [B]."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        mu = self.means.to(xf.device).reshape(self.num_components, -1)
        var = self.std**2 + sigma.to(torch.float64).reshape(b, 1) ** 2  # [B, 1]
        sq = torch.cdist(xf, mu) ** 2  # [B, K]
        w = self._weights_for(cond, b).to(xf.device)
        logits = torch.log(w.clamp(min=1e-300)) - sq / (2 * var)
        r = torch.softmax(logits, dim=1)  # [B, K]
        posterior_means = (self.std**2 * xf[:, None, :] + (var - self.std**2)[:, :, None] * mu[None]) / var[:, :, None]
        out = (r[:, :, None] * posterior_means).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def sample(self, n: int, generator: torch.Generator | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Exact samples from the mixture (prior weights unless ``weights`` [K] is given)."""
        w = self.weights if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        idx = torch.multinomial(w, n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.data_shape), generator=generator, dtype=torch.float64)
        return self.means[idx] + self.std * noise

    def mean(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weights if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        return torch.einsum("k,k...->...", w, self.means)

    def variance(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-coordinate variance of the mixture."""
        w = self.weights if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        m = self.mean(w)
        second = torch.einsum("k,k...->...", w, self.means**2) + self.std**2
        return second - m**2


# Segments of a seven-segment display: (row0, col0, row1, col1) in units of a 5x3 grid.
_SEGMENTS = {
    "a": (0, 0, 0, 2), "b": (0, 2, 2, 2), "c": (2, 2, 4, 2), "d": (4, 0, 4, 2),
    "e": (2, 0, 4, 0), "f": (0, 0, 2, 0), "g": (2, 0, 2, 2),
}
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def seven_segment_glyphs(size: int = 16) -> torch.Tensor:
    """The ten digits drawn as seven-segment glyphs in [-1, 1], shape [10, 1, size, size]."""
    if size < 8:
        raise ValueError(f"size must be >= 8 to draw the glyphs, got {size}")
    glyphs = -torch.ones(10, 1, size, size, dtype=torch.float64)
    top, left = size // 8, size // 4
    h, w = (size - 2 * top) / 4, (size - 2 * left) / 2
    thick = max(1, size // 12)
    for digit, segs in enumerate(_DIGIT_SEGMENTS):
        for seg in segs:
            r0, c0, r1, c1 = _SEGMENTS[seg]
            y0, y1 = top + round(r0 * h), top + round(r1 * h)
            x0, x1 = left + round(c0 * w), left + round(c1 * w)
            glyphs[digit, 0, y0 : max(y1, y0 + thick - 1) + 1, x0 : max(x1, x0 + thick - 1) + 1] = 1.0
    return glyphs


class SevenSegmentMixture(GaussianMixture):
    """A text-to-image toy with an exact denoiser: one mixture component per digit glyph.

    A prompt that names a digit ("a seven-segment 3", "the digit seven") selects its
    component; any other prompt (and the empty one) is unconditional.
    """

    def __init__(self, size: int = 16, std: float = 0.15):
        super().__init__(seven_segment_glyphs(size), std=std)
        self.size = size

    def prompt_weights(self, prompt: str) -> torch.Tensor:
        """Component weights [10] for ``prompt``: one-hot on the digit it names, else the prior."""
        words = prompt.lower().replace(",", " ").replace(".", " ").split()
        for word in words:
            if word.isdigit() and len(word) == 1:
                return torch.nn.functional.one_hot(torch.tensor(int(word)), 10).double()
            if word in DIGIT_WORDS:
                return torch.nn.functional.one_hot(torch.tensor(DIGIT_WORDS.index(word)), 10).double()
        return self.weights.clone()

    def condition(self, prompts: list[str]) -> dict:
        return {"class_weights": torch.stack([self.prompt_weights(p) for p in prompts])}

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in [-1, 1] to uint8 images [B, H, W, 3]."""
        img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()
