"""CLIP ViT-L/14 text encoder (SDXL base text encoder 1) on transformers' ``CLIPTextModel``.

The checkpoint layout is transformers 4's (reference/FORMATS.md):
``transformer.text_model.{embeddings,encoder,final_layer_norm}.…`` plus
``transformer.text_model.embeddings.position_ids`` (int64 [1, 77]). transformers 5 dropped
the ``text_model.`` level and made ``position_ids`` non-persistent. State-dict hooks on
this module translate, so ``state_dict()`` always has the file layout and
``load_state_dict`` takes the file layout or the installed version's own.
Positions are always 0..L-1 (passed explicitly), whatever a checkpoint stores.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from .embedders import EOS_ID, AbstractEmbModel, add_state_dict_hooks, as_text_list, text_zero_outputs, tokenize

log = logging.getLogger(__name__)

#: transformers ``CLIPTextConfig`` of openai/clip-vit-large-patch14 (the SDXL text encoder 1).
VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

_FILE_LEVEL = "text_model."
_POSITION_IDS = "embeddings.position_ids"


class FrozenCLIPEmbedder(AbstractEmbModel):
    """CLIP text encoder: prompts -> [B, 77, hidden] (and the pooled [B, hidden] if asked).

    ``layer``: ``"last"`` (after the final layer norm), ``"pooled"`` (EOS token after the
    final layer norm, as [B, 1, hidden]) or ``"hidden"`` (``hidden_states[layer_idx]`` of
    transformers, Python indexing: the output of encoder layer ``layer_idx - 1``, no final
    norm; SDXL base uses 11, the penultimate layer). ``always_return_pooled`` returns ``(z, pooled)``.
    ``text_config`` overrides entries of :data:`VIT_L14_TEXT_CONFIG` (tiny models in tests).
    ``version`` names the original weights; nothing is downloaded, they come from a
    checkpoint. ``device`` is accepted for sgm configs; tokens follow the weights.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str | None = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: Literal["last", "pooled", "hidden"] = "last",
        layer_idx: int | None = None,
        always_return_pooled: bool = False,
        text_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        from transformers import CLIPTextConfig, CLIPTextModel

        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        config = CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **dict(text_config or {})})
        if layer == "hidden":
            n = config.num_hidden_layers
            if layer_idx is None or not -(n + 1) <= int(layer_idx) <= n:
                raise ValueError(f"layer='hidden' needs an index into the {n + 1} hidden states, got {layer_idx!r}")
            layer_idx = int(layer_idx)
        if not 2 <= int(max_length) <= config.max_position_embeddings:
            raise ValueError(f"max_length must be in [2, {config.max_position_embeddings}], got {max_length!r}")
        if version is not None:
            log.info("FrozenCLIPEmbedder: %s is not downloaded; its weights are expected from a checkpoint", version)
        self.version = version
        self.max_length = int(max_length)
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = bool(always_return_pooled)
        self.transformer = CLIPTextModel(config)
        # transformers 4: CLIPTextModel.text_model.embeddings; 5: CLIPTextModel.embeddings
        self._native_level = _FILE_LEVEL if hasattr(self.transformer, "text_model") else ""
        add_state_dict_hooks(self, save=_to_file_layout, load_pre=_from_any_layout)
        if freeze:
            self.freeze()

    # ------------------------------------------------------------------ helpers
    @property
    def config(self) -> Any:
        return self.transformer.config

    @property
    def text_model(self) -> nn.Module:
        """The module holding ``embeddings``/``encoder``/``final_layer_norm`` (transformers 4's
        ``text_model``) in any transformers version: file key ``transformer.text_model.X``
        is ``embedder.text_model.X``."""
        return self.transformer.text_model if self._native_level else self.transformer

    def _embeddings(self) -> nn.Module:
        return self.text_model.embeddings

    def _position_ids_persistent(self) -> bool:
        emb = self._embeddings()
        return "position_ids" in emb._buffers and "position_ids" not in emb._non_persistent_buffers_set

    def _position_ids(self, device: torch.device | None = None) -> torch.Tensor:
        emb = self._embeddings()
        device = device if device is not None else emb.position_embedding.weight.device
        return torch.arange(self.config.max_position_embeddings, device=device).unsqueeze(0)

    def materialize_buffers(self) -> None:
        emb = self._embeddings()
        ids = emb._buffers.get("position_ids")
        weight = emb.position_embedding.weight
        if ids is not None and ids.is_meta and not weight.is_meta:
            emb.position_ids = self._position_ids(weight.device)

    def tokenize(self, text: Any) -> torch.Tensor:
        """[B, max_length] CLIP tokens padded with EOS (49407), the transformers CLIPTokenizer convention."""
        return tokenize(text, self.max_length, pad_id=EOS_ID, clean="transformers")

    def output_widths(self, input_width: int | None = None) -> dict[str, int]:
        width = self.config.hidden_size
        return {"crossattn": width, "vector": width} if self.return_pooled else {"crossattn": width}

    def zero_outputs(self, text: Any) -> tuple[torch.Tensor, ...] | None:
        length = 1 if self.layer == "pooled" else None
        return text_zero_outputs(self, text, self._embeddings().token_embedding.weight, length)

    # ------------------------------------------------------------------ forward
    embedding_key = "clip_l"  # the tensor of an SDXL textual-inversion file for this encoder
    tokenizer_clean = "transformers"
    pad_id = EOS_ID
    clip_skip: int | None = None  # N: hidden_states[-N] (1: the last layer's output, no final norm); None: ``layer``
    prompt_mode: Any = None  # a :class:`~.weighting.PromptMode`: prompts are parsed, chunked and weighted

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._embeddings().token_embedding

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def forward(self, text: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``text``: prompts (str or list of str) or ready tokens [B, L] (int64)."""
        if self.prompt_mode is not None and not isinstance(text, torch.Tensor) and self.layer != "pooled":
            from .weighting import encode_prompts

            z, pooled = encode_prompts(self, as_text_list(text), self.prompt_mode)
        else:
            z, pooled = self.encode_tokens(text if isinstance(text, torch.Tensor) else self.tokenize(text))
        return (z, pooled) if self.return_pooled else z

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the selected layer's output [B, L, hidden], the pooled output [B, hidden]) of tokens [B, L]."""
        device = self.token_embedding.weight.device
        tokens = tokens.to(device)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand(tokens.shape[0], -1)
        hidden = self.layer == "hidden" or self.clip_skip is not None
        out = self.transformer(input_ids=tokens, position_ids=positions, output_hidden_states=hidden, return_dict=True)
        if self.clip_skip is not None:
            z = out.hidden_states[-self.clip_skip]
        elif self.layer == "last":
            z = out.last_hidden_state
        elif self.layer == "pooled":
            z = out.pooler_output[:, None, :]
        else:
            z = out.hidden_states[self.layer_idx]
        return z, out.pooler_output

    def encode(self, text: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self(text)


# ---------------------------------------------------------------------- state-dict hooks


def _to_file_layout(module: FrozenCLIPEmbedder, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Rewrite this module's keys into the transformers-4 file layout, in place and in order."""
    root = prefix + "transformer."
    file_root = root + _FILE_LEVEL
    ids_key = file_root + _POSITION_IDS
    keys = [k for k in state_dict if k.startswith(prefix)]  # this subtree was saved last
    items = [(k, state_dict.pop(k)) for k in keys]
    for key, value in items:
        if not module._native_level and key.startswith(root):
            key = file_root + key[len(root) :]
        if key.startswith(file_root + "embeddings.") and ids_key not in state_dict:
            state_dict[ids_key] = module._position_ids()
        state_dict[key] = value
    if ids_key not in state_dict:
        state_dict[ids_key] = module._position_ids()


def _from_any_layout(
    module: FrozenCLIPEmbedder,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Accept the file layout (``text_model.`` + ``position_ids``) or the installed version's."""
    root = prefix + "transformer."
    native_root = root + module._native_level
    for key in [k for k in state_dict if k.startswith(root)]:
        rest = key[len(root) :]
        if rest.startswith(_FILE_LEVEL):
            rest = rest[len(_FILE_LEVEL) :]
        new = native_root + rest
        if new != key:
            if new in state_dict:
                raise KeyError(f"state dict holds both {key!r} and {new!r}")
            state_dict[new] = state_dict.pop(key)
    ids_key = native_root + _POSITION_IDS
    ids = state_dict.get(ids_key)
    if isinstance(ids, torch.Tensor) and not ids.is_meta:
        expected = torch.arange(ids.shape[-1], device=ids.device)
        if ids.reshape(-1).shape != expected.shape or not torch.equal(ids.reshape(-1).to(expected.dtype), expected):
            log.warning("%s: checkpoint position_ids are not 0..%d; ignored", ids_key, ids.shape[-1] - 1)
    if module._position_ids_persistent():
        if ids is None or (isinstance(ids, torch.Tensor) and not ids.is_meta and ids.dtype != torch.long):
            weight = state_dict.get(native_root + "embeddings.position_embedding.weight")
            device = weight.device if isinstance(weight, torch.Tensor) else None
            state_dict[ids_key] = module._position_ids(device)
    else:
        state_dict.pop(ids_key, None)
