"""Inpainting and outpainting (sgm.inpaint): masks against scipy and diffusers' mask processor,
latent-mask blending on several samplers against the per-step formula, the 9-channel inpainting
UNet's input against diffusers, and runs on the shipped model; bad input fails before weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import save_file

from sgm.diffusion.noise import gaussian, seeded_generators
from sgm.diffusion.schedule import initial_latent
from sgm.inpaint import LatentBlend
from sgm.inpaint.mask import binarize, blur, grow, latent_mask, mask_from_pil, mask_to_tensor, pad_outpaint
from sgm.inpaint.unet9 import FIRST_CONV, mask_and_masked_latents
from sgm.engine import DiffusionEngine
from sgm.networks import AutoencoderKL, UNetModel
from sgm.networks.wrapper import OpenAIWrapper

from _nets_convert import diffusers_unet_config, unet_to_diffusers, vae_to_diffusers
from test_networks import TINY, TINY_VAE, _randomize, _rel
from test_sample_reliability import QUIET, WeightsRead, no_weights, previous_run, run_sample  # noqa: F401

DIGIT_RUN = [*QUIET, "~metrics", "steps=8", "num_images_per_prompt=1"]


def _gray(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L")


# ------------------------------------------------------------------ masks

def test_mask_reading_white_repaints_and_transparency_is_the_mask():
    grey = Image.fromarray(np.array([[0, 255], [128, 64]], dtype=np.uint8), "L")
    np.testing.assert_array_equal(np.asarray(mask_from_pil(grey)), np.asarray(grey))
    rgba = Image.new("RGBA", (2, 2), (255, 255, 255, 255))
    rgba.putpixel((1, 0), (255, 255, 255, 0))  # transparent: repaint
    assert np.asarray(mask_from_pil(rgba)).tolist() == [[0, 255], [0, 0]]
    opaque = Image.new("RGBA", (2, 2), (255, 255, 255, 255))  # no transparency: luminance (white)
    assert np.asarray(mask_from_pil(opaque)).tolist() == [[255, 255], [255, 255]]


def test_grow_is_grey_dilation_with_a_disk():
    from scipy import ndimage

    m = torch.zeros(1, 1, 20, 17)
    m[0, 0, 5, 4] = 1.0
    m[0, 0, 12:15, 10:12] = 0.6
    r = 3
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    ref = ndimage.grey_dilation(m[0, 0].numpy(), footprint=yy**2 + xx**2 <= r * r, mode="constant", cval=0.0)
    np.testing.assert_array_equal(grow(m, r)[0, 0].numpy(), ref)
    assert float(grow(m, r).sum()) > float(m.sum())


@pytest.mark.parametrize("sigma", [0.7, 2.5])
def test_blur_is_scipy_gaussian_filter(sigma):
    from scipy import ndimage

    m = (torch.rand(1, 1, 19, 23, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    ref = ndimage.gaussian_filter(m[0, 0].double().numpy(), sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(blur(m, sigma)[0, 0].numpy(), ref, atol=1e-6)


def test_mask_processing_matches_diffusers_mask_processor():
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=4, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    for size, (h, w) in [((40, 24), (32, 16)), ((32, 16), (32, 16))]:
        pil = _gray(1, size)
        ours = binarize(mask_to_tensor(mask_from_pil(pil), h, w))
        theirs = proc.preprocess(pil, height=h, width=w)
        assert theirs.shape == ours.shape == (1, 1, h, w)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        assert 0 < float(ours.mean()) < 1


def test_outpaint_pads_with_edges_and_masks_the_new_area():
    image = torch.arange(6.0).reshape(1, 1, 2, 3).expand(1, 3, 2, 3)
    padded, mask = pad_outpaint(image, torch.zeros(1, 1, 2, 3), (2, 1, 0, 0))
    assert padded.shape == (1, 3, 3, 5) and mask.shape == (1, 1, 3, 5)
    assert padded[0, 0, 0].tolist() == [0, 0, 0, 1, 2] and padded[0, 0, 2].tolist() == [3, 3, 3, 4, 5]
    assert mask[0, 0].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]


def test_latent_mask_is_the_share_of_each_cell():
    m = torch.zeros(1, 1, 8, 8)
    m[..., :, 5:] = 1.0
    lat = latent_mask(m, (2, 2))
    assert lat[0, 0].tolist() == [[0.0, 0.75], [0.0, 0.75]]


# ------------------------------------------------------------------ latent blending

def _toy_denoise(calls: list):
    """A smooth, spatially mixing x0 'network' (each output pixel reads its neighbours), recording inputs."""

    def denoise(x, sigma, cond):
        calls.append((x.clone(), sigma.clone()))
        s = sigma.reshape(-1, 1, 1, 1)
        return (x + 0.5 * torch.roll(x, 1, dims=-1) + 0.3 * cond["crossattn"].reshape(-1, 1, 1, 1)) / (1.5 + s**2)

    return denoise


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(2, 4, 6, 6, generator=g)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :, 3:] = 1.0
    noise = gaussian((2, 4, 6, 6), seeded_generators([7, 8]))
    cond = {"crossattn": torch.tensor([1.0, -1.0])}
    uc = {"crossattn": torch.tensor([0.0, 0.0])}
    return z0, mask, noise, cond, uc


SAMPLERS = ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "euler_a"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_blend_keeps_the_known_region_for_every_kind_of_sampler(compose, name):
    """Every network input holds z0 + sigma * noise (the run's one noise tensor) in the known region,
    the result holds z0 there exactly, and an all-ones mask is the plain sampler."""
    cfg = compose("sample", [f"sampler={name}"])
    sampler = instantiate(cfg.sampler)
    sigmas = torch.tensor([8.0, 3.0, 1.2, 0.4, 0.1, 0.0])
    z0, mask, noise, cond, uc = _setup()
    x = initial_latent(noise, sigmas[0], z0)
    calls: list = []
    blend = LatentBlend(mask, z0).with_noise(noise)
    out = blend.finish(sampler.sample(blend.wrap(_toy_denoise(calls)), x, sigmas, cond, uc,
                                      generator=seeded_generators([1, 2])))
    known = mask.expand_as(z0) == 0
    assert calls
    for x_in, sigma in calls:
        n = x_in.shape[0] // 2
        s = sigma.reshape(-1, 1, 1, 1)
        ref = z0.repeat(n, 1, 1, 1) + s * noise.repeat(n, 1, 1, 1)
        torch.testing.assert_close(x_in[known.repeat(n, 1, 1, 1)], ref[known.repeat(n, 1, 1, 1)], rtol=0, atol=1e-6)
    assert torch.equal(out[known], z0[known])
    assert (out[~known] - z0[~known]).abs().mean() > 0.1
    ones = LatentBlend(torch.ones_like(mask), z0).with_noise(noise)
    plain = sampler.sample(_toy_denoise([]), x, sigmas, cond, uc, generator=seeded_generators([1, 2]))
    blended = ones.finish(sampler.sample(ones.wrap(_toy_denoise([])), x, sigmas, cond, uc,
                                         generator=seeded_generators([1, 2])))
    torch.testing.assert_close(blended, plain, rtol=0, atol=0)


def test_blend_is_the_per_step_formula_for_euler(compose):
    """Euler through the wrapper equals the published per-step rule written out:
    x <- m * x + (1 - m) * (z0 + sigma_next * noise) after each step (diffusers, A1111)."""
    sampler = instantiate(compose("sample", ["sampler=euler", "guider=identity"]).sampler)
    sigmas = torch.tensor([8.0, 3.0, 1.2, 0.4, 0.1, 0.0])
    z0, mask, noise, cond, _ = _setup(1)
    x = initial_latent(noise, sigmas[0], z0)
    blend = LatentBlend(mask, z0).with_noise(noise)
    ours = blend.finish(sampler.sample(blend.wrap(_toy_denoise([])), x, sigmas, cond, cond))
    denoise = _toy_denoise([])
    ref = mask * x + (1 - mask) * (z0 + sigmas[0] * noise)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (ref - denoise(ref, s.expand(2), cond)) / s
        ref = ref + d * (s_next - s)
        ref = mask * ref + (1 - mask) * (z0 + s_next * noise)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the 9-channel inpainting UNet

@pytest.fixture(scope="module")
def tiny_engine():
    """An engine around test_networks' tiny VAE (2x downsampling); the other parts are placeholders."""
    torch.manual_seed(3)
    vae = AutoencoderKL(**TINY_VAE)
    _randomize(vae, seed=3)
    return DiffusionEngine(network=UNetModel(**TINY), denoiser=torch.nn.Identity(), conditioner=torch.nn.Identity(),
                           first_stage=vae, scale_factor=0.7).eval()


def _diffusers_vae(engine):
    from diffusers import AutoencoderKL as DiffusersVAE

    dd = TINY_VAE["ddconfig"]
    vae = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
                       layers_per_block=dd["num_res_blocks"], latent_channels=4, norm_num_groups=32, sample_size=32,
                       scaling_factor=engine.scale_factor, force_upcast=False).eval()
    vae.load_state_dict(vae_to_diffusers(engine.first_stage_model.state_dict(), 2), strict=True)
    return vae


