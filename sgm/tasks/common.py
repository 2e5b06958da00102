"""What run.py and train.py share: the config, the engine, runtime switches, run folder, logger, callbacks."""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import sgm

from ..checkpoint import CheckpointMismatchError, compare_keys, format_mismatch, load_checkpoint, parse_dtype
from ..data.paths import existing_file
from ..networks.sizes import check_size  # noqa: F401 - the tasks' import of it
from .extras import check_tags
from .threads import check_cpu_threads
from .wandb_logger import sweep_run_name

if TYPE_CHECKING:  # the engine is a LightningModule: imported where one is built, not by the checks
    from ..engine import DiffusionEngine

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's config tree (run.py's config_path)


def compose(config_name: str = "sample", overrides: Sequence[str] = (), hydra: bool = False) -> DictConfig:
    """``conf/<config_name>.yaml`` with command-line style ``overrides``, as run.py / train.py compose it.

    For scripts and tests, outside a running Hydra app; sgm's resolvers are registered first.
    ``hydra=True`` keeps the ``hydra`` node (to set ``HydraConfig`` for an in-process run).
    """
    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"no config tree at {CONF_DIR}: compose() needs the repository checkout")
    sgm.register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)


def check_weights(weights: Any, what: str = "model") -> Path | None:
    """The checkpoint path of a ``weights`` node ({checkpoint, dtype, random}), checked before anything is built."""
    weights = weights or {}
    checkpoint = weights.get("checkpoint")
    prefix = "weights" if what == "model" else f"{what}_weights"
    if not checkpoint:
        if not weights.get("random"):
            raise ValueError(f"the {what} config expects a checkpoint: set {prefix}.checkpoint=PATH "
                             f"(or {prefix}.random=true for seeded random weights)")
        return None
    path = existing_file(checkpoint, f"{prefix}.checkpoint", "checkpoint file")
    parse_dtype(weights.get("dtype"))
    return path


def build_engine(model: Any, weights: Any = None, seed: int = 0, what: str = "model", **parts: Any) -> DiffusionEngine:
    """Instantiate a ``model`` node (plus engine ``parts`` such as ``loss_fn``); with
    ``weights.checkpoint`` build on the meta device and load the file tensor by tensor.

    ``weights.dtype`` (float32 / float16 / bfloat16) casts the weights; a VAE that is not
    fp16-safe stays float32 when the rest is float16.
    """
    path = check_weights(weights, what)
    dtype = parse_dtype((weights or {}).get("dtype"))
    if path is not None:
        with torch.device("meta"):
            engine = instantiate(model, **parts)
        keep = ("first_stage_model.",) if dtype == torch.float16 and not engine.first_stage_fp16_safe else ()
        load_checkpoint(engine, path, dtype=dtype, keep_float32=keep)
        engine.to("cpu")  # no copy (the weights are on the CPU now); resets Lightning's device record
    else:
        torch.manual_seed(seed)
        engine = instantiate(model, **parts)
        if dtype is not None:  # weights only: the denoiser's sigma table stays float32
            vae_dtype = torch.float32 if dtype == torch.float16 and not engine.first_stage_fp16_safe else dtype
            engine.model.to(dtype)
            engine.conditioner.to(dtype)
            engine.first_stage_model.to(vae_dtype)
    return engine.eval()


# -- autoguidance's weak model: a second engine that shares the main model's conditioning ---------------

WEAK_KEYS = "model.diffusion_model."  # a weak checkpoint holds the weak UNet alone, in the original key layout
WEAK_FIX = ("the weak UNet's file (experiments/shipped_model/train_weak.sh writes sgm/assets/digits_weak.safetensors), "
            "or weak_weights.random=true for seeded random weights, or guider.skip_layers=[mid] for diffusers' "
            "layer-skip form without a second model")
# the weak UNet reads the main model's conditioning and latents: these must agree
WEAK_SHARED_SIZES = ("context_dim", "adm_in_channels", "in_channels", "out_channels")


def _weak_network(node: Any, meta: bool) -> torch.nn.Module:
    if node is None or node.get("network") is None:
        raise ValueError("weak_model.network is not set: the weak model needs a UNet config "
                         "(conf/guider/autoguidance.yaml has the shipped digit model's)")
    with torch.device("meta") if meta else nullcontext():
        return instantiate(node.network)


def check_weak_model(node: Any, weights: Any, model: Any) -> Path | None:
    """Check autoguidance's ``weak_model`` / ``weak_weights`` against the main ``model`` without
    reading a weight: its UNet's conditioning sizes, the checkpoint path, and (safetensors) the
    file's header keys and shapes against the weak UNet built on the meta device."""
    network = node.get("network") if node is not None else None
    main = model.get("network") if model is not None else None
    for key in WEAK_SHARED_SIZES:
        a, b = (n.get(key) if n is not None else None for n in (network, main))
        if a is not None and b is not None and a != b:
            raise ValueError(f"weak_model.network.{key} is {a} but model.network.{key} is {b}: the weak UNet is "
                             f"evaluated on the main model's latents and conditioning, so they must agree")
    try:
        path = check_weights(weights, "weak")
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise type(exc)(f"{exc}: give {WEAK_FIX}") from None
    if path is None or path.suffix != ".safetensors":
        return path  # torch.save files are checked when loaded
    expected = {WEAK_KEYS + k: tuple(v.shape) for k, v in _weak_network(node, meta=True).state_dict().items()}
    from ..lora.files import read_safetensors_header

    header, _ = read_safetensors_header(path, "weak_weights.checkpoint")  # header only, errors name the key
    report = compare_keys(expected, {k: tuple(v.get("shape", ())) for k, v in header.items()})
    if any(report.values()):
        raise CheckpointMismatchError(
            format_mismatch(path, report).rsplit("\n", 1)[0] + f"\nweak_weights.checkpoint must hold the weak UNet "
            f"alone ({WEAK_KEYS}*) for weak_model.network: {WEAK_FIX}")
    return path


