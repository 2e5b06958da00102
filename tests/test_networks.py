"""sgm.networks: checkpoint key layout, agreement with diffusers, attention backends, checkpointing, tiling."""

from __future__ import annotations

import logging

import pytest
import torch

from sgm.networks import AutoencoderKL, DiagonalGaussianDistribution, IdentityFirstStage, UNetModel
from sgm.networks import attention as attn_mod
from sgm.networks.util import timestep_embedding

from _nets_convert import diffusers_unet_config, unet_to_diffusers, vae_to_diffusers

from _paths import REFERENCE as REF

SDXL_BASE = dict(
    adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4, out_channels=4,
    model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
    num_head_channels=64, use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
    spatial_transformer_attn_type="softmax-xformers", legacy=False,
)
SDXL_REFINER = dict(
    adm_in_channels=2560, num_classes="sequential", use_checkpoint=True, in_channels=4, out_channels=4,
    model_channels=384, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
    num_head_channels=64, use_linear_in_transformer=True, transformer_depth=4, context_dim=[1280, 1280, 1280, 1280],
    spatial_transformer_attn_type="softmax-xformers", legacy=False,
)
SDXL_VAE = dict(
    embed_dim=4, monitor="val/rec_loss", lossconfig={"target": "torch.nn.Identity"},
    ddconfig=dict(attn_type="vanilla-xformers", double_z=True, z_channels=4, resolution=256, in_channels=3,
                  out_ch=3, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
)
TINY = dict(
    adm_in_channels=40, num_classes="sequential", in_channels=4, out_channels=4, model_channels=32,
    attention_resolutions=[2], num_res_blocks=2, channel_mult=[1, 2], num_head_channels=8,
    use_linear_in_transformer=True, transformer_depth=[1, 2], context_dim=24,
)
TINY_VAE = dict(
    embed_dim=4,
    ddconfig=dict(attn_type="vanilla", double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3,
                  ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
)


def _tsv(name: str, prefix: str) -> dict[str, str]:
    rows = {}
    for line in (REF / f"{name}.keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        if key.startswith(prefix):
            rows[key[len(prefix):]] = shape
    return rows


def _shapes(module: torch.nn.Module) -> dict[str, str]:
    return {k: "scalar" if v.ndim == 0 else "x".join(map(str, v.shape)) for k, v in module.state_dict().items()}


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Random weights everywhere (zero-initialized output convs would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in**0.5 * (3 if p.ndim > 1 else 1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _unet_inputs(cfg: dict, batch: int = 2, size: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, cfg["in_channels"], size, size, generator=g),
        timesteps=torch.tensor([3.0, 817.5])[:batch],
        context=torch.randn(batch, 7, cfg["context_dim"], generator=g),
        y=torch.randn(batch, cfg["adm_in_channels"], generator=g),
    )


@pytest.fixture
def fresh_fallback_log(monkeypatch):
    monkeypatch.setitem(attn_mod._state, "xformers_warned", False)
    monkeypatch.setitem(attn_mod._state, "default", "sdpa")
    monkeypatch.setitem(attn_mod._state, "forced", None)


# ---------------------------------------------------------------- checkpoint layout (meta device)

@pytest.mark.parametrize("name,cfg", [("sd_xl_base_1.0", SDXL_BASE), ("sd_xl_refiner_1.0", SDXL_REFINER)])
def test_unet_keys_and_shapes_match_checkpoint(name, cfg):
    with torch.device("meta"):
        model = UNetModel(**cfg)
    assert _shapes(model) == _tsv(name, "model.diffusion_model.")


@pytest.mark.parametrize("name", ["sd_xl_base_1.0", "sd_xl_refiner_1.0"])
def test_vae_keys_and_shapes_match_checkpoint(name):
    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE)
    assert _shapes(vae) == _tsv(name, "first_stage_model.")


def test_meta_build_then_assign_load_runs():
    torch.manual_seed(0)
    ref = UNetModel(**TINY)
    _randomize(ref)
    with torch.device("meta"):
        model = UNetModel(**TINY)
    model.load_state_dict(ref.state_dict(), assign=True)
    inputs = _unet_inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), ref(**inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- agreement with diffusers

def _compare_unet_with_diffusers(cfg: dict, attn_levels: list[bool]) -> float:
    from diffusers import UNet2DConditionModel

    ours = UNetModel(**cfg).eval()
    _randomize(ours)
    theirs = UNet2DConditionModel(**diffusers_unet_config(cfg, attn_levels)).eval()
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg["num_res_blocks"], len(cfg["channel_mult"])), strict=True)
    inp = _unet_inputs(cfg)
    with torch.no_grad():
        a = ours(**inp)
        b = theirs(inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"], class_labels=inp["y"]).sample
    assert b.abs().max() > 1e-2  # a non-trivial output
    return _rel(a, b)


def test_unet_matches_diffusers_linear_projection():
    assert _compare_unet_with_diffusers(TINY, attn_levels=[False, True]) < 1e-5


def test_unet_matches_diffusers_conv_projection():
    cfg = dict(TINY, use_linear_in_transformer=False, attention_resolutions=[1, 2], transformer_depth=1, num_res_blocks=1)
    assert _compare_unet_with_diffusers(cfg, attn_levels=[True, True]) < 1e-5


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 999.0, 12.25])
    for dim in (32, 33):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(t, dim), ref, rtol=1e-6, atol=1e-6)


