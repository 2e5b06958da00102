"""The numbers of a sampling run, checked before torch is imported.

run.py calls :func:`check_numbers` before it imports the sample task (torch and the model code,
over a second on these machines), so a mistyped number stops in under half a second;
:func:`sgm.tasks.sample.validate` starts with the same call and goes on with the checks that
need the model code (prompts, files, samplers, metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..diffusion._checks import check_finite, check_int
from ..diffusion.step_index import img2img_start, split_index
from ..networks.sizes import check_size
from .threads import check_cpu_threads

MAX_SEED = 2**63 - 1  # torch generators take 64 bits; image k's noise uses seed + k (+ 1, + 2)
MAX_STEPS = 10_000  # ComfyUI's KSampler bound; a longer schedule is a typo (1e9 steps: a 4 GB schedule)


@dataclass(frozen=True)
class RunNumbers:
    """The checked numbers of a run (see :func:`check_numbers`)."""

    seed: int
    steps: int
    batch_size: int
    per_prompt: int
    H: int
    W: int
    strength: float
    img2img_schedule: str
    refiner_switch: float
    aesthetic_scores: tuple[float, float]


def check_seed(value: Any) -> int:
    """``seed`` as an int in [0, 2**63 - 1]."""
    seed = check_int("seed", value, minimum=0)
    if seed > MAX_SEED:
        raise ValueError(f"seed must be at most 2**63 - 1, got {value!r}")
    return seed


def check_numbers(cfg: Any) -> RunNumbers:
    """``seed``, ``steps``, ``batch_size``, ``num_images_per_prompt``, ``grid_columns``, ``H``/``W``
    (multiples the model's VAE and UNet can take), ``strength`` with ``img2img_schedule`` (and an
    init image for strength < 1), ``refiner_switch`` (its range with a refiner, whose size is
    checked too), the aesthetic scores and ``cpu_threads``; each error names its parameter."""
    seed = check_seed(cfg.seed)
    steps = check_int("steps", cfg.steps)
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be at most {MAX_STEPS} (ComfyUI's bound), got {steps}; for a reference "
                         "solution with more steps, give sampler.sample a schedule in code")
    check_cpu_threads(cfg.get("cpu_threads"))
    batch_size = check_int("batch_size", cfg.batch_size)
    per_prompt = check_int("num_images_per_prompt", cfg.num_images_per_prompt)
    check_int("grid_columns", cfg.grid_columns)
    H, W = check_size(cfg.model, cfg.H, cfg.W)
    strength = check_finite("strength", cfg.strength)
    schedule = str(cfg.img2img_schedule)
    start = img2img_start(steps, strength, schedule)
    if strength < 1 and not cfg.get("init_image"):
        raise ValueError(f"strength={strength:g} needs init_image=PATH: strength is the share of the schedule img2img "
                         "runs from that image; without one the run is text-to-image (strength=1)")
    refiner_switch = check_finite("refiner_switch", cfg.refiner_switch)
    aesthetic_scores = (check_finite("aesthetic_score", cfg.aesthetic_score),
                        check_finite("negative_aesthetic_score", cfg.negative_aesthetic_score))
    if cfg.get("refiner") is not None:
        end = split_index(steps, refiner_switch)
        if not start < end < steps:
            after = f" (img2img starts at step {start})" if start else ""
            raise ValueError(f"refiner_switch={refiner_switch:g} hands over at step {end} of {steps}{after}, so the "
                             f"{'refiner' if end >= steps else 'base'} would run no step: choose a refiner_switch "
                             "that leaves both at least one step")
        check_size(cfg.refiner, H, W)
    return RunNumbers(seed, steps, batch_size, per_prompt, H, W, strength, schedule, refiner_switch, aesthetic_scores)
