"""The code behind run.py: :func:`validate` the config, build the engine (and refiner), predict over the prompts.

:func:`validate` makes every check that needs no model weights (parameters, prompts,
wildcards, the init image, LoRA file headers, checkpoint paths) before :func:`run` builds
anything: a bad input fails before the first weight is read, with a message that names it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from ..data.prompts import PromptJob, make_jobs, read_prompt_file
from ..data.reading import ImageReadError, image_file, image_to_tensor, read_image
from ..diffusion._checks import check_finite
from ..inpaint.setup import check_checkpoint_channels, load_inpainting
from ..networks.autoencoder import check_tiling_config
from ..networks.compile import CompileSettings, compile_settings
from ..networks.onednn import check_cpu_onednn, set_cpu_onednn
from .a1111 import run_fields
from .common import (apply_runtime_settings, check_logger, check_size, check_weak_model, check_weights,
                     instantiate_callbacks, make_logger, provenance, run_dir)
from .console import CONSOLE, quiet_libraries, run_line
from .engine_cache import check_reuse_engine, model_engine, refiner_engine, weak_engine
from .extras import check_conventions, record_config
from .from_image import rerun_config, select_images
from .hires import check_hires
from .sample_numbers import check_numbers
from .search import refuse_sample_run, search_spec
from .shutdown import sigterm_stops
from .threads import choose_threads
from .wandb_logger import finish_wandb

log = logging.getLogger(__name__)

def load_prompts(cfg: DictConfig) -> list[str]:
    """The run's prompts: ``prompt_file`` (one per line), else ``prompt``, else ``prompts``."""
    if cfg.get("prompt_file"):
        return read_prompt_file(cfg.prompt_file)
    if cfg.get("prompt") is not None:
        return [str(cfg.prompt)]
    prompts = cfg.get("prompts")
    if not prompts:
        raise ValueError("no prompts: set prompt=..., prompts=[...] or prompt_file=PATH")
    return [str(p) for p in prompts]


