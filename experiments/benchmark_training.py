"""Training speed and peak memory of the tiny model: gradient checkpointing and latent caching.

Each configuration runs `train.py` twice in a fresh process (a short and a long run); the
step rate is (long - short) steps over the difference in wall time, so start-up, data
checks and caching cancel out. Peak memory is the process's maximum resident set.

    python experiments/benchmark_training.py --out docs/benchmarks_training.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
RUNNER = """
import resource, runpy, sys, json
sys.argv = ["train.py"] + sys.argv[1:]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
"""


def make_images(root: Path, n: int, size: int) -> None:
    colors = [(220, 30, 30), (30, 60, 220), (30, 180, 60)]
    for i in range(n):
        im = Image.new("RGB", (size, size), (245, 245, 245))
        s = size // 2
        ImageDraw.Draw(im).ellipse([i % 7, i % 5, i % 7 + s, i % 5 + s], fill=colors[i % 3])
        im.save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"shape {i % 3}")


def run(args: list[str], cwd: Path) -> tuple[float, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    peak = float([ln for ln in res.stdout.splitlines() if ln.startswith("PEAK_RSS_MB")][-1].split()[1])
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=45)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for res_px, batch in [(32, 8), (128, 8)]:
            images = tmp / f"img{res_px}"
            images.mkdir()
            make_images(images, 32, res_px)
            for ckpt in (False, True):
                for cache in (False, True):
                    base = ["~logger", "progress=false", f"cpu_threads={opts.threads}", f"data.root={images}",
                            f"data.batch_size={batch}", "validation.sample_every_n_steps=0",
                            "validation.every_n_steps=0", "checkpoint_every_n_steps=1000", f"H={res_px}",
                            f"W={res_px}", f"gradient_checkpointing={str(ckpt).lower()}",
                            f"cache_latents={str(cache).lower()}", f"data.cache_dir={tmp / f'cache{res_px}'}"]
                    t_short, _ = run(base + [f"trainer.max_steps={opts.short}", f"hydra.run.dir={tmp}/s"], ROOT)
                    t_long, peak = run(base + [f"trainer.max_steps={opts.long}", f"hydra.run.dir={tmp}/l"], ROOT)
                    rate = (opts.long - opts.short) / max(1e-9, t_long - t_short)
                    rows.append({"resolution": res_px, "batch": batch, "grad_ckpt": ckpt, "cache": cache,
                                 "steps_per_s": rate, "peak_rss_mb": peak})
                    print(json.dumps(rows[-1]), flush=True)
    import torch

    lines = ["## Training speed and memory (tiny model, LoRA rank 16, CPU)", "",
             "Reproduce: `python experiments/benchmark_training.py --out docs/benchmarks_training.md` "
             f"({os.cpu_count()} cores, {opts.threads} threads, torch {torch.__version__}). Steps per second from "
             f"the difference of a {opts.long}- and a {opts.short}-step run; peak memory is the process's maximum "
             "resident set (Python, torch and the data included).", "",
             "| images | batch | gradient checkpointing | latent cache | steps/s | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']}x{r['resolution']} | {r['batch']} | {'on' if r['grad_ckpt'] else 'off'} | "
                     f"{'on' if r['cache'] else 'off'} | {r['steps_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out:
        opts.out.write_text(text)


if __name__ == "__main__":
    main()
