"""Sweep summaries that say which setting won, honestly (sgm.tasks.sweep_summary, sweep_stats, xy_grid).

The summary only reads files, so each test writes job folders as a multirun leaves them
(``metrics.json``, ``.hydra/overrides.yaml``, ``grid.png``, a search's ``search.json``) and runs
the callback. Means, standard deviations and the Wilson interval are checked against numpy and
scipy; the X/Y grid's cells against the jobs' own images.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from sgm.tasks.sweep_stats import wilson_interval
from sgm.tasks.sweep_summary import SweepSummary
from sgm.tasks.xy_grid import XYLayout, xy_grid


def job(sweep: Path, num: int, overrides: list[str], metrics: dict, grid: tuple[int, int] | None = (40, 8),
        search: dict | None = None) -> Path:
    """A finished job folder; its grid.png a colour of its own (job number in the red channel)."""
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if grid is not None:
        pixels = np.zeros((grid[1], grid[0], 3), np.uint8)
        pixels[..., 0], pixels[..., 1] = 10 * num + 5, np.arange(grid[0], dtype=np.uint8)[None] * 3
        Image.fromarray(pixels).save(folder / "grid.png")
    if search is not None:
        (folder / "search.json").write_text(json.dumps(search))
    return folder


def summarize(sweep: Path, **kwargs) -> str:
    SweepSummary(**kwargs).on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    return (sweep / "summary.md").read_text()


def line_of(text: str, metric: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"- `{metric}`"))


def jobs_header(text: str) -> list[str]:
    table = text.split("## Jobs", 1)[1]
    return [c.strip() for c in next(l for l in table.splitlines() if l.startswith("| job")).strip("|").split("|")]


BASE = {"images": 100, "labelled_images": 100, "seconds_per_image": 0.05, "network_evaluations_per_batch": 30.0,
        "steps": 30, "sampler": "EulerEDMSampler"}


def test_best_setting_per_metric_with_its_direction_count_and_runner_up(tmp_path):
    sweep = tmp_path / "sweep"
    for k, (scale, fd, acc, other) in enumerate([(1, 30.0, 0.90, 3.0), (3, 20.0, 0.95, 1.0), (5, 25.0, 0.99, 2.0)]):
        job(sweep, k, [f"guider.scale={scale}"], {**BASE, "frechet_distance": fd, "accuracy": acc,
                                                  "seconds_per_image": 0.05 + 0.01 * k, "mystery_score": other})
    text = summarize(sweep)
    assert line_of(text, "frechet_distance") == ("- `frechet_distance` (lower is better): **20** at `guider.scale=3` "
                                                 "(100 images); runner-up 25 at `guider.scale=5`")
    acc = line_of(text, "accuracy")
    assert acc.startswith("- `accuracy` (higher is better): **0.99** at `guider.scale=5` (95% CI ")
    assert acc.endswith("100 images); runner-up 0.95 at `guider.scale=3`")
    lo, hi = (float(x) for x in re.search(r"95% CI ([\d.]+)–([\d.]+)", acc).groups())
    assert line_of(text, "seconds_per_image").startswith("- `seconds_per_image` (lower is better): **0.05** at "
                                                         "`guider.scale=1`")
    # a metric whose direction the project does not know is shown but never ranked
    assert line_of(text, "mystery_score") == ("- `mystery_score`: not ranked: its direction is unknown "
                                              "(sgm.tasks.metric_info.DIRECTIONS)")
    # the Wilson interval against scipy's
    from scipy.stats import binomtest

    ci = binomtest(99, 100).proportion_ci(method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-3)
    assert wilson_interval(99, 100) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_ties_are_named_as_ties(tmp_path):
    sweep = tmp_path / "sweep"
    for k, (scale, acc) in enumerate([(1, 0.8), (3, 1.0), (5, 1.0)]):
        job(sweep, k, [f"guider.scale={scale}"], {**BASE, "accuracy": acc})
    assert "**1** tie between `guider.scale=3`; `guider.scale=5`" in line_of(summarize(sweep), "accuracy")


def test_repeated_seeds_are_grouped_into_mean_std_and_n(tmp_path):
    sweep = tmp_path / "sweep"
    fds = {1: [30.0, 34.0, 29.0], 3: [22.0, 26.0, 21.0]}
    k = 0
    for scale, values in fds.items():
        for seed, fd in zip((1, 2, 3), values):
            job(sweep, k, [f"guider.scale={scale}", f"seed={seed}"], {**BASE, "seed": seed, "frechet_distance": fd,
                                                                      "seconds_per_image": 0.01 * (k + 1)})
            k += 1
    text = summarize(sweep)
    table = text.split("## Mean ± std over seeds", 1)[1].split("## Jobs")[0]
    header, _, *body = [[c.strip() for c in l.strip("|").split("|")] for l in table.splitlines() if l.startswith("|")]
    assert header[:2] == ["guider.scale", "n"] and "frechet_distance" in header
    col = header.index("frechet_distance")
    assert [r[0] for r in body] == ["1", "3"] and [r[1] for r in body] == ["3", "3"]
    for row, values in zip(body, fds.values()):
        mean, std = (float(x) for x in row[col].split(" ± "))
        assert mean == pytest.approx(np.mean(values), rel=1e-3) and std == pytest.approx(np.std(values, ddof=1),
                                                                                        rel=0.05)
    best = line_of(text, "frechet_distance")
    assert best.startswith(f"- `frechet_distance` (lower is better): **{np.mean(fds[3]):.4g}** at `guider.scale=3` "
                           f"(mean ± std {np.mean(fds[3]):.4g} ± {np.std(fds[3], ddof=1):.2g} over 3 seeds, "
                           "100 images per seed)")
    assert (sweep / "summary_frechet_distance.png").is_file()


def test_frechet_distance_on_few_images_is_not_ranked(tmp_path):
    sweep = tmp_path / "sweep"
    for k, (scale, fd) in enumerate([(1, 101.0), (3, 90.0)]):
        job(sweep, k, [f"guider.scale={scale}"], {**BASE, "images": 8, "labelled_images": 8, "frechet_distance": fd})
    fd_line = line_of(summarize(sweep), "frechet_distance")
    assert fd_line.startswith("- `frechet_distance`: not ranked: 2 of 2 settings rest on fewer than 50 images (8)")
    assert "**" not in fd_line
    # the minimum is the callback's: lowered, the same jobs are ranked
    assert "**90** at `guider.scale=3` (8 images)" in line_of(summarize(sweep, min_frechet_images=8),
                                                              "frechet_distance")


def test_a_mixed_count_sweep_ranks_only_the_well_measured_settings(tmp_path):
    sweep = tmp_path / "sweep"
    job(sweep, 0, ["num_images_per_prompt=1"], {**BASE, "images": 10, "frechet_distance": 60.0})
    job(sweep, 1, ["num_images_per_prompt=10"], {**BASE, "images": 100, "frechet_distance": 80.0})
    fd_line = line_of(summarize(sweep), "frechet_distance")
    assert "**80** at `num_images_per_prompt=10`" in fd_line and "1 of 2 settings rest on fewer than 50" in fd_line


def test_constant_columns_and_flat_plots_are_dropped(tmp_path):
    sweep = tmp_path / "sweep"
    for k, scale in enumerate((1, 3, 5)):
        job(sweep, k, [f"guider.scale={scale}", "steps=30"], {**BASE, "accuracy": 1.0,
                                                              "frechet_distance": 20.0 + k})
    text = summarize(sweep)
    assert jobs_header(text) == ["job", "guider.scale", "frechet_distance"]
    constants = next(l for l in text.splitlines() if l.startswith("Constant over the sweep: "))
    for item in ("images=100", "labelled_images=100", "nfe=30", "accuracy=1", "steps=30"):
        assert item in constants
    assert not (sweep / "summary_accuracy.png").exists() and not (sweep / "summary_nfe.png").exists()
    assert (sweep / "summary_frechet_distance.png").is_file()
    # the csv keeps every column
    header = (sweep / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"images", "accuracy", "nfe", "frechet_distance"} <= set(header)


def dark_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    return int((np.asarray(image.crop(box).convert("L")) < 128).sum())


def check_cells(image: Image.Image, layout: XYLayout, sweep: Path) -> None:
    """Each cell holds its job's grid.png, pixel for pixel (these are smaller than a cell)."""
    for rc, box in layout.cells.items():
        own = np.asarray(Image.open(sweep / layout.jobs[rc] / "grid.png").convert("RGB"))
        assert np.array_equal(np.asarray(image.crop(box)), own), rc