def test_vae_matches_diffusers():
    from diffusers import AutoencoderKL as DiffusersVAE

    ours = AutoencoderKL(**TINY_VAE).eval()
    _randomize(ours)
    dd = TINY_VAE["ddconfig"]
    levels = len(dd["ch_mult"])
    theirs = DiffusersVAE(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
        layers_per_block=dd["num_res_blocks"], latent_channels=dd["z_channels"], norm_num_groups=32, sample_size=32,
    ).eval()
    theirs.load_state_dict(vae_to_diffusers(ours.state_dict(), levels), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        post, dist = ours.encode_posterior(x), theirs.encode(x).latent_dist
        assert _rel(post.mean, dist.mean) < 1e-5 and _rel(post.logvar, dist.logvar) < 1e-5
        z = post.mean
        assert _rel(ours.decode(z), theirs.decode(z).sample) < 1e-5
        torch.testing.assert_close(ours.encode(x), post.mean)
        g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
        sampled = ours.encode(x, generator=g())
        torch.testing.assert_close(sampled, post.sample(g()))
        torch.testing.assert_close(ours.encode(x, sample=False, generator=g()), post.mean)
    assert ours.downsample_factor == 2


# ---------------------------------------------------------------- attention backends

def test_attention_backends_agree(fresh_fallback_log):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4 * 16, generator=g) for n in (10, 13, 13))
    sdpa = attn_mod.attention(q, k, v, heads=4, backend="sdpa")
    math = attn_mod.attention(q, k, v, heads=4, backend="math")
    torch.testing.assert_close(sdpa, math, rtol=1e-5, atol=1e-5)

    model = UNetModel(**TINY).eval()
    _randomize(model)
    inp = _unet_inputs(TINY)
    with torch.no_grad():
        base = model(**inp)
        with attn_mod.attention_backend("math"):
            assert attn_mod.get_attention_backend() == "math"
            forced = model(**inp)
        attn_mod.set_attention_backend("math")
        default_math = model(**inp)
        attn_mod.set_attention_backend("sdpa")
        model.set_attention_backend("math")  # per-model override
        override = model(**inp)
    for out in (forced, default_math, override):
        assert _rel(out, base) < 1e-5
    with pytest.raises(ValueError, match="backend"):
        attn_mod.set_attention_backend("flash-magic")


def test_softmax_xformers_falls_back_once(fresh_fallback_log, monkeypatch, caplog):
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: False)
    cfg = dict(TINY, spatial_transformer_attn_type="softmax-xformers")
    with caplog.at_level(logging.WARNING, logger="sgm.networks.attention"):
        model = UNetModel(**cfg).eval()
        UNetModel(**cfg)
        AutoencoderKL(**dict(TINY_VAE, ddconfig=dict(TINY_VAE["ddconfig"], attn_type="vanilla-xformers")))
        with torch.no_grad():
            out = model(**_unet_inputs(cfg))
    records = [r for r in caplog.records if "xformers" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert torch.isfinite(out).all()
    assert attn_mod.resolve_backend("xformers") == "sdpa"


# ---------------------------------------------------------------- gradient checkpointing

def test_gradient_checkpointing_gives_equal_gradients():
    model = UNetModel(**dict(TINY, num_res_blocks=1))
    _randomize(model)
    inp = _unet_inputs(TINY, size=8)
    inp["context"].requires_grad_(True)

    def grads(enabled: bool) -> list[torch.Tensor]:
        model.zero_grad()
        inp["context"].grad = None
        model.set_gradient_checkpointing(enabled)
        model(**inp).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()] + [inp["context"].grad.clone()]

    plain, ckpt = grads(False), grads(True)
    assert all(b.use_checkpoint for b in model.modules() if hasattr(b, "maybe_checkpoint"))
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- autoencoder details

