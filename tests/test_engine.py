"""DiffusionEngine: the SDXL layout, checkpoints, and the sampling modes."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from sgm.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from sgm.config import load_sgm_yaml
from sgm.diffusion.schedule import img2img_start
from sgm.tasks.common import build_engine

from _paths import REFERENCE

DATA = Path(__file__).parent / "data"


def _reference(name):
    rows = {}
    for line in (REFERENCE / f"{name}.keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows[key] = (shape, dtype)
    return rows


def _rows(engine):
    out = {}
    for k, v in engine.state_dict().items():
        shape = "scalar" if v.ndim == 0 else "x".join(map(str, v.shape))
        out[k] = (shape, str(v.dtype).removeprefix("torch."))
    return out


@pytest.fixture(scope="module")
def tiny_cfg(compose):
    return compose("sample", ["model=tiny", "steps=4", "progress=false"])


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    engine = build_engine(tiny_cfg.model, tiny_cfg.weights, seed=0)
    engine.sampler = instantiate(tiny_cfg.sampler)
    return engine


def _sigmas(engine, cfg, steps):
    return engine.schedule(instantiate(cfg.discretization), steps)


@pytest.mark.parametrize("name", ["digits", "tiny", "analytic", "sdxl_base", "sdxl_refiner"])
def test_every_model_node_is_instantiable_as_it_stands(compose, name):
    cfg = compose("sample", [f"model={name}"])
    with torch.device("meta" if name.startswith("sdxl") else "cpu"):  # SDXL: no 7 GB of random weights
        engine = instantiate(cfg.model)
    assert type(engine).__name__ == "DiffusionEngine"
    assert set(cfg.weights) == {"checkpoint", "dtype", "random"}


@pytest.mark.parametrize("name, tsv", [("sdxl_base", "sd_xl_base_1.0"), ("sdxl_refiner", "sd_xl_refiner_1.0")])
def test_sdxl_configs_give_the_original_state_dict(compose, name, tsv):
    cfg = compose("sample", [f"model={name}"])
    with torch.device("meta" if name.startswith("sdxl") else "cpu"):  # SDXL: no 7 GB of random weights
        engine = instantiate(cfg.model).half()
    ours, ref = _rows(engine), _reference(tsv)
    assert set(ours) == set(ref), (sorted(set(ours) - set(ref))[:5], sorted(set(ref) - set(ours))[:5])
    bad = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert not bad, list(bad.items())[:5]


def test_seed_note_sgm_yaml_builds_the_same_engine():
    """The seed note's sd_xl_base.yaml (target/params) builds an engine with the original layout."""
    with torch.device("meta"):
        engine = load_sgm_yaml(DATA / "sd_xl_base.yaml", key="model").half()
    assert _rows(engine) == _reference("sd_xl_base_1.0")


def _fixed_inputs(engine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([3.0, 0.5])
    cond, uc = engine.get_conditionings(["a red cube", "a blue sphere"], ["", ""], 32, 32)
    return x, sigma, cond


def test_tiny_checkpoint_round_trip_in_the_file_layout(tiny, tiny_cfg, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    keys = set(load_file(str(path)))
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" in keys
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") for k in keys)
    assert "denoiser.sigmas" not in keys
    loaded = build_engine(tiny_cfg.model, {"checkpoint": str(path)})
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x, sigma, cond = _fixed_inputs(tiny)
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoise(x, sigma, cond), tiny.denoise(x, sigma, cond), rtol=0, atol=0)
        x2, s2, cond2 = _fixed_inputs(loaded)
        torch.testing.assert_close(cond2["crossattn"], cond["crossattn"], rtol=0, atol=0)


def _broken_file(tiny, tmp_path, edit):
    sd = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    edit(sd)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda sd: sd.pop("model.diffusion_model.out.2.weight"), ["1 missing", "model.diffusion_model.out.2.weight"]),
        (lambda sd: sd.update({"model.diffusion_model.out.2.wieght": sd.pop("model.diffusion_model.out.2.weight")}),
         ["missing", "unexpected", "out.2.wieght"]),
        (lambda sd: sd.update({"first_stage_model.quant_conv.weight": torch.zeros(8, 8, 3, 3)}),
         ["wrong-shape", "first_stage_model.quant_conv.weight", "[8, 8, 1, 1]", "[8, 8, 3, 3]"]),
    ],
    ids=["missing", "renamed", "wrong_shape"],
)
def test_mismatched_checkpoint_is_refused_with_a_clear_list(tiny, tiny_cfg, tmp_path, edit, expect):
    path = _broken_file(tiny, tmp_path, edit)
    with torch.device("meta"):
        engine = instantiate(tiny_cfg.model)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(engine, path)
    for text in expect:
        assert text in str(err.value)


def test_allow_listed_differences_load(tiny, tiny_cfg, tmp_path):
    def edit(sd):
        sd["denoiser.sigmas"] = tiny.denoiser.sigmas.clone()  # computed, may be present
        del sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]  # may be absent

    path = _broken_file(tiny, tmp_path, edit)
    with torch.device("meta"):
        engine = instantiate(tiny_cfg.model)
    load_checkpoint(engine, path)


class Payload:  # an object a weights-only unpickler must refuse
    pass


