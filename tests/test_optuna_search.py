"""Metric-driven search (sgm.tasks.search, conf/hparams_search): the objective run.py returns,
its constraints, the NFE budget checked before sampling, and an Optuna search end to end.

The planned NFE is checked against the samplers' published counts (Euler n, Heun and DPM-2
2n - 1, Heun++ 3n - 3, Restart's own plan) and against the count a real run records.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hydra.utils import instantiate

from conftest import run_script
from sgm.diffusion.schedule import sampling_sigmas
from sgm.tasks import common, sample
from sgm.tasks.search import objective, planned_nfe, search_spec

QUIET = ["~logger", "progress=false", "cpu_threads=1"]
TWO = "prompts=['a handwritten digit one','a handwritten digit seven']"


def sampler_and_sigmas(compose, *overrides: str):
    cfg = compose("sample", list(overrides))
    return instantiate(cfg.sampler), sampling_sigmas(instantiate(cfg.discretization), cfg.steps,
                                                     instantiate(cfg.model.denoiser))


@pytest.mark.parametrize("name, steps, expected", [
    ("euler", 7, 7), ("heun", 7, 13), ("dpm_2", 6, 11), ("heunpp2", 5, 12), ("dpmpp_2m", 9, 9), ("euler_a", 5, 5),
    ("dpmpp_2s_a", 5, 9), ("uni_pc", 6, 6)])
def test_planned_nfe_is_the_samplers_published_count(compose, name, steps, expected):
    sampler, sigmas = sampler_and_sigmas(compose, f"sampler={name}", f"steps={steps}")
    assert planned_nfe(sampler, sigmas) == expected


def test_planned_nfe_of_restart_is_its_own_plan(compose):
    sampler, sigmas = sampler_and_sigmas(compose, "sampler=restart", "steps=24")
    assert planned_nfe(sampler, sigmas) == sampler.nfe(sigmas.tolist()) > 2 * 24 - 1


def test_planned_nfe_skips_what_depends_on_the_network(compose):
    sampler, sigmas = sampler_and_sigmas(compose, "sampler=dpm_adaptive", "steps=8")
    assert planned_nfe(sampler, sigmas) is None  # adaptive steps: the count differs between the stand-ins


@pytest.mark.slow
def test_planned_nfe_is_what_a_real_run_records(compose, run_task, tmp_path):
    metrics, cfg = run_task("sample", ["sampler=heun", "steps=4", *QUIET, TWO], tmp_path / "run")
    sampler, sigmas = sampler_and_sigmas(compose, "sampler=heun", "steps=4")
    assert planned_nfe(sampler, sigmas) == metrics["network_evaluations_per_batch"] == 7


@pytest.mark.parametrize("overrides, message", [
    (["optimized_metric=fid"], "optimized_metric='fid' is not a metric this run writes: choose one of images, "),
    (["optimized_metric=frechet_distance", "~metrics"], "(the image metrics are off: metrics=digits turns them on)"),
    (["+constraints.acc.min=0.9"], "constraints key='acc' is not a metric this run writes"),
    (["+constraints.accuracy.mn=0.9"], "constraints.accuracy must be {min: x}, {max: y} or both"),
    (["+constraints.accuracy.min=0.9", "+constraints.accuracy.max=0.5"], "constraints.accuracy: min 0.9 is above max"),
    (["+constraints.nfe.max=inf"], "constraints.nfe.max must be a finite number or null"),
])
def test_bad_search_settings_are_named_before_any_weight(hydra_runtime, monkeypatch, overrides, message):
    cfg = hydra_runtime("sample", [*QUIET, *overrides])

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the search settings were checked")

    monkeypatch.setattr(common, "build_engine", refuse)
    with pytest.raises(ValueError) as err:
        sample.run(cfg)
    assert message in str(err.value)


def test_sweeper_direction_must_match_the_metric(hydra_runtime):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = hydra_runtime("sample", ["hparams_search=digits_nfe16", "hydra.sweeper.direction=maximize"])
    with pytest.raises(ValueError, match="hydra.sweeper.direction=maximize but frechet_distance is better lower: "
                                         "set hydra.sweeper.direction=minimize"):
        search_spec(cfg, check_names=False)


def test_over_budget_run_is_refused_before_any_weight(hydra_runtime, monkeypatch, tmp_path):
    cfg = hydra_runtime("sample", ["sampler=heun", "steps=10", "optimized_metric=frechet_distance",
                                   "+constraints.nfe.max=16", *QUIET])
    monkeypatch.setattr(common, "build_engine", lambda *a, **k: pytest.fail("weights read for a refused run"))
    metrics = sample.run(cfg)
    assert metrics["refused"] == "nfe 19 > 16 (predicted before sampling)"
    assert metrics["network_evaluations_per_batch"] == 19 and metrics["images"] == 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert objective(cfg, metrics, tmp_path) == math.inf
    verdict = json.loads((tmp_path / "search.json").read_text())
    assert verdict["feasible"] is False and verdict["violations"] == [metrics["refused"]]
    assert not list(tmp_path.glob("*.png"))


def test_objective_is_the_metric_or_the_penalty(run_task, tmp_path):
    feasible = ["optimized_metric=frechet_distance", "+constraints.nfe.max=16", "+constraints.accuracy.min=0"]
    metrics, cfg = run_task("sample", ["steps=4", *QUIET, TWO, *feasible], tmp_path / "ok")
    assert objective(cfg, metrics, tmp_path / "ok") == metrics["frechet_distance"] > 0
    verdict = json.loads((tmp_path / "ok" / "search.json").read_text())
    assert verdict == {"optimized_metric": "frechet_distance", "value": metrics["frechet_distance"],
                       "objective": metrics["frechet_distance"], "direction": "lower",
                       "constraints": ["nfe <= 16", "0 <= accuracy"], "violations": [], "feasible": True}
    # the same run under an accuracy floor it misses is told the penalty (written once: no overwrite)
    cfg.constraints.accuracy.min = metrics["accuracy"] + 0.01
    with pytest.raises(FileExistsError):
        objective(cfg, metrics, tmp_path / "ok")
    assert objective(cfg, metrics, tmp_path / "floor") == math.inf
    assert json.loads((tmp_path / "floor" / "search.json").read_text())["violations"][0].startswith("accuracy ")
    # a metric the run did not write is named with those it did
    cfg.optimized_metric = "nonexistent"
    with pytest.raises(ValueError, match=r"optimized_metric='nonexistent' is not among this run's metrics \(images, "):
        objective(cfg, metrics, tmp_path / "missing")
    # without optimized_metric, run.py returns the metrics unchanged
    cfg.optimized_metric, cfg.constraints = None, {}
    assert objective(cfg, metrics) is metrics


def test_cli_names_the_optuna_plugin_when_missing(monkeypatch):
    from sgm.tasks import cli

    monkeypatch.setattr(cli, "_installed", lambda module: False)
    problems = cli.launcher_problems(["hparams_search=digits_nfe16", "hydra/sweeper=optuna", "sampler=heun"])
    assert problems == [
        f"{key} needs the hydra-optuna-sweeper package (hydra_plugins.hydra_optuna_sweeper, optuna is not installed): "
        'pip install -e ".[sweeps]" installs it' for key in ("hparams_search=digits_nfe16", "hydra/sweeper=optuna")]


@pytest.mark.slow
def test_optuna_search_runs_trials_on_the_shipped_model(tmp_path):
    """``python run.py -m hparams_search=digits_nfe16`` with 3 trials of 10 digits: each trial is a
    job with its verdict, the sweeper's best is the best feasible objective, and the sweep is summarized."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "search"
    # the script's own __main__ in this process (conftest.run_script): Hydra's Optuna sweeper and launcher
    code = run_script("run.py", ["-m", "hparams_search=digits_nfe16", "hydra.sweeper.n_trials=3",
                                 "hydra.sweeper.sampler.n_startup_trials=3", "num_images_per_prompt=1", "~logger",
                                 f"hydra.sweep.dir={sweep}"])
    assert code == 0
    verdicts = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/search.json"))]
    assert len(verdicts) == 3
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    feasible = [v["objective"] for v in verdicts if v["feasible"]]
    assert result["best_value"] == pytest.approx(min(feasible) if feasible else math.inf)
    for folder in sorted(p.parent for p in sweep.glob("*/search.json")):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert ("refused" in metrics) or metrics["images"] == 10
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
        assert {o.split("=")[0] for o in overrides} >= {"sampler", "discretization", "steps", "guider.scale",
                                                        "guider.sigma_lo", "guider.sigma_hi"}
    assert "## Best setting per metric" in (sweep / "summary.md").read_text()
    assert (sweep / "xy_grid.png").is_file()
