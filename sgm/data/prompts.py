"""Prompts for sampling: command line, text file, wildcards; a LightningDataModule over them."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import DataLoader, Dataset

from .paths import existing_file

WILDCARD = re.compile(r"__([A-Za-z0-9_\-/]+)__")


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a leading BOM dropped); a file in another encoding, or a binary one (a NUL byte:
    no text holds one, UTF-16 text does), is an error naming ``what``, the file and the first bad byte."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text: byte {exc.start} (line {line}, "
                         f"0x{data[exc.start]:02x}) cannot be decoded ({exc.reason}); save the file as UTF-8") from None
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(f"{what} {str(path)!r} is not text: byte {nul} (line {line}) is a NUL byte, as in a binary "
                         "or UTF-16 file; give a text file saved as UTF-8")
    return text


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    path = existing_file(path, "prompt_file", "text file", ": give a text file with one prompt per line")
    prompts = _lines(read_text(path, "prompt_file"))
    if not prompts:
        raise ValueError(f"prompt_file {str(path)!r} has no prompts (one per line)")
    return prompts


def wildcard_file(name: str, directory: str | Path) -> Path:
    """The file of wildcard ``__name__``: ``directory/name.txt``, which must lie inside ``directory``
    once symlinks are followed (an absolute name, or a link out of the folder, is an error)."""
    directory = Path(directory)
    path = directory / f"{name}.txt"
    real = path.resolve()
    if not real.is_relative_to(directory.resolve()):
        raise ValueError(f"wildcard __{name}__ leads outside wildcards_dir {str(directory)!r} (to {str(real)!r}); "
                         "only files inside it are read: put the file there and write its name relative to it")
    if not path.is_file():
        raise FileNotFoundError(f"wildcard __{name}__ needs the file {path} (one option per line)")
    return path


def _wildcard_lines(name: str, directory: Path, cache: dict[str, list[str]]) -> list[str]:
    if name not in cache:
        path = wildcard_file(name, directory)
        lines = [ln for ln in _lines(read_text(path, f"wildcard file of __{name}__")) if not ln.startswith("#")]
        if not lines:
            raise ValueError(f"wildcard file {path} has no options")
        cache[name] = lines
    return cache[name]


def resolve_wildcards(prompt: str, rng: random.Random, directory: str | Path, max_depth: int = 10,
                      cache: dict[str, list[str]] | None = None) -> str:
    """Replace each ``__name__`` by a random line of ``directory/name.txt`` (nested up to ``max_depth``)."""
    directory, cache = Path(directory), {} if cache is None else cache
    for _ in range(max_depth):
        if not WILDCARD.search(prompt):
            return prompt
        prompt = WILDCARD.sub(lambda m: rng.choice(_wildcard_lines(m.group(1), directory, cache)), prompt)
    if WILDCARD.search(prompt):
        raise ValueError(f"wildcards nest deeper than {max_depth} levels in {prompt!r}")
    return prompt


@dataclass
class PromptJob:
    index: int
    prompt: str
    negative_prompt: str
    seed: int


def make_jobs(prompts: Sequence[str], negative_prompt: str = "", seed: int = 0, num_images_per_prompt: int = 1,
              wildcards_dir: str | Path | None = None) -> list[PromptJob]:
    """Expand prompts into one job per image; image k gets seed + k and its own wildcard draw."""
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    jobs, cache = [], {}
    for prompt in prompts:
        for _ in range(num_images_per_prompt):
            k = len(jobs)
            text = prompt
            if WILDCARD.search(prompt):
                if wildcards_dir is None:
                    raise ValueError(f"prompt {prompt!r} uses wildcards but no wildcards_dir is set")
                text = resolve_wildcards(prompt, random.Random(seed + k), wildcards_dir, cache=cache)
            neg = negative_prompt
            if WILDCARD.search(neg) and wildcards_dir is not None:
                neg = resolve_wildcards(neg, random.Random(seed + k + 1_000_003), wildcards_dir, cache=cache)
            jobs.append(PromptJob(k, text, neg, seed + k))
    return jobs


class _Jobs(Dataset):
    def __init__(self, jobs: list[PromptJob]):
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> PromptJob:
        return self.jobs[i]


def collate_jobs(items: list[PromptJob]) -> dict[str, Any]:
    return {"index": [j.index for j in items], "prompt": [j.prompt for j in items],
            "negative_prompt": [j.negative_prompt for j in items], "seed": [j.seed for j in items]}


def __getattr__(name: str) -> Any:
    """``PromptDataModule`` is a Lightning class: imported on first use, so that checking prompts
    (and failing on a bad one) does not import Lightning (docs/benchmarks.md: cold start)."""
    if name == "PromptDataModule":
        from .prompt_datamodule import PromptDataModule

        return PromptDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
