"""Metric-driven search over sampling settings: what run.py returns to a Hydra sweeper.

``optimized_metric`` (conf/sample.yaml, as in lightning-hydra-template) names the metric of
``metrics.json`` that run.py's task function returns, so a sweeper such as Optuna
(``python run.py -m hparams_search=digits_nfe16``, conf/hparams_search/) can minimise it.
``constraints`` bound other metrics, e.g. ``{nfe: {max: 16}, accuracy: {min: 0.98}}``; a run
outside a bound returns a penalty (``inf`` when the sweeper minimises, ``-inf`` when it
maximises), so the sweeper learns the region is bad while the best trial stays a feasible one.

The NFE budget is checked twice: before sampling, a dry run of the configured sampler and
guider with a counting stand-in denoiser on a one-pixel latent predicts the network evaluations
per image (:func:`planned_nfe`); a run over budget is refused there, costing nothing, and its
folder gets a ``metrics.json`` that says so. Where the count depends on the network's values
(adaptive step sizes) or the guider needs a real network, the prediction is skipped and the
measured count decides after sampling. Each judged run writes ``search.json`` (the value, the
objective returned, each violated bound), which the sweep summary reads.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .metric_info import HIGHER, LOWER, NFE, NFE_SOURCE, RUN_METRICS, direction, metrics_json_name

if TYPE_CHECKING:  # torch is imported where it is used: the sweep summary (a Hydra callback of every run) reads this module
    import torch

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
REFUSED = "refused"  # the metrics.json key of a run refused before sampling
SWEEPER_DIRECTIONS = {"minimize": LOWER, "maximize": HIGHER}


@dataclass(frozen=True)
class Bound:
    """``metric`` (a metrics.json key, or ``nfe``) must lie in [min, max] (either may be None)."""

    metric: str
    min: float | None = None
    max: float | None = None

    def violation(self, value: Any) -> str | None:
        """Why ``value`` breaks the bound (None when it keeps it); a missing value breaks it."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return f"{self.metric} is missing"
        if self.min is not None and value < self.min:
            return f"{self.metric} {value:.4g} < {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{self.metric} {value:.4g} > {self.max:g}"
        return None

    def describe(self) -> str:
        parts = ([f"{self.min:g} <="] if self.min is not None else []) + [self.metric]
        return " ".join(parts + ([f"<= {self.max:g}"] if self.max is not None else []))


@dataclass
class SearchSpec:
    """The run's ``optimized_metric`` (None: none), its better ``direction`` and its ``bounds``."""

    metric: str | None
    direction: str = LOWER
    bounds: list[Bound] = field(default_factory=list)

    @property
    def penalty(self) -> float:
        """What a run outside the bounds returns: the worst value for the sweeper's direction."""
        return math.inf if self.direction == LOWER else -math.inf

    def bound(self, metric: str) -> Bound | None:
        return next((b for b in self.bounds if b.metric == metric), None)

    def violations(self, metrics: dict[str, Any]) -> list[str]:
        return [v for b in self.bounds if (v := b.violation(metrics.get(metrics_json_name(b.metric)))) is not None]


def _sweeper_direction() -> tuple[str, str] | None:
    """(``hydra.sweeper.direction`` as given, lower/higher) when this job runs under a sweeper that has one."""
    if not HydraConfig.initialized():
        return None
    given = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    if given is None:
        return None
    given = getattr(given, "name", given)  # the optuna plugin's Direction enum, or its name
    if not isinstance(given, str):
        raise ValueError(f"hydra.sweeper.direction={given!r}: run.py returns one metric (optimized_metric), so the "
                         "search has one direction, minimize or maximize")
    if given not in SWEEPER_DIRECTIONS:
        raise ValueError(f"hydra.sweeper.direction={given!r} is not minimize or maximize")
    return given, SWEEPER_DIRECTIONS[given]


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number or null, got {value!r}")
    return float(value)


