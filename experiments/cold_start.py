"""Cold start of run.py (issue 14): wall time of fresh processes and the heavy packages they import.

Cases, each a new ``python run.py ...`` process, ``--repeats`` times, interleaved:
``help`` (``--help``), ``config_error`` (``steps=0``: must fail before torch is imported),
``sampler_error`` (``guider.scale=abc``: fails in validate, before Lightning is imported),
``no_logger`` (``~logger``, to images) and ``default`` (the default run, to images), each under
``python -X importtime`` for the import time of the top-level packages and which heavy ones
were imported; ``--extra`` overrides make the sampling cases smaller on a busy machine. ``--root DIR`` measures another checkout too (e.g. a
``git worktree`` of the commit before), as a second column group. The machine's load from
other processes is read from /proc/stat (experiments/benchmark.py's ``other_load``).

    python experiments/cold_start.py --repeats 3 --root /tmp/before --out docs/benchmarks.md
    python experiments/cold_start.py --repeats 1 --extra steps=2 'prompts=[three]' --json cold.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import SECTION_ORDER, SECTION_TITLES, cpu_snapshot, log, other_load, table, write_sections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {"help": ["--help"], "config_error": ["steps=0"], "sampler_error": ["guider.scale=abc"],
         "no_logger": ["~logger", "progress=false"], "default": ["progress=false"]}
ERRORS = ("config_error", "sampler_error")  # the cases that must exit with status 1
HEAVY = ("torch", "lightning", "torchmetrics", "torchvision", "transformers", "matplotlib", "scipy", "wandb", "open_clip")
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", re.M)
SECTION = "cold_start"
NOTE = ("A mistyped number (`steps=0`, a size, a strength) stops before torch is imported: run.py checks the run's "
        "numbers (`sgm.tasks.sample_numbers`) before it imports the sample task. An error found by building the "
        "sampler or guider (`guider.scale=abc`) stops in the task's validate step, after torch and before Lightning. "
        "A run that samples still imports Lightning (the engine is a `LightningModule`, run.py predicts with "
        "`Trainer.predict`), and `import lightning` imports torchmetrics (`lightning.fabric.utilities.imports` "
        "compares its version; `LightningModule` imports `torchmetrics.Metric`), which imports transformers, "
        "torchvision, matplotlib and scipy: those stay in the to-images rows whether or not `~metrics` / "
        "`~logger` is given. With `~logger` no W&B is imported (open_clip, which the digit model's OpenCLIP text "
        "tower needs, is imported with W&B hidden from timm: `sgm.conditioning.open_clip.import_open_clip`). "
        "`--help` imports no torch.")


def env() -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(Path.home())}


def run_case(root: Path, args: list[str], importtime: bool = False,
             env_extra: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """One ``run.py ARGS`` process in ``root`` (``env_extra`` added to its environment), into a
    fresh folder: (wall seconds, result)."""
    with tempfile.TemporaryDirectory() as out:
        extra = [] if args == ["--help"] else [f"hydra.run.dir={out}/run"]
        cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "run.py", *args, *extra]
        start = cpu_snapshot()[2]
        res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env() | (env_extra or {}),
                             timeout=900)
        return cpu_snapshot()[2] - start, res


def import_profile(stderr: str) -> dict[str, float]:
    """Seconds of each top-level import (cumulative, depth 0) from ``-X importtime`` output."""
    seconds: dict[str, float] = {}
    for _, cumulative, indent, name in IMPORT_LINE.findall(stderr):
        if len(indent) == 1:  # importtime indents depth 0 by one space
            top = name.split(".")[0]
            seconds[top] = seconds.get(top, 0.0) + int(cumulative) / 1e6
    return seconds


def imported_heavy(stderr: str) -> list[str]:
    """The heavy packages a run imported: a submodule of theirs was loaded, or the package itself
    took longer than its own module (a failed ``import wandb``, which open_clip's import provokes
    on purpose, is listed by ``-X importtime`` too, without children)."""
    found = set()
    for own, cumulative, _, name in IMPORT_LINE.findall(stderr):
        top = name.split(".")[0]
        if top in HEAVY and (name != top or int(cumulative) > int(own)):
            found.add(top)
    return sorted(found)


def measure(roots: dict[str, Path], repeats: int, extra: list[str]) -> dict:
    """Every case ``repeats`` times per checkout, interleaved, each run under ``-X importtime``
    (its import seconds and heavy packages from the fastest run); ``extra`` overrides go to the
    cases that sample."""
    start = cpu_snapshot()
    walls: dict[str, dict[str, list[float]]] = {k: {c: [] for c in CASES} for k in roots}
    profiles: dict[str, dict[str, dict]] = {k: {} for k in roots}
    for r in range(repeats):
        for case, args in CASES.items():
            for key, root in roots.items():
                samples = case in ("no_logger", "default")
                wall, res = run_case(root, [*args, *(extra if samples else [])], importtime=True)
                if res.returncode != (1 if case in ERRORS else 0):
                    raise RuntimeError(f"{key} {case}: exit {res.returncode}\n{res.stderr[-2000:]}")
                walls[key][case].append(wall)
                if wall <= min(walls[key][case]):
                    prof = import_profile(res.stderr)
                    profiles[key][case] = {"imports_s": sum(prof.values()), "heavy": imported_heavy(res.stderr),
                                           "top": dict(sorted(prof.items(), key=lambda kv: -kv[1])[:6])}
                log(f"repeat {r} {key} {case}: {wall:.2f} s")
    return {"walls": walls, "profiles": profiles, "other_load": other_load(start), "repeats": repeats,
            "cpus": os.cpu_count(), "extra": extra}


def render(result: dict, command: str) -> str:
    keys = list(result["walls"])
    header = ["case"] + [f"{k}: wall s (median, min-max)" for k in keys] + [f"{k}: import s, heavy packages" for k in keys]
    rows = []
    for case in CASES:
        extra = result.get("extra", []) if case in ("no_logger", "default") else []
        row = [f"`run.py {' '.join([*CASES[case], *extra])}`"]
        for k in keys:
            w = result["walls"][k][case]
            row.append(f"{statistics.median(w):.2f} ({min(w):.2f}-{max(w):.2f})")
        for k in keys:
            p = result["profiles"][k][case]
            row.append(f"{p['imports_s']:.2f}: {', '.join(p['heavy']) or 'none'}")
        rows.append(row)
    return (f"Reproduce: `{command}`.\n\n{result['cpus']} CPUs; other processes used "
            f"{100 * result['other_load']:.0f}% of the machine's CPU time during the measurement (/proc/stat), "
            f"so the seconds are this loaded machine's; the lists of imported packages do not depend on it. "
            f"{result['repeats']} repeat(s) of each case, interleaved, each run under `python -X importtime` "
            f"(import seconds: the top-level imports of the fastest run).\n\n" + table(header, rows) + "\n\n" + NOTE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", type=Path, help="another checkout to measure beside this one (e.g. the commit before)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for the cases that sample (e.g. steps=2)")
    ap.add_argument("--json", type=Path, help="write the raw measurements here")
    ap.add_argument("--out", type=Path, help="markdown file whose cold-start section is replaced")
    ap.add_argument("--render-json", type=Path, help="no measuring: render the measurements of an earlier --json")
    args = ap.parse_args()
    roots = {"before": args.root.resolve(), "after": ROOT} if args.root else {"this checkout": ROOT}
    if args.render_json:
        result, args.json = json.loads(args.render_json.read_text()), None
    else:
        result = measure(roots, args.repeats, args.extra)
    command = "python experiments/cold_start.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else "") + \
        (" --root BEFORE_CHECKOUT" if args.root else "") + \
        (f" --extra {' '.join(args.extra)}" if args.extra else "") + " --out docs/benchmarks.md"
    publish(args, SECTION, "Cold start of run.py (CPU)", render(result, command), result)


def publish(args: argparse.Namespace, key: str, title: str, text: str, raw: dict) -> None:
    """Log ``text``; write ``raw`` to ``--json`` and ``text`` as section ``key`` of ``--out``
    (experiments/benchmark.py's marked sections, replaced in place on a rerun)."""
    log(text)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    if args.out:
        SECTION_TITLES[key] = title
        SECTION_ORDER.append(key)
        write_sections(args.out, {key: text})


if __name__ == "__main__":
    main()