def load_init_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """``init_image`` as a [1, 3, H, W] tensor in [-1, 1]: the project's image reader
    (:func:`sgm.data.reading.read_image`: 16-bit, float, palette, alpha, CMYK, EXIF orientation),
    resized to the output size. An image over Pillow's decompression-bomb limit is refused."""
    path = image_file(path, "init_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = read_image(path, at_least=(height, width))
    except ImageReadError as exc:
        if isinstance(exc.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise ValueError(f"init_image {str(path)!r} is too large to decode safely ({exc.__cause__}): "
                             f"downscale it first (it is resized to {width}x{height} anyway)") from exc
        raise ValueError(f"init_image {str(path)!r} is not a readable image ({exc.reason})") from exc
    return image_to_tensor(im.resize((width, height), Image.Resampling.LANCZOS))[None]


def _as_list(value: Any) -> list[Any]:
    """A list-valued parameter given as a list, a single value, or null/empty."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def check_lora(node: Any) -> tuple[list[str], list[float]]:
    """``lora.files`` and ``lora.strengths`` (one finite number per file, or none: 1.0 each); every
    file's header is checked (:func:`sgm.lora.files.check_lora_file`), no weight is read."""
    from ..lora.files import check_lora_file

    node = node or {}
    files = [str(f) for f in _as_list(node.get("files"))]
    strengths = _as_list(node.get("strengths"))
    if strengths and len(strengths) != len(files):
        raise ValueError(f"lora.strengths has {len(strengths)} value(s) for {len(files)} lora.files: give one strength "
                         "per file, in the same order, or none (1.0 each)")
    strengths = [check_finite(f"lora.strengths[{i}]", s) for i, s in enumerate(strengths)] or [1.0] * len(files)
    for i, f in enumerate(files):
        log.info("lora.files[%d] %s: %s", i, f, check_lora_file(f, what=f"lora.files[{i}]"))
    return files, strengths


@dataclass
class SamplePlan:
    """What :func:`validate` checked and :func:`run` uses: all of it known before any weight is read."""

    jobs: list[PromptJob]
    H: int
    W: int
    seed: int
    steps: int
    batch_size: int
    strength: float
    img2img_schedule: str
    refiner_switch: float
    aesthetic_scores: tuple[float, float]
    sampler: Any
    discretization: Any
    lora_files: list[str]
    lora_strengths: list[float]
    init_image: torch.Tensor | None
    patches: Any
    image_metrics: Any
    out_dir: Path
    weak_model: bool = False  # the guider wants a second engine (autoguidance): run() builds it
    tags: tuple[str, ...] = ()  # the run's tags (metrics.json, the loggers)
    inpaint: Any = None  # sgm.inpaint.Inpainting (mask= / outpaint=)
    hires: Any = None  # sgm.tasks.hires.HiresFix (hires=latent|pixel)
    prompt_options: Any = None  # prompt_syntax, embeddings, clip_skip (sgm.conditioning.prompt_schedule)
    compile: CompileSettings = CompileSettings()  # the `compile` node, checked
    search: Any = None  # optimized_metric / constraints (sgm.tasks.search.SearchSpec), None when unset
    reuse_engine: bool = False  # keep the built engines for the next job of this process (sgm.tasks.engine_cache)


def validate(cfg: DictConfig) -> SamplePlan:
    """Every check of a sampling run that needs no model weights, each error naming the parameter or file.

    Numbers first (:func:`~sgm.tasks.sample_numbers.check_numbers`: ``seed``, ``steps``, sizes,
    ``strength``, ``refiner_switch``, ...; run.py makes that check before it imports this module),
    the VAE's tiling, then prompts and wildcards, checkpoint paths, the logger, LoRA file headers
    and the init image; last the objects that are cheap to make (sampler, schedule, patches) and
    the metrics (conf/metrics), which read their own weights."""
    n = check_numbers(cfg)
    check_tiling_config(cfg.model.get("first_stage"), "model.first_stage.")
    if cfg.get("refiner") is not None:
        check_weights(cfg.get("refiner_weights"), "refiner")
    H, W, steps = n.H, n.W, n.steps
    jobs = make_jobs(load_prompts(cfg), str(cfg.negative_prompt or ""), n.seed, n.per_prompt, cfg.get("wildcards_dir"))
    jobs = select_images(jobs, cfg.get("images"))
    prompt_options = check_prompt_syntax(cfg, jobs, steps)
    check_weights(cfg.get("weights"))
    check_logger(cfg)
    tags = check_conventions(cfg)  # tags, the trainer's device
    lora_files, lora_strengths = check_lora(cfg.get("lora"))
    check_checkpoint_channels(cfg.model, cfg.get("weights"))
    inpaint = load_inpainting(cfg, H, W)
    init_image = load_init_image(cfg.init_image, H, W) if cfg.get("init_image") and inpaint is None else None
    hires = check_hires(cfg, H, W, inpaint)
    sampler = instantiate(cfg.sampler)
    weak_model = check_weak_guider(cfg, sampler)  # before the metrics, which read their classifier
    discretization = instantiate(cfg.discretization)
    patches = instantiate(cfg.patches) if cfg.get("patches") else None  # FreeU: the base model only
    compiling = compile_settings(cfg.get("compile"))
    reuse = check_reuse_engine(cfg.get("reuse_engine", "auto"))
    check_cpu_onednn(cfg.get("cpu_onednn"))  # run() sets it on the engines
    image_metrics = instantiate(cfg.metrics) if cfg.get("metrics") is not None else None  # last: they read weights
    return SamplePlan(
        jobs=jobs, H=H, W=W, seed=n.seed, steps=steps, batch_size=n.batch_size, strength=n.strength,
        img2img_schedule=n.img2img_schedule, refiner_switch=n.refiner_switch, aesthetic_scores=n.aesthetic_scores,
        sampler=sampler, discretization=discretization,
        lora_files=lora_files, lora_strengths=lora_strengths, init_image=init_image, patches=patches,
        image_metrics=image_metrics, out_dir=run_dir(), weak_model=weak_model, tags=tuple(tags), inpaint=inpaint,
        hires=hires, prompt_options=prompt_options, compile=compiling, search=search_spec(cfg, image_metrics),
        reuse_engine=reuse)


def check_prompt_syntax(cfg: DictConfig, jobs: list[PromptJob], steps: int) -> Any:
    """``prompt_syntax``, ``clip_skip`` and the textual-inversion files the prompts name (headers only,
    against the text encoders of the model and refiner built on the meta device)."""
    from ..conditioning.prompt_schedule import check_prompt_options

    def conditioners() -> list[Any]:
        nodes = [m.get("conditioner") for m in (cfg.model, cfg.get("refiner")) if m is not None]
        with torch.device("meta"):
            return [instantiate(n) for n in nodes if n is not None]

    texts = [t for j in jobs for t in (j.prompt, j.negative_prompt)]
    return check_prompt_options(cfg.get("prompt_syntax"), cfg.get("embeddings_dir"), cfg.get("clip_skip"), texts,
                                steps, conditioners)


def check_weak_guider(cfg: DictConfig, sampler: Any) -> bool:
    """Whether the sampler's guider wants a second engine (autoguidance's weak model); if so its
    ``weak_model`` / ``weak_weights`` are checked here, before any weight is read."""
    if not getattr(getattr(sampler, "guider", None), "needs_weak_model", False):
        return False
    if cfg.get("weak_model") is None:
        raise ValueError("the guider needs a weak model but the config has no weak_model: select guider=autoguidance "
                         "(it brings weak_model and weak_weights), or skip layers instead: guider.skip_layers=[mid]")
    if cfg.get("refiner") is not None:
        raise ValueError("autoguidance's weak model guides the base model only: use it without a refiner "
                         "(refiner=null), or guider.skip_layers=[mid], which works on any UNet")
    if cfg.weak_model.get("network") is not None:
        parts = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
                 for k, v in (("network", cfg.weak_model.network), ("first_stage", cfg.model.get("first_stage")))}
        check_size(parts, cfg.H, cfg.W, names=("H (weak model)", "W"))
    check_weak_model(cfg.weak_model, cfg.get("weak_weights"), cfg.model)
    return True


def run(cfg: DictConfig) -> dict[str, Any]:
    """Sample every prompt with the configured model and sampler; return the metrics."""
    if cfg.get("from_image"):
        cfg = rerun_config(cfg)
    plan = validate(cfg)
    record_config(cfg, plan.out_dir)
    settings = {"steps": plan.steps, "sampler": type(plan.sampler).__name__, "seed": plan.seed, "H": plan.H, "W": plan.W,
                "tags": list(plan.tags)}
    refused = refuse_sample_run(cfg, plan, settings)  # a search trial over its NFE budget: no weight is read
    if refused is not None:
        return refused
    apply_runtime_settings(cfg)
    engine = model_engine(cfg, plan)  # built (LoRA, patches, compile), or the multirun's loaded one (engine_cache)
    choose_threads(cfg.get("cpu_threads"), engine.model)
    set_cpu_onednn(cfg.get("cpu_onednn"), engine)
    engine.set_prompt_options(plan.prompt_options)
    refiner = refiner_engine(cfg, plan)
    if refiner is not None:
        set_cpu_onednn(cfg.get("cpu_onednn"), refiner)
    weak = weak_engine(cfg, plan, engine)
    if weak is not None:
        plan.sampler.guider.set_weak(weak)
    engine.configure_prediction(plan.H, plan.W, engine.schedule(plan.discretization, plan.steps), plan.sampler,
                                strength=plan.strength, img2img_schedule=plan.img2img_schedule,
                                refiner=refiner, refiner_switch=plan.refiner_switch,
                                aesthetic_score=plan.aesthetic_scores[0],
                                negative_aesthetic_score=plan.aesthetic_scores[1])
    if plan.init_image is not None:
        engine.set_init_image(plan.init_image)
    if plan.inpaint is not None:
        engine.set_inpaint(plan.inpaint)
    if plan.hires is not None:
        plan.hires.configure(engine, plan.discretization, plan.steps, plan.img2img_schedule)
        engine.set_hires(plan.hires)
    log.info("sampler: %r, schedule: %r, %d steps", plan.sampler, plan.discretization, plan.steps)
    log.info("%s", run_line(cfg, plan), extra=CONSOLE)
    quiet_libraries()

    callbacks = instantiate_callbacks(
        cfg.get("callbacks"), total_images=len(plan.jobs), provenance=provenance(cfg), image_metrics=plan.image_metrics,
        parameters=run_fields(cfg, plan.steps, plan.H, plan.W, plan.strength, plan.lora_files),
        extra_metrics={**settings,
                       **({"hires_H": plan.hires.size[0], "hires_W": plan.hires.size[1]} if plan.hires else {})})
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=make_logger(cfg, plan.out_dir) or False,
                          enable_progress_bar=False)  # the sampler's bar (progress=true) counts the steps
    from ..data.prompt_datamodule import PromptDataModule

    with sigterm_stops(f"sampling into {plan.out_dir}"):
        trainer.predict(engine, datamodule=PromptDataModule(plan.jobs, plan.batch_size), return_predictions=False)
    finish_wandb(trainer)
    writer = next((cb for cb in callbacks if hasattr(cb, "metrics")), None)
    return writer.metrics if writer is not None else {}
