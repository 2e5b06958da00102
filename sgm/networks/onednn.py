"""CPU convolutions with or without oneDNN, chosen per batch of latents (``cpu_onednn``, beside the thread policy).

PyTorch runs CPU convolutions through oneDNN (``torch.backends.mkldnn``) by default. For a small
UNet on a small batch of small latents each oneDNN convolution is short and its fixed cost
(primitive lookup, layout reorders) dominates; ATen's own kernels (im2col + BLAS) are faster there.
The switch is global in torch, so it is applied only around sampling (:func:`onednn_context` of
:func:`resolve_onednn`, entered by :meth:`sgm.engine.DiffusionEngine.sample_latents`), never left
set for other code. Both paths compute the same convolution; results agree within float rounding
(tests/test_cpu_policy.py).

The measured rule is the work of a network call, the batch times the latent's positions, more than
the UNet's width (quiet machine, one thread, docs/benchmarks.md, "oneDNN convolutions per model
size"): for one image at 8x8 (32x32 pixels through a 4x VAE: the shipped digit model, tiny; a CFG
call of batch 2) the call took x0.80-0.84 the time without oneDNN and for two x0.97-0.99, but from
four images on (batch 8 with CFG) ATen's kernels were the slower ones, x1.14-1.17 at four and
x1.65-1.80 at eight images (run.py's batch_size); a single 16x16 latent was about even (x0.97) and
larger work up to x1.13 slower without oneDNN, so oneDNN stays on there, and at SDXL's 128x128.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

#: ``cpu_onednn: auto`` turns oneDNN off for float32 latents of at most this many positions in the whole
#: image batch (B x h x w): two 8x8 latents (two 32x32 images of the shipped model), where it measured slower
#: whatever the UNet's width (docs/benchmarks.md, section "oneDNN convolutions per model size")
SMALL_BATCH_POSITIONS = 128


def check_cpu_onednn(value: Any) -> str | bool:
    """``cpu_onednn`` as ``"auto"``, True or False (validate step: no weight is read)."""
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return "auto"
    if isinstance(value, bool):
        return value
    raise ValueError(f"cpu_onednn must be auto, true or false, got {value!r}: auto turns oneDNN convolutions off "
                     f"on the CPU for float32 latents of at most {SMALL_BATCH_POSITIONS} positions per batch "
                     "(two 8x8 latents)")


def auto_onednn(latent_shape: Sequence[int], dtype: torch.dtype) -> bool:
    """``cpu_onednn: auto`` for a batch of image latents of ``latent_shape`` ([B, C, h, w]) in ``dtype``:
    off (False) for float32 with B x h x w <= :data:`SMALL_BATCH_POSITIONS`, else on. Other dtypes keep
    oneDNN: ATen's bfloat16/float16 CPU convolutions have no fast path without it."""
    positions = latent_shape[0] * math.prod(latent_shape[2:])
    return not (dtype == torch.float32 and positions <= SMALL_BATCH_POSITIONS)


def resolve_onednn(setting: Any, latent: torch.Tensor, dtype: torch.dtype) -> bool | None:
    """Whether sampling ``latent`` with a UNet in ``dtype`` runs its convolutions through oneDNN:
    ``setting`` when True/False, :func:`auto_onednn` for ``"auto"``; None (leave torch as it is) for
    ``setting`` None or a latent off the CPU (the switch only concerns CPU kernels)."""
    if setting is None or latent.device.type != "cpu":
        return None
    setting = check_cpu_onednn(setting)
    enabled = auto_onednn(latent.shape, dtype) if setting == "auto" else bool(setting)
    log.debug("CPU convolutions %s oneDNN (cpu_onednn=%s, latent %s, %s)", "with" if enabled else "without",
              setting, tuple(latent.shape), dtype)
    return enabled


def set_cpu_onednn(setting: Any, engine: Any) -> str | bool:
    """run.py's ``cpu_onednn`` on ``engine`` (its sampling resolves it per batch of latents); returns it."""
    engine.cpu_onednn = check_cpu_onednn(setting)
    return engine.cpu_onednn


@contextlib.contextmanager
def onednn_context(enabled: bool | None) -> Iterator[None]:
    """oneDNN on or off inside the block, restored after it (its other flags untouched); None changes nothing."""
    if enabled is None or enabled == torch.backends.mkldnn.enabled:
        yield
        return
    before = torch.backends.mkldnn.set_flags(bool(enabled), None, None, None)
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(*before)