def test_tiled_decode_blending_is_exact_for_a_pointwise_decoder(monkeypatch):
    vae = AutoencoderKL(**TINY_VAE, tiled=True, tile_size=16, tile_overlap=8, tiled_mode="blend")
    monkeypatch.setattr(vae, "_decode", lambda z: torch.nn.functional.interpolate(z[:, :3] ** 3, scale_factor=2))
    z = torch.randn(2, 4, 40, 37)
    assert _rel(vae.decode(z), vae.decode(z, tiled=False)) < 1e-6
    with pytest.raises(ValueError, match="tile_overlap"):
        vae.set_tiling(True, tile_size=8, tile_overlap=8)


def _smooth_texture(n: int, period: float = 8.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    w = 2 * torch.pi / period
    return torch.stack([torch.sin(w * yy + c) + torch.cos(w * xx - 2 * c) for c in range(4)])[None]


def test_tiled_decode_close_to_full_decode_on_smooth_latent():
    """Blend tiling is approximate: each tile has its own GroupNorm statistics and mid-block attention.

    Measured on this random VAE (4 channels per norm group), 40x40 smooth periodic latent, 24-pixel
    tiles with 8 overlap: max error 18% and mean error 7% of the output scale; diffusers'
    ``enable_tiling`` on the same weights and tile grid gives 36% / 14%. A random VAE is much
    less tile-friendly than a trained one; the bound below guards against seams and misplaced tiles.
    """
    from diffusers import AutoencoderKL as DiffusersVAE

    torch.manual_seed(0)
    vae = AutoencoderKL(4, dict(TINY_VAE["ddconfig"], ch=128, ch_mult=[1, 1]), tiled=True, tile_size=24, tile_overlap=8,
                        tiled_mode="blend")
    vae.eval()
    theirs = DiffusersVAE(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(128, 128), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=48,  # 24-latent tiles, overlap 0.25
    ).eval()
    theirs.load_state_dict(vae_to_diffusers(vae.state_dict(), 2), strict=True)
    theirs.enable_tiling()
    z = _smooth_texture(40)
    with torch.no_grad():
        full = vae.decode(z, tiled=False)
        tiled = vae.decode(z)
        reference_tiled = theirs.decode(z).sample
        small = vae.decode(z[..., :24, :24])  # fits one tile: no tiling
    assert tiled.shape == full.shape == (1, 3, 80, 80)
    mean_err = float((tiled - full).abs().mean() / full.abs().mean())
    assert _rel(tiled, full) < 0.25 and mean_err < 0.1
    assert _rel(tiled, full) < _rel(reference_tiled, full)
    torch.testing.assert_close(small, vae.decode(z[..., :24, :24], tiled=False), rtol=0, atol=0)


def test_diagonal_gaussian():
    params = torch.cat([torch.randn(2, 4, 3, 3), torch.full((2, 4, 3, 3), 50.0)], dim=1)
    dist = DiagonalGaussianDistribution(params)
    assert dist.logvar.max() == 20.0
    a = dist.sample(generator=torch.Generator().manual_seed(5))
    b = dist.sample(generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    zero = DiagonalGaussianDistribution(torch.zeros(1, 8, 2, 2))
    torch.testing.assert_close(zero.kl(), torch.zeros(1))
    torch.testing.assert_close(zero.mode(), torch.zeros(1, 4, 2, 2))


def test_identity_first_stage():
    x = torch.randn(1, 3, 4, 4)
    stage = IdentityFirstStage(whatever=1)
    assert stage.encode(x) is x and stage.decode(x) is x


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize(
    "override,param",
    [
        (dict(channel_mult=[]), "channel_mult"),
        (dict(transformer_depth=[1, 2, 3]), "transformer_depth"),
        (dict(spatial_transformer_attn_type="linear"), "spatial_transformer_attn_type"),
        (dict(num_head_channels=0), "num_head_channels"),
        (dict(num_classes="bogus"), "num_classes"),
        (dict(adm_in_channels=None), "adm_in_channels"),
        (dict(num_head_channels=12), "num_head_channels"),
        (dict(context_dim=[24, 16, 8]), "context_dim"),
        (dict(dims=3), "dims"),
    ],
)
def test_unet_rejects_impossible_params(override, param):
    with pytest.raises(ValueError, match=param):
        with torch.device("meta"):
            UNetModel(**dict(TINY, **override))


def test_unet_accepts_harmless_original_params(caplog):
    with caplog.at_level(logging.DEBUG, logger="sgm.networks.util"), torch.device("meta"):
        UNetModel(**dict(TINY, use_fp16=True, legacy=True, num_heads_upsample=-1, use_fairscale_checkpoint=False))
    assert any("use_fp16" in r.getMessage() for r in caplog.records)


def test_vae_rejects_impossible_params():
    with pytest.raises(ValueError, match="ch_mult"):
        AutoencoderKL(4, dict(TINY_VAE["ddconfig"], ch_mult=[]))
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(4, dict(TINY_VAE["ddconfig"], double_z=False))