def search_spec(cfg: DictConfig, image_metrics: Any = None, check_names: bool = True) -> SearchSpec | None:
    """``optimized_metric`` and ``constraints`` checked before any weight is read (None: neither is set).

    A name must be one the run will write: :data:`~sgm.tasks.metric_info.RUN_METRICS`, ``nfe``,
    or one of ``image_metrics.metric_names`` (an image-metrics object that does not state its
    names is trusted, and the name checked after sampling). Each bound is ``{min: x}``,
    ``{max: y}`` or both, finite, min <= max. Under a sweeper, ``hydra.sweeper.direction`` must
    agree with the known direction of the optimised metric (a Fréchet distance is minimised).
    ``check_names=False``: after the run, whose metrics are known (see :func:`objective`)."""
    metric = cfg.get("optimized_metric")
    constraints = cfg.get("constraints") or {}
    if metric is None and not constraints:
        return None
    stated = getattr(image_metrics, "metric_names", None) if image_metrics is not None else ()
    known = None if stated is None or not check_names else (*RUN_METRICS, NFE, *stated)

    def check_name(name: Any, what: str) -> str:
        if not isinstance(name, str) or (known is not None and name not in known):
            hint = "" if image_metrics is not None else " (the image metrics are off: metrics=digits turns them on)"
            raise ValueError(f"{what}={name!r} is not a metric this run writes: choose one of "
                             f"{', '.join(k for k in dict.fromkeys(known or ())) if known else '...'}{hint}")
        return name

    if metric is not None:
        metric = check_name(metric, "optimized_metric")
    bounds = []
    if not isinstance(constraints, (dict, DictConfig)):
        raise ValueError(f"constraints must be a mapping metric -> {{min: x, max: y}}, got {constraints!r}")
    for name, node in constraints.items():
        check_name(name, "constraints key")
        if node is None:
            continue
        node = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
        if not isinstance(node, dict) or not node or set(node) - {"min", "max"}:
            raise ValueError(f"constraints.{name} must be {{min: x}}, {{max: y}} or both, got {node!r}")
        bound = Bound(name, _number(node.get("min"), f"constraints.{name}.min"),
                      _number(node.get("max"), f"constraints.{name}.max"))
        if bound.min is not None and bound.max is not None and bound.min > bound.max:
            raise ValueError(f"constraints.{name}: min {bound.min:g} is above max {bound.max:g}")
        bounds.append(bound)
    known_dir = direction(metric) if metric is not None else None
    swept = _sweeper_direction()
    if swept is not None and known_dir is not None and swept[1] != known_dir:
        better = "minimize" if known_dir == LOWER else "maximize"
        raise ValueError(f"hydra.sweeper.direction={swept[0]} but {metric} is better {known_dir}: set "
                         f"hydra.sweeper.direction={better}")
    return SearchSpec(metric, swept[1] if swept else (known_dir or LOWER), bounds)


# -- the NFE budget, before sampling -------------------------------------------------------------
def _count_calls(sampler: Any, sigmas: torch.Tensor, x0: Any) -> int:
    calls = 0

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return x0(x, sigma.reshape(-1, *[1] * (x.ndim - 1)))

    import torch

    from ..diffusion.noise import seeded_generators

    x = torch.zeros(1, 1, 1, 1) + float(sigmas[0])
    dry = copy.deepcopy(sampler)
    if hasattr(dry, "verbose"):
        dry.verbose = False  # no progress bar for a dry run
    dry.sample(denoise, x, sigmas, {}, {}, generator=seeded_generators([0], 1))
    return calls


