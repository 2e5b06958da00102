"""Weighted, chunked prompt encoding for the CLIP text encoders (AUTOMATIC1111's and ComfyUI's rules).

A prompt (already free of prompt editing, see :mod:`.prompt_syntax`) becomes chunks of 75
tokens, each encoded on its own as BOS + 75 + EOS (padded) = 77 tokens, the encoder outputs
concatenated along the sequence: [77 k, C]; the pooled output is the first chunk's.

* ``BREAK`` ends a chunk (the rest of it is padding).
* A chunk that fills up moves the tokens after its last comma to the next chunk when that
  comma is within the last :data:`COMMA_BACKTRACK` (20) tokens (A1111's ``comma_padding_backtrack``).
* A textual-inversion embedding of n vectors takes n token slots; it is never split across
  chunks (it starts a new chunk when it does not fit).
* Weights (A1111, ``a1111``): the encoder's output for each token is multiplied by its weight,
  then the chunk is rescaled so that its mean over all [77, C] values is the unweighted
  chunk's mean. A1111 takes that mean over its whole batch; here it is per prompt, so an
  image does not depend on the prompts batched with it.
* Weights (ComfyUI, ``comfy``): out = empty + w (out - empty) per token, ``empty`` the output
  of the empty prompt's chunk (comfy/sd1_clip.py ``encode_token_weights``).

BOS, EOS and padding have weight 1. Every prompt of a batch is padded with empty chunks to
:attr:`PromptMode.num_chunks` so that cond and uc share one sequence length (the guider
batches them into one network call).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .embedders import BOS_ID, EOS_ID, bpe_encode
from .prompt_syntax import BREAK, parse_attention
from .textual_inversion import COMFY_REFERENCE, EmbeddingLibrary

COMMA_BACKTRACK = 20
CHUNK = 75


@dataclass(frozen=True)
class PromptMode:
    """How the text embedders read prompts: ``syntax`` (``a1111`` | ``comfy``), the embeddings, and
    the number of chunks every prompt is padded to (None: the longest prompt of the call)."""

    syntax: str = "a1111"
    library: EmbeddingLibrary | None = None
    num_chunks: int | None = None


@dataclass
class Chunk:
    """Up to 75 token ids (BOS/EOS excluded), their weights, and embedding vectors at positions."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first position, [n, width])


def references(text: str, syntax: str, names: Sequence[str]) -> list[str | tuple[str]]:
    """``text`` split into plain text and embedding references (1-tuples of a name): ``embedding:NAME``
    in both syntaxes; with ``a1111`` also a bare word equal to an embedding's file stem."""
    patterns = [COMFY_REFERENCE.pattern]
    if syntax == "a1111" and names:
        bare = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        patterns.append(rf"(?<![\w\-.:])({bare})(?![\w\-.])")
    out: list[str | tuple[str]] = []
    pos = 0
    for m in re.finditer("|".join(patterns), text):
        out.append(text[pos : m.start()])
        out.append((m.group(1) or m.group(2),))
        pos = m.end()
    out.append(text[pos:])
    return [piece for piece in out if piece != ""]


def embedding_names(text: str, syntax: str, names: Sequence[str]) -> list[str]:
    """The embeddings a (schedule-free) prompt refers to, in order."""
    return [piece[0] for fragment, _ in parse_attention(text) if fragment != BREAK
            for piece in references(fragment, syntax, names) if isinstance(piece, tuple)]


def prompt_chunks(text: str, syntax: str, encode: Callable[[str], list[int]],
                  lookup: Callable[[str], torch.Tensor] | None = None, names: Sequence[str] = (),
                  size: int = CHUNK) -> list[Chunk]:
    """The chunks of ``text`` (``size`` tokens each): ``encode`` gives BPE ids, ``lookup(name)`` an
    embedding's [n, width], ``names`` the embeddings a bare word may name (a1111)."""
    comma = encode(",")[0]
    chunks: list[Chunk] = []
    cur = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        chunks.append(cur)
        cur, last_comma = Chunk(), -1

    for fragment, weight in parse_attention(text):
        if fragment == BREAK and weight == -1:
            close()
            continue
        for piece in references(fragment, syntax, names):
            if isinstance(piece, tuple):
                if lookup is None:
                    raise ValueError(f"prompt uses embedding {piece[0]!r} but no embeddings_dir is set")
                vec = lookup(piece[0])
                if len(vec) > size:
                    raise ValueError(f"embedding {piece[0]!r} has {len(vec)} vectors; at most {size} fit a chunk")
                if len(cur.ids) + len(vec) > size:
                    close()
                cur.vectors.append((len(cur.ids), vec))
                cur.ids += [0] * len(vec)
                cur.weights += [weight] * len(vec)
                continue
            for token in encode(piece):
                if token == comma:
                    last_comma = len(cur.ids)
                elif len(cur.ids) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    moved = Chunk(cur.ids[cut:], cur.weights[cut:], [(p - cut, v) for p, v in cur.vectors if p >= cut])
                    cur = Chunk(cur.ids[:cut], cur.weights[:cut], [(p, v) for p, v in cur.vectors if p < cut])
                    close()
                    cur = moved
                if len(cur.ids) == size:
                    close()
                cur.ids.append(token)
                cur.weights.append(weight)
    if cur.ids or cur.vectors or not chunks:
        close()
    return chunks


