"""OpenCLIP text encoder (SDXL's bigG: base text encoder 2, the refiner's only one).

Only open_clip's text tower is built (``open_clip.model._build_text_tower`` from the
arch's model config) and kept as ``model``, with ``logit_scale`` added, so the keys are
those of the checkpoints (reference/FORMATS.md): ``model.token_embedding.weight``,
``model.positional_embedding``, ``model.transformer.resblocks.N.…``, ``model.ln_final.…``,
``model.text_projection`` (used as ``x @ P``), ``model.logit_scale``; no ``visual.*``.
Pretrained tags are never downloaded: the weights come from a checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

from .embedders import AbstractEmbModel, as_text_list, causal_mask, text_zero_outputs, tokenize

log = logging.getLogger(__name__)


def import_open_clip() -> ModuleType:
    """The ``open_clip`` package, first imported with W&B hidden.

    open_clip's ``__init__`` imports timm, and ``timm.utils.summary`` imports wandb (when it can)
    for timm's own training logs, which nothing here uses: about 0.3 s, and a run with ``~logger``
    must not import W&B. While open_clip is first imported, ``sys.modules["wandb"]`` is None, so
    that import raises ImportError and timm goes on without it; an imported W&B is left alone."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None  # type: ignore[assignment] - `import wandb` raises ImportError meanwhile
    try:
        import open_clip
    finally:
        if hide and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    return open_clip


def text_tower_config(
    arch: str | Mapping[str, Any], text_cfg: Mapping[str, Any] | None = None, embed_dim: int | None = None
) -> tuple[int, dict[str, Any], bool]:
    """(embed_dim, text_cfg, quick_gelu) of an open_clip arch name or model-config dict, with overrides."""
    if isinstance(arch, str):
        if arch.startswith("hf-hub:"):
            raise ValueError(f"arch {arch!r} would be downloaded; give a bundled arch name or a config dict")
        cfg = import_open_clip().get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip arch {arch!r} (see open_clip.list_models())")
    elif isinstance(arch, Mapping):
        cfg = dict(arch)
    else:
        raise TypeError(f"arch must be an open_clip arch name or a model-config mapping, got {type(arch).__name__}")
    text = {**dict(cfg.get("text_cfg") or {}), **dict(text_cfg or {})}
    if text.get("hf_model_name"):
        raise ValueError(f"arch {arch!r} has a Hugging Face text tower; only open_clip's TextTransformer is supported")
    dim = int(embed_dim if embed_dim is not None else cfg["embed_dim"])
    return dim, text, bool(cfg.get("quick_gelu", False))


