"""Exact tiled VAE: tiles whose outputs equal the untiled encoder/decoder (``tiled_mode: exact``).

Two things make a plain tiled decode differ from the untiled one: each tile's GroupNorm sees only
its own statistics, and a tile's convolutions see zeros past its edge. Here every GroupNorm
uses the statistics of the whole image (per sample and group, the mean and variance of its
input merged tile by tile in float64, the idea of "tiled VAE" hooks such as
multidiffusion-upscaler's), and every tile reads its input with the halo its convolutions need
(found backwards through the ops, so no overlap parameter is involved), then keeps only the
pixels whose whole receptive field is real image (or the network's own zero padding at the
image border). Every output pixel is then the untiled one up to float rounding.

The network runs block by block: the stream between ResNet blocks is held as one full-size
buffer (two while a block writes the next); a block's input is read through pending local ops
(the up/downsampling convolution, the encoder's ``conv_in``), recomputed per read rather than
stored at the higher resolution. A ResNet block takes three passes over its tiles: statistics
of its input (``norm1``), of its inner activation (``norm2``), then the output. Attention
blocks and the mid block sit at the lowest resolution and run untiled: their attention is
global, and their memory is that of the latent (with a fused SDPA kernel, linear in pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Box", "tiled_decode", "tiled_encode"]


@dataclass(frozen=True)
class Box:
    """Rows [y0, y1) and columns [x0, x1) of an ``h`` x ``w`` canvas."""

    y0: int
    y1: int
    x0: int
    x1: int
    h: int
    w: int

    def grow(self, n: int) -> Box:
        """``n`` more pixels on every side, clipped to the canvas."""
        return replace(self, y0=max(self.y0 - n, 0), y1=min(self.y1 + n, self.h),
                       x0=max(self.x0 - n, 0), x1=min(self.x1 + n, self.w))


def crop(t: torch.Tensor, have: Box, want: Box) -> torch.Tensor:
    """The part of ``t`` (covering ``have``) that covers ``want`` (inside ``have``)."""
    if not (have.y0 <= want.y0 and want.y1 <= have.y1 and have.x0 <= want.x0 and want.x1 <= have.x1):
        raise ValueError(f"tile {have} does not cover {want}")
    return t[..., want.y0 - have.y0: want.y1 - have.y0, want.x0 - have.x0: want.x1 - have.x0]


def conv3x3(conv: nn.Conv2d, t: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]:
    """A 3x3 'same' convolution on a tile; the pixel next to an edge that is not the image border
    saw the tile's padding, not the image, and is dropped."""
    out = conv(t)
    valid = replace(box, y0=box.y0 + (box.y0 > 0), y1=box.y1 - (box.y1 < box.h),
                    x0=box.x0 + (box.x0 > 0), x1=box.x1 - (box.x1 < box.w))
    return crop(out, box, valid), valid


class LocalOp(Protocol):
    """An op whose output pixel depends on a bounded neighbourhood: ``need`` gives the input box
    for an output box, ``apply`` the output over every pixel a tile determines."""

    def size(self, h: int, w: int) -> tuple[int, int]: ...

    def need(self, out: Box, h: int, w: int) -> Box: ...

    def apply(self, t: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]: ...