def test_xy_grid_of_two_swept_keys(tmp_path):
    sweep = tmp_path / "sweep"
    k = 0
    for scale in (1, 5):
        for sampler in ("euler", "heun", "dpmpp_2m"):
            job(sweep, k, [f"guider.scale={scale}", f"sampler={sampler}"], {**BASE, "frechet_distance": 20.0 + k})
            k += 1
    summarize(sweep, cell=(320, 320))
    saved = Image.open(sweep / "xy_grid.png")
    from sgm.tasks.sweep_summary import collect

    swept, rows = collect(sweep)
    image, layout = xy_grid(swept, rows, sweep)
    assert saved.size == image.size and np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
    # columns: the key with more values; rows: the other
    assert layout.col_labels == ["sampler=euler", "sampler=heun", "sampler=dpmpp_2m"]
    assert layout.row_labels == ["guider.scale=1", "guider.scale=5"]
    assert layout.title == "columns: sampler, rows: guider.scale"
    assert len(layout.cells) == 6 and layout.jobs[(1, 2)] == "5" and layout.jobs[(0, 1)] == "1"
    check_cells(image, layout, sweep)
    # every label is drawn (ink inside its box), and the cells are laid out left to right, top to bottom
    assert all(dark_pixels(image, b) > 5 for b in [*layout.row_label_boxes, *layout.col_label_boxes])
    lefts = [layout.cells[(0, j)][0] for j in range(3)]
    tops = [layout.cells[(i, 0)][1] for i in range(2)]
    assert lefts == sorted(lefts) and tops == sorted(tops)
    assert image.width >= lefts[-1] + 40 and image.height >= tops[-1] + 8
    # the labels sit left of and above the cells
    assert max(b[2] for b in layout.row_label_boxes) <= lefts[0]
    assert max(b[3] for b in layout.col_label_boxes) <= tops[0]
    assert "X/Y grid (columns: sampler, rows: guider.scale)" in (sweep / "summary.md").read_text()


