"""The Optuna search of docs/optuna_search.md: run it, check its winner on other seeds, write the page.

    nice -n 10 python experiments/optuna_search.py --out docs/optuna_search.md [--sweep DIR] [--trials 30]
        [--check-per-prompt 20] [--no-search]

1. ``python run.py -m hparams_search=digits_nfe16`` (conf/hparams_search/digits_nfe16.yaml): the
   lowest Fréchet distance at <= 16 NFE with >= 98% accuracy, 100 digits per trial, seed 42
   (skipped when ``--sweep`` names a finished search folder);
2. the default run (Euler, EDM schedule, 30 steps, CFG 5) on the same 100 digits;
3. the winner and the default again on other digits (seed 1000, ``--check-per-prompt`` per
   prompt): a search that ranks trials on one set of seeds can pick a setting that suits those
   seeds; the check is on images the search never saw.

The winner is the feasible trial with the lowest objective in the trials' ``search.json`` (the
sweeper's ``best_value`` when it finished: checked equal). ``--no-search`` writes the page from
the trials a search folder holds, e.g. one stopped early: TPE with a fixed seed asks the same
first N trials whatever ``n_trials`` is, so its first N trials are those of ``n_trials=N``.

Every number on the page is read from the runs' ``metrics.json`` / ``search.json`` /
``optimization_results.yaml``; the page says which command produced each.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sgm.tasks.search import SEARCH_FILE  # noqa: E402
from sgm.tasks.sweep_summary import SweepSummary, collect  # noqa: E402

log = logging.getLogger("optuna_search")
QUIET = ["~logger", "progress=false", "cpu_threads=1"]
SEARCH = ["-m", "hparams_search=digits_nfe16"]
KEYS = ("sampler", "discretization", "steps", "guider.scale", "guider.sigma_lo", "guider.sigma_hi")


def run_py(*args: str) -> None:
    cmd = [sys.executable, "run.py", *args]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)


def sample_to(folder: Path, *overrides: str) -> dict[str, Any]:
    """One run.py run into ``folder`` (reused when it holds metrics.json): its metrics."""
    if not (folder / "metrics.json").is_file():
        run_py(*overrides, *QUIET, f"hydra.run.dir={folder}")
    return json.loads((folder / "metrics.json").read_text())


def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "" if v is None else str(v)


def winner_overrides(best: dict[str, Any]) -> list[str]:
    return ["guider=cfg_interval", *(f"{k}={best[k]}" for k in KEYS)]


def trial_table(sweep: Path) -> tuple[list[str], list[dict[str, Any]]]:
    swept, rows = collect(sweep)
    lines = ["| trial | sampler | schedule | steps | CFG | sigma_lo | sigma_hi | NFE | accuracy | Fréchet | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "refused before sampling: " + r["refused"].split(" (")[0] if "refused" in r else (
            "feasible" if r.get("feasible") else r.get("violations", ""))
        lines.append("| " + " | ".join([r["job"], str(r.get("sampler")), str(r.get("discretization")),
                                        str(r.get("steps")), fmt(r.get("guider.scale"), 3),
                                        fmt(r.get("guider.sigma_lo"), 3), fmt(r.get("guider.sigma_hi"), 3),
                                        fmt(r.get("nfe")), fmt(r.get("accuracy")), fmt(r.get("frechet_distance")),
                                        verdict]) + " |")
    return lines, rows


def floor_note(metrics: dict[str, Any], n: int, searched: dict[str, Any], floor: float = 0.98) -> list[str]:
    """What the page says when the winner misses the accuracy floor on the images the search never saw."""
    from sgm.tasks.sweep_stats import wilson_interval

    if metrics["accuracy"] >= floor:
        return [f"On the {n} other digits the winner keeps the accuracy floor ({fmt(metrics['accuracy'])}).", ""]
    lo, hi = wilson_interval(metrics["accuracy"] * n, n)
    return [f"On the {n} other digits the winner's accuracy, {fmt(metrics['accuracy'])} "
            f"({round(metrics['accuracy'] * n)} of {n}; 95% Wilson interval {lo:.3f}-{hi:.3f}), is just below the "
            f"{floor:g} floor it met on the search's {searched['images']} ({round(searched['accuracy'] * searched['images'])} "
            f"of {searched['images']}): a floor checked on {searched['images']} "
            "images is a floor on those images; a search that must keep it should judge each trial on more images, "
            "or set the floor above the target.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "optuna_search.md")
    parser.add_argument("--sweep", type=Path, default=ROOT / "multirun" / "optuna_search", help="the search folder")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "optuna_search", help="the check runs")
    parser.add_argument("--check-per-prompt", type=int, default=20, help="images per prompt of the check runs")
    parser.add_argument("--no-search", action="store_true", help="use the trials the sweep folder holds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    finished = (args.sweep / "optimization_results.yaml").is_file()
    if not finished and not args.no_search:
        run_py(*SEARCH, f"hydra.sweeper.n_trials={args.trials}", "~logger", f"hydra.sweep.dir={args.sweep}")
        finished = True
    if not (args.sweep / "summary.md").is_file():  # a search stopped early: its summary, as the callback writes it
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(args.sweep)}}}))
    table, rows = trial_table(args.sweep)
    feasible = [r for r in rows if r.get("feasible")]
    refused = [r for r in rows if "refused" in r]
    best_row = min(feasible, key=lambda r: r["frechet_distance"])
    best = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in yaml.safe_load(
        (args.sweep / best_row["job"] / ".hydra" / "overrides.yaml").read_text()) if "=" in o}
    if finished:
        result = yaml.safe_load((args.sweep / "optimization_results.yaml").read_text())
        assert abs(result["best_value"] - best_row["frechet_distance"]) < 1e-9, (result, best_row)
    verdicts = [json.loads(p.read_text()) for p in args.sweep.glob(f"*/{SEARCH_FILE}")]
    assert len(verdicts) == len(rows), "every trial has its search.json"
    shown_cmd = ["-m", "hparams_search=digits_nfe16", f"hydra.sweeper.n_trials={len(rows)}", "~logger"]
    # the default on the search's 100 digits; winner and default on 500 digits the search never saw
    default_100 = sample_to(args.work / "default_100", "num_images_per_prompt=10")
    n_check = args.check_per_prompt
    held = ["seed=1000", f"num_images_per_prompt={n_check}"]
    default_held = sample_to(args.work / f"default_{10 * n_check}", *held)
    winner_held = sample_to(args.work / f"winner_{10 * n_check}", *winner_overrides(best), *held)
    img = args.out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.work / f"winner_{10 * n_check}" / "grid.png", img / "optuna_winner_grid.png")
    shutil.copyfile(args.work / f"default_{10 * n_check}" / "grid.png", img / "optuna_default_grid.png")

    def row(name: str, m: dict[str, Any], settings: str) -> str:
        return (f"| {name} | {settings} | {fmt(m['network_evaluations_per_batch'])} | {m['images']} | "
                f"{fmt(m['accuracy'])} | {fmt(m['frechet_distance'])} |")

    settings = ", ".join(f"{k}={fmt(best_row[k], 3)}" for k in KEYS)
    cmd = "python run.py " + " ".join(shown_cmd)
    n_held = 10 * n_check
    page = [
        "# Optuna search: the lowest Fréchet distance at <= 16 NFE",
        "",
        f"Generated by `python experiments/optuna_search.py {' '.join(sys.argv[1:])}` (every number below is",
        "read from the runs' `metrics.json` and `search.json`).",
        "",
        "The shipped digit model, searched with Optuna's TPE sampler (hydra-optuna-sweeper, seed 1234) over the",
        "sampler (11 of conf/sampler), the schedule (8 of conf/discretization), the steps (4..16), the CFG scale",
        "(1..9) and the guidance interval (`guider=cfg_interval`: CFG only for sigma in [sigma_lo, sigma_hi],",
        "sigma_lo log-uniform in [0.03, 1], sigma_hi in [1, 14.6]), minimising the Fréchet distance of 100 digits",
        "(10 prompts x 10, seed 42) to the 500 held-out MNIST digits, under two constraints",
        "(`constraints` in conf/hparams_search/digits_nfe16.yaml):",
        "",
        "- **NFE <= 16** network evaluations per image (a CFG step's batched uncond + cond call is one). A trial",
        "  over budget is refused before sampling: a dry run of its sampler and guider with a counting stand-in",
        "  denoiser predicts its NFE (`sgm.tasks.search.planned_nfe`), so it costs no sampling; it returns `inf`.",
        "- **accuracy >= 98%**: a trial below the floor is sampled, judged and returns `inf`.",
        "",
        "```bash",
        cmd,
        "```",
        "",
        *([] if finished else [
            f"The search was stopped after {len(rows)} finished trials (the 2-core machine was shared); TPE with",
            f"a fixed seed asks the same first trials whatever `n_trials` is, so these are the trials of the command",
            f"above. Its first {10} trials are random (`n_startup_trials`), the rest modelled by TPE.", ""]),
        f"{len(rows)} trials: {len(feasible)} feasible, {len(refused)} refused before sampling (over the NFE budget),",
        f"{len(rows) - len(feasible) - len(refused)} below the accuracy floor. The best value: "
        f"**{fmt(best_row['frechet_distance'])}** (trial {best_row['job']}).",
        "",
        "## The winner against the default run",
        "",
        "| run | settings | NFE | images | accuracy | Fréchet distance |",
        "|---|---|---|---|---|---|",
        row("default, the search's 100 digits (seed 42)", default_100, "euler, edm, 30 steps, CFG 5"),
        row("winner, the search's 100 digits (seed 42)", {**best_row, "network_evaluations_per_batch":
                                                          best_row["nfe"]}, settings),
        row(f"default, {n_held} other digits (seed 1000)", default_held, "euler, edm, 30 steps, CFG 5"),
        row(f"winner, {n_held} other digits (seed 1000)", winner_held, settings),
        "",
        f"The last two rows are the honest comparison: the search ranked its trials on one set of 100 images, so",
        f"its best value is optimistic (the pick of {len(feasible)} noisy estimates); {n_held} images it never saw",
        "measure both settings alike (a Fréchet distance also falls as the image count grows, so compare rows of",
        "equal count only).",
        "",
        *floor_note(winner_held, n_held, best_row),
        f"Commands of the check runs (run.py, each into its folder of `{args.work}`):",
        "",
        "```bash",
        "python run.py num_images_per_prompt=10 ~logger                      # default, 100 digits",
        f"python run.py seed=1000 num_images_per_prompt={n_check} ~logger             # default, {n_held} digits",
        "python run.py " + " ".join(winner_overrides(best)) + f" seed=1000 num_images_per_prompt={n_check} ~logger",
        "```",
        "",
        f"| default ({n_held} digits, seed 1000) | winner ({n_held} digits, seed 1000) |",
        "|---|---|",
        "| ![default](img/optuna_default_grid.png) | ![winner](img/optuna_winner_grid.png) |",
        "",
        "## Every trial",
        "",
        *table,
        "",
        "The sweep folder's own summary (`summary.md`, written by the SweepSummary callback) ranks the feasible",
        "trials the same way, and its `xy_grid.png` has one row per trial (a search does not fill a grid).",
        "",
    ]
    args.out.write_text("\n".join(page))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
