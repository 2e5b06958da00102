"""One labelled X/Y grid per sweep (after AUTOMATIC1111's "X/Y plot" script): each cell a job's
``grid.png``, rows and columns labelled with their swept values.

* Two swept keys: columns are the values of the key with more values, rows the other's.
* One swept key: a single labelled row.
* More keys: the two with the most values (``seed`` only when nothing else is swept); each other
  key is fixed at its value in the first job, and the grid says so in its title.
* Jobs that do not fill a grid (a random or Optuna search: fewer than half the cells would have a
  job) get one labelled row per job instead, at most ``max_rows``.

A cell is the job's ``grid.png`` shrunk to fit ``cell`` (never enlarged); a missing image leaves
the cell blank with ``-``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from .sweep_stats import SEED

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
PAD = 6


@dataclass
class XYLayout:
    """Where everything went: labels, the fixed keys and each cell's box (left, top, right, bottom)."""

    title: str
    row_labels: list[str]
    col_labels: list[str]
    cells: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)
    jobs: dict[tuple[int, int], str] = field(default_factory=dict)  # cell -> job folder name
    row_label_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    col_label_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


def _distinct(rows: Sequence[dict[str, Any]], key: str) -> list[Any]:
    return list(dict.fromkeys(str(r.get(key)) for r in rows))


def choose_axes(swept: Sequence[str], rows: Sequence[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(column key, row key) of the X/Y grid; None where the grid has no such axis."""
    keys = [k for k in swept if k != SEED] or list(swept)
    by_count = sorted(keys, key=lambda k: -len(_distinct(rows, k)))  # stable: swept order breaks ties
    return (by_count[0] if by_count else None), (by_count[1] if len(by_count) > 1 else None)


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _cell_image(path: Path, cell: tuple[int, int]) -> Image.Image | None:
    if not path.is_file():
        return None
    im = Image.open(path).convert("RGB")
    im.thumbnail(cell, Image.Resampling.LANCZOS)  # only ever shrinks
    return im


def plan_cells(swept: Sequence[str], rows: Sequence[dict[str, Any]], max_rows: int = 40
               ) -> tuple[str, list[str], list[str], dict[tuple[int, int], dict[str, Any]]]:
    """(title, row labels, column labels, cell -> job row) as the module docstring describes."""
    xkey, ykey = choose_axes(swept, rows)
    if xkey is None:
        return "one row per job", [r["job"] for r in rows[:max_rows]], [""], {
            (i, 0): r for i, r in enumerate(rows[:max_rows])}
    xs = _distinct(rows, xkey)
    ys = _distinct(rows, ykey) if ykey else [""]
    fixed = {k: str(rows[0].get(k)) for k in swept if k not in (xkey, ykey)}
    chosen = [r for r in rows if all(str(r.get(k)) == v for k, v in fixed.items())]
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for r in chosen:
        cells.setdefault((ys.index(str(r.get(ykey))) if ykey else 0, xs.index(str(r.get(xkey)))), r)
    if len(cells) * 2 < len(xs) * len(ys):  # not a grid: a search or a sparse sweep
        label = [", ".join(f"{k}={r.get(k)}" for k in swept) for r in rows[:max_rows]]
        more = f" (first {max_rows} of {len(rows)})" if len(rows) > max_rows else ""
        return f"one row per job{more}", label, [""], {(i, 0): r for i, r in enumerate(rows[:max_rows])}
    title = f"columns: {xkey}" + (f", rows: {ykey}" if ykey else "")
    if fixed:
        title += "; fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items())
    return (title, [f"{ykey}={y}" for y in ys] if ykey else [""], [f"{xkey}={x}" for x in xs], cells)


def xy_grid(swept: Sequence[str], rows: Sequence[dict[str, Any]], sweep_dir: Path,
            cell: tuple[int, int] = (320, 320), max_rows: int = 40) -> tuple[Image.Image, XYLayout]:
    """The labelled grid of the jobs' ``grid.png`` files (``rows``: the summary's rows, with ``job``)."""
    title, row_labels, col_labels, plan = plan_cells(swept, rows, max_rows)
    images = {rc: _cell_image(Path(sweep_dir) / r["job"] / "grid.png", cell) for rc, r in plan.items()}
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [im.size for im in images.values() if im is not None] or [(64, 64)]
    cw, ch = max(w for w, _ in sizes), max(h for _, h in sizes)
    col_w = [max(cw, _text_size(probe, t, font)[0]) + PAD for t in col_labels]
    label_h = max(_text_size(probe, t or "x", font)[1] for t in [*col_labels, title]) + PAD
    left = max(_text_size(probe, t, font)[0] for t in row_labels) + 2 * PAD
    top = 2 * label_h + PAD if any(col_labels) else label_h + PAD
    row_h = [max(ch, _text_size(probe, t or "x", font)[1]) + PAD for t in row_labels]
    width = max(left + sum(col_w) + PAD, _text_size(probe, title, font)[0] + 2 * PAD)
    canvas = Image.new("RGB", (width, top + sum(row_h) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD // 2), title, fill=INK, font=font)
    layout = XYLayout(title, row_labels, col_labels)
    xs = [left + sum(col_w[:j]) for j in range(len(col_w))]
    ys = [top + sum(row_h[:i]) for i in range(len(row_h))]
    for j, text in enumerate(col_labels):
        if text:
            draw.text((xs[j], label_h + PAD // 2), text, fill=INK, font=font)
            layout.col_label_boxes.append(tuple(draw.textbbox((xs[j], label_h + PAD // 2), text, font=font)))
    for i, text in enumerate(row_labels):  # vertically centred on the row
        at = (PAD, ys[i] + (row_h[i] - PAD - _text_size(probe, text or "x", font)[1]) // 2)
        draw.text(at, text, fill=INK, font=font)
        layout.row_label_boxes.append(tuple(draw.textbbox(at, text, font=font)))
    for (i, j), job in plan.items():
        im = images[(i, j)]
        if im is None:
            draw.text((xs[j] + cw // 2, ys[i] + ch // 2), "-", fill=INK, font=font)
            continue
        canvas.paste(im, (xs[j], ys[i]))
        layout.cells[(i, j)] = (xs[j], ys[i], xs[j] + im.width, ys[i] + im.height)
        layout.jobs[(i, j)] = job["job"]
    return canvas, layout
