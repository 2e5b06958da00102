"""What the project knows about the numbers in a run's ``metrics.json``: which way is better,
how many images each figure rests on, and which numbers describe the run rather than judge it.

One table, read by the sweep summary (which setting won) and by the hparams search (the sign of
a penalty, the check of ``hydra.sweeper.direction`` against the metric it optimises).
"""

from __future__ import annotations

LOWER, HIGHER = "lower", "higher"

NFE = "nfe"  # the summary's cost column: network evaluations per batch (= per image)
NFE_SOURCE = "network_evaluations_per_batch"  # its name in metrics.json

#: which value of a metric is better; a metric missing here is reported but never ranked
DIRECTIONS: dict[str, str] = {
    "frechet_distance": LOWER,   # Fréchet distance to the held-out digits (sgm.metrics.digits)
    "accuracy": HIGHER,          # the digit classifier against the prompted digit
    "seconds": LOWER,
    "seconds_per_image": LOWER,
    NFE: LOWER,
    NFE_SOURCE: LOWER,
    "network_evaluations": LOWER,
}

#: the metrics.json count each figure rests on (a Fréchet distance is over all of a run's images,
#: the accuracy over those whose prompt names one digit)
COUNTS: dict[str, str] = {"frechet_distance": "images", "accuracy": "labelled_images"}

#: numbers that describe a run (its size, settings, counts) rather than judge it
DESCRIPTIVE = frozenset({"images", "labelled_images", "steps", "seed", "H", "W"})

#: what the image writer puts into every run's metrics.json (sgm.tasks.writer.ImageWriter), with
#: the run's own settings (sgm.tasks.sample.run's ``extra_metrics``); the image metrics add theirs
RUN_METRICS = ("images", "seconds", "seconds_per_image", "network_evaluations", NFE_SOURCE,
               "steps", "sampler", "seed", "H", "W")


def metrics_json_name(name: str) -> str:
    """The metrics.json key of ``name``: ``nfe`` is ``network_evaluations_per_batch``."""
    return NFE_SOURCE if name == NFE else name


def direction(metric: str) -> str | None:
    """``lower`` or ``higher`` (which value is better), None when unknown."""
    return DIRECTIONS.get(metric)
