"""A Hydra callback that summarizes a multirun: a table, the best setting per metric, plots, grids.

At the end of ``python run.py -m guider.scale=0,1,3 ...`` (or an Optuna search) it reads each
job's ``metrics.json``, ``.hydra/overrides.yaml`` and, from a search, ``search.json``, and
writes into the sweep folder:

* ``summary.csv``: every job, every column;
* ``summary.md``: the best setting per metric with its direction, the images it rests on and
  the runner-up (:mod:`sgm.tasks.sweep_stats`: repeated seeds averaged, a Fréchet distance over
  fewer than ``min_frechet_images`` images not ranked, only feasible search trials ranked);
  with repeated seeds a mean ± std table; then the jobs, without the columns that are constant
  over the sweep (listed once above the table);
* ``summary_<metric>.png``: each metric that varies against the swept value (group means with
  their std as error bars when seeds repeat); a metric constant over the sweep gets no plot;
* ``xy_grid.png``: one labelled X/Y grid of the jobs' images (:mod:`sgm.tasks.xy_grid`), and
  ``grid_<override>.png``: each job's grid.

Runs are compared at their cost: the column ``nfe`` (network evaluations per batch, i.e. per
image: metrics.json's ``network_evaluations_per_batch``, where a CFG step's batched uc + c
call counts once) comes right after the swept values, before every metric, and each plot
names every job's NFE (in the x tick labels, or beside each point of a numeric sweep). A
sweep over samplers (``sampler=euler,heun``) at equal ``steps`` is not one at equal cost.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .metric_info import NFE, NFE_SOURCE, direction
from .search import SEARCH_FILE
from .sweep_stats import SEED, Group, fmt, group_rows, is_number, rank, rankable
from .xy_grid import xy_grid

log = logging.getLogger(__name__)


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def collect(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(swept keys, one row per finished job: its swept values and numeric metrics)."""
    jobs = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        values = dict(o.split("=", 1) for o in overrides if "=" in o)
        metrics = json.loads(metrics_file.read_text())
        search_file = metrics_file.parent / SEARCH_FILE
        if search_file.is_file():  # an hparams search's verdict: the objective told and the broken bounds
            verdict = json.loads(search_file.read_text())
            metrics.update(objective=verdict.get("objective"), feasible=bool(verdict.get("feasible")),
                           violations="; ".join(verdict.get("violations") or []))
        jobs.append((metrics_file.parent, {k.lstrip("+~"): v for k, v in values.items()}, metrics))
    keys = sorted({k for _, values, _ in jobs for k in values})
    swept = [k for k in keys if len({values.get(k) for _, values, _ in jobs}) > 1]
    rows = []
    for job_dir, values, metrics in jobs:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers.update({k: metrics[k] for k in ("refused", "feasible", "violations") if k in metrics})
        row = {"job": job_dir.name, **{k: _value(values.get(k, "")) for k in swept}}
        if NFE_SOURCE in numbers:
            row[NFE] = numbers.pop(NFE_SOURCE)
        row.update({k: v for k, v in numbers.items() if k not in row})  # a swept value is as the job was given it
        rows.append(row)
    return swept, rows


def constant_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, Any]:
    """The columns with one value in every row (shown once, not as a column of summary.md)."""
    if len(rows) < 2:
        return {}
    return {c: rows[0].get(c) for c in columns if c != "job" and all(c in r for r in rows)
            and len({json.dumps(r.get(c), default=str) for r in rows}) == 1}


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(r) + " |" for r in rows)]


def best_settings(swept: Sequence[str], rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  min_frechet_images: int = 50) -> list[str]:
    """The summary's "best setting per metric" lines (:mod:`sgm.tasks.sweep_stats`)."""
    judged = [r for r in rows if "refused" not in r]
    lines = []
    if any("feasible" in r for r in judged):
        feasible = [r for r in judged if r.get("feasible")]
        lines.append(f"Ranked among the {len(feasible)} feasible of {len(rows)} jobs (those within the search's "
                     f"constraints; {len(rows) - len(judged)} refused before sampling).")
        judged = feasible
    lines.append("")
    groups = group_rows(judged, swept)
    metrics = [c for c in columns if c not in ("job", "objective", *swept) and rankable(c)
               and any(is_number(r.get(c)) for r in judged)]
    return lines + [rank(metric, groups, min_frechet_images).line() for metric in metrics]


