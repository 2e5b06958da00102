"""DiffusionEngine: the SDXL layout, checkpoints, and the sampling modes."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from sgm.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from sgm.config import load_sgm_yaml
from sgm.engine import schedule_slice
from sgm.tasks.sample import build_engine, engine_node

ROOT = Path(__file__).resolve().parents[1]
from _paths import REFERENCE
DATA = Path(__file__).parent / "data"


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


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
def tiny_cfg():
    return _compose("model=tiny", "steps=4", "progress=false")


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    engine = build_engine(tiny_cfg.model, seed=0)
    engine.sampler = instantiate(tiny_cfg.sampler)
    return engine


@pytest.mark.parametrize("name, tsv", [("sdxl_base", "sd_xl_base_1.0"), ("sdxl_refiner", "sd_xl_refiner_1.0")])
def test_sdxl_configs_give_the_original_state_dict(name, tsv):
    cfg = _compose(f"model={name}")
    with torch.device("meta"):
        engine = instantiate(engine_node(cfg.model)).half()
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
    cfg = tiny_cfg.model.copy()
    cfg.checkpoint = str(path)
    loaded = build_engine(cfg)
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
        engine = instantiate(engine_node(tiny_cfg.model))
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
        engine = instantiate(engine_node(tiny_cfg.model))
    load_checkpoint(engine, path)


class Payload:  # an object a weights-only unpickler must refuse
    pass


def test_pickle_checkpoints_only_with_weights_only(tiny, tiny_cfg, tmp_path):
    ok = tmp_path / "plain.ckpt"
    torch.save({"state_dict": tiny.state_dict()}, ok)
    with torch.device("meta"):
        engine = instantiate(engine_node(tiny_cfg.model))
    load_checkpoint(engine, ok)
    bad = tmp_path / "code.ckpt"
    torch.save({"state_dict": tiny.state_dict(), "payload": Payload()}, bad)
    with torch.device("meta"):
        engine = instantiate(engine_node(tiny_cfg.model))
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(engine, bad)


def test_corrupt_and_missing_files_are_named(tiny_cfg, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with torch.device("meta"):
        engine = instantiate(engine_node(tiny_cfg.model))
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_checkpoint(engine, corrupt)
    cfg = tiny_cfg.model.copy()
    cfg.checkpoint = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_engine(cfg)


def test_weight_dtype_keeps_the_vae_in_float32(tiny_cfg, tmp_path, tiny):
    path = save_checkpoint(tiny, tmp_path / "half.safetensors", dtype="float16")
    cfg = tiny_cfg.model.copy()
    cfg.checkpoint, cfg.weight_dtype = str(path), "float16"
    engine = build_engine(cfg)
    assert engine.model.diffusion_model.out[2].weight.dtype == torch.float16
    assert next(engine.first_stage_model.parameters()).dtype == torch.float32
    z = torch.randn(1, 4, 8, 8)
    assert engine.decode_first_stage(z).dtype == torch.float32


# --- sampling modes -----------------------------------------------------------------------
def _count(engine, fn):
    engine.network_evaluations = 0
    out = fn()
    return out, engine.network_evaluations


def test_txt2img_seed_per_image_is_independent_of_the_batch(tiny):
    cond, uc = tiny.get_conditionings(["a red cube"] * 3, [""] * 3, 32, 32)
    batch = tiny.sample_latents(cond, uc, [5, 6, 7], (4, 8, 8))
    c1, u1 = tiny.get_conditionings(["a red cube"], [""], 32, 32)
    alone = tiny.sample_latents(c1, u1, [6], (4, 8, 8))
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
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny.latent_shape(30, 32)


@pytest.mark.parametrize("strength, steps_taken", [(1.0, 10), (0.5, 5), (0.25, 2), (0.01, 1)])
def test_img2img_takes_strength_times_steps(tiny, strength, steps_taken):
    """img2img with `strength` runs the last max(1, round(strength * steps)) steps of the schedule."""
    assert schedule_slice(10, strength) == (10 - steps_taken, 10)
    cond, uc = tiny.get_conditionings(["a red cube"], [""], 32, 32)
    init = tiny.encode_first_stage(torch.zeros(1, 3, 32, 32))
    z, nfe = _count(tiny, lambda: tiny.sample_latents(cond, uc, [0], (4, 8, 8), init_latent=init, strength=strength,
                                                      num_steps=10))
    assert nfe == steps_taken and z.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="strength"):
        schedule_slice(10, 0.0)


def test_base_to_refiner_hand_off_splits_the_schedule(tiny, tiny_cfg):
    refiner = build_engine(tiny_cfg.model, seed=1)
    tiny.configure_prediction(32, 32, refiner=refiner, refiner_switch=0.75)
    try:
        tiny.sampler.num_steps = 8
        batch = {"prompt": ["a red cube"], "negative_prompt": [""], "seed": [3], "index": [0]}
        out = tiny.predict_step(batch)
        assert out["images"].shape == (1, 3, 32, 32)
        assert (tiny.network_evaluations, refiner.network_evaluations) == (6, 2)
        assert out["nfe"] == 8
    finally:
        tiny.configure_prediction(32, 32)
        tiny.sampler.num_steps = 4
    with pytest.raises(ValueError, match="refiner_switch"):
        tiny.configure_prediction(32, 32, refiner=refiner, refiner_switch=1.0)
