"""Training callbacks: sample images for fixed prompts, write the final weights atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from PIL import Image

from ..diffusion.discretization import EDMDiscretization
from ..diffusion.guiders import VanillaCFG
from ..diffusion.samplers import EulerEDMSampler
from .writer import make_grid, save_png_once, to_uint8

log = logging.getLogger(__name__)


class SampleImages(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), sample ``prompts`` x ``seeds``
    with a fixed sampler and write ``samples/step_NNNNNN.png`` plus a W&B image."""

    def __init__(self, out_dir: str | Path, prompts: Sequence[str], seeds: Sequence[int], every_n_steps: int,
                 H: int, W: int, steps: int = 20, guidance_scale: float = 5.0,
                 noise_range: dict | None = None):
        self.out_dir = Path(out_dir) / "samples"
        self.prompts, self.seeds = list(prompts), [int(s) for s in seeds]
        self.every_n_steps, self.H, self.W = int(every_n_steps), int(H), int(W)
        nr = noise_range or {"sigma_min": 0.0292, "sigma_max": 14.6146, "rho": 3.0}
        self.sampler = EulerEDMSampler(EDMDiscretization(**nr), int(steps), VanillaCFG(guidance_scale))
        self.last_step = -1

    @torch.no_grad()
    def sample(self, engine) -> torch.Tensor:
        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        was_training = engine.training
        engine.eval()
        try:
            cond, uc = engine.get_conditionings(prompts, [""] * len(prompts), self.H, self.W)
            z = engine.sample_latents(cond, uc, seeds, engine.latent_shape(self.H, self.W), sampler=self.sampler)
            return engine.decode_first_stage(z).clamp(-1, 1).cpu()
        finally:
            engine.train(was_training)

    def _run(self, trainer: L.Trainer, engine) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return
        self.last_step = step
        images = self.sample(engine)  # every rank samples (keeps DDP ranks in step); rank 0 writes
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        grid = make_grid(to_uint8(images), columns=max(1, len(self.seeds)))
        save_png_once(self.out_dir / f"step_{step:06d}.png", grid, {"prompts": " | ".join(self.prompts)})
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                try:
                    lg.log_image(key="samples/grid", images=[Image.fromarray(grid)], step=step,
                                 caption=[f"step {step}"])
                except Exception as exc:  # noqa: BLE001 - logging must not fail training
                    log.warning("could not log sample images: %s", exc)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0:
            self._run(trainer, pl_module)


class ValidationLoss(L.Callback):
    """The deterministic validation loss every ``every_n_steps`` optimizer steps and at the end.

    Run by this callback rather than Lightning's step-based validation loop, whose restart
    bookkeeping would make a resumed run see other batches than an uninterrupted one. It draws
    no global random numbers, so training is the same with or without it.
    """

    def __init__(self, every_n_steps: int):
        self.every_n_steps = int(every_n_steps)
        self.last_step = -1

    @torch.no_grad()
    def _run(self, trainer: L.Trainer, engine) -> None:
        if trainer.global_step == self.last_step or trainer.datamodule is None:
            return
        self.last_step = trainer.global_step
        loader = trainer.datamodule.val_dataloader()
        if not loader:
            return
        was_training = engine.training
        engine.eval()
        total, count = 0.0, 0
        try:
            for i, batch in enumerate(loader):
                batch = engine.transfer_batch_to_device(batch, engine.device, 0)
                loss = engine.validation_loss(batch, i)
                total, count = total + float(loss.sum()), count + loss.numel()
        finally:
            engine.train(was_training)
        value = total / max(1, count)
        trainer.callback_metrics["val/loss"] = torch.tensor(value)
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics({"val/loss": value}, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module)


class SaveFinalWeights(L.Callback):
    """At the end of training, rank 0 writes the trained weights with ``save_fn(engine, path)``."""

    def __init__(self, path: str | Path, save_fn: Callable[[Any, Path], Any]):
        self.path, self.save_fn = Path(path), save_fn

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.save_fn(pl_module, self.path)
            log.info("wrote %s", self.path)
