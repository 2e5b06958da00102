"""Error of each sampler against its own 1000-step solution, and against the exact data law.

The target is an analytic Gaussian mixture (exact denoiser, float64), so every error is the
sampler's own. Usage:

    python experiments/sampler_convergence.py --out docs/sampler_convergence.md
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from sgm.diffusion import (DPMPP2MSampler, DPMPP2SAncestralSampler, EDMDiscretization, EulerAncestralSampler,
                           EulerEDMSampler, HeunEDMSampler, LinearMultistepSampler)
from sgm.diffusion.analytic import GaussianMixture

STEPS = [4, 8, 16, 32, 64, 128]
DETERMINISTIC = [EulerEDMSampler, HeunEDMSampler, DPMPP2MSampler, LinearMultistepSampler]
ANCESTRAL = [EulerAncestralSampler, DPMPP2SAncestralSampler]
SCHEDULES = {
    "EDM paper (0.002..80, rho 7)": EDMDiscretization(0.002, 80.0, 7.0),
    "SDXL range (0.0292..14.6146, rho 3)": EDMDiscretization(0.0292, 14.6146, 3.0),  # conf/denoiser/discrete_eps.yaml
}


def pathwise_table(disc, gm, x0) -> list[str]:
    den = lambda x, s, c: gm(x, s, c)  # noqa: E731
    rows = ["| sampler | NFE/step | " + " | ".join(f"{n} steps" for n in STEPS) + " | observed order (32→64→128) |",
            "|---|---|" + "---|" * len(STEPS) + "---|"]
    for cls in DETERMINISTIC:
        ref = cls(disc, 1000)(den, x0, {})
        errs = [float((cls(disc, n)(den, x0, {}) - ref).pow(2).mean().sqrt()) for n in STEPS]
        orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 3, len(errs) - 1)]
        nfe = 2 if cls is HeunEDMSampler else 1
        rows.append(f"| {cls.__name__} | {nfe} | " + " | ".join(f"{e:.2e}" for e in errs)
                    + f" | {' / '.join(f'{o:.2f}' for o in orders)} |")
    return rows


def distribution_table(disc, gm, noise) -> list[str]:
    den = lambda x, s, c: gm(x, s, c)  # noqa: E731
    mean, var = gm.mean(), gm.variance()
    rows = ["| sampler | " + " | ".join(f"{n} steps" for n in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for cls in DETERMINISTIC + ANCESTRAL:
        cells = []
        for n in STEPS:
            out = cls(disc, n)(den, noise, {}, generator=torch.Generator().manual_seed(1))
            e_mean = float((out.mean(0) - mean).abs().max())
            e_var = float(((out.var(0) - var) / var).abs().max())
            cells.append(f"{e_mean:.3f} / {e_var:.3f}")
        rows.append(f"| {cls.__name__} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64), std=0.5)
    x0 = torch.randn(256, 4, generator=g, dtype=torch.float64)
    gm2 = GaussianMixture(torch.tensor([[-2.0, 0.5], [1.0, 1.5], [2.5, -1.0]]), std=0.4,
                          weights=torch.tensor([0.5, 0.3, 0.2]))
    noise = torch.randn(20000, 2, generator=g, dtype=torch.float64)

    lines = ["# Sampler convergence on an analytic target", "",
             "Reproduce: `python experiments/sampler_convergence.py --out docs/sampler_convergence.md` "
             "(CPU, float64, about a minute).", "",
             "Target: a Gaussian mixture with an exact denoiser (`sgm.diffusion.analytic`), so the "
             "numbers are the samplers' own discretization error.", ""]
    for title, disc in SCHEDULES.items():
        lines += [f"## {title}", "",
                  "RMS distance to the same sampler's 1000-step result (256 paths in 4-D, 3 components, std 0.5). "
                  "Euler is first order, Heun and DPM++ 2M second order, LMS (order 4) higher until the "
                  "fixed last step to sigma 0 dominates.", ""]
        lines += pathwise_table(disc, gm, x0)
        lines += ["", "Error of the sample law, 20,000 samples of a 2-D, 3-component mixture: "
                  "max |mean error| / max relative variance error (the sampling noise floor is about "
                  "0.01 / 0.02).", ""]
        lines += distribution_table(disc, gm2, noise)
        lines += ["", "On the SDXL range the mean error floors near 0.024: sampling starts at sigma_max = 14.6 "
                  "from noise of variance 1 + sigma_max^2 (the sgm convention, exact for unit-variance data), "
                  "while this mixture's first coordinate has variance 3.7.", ""]
    lines.append(f"_Generated in {time.perf_counter() - start:.0f} s with torch {torch.__version__}._")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
