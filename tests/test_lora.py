"""sgm.lora: targets and kohya names, training adapters, the kohya file, loading/merging any naming, diffusers."""

import copy
import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sgm.lora import (
    LoRAFileError,
    LoRASpec,
    inject_lora,
    load_lora_files,
    lora_state_dict,
    merge_trained_lora,
    remove_lora,
    save_lora,
    unet_diffusers_paths,
)
from sgm.tasks.common import build_engine

PROMPTS = ["a red cube", "a blue sphere"]
SPEC = dict(rank=4, alpha=2.0)  # alpha != rank, so alpha handling matters


def _meta_sdxl_base(compose):
    with torch.device("meta"):
        return instantiate(compose("sample", ["model=sdxl_base"]).model)


@pytest.fixture(scope="module")
def tiny_cfg(compose):
    return compose("sample", ["model=tiny"])


@pytest.fixture(scope="module")
def base(tiny_cfg):
    """The tiny SDXL-family engine with random weights also where the UNet is zero-initialised."""
    engine = build_engine(tiny_cfg.model, tiny_cfg.weights, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in engine.model.diffusion_model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return engine


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 0.5])


def _output(engine):
    """Denoiser output with the conditioning computed by the engine's own text encoders."""
    engine.eval()
    x, sigma = _inputs()
    cond, _ = engine.get_conditionings(PROMPTS, ["", ""], 32, 32)
    with torch.no_grad():
        return engine.denoise(x, sigma, cond)


def _weights(engine):
    return {k: v.detach().clone() for k, v in engine.state_dict().items() if v.is_floating_point()}


