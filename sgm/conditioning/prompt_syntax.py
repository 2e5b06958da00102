"""Prompt syntax: emphasis weights, ``BREAK``, prompt editing and alternation (AUTOMATIC1111's).

The documented syntax of the stable-diffusion-webui wiki ("Features"):

* **Emphasis** (:func:`parse_attention`): ``(word)`` multiplies the attention to ``word`` by
  1.1, ``((word))`` by 1.21, ``[word]`` divides it by 1.1, ``(word:1.3)`` sets 1.3 times the
  enclosing weight. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters. An unclosed
  bracket weights the rest of the prompt; an unmatched closing bracket is literal text.
* **BREAK** (upper case, a word of its own) ends the current 75-token chunk.
* **Prompt editing** (:func:`parse_schedule`): ``[from:to:when]`` uses ``from`` up to step
  ``when`` and ``to`` after it, ``[to:when]`` adds ``to`` after step ``when``,
  ``[from::when]`` removes ``from`` after it. ``when`` < 1 is a fraction of the run's steps,
  ``when`` >= 1 a step number (steps count from 1). **Alternation** ``[a|b|c]`` takes the next
  option at every step. They nest. A prompt that does not parse is taken as plain text.

Editing resolves first (into one plain prompt per step range), then each range's prompt is
parsed for emphasis. The syntax is ``a1111`` (its weighting: scaled hidden states with the
chunk's mean restored), ``comfy`` (ComfyUI's weighting: interpolation from the empty
prompt's hidden states) or ``none`` (prompts are plain text, as before this module).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYNTAXES = ("a1111", "comfy", "none")
EMPHASIS = 1.1  # A1111's attention multiplier of one bracket pair
BREAK = "BREAK"

# A1111's attention tokens (modules/prompt_parser.py, re_attention): escapes, brackets, ":weight)", text, ":"
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def check_syntax(name: object) -> str:
    """``prompt_syntax`` as one of :data:`SYNTAXES`."""
    value = "none" if name is None else str(name)
    if value not in SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {'|'.join(SYNTAXES)}, got {name!r}: a1111 (AUTOMATIC1111's "
                         "weighting), comfy (ComfyUI's) or none (prompts are plain text)")
    return value


# --------------------------------------------------------------------------- emphasis


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (fragment, weight) pairs, adjacent equal weights merged; ``BREAK`` is ("BREAK", -1).

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(out))
        elif token == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append([BREAK, -1.0])
                out.append([part, 1.0])
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)
    merged: list[tuple[str, float]] = []
    for fragment, weight in out:
        if not fragment:
            continue
        if merged and merged[-1][1] == weight and fragment != BREAK and merged[-1][0] != BREAK:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    return merged or [("", 1.0)]


def is_plain(text: str) -> bool:
    """Whether ``text`` means itself: one fragment of weight 1 equal to the text (no brackets, escapes, BREAK)."""
    return parse_attention(text) == [(text, 1.0)]


# --------------------------------------------------------------------------- editing


@dataclass
class _Group:
    """A bracketed group: ``(...)``/``[...]`` emphasis (``sep`` None), editing (``:``) or alternation (``|``)."""

    open: str
    parts: list[list]  # each part: a sequence of str and _Group
    sep: str | None


class _Fail(Exception):
    pass


_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$")


class _Parser:
    """Recursive descent over A1111's editing grammar (``scheduled``, ``alternate``, ``emphasized``, ``plain``)."""

    def __init__(self, text: str):
        self.text = text

    def sequence(self, i: int, top: bool) -> tuple[list, int]:
        items: list = []
        while i < len(self.text):
            c = self.text[i]
            m = _PLAIN.match(self.text, i)
            if m:
                items.append(m.group(0))
                i = m.end()
            elif c in "([":
                try:
                    group, i = self.group(i)
                    items.append(group)
                except _Fail:
                    if not top:
                        raise
                    items.append(c)  # a bracket that opens no group is text (the attention parse sees it)
                    i += 1
            elif top:  # stray ) ] : | at the top level are text
                items.append(c)
                i += 1
            else:
                break
        return items, i

    def group(self, i: int) -> tuple[_Group, int]:
        open_ = self.text[i]
        close = ")" if open_ == "(" else "]"
        parts, seps = [], []
        i += 1
        while True:
            part, i = self.sequence(i, top=False)
            parts.append(part)
            if i >= len(self.text):
                raise _Fail
            c = self.text[i]
            i += 1
            if c == close:
                break
            if c in ":|" and (c == ":" or open_ == "["):
                seps.append(c)
                continue
            raise _Fail
        if not seps:
            return _Group(open_, parts, None), i
        if open_ == "(":
            if seps != [":"]:
                raise _Fail
            return _Group(open_, parts, ":"), i
        if all(s == "|" for s in seps):
            return _Group(open_, parts, "|"), i
        if all(s == ":" for s in seps) and len(seps) in (1, 2) and _when(parts[-1]) is not None:
            return _Group(open_, parts, ":"), i
        raise _Fail


def _when(part: list) -> float | None:
    if len(part) == 1 and isinstance(part[0], str):
        m = _NUMBER.match(part[0])
        return float(m.group(1)) if m else None
    return None


def _render(items: list, step: int, steps: int) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif item.sep == "|":
            out.append(_render(item.parts[(step - 1) % len(item.parts)], step, steps))
        elif item.sep == ":" and item.open == "[":
            before = item.parts[0] if len(item.parts) == 3 else []
            after = item.parts[-2]
            out.append(_render(before if step <= _end_step(item, steps) else after, step, steps))
        else:
            close = ")" if item.open == "(" else "]"
            out.append(item.open + ":".join(_render(p, step, steps) for p in item.parts) + close)
    return "".join(out)


def _end_step(group: _Group, steps: int) -> int:
    when = _when(group.parts[-1])
    return min(steps, int(when * steps if when < 1 else when))


def _switches(items: list, steps: int, out: set[int]) -> None:
    for item in items:
        if isinstance(item, _Group):
            if item.sep == "|":
                out.update(range(1, steps + 1))
            elif item.sep == ":" and item.open == "[":
                end = _end_step(item, steps)
                if end >= 1:
                    out.add(end)
            for part in item.parts:
                _switches(part, steps, out)


def parse_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, prompt)] covering steps 1..``steps``: the prompt of step s is the first entry
    whose last step is >= s; consecutive equal prompts are merged.

    >>> parse_schedule("a [cat:dog:0.5] photo", 10)
    [(5, 'a cat photo'), (10, 'a dog photo')]
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    try:
        items, _ = _Parser(text).sequence(0, top=True)
    except _Fail:  # pragma: no cover - the top level never fails
        return [(steps, text)]
    ends: set[int] = {steps}
    _switches(items, steps, ends)
    schedule: list[tuple[int, str]] = []
    for end in sorted(ends):
        prompt = _render(items, end, steps)
        if schedule and schedule[-1][1] == prompt:
            schedule[-1] = (end, prompt)
        else:
            schedule.append((end, prompt))
    return schedule


def prompt_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The prompt of 1-based ``step`` in a :func:`parse_schedule` result."""
    for end, prompt in schedule:
        if step <= end:
            return prompt
    return schedule[-1][1]
