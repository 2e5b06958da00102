"""Shared test helpers: one way to compose ``conf/`` and one in-process runner for run.py / train.py.

* ``compose(config_name, overrides, hydra=False)``: the config Hydra composes, cached per session.
* ``run_task(config_name, overrides, out_dir)``: ``python run.py|train.py|eval.py OVERRIDES`` in-process,
  as ``@hydra.main`` runs a job: Hydra's runtime (output folder, RUN mode, job name/num/id),
  ``.hydra/config.yaml``, ``.hydra/overrides.yaml`` and the job's log, then
  ``sgm.tasks.sample.run`` / ``sgm.tasks.train.run``; the globals it touched are put back.
* ``hydra_runtime``: HydraConfig set for a test that builds parts of a run itself.

Plain functions, handed out by session fixtures of the same names (session fixtures such as a
trained base model use them too).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import random
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from sgm.tasks.shutdown import skip_collection_at_exit  # noqa: E402

skip_collection_at_exit()  # each test process ends ~1 s sooner, as run.py does

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.core.override_parser.types import Override  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict, read_write  # noqa: E402

# sgm.data.cache binds safetensors' readers when first imported: import it before any test patches
# them (the no_weights fixtures), or the patched reader would stay bound for the rest of the session
import sgm.data.cache  # noqa: E402,F401
from sgm.tasks import common  # noqa: E402

# tiny shapes: one thread is fastest, and immune to OpenMP oversubscription on a busy machine
THREADS = 1
torch.set_num_threads(THREADS)

ROOT = Path(__file__).resolve().parents[1]
# config name -> (Hydra job name = script stem, the task module behind the script)
TASKS = {"sample": ("run", "sgm.tasks.sample"), "train": ("train", "sgm.tasks.train"),
         "eval": ("eval", "sgm.tasks.evaluate")}
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job_logging format

_COMPOSED: dict[tuple[str, tuple[str, ...], bool], DictConfig] = {}


def _after_composition(override: Override) -> bool:
    """Whether Hydra applies ``override`` to the composed config (``seed=1``, ``data.root=X``,
    ``~weights.checkpoint``) rather than to the defaults list (``model=tiny``, ``~logger``,
    ``+loss=standard``, ``hydra/launcher=slurm``, ``hydra.run.dir=X``, sweeps)."""
    key = override.key_or_group
    return (override.package is None and not override.is_sweep_override() and not override.is_hydra_override()
            and "/" not in key and not (common.CONF_DIR / key).is_dir())


def compose(config_name: str = "sample", overrides: Sequence[str] = (), hydra: bool = False) -> DictConfig:
    """``sgm.tasks.common.compose(config_name, overrides, hydra)``, each call a fresh copy.

    Compositions are cached for the session by (config, defaults-list overrides); the value
    overrides are then applied as Hydra applies them after composing (its own parser and
    ``ConfigLoaderImpl._apply_overrides_to_config``), so ``seed=1`` and ``seed=2`` share one
    composition. ``test_config.py::test_cached_compose_is_hydras_compose`` holds the two equal."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    late = [o for o in parsed if _after_composition(o)]
    early = tuple(o.input_line for o in parsed if not _after_composition(o))
    key = (config_name, early, hydra)
    if key not in _COMPOSED:
        _COMPOSED[key] = common.compose(config_name, list(early), hydra=hydra)
    cfg = copy.deepcopy(_COMPOSED[key])
    if late:
        ConfigLoaderImpl._apply_overrides_to_config(late, cfg)
        if hydra:  # what Hydra records of the overrides, in their command-line order
            task = [o for o in parsed if not o.is_hydra_override()]
            job_config = cfg.hydra.job.config.override_dirname
            with read_write(cfg.hydra), open_dict(cfg.hydra):
                cfg.hydra.overrides.task = [o.input_line for o in task]
                cfg.hydra.job.override_dirname = get_overrides_dirname(
                    overrides=task, kv_sep=job_config.kv_sep, item_sep=job_config.item_sep,
                    exclude_keys=job_config.exclude_keys)
    return cfg


@contextmanager
def preserved_globals(log_file: Path | None = None) -> Iterator[None]:
    """Run a task (or a script's ``main``) in-process and put back what it may change globally:
    the Hydra runtime config, torch threads, the forced attention backend, the RNGs, the
    environment (Lightning's seed and DDP variables), the working directory and logging; W&B is torn
    down as at the end of a process (a run a failure left open finished, every run's files
    flushed to disk), and so is a DDP run's process group (Lightning leaves it initialized, and a later
    DDP run in this process would reuse it). With ``log_file``, INFO records go there as in a Hydra job."""
    from sgm.networks import attention

    hydra_cfg = HydraConfig.instance().cfg
    threads = torch.get_num_threads()
    attention_state = dict(attention._state)
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    environ = dict(os.environ)
    cwd = os.getcwd()
    root = logging.getLogger()
    root_level = root.level
    handler = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    os.chdir(ROOT)  # the scripts' relative defaults (wildcards/, outputs/) are the checkout's
    try:
        yield
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None:
            if wandb.run is not None:
                wandb.finish()
            wandb.teardown()  # as at the end of `python run.py`: every run's files written, the service stopped
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.chdir(cwd)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(root_level)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        attention._state.clear()
        attention._state.update(attention_state)
        torch.set_num_threads(threads)
        HydraConfig.instance().cfg = hydra_cfg


