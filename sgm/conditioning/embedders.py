"""The embedder base class and the CLIP BPE tokenization shared by both text encoders.

An embedder turns one batch entry (``batch[input_key]``) into conditioning tensors. The
routing attributes (``input_key``, ``is_trainable``, ``ucg_rate``, ``legacy_ucg_val``) are
the ones of Stability AI's ``AbstractEmbModel``; they are constructor keywords here so
that Hydra can build an embedder in one call.

Tokenization (reference/FORMATS.md, "Conditioning"): CLIP BPE from the vocabulary that
ships inside open_clip (nothing is downloaded), BOS 49406, EOS 49407, length 77, long
prompts truncated with EOS kept last. CLIP-L pads with 49407 and cleans text like the
transformers ``CLIPTokenizer`` (ftfy, whitespace, lower case); bigG pads with 0 and cleans
like ``open_clip.tokenize`` (ftfy, HTML unescape, whitespace, lower case).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77


class AbstractEmbModel(nn.Module):
    """Base of all embedders: routing attributes read by :class:`GeneralConditioner`.

    ``input_key``: the batch entry this embedder reads (``input_keys`` for several).
    ``is_trainable``: False runs it under ``torch.no_grad`` and freezes it.
    ``ucg_rate``: per-sample probability of dropping the conditioning in training
    (unconditional guidance training); ``legacy_ucg_val``: when set, dropping replaces
    the input (e.g. the prompt by ``""``) instead of zeroing the output.
    """

    def __init__(
        self,
        input_key: str | None = None,
        is_trainable: bool = False,
        ucg_rate: float = 0.0,
        legacy_ucg_val: Any = None,
        input_keys: Sequence[str] | None = None,
    ):
        super().__init__()
        ucg_rate = float(ucg_rate)
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1], got {ucg_rate!r}")
        self.input_key = input_key
        self.input_keys = list(input_keys) if input_keys is not None else None
        self.is_trainable = bool(is_trainable)
        self.ucg_rate = ucg_rate
        self.legacy_ucg_val = legacy_ucg_val
        self._frozen = False
        self.register_load_state_dict_post_hook(_after_load)

    def freeze(self) -> "AbstractEmbModel":
        """No gradients, eval mode, and ``train()`` keeps it in eval mode from now on."""
        self._frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "AbstractEmbModel":
        return super().train(mode and not getattr(self, "_frozen", False))

    def output_widths(self, input_width: int | None = None) -> dict[str, int]:
        """Feature width per output kind (``crossattn`` / ``vector`` / ``concat``) without running it.

        ``input_width`` is the number of values per sample of the input, for embedders
        whose output width depends on it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not report its output widths")

    def zero_outputs(self, *inputs: Any) -> tuple[torch.Tensor, ...] | None:
        """:meth:`forward`'s outputs for ``inputs``, all zeros, without running the model (what
        ``force_zero_embeddings`` keeps of them); None when that is not known ahead: then the
        conditioner runs the embedder and zeroes what it returns."""
        return None

    def materialize_buffers(self) -> None:
        """Recompute derived buffers that are still on the meta device (after ``load_state_dict(assign=True)``)."""


def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
    module.materialize_buffers()


def add_state_dict_hooks(module: nn.Module, save: Callable | None = None, load_pre: Callable | None = None) -> None:
    """Register ``save(module, state_dict, prefix, local_metadata)`` after ``state_dict()`` and
    ``load_pre(module, state_dict, prefix, ...)`` before ``load_state_dict`` (public API, or the
    older private one on torch < 2.5)."""
    if save is not None:
        if hasattr(module, "register_state_dict_post_hook"):
            module.register_state_dict_post_hook(save)
        else:  # pragma: no cover - old torch
            module._register_state_dict_hook(save)
    if load_pre is not None:
        if hasattr(module, "register_load_state_dict_pre_hook"):
            module.register_load_state_dict_pre_hook(load_pre)
        else:  # pragma: no cover - old torch
            module._register_load_state_dict_pre_hook(load_pre, with_module=True)