def test_xy_grid_of_one_key_is_one_row_and_big_images_shrink(tmp_path):
    sweep = tmp_path / "sweep"
    for k, steps in enumerate((4, 8)):
        job(sweep, k, [f"steps={steps}"], {**BASE, "steps": steps}, grid=(640, 100))
    from sgm.tasks.sweep_summary import collect

    image, layout = xy_grid(*collect(sweep), sweep, cell=(320, 320))
    assert layout.row_labels == [""] and layout.col_labels == ["steps=4", "steps=8"]
    assert [(b[2] - b[0], b[3] - b[1]) for b in layout.cells.values()] == [(320, 50), (320, 50)]


def test_xy_grid_of_three_keys_fixes_the_third_and_a_search_gets_a_row_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    k = 0
    for steps in (4, 8):
        for sampler in ("euler", "heun", "lms"):
            for seed in (1, 2):
                job(sweep, k, [f"sampler={sampler}", f"steps={steps}", f"seed={seed}"], {**BASE, "seed": seed})
                k += 1
    from sgm.tasks.sweep_summary import collect

    image, layout = xy_grid(*collect(sweep), sweep)
    assert layout.title == "columns: sampler, rows: steps; fixed: seed=1"
    assert len(layout.cells) == 6 and all(int(j) % 2 == 0 for j in layout.jobs.values())  # the seed=1 jobs
    check_cells(image, layout, sweep)
    # an Optuna-like search: every job its own setting, far from a grid
    search = tmp_path / "search"
    for k, (sampler, steps, scale) in enumerate([("euler", 5, 2.5), ("heun", 7, 4.1), ("lms", 9, 6.3)]):
        job(search, k, [f"sampler={sampler}", f"steps={steps}", f"guider.scale={scale}"], BASE)
    image, layout = xy_grid(*collect(search), search)
    assert layout.title == "one row per job" and layout.col_labels == [""]
    assert layout.row_labels[1] == "guider.scale=4.1, sampler=heun, steps=7"
    check_cells(image, layout, search)


def test_search_trials_rank_only_the_feasible_and_show_the_refused(tmp_path):
    sweep = tmp_path / "sweep"
    ok = {"feasible": True, "violations": [], "objective": 25.0}
    job(sweep, 0, ["sampler=euler", "steps=8"], {**BASE, "accuracy": 0.99, "frechet_distance": 25.0}, search=ok)
    job(sweep, 1, ["sampler=euler", "steps=4"], {**BASE, "accuracy": 0.90, "frechet_distance": 15.0},
        search={"feasible": False, "violations": ["accuracy 0.9 < 0.98"], "objective": float("inf")})
    job(sweep, 2, ["sampler=heun", "steps=16"], {"refused": "nfe 31 > 16 (predicted before sampling)", "images": 0,
                                                 "network_evaluations_per_batch": 31.0}, grid=None,
        search={"feasible": False, "violations": ["nfe 31 > 16 (predicted before sampling)"], "objective": None})
    text = summarize(sweep)
    assert "Ranked among the 1 feasible of 3 jobs" in text and "1 refused before sampling" in text
    assert line_of(text, "frechet_distance").startswith("- `frechet_distance` (lower is better): **25** at "
                                                        "`sampler=euler, steps=8`")
    header = jobs_header(text)
    assert {"refused", "feasible", "violations"} <= set(header)
    assert "nfe 31 > 16 (predicted before sampling)" in text.split("## Jobs")[1]


def test_wandb_run_of_a_sweep_job_is_named_by_its_overrides(hydra_runtime, tmp_path):
    """In a multirun, the job's W&B run is named by its overrides (sorted, as typed), grouped by the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from sgm.tasks.common import make_logger

    cfg = hydra_runtime("sample", ["sampler=heun", "guider.scale=3"])
    hc = HydraConfig.instance().cfg
    with read_write(hc.hydra), open_dict(hc.hydra):
        hc.hydra.mode = RunMode.MULTIRUN
        hc.hydra.sweep.dir = str(tmp_path / "sweep")
        hc.hydra.job.num = 1
    [logger] = make_logger(cfg, tmp_path / "sweep" / "1")
    assert logger._wandb_init["name"] == "guider.scale=3,sampler=heun"
    assert logger._wandb_init["group"] == "sweep"
    with read_write(hc.hydra), open_dict(hc.hydra):  # a job without overrides keeps the sweep/number name
        hc.hydra.overrides.task = []
    assert make_logger(cfg, tmp_path / "sweep" / "1")[0]._wandb_init["name"] == "sweep/1"
