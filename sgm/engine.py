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

from .config import build_part, instantiate, resolve_target
from .diffusion.noise import gaussian, seeded_generators
from .diffusion.schedule import img2img_start, initial_latent, sampling_sigmas, split_index
from .networks.onednn import onednn_context, resolve_onednn
from .networks.sizes import check_pixel_size
from .networks.wrapper import OpenAIWrapper, module_dtype

log = logging.getLogger(__name__)

# sgm engine parameters that only its training script or logging reads
_IGNORED_SGM_PARAMS = {"use_ema", "ema_decay_rate", "log_keys", "no_cond_log", "en_and_decode_n_samples_a_time",
                       "ckpt_path", "scheduler_config"}


def make_wrapper(network_wrapper: Any, network: nn.Module, compile_model: bool = False) -> nn.Module:
    """sgm's ``network_wrapper``: a class path (or class) called as ``cls(network, compile_model=...)``;
    None is :class:`OpenAIWrapper`. ``compile_model`` runs ``torch.compile`` on the network."""
    if network_wrapper is None:
        cls = OpenAIWrapper
    elif isinstance(network_wrapper, str):
        cls = resolve_target(network_wrapper)
    elif isinstance(network_wrapper, type):
        cls = network_wrapper
    else:
        raise TypeError(f"network_wrapper must be a class or its dotted path, got {network_wrapper!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"network_wrapper {network_wrapper!r} is not an nn.Module class")
    return cls(network, compile_model=bool(compile_model))


def sgm_optimizer(config: Any) -> Any:
    """sgm's ``optimizer_config`` ({target: torch.optim.AdamW, params: {...}}) as an optimizer factory."""
    if config is None:
        return None
    import functools

    from .config import convert_sgm_config

    node = dict(convert_sgm_config(config))
    return functools.partial(resolve_target(node.pop("_target_")), **node)


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
        network_wrapper: Any = None,
        compile_model: bool = False,
        *,
        network_config: Any = None,
        denoiser_config: Any = None,
        conditioner_config: Any = None,
        first_stage_config: Any = None,
        sampler_config: Any = None,
        loss_fn_config: Any = None,
        optimizer_config: Any = None,
        **sgm_params: Any,
    ):
        super().__init__()
        unknown = set(sgm_params) - _IGNORED_SGM_PARAMS
        if unknown:
            raise TypeError(f"DiffusionEngine got unknown parameters: {sorted(unknown)}")
        for key in sgm_params:
            log.debug("ignoring sgm parameter %s", key)
        self.model = make_wrapper(network_wrapper, build_part("network", network, network_config), compile_model)
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
        if optimizer is not None and optimizer_config is not None:
            raise ValueError("give either optimizer or optimizer_config, not both")
        self.optimizer_factory = optimizer if optimizer is not None else sgm_optimizer(optimizer_config)
        self.lr_scheduler_factory = lr_scheduler
        unet = self.model.diffusion_model
        self.latent_channels = latent_channels or getattr(unet, "out_channels", None) or getattr(unet, "in_channels", 4)
        self.downsample_factor = downsample_factor or getattr(self.first_stage_model, "downsample_factor", 1)
        self.pixel_multiple = self.downsample_factor * getattr(unet, "downsampling", 1)
        self.clear_run_state()

    def clear_run_state(self) -> None:
        """Forget what a sampling run set (prediction settings, refiner, init image, inpainting, hires,
        prompt options, the NFE count): a built engine reused by the next run starts as a fresh one."""
        self.network_evaluations = 0
        self.predict_options: dict[str, Any] = {}
        self._refiner: list[DiffusionEngine] = []  # a list keeps the refiner out of this state_dict
        self._init_image: torch.Tensor | None = None
        self._inpaint: Any = None  # sgm.inpaint.Inpainting
        self._hires: Any = None  # sgm.tasks.hires.HiresFix
        self.prompt_options: Any = None  # sgm.conditioning.prompt_schedule.PromptOptions (run.py's prompt_syntax)
        self.cpu_onednn: Any = None  # oneDNN CPU convolutions while sampling: auto/True/False (sgm.networks.onednn)

    def set_prompt_options(self, options: Any) -> None:
        """How prompts are read (``prompt_syntax``, embeddings, ``clip_skip``; a ``PromptOptions``)."""
        from .conditioning.prompt_schedule import apply_clip_skip

        apply_clip_skip(self.conditioner, options.clip_skip)
        self.prompt_options = options

    def set_init_image(self, image: torch.Tensor | None) -> None:
        """An image [1, 3, H, W] in [-1, 1] for img2img (``strength`` < 1 keeps more of it)."""
        self._init_image = image

    def set_inpaint(self, inpaint: Any) -> None:
        """Inpainting (:class:`sgm.inpaint.Inpainting`): its image becomes the init image."""
        self._inpaint = inpaint
        self._init_image = None if inpaint is None else inpaint.image

    def set_hires(self, hires: Any) -> None:
        """A second pass on the sampled latents before decoding (:class:`sgm.tasks.hires.HiresFix`)."""
        self._hires = hires

    def schedule(self, discretization: Any, steps: int) -> torch.Tensor:
        """The run's schedule (``steps + 1`` sigmas), a range left unset filled from this model's denoiser."""
        return sampling_sigmas(discretization, steps, self.denoiser)

    def configure_prediction(self, H: int, W: int, sigmas: torch.Tensor, sampler: Any = None, strength: float = 1.0,
                             img2img_schedule: str = "last_steps", refiner: DiffusionEngine | None = None,
                             refiner_switch: float = 0.8, aesthetic_score: float = 6.0,
                             negative_aesthetic_score: float = 2.5) -> None:
        """Settings for :meth:`predict_step`; validated here, before any sampling starts.

        ``sigmas`` is the run's whole schedule (:meth:`schedule`); img2img and the refiner
        run slices of it."""
        self.latent_shape(H, W)
        num_steps = len(sigmas) - 1
        img2img_start(num_steps, strength, img2img_schedule)
        if refiner is not None:
            split_index(num_steps, refiner_switch)
        if sampler is not None:
            self.sampler = sampler
        self.predict_options = {"H": int(H), "W": int(W), "sigmas": sigmas, "strength": float(strength),
                                "img2img_schedule": img2img_schedule, "refiner_switch": float(refiner_switch),
                                "aesthetic_score": aesthetic_score, "negative_aesthetic_score": negative_aesthetic_score}
        self._refiner = [refiner] if refiner is not None else []
        if refiner is not None:
            refiner.configure_prediction(H, W, sigmas, self.sampler, aesthetic_score=aesthetic_score,
                                         negative_aesthetic_score=negative_aesthetic_score)

    def guide_engines(self) -> list[DiffusionEngine]:
        """Other engines the sampler's guider evaluates (autoguidance's weak model, its ``engines``):
        like the refiner they follow this engine's device and count in a batch's NFE."""
        guider = getattr(self.sampler, "guider", None)
        return [e for e in getattr(guider, "engines", ()) if e is not self]

    def on_predict_start(self) -> None:
        for other in [*self._refiner, *self.guide_engines()]:
            other.to(self.device).eval()

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

    def conditioning(self, batch: dict, empty: torch.Tensor | None = None) -> dict:
        """The conditioner's output for ``batch``. The unconditional-branch rule, the one copy of
        it: samples whose caption is empty (``empty``, a bool mask) get the embeddings of
        ``uc_zero_keys`` zeroed (sgm's SDXL base rule; without such keys the empty caption's own
        embedding is the unconditional branch). Sampling's ``uc`` for an empty negative prompt,
        caption dropout in training and the latent cache all come from here."""
        if not self.uc_zero_keys or empty is None or not bool(empty.any()):
            return self.conditioner(batch)
        zeroed = self.conditioner(batch, force_zero_embeddings=self.uc_zero_keys)
        if bool(empty.all()):
            return zeroed
        cond = self.conditioner(batch)
        return {k: torch.where(empty.reshape(-1, *[1] * (v.ndim - 1)), zeroed[k], v) for k, v in cond.items()}

    def empty_captions(self, captions: Sequence[str]) -> torch.Tensor:
        return torch.tensor([not c for c in captions], dtype=torch.bool, device=self.device)

    @torch.no_grad()
    def get_conditionings(self, prompts: Sequence[str], negative_prompts: Sequence[str], height: int, width: int,
                          aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, **size: Any) -> tuple[dict, dict]:
        """(cond, uc) for a batch; an empty negative prompt is the unconditional branch (:meth:`conditioning`).
        With a prompt syntax (:meth:`set_prompt_options`) prompts are parsed, weighted and scheduled over
        the configured schedule's steps (:func:`sgm.conditioning.prompt_schedule.scheduled_conditionings`)."""
        if self.prompt_options is not None and self.prompt_options.syntax != "none":
            from .conditioning.prompt_schedule import scheduled_conditionings

            return scheduled_conditionings(self, prompts, negative_prompts, height, width, aesthetic_score,
                                           negative_aesthetic_score, sigmas=self.predict_options.get("sigmas"), **size)
        return self.plain_conditionings(prompts, negative_prompts, height, width, aesthetic_score,
                                        negative_aesthetic_score, **size)

    def plain_conditionings(self, prompts: Sequence[str], negative_prompts: Sequence[str], height: int, width: int,
                            aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                            **size: Any) -> tuple[dict, dict]:
        """(cond, uc) with prompts as plain text."""
        batch_c = self.make_batch(prompts, height, width, aesthetic_score=aesthetic_score, **size)
        batch_uc = self.make_batch(negative_prompts, height, width, aesthetic_score=negative_aesthetic_score, **size)
        return self.conditioning(batch_c), self.conditioning(batch_uc, self.empty_captions(negative_prompts))

    # -- sampling ----------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H / f, W / f) of the latents of an H x W image (see :mod:`sgm.networks.sizes`)."""
        h, w = check_pixel_size(height, width, self.pixel_multiple)
        f = self.downsample_factor
        return (self.latent_channels, h // f, w // f)

    @torch.no_grad()
    def sample_latents(self, cond: dict, uc: dict, seeds: Sequence[int], shape: Sequence[int], sigmas: torch.Tensor,
                       sampler: Any = None, init_latent: torch.Tensor | None = None, noise_seed_offset: int = 0,
                       callback: Any = None, blend: Any = None) -> torch.Tensor:
        """Run ``sampler`` over the schedule slice ``sigmas`` from pure noise (txt2img) or from
        ``init_latent`` (img2img, the refiner's continuation). Image k's noise depends on
        ``seeds[k]`` only: its start noise on the seed, the sampler's on seed + 1 (+ offset).
        ``blend`` (:class:`sgm.inpaint.blend.LatentBlend`) keeps a masked region at the init latent,
        re-noised with the start noise."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise RuntimeError("no sampler configured")
        sigmas = sigmas.to(self.device)
        if len(sigmas) < 2:  # sgm's img2img rule can keep no step: the image's latent is the result
            return init_latent.to(self.device).float()
        noise = gaussian((len(seeds), *shape), seeded_generators(seeds), self.device)
        x = initial_latent(noise, sigmas[0], init_latent)
        generators = seeded_generators(seeds, 1 + noise_seed_offset)
        denoise = self.denoise if blend is None else blend.with_noise(noise).wrap(self.denoise)
        with onednn_context(self.onednn_for(x)):
            z = sampler.sample(denoise, x, sigmas, cond, uc, generator=generators, callback=callback)
        return z if blend is None else blend.finish(z)

    def onednn_for(self, x: torch.Tensor) -> bool | None:
        """oneDNN on/off for sampling latents ``x`` under :attr:`cpu_onednn` (None: torch's setting stays)."""
        return resolve_onednn(self.cpu_onednn, x, module_dtype(self.model.diffusion_model))

    def _conditionings_for(self, batch: dict) -> tuple[dict, dict]:
        opts = self.predict_options
        return self.get_conditionings(batch["prompt"], batch["negative_prompt"], opts["H"], opts["W"],
                                      aesthetic_score=opts["aesthetic_score"],
                                      negative_aesthetic_score=opts["negative_aesthetic_score"])

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        """Sample one batch of prompts (see :class:`sgm.data.prompts.PromptDataModule`): txt2img,
        img2img when the batch carries ``init_latent`` (or an init image is set), and the refiner
        hand-off when configured; each is a slice of the one schedule."""
        opts = self.predict_options
        if not opts:
            raise RuntimeError("call configure_prediction() before predicting")
        t0 = time.perf_counter()
        engines = [self, *self._refiner, *self.guide_engines()]
        for e in engines:
            e.network_evaluations = 0
        cond, uc = self._conditionings_for(batch)
        shape = self.latent_shape(opts["H"], opts["W"])
        init = batch.get("init_latent")
        if init is None and self._init_image is not None:
            z0 = self.encode_first_stage(self._init_image.to(self.device))
            init = z0.expand(len(batch["prompt"]), *z0.shape[1:])
        job = self._inpaint.batch(self, init) if self._inpaint is not None else None
        if job is not None:
            cond, uc = job.conditioning(cond), job.conditioning(uc)
        sigmas = opts["sigmas"]
        n = len(sigmas) - 1
        start = img2img_start(n, opts["strength"], opts["img2img_schedule"]) if init is not None else 0
        end = n
        if self._refiner:
            end = split_index(n, opts["refiner_switch"])
            if end <= start:
                raise ValueError(f"refiner_switch {opts['refiner_switch']} hands over before img2img starts "
                                 f"(step {start} of {n}): the base would run no step")
        blend = job.blend if job is not None else None
        z = self.sample_latents(cond, uc, batch["seed"], shape, sigmas[start : end + 1], init_latent=init, blend=blend)
        for refiner in self._refiner:
            rc, ruc = refiner._conditionings_for(batch)
            with onednn_context(refiner.onednn_for(z)):
                z = refiner.sampler.sample(refiner.denoise if blend is None else blend.wrap(refiner.denoise), z,
                                           sigmas[end:].to(self.device), rc, ruc,
                                           generator=seeded_generators(batch["seed"], 2))
            z = z if blend is None else blend.finish(z)
        if self._hires is not None:
            z = self._hires(self, batch, z)
        images = self.decode_first_stage(z)
        if job is not None:
            images = job.paste(images)
        return {"images": images.clamp(-1, 1).cpu(), "index": list(batch["index"]), "seed": list(batch["seed"]),
                "prompt": list(batch["prompt"]), "negative_prompt": list(batch["negative_prompt"]),
                "seconds": time.perf_counter() - t0, "nfe": sum(e.network_evaluations for e in engines)}

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
            empty = self.empty_captions(batch["txt"])
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
        return self.conditioning(batch, empty)

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
