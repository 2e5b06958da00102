"""Metrics of the shipped digit model against the untrained one, and the time of `python run.py`.

    python experiments/shipped_model/evaluate.py --out docs/shipped_model_metrics.md

Runs ``run.py`` (fresh processes, imports included) with the default settings:
1. ``python run.py`` as a newcomer types it (10 images; W&B offline without credentials),
   timed from start to images;
2. the default settings with ``num_images_per_prompt=N`` (10 x N images): accuracy and
   Fréchet distance to the 500 held-out digits (``conf/metrics/digits.yaml``);
3. the same with the untrained model (``weights.checkpoint=null weights.random=true``: seeded random weights);
4. the same metrics for as many real training digits (the floor a perfect model reaches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(out: Path, *overrides: str, logger: bool = False) -> tuple[dict, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    args = [] if logger else ["~logger"]
    res = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={out}", *overrides], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"run.py {' '.join(overrides)} failed:\n{res.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text()), wall


def real_digits(count: int, seed: int = 0) -> dict:
    """The same metrics for ``count`` real training digits: the floor a perfect model reaches."""
    import numpy as np
    import torch

    from sgm.data.mnist import load_mnist_5k, split, to_tensor
    from sgm.metrics.digits import digit_metrics

    images, labels = load_mnist_5k()
    train, _ = split(labels)
    pick = np.random.default_rng(seed).choice(train, count, replace=False)
    x = to_tensor(images[pick])
    m = digit_metrics(x.expand(-1, 3, -1, -1), torch.from_numpy(labels[pick]))
    return {"images": count, **m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/evaluate")
    parser.add_argument("--out", default=None)
    parser.add_argument("--images-per-digit", type=int, default=50)
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    if work.exists():
        raise FileExistsError(f"{work} exists: choose another --work folder (nothing is overwritten)")
    n = args.images_per_digit
    default, wall = run(work / "default", logger=True)  # as typed: W&B on (offline without credentials)
    print(f"python run.py: {wall:.1f} s start to images; {default}", flush=True)
    shipped, _ = run(work / "shipped", "progress=false", f"num_images_per_prompt={n}", "batch_size=100")
    print("shipped", shipped, flush=True)
    untrained, _ = run(work / "untrained", "progress=false", f"num_images_per_prompt={n}", "batch_size=100",
                       "weights.checkpoint=null", "weights.random=true")
    print("untrained", untrained, flush=True)
    real = real_digits(10 * n)
    print("real", real, flush=True)
    result = {"run_py_seconds": wall, "default": default, "shipped": shipped, "untrained": untrained, "real": real}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    if args.out:
        row = lambda name, m: (f"| {name} | {m['images']} | {m['accuracy']:.1%} | {m['frechet_distance']:.0f} | "  # noqa: E731
                               f"{m['seconds_per_image'] * 1000:.1f} ms | {m['network_evaluations_per_batch']:.0f} |")
        lines = [
            "# Metrics of the shipped digit model",
            "",
            f"Reproduce: `python experiments/shipped_model/evaluate.py --out {args.out}` "
            f"(run.py defaults: seed 42, Euler, 30 steps, CFG 5; 2-core CPU).",
            "",
            "| model | images | digit accuracy | Fréchet distance (held-out) | sampling per image | network evaluations per batch |",
            "|---|---|---|---|---|---|",
            row("shipped, `python run.py`", default),
            row(f"shipped, `python run.py num_images_per_prompt={n}`", shipped),
            row(f"untrained (`weights.random=true`), {n} per digit", untrained),
            f"| real MNIST digits (train split, random {real['images']}) | {real['images']} | {real['accuracy']:.1%} | "
            f"{real['frechet_distance']:.0f} | | |",
            "",
            f"`python run.py` from start to images (fresh process, imports included): **{wall:.1f} s**.",
            "",
            "Accuracy: the shipped classifier's prediction against the digit the prompt names. Fréchet distance: "
            "torchmetrics' FID in the classifier's 128-d feature space against the 500 held-out MNIST digits "
            "(never trained on). It is biased upwards for few images: compare rows with the same image count.",
            "",
        ]
        Path(args.out).write_text("\n".join(lines))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
