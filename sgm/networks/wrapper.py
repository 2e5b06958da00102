"""The network wrapper between the denoiser and the UNet (sgm ``OpenAIWrapper``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .patches import OPTIONS_KEY, UNetPatch, merge_options
from .reuse import reuse


class OpenAIWrapper(nn.Module):
    """Routes the conditioning dict to the UNet: concat -> channels, crossattn -> context, vector -> y.

    ``c["transformer_options"]`` (a guider branch's options) and the network-level
    ``patches`` (empty by default; settable: ``wrapper.patches = [FreeU()]``) reach the UNet
    as ``transformer_options=``, only when there is something (see :mod:`sgm.networks.patches`).
    """

    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model
        # torch.compile'd forward kept outside the module tree, so state_dict keys stay the original ones
        self._compiled = [torch.compile(diffusion_model)] if compile_model else []
        self.patches: list[UNetPatch] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict, **kwargs: Any) -> torch.Tensor:
        if c.get("concat") is not None:
            x = torch.cat((x, c["concat"].to(x.dtype)), dim=1)
        context, y = c.get("crossattn"), c.get("vector")
        options = merge_options(c.get(OPTIONS_KEY), self.patches)
        if options:
            kwargs["transformer_options"] = options
        dtype = module_dtype(self.diffusion_model)
        net = self._compiled[0] if self._compiled else self.diffusion_model
        return net(
            x.to(dtype), timesteps=t, context=None if context is None else _cast(context, dtype),
            y=None if y is None else _cast(y, dtype), **kwargs,
        ).to(x.dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, one cast per sampling run (the conditioning is the same at every step)."""
    return t if t.dtype == dtype else reuse(("cast", dtype), (t,), lambda: t.to(dtype))


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
