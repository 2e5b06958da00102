"""A Hydra callback that summarizes a multirun: a table, plots and one image grid per swept value.

At the end of ``python run.py -m guider.scale=0,1,3 ...`` it reads each job's
``metrics.json`` and ``.hydra/overrides.yaml`` and writes into the sweep folder
``summary.csv``, ``summary.md``, ``summary_<metric>.png`` (each numeric metric against the
swept value) and ``grid_<override>.png`` (each job's grid).

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

log = logging.getLogger(__name__)

NFE = "nfe"  # the summary's cost column: network evaluations per batch (= per image)
NFE_SOURCE = "network_evaluations_per_batch"  # its name in metrics.json


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
        jobs.append((metrics_file.parent, {k.lstrip("+~"): v for k, v in values.items()}, metrics))
    keys = sorted({k for _, values, _ in jobs for k in values})
    swept = [k for k in keys if len({values.get(k) for _, values, _ in jobs}) > 1]
    rows = []
    for job_dir, values, metrics in jobs:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row = {"job": job_dir.name, **{k: _value(values.get(k, "")) for k in swept}}
        if NFE_SOURCE in numbers:
            row[NFE] = numbers.pop(NFE_SOURCE)
        row.update(numbers)
        rows.append(row)
    return swept, rows


def write_table(rows: Sequence[dict[str, Any]], sweep_dir: Path, swept: Sequence[str] = ()) -> list[str]:
    """``summary.csv`` and ``summary.md``: the job, the swept values, ``nfe``, then the metrics."""
    lead = [c for c in ("job", *swept, NFE) if any(c in row for row in rows)]
    columns = list(dict.fromkeys([*lead, *(k for row in rows for k in row)]))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return columns


def nfe_label(row: dict[str, Any]) -> str:
    """``NFE 30`` for a row that records its network evaluations, else empty."""
    nfe = row.get(NFE)
    return f"NFE {nfe:g}" if isinstance(nfe, (int, float)) and math.isfinite(nfe) else ""


def write_plots(swept: Sequence[str], rows: Sequence[dict[str, Any]], metrics: Sequence[str], sweep_dir: Path) -> int:
    """One PNG per metric against the swept value (categorical when values are not numbers),
    each job's NFE in its tick label (categorical) or written beside its point (numeric)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: sweep plots skipped (the table is written)")
        return 0
    labels = [", ".join(f"{k}={row[k]}" for k in swept) for row in rows]
    xs = [row[swept[0]] for row in rows] if len(swept) == 1 else labels
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    order = sorted(range(len(rows)), key=lambda i: xs[i]) if numeric else list(range(len(rows)))
    written = 0
    for metric in metrics:
        ys = [rows[i].get(metric) for i in order]
        if not all(isinstance(y, (int, float)) and math.isfinite(y) for y in ys):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        costs = [nfe_label(rows[i]) if metric != NFE else "" for i in order]
        if numeric:
            ax.plot([xs[i] for i in order], ys, marker="o")
            for i, y, cost in zip(order, ys, costs):
                if cost:
                    ax.annotate(cost, (xs[i], y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        else:
            ax.bar([f"{xs[i]}\n{cost}" if cost else str(xs[i]) for i, cost in zip(order, costs)], ys)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_xlabel((swept[0] if len(swept) == 1 else "job") + (" (NFE: network evaluations per image)"
                                                                   if any(costs) else ""))
        ax.set_ylabel(metric)
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


# plotted whenever present; other metrics only when they vary across the jobs
ALWAYS_PLOT = ("accuracy", "frechet_distance", "seconds_per_image", NFE)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks``): summarize the jobs of a multirun into its sweep folder."""

    def __init__(self, plot_metrics: Sequence[str] | None = None):
        self.plot_metrics = list(plot_metrics) if plot_metrics else None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            swept, rows = collect(sweep_dir)
            if not rows:
                log.warning("no finished job with metrics.json in %s: no summary", sweep_dir)
                return
            columns = write_table(rows, sweep_dir, swept)
            metrics = self.plot_metrics or [
                c for c in columns if c != "job" and c not in swept
                and (c in ALWAYS_PLOT or len({r.get(c) for r in rows}) > 1)]
            plots = write_plots(swept or ["job"], rows if swept else [{**r, "job": r["job"]} for r in rows],
                                metrics, sweep_dir)
            copy_grids(swept, rows, sweep_dir)
            log.info("sweep summary: %d jobs over %s -> %s (%d plots)", len(rows), swept or "-",
                     sweep_dir / "summary.md", plots)
        except Exception as exc:  # noqa: BLE001 - a summary must never turn a finished sweep into a failure
            log.warning("could not summarize the sweep in %s: %s", sweep_dir, exc)
