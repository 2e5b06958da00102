"""Encoder and Decoder of the KL autoencoder (Rombach et al. 2022, LDM; ldm/sgm ``diffusionmodules/model.py``).

Key layout: ``conv_in``, ``down.N.block.N.{norm1,conv1,norm2,conv2,nin_shortcut}``,
``down.N.attn.N``, ``down.N.downsample.conv``, ``mid.{block_1,attn_1,block_2}``,
``norm_out``, ``conv_out``; the decoder mirrors it with ``up.N.upsample.conv`` (``up.0`` is
the full-resolution level). Attention blocks hold ``norm``, ``q``, ``k``, ``v``, ``proj_out``
as 1x1 convolutions. All norms are 32-group GroupNorm with eps 1e-6.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, backend_from_config
from .util import as_list, check_int, dropout_layer, normalization

log = logging.getLogger(__name__)


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - ldm name
    return normalization(channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a (1x1 ``nin_shortcut``) skip."""

    def __init__(
        self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0, conv_shortcut: bool = False
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = dropout_layer(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut_name: str | None = None
        if in_channels != out_channels:
            self.shortcut_name = "conv_shortcut" if conv_shortcut else "nin_shortcut"
            kernel = 3 if conv_shortcut else 1
            self.add_module(self.shortcut_name, nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.shortcut_name is not None:
            x = getattr(self, self.shortcut_name)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, channels: int, backend: str | None = None):
        super().__init__()
        self.backend = backend
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (conv(hn).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # [B, HW, C]
        out = attention(q, k, v, heads=1, backend=self.backend)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution: pad (0, 1, 0, 1) then a stride-2 3x3 ``conv`` without padding, or 2x2 avg-pool."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class Upsample(nn.Module):
    """Double the resolution: nearest x2, then a 3x3 ``conv``."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def make_attn(channels: int, attn_type: str) -> nn.Module:
    """ldm's ``make_attn``: "vanilla"/"vanilla-xformers"/a backend name -> AttnBlock; "none" -> Identity."""
    if attn_type == "none":
        return nn.Identity()
    if attn_type == "linear":
        raise ValueError("attn_type 'linear' (LinAttnBlock) is not supported")
    return AttnBlock(channels, backend_from_config(attn_type, "attn_type"))


class _Level(nn.Module):
    """One resolution level: ``block`` and ``attn`` lists, and a resampler (named by the owner)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


def _check_ddconfig(ch: int, ch_mult: Any, num_res_blocks: int, attn_resolutions: Any) -> tuple[list[int], list[int]]:
    mult = as_list(ch_mult)
    if not mult:
        raise ValueError(f"ch_mult must be a non-empty list of ints, got {ch_mult!r}")
    mult = [check_int(f"ch_mult[{i}]", m) for i, m in enumerate(mult)]
    check_int("ch", ch)
    check_int("num_res_blocks", num_res_blocks)
    attn_res = as_list(attn_resolutions)
    if attn_res is None:
        raise ValueError(f"attn_resolutions must be a list, got {attn_resolutions!r}")
    return mult, [int(r) for r in attn_res]


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2 z_channels (double_z), H / 2^(L-1), W / 2^(L-1)]."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: list[int] = (1, 2, 4, 8),  # type: ignore[assignment]
        num_res_blocks: int,
        attn_resolutions: list[int] = (),  # type: ignore[assignment]
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        attn_type: str = "vanilla",
        **ignored: Any,
    ):
        super().__init__()
        mult, attn_res = _check_ddconfig(ch, ch_mult, num_res_blocks, attn_resolutions)
        if ignored:
            log.debug("Encoder: ignoring %s", sorted(ignored))
        self.num_resolutions = len(mult)
        self.num_res_blocks = num_res_blocks
        self.ch_mult = mult
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        res = resolution
        in_mult = (1, *mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            lvl = _Level()
            block_in, block_out = ch * in_mult[level], ch * mult[level]
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_res:
                    lvl.attn.append(make_attn(block_in, attn_type))
            if level != self.num_resolutions - 1:
                lvl.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, lvl in enumerate(self.down):
            for i, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn):
                    h = lvl.attn[i](h)
            if level != self.num_resolutions - 1:
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h 2^(L-1), w 2^(L-1)]."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: list[int] = (1, 2, 4, 8),  # type: ignore[assignment]
        num_res_blocks: int,
        attn_resolutions: list[int] = (),  # type: ignore[assignment]
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attn_type: str = "vanilla",
        **ignored: Any,
    ):
        super().__init__()
        mult, attn_res = _check_ddconfig(ch, ch_mult, num_res_blocks, attn_resolutions)
        ignored.pop("in_channels", None)
        ignored.pop("double_z", None)
        if ignored:
            log.debug("Decoder: ignoring %s", sorted(ignored))
        self.num_resolutions = len(mult)
        self.ch_mult = mult
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        block_in = ch * mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        levels: list[_Level] = []
        for level in reversed(range(self.num_resolutions)):
            lvl = _Level()
            block_out = ch * mult[level]
            for _ in range(num_res_blocks + 1):
                lvl.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_res:
                    lvl.attn.append(make_attn(block_in, attn_type))
            if level != 0:
                lvl.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            levels.insert(0, lvl)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            lvl = self.up[level]
            for i, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn):
                    h = lvl.attn[i](h)
            if level != 0:
                h = lvl.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