def test_pickle_checkpoints_only_with_weights_only(tiny, tiny_cfg, tmp_path):
    ok = tmp_path / "plain.ckpt"
    torch.save({"state_dict": tiny.state_dict()}, ok)
    with torch.device("meta"):
        engine = instantiate(tiny_cfg.model)
    load_checkpoint(engine, ok)
    bad = tmp_path / "code.ckpt"
    torch.save({"state_dict": tiny.state_dict(), "payload": Payload()}, bad)
    with torch.device("meta"):
        engine = instantiate(tiny_cfg.model)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(engine, bad)


def test_corrupt_and_missing_files_are_named(tiny_cfg, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with torch.device("meta"):
        engine = instantiate(tiny_cfg.model)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_checkpoint(engine, corrupt)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_engine(tiny_cfg.model, {"checkpoint": str(tmp_path / "nope.safetensors")})
    with pytest.raises(IsADirectoryError, match="directory"):
        build_engine(tiny_cfg.model, {"checkpoint": str(tmp_path)})
    with pytest.raises(ValueError, match="weights.random=true"):
        build_engine(tiny_cfg.model, {"checkpoint": None})


def test_weight_dtype_keeps_the_vae_in_float32(tiny_cfg, tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "half.safetensors", dtype="float16")
    engine = build_engine(tiny_cfg.model, {"checkpoint": str(path), "dtype": "float16"})
    assert engine.model.diffusion_model.out[2].weight.dtype == torch.float16
    assert next(engine.first_stage_model.parameters()).dtype == torch.float32
    z = torch.randn(1, 4, 8, 8)
    assert engine.decode_first_stage(z).dtype == torch.float32


# --- sampling modes -----------------------------------------------------------------------
def _count(engine, fn):
    engine.network_evaluations = 0
    out = fn()
    return out, engine.network_evaluations


def test_txt2img_seed_per_image_is_independent_of_the_batch(tiny, tiny_cfg):
    sigmas = _sigmas(tiny, tiny_cfg, 4)
    cond, uc = tiny.get_conditionings(["a red cube"] * 3, [""] * 3, 32, 32)
    batch = tiny.sample_latents(cond, uc, [5, 6, 7], (4, 8, 8), sigmas)
    c1, u1 = tiny.get_conditionings(["a red cube"], [""], 32, 32)
    alone = tiny.sample_latents(c1, u1, [6], (4, 8, 8), sigmas)
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_negative_prompt_and_zeroed_unconditional_branch(tiny):
    _, uc_empty = tiny.get_conditionings(["a red cube"], [""], 32, 32)
    assert torch.count_nonzero(uc_empty["crossattn"]) == 0
    assert torch.count_nonzero(uc_empty["vector"][:, :32]) == 0  # pooled text zeroed
    assert torch.count_nonzero(uc_empty["vector"][:, 32:]) > 0  # size embeddings kept
    _, uc_neg = tiny.get_conditionings(["a red cube"], ["blurry"], 32, 32)
    assert torch.count_nonzero(uc_neg["crossattn"]) > 0


def test_size_conditioning_follows_H_and_W(tiny):
    c1, _ = tiny.get_conditionings(["x"], [""], 32, 32)
    c2, _ = tiny.get_conditionings(["x"], [""], 32, 64)
    assert not torch.allclose(c1["vector"][:, 32:], c2["vector"][:, 32:])
    with pytest.raises(ValueError, match="multiples of 8"):  # VAE 4 x UNet 2
        tiny.latent_shape(36, 32)


@pytest.mark.parametrize("strength, steps_taken, rule", [(1.0, 10, "last_steps"), (0.5, 5, "last_steps"),
                                                       (0.25, 2, "last_steps"), (0.01, 1, "last_steps"),
                                                       (0.6, 6, "last_steps"), (0.6, 5, "sgm"), (0.05, 0, "sgm")])
def test_img2img_takes_a_slice_of_the_schedule(tiny, tiny_cfg, strength, steps_taken, rule):
    """img2img runs the last max(1, round(strength * steps)) steps, or sgm's int(strength * (steps + 1)) sigmas."""
    tiny.configure_prediction(32, 32, _sigmas(tiny, tiny_cfg, 10), strength=strength, img2img_schedule=rule)
    tiny.set_init_image(torch.zeros(1, 3, 32, 32))
    try:
        batch = {"prompt": ["a red cube"], "negative_prompt": [""], "seed": [0], "index": [0]}
        out = tiny.predict_step(batch)
        assert out["nfe"] == steps_taken and out["images"].shape == (1, 3, 32, 32)  # CFG: one batched call
        assert img2img_start(10, strength, rule) == 10 - steps_taken
    finally:
        tiny.set_init_image(None)
    with pytest.raises(ValueError, match="strength"):
        tiny.configure_prediction(32, 32, _sigmas(tiny, tiny_cfg, 10), strength=0.0)


def test_base_to_refiner_hand_off_splits_the_schedule(tiny, tiny_cfg):
    refiner = build_engine(tiny_cfg.model, tiny_cfg.weights, seed=1)
    tiny.configure_prediction(32, 32, _sigmas(tiny, tiny_cfg, 8), refiner=refiner, refiner_switch=0.75)
    batch = {"prompt": ["a red cube"], "negative_prompt": [""], "seed": [3], "index": [0]}
    out = tiny.predict_step(batch)
    assert out["images"].shape == (1, 3, 32, 32)
    assert (tiny.network_evaluations, refiner.network_evaluations) == (6, 2)
    assert out["nfe"] == 8
    with pytest.raises(ValueError, match="refiner_switch"):
        tiny.configure_prediction(32, 32, _sigmas(tiny, tiny_cfg, 8), refiner=refiner, refiner_switch=1.0)
