"""Exact tiled VAE (sgm.networks.tiled): tiled decode and encode equal the untiled ones; blend mode as before.

The oracle is the untiled Encoder/Decoder (itself held equal to diffusers' AutoencoderKL in
test_networks.py); "equal" is within 1e-4 of the output's range, on random weights that make
every GroupNorm and convolution count.
"""

from __future__ import annotations

import pytest
import torch

from sgm.networks import AutoencoderKL
from sgm.networks.tiled import Box, Down, Stream, Up

from test_networks import SDXL_VAE, TINY_VAE, _randomize

TOL = 1e-4


def _vae(ddconfig: dict, seed: int = 0, **tiling) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(4, ddconfig, tiled=True, **tiling).eval()
    _randomize(vae, seed)
    return vae


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the range of ``b``."""
    return float((a - b).abs().max() / (b.max() - b.min()))


# tiny: 2 levels (2x), attention inside the levels (global, untiled) and in the mid block
TINY_ATTN = dict(TINY_VAE["ddconfig"], attn_resolutions=[16], num_res_blocks=2)
# no resampling convolutions: nearest upsampling alone, 2x2 average pooling
TINY_POOL = dict(TINY_VAE["ddconfig"], resamp_with_conv=False, ch_mult=[1, 2, 1])
# the SDXL VAE's architecture (4 levels, 8x, 2 blocks, 32-group norms) at a quarter of its width
SDXL_NARROW = dict(SDXL_VAE["ddconfig"], ch=32, attn_type="vanilla")


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    return _vae(TINY_ATTN)


@pytest.mark.parametrize("tile, size", [(8, (20, 20)), (7, (20, 17)), (5, (13, 22)), (19, (20, 20))])
def test_exact_decode_equals_untiled(tiny, tile, size):
    tiny.set_tiling(True, tile_size=tile, tile_overlap=min(4, tile - 1))
    z = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(tile))
    with torch.no_grad():
        full, tiled = tiny.decode(z, tiled=False), tiny.decode(z)
    assert tiled.shape == full.shape == (2, 3, 2 * size[0], 2 * size[1])
    assert _err(tiled, full) < TOL


@pytest.mark.parametrize("tile, size", [(8, (40, 40)), (4, (26, 38))])
def test_exact_encode_equals_untiled(tiny, tile, size):
    tiny.set_tiling(True, tile_size=tile)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(tile)) * 2 - 1
    with torch.no_grad():
        full, tiled = tiny.encode_posterior(x, tiled=False), tiny.encode_posterior(x)
    assert tiled.mean.shape == full.mean.shape == (2, 4, size[0] // 2, size[1] // 2)
    assert _err(tiled.mean, full.mean) < TOL and _err(tiled.logvar, full.logvar) < TOL


def test_exact_tiles_without_resampling_convolutions():
    vae = _vae(TINY_POOL, seed=1, tile_size=3)
    z = torch.randn(1, 4, 11, 9, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 44, 36, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert _err(vae.decode(z), vae.decode(z, tiled=False)) < TOL
        assert _err(vae.encode(x), vae.encode(x, tiled=False)) < TOL


def test_exact_tiles_on_the_sdxl_architecture():
    """8x VAE with the SDXL layout: a 10x9 latent (80x72 image) in 6-latent tiles (48 px at full size)."""
    vae = _vae(SDXL_NARROW, seed=2, tile_size=6)
    z = torch.randn(1, 4, 10, 9, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 80, 72, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        full, tiled = vae.decode(z, tiled=False), vae.decode(z)
        enc_full, enc_tiled = vae.encode_posterior(x, tiled=False), vae.encode_posterior(x)
    assert tiled.shape == (1, 3, 80, 72) and enc_tiled.mean.shape == (1, 4, 10, 9)
    assert _err(tiled, full) < TOL
    assert _err(enc_tiled.mean, enc_full.mean) < TOL and _err(enc_tiled.logvar, enc_full.logvar) < TOL


def test_blend_mode_is_the_independent_tile_blend(tiny):
    """``tiled_mode=blend`` is the earlier decode: overlapping tiles decoded alone and blended."""
    tiny.set_tiling(True, tile_size=8, tile_overlap=4, mode="blend")
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        blend, full = tiny.decode(z), tiny.decode(z, tiled=False)
        torch.testing.assert_close(blend, tiny._tiled_decode(z), rtol=0, atol=0)
        x = torch.rand(1, 3, 40, 40) * 2 - 1
        torch.testing.assert_close(tiny.encode(x), tiny.encode(x, tiled=False), rtol=0, atol=0)  # blend: decode only
    assert _err(blend, full) > 100 * TOL  # independent statistics: visibly different
    tiny.set_tiling(True, mode="exact")
    with pytest.raises(ValueError, match="tiled_mode"):
        tiny.set_tiling(True, mode="seamless")


def test_local_ops_read_exactly_what_the_module_computes():
    """The halo rules of the resampling ops: any box read through them equals the module's output there."""
    from sgm.networks.vae import Downsample, Upsample

    torch.manual_seed(0)
    x = torch.randn(1, 32, 13, 10)
    for module, op in ((Upsample(32), Up), (Downsample(32), Down), (Downsample(32, with_conv=False), Down)):
        with torch.no_grad():
            full = module(x)
            stream = Stream(x, (op(module),))
            assert (stream.h, stream.w) == tuple(full.shape[-2:])
            for box in (Box(0, 3, 1, 4, stream.h, stream.w), Box(2, stream.h, 0, stream.w, stream.h, stream.w),
                        Box(1, 2, stream.w - 1, stream.w, stream.h, stream.w)):
                torch.testing.assert_close(stream.read(box), full[..., box.y0:box.y1, box.x0:box.x1],
                                           rtol=1e-6, atol=1e-6)


def test_tiling_settings_come_from_the_first_stage_config(compose):
    cfg = compose("sample", ["model=sdxl_base"])
    node = cfg.model.first_stage
    assert node.tiled is False and node.tiled_mode == "exact" and node.tile_size == 64
