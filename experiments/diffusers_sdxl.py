"""diffusers' ``StableDiffusionXLPipeline`` on the weights of one of our engines (benchmarks only).

Every tensor is shared with the engine, not copied (``load_state_dict(assign=True)`` into modules
built on the meta device): the UNet and VAE through the key maps of ``tests/_nets_convert.py``,
CLIP-L is our ``FrozenCLIPEmbedder``'s own transformers model, and the OpenCLIP bigG tower becomes
a ``CLIPTextModelWithProjection`` (``in_proj_weight`` split into q/k/v, ``text_projection``
transposed; the conversion diffusers' ``convert_open_clip_checkpoint`` makes). The UNet takes the
vector conditioning as SDXL's ``text_time`` addition embedding, the scheduler is SDXL's
``EulerDiscreteScheduler`` (leading spacing, steps offset 1), which our ``sampler=euler
discretization=ddpm discretization.timestep_spacing=leading discretization.steps_offset=1`` matches.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from _nets_convert import clip_tokenizer, diffusers_unet_config, unet_to_diffusers, vae_to_diffusers  # noqa: E402

# the schedule of SDXL's scheduler config, as our discretization group spells it
MATCHING_SCHEDULE = ["sampler=euler", "discretization=ddpm", "discretization.timestep_spacing=leading",
                     "discretization.steps_offset=1"]


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load ``state`` into a meta-built module by assignment (shared tensors); meta position ids rebuilt."""
    module.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"{type(module).__name__}: buffer {name} has no value")
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__}: {len(left)} parameters not converted, e.g. {left[:3]}")
    return module.eval()


def unet(model: torch.nn.Module, network: dict, time_dim: int) -> torch.nn.Module:
    """``UNet2DConditionModel`` with the weights of our UNet ``model`` (config ``network``);
    ``time_dim``: the width of each size-conditioning embedding (SDXL: 256)."""
    from diffusers import UNet2DConditionModel

    mult = network["channel_mult"]
    attn = [2**level in network["attention_resolutions"] for level in range(len(mult))]
    cfg = diffusers_unet_config(network, attn)
    cfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=time_dim)
    mapped = {k.replace("class_embedding.", "add_embedding."): v
              for k, v in unet_to_diffusers(model.state_dict(), network["num_res_blocks"], len(mult)).items()}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**cfg)
    return _assign(theirs, mapped)


def _size_embedding_width(engine: Any) -> int:
    from sgm.conditioning.timestep import ConcatTimestepEmbedderND

    widths = {e.outdim for e in engine.conditioner.embedders if isinstance(e, ConcatTimestepEmbedderND)}
    if len(widths) != 1:
        raise ValueError(f"expected one size-embedding width, got {widths}")
    return widths.pop()


def vae(engine: Any, first_stage: dict) -> torch.nn.Module:
    """diffusers' ``AutoencoderKL`` with the engine's first-stage weights (``first_stage``: our config)."""
    from diffusers import AutoencoderKL

    dd = first_stage["ddconfig"]
    levels = len(dd["ch_mult"])
    with torch.device("meta"):
        model = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]), layers_per_block=dd["num_res_blocks"],
            latent_channels=dd["z_channels"], norm_num_groups=32, sample_size=dd["resolution"],
            scaling_factor=engine.scale_factor, force_upcast=not engine.first_stage_fp16_safe)
    return _assign(model, vae_to_diffusers(engine.first_stage_model.state_dict(), levels))


def bigg_text_model(embedder: Any) -> torch.nn.Module:
    """``CLIPTextModelWithProjection`` with the weights of a ``FrozenOpenCLIPEmbedder2``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    m = embedder.model
    blocks = m.transformer.resblocks
    width = embedder.width
    config = CLIPTextConfig(
        vocab_size=m.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, max_position_embeddings=m.positional_embedding.shape[0],
        hidden_act="gelu", layer_norm_eps=blocks[0].ln_1.eps, projection_dim=embedder.embed_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    keys = model.state_dict()
    level = "text_model." if "text_model.final_layer_norm.weight" in keys else ""
    sd = {f"{level}embeddings.token_embedding.weight": m.token_embedding.weight,
          f"{level}embeddings.position_embedding.weight": m.positional_embedding,
          f"{level}final_layer_norm.weight": m.ln_final.weight, f"{level}final_layer_norm.bias": m.ln_final.bias}
    proj = m.text_projection
    sd["text_projection.weight"] = proj.weight if isinstance(proj, torch.nn.Linear) else proj.T
    for i, block in enumerate(blocks):
        pre = f"{level}encoder.layers.{i}."
        for j, name in enumerate(("q", "k", "v")):
            sd[f"{pre}self_attn.{name}_proj.weight"] = block.attn.in_proj_weight[j * width:(j + 1) * width]
            sd[f"{pre}self_attn.{name}_proj.bias"] = block.attn.in_proj_bias[j * width:(j + 1) * width]
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, mod in pairs.items():
            sd[f"{pre}{name}.weight"], sd[f"{pre}{name}.bias"] = mod.weight, mod.bias
    return _assign(model, sd)


def pipeline(engine: Any, cfg: Any) -> Any:
    """``StableDiffusionXLPipeline`` sharing every weight with ``engine`` (built from ``cfg``, a
    composed ``conf/sample.yaml``); needs an SDXL-family conditioner (CLIP-L, bigG, size embedders)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sgm.conditioning import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2

    node = OmegaConf.to_container(cfg.model, resolve=True)
    network, first_stage = dict(node["network"]), dict(node["first_stage"])
    network.pop("_target_", None)
    clip_l = next(e for e in engine.conditioner.embedders if isinstance(e, FrozenCLIPEmbedder))
    bigg = next(e for e in engine.conditioner.embedders if isinstance(e, FrozenOpenCLIPEmbedder2))
    disc = node.get("denoiser", {}).get("discretization") or {}
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=disc.get("linear_start", 0.00085), beta_end=disc.get("linear_end", 0.012),
        beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
        interpolation_type="linear", use_karras_sigmas=False)
    tok1, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")  # the second pads with "!" (id 0), as open_clip
    if tok1 is None:
        raise RuntimeError("this transformers' CLIPTokenizer cannot be built offline")
    tok1.model_max_length = tok2.model_max_length = clip_l.max_length
    pipe = StableDiffusionXLPipeline(
        vae=vae(engine, first_stage), text_encoder=clip_l.transformer, text_encoder_2=bigg_text_model(bigg),
        tokenizer=tok1, tokenizer_2=tok2, scheduler=scheduler,
        unet=unet(engine.model.diffusion_model, network, _size_embedding_width(engine)),
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
