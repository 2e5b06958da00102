"""A W&B logger that never blocks or fails a run: offline without credentials or without a
reachable server (a cluster node with a ``~/.netrc`` but no internet), `wandb sync` later."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

#: what WANDB_MODE / logger.wandb.mode may be (wandb's own modes, plus our ``auto``)
MODES = ("auto", "online", "offline", "disabled", "dryrun", "run", "shared")
PROBE_SECONDS = 3.0

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(mode: str = "auto", key: str = "logger.wandb.mode") -> str:
    """The mode a run asks for: ``WANDB_MODE`` wins over ``mode`` (config key ``key``); a ValueError names a bad one."""
    env = os.environ.get("WANDB_MODE")
    chosen, source = (env, "WANDB_MODE") if env else (mode, key)
    if chosen not in MODES:
        raise ValueError(f"{source}={chosen!r} is not a W&B mode: use one of {', '.join(MODES)} "
                         "(or ~logger for no W&B run)")
    if chosen == "auto":
        return "online" if has_wandb_credentials() else "offline"
    return {"dryrun": "offline", "run": "online"}.get(chosen, chosen)


def server_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the W&B server (``WANDB_BASE_URL``) opens within ``timeout``."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def make_wandb_logger(project: str = "sgm", save_dir: str = ".", mode: str = "auto", name: str | None = None,
                      group: str | None = None, job_type: str | None = None, tags: list[str] | None = None,
                      run_config: dict | None = None, id: str | None = None, resume: str | None = None) -> Any:
    """A Lightning ``WandbLogger``; ``mode`` auto = online with credentials, else offline.
    ``id`` / ``resume`` (e.g. ``"allow"``): continue the W&B run of that id (see :func:`folder_run_id`).

    Returns None (with a warning) if wandb cannot start: logging must not cost the run.
    """
    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    if mode in ("online", "shared") and not server_reachable():
        log.warning("the W&B server (%s) is not reachable: logging offline to %s; `wandb sync` it later",
                    os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai", save_dir)
        mode = "offline"
    try:
        from lightning.pytorch.loggers import WandbLogger

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        import wandb

        logger = WandbLogger(project=project, save_dir=save_dir, offline=(mode == "offline"), name=name, group=group,
                             job_type=job_type, tags=tags, config=run_config, id=id,
                             **({"resume": resume} if resume else {}),
                             settings=wandb.Settings(init_timeout=30, silent=True))
        # Lightning passes anonymous=None, which W&B (>= 0.19) warns about at init: leave the key out
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
        return logger
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B logger unavailable (%s); continuing without it", exc)
        return None


def sweep_run_name(overrides: Sequence[str], fallback: str) -> str:
    """A multirun job's W&B run name: its overrides as typed (``hydra.overrides.task``), sorted and
    joined with ``,``, e.g. ``guider.scale=3,sampler=heun``; ``fallback`` (the sweep and job number)
    for a job without overrides."""
    return ",".join(sorted(str(o) for o in overrides)) or fallback


RUN_ID_FILE = "wandb_run_id.txt"


def folder_run_id(folder: str | Path) -> str:
    """The W&B run id of a run folder: the one in its ``wandb_run_id.txt``, else a new one written
    there, so that a resumed run (same folder) continues the same W&B run."""
    path = Path(folder) / RUN_ID_FILE
    try:
        run_id = path.read_text().strip()
    except OSError:
        run_id = ""
    if not run_id:
        import secrets

        run_id = secrets.token_hex(4)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def finish_wandb(trainer: Any) -> None:
    """Close the job's W&B run (rank 0), so that each job of a multirun gets its own run."""
    if not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                lg.experiment.finish()
            except Exception as exc:  # noqa: BLE001 - W&B must never fail the run
                log.warning("could not close the W&B run: %s", exc)