def _train_steps(engine, steps=2):
    params = [p for p in engine.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    engine.train()
    x, sigma = _inputs()
    batch = engine.make_batch(PROMPTS, 32, 32)
    for _ in range(steps):
        opt.zero_grad()
        cond = engine.conditioner(batch)
        loss = (engine.denoise(x, sigma, cond) - x.flip(0)).pow(2).mean()
        loss.backward()
        yield {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0)
               for n, p in engine.named_parameters() if p.requires_grad}
        opt.step()
    engine.eval()


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A copy of ``base`` with UNet + text-encoder LoRA trained two steps, its file and first-step grads."""
    engine = copy.deepcopy(base)
    names = inject_lora(engine, LoRASpec(**SPEC, train_text_encoders=True))
    before = _output(engine)
    grads = list(_train_steps(engine))[0]
    path = save_lora(engine, tmp_path_factory.mktemp("lora") / "trained.safetensors", metadata={"note": {"a": 1}},
                     dtype=torch.float32)
    return {"engine": engine, "names": names, "before": before, "grads": grads, "path": path}


# ------------------------------------------------------------------ targets and names (SDXL base, meta)

@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_sdxl_base_default_targets_are_kohyas_722(compose):
    engine = _meta_sdxl_base(compose)
    names = inject_lora(engine, LoRASpec(16, 16))
    assert len(names) == len(set(names)) == 722
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert {"lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0", "lora_unet_output_blocks_2_1_proj_out"} <= set(names)
    for n in names:
        path = n.removeprefix("lora_unet_")
        assert not any(b in path for b in ("norm", "time_embed", "label_emb", "emb_layers", "in_layers", "out_layers")), n
        assert not path.startswith(("input_blocks_0_0", "out_")), n
    assert all("_1_transformer_blocks_" in n or n.endswith(("_1_proj_in", "_1_proj_out")) for n in names)
    trainable = {n for n, p in engine.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lora_network.") for n in trainable)
    assert len(trainable) == 2 * 722
    remove_lora(engine)
    names = inject_lora(engine, LoRASpec(16, 16, train_text_encoders=True, include_conv=True, conv_rank=8))
    te1 = [n for n in names if n.startswith("lora_te1_")]
    te2 = [n for n in names if n.startswith("lora_te2_")]
    assert len(te1) == 12 * 6 and len(te2) == 32 * 6
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te1
    assert {"lora_te2_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_31_self_attn_v_proj"} <= set(te2)
    conv = [n for n in names if n.startswith("lora_unet_") and "transformer_blocks" not in n and "proj_" not in n]
    assert len(conv) == 49 and "lora_unet_input_blocks_3_0_op" in conv and "lora_unet_output_blocks_2_2_conv" in conv
    assert not [n for n in conv if "input_blocks_0_0" in n or n.startswith("lora_unet_out_")]
    adapter = engine.lora_network["lora_unet_input_blocks_4_0_in_layers_2"]
    assert tuple(adapter.lora_down.weight.shape) == (8, 320, 3, 3) and tuple(adapter.lora_up.weight.shape) == (640, 8, 1, 1)
    third = engine.lora_network["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"]
    assert tuple(third.lora_up.weight.shape) == (1280, 16) and tuple(third.lora_down.weight.shape) == (16, 1280)


def test_sdxl_base_diffusers_names_are_the_diffusers_unet_modules(compose):
    """The sgm -> diffusers path map names real modules of diffusers' SDXL UNet, one to one."""
    pytest.importorskip("diffusers")
    from _nets_convert import diffusers_unet_config
    from diffusers import UNet2DConditionModel

    cfg = OmegaConf.to_container(compose("sample", ["model=sdxl_base"]).model.network)
    cfg.pop("_target_")
    with torch.device("meta"):
        ours = instantiate({"_target_": "sgm.networks.openaimodel.UNetModel", **cfg})
        theirs = UNet2DConditionModel(**diffusers_unet_config(cfg, [False, True, True]))
    mapping = unet_diffusers_paths(ours)
    skip = ("time_embed", "label_emb")
    mapped = {d for s, d in mapping.items() if not s.startswith(skip)}
    layers = {n for n, m in theirs.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and not n.startswith(("time_embedding", "class_embedding", "add_embedding"))}
    assert mapped == layers
    assert len(set(mapping.values())) == len(mapping)
    assert mapping["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert mapping["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"


# ------------------------------------------------------------------ training on the tiny model

def test_fresh_adapters_change_nothing_and_only_adapters_train(base):
    engine = copy.deepcopy(base)
    ref = _output(engine)
    names = inject_lora(engine, LoRASpec(**SPEC, train_text_encoders=True))
    assert len(names) == 7 * 12 + 3 * 6 + 3 * 6  # 7 spatial transformers; CLIP-L and bigG 3 layers each
    trainable = [n for n, p in engine.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"lora_network.{n}.{p}.weight" for n in names for p in ("lora_down", "lora_up"))
    torch.testing.assert_close(_output(engine), ref, rtol=0, atol=0)
    sd = engine.state_dict()  # Lightning checkpoints: the original keys plus the adapters
    base_keys = set(base.state_dict())
    assert base_keys <= set(sd)
    assert {k for k in sd if k not in base_keys} == {f"lora_network.{n}.{s}" for n in names
                                                    for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    remove_lora(engine)
    assert set(engine.state_dict()) == base_keys
    assert all(engine.conditioner.embedders[i].is_trainable is False for i in (0, 1))


def test_training_moves_the_output_and_gradients_reach_every_kind_of_layer(trained):
    engine, grads = trained["engine"], trained["grads"]
    up = {n.removeprefix("lora_network.").removesuffix(".lora_up.weight"): g for n, g in grads.items() if "lora_up" in n}
    for name in ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", "lora_unet_output_blocks_3_1_proj_out",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_1_mlp_fc2",
                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
                 "lora_te2_text_model_encoder_layers_0_self_attn_v_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc1"):
        assert up[name] > 0, name
    assert (_output(engine) - trained["before"]).abs().max() > 1e-4
    bigg = engine.conditioner.embedders[1].model.transformer.resblocks[0].attn
    assert isinstance(bigg._parameters["in_proj_weight"], torch.nn.Parameter)  # the swap is undone after each call


def test_lora_file_layout_and_metadata(trained):
    path, names = trained["path"], trained["names"]
    sd = load_file(str(path))
    assert set(sd) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    engine = trained["engine"]
    for n in names:
        down, up, alpha = sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], sd[f"{n}.alpha"]
        assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == 2.0
        t = engine.lora_network.targets[n]
        assert down.shape == (4, t.in_features) and up.shape == (t.out_features, 4)
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "2" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(md["note"]) == {"a": 1} and json.loads(md["sgm_lora_spec"])["rank"] == 4
    assert lora_state_dict(engine)[f"{names[0]}.lora_down.weight"].dtype == torch.float32
    with safe_open(str(save_lora(engine, path.with_name("half.safetensors"))), "pt") as f:
        assert f.get_tensor(f"{names[0]}.lora_up.weight").dtype == torch.float16