def build_weak_engine(node: Any, weights: Any, main: DiffusionEngine, seed: int = 0) -> DiffusionEngine:
    """Autoguidance's weak model: an engine with its own UNet and denoiser (``weak_model``) and the
    main engine's conditioner and first stage (shared, not copied). ``weak_weights.checkpoint``
    holds the UNet alone (``model.diffusion_model.*``); without one (``weak_weights.random``) the
    UNet is seeded by ``seed``."""
    from ..engine import DiffusionEngine

    path = check_weights(weights, "weak")
    dtype = parse_dtype((weights or {}).get("dtype"))
    if path is None:
        torch.manual_seed(seed)
    network = _weak_network(node, meta=path is not None)
    engine = DiffusionEngine(network=network, denoiser=instantiate(node.denoiser), conditioner=main.conditioner,
                             first_stage=main.first_stage_model, scale_factor=main.scale_factor,
                             first_stage_fp16_safe=main.first_stage_fp16_safe, uc_zero_keys=main.uc_zero_keys)
    if path is not None:
        unet_only = torch.nn.Module()
        unet_only.model = engine.model  # state dict keys model.diffusion_model.*, as in the file
        load_checkpoint(unet_only, path, dtype=dtype)
        engine.to("cpu")  # no copy (all of it is on the CPU now); resets Lightning's device record
    elif dtype is not None:
        engine.model.to(dtype)
    return engine.eval()


def apply_runtime_settings(cfg: DictConfig) -> None:
    """Global switches: the attention backend and the number of CPU threads."""
    threads = check_cpu_threads(cfg.get("cpu_threads"))
    if threads:
        torch.set_num_threads(threads)
    if cfg.get("attention"):
        from ..networks.attention import set_attention_backend

        set_attention_backend(str(cfg.attention), force=True)


def provenance(cfg: DictConfig) -> dict[str, str]:
    """What produced a run's outputs: versions and the resolved config (PNG text chunks, metadata)."""
    import lightning

    return {"sgm": sgm.__version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": platform.python_version(), "config": OmegaConf.to_yaml(cfg, resolve=True)}


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def logger_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """The ``logger`` group's nodes by key (``logger=[wandb,csv]``: both); none with ``~logger``."""
    node = cfg.get("logger")
    if node is None:
        return {}
    bad = [str(k) for k, v in node.items() if v is not None and not (isinstance(v, DictConfig) and "_target_" in v)] \
        if isinstance(node, DictConfig) else ["logger"]
    if bad:
        raise ValueError(f"logger holds one node with a _target_ per logger (logger=wandb, logger=[csv,tensorboard]; "
                         f"settings as logger.wandb.mode=offline), but {', '.join(bad)} is not one")
    return {str(k): v for k, v in node.items() if v is not None}


def check_logger(cfg: DictConfig) -> None:
    """Fail before any model is built on a bad logger setting: the W&B mode (``logger.wandb.mode`` or
    ``WANDB_MODE``), a TensorBoard logger without its package."""
    for key, node in logger_nodes(cfg).items():
        target = str(node._target_)
        if target.endswith("make_wandb_logger") and "mode" in node:
            from .wandb_logger import wandb_mode

            wandb_mode(str(node.mode), f"logger.{key}.mode")
        elif target.endswith("make_tensorboard_logger"):
            from .loggers import check_tensorboard

            check_tensorboard(f"logger.{key}")


def _accepted(factory: Any, values: dict[str, Any], node: DictConfig) -> dict[str, Any]:
    """The run ``values`` a logger factory takes (those its signature names, all with ``**kwargs``),
    except what its config node sets itself."""
    import inspect

    params = inspect.signature(factory.func).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in values.items() if (takes_all or k in params) and k not in node}


def make_logger(cfg: DictConfig, out_dir: Path, **extra: Any) -> list:
    """The run's loggers, one per ``logger`` node (none with ``~logger``). Each factory gets the run's
    values its signature names: ``save_dir`` (the run folder), ``name`` and ``group`` (a multirun's
    jobs are grouped by the sweep), ``tags``, ``run_config`` (the resolved config) and ``extra``.
    A factory that returns None (W&B could not start) adds no logger."""
    nodes = logger_nodes(cfg)
    if not nodes:
        return []
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).name if multirun else None
    name = sweep_run_name(hc.overrides.task, f"{group}/{hc.job.num}") if multirun else out_dir.name
    values = {"save_dir": str(out_dir), "name": name, "group": group, "tags": check_tags(cfg.get("tags")),
              "run_config": OmegaConf.to_container(cfg, resolve=True), **extra}
    loggers = []
    for node in nodes.values():
        factory = instantiate(node, _partial_=True)  # partial: the run config must not be instantiated
        made = factory(**_accepted(factory, values, node))
        if made is not None:
            loggers.append(made)
    return loggers


def instantiate_callbacks(nodes: Any, **runtime: Any) -> list:
    """The ``callbacks`` group's nodes as Lightning callbacks. A value written ``???`` in a node is
    the run's own: it is taken from ``runtime`` by its key (an error names a missing one)."""
    callbacks = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        wanted = {k for k in node if OmegaConf.is_missing(node, k)}
        unknown = wanted - set(runtime)
        if unknown:
            raise ValueError(f"callbacks.{name} needs {sorted(unknown)}, which this task does not provide")
        callbacks.append(instantiate(node, **{k: runtime[k] for k in wanted}))
    return callbacks