class FrozenOpenCLIPEmbedder2(AbstractEmbModel):
    """OpenCLIP text encoder: prompts -> [B, 77, width] (and pooled [B, embed_dim]).

    ``layer``: ``"last"`` (output of the last residual block) or ``"penultimate"`` (input
    of the last block). With ``legacy=False`` (SDXL) the layer output is returned without
    ``ln_final``, and ``always_return_pooled`` returns ``(z, pooled)`` where
    ``pooled = ln_final(last)[arange(B), tokens.argmax(-1)] @ text_projection``.
    ``legacy=True`` (SD 2.x style) returns ``ln_final(z)`` only.
    ``arch``: open_clip arch name or model-config dict (``embed_dim``, ``text_cfg``);
    ``text_cfg`` / ``embed_dim`` override it (tiny models in tests). ``version`` names the
    pretrained tag, which is never downloaded. ``device`` is accepted for sgm configs.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str | Mapping[str, Any] = "ViT-bigG-14",
        version: str | None = "laion2b_s39b_b160k",
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: Literal["last", "penultimate"] = "last",
        always_return_pooled: bool = False,
        legacy: bool = True,
        text_cfg: Mapping[str, Any] | None = None,
        embed_dim: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        _build_text_tower = import_open_clip().model._build_text_tower

        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy=False (the pooled output is SDXL's)")
        dim, text, quick_gelu = text_tower_config(arch, text_cfg, embed_dim)
        model = _build_text_tower(dim, text, quick_gelu)
        if getattr(model, "cls_emb", None) is not None:
            raise ValueError("text towers with a class token (CoCa) are not supported")
        model.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.model = model
        if not 2 <= int(max_length) <= model.positional_embedding.shape[0]:
            raise ValueError(f"max_length must be in [2, {model.positional_embedding.shape[0]}], got {max_length!r}")
        if version is not None:
            log.info(
                "FrozenOpenCLIPEmbedder2: %s/%s is not downloaded; its weights are expected from a checkpoint",
                arch if isinstance(arch, str) else "custom",
                version,
            )
        self.arch = arch if isinstance(arch, str) else "custom"
        self.version = version
        self.max_length = int(max_length)
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]
        self.return_pooled = bool(always_return_pooled)
        self.legacy = bool(legacy)
        if freeze:
            self.freeze()

    @property
    def width(self) -> int:
        return self.model.positional_embedding.shape[1]

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def tokenize(self, text: Any) -> torch.Tensor:
        """[B, max_length] tokens as ``open_clip.tokenize`` makes them (padded with 0)."""
        return tokenize(text, self.max_length, pad_id=0, clean="open_clip")

    def output_widths(self, input_width: int | None = None) -> dict[str, int]:
        return {"crossattn": self.width, "vector": self.embed_dim} if self.return_pooled else {"crossattn": self.width}

    def materialize_buffers(self) -> None:
        mask = self.model._buffers.get("attn_mask")
        weight = self.model.positional_embedding
        if mask is not None and mask.is_meta and not weight.is_meta:
            self.model.attn_mask = causal_mask(mask.shape[0], torch.float32, weight.device)

    def zero_outputs(self, text: Any) -> tuple[torch.Tensor, ...] | None:
        return text_zero_outputs(self, text, self.model.token_embedding.weight)

    # ------------------------------------------------------------------ forward
    embedding_key = "clip_g"  # the tensor of an SDXL textual-inversion file for this encoder
    tokenizer_clean = "open_clip"
    pad_id = 0
    clip_skip: int | None = None  # N: the N-th hidden state from the last (1: the last block's output); None: ``layer``
    prompt_mode: Any = None  # a :class:`~.weighting.PromptMode`: prompts are parsed, chunked and weighted

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    @property
    def num_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    def forward(self, text: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``text``: prompts (str or list of str) or ready tokens [B, L] (int64)."""
        if self.prompt_mode is not None and not isinstance(text, torch.Tensor):
            from .weighting import encode_prompts

            z, pooled = encode_prompts(self, as_text_list(text), self.prompt_mode)
        else:
            z, pooled = self.encode_tokens(text if isinstance(text, torch.Tensor) else self.tokenize(text))
        return (z, pooled) if self.return_pooled else z

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the selected layer's output [B, L, width] (``ln_final``-ed when legacy), the pooled
        [B, embed_dim] when ``always_return_pooled``, else None) of tokens [B, L]."""
        m = self.model
        tokens = tokens.to(m.token_embedding.weight.device)
        hidden = self.encode_with_transformer(tokens)
        z = hidden["skip" if self.clip_skip is not None else self.layer]
        if self.legacy:
            return m.ln_final(z), None
        return z, self.pool(m.ln_final(hidden["last"]), tokens) if self.return_pooled else None

    def encode_with_transformer(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"penultimate": input of the last block, "last": its output} (the latter only when needed);
        with ``clip_skip`` N also "skip", the N-th hidden state from the last (hidden states: the
        blocks' input, then each block's output)."""
        m = self.model
        length = tokens.shape[1]
        x = m.token_embedding(tokens)
        x = x + m.positional_embedding[:length].to(x.dtype)
        mask = causal_mask(length, x.dtype, x.device)
        batch_first = getattr(m.transformer, "batch_first", False)
        if not batch_first:  # open_clip < 2.23 runs its blocks sequence-first
            x = x.transpose(0, 1)
        blocks = m.transformer.resblocks
        skip_at = None if self.clip_skip is None else len(blocks) + 1 - self.clip_skip  # blocks run before it
        need_last = self.layer == "last" or self.return_pooled or skip_at == len(blocks)
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(blocks):
            if i == skip_at:
                out["skip"] = x if batch_first else x.transpose(0, 1)
            if i == len(blocks) - 1:
                out["penultimate"] = x if batch_first else x.transpose(0, 1)
                if not need_last:
                    return out
            x = block(x, attn_mask=mask)
        out["last"] = x if batch_first else x.transpose(0, 1)
        if skip_at == len(blocks):
            out["skip"] = out["last"]
        return out

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """EOS features (the highest token id) projected by ``text_projection``: [B, embed_dim]."""
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = self.model.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode(self, text: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self(text)
