"""The sampler leaderboard (experiments/sampler_leaderboard.py) and NFE in sweep summaries.

The leaderboard's pieces are checked against closed forms and counted calls: the exact
probability-flow solution against the one-Gaussian closed form, the NFE search against
samplers of known cost (Euler n, Heun 2n-1, and test-local samplers spending 3 per step or
a fixed number), the law error against exact and wrong samples; then its ``--quick`` run
end to end. The sweep summary is checked on written job folders and on two in-process runs.
"""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from sgm.diffusion.analytic import GaussianMixture
from sgm.diffusion.samplers import BaseDiffusionSampler
from sgm.tasks import sweep_summary
from sgm.tasks.sweep_summary import SweepSummary

from conftest import preserved_globals

ROOT = Path(__file__).resolve().parents[1]


def _load_board():
    path = ROOT / "experiments" / "sampler_leaderboard.py"
    spec = importlib.util.spec_from_file_location("_experiment_sampler_leaderboard", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


board = _load_board()


@pytest.fixture(scope="module")
def edm():
    return board.Schedule.build("edm")


@pytest.fixture(scope="module")
def probe():
    return board.make_probe(board.analytic_target())


# --- the exact reference --------------------------------------------------------------------------
def test_exact_flow_is_the_closed_form_for_one_gaussian():
    """One component N(mu, s^2 I): dx/dsigma = sigma (x - mu) / (s^2 + sigma^2), so
    x(sigma) - mu = (x(sigma0) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2))."""
    mu, s, sigma0 = torch.tensor([[0.7, -1.2]], dtype=torch.float64), 0.4, 14.6146
    gm = GaussianMixture(mu, std=s)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma0
    for end in (0.0, 0.5):
        want = mu + (x - mu) * math.sqrt((s**2 + end**2) / (s**2 + sigma0**2))
        torch.testing.assert_close(board.exact_flow(gm, x, sigma0, end), want, rtol=0, atol=1e-8)


def test_analytic_target_has_mean_zero_and_unit_covariance():
    gm = board.analytic_target()
    torch.testing.assert_close(gm.mean(), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    centred = gm.means - gm.mean()
    cov = centred.T @ torch.diag(gm.weights) @ centred + gm.std**2 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(cov, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)


# --- NFE, measured ---------------------------------------------------------------------------------
class ThreePerStep(BaseDiffusionSampler):
    """Test-only: Euler with two wasted extra evaluations per step (a sampler of 3 NFE per step)."""

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        for i in self.steps(len(sigmas) - 1):
            for _ in range(2):
                self.guided_denoise(denoise, x, sigmas[i], cond, uc)
            d = (x - self.guided_denoise(denoise, x, sigmas[i], cond, uc)) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x


class FixedSeven(BaseDiffusionSampler):
    """Test-only: ignores the steps, spends 7 evaluations on a fixed grid (as an adaptive sampler would)."""

    def _loop(self, denoise, x, sigmas, cond, uc, generator, callback):
        grid = torch.linspace(sigmas[0], sigmas[-2], 7).tolist() + [0.0]
        for s, s_next in zip(grid[:-1], grid[1:]):
            x = x + (x - self.guided_denoise(denoise, x, s, cond, uc)) / s * (s_next - s)
        return x


def _cost(sampler, schedule, probe, max_target):
    return board.measure_cost(lambda n: probe.run(sampler, schedule.sigmas(n))[1], max_target)


def test_nfe_search_counts_calls_and_picks_the_largest_fitting_budget(edm, probe):
    euler = _cost(board.build_sampler("euler", guided=False), edm, probe, 10)
    assert euler.describe() == "n" and euler.steps_for(5) == 5 and euler.nfe[5] == 5
    heun = _cost(board.build_sampler("heun", guided=False), edm, probe, 10)
    assert heun.describe() == "2n-1"  # no evaluation on the step to sigma 0
    assert heun.steps_for(10) == 5 and heun.nfe[5] == 9 and heun.steps_for(5) == 3
    three = _cost(ThreePerStep(), edm, probe, 10)
    assert three.describe() == "3n" and three.steps_for(5) == 1 and three.steps_for(2) is None
    fixed = _cost(FixedSeven(), edm, probe, 10)
    assert fixed.ignores_steps() and fixed.describe() == "7 whatever the steps"
    assert fixed.steps_for(6) is None and fixed.nfe[fixed.steps_for(7)] == 7


def test_cfg_is_one_evaluation_per_guided_call(edm):
    """The model part's probe is conditional: CFG's uc + c branches are one batched call, as on the engine."""
    cond_probe = board.make_probe(board.analytic_target(), conditional=True)
    heun = _cost(board.build_sampler("heun"), edm, cond_probe, 6)
    assert heun.describe() == "2n-1"


def test_stochastic_samplers_are_told_apart(edm, probe):
    sig = edm.sigmas(4)
    for name, want in (("euler", False), ("lms", False), ("euler_a", True), ("dpmpp_2m_sde", True)):
        sampler = board.build_sampler(name, guided=False)
        assert board.is_stochastic(lambda seed: probe.run(sampler, sig, seed=seed)[0]) is want, name


def test_law_error_is_small_for_exact_samples_and_large_for_a_wrong_law():
    gm = board.analytic_target()
    g = torch.Generator().manual_seed(0)
    reference = board.component_stats(gm, gm.sample(200_000, generator=g))
    assert board.law_error(gm, gm.sample(20_000, generator=g), reference) < 0.05
    exact = gm.sample(20_000, generator=g)
    nearest = torch.cdist(exact, gm.means).argmin(1)
    wide = gm.means[nearest] + 1.25 * (exact - gm.means[nearest])  # every component 25% wider
    assert board.law_error(gm, wide, reference) > 0.3
    tilted = GaussianMixture(gm.means, gm.std, weights=torch.tensor([0.4, 0.35, 0.25]))  # weights off by 20%
    assert board.law_error(gm, tilted.sample(20_000, generator=g), reference) > 0.15


# --- the script, end to end ------------------------------------------------------------------------
def _table(text: str, caption: str) -> dict[str, list[str]]:
    """The first markdown table after the line starting with ``caption``: sampler -> its cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(caption))
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    rows = {}
    for line in lines[header + 2 :]:  # after the header and its rule
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def _quick(tmp_path: Path, *extra: str) -> tuple[str, Path]:
    out = tmp_path / "docs" / "board.md"
    with preserved_globals():
        board.main(["--quick", "--out", str(out), "--threads", "1", *extra])
    return out.read_text(), out.parent / "img"


def test_quick_leaderboard_analytic_part(tmp_path):
    text, img = _quick(tmp_path, "--part", "a")
    assert "python experiments/sampler_leaderboard.py --quick --out" in text and "run time" in text
    path = _table(text, "Pathwise RMS error to the exact ODE solution (edm)")
    assert path["euler"][0] == "n" and path["heun"][0] == "2n-1"
    euler5, euler10 = (float(c) for c in path["euler"][1:3])
    assert 1.4 < euler5 / euler10 < 2.8  # first order: the error halves with twice the NFE
    assert path["heun"][2].endswith("(9)")  # 10 NFE: 5 Heun steps spend 9
    law = _table(text, "Error of the sample law (edm")
    assert {law["euler"][1], law["heun"][1]} == {"ODE"} and all(0 < float(law[k][2]) < 10 for k in law)
    assert "## (b)" not in text
    for name in ("leaderboard_edm_path.png", "leaderboard_edm_law.png"):
        assert (img / name).stat().st_size > 1000 and f"](img/{name})" in text


@pytest.mark.slow  # builds the shipped engine and samples 10 digits per cell
def test_quick_leaderboard_both_parts(tmp_path):
    text, img = _quick(tmp_path)
    assert _table(text, "Pathwise RMS error to the exact ODE solution (edm)")["heun"][0] == "2n-1"
    model = _table(text, "## (b)")  # accuracy and Fréchet distance at 8 NFE
    assert set(model) == {"euler", "heun"} and model["heun"][0] == "2n-1"
    assert 0 <= float(model["euler"][1].rstrip("%")) <= 100 and float(model["euler"][2]) > 0
    assert model["heun"][1].endswith("% (7)")  # 4 Heun steps spend 7 (batched uc + c calls)
    assert "**10 images**" in text
    assert (img / "leaderboard_shipped_model.png").stat().st_size > 1000


# --- sweep summaries report NFE beside every metric -------------------------------------------------
def _job(sweep: Path, num: int, overrides: list[str], metrics: dict) -> None:
    (sweep / str(num) / ".hydra").mkdir(parents=True)
    (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (sweep / str(num) / "metrics.json").write_text(json.dumps(metrics))


def _capture_plots(monkeypatch) -> dict[str, dict]:
    """What each summary plot shows: x tick labels and point annotations, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    seen: dict[str, dict] = {}
    save = Figure.savefig

    def record(fig, fname, *args, **kwargs):
        ax = fig.axes[0]
        seen[Path(fname).name] = {"ticks": [t.get_text() for t in ax.get_xticklabels()],
                                  "notes": [t.get_text() for t in ax.texts], "xlabel": ax.get_xlabel()}
        return save(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return seen


def test_sweep_summary_puts_nfe_beside_the_metrics(tmp_path, monkeypatch):
    plots = _capture_plots(monkeypatch)
    sweep = tmp_path / "sweep"
    common = {"images": 10, "seconds": 1.0, "network_evaluations": 30, "steps": 30, "sampler": "x"}
    _job(sweep, 0, ["sampler=euler", "steps=30"], {**common, "network_evaluations_per_batch": 30.0,
                                                   "accuracy": 0.9, "frechet_distance": 40.0})
    _job(sweep, 1, ["sampler=heun", "steps=30"], {**common, "network_evaluations_per_batch": 59.0,
                                                  "accuracy": 1.0, "frechet_distance": 30.0})
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    with open(sweep / "summary.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[:3] == ["job", "sampler", "nfe"]
    assert "network_evaluations_per_batch" not in reader.fieldnames  # the same number, named once
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("euler", "30.0"), ("heun", "59.0")]
    header = next(l for l in (sweep / "summary.md").read_text().splitlines() if l.startswith("| job"))
    assert header.startswith("| job | sampler | nfe | ")  # images (constant: 10) is listed once above the table
    assert plots["summary_accuracy.png"]["ticks"] == ["euler\nNFE 30", "heun\nNFE 59"]
    assert "NFE" in plots["summary_frechet_distance.png"]["xlabel"]
    assert plots["summary_nfe.png"]["ticks"] == ["euler", "heun"]  # the NFE plot itself needs no label


def test_numeric_sweep_writes_nfe_beside_each_point(tmp_path, monkeypatch):
    plots = _capture_plots(monkeypatch)
    sweep = tmp_path / "sweep"
    for k, steps in enumerate((4, 2)):
        _job(sweep, k, ["sampler=heun", f"steps={steps}"], {"images": 2, "seconds_per_image": 0.1 * steps,
                                                             "network_evaluations_per_batch": 2.0 * steps - 1})
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert plots["summary_seconds_per_image.png"]["notes"] == ["NFE 3", "NFE 7"]  # sorted by steps
    assert sweep_summary.nfe_label({"nfe": 7.0}) == "NFE 7" and sweep_summary.nfe_label({}) == ""


@pytest.mark.slow
def test_in_process_sampler_sweep_is_summarized_at_its_cost(run_task, tmp_path):
    """``python run.py -m sampler=euler,heun steps=3``, its two jobs run in-process, then the callback."""
    sweep = tmp_path / "sweep"
    prompts = "prompts=['a handwritten digit one','a handwritten digit seven']"
    for k, name in enumerate(("euler", "heun")):
        run_task("sample", [f"sampler={name}", "steps=3", "progress=false", "~logger", prompts], sweep / str(k))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    with open(sweep / "summary.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[:3] == ["job", "sampler", "nfe"]
    assert [(r["sampler"], float(r["nfe"])) for r in rows] == [("euler", 3.0), ("heun", 5.0)]
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["frechet_distance"]) > 0 for r in rows)
    assert (sweep / "summary_nfe.png").is_file()  # a flat metric gets no plot
    assert (sweep / "summary_accuracy.png").is_file() == (len({r["accuracy"] for r in rows}) > 1)