class Conv(LocalOp):
    """A 3x3 'same' convolution (``conv_in``)."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv

    def size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def need(self, out: Box, h: int, w: int) -> Box:
        return out.grow(1)

    def apply(self, t: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]:
        return conv3x3(self.conv, t, box)


class Up(LocalOp):
    """ldm ``Upsample``: nearest x2, then a 3x3 convolution."""

    def __init__(self, up: nn.Module):
        self.conv = up.conv if up.with_conv else None

    def size(self, h: int, w: int) -> tuple[int, int]:
        return 2 * h, 2 * w

    def need(self, out: Box, h: int, w: int) -> Box:
        if self.conv is not None:
            out = out.grow(1)
        return Box(out.y0 // 2, -(-out.y1 // 2), out.x0 // 2, -(-out.x1 // 2), h, w)

    def apply(self, t: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]:
        t = F.interpolate(t, scale_factor=2.0, mode="nearest")
        box = Box(2 * box.y0, 2 * box.y1, 2 * box.x0, 2 * box.x1, 2 * box.h, 2 * box.w)
        return conv3x3(self.conv, t, box) if self.conv is not None else (t, box)


class Down(LocalOp):
    """ldm ``Downsample``: pad (0, 1, 0, 1) and a stride-2 3x3 convolution, or 2x2 average pooling."""

    def __init__(self, down: nn.Module):
        self.conv = down.conv if down.with_conv else None

    def size(self, h: int, w: int) -> tuple[int, int]:
        return ((h - 2) // 2 + 1, (w - 2) // 2 + 1) if self.conv is not None else (h // 2, w // 2)

    def need(self, out: Box, h: int, w: int) -> Box:
        extra = 1 if self.conv is not None else 0  # output i reads rows 2i .. 2i + 2 (2i + 1 when pooling)
        return Box(2 * out.y0, min(2 * out.y1 + extra, h), 2 * out.x0, min(2 * out.x1 + extra, w), h, w)

    def apply(self, t: torch.Tensor, box: Box) -> tuple[torch.Tensor, Box]:
        even = replace(box, y0=box.y0 + box.y0 % 2, x0=box.x0 + box.x0 % 2)  # the stride's grid is the image's
        t = crop(t, box, even)
        ho, wo = self.size(box.h, box.w)
        if self.conv is None:
            t = F.avg_pool2d(t[..., : t.shape[-2] // 2 * 2, : t.shape[-1] // 2 * 2], 2, 2)
        else:
            t = self.conv(F.pad(t, (0, int(even.x1 == box.w), 0, int(even.y1 == box.h))))
        y0, x0 = even.y0 // 2, even.x0 // 2
        return t, Box(y0, y0 + t.shape[-2], x0, x0 + t.shape[-1], ho, wo)


class Stream:
    """A full-size buffer [B, C, h, w] read through pending local ops, tile by tile."""

    def __init__(self, buffer: torch.Tensor, ops: tuple[LocalOp, ...] = ()):
        self.buffer, self.ops = buffer, ops
        self.sizes = [tuple(buffer.shape[-2:])]
        for op in ops:
            self.sizes.append(op.size(*self.sizes[-1]))

    @property
    def h(self) -> int:
        return self.sizes[-1][0]

    @property
    def w(self) -> int:
        return self.sizes[-1][1]

    def then(self, op: LocalOp) -> Stream:
        return Stream(self.buffer, (*self.ops, op))

    def read(self, want: Box) -> torch.Tensor:
        """The stream's values over ``want``."""
        boxes = [want]
        for op, (h, w) in zip(reversed(self.ops), reversed(self.sizes[:-1])):
            boxes.insert(0, op.need(boxes[0], h, w))
        box = boxes[0]
        t = self.buffer[..., box.y0:box.y1, box.x0:box.x1]
        for op in self.ops:
            t, box = op.apply(t, box)
        return crop(t, box, want)


def cores(h: int, w: int, tile: int) -> list[Box]:
    """A partition of the h x w canvas into tiles of ``tile`` pixels (smaller at the far edges)."""
    return [Box(y, min(y + tile, h), x, min(x + tile, w), h, w) for y in range(0, h, tile) for x in range(0, w, tile)]


class GroupStats:
    """Whole-image GroupNorm statistics, merged tile by tile in float64 (Chan et al.'s pairwise
    update of count, mean and sum of squared deviations; per tile a one-pass ``var_mean``, so
    no tile-sized temporary)."""

    def __init__(self, norm: nn.GroupNorm):
        self.norm = norm
        self.mean = self.m2 = None
        self.count = 0

    def add(self, t: torch.Tensor) -> None:
        b, c = t.shape[:2]
        var, mean = torch.var_mean(t.float(), dim=(-2, -1), correction=0)  # per channel
        pixels = t.shape[-2] * t.shape[-1]
        var, mean = (v.double().reshape(b, self.norm.num_groups, -1) for v in (var, mean))
        group_mean = mean.mean(-1)
        m2 = (pixels * (var + (mean - group_mean[..., None]).square())).sum(-1)
        n = pixels * mean.shape[-1]
        if self.mean is None:
            self.mean, self.m2, self.count = group_mean, m2, n
            return
        total = self.count + n
        delta = group_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """``norm(t)`` with the accumulated statistics, computed in float32 (as ``GroupNorm32``)
        with one tile-sized result and no other temporary."""
        c = t.shape[1]
        per_channel = c // self.norm.num_groups
        mean = self.mean.repeat_interleave(per_channel, dim=1)
        scale = torch.rsqrt(self.m2 / self.count + self.norm.eps).repeat_interleave(per_channel, dim=1)
        bias = torch.zeros_like(mean)
        if self.norm.affine:
            scale, bias = scale * self.norm.weight.double(), bias + self.norm.bias.double()
        x = t.float() - mean.float()[..., None, None]
        x.mul_(scale.float()[..., None, None]).add_(bias.float()[..., None, None])
        return x.to(t.dtype)


