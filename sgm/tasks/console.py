"""A quiet console: what a run does in one line, its progress bar, where its results went.

Hydra's job log (``run.log`` / ``train.log`` in the run folder) keeps every INFO record; the
console (conf/hydra/job_logging/sgm.yaml) shows warnings and errors, and the INFO records
marked ``extra=CONSOLE``. Lightning's own console handler (added when ``lightning`` is
imported, after Hydra has set up logging) is removed by :func:`quiet_libraries`, so its
"GPU available" lines and adverts reach run.log only; Python warnings of the libraries go
to run.log through the ``py.warnings`` logger.
"""

from __future__ import annotations

import logging
from typing import Any

#: ``log.info(..., extra=CONSOLE)``: a record the console shows
CONSOLE = {"console": True}
#: loggers whose warnings the console leaves to the job log
JOB_LOG_ONLY = ("py.warnings",)


class ConsoleFilter(logging.Filter):
    """Pass warnings and errors (except :data:`JOB_LOG_ONLY` loggers') and records marked :data:`CONSOLE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", False):
            return True
        return record.levelno >= logging.WARNING and not record.name.startswith(JOB_LOG_ONLY)


def quiet_libraries() -> None:
    """Send Lightning's console output and Python warnings to the job log; call once Lightning is imported."""
    logging.captureWarnings(True)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


def model_name(key: str = "model") -> str:
    """The config group option a run chose for ``key`` (``model=digits`` -> ``digits``), else ``key``."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.choices.get(key) or key)
    except ValueError:  # no Hydra job (a script calling the task directly)
        return key


def run_line(cfg: Any, plan: Any) -> str:
    """run.py's one console line: model, sampler and guider, steps, size, images, output folder."""
    guider = getattr(plan.sampler, "guider", None)
    scale = getattr(guider, "scale", None)
    guidance = f" {type(guider).__name__}" + (f" {scale:g}" if isinstance(scale, (int, float)) else "") if guider else ""
    return (f"sampling {len(plan.jobs)} image(s) of model={model_name()} with {type(plan.sampler).__name__}{guidance}, "
            f"{plan.steps} steps, {plan.W}x{plan.H}, seed {plan.seed} -> {plan.out_dir}")