@contextmanager
def _preserved_logging() -> Iterator[None]:
    """Every logger's handlers, level and ``disabled`` flag as they were (Hydra's job logging
    reconfigures them with ``logging.config.dictConfig``)."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger()] + [lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved = {lg: (list(lg.handlers), lg.level, lg.disabled, lg.propagate) for lg in loggers}
    try:
        yield
    finally:
        for lg in [logging.getLogger()] + [x for x in manager.loggerDict.values() if isinstance(x, logging.Logger)]:
            handlers, level, disabled, propagate = saved.get(lg, ([], logging.NOTSET, False, True))
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.disabled, lg.propagate = disabled, propagate


def run_script(script: str, args: Sequence[str]) -> int:
    """``python SCRIPT ARGS`` (run.py, train.py, eval.py) in this process: the script's ``__main__``
    block as it is (its command-line checks, ``@hydra.main`` parsing ``-m``, the sweeper and the
    launcher), without a new interpreter's imports. Returns the exit status; Hydra's global
    state, logging and the other globals it touched are put back."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    argv = sys.argv
    sys.argv = [script, *args]
    code = 0
    try:
        with preserved_globals(), _preserved_logging():
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as exc:  # as the interpreter ends: a non-int code is printed, exit status 1
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return code


def hydra_job_config(config_name: str, overrides: Sequence[str], out_dir: Path | str) -> DictConfig:
    """The composed config with the ``hydra`` node as ``@hydra.main`` has it in a RUN job into ``out_dir``
    (``hydra.run.dir=OUT_DIR``)."""
    job_name = TASKS[config_name][0]
    cfg = compose(config_name, overrides, hydra=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
        cfg.hydra.run.dir = cfg.hydra.runtime.output_dir = str(Path(out_dir).resolve())
        cfg.hydra.job.name = job_name
        cfg.hydra.job.num = 0
        cfg.hydra.job.id = f"{job_name}_0"
    return cfg


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The task's config: a copy without the ``hydra`` node (what the task function receives)."""
    task_cfg = copy.deepcopy(cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def run_task(config_name: str, overrides: Sequence[str], out_dir: Path | str,
             files: bool = True) -> tuple[dict[str, Any], DictConfig]:
    """``python run.py|train.py|eval.py OVERRIDES hydra.run.dir=OUT_DIR`` in-process (config ``sample``,
    ``train`` or ``eval``): returns the task's metrics and the job config it ran with (no ``hydra`` node); errors
    raise. ``files``: write ``.hydra/config.yaml``, ``.hydra/overrides.yaml`` and the job's INFO log
    ``OUT_DIR/run.log`` (``train.log``) as Hydra does; without, the task alone writes into OUT_DIR."""
    job_name, module = TASKS[config_name]
    out_dir = Path(out_dir).resolve()
    cfg = hydra_job_config(config_name, overrides, out_dir)
    task_cfg = without_hydra(cfg)
    if files:
        (out_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(task_cfg, out_dir / ".hydra" / "config.yaml")
        OmegaConf.save(cfg.hydra.overrides.task, out_dir / ".hydra" / "overrides.yaml")
    with preserved_globals(out_dir / f"{job_name}.log" if files else None):
        HydraConfig.instance().set_config(cfg)
        metrics = importlib.import_module(module).run(task_cfg)
    return metrics, task_cfg


@pytest.fixture(name="compose", scope="session")
def compose_fixture() -> Callable[..., DictConfig]:
    """``compose(config_name="sample", overrides=(), hydra=False)``: a fresh copy of a composed config."""
    return compose


@pytest.fixture(name="run_task", scope="session")
def run_task_fixture() -> Callable[..., tuple[dict[str, Any], DictConfig]]:
    """``run_task(config_name, overrides, out_dir) -> (metrics, cfg)``: a run.py / train.py job in-process."""
    return run_task


@pytest.fixture
def hydra_runtime(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """``hydra_runtime(config_name, overrides, out_dir=tmp_path)``: the task config of a RUN job into
    ``out_dir``, with HydraConfig set as the job has it (the callbacks' paths interpolate it) until
    the test ends; then HydraConfig and the other globals of :func:`preserved_globals` are restored."""
    with preserved_globals():

        def set_for(config_name: str, overrides: Sequence[str] = (), out_dir: Path | str = tmp_path) -> DictConfig:
            cfg = hydra_job_config(config_name, overrides, out_dir)
            HydraConfig.instance().set_config(cfg)
            return without_hydra(cfg)

        yield set_for


@pytest.fixture(scope="session")
def ksampling():
    """k-diffusion's sampling.py, the independent oracle, without its heavy package __init__."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (make install-test installs it)")
    if "k_diffusion" not in sys.modules:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
    import k_diffusion.sampling as ks

    return ks


# The longest test files first (seconds per file in `make test`, 2 cores, quiet machine, torch's inductor
# cache empty as on a fresh machine, 2026-12-02: compile ~95, train ~56, config ~50, shipped_model ~37,
# run ~28, conventions ~27, engine_cache ~20, cold_start ~20, then 8-14 s each), so that `make test`'s
# processes start on them and end on short files instead of one process finishing a long file alone (the
# Makefile keeps this order with xdist's --no-loadscope-reorder). Collection order only: every test runs.
LONG_FILES_FIRST = ("test_compile.py", "test_train.py", "test_config.py", "test_shipped_model.py", "test_run.py",
                    "test_conventions.py", "test_engine_cache.py", "test_cold_start.py", "test_toolbox.py",
                    "test_train_reliability.py", "test_eval_task.py", "test_schedules.py", "test_guiders_apg_zero_sag.py",
                    "test_console.py", "test_autoguidance.py", "test_eval_metrics.py", "test_mnist.py",
                    "test_optuna_search.py", "test_lora.py", "test_leaderboard.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
