"""Which setting of a sweep won, said honestly: per metric its direction, its best setting, the
runner-up, the images each figure rests on; repeated seeds averaged (mean ± std, n).

* A metric is ranked only when its direction is known (:data:`sgm.tasks.metric_info.DIRECTIONS`).
* ``seed`` among the swept keys (``seed=1,2,3``) groups the jobs by their other swept values;
  each group is ranked by its mean, shown as mean ± sample std over its n seeds.
* A Fréchet distance over fewer than ``min_frechet_images`` images is not ranked: its estimate of
  the feature covariance is poor and the distance biased upward (the shipped model: 101 over
  8 images, 21 over 500), so a ranking over a few images says more about the count than the setting.
* An accuracy carries its 95% Wilson score interval over its labelled images (Wilson 1927).
* When the jobs recorded search constraints (``search.json``), only the feasible ones are ranked.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from .metric_info import COUNTS, DESCRIPTIVE, LOWER, direction

SEED = "seed"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any) -> str:
    """4 significant digits for floats, else as written."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class Group:
    """Jobs that share every swept value but the seed."""

    setting: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.setting.items()) or "all jobs"

    def values(self, metric: str) -> list[float]:
        return [r[metric] for r in self.rows if is_number(r.get(metric))]

    def mean(self, metric: str) -> float | None:
        vals = self.values(metric)
        return statistics.fmean(vals) if vals else None

    def std(self, metric: str) -> float | None:
        """Sample standard deviation over the group's jobs (None below two)."""
        vals = self.values(metric)
        return statistics.stdev(vals) if len(vals) > 1 else None

    def summary(self, metric: str) -> str:
        """``mean ± std`` (or the single value)."""
        mean, std = self.mean(metric), self.std(metric)
        if mean is None:
            return ""
        return fmt(float(mean)) + (f" ± {std:.2g}" if std is not None else "")

    def count(self, metric: str) -> int | None:
        """The smallest number of images a job of the group rests on for ``metric`` (None: not recorded)."""
        key = COUNTS.get(metric)
        counts = [r[key] for r in self.rows if key and is_number(r.get(key))]
        return int(min(counts)) if counts else None


def group_rows(rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> list[Group]:
    """One group per setting of the swept keys other than ``seed`` (one group per job without a
    swept seed), in order of first appearance."""
    keys = [k for k in swept if k != SEED]
    groups: dict[tuple, Group] = {}
    for i, row in enumerate(rows):
        key = tuple(str(row.get(k)) for k in keys) if SEED in swept else (i,)
        groups.setdefault(key, Group({k: row.get(k) for k in keys} if SEED in swept else
                                     {k: row.get(k) for k in swept})).rows.append(row)
    return list(groups.values())


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (Wilson 1927), good at 0, 1 and small n."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Ranking:
    """A metric's best group (``best``: several when tied), its runner-up, or why it is not ranked."""

    metric: str
    direction: str | None
    ranked: list[tuple[float, Group]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # why some groups were left out
    reason: str | None = None  # why the metric is not ranked at all

    @property
    def best(self) -> list[Group]:
        return [g for v, g in self.ranked if v == self.ranked[0][0]] if self.ranked else []

    def line(self) -> str:
        """One markdown bullet: the best setting, its figure and what it rests on, the runner-up."""
        if self.reason:
            return f"- `{self.metric}`: not ranked: {self.reason}"
        value, first = self.ranked[0]
        better = "lower" if self.direction == LOWER else "higher"
        best = self.best
        where = ("tie between " if len(best) > 1 else "at ") + "; ".join(f"`{g.label}`" for g in best)
        text = f"- `{self.metric}` ({better} is better): **{fmt(float(value))}** {where}"
        details = []
        n = len(first.rows)
        if n > 1:
            details.append(f"mean ± std {first.summary(self.metric)} over {n} seeds")
        count = first.count(self.metric)
        if count is not None:
            if self.metric == "accuracy":
                lo, hi = wilson_interval(value * count, count)
                details.append(f"95% CI {lo:.3g}–{hi:.3g}")
            details.append(f"{count} images{' per seed' if n > 1 else ''}")
        if details:
            text += " (" + ", ".join(details) + ")"
        rest = [(v, g) for v, g in self.ranked if g not in best]
        if rest:
            text += f"; runner-up {fmt(float(rest[0][0]))} at `{rest[0][1].label}`"
        if self.excluded:
            text += "; " + "; ".join(self.excluded)
        return text


def rank(metric: str, groups: Sequence[Group], min_frechet_images: int = 50) -> Ranking:
    """Rank ``groups`` by their mean ``metric`` in its known direction (see the module docstring)."""
    how = direction(metric)
    out = Ranking(metric, how)
    if how is None:
        out.reason = "its direction is unknown (sgm.tasks.metric_info.DIRECTIONS)"
        return out
    candidates = [g for g in groups if g.mean(metric) is not None]
    if metric == "frechet_distance":
        few = [g for g in candidates if (g.count(metric) or 0) < min_frechet_images]
        if few:
            counts = sorted({g.count(metric) or 0 for g in few})
            why = (f"{len(few)} of {len(candidates)} settings rest on fewer than {min_frechet_images} images "
                   f"({', '.join(map(str, counts))}); a Fréchet distance over few images is biased upward and "
                   "ranks the count more than the setting (SweepSummary.min_frechet_images)")
            candidates = [g for g in candidates if g not in few]
            if not candidates:
                out.reason = why
                return out
            out.excluded.append(why)
    if not candidates:
        out.reason = "no job recorded it"
        return out
    sign = 1.0 if how == LOWER else -1.0
    out.ranked = sorted(((float(g.mean(metric)), g) for g in candidates), key=lambda vg: sign * vg[0])
    return out


def rankable(metric: str) -> bool:
    """Whether ``metric`` is a judgement (ranked when its direction is known), not a count or a setting."""
    return metric not in DESCRIPTIVE
