"""The sampler leaderboard: every sampler of ``conf/sampler`` x schedules, compared at equal network evaluations.

Samplers and schedules are the config groups' files, composed and instantiated as
``python run.py sampler=NAME discretization=NAME`` builds them, so a new config file joins
the board on the next run. A sampler's cost is measured, never assumed: its ``denoise`` calls
are counted at every step count, and a budget of N network evaluations (NFE) runs the step
count whose measured NFE is the largest that is <= N (the table shows the NFE actually spent;
a sampler that cannot spend N or fewer is marked).

(a) Analytic target: a 2-D Gaussian mixture with an exact denoiser (:mod:`sgm.diffusion.analytic`),
    float64, at 5, 10, 20 and 50 NFE per schedule:
    * deterministic samplers: RMS distance to the exact probability-flow ODE solution from the
      same start (:func:`exact_flow`, scipy's DOP853 at rtol 1e-10);
    * every sampler (the stochastic ones have no pathwise target): the error of the sample law,
      per mixture component (:func:`law_error`).
(b) The shipped digit model at 8, 16 and 32 NFE (run.py's defaults otherwise: seed 42, CFG 5,
    the default schedule): digit accuracy and Fréchet distance over a fixed set of seeds, as
    ``python run.py`` measures them; one engine is built and reused for every sampler.

    python experiments/sampler_leaderboard.py --out docs/sampler_leaderboard.md
    python experiments/sampler_leaderboard.py --samplers euler heun --schedules edm edm:rho=7 ddpm
    python experiments/sampler_leaderboard.py --quick --out /tmp/board.md   # smoke run, seconds

A schedule is ``NAME`` (``conf/discretization/NAME.yaml``) or ``NAME:key=value:...`` (its
settings, e.g. ``edm:rho=7``); ``--schedules all`` takes every file of the group.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere: the checkout's sgm, as run.py imports it
    sys.path.insert(0, str(ROOT))

from sgm.data.prompts import collate_jobs, make_jobs  # noqa: E402
from sgm.diffusion.analytic import GaussianMixture  # noqa: E402
from sgm.diffusion.schedule import for_model, initial_latent, sampling_sigmas  # noqa: E402
from sgm.tasks.common import CONF_DIR, build_engine, compose  # noqa: E402
from sgm.tasks.writer import to_uint8  # noqa: E402

log = logging.getLogger("sampler_leaderboard")

PATH_TARGETS = (5, 10, 20, 50)
MODEL_TARGETS = (8, 16, 32)
DEFAULT_SCHEDULES = ("edm", "edm:rho=7", "ddpm")
QUICK_SAMPLERS = ("euler", "heun")
RTOL, ATOL = 1e-10, 1e-12  # the exact solution's tolerances (checked against 100x tighter ones in the report)


def options(group: str) -> list[str]:
    """The options of a config group: its ``conf/<group>/*.yaml`` files."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# -- building samplers and schedules from the config groups ------------------------------------
@functools.lru_cache(maxsize=None)
def composed(*overrides: str) -> DictConfig:
    """``conf/sample.yaml`` with ``overrides`` as run.py composes it (once per set of overrides)."""
    return compose("sample", list(overrides))


def build_sampler(name: str, guided: bool = True) -> Any:
    """``sampler=NAME`` as run.py builds it: with the run's guider (CFG), or unguided (the identity guider)."""
    node = composed(f"sampler={name}", "progress=false").sampler
    return instantiate(node) if guided else instantiate(node, guider=None)


@dataclass
class Schedule:
    """A ``discretization=NAME`` of run.py plus the model's denoiser (which fills a range left to the model)."""

    spec: str
    discretization: Any
    denoiser: Any

    @classmethod
    def build(cls, spec: str) -> "Schedule":
        name, *settings = spec.split(":")
        if name not in options("discretization"):
            raise ValueError(f"unknown schedule {name!r} in {spec!r}: "
                             f"choose from {', '.join(options('discretization'))}")
        cfg = composed(f"discretization={name}", *(f"discretization.{s}" for s in settings))
        return cls(spec, instantiate(cfg.discretization), instantiate(cfg.model.denoiser))

    def sigmas(self, steps: int) -> torch.Tensor:
        return sampling_sigmas(self.discretization, steps, self.denoiser)

    def describe(self) -> str:
        return repr(for_model(self.discretization, self.denoiser))


# -- counting network evaluations ----------------------------------------------------------------
class Counted:
    """A denoiser that counts its calls: one call is one network evaluation, as ``DiffusionEngine.denoise`` counts."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]):
        self.fn, self.calls = fn, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        self.calls += 1
        return self.fn(x, sigma, cond)


def run_counted(sampler: Any, gm: GaussianMixture, noise: torch.Tensor, sigmas: torch.Tensor, cond: dict | None = None,
                uc: dict | None = None, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(sample, NFE) of ``sampler`` on the mixture from unit ``noise`` through ``sigmas`` (sgm's start)."""
    den = Counted(gm)
    x = initial_latent(noise, sigmas[0].to(noise.dtype))
    out = sampler.sample(den, x, sigmas, cond if cond is not None else {}, uc,
                         generator=torch.Generator().manual_seed(seed))
    return out, den.calls


@dataclass
class Probe:
    """A small problem on which a sampler's NFE at each step count is counted (and its randomness tested).

    ``cond`` / ``uc`` are class weights of the mixture, so a guider with an unconditional
    branch (CFG) evaluates as it does on a real model: its branches batched into one call."""

    gm: GaussianMixture
    noise: torch.Tensor
    cond: dict | None = None
    uc: dict | None = None

    def run(self, sampler: Any, sigmas: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
        return run_counted(sampler, self.gm, self.noise, sigmas, self.cond, self.uc, seed)


def make_probe(gm: GaussianMixture, conditional: bool = False, batch: int = 4) -> Probe:
    noise = torch.randn(batch, *gm.data_shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    if not conditional:
        return Probe(gm, noise)
    onehot = torch.nn.functional.one_hot(torch.arange(batch) % gm.num_components, gm.num_components).double()
    return Probe(gm, noise, {"class_weights": onehot}, {"class_weights": gm.weights.expand(batch, -1)})


@dataclass
class Cost:
    """A sampler's measured NFE at each step count it ran (``failures``: step counts that raised)."""

    nfe: dict[int, int] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)

    def steps_for(self, target: int) -> int | None:
        """The step count whose NFE is the largest <= ``target`` (the most steps among equal NFE); None: none is."""
        fits = [(nfe, n) for n, nfe in self.nfe.items() if nfe <= target]
        return max(fits)[1] if fits else None

    def ignores_steps(self) -> bool:
        return len(self.nfe) > 2 and len(set(self.nfe.values())) == 1

    def describe(self) -> str:
        """The NFE of n steps as measured: ``n``, ``2n-1``, ``fixed 37``, or the values when no line fits."""
        if not self.nfe:
            return "fails"
        ns = sorted(self.nfe)
        if self.ignores_steps():
            return f"{self.nfe[ns[0]]} whatever the steps"
        if len(ns) >= 2:
            slope = (self.nfe[ns[-1]] - self.nfe[ns[0]]) / (ns[-1] - ns[0])
            offset = self.nfe[ns[0]] - slope * ns[0]
            if slope == round(slope) and offset == round(offset) and all(
                    self.nfe[n] == slope * n + offset for n in ns):
                a, b = int(slope), int(offset)
                return f"{a if a != 1 else ''}n" + (f"{b:+d}" if b else "")
        shown = [n for n in (1, 2, 5, 10, 20) if n in self.nfe]
        return ", ".join(f"{self.nfe[n]} at {n}" for n in shown)


def measure_cost(run: Callable[[int], int], max_target: int, patience: int = 3) -> Cost:
    """Count the NFE of ``run(steps)`` for steps = 1, 2, ... until it exceeds ``max_target``
    ``patience`` times in a row, stays constant for 8 step counts (the sampler ignores them),
    or reaches 4 x ``max_target`` steps."""
    cost = Cost()
    over = flat = 0
    last = None
    for n in range(1, 4 * max_target + 1):
        try:
            nfe = run(n)
        except Exception as exc:  # noqa: BLE001 - a sampler that cannot run n steps is recorded, not fatal
            cost.failures[n] = f"{type(exc).__name__}: {exc}"
            if not cost.nfe and len(cost.failures) >= 5:
                break
            continue
        cost.nfe[n] = nfe
        over = over + 1 if nfe > max_target else 0
        flat = flat + 1 if nfe == last else 0
        last = nfe
        if over >= patience or flat >= 8:
            break
    return cost


def is_stochastic(run: Callable[[int], torch.Tensor]) -> bool:
    """Whether the sample depends on the generator: ``run(seed)`` for two seeds."""
    return not torch.equal(run(1), run(2))


# -- (a) the analytic target ---------------------------------------------------------------------
def analytic_target(std: float = 0.5) -> GaussianMixture:
    """Three unequal components in 2-D whose mixture has mean 0 and covariance I.

    With unit covariance the run's start, noise of variance 1 + sigma_max^2
    (:func:`sgm.diffusion.schedule.initial_latent`), is the noised data law to second order,
    so the law errors are the samplers' own rather than the start's."""
    raw = torch.tensor([[-2.0, 0.5], [1.0, 1.5], [2.5, -1.0]], dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    centred = raw - w @ raw
    evals, evecs = torch.linalg.eigh(centred.T @ torch.diag(w) @ centred)
    whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return GaussianMixture(centred @ whiten * math.sqrt(1 - std**2), std=std, weights=w)


def exact_flow(gm: GaussianMixture, x: torch.Tensor, sigma_start: float, sigma_end: float = 0.0,
               rtol: float = RTOL, atol: float = ATOL) -> torch.Tensor:
    """x(sigma_end) of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al.
    2022, eq. 3 with sigma(t) = t) from x(sigma_start) = ``x``, by scipy's 8th-order DOP853.

    For a mixture of components with std s > 0, x - D = O(sigma^2), so the right side tends
    to 0 at sigma = 0 and that is its value there: the ODE runs to sigma = 0 itself."""
    from scipy.integrate import solve_ivp  # the test extra (pip install scipy)

    shape, b = x.shape, x.shape[0]

    def rhs(sigma: float, y: np.ndarray) -> np.ndarray:
        if sigma <= 0:
            return np.zeros_like(y)
        xt = torch.from_numpy(y).reshape(shape)
        d = gm(xt, torch.full((b,), float(sigma), dtype=torch.float64))
        return ((xt - d) / sigma).reshape(-1).numpy()

    sol = solve_ivp(rhs, (float(sigma_start), float(sigma_end)), x.double().reshape(-1).numpy(), method="DOP853",
                    rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def component_stats(gm: GaussianMixture, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per component k of the mixture, with r_k(x) its posterior responsibility at sigma = 0:
    weight E[r_k], mean E[r_k x] / E[r_k] and per-coordinate variance about that mean."""
    xf = x.reshape(len(x), -1).double()
    mu = gm.means.reshape(gm.num_components, -1)
    r = torch.softmax(torch.log(gm.weights) - torch.cdist(xf, mu) ** 2 / (2 * gm.std**2), dim=1)  # [N, K]
    weight = r.mean(0)
    mean = (r.T @ xf) / r.sum(0)[:, None]
    var = torch.stack([(r[:, k] * (xf - mean[k]).pow(2).sum(1)).sum() / (r[:, k].sum() * xf.shape[1])
                       for k in range(gm.num_components)])
    return weight, mean, var


def law_error(gm: GaussianMixture, x: torch.Tensor, reference: tuple[torch.Tensor, ...]) -> float:
    """The largest error of any component's weight (relative), mean (in units of the component
    std) or variance (relative to std^2) of samples ``x`` against ``reference`` (the same
    statistics of exact samples, :func:`component_stats`)."""
    (w, m, v), (w0, m0, v0) = component_stats(gm, x), reference
    errors = torch.stack([((w - w0) / w0).abs(), (m - m0).norm(dim=1) / gm.std, ((v - v0) / gm.std**2).abs()])
    return float(errors.max())


@dataclass
class Cell:
    """One measurement: its value(s), the NFE it spent and the steps it ran."""

    values: dict[str, float]
    nfe: int
    steps: int


@dataclass
class Row:
    sampler: str
    cost: Cost
    stochastic: bool | None = None
    cells: dict[str, dict[int, Cell]] = field(default_factory=dict)  # table -> target -> cell
    failure: str | None = None  # no step count ran at all
    errors: dict[tuple[str, int], str] = field(default_factory=dict)  # (table, target) -> what a run raised

    def measure(self, table: str, target: int, fn: Callable[[], Cell]) -> None:
        """Fill one cell; a run that raises is recorded (``error`` in the table, the message below it)."""
        try:
            self.cells.setdefault(table, {})[target] = fn()
        except Exception as exc:  # noqa: BLE001 - one sampler's failure must not stop the board
            self.errors[(table, target)] = f"{type(exc).__name__}: {exc}"
            log.warning("%s, %s at %d NFE: %s", self.sampler, table, target, self.errors[(table, target)])


@dataclass
class AnalyticSetup:
    paths: int = 1000
    law_samples: int = 20000
    reference_samples: int = 2_000_000
    targets: Sequence[int] = PATH_TARGETS
    seed: int = 0


def analytic_part(samplers: Sequence[str], schedules: Sequence[Schedule], setup: AnalyticSetup) -> dict[str, Any]:
    """Part (a): per schedule, the pathwise and the law tables (rows by sampler)."""
    gm = analytic_target()
    g = torch.Generator().manual_seed(setup.seed)
    path_noise = torch.randn(setup.paths, *gm.data_shape, generator=g, dtype=torch.float64)
    law_noise = torch.randn(setup.law_samples, *gm.data_shape, generator=g, dtype=torch.float64)
    reference = component_stats(gm, gm.sample(setup.reference_samples, generator=g))
    floor = sorted(law_error(gm, gm.sample(setup.law_samples, generator=g), reference) for _ in range(5))[2]
    probe = make_probe(gm)
    built = {name: build_sampler(name, guided=False) for name in samplers}
    result: dict[str, Any] = {"gm": gm, "law_floor": floor, "schedules": {}}
    for schedule in schedules:
        flows: dict[tuple[float, float], torch.Tensor] = {}  # the paths' exact x(end), by (start, end) sigma

        def flow(start: float, end: float = 0.0) -> torch.Tensor:
            if (start, end) not in flows:
                flows[(start, end)] = exact_flow(gm, initial_latent(path_noise, start), start, end)
            return flows[(start, end)]

        def exact_from(sigmas: torch.Tensor) -> torch.Tensor:
            return flow(float(sigmas[0]))

        start = float(schedule.sigmas(max(setup.targets))[0])
        tighter = exact_flow(gm, initial_latent(path_noise, start), start, rtol=RTOL / 100, atol=ATOL / 100)
        reference_check = rms(flow(start), tighter)
        end_jump = {}  # exact to the last nonzero sigma of an n-step schedule, then the exact denoiser
        for n in setup.targets:
            sig = schedule.sigmas(n)
            last = float(sig[-2])
            x_last = flow(float(sig[0]), last)
            end_jump[n] = rms(gm(x_last, torch.full((setup.paths,), last, dtype=torch.float64)), exact_from(sig))
        rows = []
        for name, sampler in built.items():
            t0 = time.perf_counter()
            cost = measure_cost(lambda n: probe.run(sampler, schedule.sigmas(n))[1], max(setup.targets))
            row = Row(name, cost, cells={"path": {}, "law": {}})
            rows.append(row)
            if not cost.nfe:
                row.failure = next(iter(cost.failures.values()), "no step count ran")
                log.warning("%s on %s: %s", name, schedule.spec, row.failure)
                continue
            n_test = min(cost.nfe, key=lambda n: abs(n - 4))
            row.stochastic = is_stochastic(lambda s: probe.run(sampler, schedule.sigmas(n_test), seed=s)[0])
            for target in setup.targets:
                n = cost.steps_for(target)
                if n is None:
                    continue
                sig = schedule.sigmas(n)

                def pathwise(sig: torch.Tensor = sig, n: int = n) -> Cell:
                    out, nfe = run_counted(sampler, gm, path_noise, sig, seed=setup.seed + 1)
                    return Cell({"rms": rms(out, exact_from(sig))}, nfe, n)

                def law(sig: torch.Tensor = sig, n: int = n) -> Cell:
                    out, nfe = run_counted(sampler, gm, law_noise, sig, seed=setup.seed + 2)
                    return Cell({"law": law_error(gm, out, reference)}, nfe, n)

                if not row.stochastic:
                    row.measure("path", target, pathwise)
                row.measure("law", target, law)
            log.info("(a) %s / %s: NFE %s, %s, %.1f s", schedule.spec, name, cost.describe(),
                     "stochastic" if row.stochastic else "deterministic", time.perf_counter() - t0)
        result["schedules"][schedule.spec] = {"describe": schedule.describe(), "rows": rows, "start": start,
                                              "reference_check": reference_check, "end_jump": end_jump}
    return result


# -- (b) the shipped model -------------------------------------------------------------------------
def model_part(samplers: Sequence[str], targets: Sequence[int], images_per_digit: int, batch_size: int) -> dict:
    """Part (b): run.py's defaults (model, guider, schedule, seed, prompts) with each sampler at each NFE budget."""
    cfg = composed("progress=false", "~logger")
    engine = build_engine(cfg.model, cfg.get("weights"), seed=int(cfg.seed))
    judge = instantiate(cfg.metrics)
    discretization = instantiate(cfg.discretization)
    jobs = make_jobs([str(p) for p in cfg.prompts], str(cfg.negative_prompt or ""), int(cfg.seed), images_per_digit)
    H, W = int(cfg.H), int(cfg.W)
    probe = make_probe(analytic_target(), conditional=True)
    rows = []
    for name in samplers:
        t0 = time.perf_counter()
        sampler = build_sampler(name)
        cost = measure_cost(lambda n: probe.run(sampler, engine.schedule(discretization, n))[1], max(targets))
        row = Row(name, cost, cells={"model": {}})
        rows.append(row)
        if not cost.nfe:
            row.failure = next(iter(cost.failures.values()), "no step count ran")
            log.warning("%s on the shipped model: %s", name, row.failure)
            continue
        for target in targets:
            n = cost.steps_for(target)
            if n is None:
                continue

            def judged(n: int = n) -> Cell:
                engine.configure_prediction(H, W, engine.schedule(discretization, n), sampler)
                images, prompts, nfe, seconds = [], [], [], 0.0
                for i in range(0, len(jobs), batch_size):
                    out = engine.predict_step(collate_jobs(jobs[i : i + batch_size]))
                    images.append(torch.from_numpy(to_uint8(out["images"])))  # judged as run.py judges its PNGs
                    prompts += out["prompt"]
                    nfe.append(out["nfe"])
                    seconds += out["seconds"]
                metrics = judge(torch.cat(images).permute(0, 3, 1, 2).float() / 127.5 - 1, prompts)
                log.info("(b) %s, %d steps, %d NFE: accuracy %.3f, Fréchet %.1f, %.1f s sampling", name, n, max(nfe),
                         metrics["accuracy"], metrics["frechet_distance"], seconds)
                return Cell({"accuracy": metrics["accuracy"], "fd": metrics["frechet_distance"],
                             "ms_per_image": 1000 * seconds / len(jobs)}, max(nfe), n)

            row.measure("model", target, judged)
        log.info("(b) %s: NFE %s, %.1f s", name, cost.describe(), time.perf_counter() - t0)
    return {"rows": rows, "images": len(jobs), "schedule": repr(for_model(discretization, engine.denoiser)),
            "guider": repr(instantiate(cfg.guider)), "real": real_digits(len(jobs))}


def real_digits(count: int) -> dict | None:
    """The metrics of ``count`` real training digits (``experiments/shipped_model/evaluate.py``), None
    without the MNIST sample (the ``digits`` extra)."""
    spec = importlib.util.spec_from_file_location("_shipped_evaluate", ROOT / "experiments/shipped_model/evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    try:
        return evaluate.real_digits(count)
    except (ImportError, FileNotFoundError) as exc:
        log.warning("no real-digit scale (%s)", exc)
        return None


# -- the report ------------------------------------------------------------------------------------
def sort_rows(rows: Sequence[Row], table: str, key: str, targets: Sequence[int]) -> list[Row]:
    """Rows by the mean log of ``key`` (lower is better) over the targets; a target a row cannot
    reach counts as that column's worst; rows without any cell last."""
    def score(row: Row, t: int) -> float | None:
        cell = row.cells.get(table, {}).get(t)
        if cell is None:
            return None
        value = cell.values[key]
        return math.log(max(value, 1e-300)) if math.isfinite(value) else math.inf  # a diverged run: last

    worst = {t: max((s for s in (score(r, t) for r in rows) if s is not None and s < math.inf), default=0.0)
             for t in targets}
    ranked = sorted((r for r in rows if r.cells.get(table)),
                    key=lambda r: sum(worst[t] if score(r, t) is None else score(r, t) for t in targets))
    return ranked + [r for r in rows if not r.cells.get(table)]


def cell_text(row: Row, table: str, target: int, fmt: Callable[[Cell], str]) -> str:
    if row.failure:
        return "fails"
    if (table, target) in row.errors:
        return "error"
    cell = row.cells.get(table, {}).get(target)
    if cell is None:
        return "—"
    return fmt(cell) + ("" if cell.nfe == target else f" ({cell.nfe})")


def markdown_table(rows: Sequence[Row], table: str, targets: Sequence[int], columns: Sequence[tuple[str, Callable]],
                   kind: bool = False) -> list[str]:
    head = ["sampler", "NFE of n steps"] + (["kind"] if kind else [])
    head += [f"{label} @ {t}" for label, _ in columns for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row.sampler}`", row.cost.describe()]
        if kind:
            cells.append("—" if row.stochastic is None else ("stochastic" if row.stochastic else "ODE"))
        cells += [cell_text(row, table, t, fmt) for _, fmt in columns for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    problems = [f"`{row.sampler}`: {row.failure}" for row in rows if row.failure]
    problems += [f"`{row.sampler}` at {t} NFE: {msg}" for row in rows for (tab, t), msg in row.errors.items()
                 if tab == table]
    if problems:
        lines += ["", "Failures: " + "; ".join(problems) + "."]
    return lines


def plot(rows: Sequence[Row], table: str, panels: Sequence[tuple[str, str, bool]], title: str, path: Path,
         targets: Sequence[int], floor: tuple[str, dict[int, float]] | None = None) -> None:
    """One figure per table: each panel a value against the NFE actually spent, one line per sampler
    (dashed: stochastic); ``floor`` = (label, value per target) is drawn dotted grey on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels) + 2.2, 4.4), dpi=110, squeeze=False)
    colours, markers = plt.get_cmap("tab20"), "osv^DPX"
    for ax, (key, label, log_y) in zip(axes[0], panels):
        for i, row in enumerate(r for r in rows if r.cells.get(table)):
            cells = sorted(row.cells[table].values(), key=lambda c: c.nfe)
            colour = colours((i % 10) * 2 + (i // 10) % 2)  # the ten strong colours first, then their light ones
            ax.plot([c.nfe for c in cells], [c.values[key] for c in cells], marker=markers[i // 20 % len(markers)],
                    ms=3.5, lw=1.3, color=colour, ls="--" if row.stochastic else "-", label=row.sampler)
        if floor is not None:
            ts = sorted(floor[1])
            ax.plot(ts, [floor[1][t] for t in ts], ls=":", color="grey", lw=1.5, label=floor[0])
        ax.set_xscale("log")
        ax.set_xticks(list(targets), [str(t) for t in targets])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE) spent")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(title, fontsize=10)
    width = fig.get_figwidth()
    fig.subplots_adjust(left=0.95 / width, right=1 - 2.1 / width, bottom=0.13, top=0.9, wspace=0.25)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def report(args: argparse.Namespace, samplers: Sequence[str], a: dict | None, b: dict | None,
           timings: dict[str, tuple[float, float]], out: Path, img_dir: Path) -> str:
    rel = Path(os.path.relpath(img_dir, out.parent))
    total = sum(wall for wall, _ in timings.values())
    spent = ", ".join(f"part ({k}) {wall:.0f} s ({cpu:.0f} s of CPU)" for k, (wall, cpu) in timings.items())
    threads = torch.get_num_threads()
    which = (f"samplers {', '.join(samplers)}" if args.samplers
             else f"all {len(samplers)} samplers of `conf/sampler/`: {', '.join(samplers)}")
    lines = ["# Sampler leaderboard", "",
             f"Reproduce: `python experiments/sampler_leaderboard.py {shlex.join(args.argv)}` "
             f"({which}; {threads} CPU thread{'s' if threads > 1 else ''}; run time {total:.0f} s: {spent}; "
             f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores).", "",
             "Samplers and schedules are the config groups' files, built as `python run.py sampler=NAME "
             "discretization=NAME` builds them. Every sampler is compared at **equal network evaluations "
             "(NFE)**, not equal steps: its `denoise` calls are counted at each step count (column *NFE of n "
             "steps*), and a budget of N runs the step count whose NFE is the largest that is <= N. A cell "
             "shows the value and, in parentheses, the NFE actually spent where that is less than N; `—` means "
             "the sampler cannot spend N or fewer (its smallest run costs more). A sampler is *stochastic* when "
             "two generator seeds give different samples (measured, like its cost, on a small probe of the "
             "analytic target; for (b) with the run's guider, whose uc + c branches are one batched call).", ""]
    if a is not None:
        lines += analytic_section(a, args, rel, img_dir)
    if b is not None:
        lines += model_section(b, rel, img_dir)
    lines.append(f"_Generated with torch {torch.__version__}._")
    return "\n".join(lines) + "\n"


def analytic_section(a: dict, args: argparse.Namespace, rel: Path, img_dir: Path) -> list[str]:
    gm, setup = a["gm"], args.setup
    targets = list(setup.targets)
    means = ", ".join(f"({m[0]:.2f}, {m[1]:.2f})" for m in gm.means.tolist())
    lines = ["## (a) Analytic target: error at 5, 10, 20 and 50 NFE" if targets == list(PATH_TARGETS)
             else f"## (a) Analytic target: error at {', '.join(map(str, targets))} NFE", "",
             f"A 2-D Gaussian mixture with an exact denoiser (`sgm.diffusion.analytic`), float64: weights "
             f"{', '.join(f'{w:g}' for w in gm.weights.tolist())}, means {means}, component std {gm.std:g}; its "
             "mean is 0 and its covariance I, so the start (noise of variance 1 + sigma_max^2, sgm's convention) "
             "is right to second order. Samplers run unguided (the identity guider) over the schedule of the "
             "digit model's range (SDXL's 0.0292 .. 14.6146, `conf/denoiser/discrete_eps.yaml`).", "",
             f"* **Pathwise** (deterministic samplers only): RMS distance over {setup.paths} paths to the exact "
             "probability-flow ODE solution x(0) from the same start, solved with scipy's DOP853 at rtol "
             f"{RTOL:g} / atol {ATOL:g} (its distance to a 100x tighter solve is given per schedule).",
             "* **Law** (every sampler; the only fair target of the stochastic ones, ancestral and SDE, whose "
             "endpoint is not the ODE's): over "
             f"{setup.law_samples:,} samples, the largest error of any component's weight (relative), mean (in "
             "units of the component std) or variance (relative), each component's share taken by its posterior "
             f"responsibility at sigma 0, against the same statistics of {setup.reference_samples:,} exact samples. "
             f"Its sampling-noise floor (the median over 5 draws of {setup.law_samples:,} exact samples) is "
             f"**{a['law_floor']:.3f}**: differences below it are noise.",
             "* Rows are sorted by the mean log error over the budgets (a budget a sampler cannot reach counts "
             "as that column's worst).", ""]
    for spec, s in a["schedules"].items():
        jumps = ", ".join(f"{s['end_jump'][t]:.1e}" for t in targets)
        lines += [f"### Schedule `{spec}`", "", f"`{s['describe']}`, from sigma {s['start']:.4f}. The reference's "
                  f"distance to a 100x tighter solve: {s['reference_check']:.1e} RMS. The schedule's last jump alone (exact to its last nonzero sigma "
                  f"with {'/'.join(map(str, targets))} steps, then the exact denoiser) is {jumps} from x(0): the "
                  "floor of a sampler that ends with a plain denoise.", ""]
        path_rows = sort_rows([r for r in s["rows"] if not r.stochastic], "path", "rms", targets)
        name = f"leaderboard_{slug(spec)}_path.png"
        lines += [f"Pathwise RMS error to the exact ODE solution ({spec}):", ""]
        lines += markdown_table(path_rows, "path", targets, [("RMS", lambda c: f"{c.values['rms']:.2e}")])
        plot(path_rows, "path", [("rms", "RMS error to the exact ODE solution", True)],
             f"pathwise error, schedule {spec}", img_dir / name, targets,
             ("last jump alone", s["end_jump"]))
        lines += ["", f"![pathwise error, {spec}]({(rel / name).as_posix()})", ""]
        law_rows = sort_rows(s["rows"], "law", "law", targets)
        name = f"leaderboard_{slug(spec)}_law.png"
        lines += [f"Error of the sample law ({spec}; noise floor {a['law_floor']:.3f}):", ""]
        lines += markdown_table(law_rows, "law", targets, [("law error", lambda c: f"{c.values['law']:.3f}")],
                                kind=True)
        plot(law_rows, "law", [("law", "law error (largest component error)", True)],
             f"sample-law error, schedule {spec} (dashed: stochastic)", img_dir / name, targets,
             ("noise floor", {t: a["law_floor"] for t in targets}))
        lines += ["", f"![law error, {spec}]({(rel / name).as_posix()})", ""]
    return lines


def model_section(b: dict, rel: Path, img_dir: Path) -> list[str]:
    rows = b["rows"]
    targets = sorted({t for r in rows for t in r.cells.get("model", {})}) or list(MODEL_TARGETS)
    rows = sort_rows(rows, "model", "fd", targets)
    name = "leaderboard_shipped_model.png"
    lines = ["## (b) The shipped digit model", "",
             f"run.py's defaults (seed 42, `{b['guider']}`, `{b['schedule']}`) with each sampler at "
             f"{', '.join(map(str, targets))} NFE (an evaluation is one batched uc + c call), **{b['images']} images** "
             "per cell (the same seeds for every cell), judged as `python run.py` judges its PNGs: digit accuracy "
             "of the shipped classifier against the prompted digit, and the Fréchet distance in its feature space "
             "to the 500 held-out digits (biased upwards for few images: compare only rows of equal image count; "
             "docs/shipped_model_metrics.md has Euler at 30 steps and real digits at 500 images). Sorted by the "
             "mean log Fréchet distance.", ""]
    lines += markdown_table(rows, "model", targets, [("accuracy", lambda c: f"{c.values['accuracy']:.1%}"),
                                                     ("Fréchet", lambda c: f"{c.values['fd']:.1f}")])
    plot(rows, "model", [("fd", "Fréchet distance (held-out digits)", True), ("accuracy", "digit accuracy", False)],
         f"shipped digit model, {b['images']} images per point", img_dir / name, targets)
    lines += ["", f"![shipped model]({(rel / name).as_posix()})", ""]
    per_nfe = [c.values["ms_per_image"] / c.nfe for r in rows for c in r.cells.get("model", {}).values()]
    if per_nfe:
        cost = sum(per_nfe) / len(per_nfe)
        lines += [f"Sampling cost {cost:.1f} ms per image per NFE here (batches of up to 100), so part (b) takes "
                  f"about samplers x {b['images']} images x {sum(targets)} NFE x {cost:.1f} ms "
                  f"= {cost * b['images'] * sum(targets) / 1000:.0f} s per sampler.", ""]
    if b.get("real"):
        lines += [f"For scale, {b['images']} real MNIST training digits score accuracy {b['real']['accuracy']:.1%} "
                  f"and Fréchet distance {b['real']['frechet_distance']:.1f} (the floor of a perfect model at this "
                  "image count).", ""]
    return lines


# -- command line ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here (plots into --img-dir)")
    p.add_argument("--img-dir", type=Path, default=None, help="where the PNGs go (default: img/ beside --out)")
    p.add_argument("--samplers", nargs="+", default=None, help="sampler names (default: every conf/sampler file)")
    p.add_argument("--schedules", nargs="+", default=None,
                   help="schedules for (a): NAME or NAME:key=value... or 'all' "
                        f"(default: {' '.join(DEFAULT_SCHEDULES)})")
    p.add_argument("--part", choices=("a", "b", "all"), default="all")
    p.add_argument("--nfe", type=int, nargs="+", default=list(PATH_TARGETS), help="(a): the NFE budgets")
    p.add_argument("--model-nfe", type=int, nargs="+", default=list(MODEL_TARGETS), help="(b): the NFE budgets")
    p.add_argument("--images-per-digit", type=int, default=20, help="(b): images per prompt (10 prompts)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--paths", type=int, default=1000, help="(a): paths of the pathwise error")
    p.add_argument("--law-samples", type=int, default=20000, help="(a): samples of the law error")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: euler and heun, schedule edm, small budgets and sample counts (seconds)")
    args = p.parse_args(list(argv))
    args.argv = list(argv)
    if args.quick:
        args.samplers = args.samplers or list(QUICK_SAMPLERS)
        args.schedules = args.schedules or ["edm"]
        args.setup = AnalyticSetup(paths=64, law_samples=2000, reference_samples=20000, targets=(5, 10))
        args.model_targets, args.images_per_digit = (8,), 1
    else:
        args.setup = AnalyticSetup(paths=args.paths, law_samples=args.law_samples, targets=tuple(args.nfe))
        args.model_targets = tuple(args.model_nfe)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    samplers = args.samplers or options("sampler")
    unknown = sorted(set(samplers) - set(options("sampler")))
    if unknown:
        raise SystemExit(f"unknown sampler(s) {', '.join(unknown)}: choose from {', '.join(options('sampler'))}")
    specs = args.schedules or list(DEFAULT_SCHEDULES)
    if specs == ["all"]:
        specs = options("discretization")
    schedules = [Schedule.build(spec) for spec in specs]
    out = args.out or Path("sampler_leaderboard.md")
    img_dir = args.img_dir or out.parent / "img"
    timings: dict[str, tuple[float, float]] = {}  # part -> (wall, CPU) seconds
    a = b = None
    if args.part in ("a", "all"):
        t0, c0 = time.perf_counter(), time.process_time()
        a = analytic_part(samplers, schedules, args.setup)
        timings["a"] = (time.perf_counter() - t0, time.process_time() - c0)
    if args.part in ("b", "all"):
        t0, c0 = time.perf_counter(), time.process_time()
        b = model_part(samplers, args.model_targets, args.images_per_digit, args.batch_size)
        timings["b"] = (time.perf_counter() - t0, time.process_time() - c0)
    text = report(args, samplers, a, b, timings, out, img_dir)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log.info("wrote %s and its plots in %s", args.out, img_dir)
    else:
        sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
