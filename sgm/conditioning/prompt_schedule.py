"""Per-step conditionings of a batch: prompt editing and alternation over the run's schedule.

:func:`scheduled_conditionings` resolves each prompt's editing (:func:`.prompt_syntax.parse_schedule`)
over the run's steps, encodes every distinct prompt of the batch once (weights, chunks, BREAK,
embeddings: :mod:`.weighting`) and returns for cond and uc either a plain conditioning dict
(one prompt per image for the whole run) or a :class:`CondSchedule`: the step's conditioning
is picked from sigma by the sampler (:meth:`sgm.diffusion.samplers.base.BaseDiffusionSampler.guided`,
which every sampler's network call goes through). A call at sigma belongs to step i + 1 (steps
count from 1, as in A1111) where ``sigmas[i]`` is the smallest sigma of the schedule that is
>= sigma; so Heun's second evaluation at ``sigmas[i + 1]`` already sees step i + 2's prompt.
img2img and the refiner run slices of the same schedule and keep its step numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .prompt_syntax import SYNTAXES, check_syntax, is_plain, parse_schedule, prompt_at
from .textual_inversion import EmbeddingLibrary
from .weighting import PromptMode, embedder_chunks, embedding_names


def text_embedders(conditioner: nn.Module) -> list[nn.Module]:
    """The embedders of ``conditioner`` that read prompts with the prompt syntax (CLIP-L, OpenCLIP)."""
    return [e for e in getattr(conditioner, "embedders", []) if hasattr(e, "encode_tokens")]


@dataclass
class PromptOptions:
    """A run's prompt reading: ``syntax`` (a1111 | comfy | none), embeddings, ``clip_skip``."""

    syntax: str = "none"
    library: EmbeddingLibrary | None = None
    clip_skip: int | None = None

    def __post_init__(self) -> None:
        self.syntax = check_syntax(self.syntax)


def apply_clip_skip(conditioner: nn.Module, clip_skip: int | None) -> None:
    """Set ``clip_skip`` on every text encoder (None: each encoder's configured layer)."""
    for embedder in text_embedders(conditioner):
        if clip_skip is not None and not 1 <= clip_skip <= embedder.num_layers + 1:
            raise ValueError(f"clip_skip={clip_skip} is out of range for {type(embedder).__name__} with "
                             f"{embedder.num_layers} layers: use 1..{embedder.num_layers + 1} or null")
        embedder.clip_skip = clip_skip


@contextmanager
def prompt_mode(conditioner: nn.Module, mode: PromptMode) -> Iterator[None]:
    """Text embedders parse, chunk and weight their prompts (``mode``) inside the block."""
    embedders = text_embedders(conditioner)
    for e in embedders:
        e.prompt_mode = mode
    try:
        yield
    finally:
        for e in embedders:
            e.prompt_mode = None


class CondSchedule(dict):
    """A conditioning that changes with the step: ``ends[j]`` is the last (1-based) step of
    ``conds[j]``; ``sigmas`` the run's schedule. As a dict it is the first step's conditioning."""

    def __init__(self, sigmas: Sequence[float], ends: Sequence[int], conds: Sequence[dict]):
        super().__init__(conds[0])
        self.sigmas, self.ends, self.conds = [float(s) for s in sigmas], list(ends), list(conds)

    def step(self, sigma: float) -> int:
        """The 1-based step of a network call at ``sigma``."""
        index = 0
        for i, s in enumerate(self.sigmas[:-1]):
            if s >= sigma * (1 - 1e-5):
                index = i
        return index + 1

    def at(self, sigma: float) -> dict:
        """The conditioning of a network call at ``sigma``."""
        step = self.step(sigma)
        return next((c for end, c in zip(self.ends, self.conds) if step <= end), self.conds[-1])


def at_sigma(cond: Any, sigma: float) -> Any:
    """The conditioning of a network call at ``sigma`` (a :class:`CondSchedule`'s step, else ``cond``)."""
    return cond.at(sigma) if isinstance(cond, CondSchedule) else cond


