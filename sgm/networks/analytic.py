"""The analytic digit model as DiffusionEngine parts: an exact network, a prompt embedder.

With :class:`sgm.diffusion.scaling.X0Scaling` the "network" returns the exact posterior
mean of :class:`sgm.diffusion.analytic.SevenSegmentMixture`, so the whole engine path
(conditioner, denoiser, sampler, first stage, Lightning, writers) runs without weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.analytic import SevenSegmentMixture


class AnalyticDigitNetwork(nn.Module):
    """forward(x, timesteps=sigma, y=class weights [B, 10]) -> exact E[x0 | x]."""

    def __init__(self, size: int = 16, std: float = 0.15):
        super().__init__()
        self.mixture = SevenSegmentMixture(size=size, std=std)
        self.in_channels = self.out_channels = 1

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None, y: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        cond = None if y is None else {"class_weights": y.double().cpu()}
        out = self.mixture(x.double().cpu(), timesteps.double().cpu(), cond)
        return out.to(device=x.device, dtype=x.dtype)


class DigitPromptEmbedder(nn.Module):
    """Prompt -> one-hot weights of the digit it names ([B, 10]; the prior when none is named).

    An all-zero output (the zeroed unconditional branch) means "no preference" to the network.
    """

    def __init__(self, input_key: str = "txt", is_trainable: bool = False, ucg_rate: float = 0.0):
        super().__init__()
        self.input_key, self.is_trainable, self.ucg_rate, self.legacy_ucg_val = input_key, is_trainable, ucg_rate, None
        self._mixture = SevenSegmentMixture(size=8)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self._mixture.prompt_weights(p) for p in prompts]).float()
