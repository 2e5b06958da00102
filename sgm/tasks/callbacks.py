"""Training callbacks: sample images for fixed prompts, write the final weights atomically, keep
resumable checkpoints (also on Ctrl-C) that record the run's config identity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from .console import CONSOLE
from .resume import CONFIG_HASH_KEY, CONFIG_KEY
from .writer import make_grid, save_png_once, to_uint8

log = logging.getLogger(__name__)


def find_ema(trainer: L.Trainer) -> "EMAWeights | None":
    """The run's :class:`EMAWeights` callback, if it keeps an average."""
    for cb in getattr(trainer, "callbacks", []):
        if isinstance(cb, EMAWeights) and cb.decay is not None:
            return cb
    return None


class SampleImages(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), sample ``prompts`` x ``seeds``
    with the run's sampler (and its guider) over ``steps`` of the run's discretization, and
    write ``samples/step_NNNNNN.png`` plus a W&B image. EMA weights are used when kept.

    ``sample_at_first`` (kohya's ``--sample_at_first``): also sample before the first optimizer
    step of a fresh run (``step_000000.png``, the base model's own images to compare with); a
    resumed run does not sample again where it continues."""

    def __init__(self, out_dir: str | Path, prompts: Sequence[str], seeds: Sequence[int], every_n_steps: int,
                 H: int, W: int, sampler: Any, discretization: Any, steps: int = 20, sample_at_first: bool = False):
        self.out_dir = Path(out_dir) / "samples"
        self.prompts, self.seeds = list(prompts or []), [int(s) for s in seeds]
        self.every_n_steps, self.H, self.W, self.steps = int(every_n_steps), int(H), int(W), int(steps)
        self.sample_at_first = bool(sample_at_first)
        self.sampler, self.discretization = sampler, discretization
        self.last_step = -1
        self.ema: EMAWeights | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.ema = find_ema(trainer)

    @torch.no_grad()
    def sample(self, engine) -> torch.Tensor:
        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        was_training = engine.training
        engine.eval()
        if self.ema is not None:
            self.ema.swap_in(engine)
        try:
            cond, uc = engine.get_conditionings(prompts, [""] * len(prompts), self.H, self.W)
            sigmas = engine.schedule(self.discretization, self.steps)
            z = engine.sample_latents(cond, uc, seeds, engine.latent_shape(self.H, self.W), sigmas, self.sampler)
            return engine.decode_first_stage(z).clamp(-1, 1).cpu()
        finally:
            if self.ema is not None:
                self.ema.swap_out(engine)
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

    def on_train_start(self, trainer, pl_module) -> None:
        if self.sample_at_first and self.every_n_steps > 0 and self.prompts and trainer.global_step == 0:
            self._run(trainer, pl_module)  # a fresh run only: a resumed one starts at its checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and self.prompts and trainer.global_step > 0 \
                and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0 and self.prompts:
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


class TrainingMonitor(L.Callback):
    """The learning rate of each optimizer param group (``lr``; ``lr/pgN`` when there are several,
    as Lightning's ``LearningRateMonitor``) and the total L2 norm of the gradients before clipping
    (``grad_norm``), logged with the training loss every ``trainer.log_every_n_steps``, into
    metrics.csv and W&B. A rising ``grad_norm`` or one pinned at ``gradient_clip_val`` shows a
    learning rate too high before the samples do."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning calls this after the gradients are unscaled (mixed precision) and accumulated,
        # and before gradient clipping: the norm is the one clipping compares with gradient_clip_val
        grads = [p.grad.detach() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
        pl_module.log("grad_norm", norm, on_step=True, on_epoch=False, batch_size=1, sync_dist=False)
        groups = optimizer.param_groups
        for i, group in enumerate(groups):
            pl_module.log("lr" if len(groups) == 1 else f"lr/pg{i}", float(group["lr"]), on_step=True,
                          on_epoch=False, batch_size=1, sync_dist=False)


class SaveFinalWeights(L.Callback):
    """At the end of training, rank 0 writes the trained weights (EMA ones when kept), atomically:
    a kohya LoRA file (``mode="lora"``) or, in full training, a single-file checkpoint in the
    original layout (``save_dtype``). The run's config goes into the file's metadata."""

    def __init__(self, path: str | Path, mode: str, run_config: str = "", save_dtype: Any = None):
        if mode not in ("lora", "full"):
            raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
        self.path, self.mode, self.save_dtype = Path(path), mode, save_dtype
        self.metadata = {"sgm_config": str(run_config)}

    def save(self, engine) -> None:
        if self.mode == "lora":
            from ..lora import save_lora

            save_lora(engine, self.path, metadata=self.metadata)
        else:
            from ..checkpoint import save_checkpoint

            save_checkpoint(engine, self.path, metadata=self.metadata, dtype=self.save_dtype)

    def write(self, trainer: L.Trainer, pl_module) -> None:
        """Rank 0 writes the current weights (EMA ones when kept)."""
        if trainer.is_global_zero:
            ema = find_ema(trainer)
            if ema is not None:
                ema.swap_in(pl_module)
            try:
                self.save(pl_module)
            finally:
                if ema is not None:
                    ema.swap_out(pl_module)
            log.info("wrote %s%s at step %d", self.path, " (EMA weights)" if ema is not None else "",
                     trainer.global_step, extra=CONSOLE)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # a smoke test of the code, not a result (debug=fdr)
            log.info("fast_dev_run: %s not written", self.path.name)
            return
        self.write(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Ctrl-C: the weights trained so far are written too (nothing before the first step)."""
        if not isinstance(exception, KeyboardInterrupt) or trainer.global_step == 0 or trainer.fast_dev_run:
            return
        try:
            self.write(trainer, pl_module)
        except Exception as exc:  # noqa: BLE001 - the resumable checkpoint must still be written
            log.error("interrupted: could not write %s: %s", self.path, exc)


class ConfigStamp(L.Callback):
    """Records the run's config identity (:func:`sgm.tasks.resume.run_identity`) in every
    checkpoint, so that ``resume=auto`` continues only a run of the same config."""

    def __init__(self, config_hash: str, config_yaml: str):
        self.config_hash, self.config_yaml = str(config_hash), str(config_yaml)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_HASH_KEY] = self.config_hash
        checkpoint[CONFIG_KEY] = self.config_yaml


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes a resumable ``last.ckpt`` on Ctrl-C (KeyboardInterrupt),
    when steps were trained since the last checkpoint. Written by rank 0 without the barrier of
    ``Trainer.save_checkpoint``: interrupted ranks may stand at different places. At the end of
    training ``last.ckpt`` holds the final step (a longer ``trainer.max_steps`` continues from it).

    After a restore, the step counter of the logs is re-aligned with the optimizer steps: Lightning
    expects checkpoints written at ``on_train_batch_end`` and counts one batch too many for one
    written inside a batch (Ctrl-C) or at the end, which would leave a gap in metrics.csv / W&B.
    """

    _realign_log_step = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._realign_log_step = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._realign_log_step:
            self._realign_log_step = False
            loop = trainer.fit_loop.epoch_loop
            if pl_module.automatic_optimization and loop._batches_that_stepped != trainer.global_step:
                loop._batches_that_stepped = trainer.global_step  # one optimizer step per stepping batch

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # as ModelCheckpoint: a fast dev run writes no checkpoint
            return
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if (not isinstance(exception, KeyboardInterrupt) or self.dirpath is None or trainer.sanity_checking
                or trainer.fast_dev_run or trainer.global_step == self._last_global_step_saved):
            return
        path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        self.last_model_path = path  # part of the saved state
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.save_checkpoint(checkpoint, path)  # rank 0 writes (atomically: AtomicCheckpointIO)
        self._last_global_step_saved = trainer.global_step
        log.warning("interrupted at step %d: wrote the resumable checkpoint %s", trainer.global_step, path)


class EMAWeights(L.Callback):
    """An exponential moving average of the trained parameters (Karras et al. 2022 use one for
    every sample; diffusers' ``--use_ema``): ``ema <- decay * ema + (1 - decay) * weights``
    after each optimizer step, with the warm-up ``min(decay, (1 + n) / (10 + n))``.

    The average is kept in float32, saved in Lightning checkpoints (resume continues it) and
    swapped into the model for validation samples and the final weights file; training itself
    always continues from the raw weights.
    """

    def __init__(self, decay: float | None = 0.999, start_step: int = 0):
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (or null for no EMA), got {decay}")
        self.decay, self.start_step = (None if decay is None else float(decay)), int(start_step)
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._last_step = -1
        self._backup: dict[str, torch.Tensor] | None = None

    def _params(self, pl_module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.decay is None:
            return
        params = self._params(pl_module)
        if self.shadow:  # restored from a checkpoint
            if set(self.shadow) != set(params):
                raise ValueError("the EMA state in the checkpoint does not match the trained parameters")
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.decay is None or step == self._last_step:  # off, or gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        params = self._params(pl_module)
        if step <= self.start_step:
            for n, p in params.items():
                self.shadow[n].copy_(p.detach())
            return
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def swap_in(self, pl_module) -> None:
        """Put the average into the model (keeping the raw weights for :meth:`swap_out`)."""
        if self._backup is not None or not self.shadow:
            return
        params = self._params(pl_module)
        self._backup = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(self.shadow[n].to(p.dtype))

    @torch.no_grad()
    def swap_out(self, pl_module) -> None:
        if self._backup is None:
            return
        for n, p in self._params(pl_module).items():
            p.copy_(self._backup[n])
        self._backup = None

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.shadow = dict(state["shadow"])