def test_mask_and_masked_image_latents_match_diffusers_prepare_mask_latents(tiny_engine):
    import types

    from diffusers import StableDiffusionXLInpaintPipeline as Pipe
    from diffusers.image_processor import VaeImageProcessor

    H, W = 16, 12
    rng = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, H, W, generator=rng) * 2 - 1
    pil = _gray(2, (W + 8, H + 8))
    mask = mask_to_tensor(mask_from_pil(pil), H, W)
    fake = types.SimpleNamespace(vae=_diffusers_vae(tiny_engine), vae_scale_factor=2)
    fake._encode_vae_image = types.MethodType(Pipe._encode_vae_image, fake)
    proc = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    their_mask = proc.preprocess(pil, height=H, width=W)
    with torch.no_grad():
        m_ref, lat_ref = Pipe.prepare_mask_latents(fake, their_mask, image * (their_mask < 0.5), 2, H, W,
                                                   torch.float32, "cpu", torch.Generator().manual_seed(9), True)
        m, lat = mask_and_masked_latents(tiny_engine, image, mask, torch.Generator().manual_seed(9))
        _, lat_mode = mask_and_masked_latents(tiny_engine, image, mask)
    assert m_ref.shape == (4, 1, 8, 6) and lat_ref.shape == (4, 4, 8, 6)
    torch.testing.assert_close(m, m_ref[:1], rtol=0, atol=1e-4)
    torch.testing.assert_close(lat, lat_ref[:1], rtol=0, atol=1e-4)
    assert 0 < float(m.mean()) < 1 and (lat - lat_mode).abs().max() > 1e-3  # a posterior sample, not the mode