def text_zero_outputs(embedder: AbstractEmbModel, text: Any, weight: torch.Tensor,
                      length: int | None = None) -> tuple[torch.Tensor, ...] | None:
    """Zero outputs of a text encoder for ``text`` (prompts or tokens [B, L]): [B, L, width] (L:
    ``length``, else the tokens' length, or ``max_length`` times the chunks every prompt is padded
    to under prompt syntax) and, when it returns the pooled embedding, [B, pooled width]; in the
    dtype and on the device of ``weight`` (its token embedding, which sets the dtype of every hidden
    state). None when the chunk count is not fixed ahead (prompt syntax without ``num_chunks``)."""
    n = text.shape[0] if isinstance(text, torch.Tensor) else len(as_text_list(text))
    if length is None and isinstance(text, torch.Tensor):
        length = text.shape[1]
    elif length is None:
        mode = getattr(embedder, "prompt_mode", None)
        chunks = 1 if mode is None else mode.num_chunks
        if chunks is None:
            return None
        length = embedder.max_length * chunks
    widths = embedder.output_widths()
    new = functools.partial(torch.zeros, dtype=weight.dtype, device=weight.device)
    z = new(n, length, widths["crossattn"])
    return (z, new(n, widths["vector"])) if "vector" in widths else (z,)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal attention mask (``-inf`` above the diagonal), as open_clip builds it."""
    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)


# --------------------------------------------------------------------------- tokenization


@functools.lru_cache(maxsize=None)
def _tokenizer_module() -> Any:
    """``open_clip.tokenizer`` (the BPE and its text cleaning) without the rest of open_clip: the
    package's ``__init__`` imports its models, timm and through timm W&B (about 2 s on a
    2-core machine) that tokenizing does not use. The module file imports no other part of
    open_clip, so it is loaded on its own; an open_clip already imported is used as it is."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    spec = importlib.util.find_spec("open_clip")  # locates the package without running it
    if spec is None or spec.origin is None:
        raise ImportError("open_clip is not installed: pip install open_clip_torch (the CLIP tokenizer)")
    path = Path(spec.origin).with_name("tokenizer.py")
    file_spec = importlib.util.spec_from_file_location("sgm._open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _bpe() -> Any:
    return _tokenizer_module().SimpleTokenizer()


def _clean_open_clip(text: str) -> str:
    tok = _tokenizer_module()
    return tok.whitespace_clean(tok.basic_clean(text)).lower()


def _clean_transformers(text: str) -> str:
    import ftfy

    return _tokenizer_module().whitespace_clean(ftfy.fix_text(text)).lower()


_CLEANERS = {"open_clip": _clean_open_clip, "transformers": _clean_transformers}


def bpe_encode(text: str, clean: Literal["open_clip", "transformers"] = "open_clip") -> list[int]:
    """BPE ids of ``text`` without BOS/EOS."""
    return list(_bpe_ids(text, clean))


@functools.lru_cache(maxsize=4096)
def _bpe_ids(text: str, clean: str) -> tuple[int, ...]:
    """:func:`bpe_encode`, remembered per text: a batch repeats its prompts (``num_images_per_prompt``,
    every job of a sweep), and the text cleaning and BPE take ~0.1 ms a prompt per encoder."""
    import regex

    tok = _bpe()
    ids: list[int] = []
    for word in regex.findall(tok.pat, _CLEANERS[clean](text)):
        word = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
        ids.extend(tok.encoder[piece] for piece in tok.bpe(word).split(" "))
    return tuple(ids)


def as_text_list(text: Any) -> list[str]:
    """A prompt or a batch of prompts as a list of strings."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, Sequence) or hasattr(text, "__iter__"):
        texts = list(text)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {bad[0]}")
        return texts
    raise TypeError(f"expected a prompt or a list of prompts, got {type(text).__name__}")


def tokenize(
    text: str | Sequence[str],
    max_length: int = CONTEXT_LENGTH,
    pad_id: int = 0,
    clean: Literal["open_clip", "transformers"] = "open_clip",
) -> torch.Tensor:
    """[B, max_length] int64 tokens: BOS, BPE ids (truncated), EOS, then ``pad_id``."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    texts = as_text_list(text)
    out = torch.full((len(texts), max_length), pad_id, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [BOS_ID, *bpe_encode(t, clean)[: max_length - 2], EOS_ID]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
