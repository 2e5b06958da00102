"""LoRA adapters for training: injected with forward hooks, so the engine's own keys never change.

The adapters live in ``engine.lora_network`` (a :class:`LoRANetwork`, a ``ModuleDict``
keyed by kohya name), so they are engine parameters (the optimizer, ``.to(device)`` and
Lightning checkpoints see them) and ``engine.lora_network.state_dict()`` is the kohya
file layout. The wrapped layers are untouched: a forward hook adds
``alpha / r * up(down(dropout(x)))`` to a Linear/Conv2d output; for bigG's q/k/v (row
thirds of ``nn.MultiheadAttention.in_proj_weight``) a pre-hook swaps in
``in_proj_weight + [dq; dk; dv]`` for the duration of the call (as
``torch.func.functional_call`` does) and the post-hook puts the parameter back.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..networks.util import dropout_layer
from .delta import lora_delta, merge_delta
from .names import Target, select_targets, text_encoders
from .spec import LoRASpec

log = logging.getLogger(__name__)

ATTR = "lora_network"


class LoRAAdapter(nn.Module):
    """``lora_down`` [r, in] (conv: [r, in, kh, kw], the base layer's stride and padding),
    ``lora_up`` [out, r] (conv: [out, r, 1, 1]), ``alpha`` (0-d buffer); scale alpha / r."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 kernel_size: tuple[int, int] | None = None, stride: tuple[int, int] | int = 1,
                 padding: tuple[int, int] | int | str = 0, init: str = "kohya",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        if kernel_size is None:
            self.lora_down: nn.Module = nn.Linear(in_features, rank, bias=False, **kw)
            self.lora_up: nn.Module = nn.Linear(rank, out_features, bias=False, **kw)
        else:
            self.lora_down = nn.Conv2d(in_features, rank, kernel_size, stride, padding, bias=False, **kw)
            self.lora_up = nn.Conv2d(rank, out_features, 1, bias=False, **kw)
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device, dtype=torch.float32))
        self.rank = int(rank)
        self.scale = float(alpha) / int(rank)
        self.dropout = dropout_layer(dropout)
        if init == "gaussian":
            nn.init.normal_(self.lora_down.weight, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_down.weight.dtype
        return self.lora_up(self.lora_down(self.dropout(x.to(dtype)))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``scale * up @ down`` with the base layer's weight shape (differentiable)."""
        return lora_delta(self.lora_up.weight, self.lora_down.weight, self.scale)


class _AddDelta:
    """Forward hook of a Linear/Conv2d: output + adapter(input). A callable object, so deepcopy follows it."""

    def __init__(self, adapter: LoRAAdapter):
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.adapter(args[0]).to(output.dtype)


class _InProjDelta:
    """Pre/post hooks of an ``nn.MultiheadAttention``: q/k/v deltas added to ``in_proj_weight`` for one call."""

    def __init__(self, adapters: list[LoRAAdapter | None]):
        self.adapters = adapters
        self.saved: list[torch.Tensor] = []

    def pre(self, module: nn.Module, args: tuple) -> None:
        w = module._parameters["in_proj_weight"]
        n = w.shape[0] // 3
        parts = [a.delta_weight().to(w.dtype) if a is not None else w.new_zeros(n, w.shape[1]) for a in self.adapters]
        self.saved.append(w)
        module._parameters["in_proj_weight"] = w + torch.cat(parts)

    def post(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.saved:
            module._parameters["in_proj_weight"] = self.saved.pop()


class LoRANetwork(nn.ModuleDict):
    """The adapters of one engine by kohya name; ``state_dict()`` has the kohya keys of a LoRA file."""

    def __init__(self, spec: LoRASpec):
        super().__init__()
        self.spec = spec
        self.targets: dict[str, Target] = {}
        self._handles: list = []
        self._trainable_flags: list[tuple[nn.Module, bool]] = []

    def attach(self, targets: list[Target]) -> None:
        """Register the hooks that add each adapter to its layer."""
        thirds: dict[int, tuple[nn.Module, list]] = {}
        for t in targets:
            self.targets[t.name] = t
            adapter = self[t.name]
            if t.part is None:
                self._handles.append(t.module.register_forward_hook(_AddDelta(adapter)))
            else:
                thirds.setdefault(id(t.module), (t.module, [None, None, None]))[1][t.part] = adapter
        for module, adapters in thirds.values():
            hook = _InProjDelta(adapters)
            self._handles.append(module.register_forward_pre_hook(hook.pre))
            self._handles.append(module.register_forward_hook(hook.post, always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for emb, flag in self._trainable_flags:
            emb.is_trainable = flag
        self._trainable_flags.clear()


def inject_lora(engine: nn.Module, spec: LoRASpec, dtype: torch.dtype | None = None) -> list[str]:
    """Add LoRA adapters to the layers ``spec`` selects; freeze everything else. Returns their kohya names.

    Works on a meta-device engine too (the adapters are then on meta). Adapters are float32
    unless ``dtype`` says otherwise. With ``spec.train_text_encoders`` the adapted text
    encoders are marked ``is_trainable`` so the conditioner runs them with gradients (their
    base weights stay frozen). Undo with :func:`remove_lora` or :func:`merge_trained_lora`.
    """
    if not isinstance(spec, LoRASpec):
        raise TypeError(f"spec must be a LoRASpec, got {type(spec).__name__}")
    if getattr(engine, ATTR, None) is not None:
        raise RuntimeError("this engine already has LoRA adapters; call remove_lora or merge_trained_lora first")
    targets = select_targets(engine, spec)
    engine.requires_grad_(False)
    net = LoRANetwork(spec)
    for t in targets:
        conv3 = t.is_conv and t.kernel_size != (1, 1)
        rank, alpha = (spec.conv_rank, spec.conv_alpha) if conv3 else (spec.rank, spec.alpha)
        if rank > min(t.in_features, t.out_features):
            log.warning("LoRA rank %d exceeds the smaller side of %s", rank, t.describe())
        conv = {}
        if t.is_conv:
            conv = {"kernel_size": t.kernel_size, "stride": t.module.stride, "padding": t.module.padding}
        net[t.name] = LoRAAdapter(t.in_features, t.out_features, rank, alpha,
                                  dropout=spec.dropout if t.part is None else 0.0, init=spec.init,
                                  device=t.weight.device, dtype=dtype or torch.float32, **conv)
    net.attach(targets)
    if spec.train_text_encoders:
        tes = text_encoders(engine)
        for group in sorted({t.group for t in targets} - {"unet"}):
            emb = tes[group]
            net._trainable_flags.append((emb, bool(getattr(emb, "is_trainable", False))))
            emb.is_trainable = True
    setattr(engine, ATTR, net)
    net.requires_grad_(True)
    log.info("LoRA: %d adapters (%s), %d trainable parameters", len(net), ", ".join(sorted({t.group for t in targets})),
             sum(p.numel() for p in net.parameters()))
    return list(net.keys())


def lora_network(engine: nn.Module) -> LoRANetwork:
    net = getattr(engine, ATTR, None)
    if not isinstance(net, LoRANetwork):
        raise RuntimeError("this engine has no LoRA adapters (call inject_lora first)")
    return net


def remove_lora(engine: nn.Module) -> LoRANetwork:
    """Take the adapters off (hooks removed, base weights untouched); returns the removed network."""
    net = lora_network(engine)
    net.detach()
    delattr(engine, ATTR)
    return net


@torch.no_grad()
def merge_trained_lora(engine: nn.Module, strength: float = 1.0) -> list[str]:
    """Add ``strength`` x each adapter's update to its base weight, then remove the adapters (permanent)."""
    net = lora_network(engine)
    for name, t in net.targets.items():
        merge_delta(t.weight, strength * net[name].delta_weight().float())
    names = list(net.keys())
    remove_lora(engine)
    return names
