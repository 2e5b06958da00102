"""The SDXL UNet in the module layout of ldm/sgm ``openaimodel.py`` (Dhariwal & Nichol 2021, ADM; LDM; SDXL).

``UNetModel.state_dict()`` has exactly the keys of an original checkpoint's
``model.diffusion_model.*`` tensors: ``time_embed``, ``label_emb``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CrossAttention, backend_from_config
from .transformer import SpatialTransformer
from .util import (
    Checkpointed,
    Timestep,
    as_list,
    check_int,
    dropout_layer,
    ignore_params,
    normalization,
    per_level,
    timestep_embedding,
    zero_module,
)

log = logging.getLogger(__name__)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential: ``emb`` goes to TimestepBlocks, ``context`` and ``transformer_options`` to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Any = None,  # type: ignore
                transformer_options: dict | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3x3 conv ``op`` (padding 1), or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("Downsample without a conv cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 ``conv`` when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        elif out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(TimestepBlock, Checkpointed):
    """Residual block with timestep conditioning (ADM).

    in_layers = [GroupNorm, SiLU, conv3x3]; emb_layers = [SiLU, Linear]; out_layers =
    [GroupNorm, SiLU, Dropout, conv3x3 (zero-init)]; ``skip_connection`` is Identity, a
    1x1 conv, or a 3x3 conv (``use_conv``). ``up``/``down`` resample inside the block.
    With ``use_scale_shift_norm`` the embedding gives (scale, shift) for the second norm.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            dropout_layer(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.maybe_checkpoint(self._forward, x, emb)


# Original parameters accepted for config compatibility that change nothing here.
_HARMLESS = ("use_fp16", "use_bf16", "num_heads_upsample", "use_new_attention_order", "legacy",
             "use_fairscale_checkpoint", "offload_to_cpu")


class UNetModel(nn.Module):
    """Conditional UNet of SDXL (sgm ``UNetModel``), built from the original ``network_config`` params.

    ``forward(x, timesteps, context, y)``: ``x`` [B, C, H, W] latents, ``timesteps`` [B]
    (c_noise), ``context`` [B, M, context_dim] for cross-attention (or a list, one per
    transformer block), ``y`` [B, adm_in_channels] the vector conditioning (``num_classes``
    "sequential"), [B] class ids (int ``num_classes``) or [B, 1] ("continuous").

    ``use_checkpoint`` / :meth:`set_gradient_checkpointing` recompute ResBlocks and
    transformer blocks in the backward pass. ``spatial_transformer_attn_type`` is
    ``softmax`` (default attention backend), ``softmax-xformers`` (xformers if installed)
    or a backend name (``sdpa``, ``xformers``, ``math``), see :mod:`sgm.networks.attention`.

    ``transformer_options`` (one call's network options, ``"patches"``) reach the attention
    layers and the up path, see :mod:`sgm.networks.patches`. For those patches each
    ``CrossAttention`` has ``.name``, its module name here, and :attr:`block_positions` maps
    each block name (``input_blocks.4``, ``middle_block``, ``output_blocks.0``) to its place
    ``(path, block, position)`` in diffusers' layout (``("down", 1, 0)``: ``down_blocks.1``,
    its resnet / attention 0; ``up`` blocks count from the lowest resolution).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | list[int],
        attention_resolutions: list[int],
        dropout: float = 0.0,
        channel_mult: list[int] = (1, 2, 4, 8),  # type: ignore[assignment]
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_spatial_transformer: bool | None = None,
        transformer_depth: int | list[int] = 1,
        context_dim: int | list[int] | None = None,
        n_embed: int | None = None,
        disable_self_attentions: list[bool] | None = None,
        num_attention_blocks: list[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        spatial_transformer_attn_type: str = "softmax",
        adm_in_channels: int | None = None,
        transformer_depth_middle: int | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        harmless = {k: kwargs.pop(k) for k in _HARMLESS if k in kwargs}
        ignore_params(type(self).__name__, harmless, kwargs)
        if dims != 2:
            raise ValueError(f"dims must be 2 (only 2-D UNets are implemented), got {dims!r}")
        if n_embed is not None:
            raise ValueError("n_embed (codebook-id prediction head) is not supported; leave it unset")
        channel_mult = as_list(channel_mult)
        if not channel_mult:
            raise ValueError(f"channel_mult must be a non-empty list of ints, got {channel_mult!r}")
        levels = len(channel_mult)
        self.downsampling = 2 ** (levels - 1)  # total downsampling of the input path
        mult = [check_int(f"channel_mult[{i}]", m) for i, m in enumerate(channel_mult)]
        attn_res = as_list(attention_resolutions)
        if attn_res is None:
            raise ValueError(f"attention_resolutions must be a list of factors, got {attention_resolutions!r}")
        attn_res = {check_int("attention_resolutions", r) for r in attn_res}
        if use_spatial_transformer is False and attn_res:
            raise ValueError("use_spatial_transformer=False (ADM AttentionBlock UNets) is not supported")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if num_head_channels != -1:
            check_int("num_head_channels", num_head_channels)
        else:
            check_int("num_heads", num_heads)
        self.in_channels = check_int("in_channels", in_channels)
        self.model_channels = check_int("model_channels", model_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.num_res_blocks = per_level("num_res_blocks", num_res_blocks, levels, minimum=1)
        depths = per_level("transformer_depth", transformer_depth, levels, minimum=0)
        depth_middle = depths[-1]
        if transformer_depth_middle is not None:
            depth_middle = check_int("transformer_depth_middle", transformer_depth_middle, 0)
        if attn_res and context_dim is None:
            log.debug("UNetModel: no context_dim, cross-attention attends to the features themselves")
        disabled_sa = as_list(disable_self_attentions)
        if disabled_sa is not None and len(disabled_sa) != levels:
            raise ValueError(f"disable_self_attentions must have {levels} entries, got {disable_self_attentions!r}")
        n_attn = None if num_attention_blocks is None else per_level("num_attention_blocks", num_attention_blocks, levels)
        self.attention_resolutions = sorted(attn_res)
        self.channel_mult = mult
        self.num_classes = num_classes
        self.dropout = float(dropout)
        backend = backend_from_config(spatial_transformer_attn_type, "spatial_transformer_attn_type")

        def res(ch_in: int, ch_out: int | None = None, **kw: Any) -> ResBlock:
            return ResBlock(ch_in, emb_dim, self.dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm,
                            use_checkpoint=use_checkpoint, **kw)

        def transformer(ch: int, depth: int, disable_sa: bool) -> SpatialTransformer:
            if num_head_channels == -1:
                heads, d_head = num_heads, ch // num_heads
            else:
                heads, d_head = ch // num_head_channels, num_head_channels
            if heads * d_head != ch:
                raise ValueError(f"{ch} channels cannot be split into heads of num_heads={num_heads} / "
                                 f"num_head_channels={num_head_channels}")
            return SpatialTransformer(ch, heads, d_head, depth, self.dropout, context_dim, disable_sa,
                                      use_linear_in_transformer, backend, use_checkpoint)

        def attends(level: int, i: int) -> bool:
            return ds in attn_res and (n_attn is None or i < n_attn[level])

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = self._label_embedding(num_classes, adm_in_channels, emb_dim)

        conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        positions: dict[str, tuple[str, int, int]] = {"middle_block": ("mid", 0, 0)}
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, m in enumerate(mult):
            for i in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [res(ch, m * model_channels)]
                ch = m * model_channels
                if attends(level, i):
                    layers.append(transformer(ch, depths[level], bool(disabled_sa[level]) if disabled_sa else False))
                positions[f"input_blocks.{len(self.input_blocks)}"] = ("down", level, i)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != levels - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res(ch), transformer(ch, depth_middle, disable_middle_self_attn), res(ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(self.num_res_blocks[level] + 1):
                layers = [res(ch + chans.pop(), model_channels * m)]
                ch = model_channels * m
                if attends(level, i):
                    layers.append(transformer(ch, depths[level], bool(disabled_sa[level]) if disabled_sa else False))
                if level and i == self.num_res_blocks[level]:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                positions[f"output_blocks.{len(self.output_blocks)}"] = ("up", levels - 1 - level, i)
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )
        # plain attributes (the state dict keeps the checkpoint's keys): names for the patches
        self.block_positions = positions
        for name, module in self.named_modules():
            if isinstance(module, CrossAttention):
                module.name = name

    @staticmethod
    def _label_embedding(num_classes: Any, adm_in_channels: int | None, emb_dim: int) -> nn.Module | None:
        """sgm's ``label_emb`` for each ``num_classes`` mode (None: no vector conditioning)."""
        if num_classes is None:
            return None
        if isinstance(num_classes, str):
            if num_classes == "sequential":
                if adm_in_channels is None:
                    raise ValueError("adm_in_channels is required when num_classes is 'sequential'")
                adm = check_int("adm_in_channels", adm_in_channels)
                mlp = nn.Sequential(nn.Linear(adm, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                return nn.Sequential(mlp)
            if num_classes == "continuous":
                return nn.Linear(1, emb_dim)
            if num_classes == "timestep":
                return nn.Sequential(
                    Timestep(emb_dim // 4),
                    nn.Sequential(nn.Linear(emb_dim // 4, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)),
                )
            raise ValueError(
                f"num_classes must be an int, 'sequential', 'continuous' or 'timestep', got {num_classes!r}"
            )
        return nn.Embedding(check_int("num_classes", num_classes), emb_dim)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype the network computes in (inputs are cast to it, outputs cast back)."""
        return self.time_embed[0].weight.dtype

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlock and transformer-block activations in backward (saves memory)."""
        for module in self.modules():
            if isinstance(module, Checkpointed):
                module.use_checkpoint = bool(enabled)

    def set_attention_backend(self, backend: str | None) -> None:
        """Per-model override of the attention backend (None: follow the global setting)."""
        from .attention import _check

        name = None if backend is None else _check(backend)
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.backend = name

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | list[torch.Tensor] | None = None,
        y: torch.Tensor | None = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Predict the network output for latents ``x`` at ``timesteps`` (see the class doc)."""
        if timesteps is None:
            raise ValueError("UNetModel.forward needs timesteps")
        if kwargs:
            log.debug("UNetModel.forward: ignoring extra inputs %s", sorted(kwargs))
        if (y is not None) != (self.label_emb is not None):
            raise ValueError("y must be given if and only if the model is class-conditional (num_classes)")
        dtype = self.dtype
        timesteps = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.label_emb is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch size {y.shape[0]}, x has {x.shape[0]}")
            y = y if isinstance(self.label_emb, nn.Embedding) else y.to(dtype)
            emb = emb + self.label_emb(y)
        if isinstance(context, (list, tuple)):
            context = [c.to(dtype) for c in context]
        elif context is not None:
            context = context.to(dtype)
        patches = transformer_options.get("patches", ()) if transformer_options else ()
        for patch in patches:
            patch.prepare(self)
        h = x.to(dtype)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context, transformer_options)
            hs.append(h)
        h = self.middle_block(h, emb, context, transformer_options)
        for k, module in enumerate(self.output_blocks):
            skip = hs.pop()
            if patches:
                name = f"output_blocks.{k}"
                for patch in patches:
                    h, skip = patch.output_block(name, self.block_positions[name][1], h, skip)
            h = module(torch.cat([h, skip], dim=1), emb, context, transformer_options)
        return self.out(h).to(x.dtype)
