"""Run folders are never reused destructively.

* ``${sgm.run_dir:ROOT}`` (``hydra.run.dir`` of run.py / train.py) names a fresh folder
  ``ROOT/<date>/<time>``, with a ``_2``, ``_3`` ... suffix when that one exists (two runs started in
  the same second); ``${sgm.run_dir:ROOT,RESUME}`` with ``resume=auto`` names the newest run
  folder under ROOT that holds ``checkpoints/last.ckpt`` and with ``resume=PATH`` the run folder of
  that checkpoint, so a resumed run continues its own folder.
* :class:`RunFolderGuard` (a Hydra callback) stops a run, before Hydra writes anything, when its
  folder already holds a run and it is not a ``resume=`` of it, with the folder and the ways out
  in the message; a sweep into an occupied sweep folder likewise.

Only the standard library is imported here: the resolver is registered on ``import sgm``.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any


class RunFolderOccupied(SystemExit):
    """A run was pointed at a folder that holds another run. A ``SystemExit``: Hydra turns a
    callback's ordinary exception into a warning, and this must stop the run (exit status 1,
    the message on stderr)."""


def _fresh(root: Path) -> Path:
    now = datetime.datetime.now()
    base = root / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    candidate, k = base, 1
    while candidate.exists():
        k += 1
        candidate = base.with_name(f"{base.name}_{k}")
    return candidate


def resumed_folder(root: Path, resume: Any) -> Path | None:
    """The run folder a ``resume`` value continues, or None (a fresh folder)."""
    if resume in (None, "", "null", "None"):
        return None
    if str(resume) == "auto":
        runs = sorted(root.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        return runs[-1].parent.parent if runs else None
    ckpt = Path(str(resume))
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def run_dir(root: str, resume: Any = None) -> str:
    """The ``hydra.run.dir`` of a run (the resolver ``${sgm.run_dir:ROOT[,RESUME]}``)."""
    return str(resumed_folder(Path(root), resume) or _fresh(Path(root)))


def _holds_a_run(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir())


def continues(folder: Path, resume: Any) -> bool:
    """Whether ``resume`` continues the run in ``folder`` (its last.ckpt, or a checkpoint inside it)."""
    if resume in (None, "", "null", "None"):
        return False
    if str(resume) == "auto":
        return (folder / "checkpoints" / "last.ckpt").is_file()
    return Path(str(resume)).resolve().is_relative_to(folder.resolve())


def check_run_folder(folder: Path, resume: Any = None, what: str = "run") -> None:
    """Stop when ``folder`` holds something and the run does not continue it with ``resume=``."""
    entries = _holds_a_run(folder)
    if not entries or (what == "train" and continues(folder, resume)):
        return
    shown = ", ".join(entries[:6]) + (" ..." if len(entries) > 6 else "")
    node = "sweep" if what == "sweep" else "run"
    continue_hint = "continue it with resume=auto (or resume=PATH/checkpoints/last.ckpt), or " \
        if what == "train" else ""
    raise RunFolderOccupied(
        f"the {node} folder {str(folder)!r} already holds a run ({shown}); nothing was written. To keep "
        f"it, {continue_hint}choose a new folder: hydra.{node}.dir=NEW_FOLDER, or leave it unset for a fresh one.")


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    _Callback = object  # type: ignore[misc,assignment]


class RunFolderGuard(_Callback):  # type: ignore[misc]
    """Hydra callback: no run or sweep writes into a folder that holds another run."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:
            return  # a DDP rank Lightning relaunched into rank 0's folder
        kind = "train" if "resume" in config else "run"
        check_run_folder(Path(str(config.hydra.run.dir)), config.get("resume"), kind)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        check_run_folder(Path(str(config.hydra.sweep.dir)), None, "sweep")