def test_conv_config_gives_3x3_down_and_1x1_up(compose, base, tmp_path):
    engine = copy.deepcopy(base)
    spec = instantiate(compose("train", ["lora=conv"]).lora)
    assert spec.include_conv and spec.conv_rank == 8
    names = inject_lora(engine, spec)
    sd = lora_state_dict(engine)
    assert sd["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (8, 32, 3, 3)
    assert sd["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"].shape == (32, 8, 1, 1)
    assert sd["lora_unet_input_blocks_3_0_skip_connection.lora_down.weight"].shape == (16, 32, 1, 1)  # 1x1: rank
    assert "lora_unet_input_blocks_2_0_op.lora_down.weight" in sd and "lora_unet_output_blocks_1_2_conv.alpha" in sd
    with torch.no_grad():
        for n in names:
            engine.lora_network[n].lora_up.weight.normal_(0, 0.05)
    want = _output(engine)
    path = save_lora(engine, tmp_path / "conv.safetensors", dtype=torch.float32)
    fresh = copy.deepcopy(base)
    load_lora_files(fresh, [path], [1.0])
    torch.testing.assert_close(_output(fresh), want, rtol=1e-4, atol=1e-5)  # strided 3x3 merges exactly
    assert instantiate(compose("train", ["lora=text_encoders"]).lora).train_text_encoders


# ------------------------------------------------------------------ loading and merging

def test_file_reproduces_the_trained_model_and_unmerges_exactly(base, trained):
    engine = copy.deepcopy(base)
    ref, weights = _output(engine), _weights(engine)
    handle = load_lora_files(engine, [trained["path"]], [1.0])
    torch.testing.assert_close(_output(engine), _output(trained["engine"]), rtol=1e-4, atol=1e-5)
    assert (_output(engine) - ref).abs().max() > 1e-4
    handle.unmerge()
    assert all(torch.equal(v, weights[k]) for k, v in _weights(engine).items())
    torch.testing.assert_close(_output(engine), ref, rtol=0, atol=0)
    with load_lora_files(engine, [trained["path"]], [0.0]):
        assert all(torch.equal(v, weights[k]) for k, v in _weights(engine).items())
        torch.testing.assert_close(_output(engine), ref, rtol=0, atol=0)
    with load_lora_files(engine, trained["path"], 1.0, exact=False):  # subtracting mode
        pass
    assert max((v - weights[k]).abs().max().item() for k, v in _weights(engine).items()) <= 1e-6


def test_two_files_add_their_scaled_deltas(base, trained, tmp_path):
    other = copy.deepcopy(base)
    inject_lora(other, LoRASpec(rank=2, alpha=3.0, train_text_encoders=True, unet_targets=["attn2.to_k", "ff.net.2"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in other.lora_network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    second = save_lora(other, tmp_path / "second.safetensors", dtype=torch.float32)
    engine = copy.deepcopy(base)
    w0 = _weights(engine)
    deltas = []
    for f in (trained["path"], second):
        with load_lora_files(engine, [f], [1.0]):
            deltas.append({k: v - w0[k] for k, v in _weights(engine).items()})
    with load_lora_files(engine, [trained["path"], second], [0.8, 0.5]):
        for k, v in _weights(engine).items():
            torch.testing.assert_close(v, w0[k] + 0.8 * deltas[0][k] + 0.5 * deltas[1][k], rtol=0, atol=1e-6)
    first = load_lora_files(engine, [trained["path"]])
    later = load_lora_files(engine, [second])
    with pytest.raises(RuntimeError, match="after this one"):
        first.unmerge()
    later.unmerge()
    first.unmerge()
    assert all(torch.equal(v, w0[k]) for k, v in _weights(engine).items())


def _renamed_files(engine, path, tmp_path):
    """Our kohya file renamed to diffusers module names (kohya style) and to PEFT keys."""
    sd = load_file(str(path))
    to_diffusers = unet_diffusers_paths(engine.model.diffusion_model)
    targets = engine.lora_network.targets
    kohya_d, peft = {}, {}
    for key, value in sd.items():
        name, suffix = key.split(".", 1)
        t = targets[name]
        if t.group == "unet":
            dpath = to_diffusers[t.path]
            kohya_d[f"lora_unet_{dpath.replace('.', '_')}.{suffix}"] = value
            prefix = f"unet.{dpath}"
        else:
            kohya_d[key] = value
            prefix = f"{'text_encoder' if t.group == 'te1' else 'text_encoder_2'}.text_model.{t.path}"
        if suffix != "alpha":
            peft[f"{prefix}.{'lora_A' if 'down' in suffix else 'lora_B'}.weight"] = value
    save_file(kohya_d, str(tmp_path / "kohya_diffusers.safetensors"))
    md = {"lora_adapter_metadata": json.dumps({f"{c}.{k}": v for c in ("unet", "text_encoder", "text_encoder_2")
                                               for k, v in (("r", 4), ("lora_alpha", 2.0))})}
    save_file(peft, str(tmp_path / "peft.safetensors"), metadata=md)
    save_file(peft, str(tmp_path / "peft_no_alpha.safetensors"))
    return [tmp_path / f"{n}.safetensors" for n in ("kohya_diffusers", "peft", "peft_no_alpha")]


def test_diffusers_and_peft_namings_merge_to_the_same_weights(base, trained, tmp_path):
    engine = copy.deepcopy(base)
    w0 = _weights(engine)
    with load_lora_files(engine, [trained["path"]]):
        ours = _weights(engine)
    kohya_d, peft, peft_no_alpha = _renamed_files(trained["engine"], trained["path"], tmp_path)
    for f in (kohya_d, peft):
        with load_lora_files(engine, [f]):
            for k, v in _weights(engine).items():
                torch.testing.assert_close(v, ours[k], rtol=0, atol=1e-6, msg=f"{f.name}: {k}")
    with load_lora_files(engine, [peft_no_alpha]):  # no alpha anywhere: alpha = rank, i.e. twice our scale
        for k, v in _weights(engine).items():
            torch.testing.assert_close(v - w0[k], 2 * (ours[k] - w0[k]), rtol=0, atol=2e-6)


# ------------------------------------------------------------------ diffusers reads our file

def test_diffusers_loads_our_file_and_fuses_to_the_same_model(compose, base, trained):
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from _nets_convert import diffusers_unet_config, unet_to_diffusers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = OmegaConf.to_container(compose("sample", ["model=tiny"]).model.network)
    cfg.pop("_target_")
    unet_sd = {k.removeprefix("model.diffusion_model."): v for k, v in base.state_dict().items()
               if k.startswith("model.diffusion_model.")}
    unet = UNet2DConditionModel(**diffusers_unet_config(cfg, [True, True])).eval()
    unet.load_state_dict(unet_to_diffusers(unet_sd, cfg["num_res_blocks"], len(cfg["channel_mult"])))
    te1 = copy.deepcopy(base.conditioner.embedders[0].transformer)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=3,
                                                     num_attention_heads=4, projection_dim=32, hidden_act="gelu"))
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    before = {"te1": {k: v.clone() for k, v in te1.state_dict().items()},
              "te2": {k: v.clone() for k, v in te2.state_dict().items()}}
    pipe.load_lora_weights(str(trained["path"]))  # diffusers' own kohya/sgm-name conversion must accept every key
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()

    engine = copy.deepcopy(base)
    load_lora_files(engine, [trained["path"]])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    c, y = torch.randn(2, 7, 80, generator=g), torch.randn(2, 224, generator=g)
    with torch.no_grad():
        ours = engine.model.diffusion_model(x, timesteps=t, context=c, y=y)
        theirs = pipe.unet(x, t, encoder_hidden_states=c, class_labels=y).sample
        plain = base.model.diffusion_model(x, timesteps=t, context=c, y=y)
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # text encoders: CLIP-L is the same module; bigG deltas land on CLIP q/k/v/out/fc1/fc2
    te1_ours = engine.conditioner.embedders[0].transformer.state_dict()
    te1_sd = te1.state_dict()
    for k in te1_sd:
        torch.testing.assert_close(te1_sd[k], te1_ours[k], rtol=0, atol=1e-6, msg=k)
    bigg, bigg0 = engine.conditioner.embedders[1].model, base.conditioner.embedders[1].model
    te2_sd = te2.state_dict()
    level = "text_model." if "text_model.encoder.layers.0.mlp.fc1.weight" in te2_sd else ""
    for i in range(3):
        ours_in = bigg.transformer.resblocks[i].attn.in_proj_weight - bigg0.transformer.resblocks[i].attn.in_proj_weight
        parts = {"self_attn.q_proj": ours_in[:48], "self_attn.k_proj": ours_in[48:96], "self_attn.v_proj": ours_in[96:],
                 "self_attn.out_proj": None, "mlp.fc1": None, "mlp.fc2": None}
        ours_mods = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
        for name, delta in parts.items():
            if delta is None:
                mod = ours_mods[name]
                delta = (bigg.transformer.resblocks[i].get_submodule(mod).weight
                         - bigg0.transformer.resblocks[i].get_submodule(mod).weight)
            key = f"{level}encoder.layers.{i}.{name}.weight"
            torch.testing.assert_close(te2_sd[key] - before["te2"][key], delta.detach(), rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------------ removing / baking adapters

def test_merge_trained_lora_bakes_the_adapters_and_remove_lora_drops_them(base, trained):
    engine = copy.deepcopy(trained["engine"])
    want = _output(engine)
    assert len(merge_trained_lora(engine)) == len(trained["names"])
    assert set(engine.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_output(engine), want, rtol=1e-4, atol=1e-5)
    engine = copy.deepcopy(trained["engine"])  # deepcopy keeps working adapters (hooks are objects)
    torch.testing.assert_close(_output(engine), want, rtol=0, atol=0)
    remove_lora(engine)
    torch.testing.assert_close(_output(engine), _output(base), rtol=0, atol=0)


def test_adapter_dropout_only_in_training():
    from sgm.lora import LoRAAdapter

    a = LoRAAdapter(8, 8, 4, 4.0, dropout=0.5)
    torch.nn.init.normal_(a.lora_up.weight)
    x = torch.randn(3, 8)
    a.train()
    assert not torch.equal(a(x), a(x))
    a.eval()
    assert torch.equal(a(x), a(x))


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("kwargs, param", [
    (dict(rank=0, alpha=1.0), "rank"), (dict(rank=2.5, alpha=1.0), "rank"), (dict(rank=4, alpha=0.0), "alpha"),
    (dict(rank=4, alpha=-1.0), "alpha"), (dict(rank=4, alpha=4.0, dropout=1.0), "dropout"),
    (dict(rank=4, alpha=4.0, init="xavier"), "init"), (dict(rank=4, alpha=4.0, unet_targets="attn1.to_q"), "unet_targets"),
])
def test_bad_spec_is_refused(kwargs, param):
    with pytest.raises(ValueError, match=param):
        LoRASpec(**kwargs)


@pytest.mark.parametrize("kwargs, expect", [
    (dict(unet_targets=["attn3.to_q"]), ["unet_targets", "attn3.to_q", "matches no layer"]),
    (dict(unet_targets=["attn1"]), ["unet_targets", "CrossAttention", "Linear and Conv2d"]),
    (dict(train_text_encoders=True, text_encoder_targets=["self_attn.qkv"]), ["text_encoder_targets", "self_attn.qkv"]),
    (dict(train_text_encoders=True, text_encoder_targets=["q_proj", "mlp.fc1"]), ["all four", "bigG"]),
])
def test_bad_targets_are_refused_before_anything_changes(base, kwargs, expect):
    engine = copy.deepcopy(base)
    with pytest.raises(ValueError) as err:
        inject_lora(engine, LoRASpec(4, 4.0, **kwargs))
    for text in expect:
        assert text in str(err.value)
    assert getattr(engine, "lora_network", None) is None
    inject_lora(engine, LoRASpec(4, 4.0))
    with pytest.raises(RuntimeError, match="already has LoRA"):
        inject_lora(engine, LoRASpec(4, 4.0))


def test_foreign_or_broken_files_are_refused_before_anything_is_merged(base, trained, tmp_path):
    engine = copy.deepcopy(base)
    w0 = _weights(engine)
    r = 4
    sd15 = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(r, 768),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, r),
            "lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(r, 1280),
            "lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight": torch.zeros(1280, r)}
    save_file(sd15, str(tmp_path / "sd15.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(LoRAFileError) as err:  # the good file comes first: still nothing merged
        load_lora_files(engine, [trained["path"], tmp_path / "sd15.safetensors"], [1.0, 1.0])
    msg = str(err.value)
    assert "do not exist in this model" in msg and "lora_te_text_model" in msg and "SD 1.x" in msg and "sd_v1" in msg
    assert all(torch.equal(v, w0[k]) for k, v in _weights(engine).items())

    sd = load_file(str(trained["path"]))
    key = "lora_unet_input_blocks_1_1_proj_in.lora_down.weight"
    sd[key] = torch.zeros(4, 99)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoRAFileError, match="lora_unet_input_blocks_1_1_proj_in: down \\[4, 99\\]"):
        load_lora_files(engine, [tmp_path / "shape.safetensors"])
    sd = load_file(str(trained["path"]))
    sd["lora_unet_input_blocks_1_1_proj_in.hada_w1_a"] = torch.zeros(4, 4)
    save_file(sd, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoRAFileError, match="LoHa"):
        load_lora_files(engine, [tmp_path / "loha.safetensors"])
    with pytest.raises(ValueError, match="strength"):
        load_lora_files(engine, [trained["path"]], [1.0, 0.5])
    assert all(torch.equal(v, w0[k]) for k, v in _weights(engine).items())