def _needs_parsing(texts: Sequence[str], syntax: str, library: EmbeddingLibrary | None,
                   embedders: Sequence[nn.Module]) -> bool:
    names = sorted(library.files) if library is not None else ()
    for text in texts:
        if not is_plain(text) or embedding_names(text, syntax, names):
            return True
        if any(len(embedder_chunks(e, text, PromptMode(syntax))) > 1 for e in embedders):
            return True
    return False


def scheduled_conditionings(engine: Any, prompts: Sequence[str], negatives: Sequence[str], height: int, width: int,
                            aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                            sigmas: torch.Tensor | None = None, **size: Any) -> tuple[dict, dict]:
    """(cond, uc) of a batch under ``engine.prompt_options`` (see the module docstring). Prompts that
    use no syntax at all go through the plain conditioner path, bit for bit what it gave before."""
    opts: PromptOptions = engine.prompt_options
    steps = len(sigmas) - 1 if sigmas is not None else 1
    scheds = [[parse_schedule(p, steps) for p in ps] for ps in (prompts, negatives)]
    texts = [list(dict.fromkeys(t for s in sch for _, t in s)) for sch in scheds]
    embedders = text_embedders(engine.conditioner)
    if not _needs_parsing(texts[0] + texts[1], opts.syntax, opts.library, embedders):
        if all(len(s) == 1 for sch in scheds for s in sch):
            return engine.plain_conditionings(prompts, negatives, height, width, aesthetic_score,
                                              negative_aesthetic_score, **size)
    chunks = max([1] + [len(embedder_chunks(e, t, PromptMode(opts.syntax, opts.library)))
                        for e in embedders for t in texts[0] + texts[1]])
    mode = PromptMode(opts.syntax, opts.library, chunks)
    encoded = []
    with prompt_mode(engine.conditioner, mode):
        for ts, score, empty in ((texts[0], aesthetic_score, False), (texts[1], negative_aesthetic_score, True)):
            batch = engine.make_batch(ts, height, width, aesthetic_score=score, **size)
            encoded.append(engine.conditioning(batch, engine.empty_captions(ts) if empty else None))
    out = []
    for sch, ts, enc in zip(scheds, texts, encoded):
        ends, conds = sorted({end for s in sch for end, _ in s}), []
        for end in ends:
            rows = torch.tensor([ts.index(prompt_at(s, end)) for s in sch], device=next(iter(enc.values())).device)
            conds.append({k: v.index_select(0, rows) for k, v in enc.items()})
        out.append(conds[0] if len(ends) == 1 else CondSchedule(sigmas.tolist(), ends, conds))
    return out[0], out[1]


def check_prompt_options(syntax: Any, embeddings_dir: Any, clip_skip: Any, prompts: Sequence[str], steps: int,
                         conditioners: Callable[[], Sequence[nn.Module]]) -> PromptOptions:
    """``prompt_syntax``, ``embeddings_dir``, ``clip_skip`` and the embeddings the prompts use, checked
    from file headers against the text encoders of ``conditioners()`` (built on the meta device, only
    when there is something to check)."""
    from .textual_inversion import check_embedding

    syntax = check_syntax(syntax)
    if clip_skip is not None:
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
            raise ValueError(f"clip_skip must be null (the model's own layer) or an integer >= 1 (1: the last "
                             f"layer, 2: the penultimate, SDXL's default), got {clip_skip!r}")
        for conditioner in conditioners():
            apply_clip_skip(conditioner, clip_skip)
    library = EmbeddingLibrary(embeddings_dir) if syntax != "none" else None
    if library is not None:
        names = sorted(library.files)
        used = dict.fromkeys(n for p in prompts for _, t in parse_schedule(p, steps)
                             for n in embedding_names(t, syntax, names))
        for name in used:
            path = library.path(name)
            for conditioner in conditioners():
                widths = {e.embedding_key: e.token_embedding.weight.shape[1] for e in text_embedders(conditioner)}
                check_embedding(path, widths)
    return PromptOptions(syntax, library, clip_skip)


__all__ = ["CondSchedule", "PromptOptions", "SYNTAXES", "apply_clip_skip", "at_sigma", "check_prompt_options",
           "prompt_mode", "scheduled_conditionings", "text_embedders"]
