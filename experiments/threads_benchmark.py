"""CPU threads on a shared machine (issue 14): run.py on the shipped model per thread setting,
with the machine as it is and with one competing busy process (``python -c "while True: pass"``,
nice 0, started before and stopped after each run).

Settings: ``cpu_threads=1``, ``cpu_threads=2``, ``cpu_threads=null`` (the automatic choice of
sgm/tasks/threads.py), each with run.py's OpenMP passive wait, and ``cpu_threads=2`` with
``OMP_WAIT_POLICY=ACTIVE`` (spinning workers, what the passive default avoids). ``--root DIR``
adds the default run of another checkout (the commit before: torch's own threads and wait policy).
Each cell: the median wall time of ``--repeats`` ``run.py ~logger progress=false`` processes
(imports included, the same for every setting). Other processes' load from /proc/stat.

    python experiments/threads_benchmark.py --repeats 1 --root /tmp/before --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import cpu_snapshot, log, other_load, table  # noqa: E402
from cold_start import publish, run_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ["~logger", "progress=false"]
SETTINGS = {"cpu_threads=1": (["cpu_threads=1"], {}), "cpu_threads=2": (["cpu_threads=2"], {}),
            "cpu_threads=null (auto, the default)": ([], {}),
            "cpu_threads=2, OMP_WAIT_POLICY=ACTIVE": (["cpu_threads=2"], {"OMP_WAIT_POLICY": "ACTIVE"})}
SECTION = "threads"
BUSY = [sys.executable, "-c", "while True: pass"]


def one_run(root: Path, overrides: list[str], extra_env: dict[str, str], busy: bool) -> float:
    competitor = subprocess.Popen(BUSY) if busy else None
    try:
        wall, res = run_case(root, [*BASE, *overrides], env_extra=extra_env)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if res.returncode != 0:
        raise RuntimeError(f"run.py {' '.join(overrides)}: exit {res.returncode}\n{res.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--root", type=Path, help="another checkout whose default run is measured too")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    settings = {label: (ROOT, o, e) for label, (o, e) in SETTINGS.items()}
    if args.root:
        settings["the commit before, default"] = (args.root.resolve(), [], {})
    start = cpu_snapshot()
    walls = {label: {"as is": [], "busy": []} for label in settings}
    for r in range(args.repeats):
        for busy in (False, True):
            for label, (root, overrides, extra) in settings.items():
                w = one_run(root, overrides, extra, busy)
                walls[label]["busy" if busy else "as is"].append(w)
                log(f"repeat {r} {label} {'busy' if busy else 'as is'}: {w:.1f} s")
    load = other_load(start)
    best = {k: min(statistics.median(v[k]) for v in walls.values()) for k in ("as is", "busy")}
    rows = [[label, *(f"{statistics.median(v[k]):.1f} ({statistics.median(v[k]) / best[k]:.2f}x best)"
                      for k in ("as is", "busy"))] for label, v in walls.items()]
    command = "python experiments/threads_benchmark.py" + (f" --repeats {args.repeats}" if args.repeats != 1 else "") \
        + (" --root BEFORE_CHECKOUT" if args.root else "") + " --out docs/benchmarks.md"
    text = (f"Reproduce: `{command}`.\n\n`python run.py ~logger progress=false` (shipped digit model, 10 images, "
            f"30 Euler steps, CFG) as a new process, wall seconds including imports, median of {args.repeats}. "
            "*busy*: one `python -c \"while True: pass\"` at nice 0 beside it. The machine is shared: other "
            f"processes (not this script, its runs or the competitor) used {100 * load:.0f}% of its CPU time "
            "during the measurement (/proc/stat), so compare within a column.\n\n"
            + table(["setting", "machine as is: s", "+1 busy process: s"], rows))
    publish(args, SECTION, "CPU threads on a shared machine (shipped model)", text, {"walls": walls, "other_load": load})


if __name__ == "__main__":
    main()