class _Tiles:
    """Runs ResNet blocks and the output head over tiles of ``tile`` latent pixels."""

    def __init__(self, latent_h: int, tile: int):
        self.latent_h, self.tile = latent_h, tile

    def cores(self, h: int, w: int) -> list[Box]:
        return cores(h, w, max(1, self.tile * h // self.latent_h))

    def stats(self, norm: nn.GroupNorm, stream: Stream) -> GroupStats:
        stats = GroupStats(norm)
        for core in self.cores(stream.h, stream.w):
            stats.add(stream.read(core))
        return stats

    def resnet(self, block: nn.Module, stream: Stream) -> Stream:
        """``block(x)`` (ldm ``ResnetBlock``) as a new materialized stream."""
        s1 = self.stats(block.norm1, stream)

        def inner(core: Box) -> tuple[torch.Tensor, torch.Tensor, Box]:
            box = core.grow(1)
            x = stream.read(box.grow(1))
            h, hbox = conv3x3(block.conv1, F.silu(s1.apply(x), inplace=True), box.grow(1))
            return x, crop(h, hbox, box), box

        s2 = GroupStats(block.norm2)
        for core in self.cores(stream.h, stream.w):
            _, h, box = inner(core)
            s2.add(crop(h, box, core))
        out = None
        for core in self.cores(stream.h, stream.w):
            x, h, box = inner(core)
            h, hbox = conv3x3(block.conv2, block.dropout(F.silu(s2.apply(h), inplace=True)), box)
            if block.shortcut_name == "conv_shortcut":  # a 3x3 convolution of x
                x, xbox = conv3x3(block.conv_shortcut, x, box.grow(1))
                x = crop(x, xbox, core)
            else:
                x = crop(x, box.grow(1), core)
                x = block.nin_shortcut(x) if block.shortcut_name else x
            y = x + crop(h, hbox, core)
            if out is None:
                out = y.new_empty(y.shape[0], y.shape[1], stream.h, stream.w)
            out[..., core.y0:core.y1, core.x0:core.x1] = y
        return Stream(out)

    def head(self, norm: nn.GroupNorm, conv: nn.Conv2d, stream: Stream) -> torch.Tensor:
        """``conv(silu(norm(x)))`` over tiles."""
        stats = self.stats(norm, stream)
        out = None
        for core in self.cores(stream.h, stream.w):
            box = core.grow(1)
            y, ybox = conv3x3(conv, F.silu(stats.apply(stream.read(box)), inplace=True), box)
            y = crop(y, ybox, core)
            if out is None:
                out = y.new_empty(y.shape[0], y.shape[1], stream.h, stream.w)
            out[..., core.y0:core.y1, core.x0:core.x1] = y
        return out


def _level(tiles: _Tiles, lvl: nn.Module, stream: Stream) -> Stream:
    """One resolution level: its ResNet blocks, each followed by its (global) attention block if any."""
    for i, block in enumerate(lvl.block):
        stream = tiles.resnet(block, stream)
        if len(lvl.attn):
            stream = Stream(lvl.attn[i](stream.buffer))
    return stream


def tiled_decode(decoder: nn.Module, z: torch.Tensor, tile: int) -> torch.Tensor:
    """``decoder(z)`` (ldm ``Decoder``) over tiles of ``tile`` latent pixels (scaled per level)."""
    h = decoder.conv_in(z)
    stream = Stream(decoder.mid.block_2(decoder.mid.attn_1(decoder.mid.block_1(h))))  # global, latent size
    tiles = _Tiles(z.shape[-2], tile)
    for level in reversed(range(decoder.num_resolutions)):
        stream = _level(tiles, decoder.up[level], stream)
        if level != 0:
            stream = stream.then(Up(decoder.up[level].upsample))
    if decoder.give_pre_end:
        return stream.read(Box(0, stream.h, 0, stream.w, stream.h, stream.w))
    out = tiles.head(decoder.norm_out, decoder.conv_out, stream)
    return torch.tanh(out) if decoder.tanh_out else out


def tiled_encode(encoder: nn.Module, x: torch.Tensor, tile: int, latent_h: int) -> torch.Tensor:
    """``encoder(x)`` (ldm ``Encoder``) over tiles of ``tile`` latent pixels; the mid block and
    the output head run untiled at the latent size ``latent_h``."""
    stream = Stream(x, (Conv(encoder.conv_in),))
    tiles = _Tiles(latent_h, tile)
    for level, lvl in enumerate(encoder.down):
        stream = _level(tiles, lvl, stream)
        if level != encoder.num_resolutions - 1:
            stream = stream.then(Down(lvl.downsample))
    h = stream.read(Box(0, stream.h, 0, stream.w, stream.h, stream.w))
    h = encoder.mid.block_2(encoder.mid.attn_1(encoder.mid.block_1(h)))
    return encoder.conv_out(F.silu(encoder.norm_out(h)))