def seed_table(swept: Sequence[str], rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    """Mean ± std and n per setting when ``seed`` is among the swept keys (else nothing)."""
    if SEED not in swept:
        return []
    keys = [k for k in swept if k != SEED]
    groups = group_rows([r for r in rows if "refused" not in r], swept)
    shown = [m for m in metrics if any(g.mean(m) is not None for g in groups)]
    body = [[*(str(g.setting.get(k)) for k in keys), str(len(g.rows)), *(g.summary(m) for m in shown)]
            for g in groups]
    return ["", "## Mean ± std over seeds", "", *_md_table([*keys, "n", *shown], body)]


def write_table(rows: Sequence[dict[str, Any]], sweep_dir: Path, swept: Sequence[str] = (),
                min_frechet_images: int = 50) -> list[str]:
    """``summary.csv`` (every column) and ``summary.md`` (best settings, seeds, the varying columns)."""
    lead = [c for c in ("job", *swept, NFE) if any(c in row for row in rows)]
    columns = list(dict.fromkeys([*lead, *(k for row in rows for k in row)]))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    constant = constant_columns(rows, columns)
    shown = [c for c in columns if c not in constant]
    lines = [f"# Sweep summary: {len(rows)} jobs over {', '.join(swept) or '-'}", ""]
    if constant:
        lines += ["Constant over the sweep: " + ", ".join(f"{k}={fmt(v)}" for k, v in constant.items()), ""]
    lines += ["## Best setting per metric", "", *best_settings(swept, rows, shown, min_frechet_images)]
    lines += seed_table(swept, rows, [c for c in shown if c not in ("job", *swept) and rankable(c)
                                      and direction(c) is not None])
    lines += ["", "## Jobs", "", *_md_table(shown, [[fmt(row.get(c, "")) for c in shown] for row in rows])]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return columns


def nfe_label(row: dict[str, Any]) -> str:
    """``NFE 30`` for a row that records its network evaluations, else empty."""
    nfe = row.get(NFE)
    return f"NFE {nfe:g}" if isinstance(nfe, (int, float)) and math.isfinite(nfe) else ""


def varies(rows: Sequence[dict[str, Any]], metric: str) -> bool:
    """Whether ``metric`` takes more than one finite value over the jobs (a flat one gets no plot)."""
    return len({r[metric] for r in rows if is_number(r.get(metric))}) > 1


def write_plots(swept: Sequence[str], rows: Sequence[dict[str, Any]], metrics: Sequence[str], sweep_dir: Path) -> int:
    """One PNG per metric against the swept value (categorical when values are not numbers),
    each setting's NFE in its tick label (categorical) or written beside its point (numeric).
    With ``seed`` among several swept keys, each point is a setting's mean over its seeds, with
    the std as an error bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: sweep plots skipped (the table is written)")
        return 0
    groups: list[Group] = group_rows(rows, swept) if SEED in swept and len(swept) > 1 else [
        Group({k: r.get(k) for k in swept}, [r]) for r in rows]
    keys = [k for k in swept if k != SEED] if SEED in swept and len(swept) > 1 else list(swept)
    labels = [", ".join(f"{k}={g.setting.get(k)}" for k in keys) for g in groups]
    xs = [g.setting.get(keys[0]) for g in groups] if len(keys) == 1 else labels
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    order = sorted(range(len(groups)), key=lambda i: xs[i]) if numeric else list(range(len(groups)))
    written = 0
    every = order
    for metric in metrics:
        order = [i for i in every if groups[i].mean(metric) is not None]  # refused trials have no metrics
        if not order:
            continue
        ys = [groups[i].mean(metric) for i in order]
        errs = [groups[i].std(metric) or 0.0 for i in order]
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        costs = [nfe_label(groups[i].rows[0]) if metric != NFE else "" for i in order]
        if numeric:
            ax.errorbar([xs[i] for i in order], ys, yerr=errs if any(errs) else None, marker="o", capsize=3)
            for i, y, cost in zip(order, ys, costs):
                if cost:
                    ax.annotate(cost, (xs[i], y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        else:
            ax.bar([f"{xs[i]}\n{cost}" if cost else str(xs[i]) for i, cost in zip(order, costs)], ys,
                   yerr=errs if any(errs) else None, capsize=3)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_xlabel((keys[0] if len(keys) == 1 else "setting") + (" (NFE: network evaluations per image)"
                                                                     if any(costs) else ""))
        n = len(groups[order[0]].rows)
        ax.set_ylabel(metric + (f" (mean ± std, {n} seeds)" if n > 1 else ""))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(sweep_dir / f"summary_{metric}.png")
        plt.close(fig)
        written += 1
    return written


def copy_grids(swept: Sequence[str], rows: Sequence[dict[str, Any]], sweep_dir: Path) -> None:
    for row in rows:
        grid = sweep_dir / row["job"] / "grid.png"
        if grid.is_file():
            tag = ",".join(f"{k}={row[k]}" for k in swept) or row["job"]
            safe = "".join(c if c.isalnum() or c in "._=,-" else "_" for c in tag)
            shutil.copyfile(grid, sweep_dir / f"grid_{safe}.png")


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks``): summarize the jobs of a multirun into its sweep folder.

    ``plot_metrics``: plot these (default: every column that varies over the jobs);
    ``min_frechet_images``: a Fréchet distance over fewer images is not ranked;
    ``cell``: the largest size (width, height) of an X/Y grid cell."""

    def __init__(self, plot_metrics: Sequence[str] | None = None, min_frechet_images: int = 50,
                 cell: Sequence[int] = (320, 320)):
        self.plot_metrics = list(plot_metrics) if plot_metrics else None
        self.min_frechet_images = int(min_frechet_images)
        self.cell = (int(cell[0]), int(cell[1]))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            swept, rows = collect(sweep_dir)
            if not rows:
                log.warning("no finished job with metrics.json in %s: no summary", sweep_dir)
                return
            columns = write_table(rows, sweep_dir, swept, self.min_frechet_images)
            metrics = self.plot_metrics or [c for c in columns if c not in ("job", *swept) and varies(rows, c)]
            plots = write_plots(swept or ["job"], rows, metrics, sweep_dir)
            copy_grids(swept, rows, sweep_dir)
            image, layout = xy_grid(swept or ["job"], rows, sweep_dir, self.cell)
            image.save(sweep_dir / "xy_grid.png")
            with open(sweep_dir / "summary.md", "a") as f:
                f.write(f"\n![X/Y grid](xy_grid.png)\n\nX/Y grid ({layout.title}): `xy_grid.png`\n")
            log.info("sweep summary: %d jobs over %s -> %s (%d plots, xy_grid.png)", len(rows), swept or "-",
                     sweep_dir / "summary.md", plots)
        except Exception as exc:  # noqa: BLE001 - a summary must never turn a finished sweep into a failure
            log.warning("could not summarize the sweep in %s: %s", sweep_dir, exc)
