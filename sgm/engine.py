"""DiffusionEngine: the LightningModule that holds a whole latent diffusion model.

Attribute names give the original single-file checkpoint layout: ``model.diffusion_model``
(UNet), ``first_stage_model`` (VAE), ``conditioner.embedders.N`` (encoders), ``denoiser``.
Parts arrive built (Hydra instantiates them) or as sgm ``*_config`` dicts.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any, Sequence

import lightning as L
import torch
from torch import nn

from .config import build_part, instantiate
from .networks.wrapper import OpenAIWrapper, module_dtype

log = logging.getLogger(__name__)

_IGNORED_SGM_PARAMS = {"use_ema", "ema_decay_rate", "log_keys", "no_cond_log", "compile_model",
                       "en_and_decode_n_samples_a_time", "ckpt_path", "network_wrapper", "optimizer_config",
                       "scheduler_config"}


class DiffusionEngine(L.LightningModule):
    """Network + denoiser + conditioner + first stage (+ sampler, loss) with sampling and training steps.

    ``first_stage_fp16_safe``: the VAE may run in float16. When False (the SDXL VAE, which
    overflows in float16), encode/decode run in float32 whatever the weight dtype.
    ``uc_zero_keys``: conditioner input keys whose embeddings are zeroed for the
    unconditional branch when the negative prompt is empty (SDXL base: ``["txt"]``).
    """

    def __init__(
        self,
        network: Any = None,
        denoiser: Any = None,
        conditioner: Any = None,
        first_stage: Any = None,
        sampler: Any = None,
        loss_fn: Any = None,
        scale_factor: float = 1.0,
        disable_first_stage_autocast: bool = True,
        first_stage_fp16_safe: bool = False,
        uc_zero_keys: Sequence[str] = ("txt",),
        input_key: str = "jpg",
        latent_channels: int | None = None,
        downsample_factor: int | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        *,
        network_config: Any = None,
        denoiser_config: Any = None,
        conditioner_config: Any = None,
        first_stage_config: Any = None,
        sampler_config: Any = None,
        loss_fn_config: Any = None,
        **sgm_params: Any,
    ):
        super().__init__()
        unknown = set(sgm_params) - _IGNORED_SGM_PARAMS
        if unknown:
            raise TypeError(f"DiffusionEngine got unknown parameters: {sorted(unknown)}")
        for key in sgm_params:
            log.debug("ignoring sgm parameter %s", key)
        self.model = OpenAIWrapper(build_part("network", network, network_config))
        self.denoiser = build_part("denoiser", denoiser, denoiser_config)
        self.conditioner = build_part("conditioner", conditioner, conditioner_config)
        self.first_stage_model = build_part("first_stage", first_stage, first_stage_config)
        for p in self.first_stage_model.parameters():
            p.requires_grad_(False)
        self.sampler = instantiate(sampler if sampler is not None else sampler_config)
        self.loss_fn = instantiate(loss_fn if loss_fn is not None else loss_fn_config)
        self.scale_factor = float(scale_factor)
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.first_stage_fp16_safe = first_stage_fp16_safe
        self.uc_zero_keys = list(uc_zero_keys or [])
        self.input_key = input_key
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        unet = self.model.diffusion_model
        self.latent_channels = latent_channels or getattr(unet, "out_channels", None) or getattr(unet, "in_channels", 4)
        self.downsample_factor = downsample_factor or _downsample_factor(self.first_stage_model)
        self.network_evaluations = 0
        self.predict_options: dict[str, Any] = {"H": 1024, "W": 1024, "strength": 1.0}
        self._refiner: list[DiffusionEngine] = []  # a list keeps the refiner out of this state_dict
        self._init_image: torch.Tensor | None = None

    def set_init_image(self, image: torch.Tensor | None) -> None:
        """An image [1, 3, H, W] in [-1, 1] for img2img (``strength`` < 1 keeps more of it)."""
        self._init_image = image

    def configure_prediction(self, H: int, W: int, strength: float = 1.0, refiner: DiffusionEngine | None = None,
                             refiner_switch: float = 0.8, aesthetic_score: float = 6.0,
                             negative_aesthetic_score: float = 2.5) -> None:
        """Settings for :meth:`predict_step`; validated here, before any sampling starts."""
        self.latent_shape(H, W)
        schedule_slice(10, strength)
        if refiner is not None and not 0.0 < refiner_switch < 1.0:
            raise ValueError(f"refiner_switch must be in (0, 1), got {refiner_switch}")
        self.predict_options = {"H": int(H), "W": int(W), "strength": float(strength),
                                "refiner_switch": float(refiner_switch), "aesthetic_score": aesthetic_score,
                                "negative_aesthetic_score": negative_aesthetic_score}
        self._refiner = [refiner] if refiner is not None else []
        if refiner is not None:
            refiner.configure_prediction(H, W, strength, aesthetic_score=aesthetic_score,
                                         negative_aesthetic_score=negative_aesthetic_score)

    def on_predict_start(self) -> None:
        for refiner in self._refiner:
            refiner.to(self.device).eval()

    # -- first stage -------------------------------------------------------------------
    def _first_stage_dtype(self) -> torch.dtype:
        dtype = module_dtype(self.first_stage_model)
        if dtype == torch.float16 and not self.first_stage_fp16_safe:
            return torch.float32
        return dtype

    def _first_stage_in_policy_dtype(self) -> tuple[nn.Module, torch.dtype]:
        """The VAE, cast if needed to the precision policy's dtype (never float16 unless marked safe)."""
        dtype = self._first_stage_dtype()
        if module_dtype(self.first_stage_model) != dtype:
            self.first_stage_model.to(dtype)
        return self.first_stage_model, dtype

    def _first_stage_context(self):
        if self.disable_first_stage_autocast and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, enabled=False)
        return nullcontext()

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (a posterior sample when ``generator`` is given, else its mode)."""
        vae, dtype = self._first_stage_in_policy_dtype()
        with self._first_stage_context():
            z = vae.encode(x.to(dtype), generator=generator) if generator is not None else vae.encode(x.to(dtype))
        return (self.scale_factor * z).float()

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], float32."""
        vae, dtype = self._first_stage_in_policy_dtype()
        with self._first_stage_context():
            x = vae.decode((z / self.scale_factor).to(dtype))
        return x.float()

    # -- denoising ---------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        """D(x; sigma, cond): the function samplers call (each call is one network evaluation)."""
        self.network_evaluations += 1
        return self.denoiser(self.model, x, sigma, cond)

    def forward(self, x: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean training loss on clean latents ``x``."""
        if self.loss_fn is None:
            raise RuntimeError("this engine has no loss_fn: configure `loss` to train")
        return self.loss_fn(self.model, self.denoiser, self.conditioner, x, batch).mean()

    # -- conditioning -----------------------------------------------------------------
    def conditioner_keys(self) -> set[str]:
        return {e.input_key for e in getattr(self.conditioner, "embedders", [])}

    def make_batch(self, prompts: Sequence[str], height: int, width: int, crop: tuple[int, int] = (0, 0),
                   original_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0) -> dict:
        """The conditioner's inputs for ``prompts`` at an output size of ``height`` x ``width`` pixels."""
        n = len(prompts)
        orig = original_size or (height, width)
        values = {
            "txt": list(prompts),
            "original_size_as_tuple": torch.tensor([orig] * n, dtype=torch.float32),
            "crop_coords_top_left": torch.tensor([crop] * n, dtype=torch.float32),
            "target_size_as_tuple": torch.tensor([(height, width)] * n, dtype=torch.float32),
            "aesthetic_score": torch.full((n, 1), float(aesthetic_score)),
        }
        keys = self.conditioner_keys()
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in values.items() if k in keys}

    @torch.no_grad()
    def get_conditionings(self, prompts: Sequence[str], negative_prompts: Sequence[str], height: int, width: int,
                          aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, **size: Any) -> tuple[dict, dict]:
        """(cond, uc) for a batch. Empty negative prompts zero ``uc_zero_keys`` (SDXL base behaviour)."""
        batch_c = self.make_batch(prompts, height, width, aesthetic_score=aesthetic_score, **size)
        batch_uc = self.make_batch(negative_prompts, height, width, aesthetic_score=negative_aesthetic_score, **size)
        zero = self.uc_zero_keys if all(not p for p in negative_prompts) else []
        return self.conditioner.get_unconditional_conditioning(batch_c, batch_uc, force_uc_zero_embeddings=zero)

    # -- sampling ----------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"H and W must be multiples of {f} for this model, got {height}x{width}")
        return (self.latent_channels, height // f, width // f)

    def initial_noise(self, seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """Unit noise, one CPU generator per seed, so each image depends on its own seed only."""
        return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    @torch.no_grad()
    def sample_latents(self, cond: dict, uc: dict, seeds: Sequence[int], shape: Sequence[int], sampler: Any = None,
                       init_latent: torch.Tensor | None = None, strength: float = 1.0,
                       sigma_range: tuple[float, float] | None = None, num_steps: int | None = None,
                       callback: Any = None) -> torch.Tensor:
        """Run the sampler. ``init_latent`` + ``strength`` gives img2img; ``sigma_range`` = (start, end)
        fractions of the schedule gives the base / refiner split (see :func:`schedule_slice`)."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise RuntimeError("no sampler configured")
        sigmas = sampler.get_sigmas(num_steps, device=self.device)
        start, end = schedule_slice(len(sigmas) - 1, strength if init_latent is not None else 1.0, sigma_range)
        sigmas = sigmas[start : end + 1]
        noise = self.initial_noise(seeds, shape).to(self.device)
        generators = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]
        if init_latent is not None:
            x = init_latent.to(self.device).float() + noise * sigmas[0]
        elif start == 0:
            x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
        else:
            raise ValueError("starting inside the schedule needs init_latent (the latent to continue from)")
        return sampler.sample(self.denoise, x, sigmas, cond, uc, generator=generators, callback=callback)

    def _conditionings_for(self, batch: dict) -> tuple[dict, dict]:
        opts = self.predict_options
        return self.get_conditionings(batch["prompt"], batch["negative_prompt"], opts["H"], opts["W"],
                                      aesthetic_score=opts["aesthetic_score"],
                                      negative_aesthetic_score=opts["negative_aesthetic_score"])

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        """Sample one batch of prompts (see :class:`sgm.data.prompts.PromptDataModule`): txt2img,
        img2img when the batch carries ``init_latent``, and the refiner hand-off when configured."""
        opts = self.predict_options
        t0 = time.perf_counter()
        engines = [self, *self._refiner]
        for e in engines:
            e.network_evaluations = 0
        cond, uc = self._conditionings_for(batch)
        shape = self.latent_shape(opts["H"], opts["W"])
        split = (0.0, opts["refiner_switch"]) if self._refiner else None
        init = batch.get("init_latent")
        if init is None and self._init_image is not None:
            z0 = self.encode_first_stage(self._init_image.to(self.device))
            init = z0.expand(len(batch["prompt"]), *z0.shape[1:])
        z = self.sample_latents(cond, uc, batch["seed"], shape, init_latent=init,
                                strength=opts["strength"], sigma_range=split)
        for refiner in self._refiner:
            z = refiner.continue_latents(z, batch, self.sampler, opts["refiner_switch"], opts["strength"])
        images = self.decode_first_stage(z)
        return {"images": images.clamp(-1, 1).cpu(), "index": list(batch["index"]), "seed": list(batch["seed"]),
                "prompt": list(batch["prompt"]), "negative_prompt": list(batch["negative_prompt"]),
                "seconds": time.perf_counter() - t0, "nfe": sum(e.network_evaluations for e in engines)}

    @torch.no_grad()
    def continue_latents(self, z: torch.Tensor, batch: dict, sampler: Any, switch: float,
                         strength: float = 1.0) -> torch.Tensor:
        """As the refiner: continue a base model's latent ``z`` from fraction ``switch`` of the
        base's schedule down to sigma 0, with this engine's denoiser and conditioning."""
        cond, uc = self._conditionings_for(batch)
        sigmas = sampler.get_sigmas(None, device=self.device)
        start, _ = schedule_slice(len(sigmas) - 1, strength, (switch, 1.0))
        generators = [torch.Generator().manual_seed(int(s) + 2) for s in batch["seed"]]
        return sampler.sample(self.denoise, z.to(self.device), sigmas[start:], cond, uc, generator=generators)

    # -- training -------------------------------------------------------------------------
    COND_KEYS = ("crossattn", "vector", "concat")

    def training_conditioning(self, batch: dict) -> dict:
        """Conditioning for a training batch; an empty caption means the unconditional branch.

        Cached batches carry ``crossattn``/``vector`` (and ``uc_crossattn``/``uc_vector``, the
        same item's unconditional version); otherwise the conditioner runs. Either way a sample
        whose caption was dropped (``caption_dropped``, else an empty caption) gets exactly what
        sampling uses for ``uc`` (zeroed text for SDXL base),
        so caption dropout trains the branch classifier-free guidance needs.
        """
        if "caption_dropped" in batch:
            empty = torch.as_tensor(batch["caption_dropped"], dtype=torch.bool, device=self.device)
        elif "txt" in batch:
            empty = torch.tensor([not t for t in batch["txt"]], dtype=torch.bool, device=self.device)
        else:
            empty = None
        if any(k in batch for k in self.COND_KEYS):
            cond = {k: batch[k] for k in self.COND_KEYS if k in batch}
            if empty is not None and bool(empty.any()):
                for k in list(cond):
                    uc = batch.get(f"uc_{k}")
                    if uc is None:
                        raise KeyError(f"cached batch has {k} but no uc_{k} for its dropped captions")
                    cond[k] = torch.where(empty.reshape(-1, *[1] * (cond[k].ndim - 1)), uc, cond[k])
            return cond
        cond = self.conditioner(batch)
        if empty is not None and bool(empty.any()) and self.uc_zero_keys:
            zeroed = self.conditioner(batch, force_zero_embeddings=self.uc_zero_keys)
            for k in cond:
                cond[k] = torch.where(empty.reshape(-1, *[1] * (cond[k].ndim - 1)), zeroed[k], cond[k])
        return cond

    def training_latents(self, batch: dict) -> torch.Tensor:
        if "latent" in batch:
            return batch["latent"].float()
        return self.encode_first_stage(batch[self.input_key])

    def step_seed(self, base: int, step: int) -> int:
        """The seed of one training step: a function of (seed, step, rank), so a resumed run
        draws exactly the noise an uninterrupted one would."""
        return (int(base) * 1_000_003 + int(step) * 9_973 + int(self.global_rank)) % (2**63 - 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.loss_fn is None:
            raise RuntimeError("this engine has no loss_fn: configure `loss` to train")
        # one seed per micro-batch: (optimizer step, position within gradient accumulation)
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1) if self._trainer else 1
        micro = self.trainer.fit_loop.epoch_loop.total_batch_idx % accumulate if accumulate > 1 else 0
        step = self.global_step * accumulate + micro
        torch.manual_seed(self.step_seed(self.train_seed, step))  # adapter dropout, etc.
        g = torch.Generator().manual_seed(self.step_seed(self.train_seed + 1, step))
        x = self.training_latents(batch)
        cond = self.training_conditioning(batch)
        loss = self.loss_fn.compute(self.model, self.denoiser, cond, x, generator=g).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0], sync_dist=False)
        return loss

    @torch.no_grad()
    def validation_loss(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Per-sample loss of a validation batch; deterministic: batch i's noise and sigmas are fixed by i."""
        g = torch.Generator().manual_seed(self.step_seed(self.train_seed + 2, batch_idx))
        x = self.training_latents(batch)
        cond = self.training_conditioning(batch)
        return self.loss_fn.compute(self.model, self.denoiser, cond, x, generator=g)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.validation_loss(batch, batch_idx).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["txt"]), sync_dist=True)
        return loss

    train_seed: int = 0

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("no optimizer configured")
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("nothing to train: no parameter requires grad (inject LoRA or enable full training)")
        opt = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    # small checkpoints: only what trains (adapters, or the UNet in full training) is saved
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["sgm_trainable"] = sorted(trainable)

    strict_loading = False  # resumable checkpoints hold the trainable tensors only


def schedule_slice(num_steps: int, strength: float = 1.0,
                   sigma_range: tuple[float, float] | None = None) -> tuple[int, int]:
    """Indices (start, end) into an ``num_steps``-step schedule (``num_steps + 1`` sigmas).

    * img2img ``strength`` in (0, 1]: the last ``k = max(1, round(strength * num_steps))``
      steps are taken, starting at sigma index ``num_steps - k``.
    * ``sigma_range = (a, b)`` as fractions of the schedule: steps ``round(a * n)`` to
      ``round(b * n)``; the base model runs (0, s) and the refiner (s, 1).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start, end = 0, num_steps
    if strength < 1.0:
        start = num_steps - max(1, round(strength * num_steps))
    if sigma_range is not None:
        a, b = (float(v) for v in sigma_range)
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"sigma_range must be fractions 0 <= start < end <= 1, got {sigma_range}")
        start, end = max(start, round(a * num_steps)), round(b * num_steps)
        if end <= start:
            raise ValueError(f"sigma_range {sigma_range} leaves no step of a {num_steps}-step schedule")
    return start, end


def _downsample_factor(first_stage: nn.Module) -> int:
    factor = getattr(first_stage, "downsample_factor", None)
    if factor:
        return int(factor)
    ch_mult = getattr(getattr(first_stage, "encoder", None), "ch_mult", None)
    return 2 ** (len(ch_mult) - 1) if ch_mult else 1