@contextmanager
def injected(embedding: nn.Module, rows: list[int], cols: list[int], vectors: list[torch.Tensor]) -> Iterator[None]:
    """Replace the token embeddings at (rows[i], cols[i]) by ``vectors[i]`` during the enclosed calls."""
    if not rows:
        yield
        return

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[rows, cols] = torch.stack(vectors).to(device=output.device, dtype=output.dtype)
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def chunk_tokens(chunks: Sequence[Chunk], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, length] ids (BOS, ids, EOS, ``pad_id``) and [N, length] weights (1 off the prompt's tokens)."""
    tokens = torch.full((len(chunks), length), pad_id, dtype=torch.long)
    weights = torch.ones(len(chunks), length)
    for i, chunk in enumerate(chunks):
        n = len(chunk.ids)
        tokens[i, : n + 2] = torch.tensor([BOS_ID, *chunk.ids, EOS_ID])
        weights[i, 1 : n + 1] = torch.tensor(chunk.weights)
    return tokens, weights


def apply_weights(z: torch.Tensor, weights: torch.Tensor, syntax: str, empty: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted chunk outputs ``z`` [N, L, C] for per-token ``weights`` [N, L] (see the module docstring)."""
    w = weights.to(device=z.device, dtype=z.dtype)[..., None]
    if syntax == "comfy":
        return empty + w * (z - empty)
    if syntax != "a1111":
        raise ValueError(f"unknown weighting {syntax!r}")
    mean = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * w
    return weighted * (mean / weighted.mean(dim=(1, 2), keepdim=True))


def encode_prompts(embedder: nn.Module, texts: Sequence[str], mode: PromptMode) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z [B, 77 k, C], pooled [B, D] of the first chunk or None) of ``texts`` for a text embedder that has
    ``tokenizer_clean``, ``pad_id``, ``embedding_key``, ``token_embedding`` and ``encode_tokens``."""
    per_prompt = [embedder_chunks(embedder, t, mode) for t in texts]
    n = max([mode.num_chunks or 1, *map(len, per_prompt)])
    flat = [c for chunks in per_prompt for c in [*chunks, *[Chunk()] * (n - len(chunks))]]
    weighted = any(w != 1.0 for c in flat for w in c.weights)
    if weighted and mode.syntax == "comfy":
        flat.append(Chunk())
    tokens, weights = chunk_tokens(flat, embedder.max_length, embedder.pad_id)
    rows, cols, vecs = [], [], []
    for i, chunk in enumerate(flat):
        for start, vec in chunk.vectors:
            rows += [i] * len(vec)
            cols += range(1 + start, 1 + start + len(vec))
            vecs += list(vec)
    with injected(embedder.token_embedding, rows, cols, vecs):
        z, pooled = embedder.encode_tokens(tokens)
    if weighted:
        empty = z[-1:] if mode.syntax == "comfy" else None
        z = apply_weights(z[: len(texts) * n], weights[: len(texts) * n], mode.syntax, empty)
    z = z[: len(texts) * n].reshape(len(texts), n * z.shape[1], z.shape[2])
    return z, None if pooled is None else pooled[: len(texts) * n : n]


def embedder_chunks(embedder: nn.Module, text: str, mode: PromptMode) -> list[Chunk]:
    """:func:`prompt_chunks` with the embedder's tokenizer cleaning and its embedding vectors."""
    library = mode.library
    key, width = embedder.embedding_key, embedder.token_embedding.weight.shape[1]

    def lookup(name: str) -> torch.Tensor:
        vec = library.vectors(name, key)
        if vec.ndim != 2 or vec.shape[1] != width:
            raise ValueError(f"embedding {name!r}: {key} has shape {list(vec.shape)}, this encoder needs [n, {width}]")
        return vec

    names = sorted(library.files) if library is not None else ()
    return prompt_chunks(text, mode.syntax, lambda s: bpe_encode(s, embedder.tokenizer_clean),
                         lookup if library is not None else None, names, size=embedder.max_length - 2)
