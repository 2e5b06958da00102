"""Sweep throughput (issue 14): a multirun over CFG scales with and without ``reuse_engine``, Hydra's
joblib launcher, prompt batches, and the build seconds a reused SDXL-size model saves.

Sweeps, each one ``python run.py -m guider.scale=SCALES ~logger progress=false cpu_threads=1 EXTRA``
process into a fresh sweep folder, ``--repeats`` times, interleaved: the basic launcher with
``reuse_engine=false`` and with ``reuse_engine=auto`` (on in a multirun), and
``hydra/launcher=parallel`` (hydra-joblib-launcher, 2 loky worker processes) with ``auto``. Per
sweep: the process's wall seconds, the model-build seconds the jobs' run.log state
(``model built in``) and the jobs that reused the loaded model. Batches: one ``run.py`` process per
``batch_size``, images per second of sampling from metrics.json. ``--sdxl``: SDXL base with random
float16 weights written once (experiments/benchmark.py's ``make_sdxl_checkpoint``, ~6.9 GB) and
loaded in a fresh process by ``build_engine`` (benchmark.py's ``load_child``), as stored and cast to
bfloat16: the seconds each reused job no longer spends. The machine's load from other processes
is read from /proc/stat (experiments/benchmark.py's ``other_load``).

    python experiments/sweep_throughput.py --extra steps=10 --sdxl --out docs/benchmarks.md
    python experiments/sweep_throughput.py --repeats 1 --extra steps=4 --json sweeps.json
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
from benchmark import cpu_snapshot, log, make_sdxl_checkpoint, other_load, table  # noqa: E402
from cold_start import env, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ["~logger", "progress=false", "cpu_threads=1"]
SWEEPS = {"basic launcher, reuse_engine=false": ["reuse_engine=false"],
          "basic launcher, reuse_engine=auto (the default)": [],
          "hydra/launcher=parallel (2 processes), reuse_engine=auto": ["hydra/launcher=parallel"]}
BUILT = re.compile(r"model built in ([\d.]+) s")
REUSED = re.compile(r"reusing the loaded model \(job \d+\)")
SECTION = "sweeps"
NOTE = ("Which launcher: the basic launcher (Hydra's default) runs the jobs one after another in one process, so with "
        "`reuse_engine=auto` the model is built by job 0 only and the process starts (imports) once. "
        "`hydra/launcher=parallel` starts `n_jobs` loky worker processes, each importing torch and Lightning and "
        "building its own copy of the model (a worker that runs several jobs reuses its copy), so it only pays where "
        "one job leaves most cores idle and memory holds `n_jobs` models; on one GPU, prefer the basic launcher. A "
        "reused job still pays for what is per job: the validate step (the metrics' own networks are instantiated "
        "again), a new Trainer, sampling and writing the images.")


def run_py(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """One ``run.py ARGS`` process: (wall seconds, result); a failure raises with its stderr."""
    start = cpu_snapshot()[2]
    res = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, env=env(),
                         timeout=1800)
    if res.returncode:
        raise RuntimeError(f"run.py {' '.join(args)}: exit {res.returncode}\n{res.stderr[-3000:]}")
    return cpu_snapshot()[2] - start, res


def sweep(overrides: list[str], scales: str, extra: list[str]) -> dict:
    """One multirun: its wall seconds, each job's build seconds (None: reused) and sampling seconds."""
    with tempfile.TemporaryDirectory() as out:
        wall, _ = run_py(["-m", f"guider.scale={scales}", *BASE, *overrides, *extra, f"hydra.sweep.dir={out}"])
        jobs = sorted((p for p in Path(out).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        builds, sampling = [], []
        for job in jobs:
            text = (job / "run.log").read_text()
            built = BUILT.findall(text)
            builds.append(float(built[0]) if built else None)
            if not built and not REUSED.search(text):
                raise RuntimeError(f"{job}: neither built nor reused a model")
            sampling.append(json.loads((job / "metrics.json").read_text())["seconds"])
    return {"wall": wall, "builds": builds, "sampling": sampling}


def batch_rate(batch_size: int, extra: list[str]) -> dict:
    """``run.py batch_size=B``: images per second of sampling (metrics.json), and the wall seconds."""
    with tempfile.TemporaryDirectory() as out:
        wall, _ = run_py([*BASE, f"batch_size={batch_size}", *extra, f"hydra.run.dir={out}/run"])
        metrics = json.loads((Path(out) / "run" / "metrics.json").read_text())
    return {"wall": wall, "images": metrics["images"], "seconds": metrics["seconds"]}


def sdxl_load(workdir: Path) -> list[dict]:
    """SDXL base float16 loaded by build_engine in a fresh process (as stored, cast to bfloat16):
    benchmark.py's load child reports the build seconds and the first read of every weight."""
    path = workdir / "sdxl_base_float16.safetensors"
    if not path.is_file():
        st = os.statvfs(workdir)
        if st.f_bavail * st.f_frsize < 10 * 2**30:
            raise RuntimeError(f"--sdxl needs 10 GiB free disk in {workdir}")
        log(f"[sdxl] writing {path}")
        make_sdxl_checkpoint(path)
    rows = []
    for label, extra in (("as stored (float16)", []), ("cast to bfloat16", ["weights.dtype=bfloat16"])):
        proc = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable,
                               str(ROOT / "experiments" / "benchmark.py"), "--_load-child", "2", str(path),
                               "model=sdxl_base", *extra], capture_output=True, text=True, cwd=ROOT, timeout=1800)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"load child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(line[-1][len("RESULT "):])
        rows.append({"variant": label, "file_bytes": path.stat().st_size, "params": res["params"],
                     "load_s": res["load_s"], "touch_s": res["touch_s"]})
        log(f"[sdxl] {label}: build_engine {res['load_s']:.2f} s, first read of every weight {res['touch_s']:.2f} s")
    return rows


