"""Test helpers: rename our (sgm-layout) UNet / VAE state dicts to diffusers names, and matching configs."""

from __future__ import annotations

import re

import torch

_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _res(rest: str) -> str:
    for ours, theirs in _RES.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def unet_to_diffusers(sd: dict[str, torch.Tensor], num_res_blocks: int, levels: int) -> dict[str, torch.Tensor]:
    """Map an sgm UNetModel state dict (``num_classes="sequential"``) to UNet2DConditionModel names."""
    # input block index -> (level, position): resnet/attention j, or the level's downsampler
    inputs: dict[int, tuple[int, int | None]] = {}
    k = 1
    for level in range(levels):
        for j in range(num_res_blocks):
            inputs[k] = (level, j)
            k += 1
        if level != levels - 1:
            inputs[k] = (level, None)
            k += 1
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    out = {}
    for key, value in sd.items():
        name, param = key.rsplit(".", 1)
        if name in fixed:
            out[f"{fixed[name]}.{param}"] = value
            continue
        m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key)
        if m:
            level, j = inputs[int(m[1])]
            if j is None:
                new = f"down_blocks.{level}.downsamplers.0.conv.{m[3].removeprefix('op.')}"
            elif m[2] == "0":
                new = f"down_blocks.{level}.resnets.{j}.{_res(m[3])}"
            else:
                new = f"down_blocks.{level}.attentions.{j}.{m[3]}"
            out[new] = value
            continue
        m = re.match(r"middle_block\.(\d)\.(.*)", key)
        if m:
            i = int(m[1])
            out[f"mid_block.attentions.0.{m[2]}" if i == 1 else f"mid_block.resnets.{i // 2}.{_res(m[2])}"] = value
            continue
        m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key)
        if m:
            block, j = divmod(int(m[1]), num_res_blocks + 1)
            if m[2] == "0":
                new = f"up_blocks.{block}.resnets.{j}.{_res(m[3])}"
            elif m[3].startswith("conv."):
                new = f"up_blocks.{block}.upsamplers.0.{m[3]}"
            else:
                new = f"up_blocks.{block}.attentions.{j}.{m[3]}"
            out[new] = value
            continue
        raise KeyError(key)
    return out


def diffusers_unet_config(cfg: dict, attn_levels: list[bool]) -> dict:
    """UNet2DConditionModel kwargs equivalent to our UNetModel params ``cfg``."""
    mc, mult = cfg["model_channels"], cfg["channel_mult"]
    chans = [mc * m for m in mult]
    depth = cfg["transformer_depth"]
    depth = depth if isinstance(depth, list) else [depth] * len(mult)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)]
    return dict(
        sample_size=16, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        flip_sin_to_cos=True, freq_shift=0, down_block_types=tuple(down), up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=tuple(chans),
        layers_per_block=cfg["num_res_blocks"], norm_num_groups=32, norm_eps=1e-5,
        cross_attention_dim=cfg["context_dim"], transformer_layers_per_block=depth,
        attention_head_dim=[c // cfg["num_head_channels"] for c in chans],  # diffusers' legacy name: head count
        use_linear_projection=cfg["use_linear_in_transformer"], class_embed_type="projection",
        projection_class_embeddings_input_dim=cfg["adm_in_channels"],
    )


def vae_to_diffusers(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Map an sgm AutoencoderKL state dict to diffusers AutoencoderKL names (attention 1x1 convs -> linears)."""
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    res = {"nin_shortcut": "conv_shortcut"}
    out = {}
    for key, value in sd.items():
        new = key
        m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(\w+)$", key)
        if m:
            if m[2] == "attn_1":
                new = f"{m[1]}.mid_block.attentions.0.{attn[m[3]]}.{m[4]}"
                if value.ndim == 4:
                    value = value[:, :, 0, 0]
            else:
                new = f"{m[1]}.mid_block.resnets.{int(m[2][-1]) - 1}.{res.get(m[3], m[3])}.{m[4]}"
        elif m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$", key):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{res.get(m[3], m[3])}.{m[4]}"
        elif m := re.match(r"encoder\.down\.(\d+)\.downsample\.conv\.(\w+)$", key):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{res.get(m[3], m[3])}.{m[4]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.conv\.(\w+)$", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(\w+)$", key):
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        out[new] = value
    return out


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer built offline from the BPE file bundled with open_clip (None when this
    transformers takes vocab/merges files only). ``pad_token="!"`` is SDXL's second tokenizer (pads with 0)."""
    import gzip

    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    units = list(oct.bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    try:
        return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges],
                             pad_token=pad_token)
    except TypeError:  # transformers 4: files only
        return None
