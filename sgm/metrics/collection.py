"""Several metrics as one: what ``instantiate(cfg.metrics)`` builds.

Every ``conf/metrics`` file says ``_target_: sgm.metrics.MetricSet`` and puts its metric under
its own key (``digits:``, ``fid:``, ...), so ``metrics=[clip_score,fid]`` merges into one node
whose entries are the metrics. The FID family shares the feature space the files put under
``features:`` (their ``features: ${..features}``). A run's images go through each metric in
turn; their numbers are merged, and two metrics giving the same key is an error.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

Metric = Callable[[torch.Tensor, list[str]], dict[str, float]]


class MetricSet:
    """``MetricSet(features=None, **metrics)``: call each metric with ``(images, prompts)`` and
    merge their dicts. ``features`` is the shared feature space (built once, not a metric)."""

    def __init__(self, features: Any = None, **metrics: Metric):
        self.features = features
        for name, metric in metrics.items():
            if not callable(metric):
                raise TypeError(f"metrics.{name} is not a metric (a callable of images and prompts), got "
                                f"{type(metric).__name__}: does its file set _target_?")
        self.metrics = dict(metrics)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        source: dict[str, str] = {}
        for name, metric in self.metrics.items():
            for key, value in metric(images, prompts).items():
                if key in out:
                    raise ValueError(f"metrics.{name} and metrics.{source[key]} both report {key!r}: give one of "
                                     f"them another key (metrics.{name}.key=...)")
                out[key], source[key] = value, name
        return out


def metrics_needing_prompts(node: DictConfig | None) -> list[str]:
    """The entries of a ``metrics`` config node whose class judges prompts (``needs_prompts``), read
    from their ``_target_`` classes without building anything."""
    from hydra.utils import get_class

    if node is None:
        return []
    return [name for name, child in node.items()
            if isinstance(child, DictConfig) and "_target_" in child
            and getattr(get_class(child._target_), "needs_prompts", False)]