def measure(args: argparse.Namespace) -> dict:
    start = cpu_snapshot()
    sweeps: dict[str, list[dict]] = {k: [] for k in SWEEPS}
    batches: dict[int, list[dict]] = {b: [] for b in args.batch_sizes}
    for r in range(args.repeats):
        for name, overrides in SWEEPS.items():
            sweeps[name].append(sweep(overrides, args.scales, args.extra))
            log(f"repeat {r} {name}: {sweeps[name][-1]}")
        for b in args.batch_sizes:
            batches[b].append(batch_rate(b, [*args.extra, *args.batch_extra]))
            log(f"repeat {r} batch_size={b}: {batches[b][-1]}")
    result = {"sweeps": sweeps, "batches": {str(b): v for b, v in batches.items()}, "repeats": args.repeats,
              "scales": args.scales, "extra": args.extra, "batch_extra": args.batch_extra, "cpus": os.cpu_count()}
    result["other_load"] = other_load(start)
    if args.sdxl:
        result["sdxl"] = sdxl_load(args.workdir)
    return result


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]


def render(result: dict, command: str) -> str:
    rows = []
    first = None
    for name, runs in result["sweeps"].items():
        run = _median_run(runs)
        walls = [r["wall"] for r in runs]
        built = [b for b in run["builds"] if b is not None]
        first = first or statistics.median(walls)
        rows.append([name, f"{statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f})",
                     f"{first / statistics.median(walls):.2f}x", f"{len(built)} of {len(run['builds'])}",
                     ", ".join(f"{b:.2f}" if b is not None else "reused" for b in run["builds"]),
                     f"{sum(run['sampling']):.1f}"])
    header = ["sweep", "wall s (median, min-max)", "speed-up", "jobs that built the model",
              "model-build s per job (median sweep)", "sampling s, all jobs"]
    brows = []
    for b, runs in result["batches"].items():
        rates = [r["images"] / r["seconds"] for r in runs]
        brows.append([f"batch_size={b}", runs[0]["images"], f"{statistics.median(rates):.1f}",
                      f"{statistics.median(r['wall'] for r in runs):.1f}"])
    extra = " ".join(result["extra"])
    text = (f"Reproduce: `{command}`.\n\n{result['cpus']} CPUs; other processes used {100 * result['other_load']:.0f}% "
            f"of the machine's CPU time during the measurement (/proc/stat), so compare within the table. "
            f"{result['repeats']} repeat(s) of each sweep, interleaved. Each sweep is one process: `python run.py -m "
            f"guider.scale={result['scales']} {' '.join(BASE)} {extra}` (shipped digit model, 10 images a job) plus "
            f"the row's overrides; model-build seconds are those the jobs' run.log state (`model built in`).\n\n"
            + table(header, rows))
    text += ("\n\nBatches (`run.py " + " ".join([*BASE, *result["extra"], *result["batch_extra"]]) +
             " batch_size=B`, one process each; images/s of sampling from metrics.json, i.e. without start-up "
             "and model build):\n\n" + table(["batch", "images", "images/s sampling", "wall s"], brows))
    if result.get("sdxl"):
        srows = [[r["variant"], f"{r['params'] / 1e9:.2f}B", f"{r['file_bytes'] / 1e9:.2f}", f"{r['load_s']:.2f}",
                  f"{r['touch_s']:.2f}", f"{r['load_s'] + r['touch_s']:.1f}"] for r in result["sdxl"]]
        text += ("\n\nSDXL base (random weights in float16, `model=sdxl_base`), loaded by `build_engine` in a fresh "
                 "process right after writing the file, on this shared machine (experiments/benchmark.py's load child; "
                 "`build_engine` maps the file, the first read pages the weights in, as a first forward pass does): "
                 "what each job of a sweep without reuse pays again, and a reused job does not:\n\n" +
                 table(["weights", "params", "file GB", "build_engine s", "first read of every weight s",
                        "saved per reused job s"], srows))
    return text + "\n\n" + NOTE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scales", default="1,3,5,7,9", help="the swept guider.scale values")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run (e.g. steps=10)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 20])
    ap.add_argument("--batch-extra", nargs="*", default=["num_images_per_prompt=2"],
                    help="overrides for the batch runs only (default: 20 images)")
    ap.add_argument("--sdxl", action="store_true", help="also SDXL base's load seconds (~6.9 GB written once)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sgm-benchmark"), help="where the SDXL file goes")
    ap.add_argument("--json", type=Path, help="write the raw measurements here")
    ap.add_argument("--out", type=Path, help="markdown file whose sweeps section is replaced")
    ap.add_argument("--render-json", type=Path, help="no measuring: render the measurements of an earlier --json")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.render_json:
        result, args.json = json.loads(args.render_json.read_text()), None
    else:
        result = measure(args)
    command = "python experiments/sweep_throughput.py" + (f" --repeats {args.repeats}" if args.repeats != 2 else "") \
        + (f" --extra {' '.join(args.extra)}" if args.extra else "") + (" --sdxl" if args.sdxl else "") \
        + " --out docs/benchmarks.md"
    publish(args, SECTION, "Sweep throughput: reusing the loaded model (CPU)", render(result, command), result)


if __name__ == "__main__":
    main()