def test_nine_channel_unet_call_matches_diffusers():
    from diffusers import UNet2DConditionModel

    cfg = dict(TINY, in_channels=9)
    ours = UNetModel(**cfg).eval()
    _randomize(ours)
    theirs = UNet2DConditionModel(**diffusers_unet_config(cfg, [False, True])).eval()
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg["num_res_blocks"], 2), strict=True)
    g = torch.Generator().manual_seed(5)
    x, extra = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 16, 16, generator=g)
    t, ctx, y = torch.tensor([3.0, 817.5]), torch.randn(2, 7, 24, generator=g), torch.randn(2, 40, generator=g)
    with torch.no_grad():
        a = OpenAIWrapper(ours)(x, t, {"concat": extra, "crossattn": ctx, "vector": y})
        b = theirs(torch.cat([x, extra], 1), t, encoder_hidden_states=ctx, class_labels=y).sample
    assert a.shape == (2, 4, 16, 16) and b.abs().max() > 1e-2
    assert _rel(a, b) < 1e-5


# ------------------------------------------------------------------ runs (shipped model, tiny 9-channel)

@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A generated "three" (the shipped model, 8 steps) and a mask of its right half."""
    from conftest import run_task

    out = tmp_path_factory.mktemp("three")
    run_task("sample", [*DIGIT_RUN, "prompt=a handwritten digit three"], out, files=False)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask, "L").save(out / "right_half.png")
    return out / "00000.png", out / "right_half.png"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_inpainting_repaints_the_masked_half_and_keeps_the_rest(three, tmp_path):
    init, mask = three
    out = tmp_path / "run"
    run_sample(out, *DIGIT_RUN[2:], "~metrics", "prompt=a handwritten digit eight", f"init_image={init}",
               f"mask={mask}")
    before, after = _pixels(init), _pixels(out / "00000.png")
    assert np.array_equal(after[:, :16], before[:, :16])  # pasted back: exact
    assert np.abs(after[:, 16:] - before[:, 16:]).mean() > 5


@pytest.mark.slow
def test_without_paste_back_the_kept_half_is_the_vaes_reconstruction(three, tmp_path):
    init, mask = three
    before = _pixels(init)
    out2 = tmp_path / "no_paste"
    run_sample(out2, *DIGIT_RUN[2:], "~metrics", "prompt=a handwritten digit eight", f"init_image={init}",
               f"mask={mask}", "inpaint_paste=false", "mask_blur=1.5")
    kept = _pixels(out2 / "00000.png")[:, :12]  # the VAE's reconstruction of the kept area
    assert 0 < np.abs(kept - before[:, :12]).mean() < 20  # close, not exact: what paste-back fixes


def test_outpainting_keeps_the_image_and_fills_the_new_strip(three, tmp_path):
    init, _ = three
    out = tmp_path / "run"
    run_sample(out, *DIGIT_RUN[2:], "~metrics", "prompt=a handwritten digit three", f"init_image={init}",
               "outpaint=[8,0,0,0]", "W=40")
    after = _pixels(out / "00000.png")
    assert after.shape == (32, 40, 3)
    resized = np.asarray(Image.open(init).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(after[:, 8:] - resized).max() <= 1


def test_nine_channel_model_samples_with_mask_channels(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "init.png")
    Image.new("L", (32, 32), 255).crop((0, 0, 32, 32)).save(tmp_path / "mask.png")
    out = tmp_path / "run"
    run_sample(out, "model=tiny", "model.network.in_channels=9", "steps=3", "~metrics",
               f"init_image={tmp_path / 'init.png'}", f"mask={tmp_path / 'mask.png'}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["network_evaluations_per_batch"] == 3


# ------------------------------------------------------------------ bad input, before any weight is read

@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (40, 40), (10, 10, 10)).save(tmp_path / "init.png")
    Image.new("L", (40, 40), 0).save(tmp_path / "black.png")
    Image.new("L", (20, 30), 255).save(tmp_path / "odd.png")
    Image.new("L", (40, 40), 255).save(tmp_path / "white.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    save_file({FIRST_CONV: torch.zeros(320, 4, 3, 3)}, str(tmp_path / "base4.safetensors"))
    return tmp_path


@pytest.mark.parametrize("overrides, error, message", [
    (["mask={d}/white.png"], ValueError, "mask= needs init_image=PATH"),
    (["outpaint=[8,0,0,0]"], ValueError, "outpaint= needs init_image=PATH"),
    (["init_image={d}/init.png", "mask={d}/black.png"], ValueError, "all black: nothing to repaint"),
    (["init_image={d}/init.png", "mask={d}/odd.png"], ValueError, "mask .*odd.png' is 20x30 but must match 40x40"),
    (["init_image={d}/init.png", "mask={d}/broken.png"], ValueError, "mask .*broken.png' is not a readable image"),
    (["init_image={d}/init.png", "mask={d}/none.png"], FileNotFoundError, "mask .*none.png' does not exist"),
    (["init_image={d}/init.png", "mask={d}/white.png", "mask_grow=-1"], ValueError, "mask_grow must be an integer"),
    (["init_image={d}/init.png", "mask={d}/white.png", "mask_blur=nan"], ValueError, "mask_blur must be finite"),
    (["init_image={d}/init.png", "outpaint=[8,0]"], ValueError, "outpaint must be four pixel counts"),
    (["init_image={d}/init.png", "outpaint=[0,0,0,0]"], ValueError, "adds nothing"),
    (["init_image={d}/init.png", "outpaint=[16,0,16,0]"], ValueError, "leaves no room"),
    (["model=tiny", "model.network.in_channels=9"], ValueError, "takes 9 input channels .* needs init_image"),
    (["model=sdxl_inpaint", "weights.checkpoint={d}/base4.safetensors"], ValueError,
     "4-channel UNet input .*in_channels is 9: model=sdxl_inpaint expects"),
])
def test_bad_inpainting_input_fails_before_weights(no_weights, previous_run, files, overrides, error, message):
    with pytest.raises(error, match=message):
        run_sample(previous_run, *[o.format(d=files) for o in overrides])


def test_sdxl_inpaint_config_is_sdxl_base_with_a_nine_channel_input(compose):
    base, inpaint = compose("sample", ["model=sdxl_base"]), compose("sample", ["model=sdxl_inpaint"])
    assert inpaint.model.network.in_channels == 9 and inpaint.model.network.out_channels == 4
    inpaint.model.network.in_channels = 4
    assert inpaint.model == base.model and inpaint.weights == base.weights
    with torch.device("meta"):
        unet = instantiate(compose("sample", ["model=sdxl_inpaint"]).model.network)
    assert tuple(unet.state_dict()["input_blocks.0.0.weight"].shape) == (320, 9, 3, 3)
    assert FIRST_CONV == "model.diffusion_model.input_blocks.0.0.weight"


def test_concat_channels_reach_every_step_of_a_prompt_schedule():
    from sgm.conditioning.prompt_schedule import CondSchedule
    from sgm.inpaint.unet9 import with_concat

    extra = torch.ones(1, 5, 2, 2)
    sched = CondSchedule([3.0, 1.0, 0.0], [1, 2], [{"crossattn": torch.zeros(1)}, {"crossattn": torch.ones(1)}])
    out = with_concat(sched, extra)
    assert isinstance(out, CondSchedule) and all(c["concat"] is extra for c in out.conds)
    assert out.at(1.0)["crossattn"].item() == 1.0 and out["concat"] is extra