def planned_nfe(sampler: Any, sigmas: torch.Tensor) -> int | None:
    """Network evaluations per image that ``sampler`` (with its guider) spends on ``sigmas``,
    counted on a one-pixel latent with two stand-in denoisers (the x0 of unit-variance Gaussian
    data, a linear flow, and a nonlinear one); None when the two counts differ (the count depends
    on the network: adaptive step sizes) or the dry run fails (a guider that needs the real
    network, such as SAG or autoguidance)."""
    import torch

    try:
        counts = {_count_calls(sampler, sigmas, lambda x, s: x / (1 + s**2)),
                  _count_calls(sampler, sigmas, lambda x, s: torch.tanh(4 * x) * torch.cos(3 * s))}
    except Exception as exc:  # noqa: BLE001 - a prediction only: the measured count decides then
        log.info("the NFE of %s is not predicted before sampling (%s): it is checked after", type(sampler).__name__,
                 exc)
        return None
    return counts.pop() if len(counts) == 1 else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists already; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def refuse_over_budget(spec: SearchSpec | None, sampler: Any, sigmas: torch.Tensor, out_dir: Path,
                       settings: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a run refused before sampling (written to ``out_dir/metrics.json``), or None
    when it may run: no ``nfe`` bound, a count not known in advance, or one within the bound."""
    bound = spec.bound(NFE) if spec is not None else None
    if bound is None:
        return None
    nfe = planned_nfe(sampler, sigmas)
    reason = bound.violation(nfe) if nfe is not None else None
    if reason is None:
        return None
    log.warning("refused before sampling: %s would spend %d network evaluations per image (%s)",
                type(sampler).__name__, nfe, reason)
    metrics = {REFUSED: f"{reason} (predicted before sampling)", "images": 0, NFE_SOURCE: float(nfe), **settings}
    _write_json(out_dir / "metrics.json", metrics)
    return metrics


# -- the value returned to the sweeper -----------------------------------------------------------
def objective(cfg: DictConfig, metrics: dict[str, Any], out_dir: Path | None = None) -> Any:
    """What run.py's task function returns: ``metrics`` itself without ``optimized_metric``;
    else that metric as a float, or the penalty when a bound is broken (or the run was refused).
    With either set, ``out_dir/search.json`` records the value, the objective and the violations."""
    spec = search_spec(cfg, check_names=False)
    if spec is None or not metrics:  # not set, or a rank of a DDP run that does not judge the images
        return metrics
    if spec.metric is not None and spec.metric not in metrics and REFUSED not in metrics:
        numbers = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        raise ValueError(f"optimized_metric={spec.metric!r} is not among this run's metrics ({', '.join(numbers)}): "
                         "choose one of them (a Fréchet distance needs metrics.min_images images or more)")
    violations = [metrics[REFUSED]] if REFUSED in metrics else spec.violations(metrics)
    value = metrics.get(spec.metric) if spec.metric is not None else None
    result = spec.penalty if violations else (float(value) if value is not None else None)
    if violations:
        log.info("constraints broken (%s): the search is told %s", "; ".join(violations), result)
    record = {"optimized_metric": spec.metric, "value": value, "objective": result, "direction": spec.direction,
              "constraints": [b.describe() for b in spec.bounds], "violations": violations,
              "feasible": not violations}
    _write_json((Path(out_dir) if out_dir is not None else _job_dir()) / SEARCH_FILE, record)
    return result if spec.metric is not None else metrics


def _job_dir() -> Path:
    from .common import run_dir

    return run_dir()



def refuse_sample_run(cfg: DictConfig, plan: Any, settings: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`refuse_over_budget` for run.py's validated ``plan`` (:class:`sgm.tasks.sample.SamplePlan`):
    its schedule from the model's denoiser config (no weights), the img2img slice when there is
    an init image; a run with a refiner (two samplers) is checked after sampling only."""
    spec = plan.search
    if spec is None or spec.bound(NFE) is None or cfg.get("refiner") is not None:
        return None
    from hydra.utils import instantiate

    from ..diffusion.schedule import img2img_start, sampling_sigmas

    denoiser = instantiate(cfg.model.denoiser) if cfg.model.get("denoiser") is not None else None
    sigmas = sampling_sigmas(plan.discretization, plan.steps, denoiser)
    start = img2img_start(plan.steps, plan.strength, plan.img2img_schedule) if plan.init_image is not None else 0
    return refuse_over_budget(spec, plan.sampler, sigmas[start:], plan.out_dir, settings)
