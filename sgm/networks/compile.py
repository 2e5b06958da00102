"""Compiled sampling: ``torch.compile`` of the UNet, channels-last memory, fused self-attention q/k/v,
CUDA-graph replay (the ``compile`` node of ``conf/sample.yaml``).

``compile: true`` (or ``compile.enabled=true``) compiles the UNet once per input shape
(``dynamic: false``) with ``fullgraph: true``: the UNet has no graph break, so one graph covers
the whole call (``tests/test_compile.py`` checks it with ``torch._dynamo.explain``). The
compiled callable lives outside the module tree (``OpenAIWrapper._compiled``), so the state dict
keeps the checkpoint's keys. Options:

* ``mode``: torch.compile's mode (``max-autotune-no-cudagraphs`` by default: autotuned kernels,
  no CUDA graphs); ``backend``: ``inductor`` (``aot_eager`` traces without generating code);
* ``cuda_graphs``: replay the compiled call as a CUDA graph (inductor's CUDA-graph trees, the
  ``reduce-overhead`` / ``max-autotune`` modes), a fixed-shape launch of every kernel at once;
  each call starts a new graph step and returns a copy of the output, so a sampler may keep
  it across steps;
* ``channels_last``: UNet weights and input in channels-last (NHWC) memory order;
* ``fuse_qkv``: one matmul for the q/k/v projections of every self-attention layer
  (:meth:`sgm.networks.attention.CrossAttention.fuse_qkv`), also without compiling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileSettings:
    """The ``compile`` node (see the module doc); ``enabled`` False leaves the UNet eager."""

    enabled: bool = False
    mode: str = "max-autotune-no-cudagraphs"
    fullgraph: bool = True
    dynamic: bool = False
    cuda_graphs: bool = False
    channels_last: bool = False
    fuse_qkv: bool = False
    backend: str = "inductor"

    @property
    def compile_mode(self) -> str:
        """The torch.compile mode that runs: ``mode``, or its CUDA-graph form with ``cuda_graphs``."""
        if not self.cuda_graphs or self.mode in ("reduce-overhead", "max-autotune"):
            return self.mode
        return "max-autotune" if self.mode == "max-autotune-no-cudagraphs" else "reduce-overhead"

    @property
    def active(self) -> bool:
        """Whether anything is to be done (compiling, channels-last or fused q/k/v)."""
        return self.enabled or self.channels_last or self.fuse_qkv

    def describe(self) -> str:
        parts = [f"torch.compile(backend={self.backend}, mode={self.compile_mode}, fullgraph={self.fullgraph}, "
                 f"dynamic={self.dynamic})" if self.enabled else "eager"]
        parts += [name for name in ("channels_last", "fuse_qkv") if getattr(self, name)]
        return " + ".join(parts)


def compile_settings(node: Any, device: str | torch.device | None = None) -> CompileSettings:
    """``compile`` as a bool, None or a mapping of :class:`CompileSettings` fields, checked
    (each error names ``compile.<key>``); ``device`` is where the run samples (CUDA graphs need CUDA)."""
    if node is None or isinstance(node, bool):
        return CompileSettings(enabled=bool(node))
    if not hasattr(node, "items"):
        raise ValueError(f"compile must be true, false or a node of {[f.name for f in fields(CompileSettings)]}, "
                         f"got {node!r}")
    values = dict(node.items())
    known = {f.name: f for f in fields(CompileSettings)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"compile has unknown keys {unknown}; known: {sorted(known)}")
    for name, value in values.items():
        want = bool if known[name].type in ("bool", bool) else str
        if not isinstance(value, want):
            raise ValueError(f"compile.{name} must be a {want.__name__}, got {value!r}")
    settings = CompileSettings(**values)
    if settings.mode not in MODES:
        raise ValueError(f"compile.mode must be one of {MODES}, got {settings.mode!r}")
    if settings.enabled:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if settings.backend not in backends:
            raise ValueError(f"compile.backend must be one of {sorted(backends)}, got {settings.backend!r}")
    if settings.cuda_graphs:
        if not settings.enabled or settings.backend != "inductor":
            raise ValueError("compile.cuda_graphs=true replays inductor's compiled graph: set compile.enabled=true "
                             "and compile.backend=inductor")
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        if not on_cuda:
            raise ValueError("compile.cuda_graphs=true needs a CUDA device; leave it false on the CPU")
    return settings


def fuse_self_attention(unet: nn.Module) -> int:
    """Fuse q/k/v of every self-attention layer (``attn1`` of blocks that attend to themselves);
    returns how many were fused."""
    from .transformer import BasicTransformerBlock

    n = 0
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock) and not block.disable_self_attn and block.attn1.qkv is None:
            block.attn1.fuse_qkv()
            n += 1
    return n


class CUDAGraphCall:
    """A compiled callable replayed as a CUDA graph: marks a new graph step per call and returns a
    copy, since the graph's output buffer is rewritten by the next replay."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.fn(*args, **kwargs).clone()


class ChannelsLastCall:
    """Calls ``fn`` with ``x`` in channels-last memory order (the weights were converted once)."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)


def compile_unet(unet: nn.Module, settings: CompileSettings) -> Callable[..., torch.Tensor] | None:
    """Apply ``settings`` to ``unet`` in place (channels-last weights, fused q/k/v) and return the
    callable that replaces ``unet(...)``, or None where the module itself is called (eager, NCHW)."""
    if settings.fuse_qkv:
        log.info("compile.fuse_qkv: fused q/k/v of %d self-attention layers", fuse_self_attention(unet))
    fn: Callable[..., torch.Tensor] | None = None
    if settings.channels_last:
        unet.to(memory_format=torch.channels_last)
    if settings.enabled:
        fn = torch.compile(unet, backend=settings.backend, mode=settings.compile_mode if settings.backend == "inductor"
                           else None, fullgraph=settings.fullgraph, dynamic=settings.dynamic)
        if settings.cuda_graphs:
            fn = CUDAGraphCall(fn)
    if settings.channels_last:
        fn = ChannelsLastCall(fn if fn is not None else unet)
    return fn


def apply_compile(engine: nn.Module, settings: CompileSettings) -> str:
    """Set ``settings`` on an engine's network wrapper (``engine.model``, whose ``_compiled`` slot
    :class:`~sgm.networks.wrapper.OpenAIWrapper` calls instead of the UNet); returns a description."""
    wrapper = engine.model
    if not hasattr(wrapper, "_compiled"):
        raise TypeError(f"compile: the network wrapper {type(wrapper).__name__} has no _compiled slot "
                        "(use sgm.networks.wrapper.OpenAIWrapper)")
    fn = compile_unet(wrapper.diffusion_model, settings)
    wrapper._compiled = [fn] if fn is not None else []
    return settings.describe()
