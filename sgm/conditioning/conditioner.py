"""GeneralConditioner: runs every embedder on its batch entry and routes the outputs.

reference/FORMATS.md, "Conditioning": outputs are routed by dimensionality and
concatenated in config order: 2-D -> ``vector`` (dim 1), 3-D -> ``crossattn`` (dim 2),
4-D/5-D -> ``concat`` (dim 1). The state-dict keys are ``embedders.N.…`` (the checkpoint's
``conditioner.embedders.N.…`` under the engine).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ..config import instantiate

log = logging.getLogger(__name__)

#: Batch entries whose number of values per sample is known (for :meth:`GeneralConditioner.output_widths`).
INPUT_WIDTHS: dict[str, int] = {
    "original_size_as_tuple": 2,
    "crop_coords_top_left": 2,
    "target_size_as_tuple": 2,
    "aesthetic_score": 1,
}

_ROUTING_KEYS = ("input_key", "input_keys", "is_trainable", "ucg_rate", "legacy_ucg_val")


def _none_like(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", ""))


def build_embedder(spec: Any) -> nn.Module:
    """An embedder from a built module, an sgm dict (``target``/``params`` + routing keys) or a ``_target_`` node."""
    if isinstance(spec, nn.Module):
        embedder = spec
        routing: dict[str, Any] = {}
    elif isinstance(spec, Mapping):
        from omegaconf import DictConfig, OmegaConf

        node = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
        routing = {k: node.pop(k) for k in _ROUTING_KEYS if k in node}
        if "target" not in node and "_target_" not in node:
            raise ValueError(f"embedder config needs 'target' (sgm) or '_target_' (Hydra): {sorted(node)}")
        embedder = instantiate(node)
        if not isinstance(embedder, nn.Module):
            raise TypeError(f"embedder config built a {type(embedder).__name__}, not an nn.Module")
    else:
        raise TypeError(f"an embedder must be an nn.Module or a config mapping, got {type(spec).__name__}")
    for key, value in routing.items():
        setattr(embedder, key, list(value) if key == "input_keys" and value is not None else value)
    for key, default in (("is_trainable", False), ("ucg_rate", 0.0), ("legacy_ucg_val", None)):
        if not hasattr(embedder, key):
            setattr(embedder, key, default)
    embedder.is_trainable = bool(embedder.is_trainable)
    embedder.ucg_rate = float(embedder.ucg_rate)
    if getattr(embedder, "input_key", None) is None and not getattr(embedder, "input_keys", None):
        raise ValueError(f"{type(embedder).__name__} has neither input_key nor input_keys")
    return embedder


def _freeze(embedder: nn.Module) -> None:
    if hasattr(embedder, "freeze"):
        embedder.freeze()
    else:
        for p in embedder.parameters():
            p.requires_grad_(False)
        embedder.eval()


class GeneralConditioner(nn.Module):
    """The conditioning stack: ``forward(batch) -> {"crossattn": [B, 77, C], "vector": [B, V], ...}``.

    ``emb_models``: embedders in config order, as built modules (Hydra) or sgm dicts
    ``{is_trainable, input_key, target, params, ucg_rate, legacy_ucg_val}``. Non-trainable
    embedders are frozen and run under ``no_grad``. ``lora_ranks`` / ``lora_weights``
    (a Cremage extension seen in some configs) are accepted and ignored: LoRA is
    applied by :mod:`sgm.lora`.
    """

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models: Sequence[Any], lora_ranks: Any = None, lora_weights: Any = None):
        super().__init__()
        if not _none_like(lora_ranks) or not _none_like(lora_weights):
            log.warning("GeneralConditioner ignores lora_ranks/lora_weights; apply LoRA with sgm.lora")
        embedders = []
        for n, spec in enumerate(emb_models):
            embedder = build_embedder(spec)
            if not embedder.is_trainable:
                _freeze(embedder)
            log.debug(
                "embedder %d: %s input=%s trainable=%s ucg_rate=%s",
                n,
                type(embedder).__name__,
                getattr(embedder, "input_key", None) or getattr(embedder, "input_keys", None),
                embedder.is_trainable,
                embedder.ucg_rate,
            )
            embedders.append(embedder)
        if not embedders:
            raise ValueError("GeneralConditioner needs at least one embedder")
        self.embedders = nn.ModuleList(embedders)

    def train(self, mode: bool = True) -> "GeneralConditioner":
        super().train(mode)
        for embedder in self.embedders:
            if not embedder.is_trainable:
                embedder.train(False)
        return self

    @staticmethod
    def _keys(embedder: nn.Module) -> list[str]:
        key = getattr(embedder, "input_key", None)
        return [key] if key is not None else list(embedder.input_keys)

    def _drop_inputs(self, embedder: nn.Module, value: Any, generator: torch.Generator | None) -> Any:
        """sgm's legacy unconditional training: replace whole inputs by ``legacy_ucg_val``."""
        drop = _draw(len(value), embedder.ucg_rate, generator)
        if not drop.any():
            return value
        if isinstance(value, torch.Tensor):
            value = value.clone()
            fill = torch.as_tensor(embedder.legacy_ucg_val, dtype=value.dtype, device=value.device)
            value[drop.to(value.device)] = fill
            return value
        return [embedder.legacy_ucg_val if d else v for v, d in zip(value, drop.tolist())]

    def forward(
        self,
        batch: Mapping[str, Any],
        force_zero_embeddings: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embed ``batch`` (e.g. ``txt``: list of prompts, ``original_size_as_tuple``: [B, 2]).

        ``force_zero_embeddings``: input keys whose embeddings are replaced by zeros (the
        SDXL base unconditional branch zeros ``txt``). In training mode each embedder with
        ``ucg_rate > 0`` drops its conditioning per sample (drawn from ``generator``).
        """
        force = set(force_zero_embeddings or ())
        parts: dict[str, list[torch.Tensor]] = {}
        for embedder in self.embedders:
            keys = self._keys(embedder)
            missing = [k for k in keys if k not in batch]
            if missing:
                raise KeyError(
                    f"batch has no {missing[0]!r} (needed by {type(embedder).__name__}); it has {sorted(batch)}"
                )
            inputs = [batch[k] for k in keys]
            dropping = self.training and embedder.ucg_rate > 0.0
            zero = any(k in force for k in keys)
            # zeroed anyway: skip the encoder where its output shapes are known (no draws to keep in step)
            skip = zero and not dropping and not _autocast() and hasattr(embedder, "zero_outputs")
            outs = embedder.zero_outputs(*inputs) if skip else None
            if outs is not None:
                for emb in outs:
                    parts.setdefault(self.OUTPUT_DIM2KEYS[emb.ndim], []).append(emb)
                continue
            if dropping and embedder.legacy_ucg_val is not None:
                inputs = [self._drop_inputs(embedder, v, generator) for v in inputs]
            with nullcontext() if embedder.is_trainable else torch.no_grad():
                out = embedder(*inputs)
            outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            keep = None
            if dropping and embedder.legacy_ucg_val is None:
                keep = ~_draw(outs[0].shape[0], embedder.ucg_rate, generator)
            for emb in outs:
                if not isinstance(emb, torch.Tensor) or emb.ndim not in self.OUTPUT_DIM2KEYS:
                    raise ValueError(
                        f"{type(embedder).__name__} returned {getattr(emb, 'shape', type(emb).__name__)}; "
                        f"expected tensors with {sorted(self.OUTPUT_DIM2KEYS)} dims"
                    )
                if zero:
                    emb = torch.zeros_like(emb)
                elif keep is not None:
                    emb = emb * keep.to(device=emb.device, dtype=emb.dtype).reshape(-1, *([1] * (emb.ndim - 1)))
                parts.setdefault(self.OUTPUT_DIM2KEYS[emb.ndim], []).append(emb)
        return {
            key: torch.cat([e.to(embs[0].device) for e in embs], self.KEY2CATDIM[key]) for key, embs in parts.items()
        }

    def get_unconditional_conditioning(
        self,
        batch_c: Mapping[str, Any],
        batch_uc: Mapping[str, Any] | None = None,
        force_uc_zero_embeddings: Sequence[str] | None = None,
        force_cond_zero_embeddings: Sequence[str] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(c, uc) without any ucg dropout; uc from ``batch_uc`` (default ``batch_c``) with
        ``force_uc_zero_embeddings`` zeroed (SDXL base: ``["txt"]``)."""
        rates = [embedder.ucg_rate for embedder in self.embedders]
        try:
            for embedder in self.embedders:
                embedder.ucg_rate = 0.0
            c = self(batch_c, force_cond_zero_embeddings)
            uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        finally:
            for embedder, rate in zip(self.embedders, rates):
                embedder.ucg_rate = rate
        return c, uc

    def output_widths(self, batch: Mapping[str, Any] | None = None) -> dict[str, int]:
        """Feature width per output key without running the encoders, e.g. SDXL base
        ``{"crossattn": 2048, "vector": 2816}``. Values per sample of each input come from
        ``batch`` (an example) or :data:`INPUT_WIDTHS`."""
        widths: dict[str, int] = {}
        for embedder in self.embedders:
            key = self._keys(embedder)[0]
            n = None
            if batch is not None and key in batch and isinstance(batch[key], torch.Tensor):
                value = batch[key]
                n = 1 if value.ndim == 1 else value.shape[-1]
            elif key in INPUT_WIDTHS:
                n = INPUT_WIDTHS[key]
            for out_key, width in embedder.output_widths(n).items():
                widths[out_key] = widths.get(out_key, 0) + width
        return widths


def _autocast() -> bool:
    """Whether autocast is on (it may change an encoder's output dtype, which zero outputs cannot know)."""
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))


def _draw(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """[n] bool, each True with probability p (on the generator's device, default CPU)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device) < p
