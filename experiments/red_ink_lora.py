"""LoRA experiment: teach the shipped digit model a new style, red ink, behind a trigger phrase.

    python experiments/red_ink_lora.py --out docs/red_ink_lora.md

1. Data: 200 digits of the MNIST train split (20 per digit, seed 0) redrawn in red ink,
   captioned "a handwritten digit seven in red ink" (half with the numeral, "... 7 in red
   ink"), plus (``--regularization``, default 200) plain white digits with their plain
   captions, DreamBooth's prior preservation, so the style stays behind the trigger.
2. Train a UNet LoRA from the shipped model with ``train.py`` (``lora=default``, rank 16,
   cached latents), timed: the budget is 10 minutes of CPU.
3. Sample 10 digits x ``--images-per-digit`` seeds with ``run.py`` for the base model and
   the LoRA, each with and without the trigger, at each CFG scale of ``--scales``; report the share of red-ink digits (style
   adherence, :func:`sgm.metrics.digits.red_ink_share`) and the digit accuracy of the
   shipped classifier (it reads ink intensity, so it judges red digits too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sgm.data.mnist import caption, load_mnist_5k, pad32, split
from sgm.metrics.digits import red_ink_share

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("red_ink_lora")
TRIGGER = "in red ink"
RED = np.array([0.9, 0.08, 0.08])


def write_data(root: Path, n_style: int, n_regularization: int, seed: int) -> None:
    """Red-ink digits with trigger captions (+ plain digits with plain captions)."""
    images, labels = load_mnist_5k()
    train, _ = split(labels)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    picked = []
    for digit in range(10):
        idx = train[labels[train] == digit]
        picked.append(rng.choice(idx, (n_style + n_regularization) // 10, replace=False))
    picked = np.stack(picked)  # [10, per digit]
    per_style = n_style // 10
    for d in range(10):
        for j, i in enumerate(picked[d]):
            ink = pad32(images[i]).astype(np.float64)[..., None] / 255.0
            styled = j < per_style
            rgb = ink * (RED if styled else np.ones(3))
            Image.fromarray((rgb * 255).round().astype(np.uint8)).save(root / f"{i:05d}.png")
            text = caption(labels[i], numeral=bool(j % 2))
            (root / f"{i:05d}.txt").write_text(f"{text} {TRIGGER}" if styled else text)


def sh(args: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{res.stderr[-3000:]}")
    return res


def sample(out: Path, prompts: list[str], n: int, lora: Path | None, scale: float) -> dict:
    args = ["run.py", "~logger", "progress=false", f"hydra.run.dir={out}", f"num_images_per_prompt={n}",
            f"guider.scale={scale:g}",
            "batch_size=50", "cpu_threads=2", "prompts=[" + ",".join(f'"{p}"' for p in prompts) + "]"]
    if lora is not None:
        args.append(f"lora.files=[{lora}]")
    sh(args)
    files = sorted(out.glob("[0-9][0-9][0-9][0-9][0-9].png"))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)
    judged = json.loads((out / "metrics.json").read_text())  # conf/metrics/digits.yaml, same images
    return {"red_ink_share": red_ink_share(x.float() / 127.5 - 1), "accuracy": judged["accuracy"],
            "frechet_distance": judged["frechet_distance"]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/red_ink")
    parser.add_argument("--out", default=None, help="a markdown report (e.g. docs/red_ink_lora.md)")
    parser.add_argument("--images", type=int, default=200, help="red-ink training images (<= 200)")
    parser.add_argument("--regularization", type=int, default=200, help="plain digits with plain captions")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--scales", default="2,5", help="CFG scales to sample at (comma-separated)")
    parser.add_argument("--images-per-digit", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    if work.exists():
        raise FileExistsError(f"{work} exists: choose another --work folder (nothing is overwritten)")
    write_data(work / "data", args.images, args.regularization, args.seed)

    start = time.perf_counter()
    cpu0 = os.times()
    sh(["train.py", "model=digits", "lora=default", f"data.root={work / 'data'}", "data.batch_size=16",
        "data.val_fraction=0", f"data.cache_dir={work / 'cache'}", "data.full_check=false", "cache_latents=true",
        f"trainer.max_steps={args.steps}", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0",
        "lr_scheduler=cosine", "lr_scheduler.warmup_steps=50", "validation.every_n_steps=100000",
        "validation.sample_every_n_steps=0", "checkpoint_every_n_steps=100000", "~logger", "progress=false",
        "cpu_threads=2", f"seed={args.seed}", "output_name=red_ink.safetensors", f"hydra.run.dir={work / 'train'}"])
    wall = time.perf_counter() - start
    cpu1 = os.times()
    cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    lora = work / "train" / "red_ink.safetensors"
    log.info("trained %s in %.0f s wall, %.0f s CPU", lora, wall, cpu)

    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    plain = [f"a handwritten digit {d}" for d in digits]
    triggered = [f"{p} {TRIGGER}" for p in plain]
    rows = {}
    for scale in [float(v) for v in args.scales.split(",")]:
        for model, lora_file in (("shipped model", None), ("+ red-ink LoRA", lora)):
            for name, prompts in (("without trigger", plain), ("with trigger", triggered)):
                key = f"CFG {scale:g}: {model}, {name}"
                folder = work / "samples" / f"cfg{scale:g}_{'lora' if lora_file else 'base'}_{name.replace(' ', '_')}"
                rows[key] = sample(folder, prompts, args.images_per_digit, lora_file, scale)
                log.info("%s: %s", key, rows[key])
    (work / "results.json").write_text(json.dumps({"train_wall_s": wall, "train_cpu_s": cpu, "rows": rows}, indent=2))
    if args.out:
        lines = [
            "# Red-ink LoRA on the shipped digit model",
            "",
            f"Reproduce: `python experiments/red_ink_lora.py --out {args.out}` (seed {args.seed}; {args.images} red-ink "
            f"digits + {args.regularization} plain ones, {args.steps} steps, batch 16, LoRA rank 16 on the UNet's "
            f"attention and feed-forward layers, lr {args.lr:g} cosine).",
            "",
            f"Training: {wall:.0f} s wall clock, {cpu:.0f} s of CPU time (2 cores), including start-up and latent caching.",
            "",
            f"Sampling: `run.py` defaults (Euler, 30 steps, seed 42) at CFG {args.scales}, {args.images_per_digit} seeds "
            f"x 10 digits per row; the trigger is \"{TRIGGER}\" appended to \"a handwritten digit seven\". Sample "
            f"folders: `{args.work}/samples/`.",
            "",
            "| model, prompt | red-ink digits | digit accuracy | Fréchet distance |",
            "|---|---|---|---|",
            *[f"| {k} | {v['red_ink_share']:.0%} | {v['accuracy']:.0%} | {v['frechet_distance']:.0f} |"
              for k, v in rows.items()],
            "",
            "Red-ink digits: mean ink colour with R above both G and B by 0.25 "
            "(`sgm.metrics.digits.red_ink_share`). Accuracy: the shipped classifier on ink intensity.",
            "",
        ]
        Path(args.out).write_text("\n".join(lines))
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
