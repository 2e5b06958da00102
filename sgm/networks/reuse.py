"""Results that stay the same at every step of one sampling run, computed once per run.

Inside :func:`sampling_run` (entered by ``BaseDiffusionSampler.sample``), :func:`reuse` returns the
value it computed before for the same tag and the same input tensor *objects*: the prompt's
conditioning is one tensor for the whole run, so its classifier-free batch (uncond + cond,
``sgm.diffusion.guiders``), its cast to the UNet's dtype (``OpenAIWrapper``) and every
cross-attention layer's keys and values of it (``CrossAttention``) are made at the first step
and reused at the others: the same operations on the same inputs, so the same values. An entry
goes when one of its inputs is freed (a weak reference's callback), and all go when the run ends.

Nothing is reused with gradients enabled (training) or while ``torch.compile`` traces (the
compiled UNet stays one graph), or outside a sampling run (a direct network call computes).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Any, Callable, Hashable, Iterator, TypeVar

import torch

T = TypeVar("T")

_Entries = dict[tuple, tuple[list[weakref.ref], Any]]
_RUN: contextvars.ContextVar[_Entries | None] = contextvars.ContextVar("sgm_sampling_run", default=None)


@contextlib.contextmanager
def sampling_run() -> Iterator[None]:
    """Reuse step-invariant results inside the block (nested blocks share the outer run's)."""
    if _RUN.get() is not None:
        yield
        return
    entries: _Entries = {}
    token = _RUN.set(entries)
    try:
        yield
    finally:
        _RUN.reset(token)
        entries.clear()


def reuse(tag: Hashable, inputs: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
    """``compute()``, or inside :func:`sampling_run` its earlier result for ``tag`` and these input objects.

    ``compute`` must depend on nothing that changes during a run but ``inputs`` (weights do not change
    while a sampler runs; the tensors are matched by identity, so they are not to be changed in place).
    """
    if torch.compiler.is_compiling():  # first: a traced UNet sees no lookup (no graph break)
        return compute()
    entries = _RUN.get()
    if entries is None or torch.is_grad_enabled():
        return compute()
    key = (tag, *(id(t) for t in inputs))
    hit = entries.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], inputs)):
        return hit[1]
    value = compute()

    def forget(_ref: weakref.ref, key: tuple = key) -> None:
        entries.pop(key, None)

    entries[key] = ([weakref.ref(t, forget) for t in inputs], value)
    return value
