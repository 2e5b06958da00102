"""Attention backends and the multi-head cross-attention layer of the UNet.

Backends (what :func:`attention` computes softmax(Q K^T / sqrt(d)) V with):

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (the default);
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` when xformers is installed
  and the tensors are on a GPU, else SDPA (one log warning per process when it is missing);
- ``"math"``: the plain formula in float32, for debugging.

Which one runs: a backend forced with ``attention_backend(name)`` (context manager) or
``set_attention_backend(name, force=True)``; else the module's own ``backend`` attribute;
else the global default set by ``set_attention_backend(name)``. The original config values
map as: ``softmax``/``vanilla`` -> follow the default, ``softmax-xformers``/``vanilla-xformers``
-> ``xformers`` (SDPA when it is not installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .reuse import reuse
from .util import dropout_layer

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers", "math")
_CONFIG_NAMES: dict[str, str | None] = {
    "softmax": None,
    "vanilla": None,
    "softmax-xformers": "xformers",
    "vanilla-xformers": "xformers",
}

_state: dict[str, Any] = {"default": "sdpa", "forced": None, "xformers_warned": False}
_xformers_ops: Any = None


def xformers_available() -> bool:
    """Whether ``xformers.ops`` can be imported (checked once, lazily)."""
    global _xformers_ops
    if _xformers_ops is None:
        if importlib.util.find_spec("xformers") is None:
            _xformers_ops = False
        else:
            try:
                import xformers.ops as xops

                _xformers_ops = xops
            except Exception as err:  # broken install: treat as absent
                log.debug("xformers is installed but cannot be imported: %s", err)
                _xformers_ops = False
    return _xformers_ops is not False


def _check(name: str, param: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{param} must be one of {BACKENDS}, got {name!r}")
    return name


def _available(name: str) -> str:
    """``name``, or ``"sdpa"`` when xformers is asked for but missing (logged once per process)."""
    if name == "xformers" and not xformers_available():
        if not _state["xformers_warned"]:
            _state["xformers_warned"] = True
            log.warning("xformers attention was requested but xformers is not installed: using PyTorch SDPA")
        return "sdpa"
    return name


def backend_from_config(value: str | None, param: str = "attn_type") -> str | None:
    """Map an original config value (``softmax-xformers``...) or a backend name to a module override."""
    if value is None:
        return None
    if value in _CONFIG_NAMES:
        name = _CONFIG_NAMES[value]
    else:
        name = _check(value, param)
    if name is not None:
        _available(name)  # log the fallback now, at build time
    return name


def set_attention_backend(name: str, force: bool = False) -> None:
    """Set the global default backend; with ``force`` it also overrides every module's own choice."""
    _check(name)
    _available(name)
    if force:
        _state["forced"] = name
    else:
        _state["default"] = name
        _state["forced"] = None


def get_attention_backend() -> str:
    """The backend a module without its own override uses now."""
    return _state["forced"] or _state["default"]


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Run every attention layer with ``name`` inside the block (overrides module choices)."""
    _check(name)
    _available(name)
    previous = _state["forced"]
    _state["forced"] = name
    try:
        yield
    finally:
        _state["forced"] = previous


def resolve_backend(module_backend: str | None = None) -> str:
    """The backend that runs for a module whose own override is ``module_backend``."""
    name = _state["forced"] or module_backend or _state["default"]
    return _available(name)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, backend: str | None = None
) -> torch.Tensor:
    """Multi-head attention over ``q`` [B, N, H*D] and ``k``, ``v`` [B, M, H*D]; returns [B, N, H*D].

    ``backend`` is the caller's override (None: the global setting), see the module doc.
    """
    b, n, inner = q.shape
    d = inner // heads
    name = resolve_backend(backend)
    if name == "xformers" and q.is_cuda:
        split = lambda t: t.reshape(b, t.shape[1], heads, d)  # noqa: E731
        out = _xformers_ops.memory_efficient_attention(split(q), split(k), split(v))
        return out.reshape(b, n, inner)
    q, k, v = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    if name == "math":
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * d**-0.5
        out = torch.matmul(scores.softmax(dim=-1), v.float()).to(v.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention with bias-free q/k/v projections (ldm ``CrossAttention``).

    Keys: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``. Attends to ``context`` [B, M, context_dim]
    when given, else to ``x`` itself. ``transformer_options["patches"]`` may replace the output
    (:mod:`sgm.networks.patches`); ``name`` is the layer's module name inside its UNet.
    """

    name: str = ""  # set by UNetModel: plain attribute, not state
    qkv: torch.Tensor | None = None  # the fused q/k/v weight after fuse_qkv() (self-attention calls only)

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.backend = None if backend is None else _check(backend)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), dropout_layer(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        if transformer_options:
            for patch in transformer_options.get("patches", ()):
                out = patch.attention(self, x, context)
                if out is not None:
                    return out
        if context is None and self.qkv is not None:
            q, k, v = F.linear(x, self.qkv).chunk(3, dim=-1)
            return self.to_out(attention(q, k, v, self.heads, self.backend))
        if context is None:
            k, v = self.to_k(x), self.to_v(x)
        else:  # the prompt's keys and values: the same at every step of a sampling run (sgm.networks.reuse)
            k, v = reuse(self, (context,), lambda: (self.to_k(context), self.to_v(context)))
        return self.to_out(attention(self.to_q(x), k, v, self.heads, self.backend))

    def fuse_qkv(self) -> None:
        """One [3 * inner, dim] weight for the self-attention projections: a call without context
        makes one matmul instead of three (the same products, summed in another order at most).
        ``to_q/to_k/to_v.weight`` become views of it, so the state dict keeps its keys and an
        in-place change of a projection (a merged LoRA) changes the fused weight too."""
        lins = (self.to_q, self.to_k, self.to_v)
        if len({lin.in_features for lin in lins}) != 1:
            raise ValueError(f"{self.name or 'CrossAttention'}: q/k/v read inputs of different widths; "
                             "only self-attention projections can be fused")
        if any(lin._forward_hooks or lin._forward_pre_hooks for lin in lins):
            raise ValueError(f"{self.name or 'CrossAttention'}: a projection has forward hooks (a LoRA adapter?) "
                             "that a fused call would bypass: merge the LoRA or leave compile.fuse_qkv=false")
        with torch.no_grad():
            fused = torch.cat([lin.weight for lin in lins])
        self.qkv = fused  # plain attribute: not state, follows the module in _apply below
        n = self.to_q.out_features
        for i, lin in enumerate(lins):
            lin.weight = nn.Parameter(fused[i * n : (i + 1) * n], requires_grad=lin.weight.requires_grad)

    def _apply(self, fn: Any, recurse: bool = True) -> "CrossAttention":
        out = super()._apply(fn, recurse)
        if self.qkv is not None:  # a move or cast copies each view apart: fuse the moved weights again
            self.fuse_qkv()
        return out
