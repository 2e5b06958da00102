"""Conditioning stack: key layout vs the real checkpoints, encoders vs their libraries, routing.

Full-size models are only built on the meta device; numerical checks use tiny random towers.
"""

from __future__ import annotations

import math

import pytest
import torch

from sgm.conditioning import (
    ConcatTimestepEmbedderND,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder2,
    GeneralConditioner,
    timestep_embedding,
)
from sgm.config import instantiate, resolve_target

from _paths import REFERENCE
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
TINY_BIGG = {"width": 48, "heads": 4, "layers": 3}
TINY_EMBED = 24
PROMPTS = [
    "a photo of a cat",
    "Hello,   World! café &amp; 123 naïve résumé",
    "word " * 100,
    "",
]
_ENC = "sgm.modules.encoders.modules"


def _size(key: str) -> dict:
    return {"is_trainable": False, "input_key": key, "target": f"{_ENC}.ConcatTimestepEmbedderND",
            "params": {"outdim": 256}}


BIGG_PARAMS = {
    "arch": "ViT-bigG-14",
    "version": "laion2b_s39b_b160k",
    "freeze": True,
    "layer": "penultimate",
    "always_return_pooled": True,
    "legacy": False,
}
BASE_EMB_MODELS = [
    {"is_trainable": False, "input_key": "txt", "target": f"{_ENC}.FrozenCLIPEmbedder",
     "params": {"layer": "hidden", "layer_idx": 11}},
    {"is_trainable": False, "input_key": "txt", "target": f"{_ENC}.FrozenOpenCLIPEmbedder2", "params": BIGG_PARAMS},
    _size("original_size_as_tuple"),
    _size("crop_coords_top_left"),
    _size("target_size_as_tuple"),
]
REFINER_EMB_MODELS = [
    {"is_trainable": False, "input_key": "txt", "target": f"{_ENC}.FrozenOpenCLIPEmbedder2", "params": BIGG_PARAMS},
    _size("original_size_as_tuple"),
    _size("crop_coords_top_left"),
    _size("aesthetic_score"),
]


def _reference_rows(name: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in (REFERENCE / f"{name}.keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        if key.startswith("conditioner."):
            rows[key[len("conditioner."):]] = (shape, dtype)
    return rows


def _row(t: torch.Tensor) -> tuple[str, str]:
    return ("scalar" if t.ndim == 0 else "x".join(map(str, t.shape)), str(t.dtype).removeprefix("torch."))


def _tiny_clip(**kw) -> FrozenCLIPEmbedder:
    kw.setdefault("layer", "hidden")
    kw.setdefault("layer_idx", 2)
    return FrozenCLIPEmbedder(text_config=TINY_CLIP, **kw)


def _tiny_bigg(**kw) -> FrozenOpenCLIPEmbedder2:
    kw.setdefault("layer", "penultimate")
    kw.setdefault("always_return_pooled", True)
    kw.setdefault("legacy", False)
    return FrozenOpenCLIPEmbedder2(text_cfg=TINY_BIGG, embed_dim=TINY_EMBED, **kw)


def _scramble(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, including layer norms (initialised to 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm_scale = ".ln_" in name and name.endswith("weight") or "ln_final.weight" in name
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if norm_scale else 0.0))


# ------------------------------------------------------------------- full-size key layout


@pytest.mark.parametrize(
    ("name", "emb_models", "widths"),
    [
        ("sd_xl_base_1.0", BASE_EMB_MODELS, {"crossattn": 2048, "vector": 2816}),
        ("sd_xl_refiner_1.0", REFINER_EMB_MODELS, {"crossattn": 1280, "vector": 2560}),
    ],
)
def test_sgm_config_on_meta_matches_checkpoint_keys(name, emb_models, widths):
    node = {"target": "sgm.modules.GeneralConditioner",
            "params": {"emb_models": emb_models, "lora_ranks": "None", "lora_weights": "None"}}
    with torch.device("meta"):
        cond = instantiate(node)
    assert isinstance(cond, GeneralConditioner)
    cond.half()
    got = {k: _row(v) for k, v in cond.state_dict().items()}
    ref = _reference_rows(name)
    assert sorted(set(ref) - set(got)) == [] and sorted(set(got) - set(ref)) == []
    assert {k: v for k, v in got.items() if ref[k] != v} == {}
    assert cond.output_widths() == widths
    assert not any(p.requires_grad for p in cond.parameters())
    batch = {"txt": ["a", "b"], "original_size_as_tuple": torch.tensor([[1024, 1024]] * 2),
             "crop_coords_top_left": torch.zeros(2, 2), "target_size_as_tuple": torch.tensor([[1024, 1024]] * 2),
             "aesthetic_score": torch.tensor([6.0, 2.5])}
    out = cond(batch)
    assert out["crossattn"].shape == (2, 77, widths["crossattn"]) and out["vector"].shape == (2, widths["vector"])


def test_aliases_resolve_to_our_classes():
    assert resolve_target("sgm.modules.GeneralConditioner") is GeneralConditioner
    assert resolve_target(f"{_ENC}.GeneralConditioner") is GeneralConditioner
    assert resolve_target(f"{_ENC}.FrozenCLIPEmbedder") is FrozenCLIPEmbedder
    assert resolve_target(f"{_ENC}.FrozenOpenCLIPEmbedder2") is FrozenOpenCLIPEmbedder2
    assert resolve_target(f"{_ENC}.ConcatTimestepEmbedderND") is ConcatTimestepEmbedderND


# ------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def hf_clip_tokenizer():
    """transformers' CLIPTokenizer built offline from the BPE file bundled with open_clip."""
    from _nets_convert import clip_tokenizer

    tokenizer = clip_tokenizer()
    if tokenizer is None:
        pytest.skip("this transformers' CLIPTokenizer needs vocab/merges files")
    return tokenizer


def test_clip_l_tokens_match_transformers_tokenizer(hf_clip_tokenizer):
    emb = _tiny_clip()
    ours = emb.tokenize(PROMPTS)
    # SDXL used the slow CLIPTokenizer, which runs ftfy (HTML entities unescaped); the fast
    # tokenizer of transformers 5 does not, so the oracle gets the entity already unescaped.
    plain = [p.replace("&amp;", "&") for p in PROMPTS]
    ref = hf_clip_tokenizer(plain, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    assert torch.equal(ours, ref["input_ids"])
    assert ours.shape == (4, 77) and (ours[:, 0] == 49406).all()
    assert ours[0, 6] == 49407 and (ours[0, 7:] == 49407).all()  # padded with EOS
    assert ours[2, -1] == 49407 and (ours[2, 1:-1] != 49407).all()  # truncated, EOS last
    assert ours[3, 1] == 49407


def test_bigg_tokens_match_open_clip():
    import open_clip

    ours = _tiny_bigg().tokenize(PROMPTS)
    assert torch.equal(ours, open_clip.tokenize(PROMPTS))
    assert ours[0, 6] == 49407 and (ours[0, 7:] == 0).all()  # padded with 0
    assert ours[2, -1] == 49407 and ours[2, 0] == 49406


# ------------------------------------------------------------------------------ CLIP-L


@pytest.mark.parametrize(("layer", "layer_idx"), [("hidden", 2), ("hidden", 3), ("last", None), ("pooled", None)])
def test_clip_l_matches_transformers(layer, layer_idx):
    from transformers import CLIPTextConfig, CLIPTextModel

    from sgm.conditioning import VIT_L14_TEXT_CONFIG

    torch.manual_seed(0)
    emb = _tiny_clip(layer=layer, layer_idx=layer_idx, always_return_pooled=True)
    ref = CLIPTextModel(CLIPTextConfig(**{**VIT_L14_TEXT_CONFIG, **TINY_CLIP})).eval()
    ref.load_state_dict(emb.transformer.state_dict())
    tokens = emb.tokenize(PROMPTS[:3])
    z, pooled = emb(PROMPTS[:3])
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True)
    expected = {"hidden": lambda: out.hidden_states[layer_idx], "last": lambda: out.last_hidden_state,
                "pooled": lambda: out.pooler_output[:, None]}[layer]()
    assert z.shape == (3, 77, 32) if layer != "pooled" else z.shape == (3, 1, 32)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-5, rtol=1e-5)
    if layer_idx == 2:  # hidden_states[2] is the output of layer index 1 with no final norm
        assert not torch.allclose(z, out.last_hidden_state)


def test_clip_l_state_dict_has_transformers4_layout_and_round_trips():
    torch.manual_seed(1)
    emb = _tiny_clip()
    sd = emb.state_dict()
    native = emb.transformer.state_dict()
    expected = {"transformer.text_model." + k.removeprefix("text_model.") for k in native}
    expected.add("transformer.text_model.embeddings.position_ids")
    assert set(sd) == expected
    ids = sd["transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])
    want = emb(PROMPTS[:2])

    fresh = _tiny_clip()
    fresh.load_state_dict(sd)  # file layout, strict
    torch.testing.assert_close(fresh(PROMPTS[:2]), want, atol=0, rtol=0)

    fresh = _tiny_clip()
    fresh.load_state_dict({"transformer." + k: v for k, v in native.items()})  # installed layout, strict
    torch.testing.assert_close(fresh(PROMPTS[:2]), want, atol=0, rtol=0)

    with torch.device("meta"):
        lazy = _tiny_clip()
    lazy.load_state_dict(sd, assign=True)
    assert not any(t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
    torch.testing.assert_close(lazy(PROMPTS[:2]), want, atol=0, rtol=0)
    assert set(lazy.state_dict()) == expected


class _TransformersV4Layout(torch.nn.Module):
    """A CLIPTextModel as transformers 4 lays it out: ``text_model.`` level, persistent position_ids."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.text_model = inner
        self.config = inner.config
        inner.embeddings._non_persistent_buffers_set.discard("position_ids")

    def forward(self, **kwargs):
        return self.text_model(**kwargs)


def test_clip_l_layout_hooks_under_transformers4_layout():
    torch.manual_seed(5)
    emb = _tiny_clip()
    v5_sd = {"transformer." + k: v for k, v in emb.transformer.state_dict().items()}  # installed layout
    file_sd = emb.state_dict()
    want = emb(PROMPTS[:2])

    old = _tiny_clip()
    old.transformer = _TransformersV4Layout(old.transformer)
    old._native_level = "text_model."
    assert old.text_model is old.transformer.text_model
    assert set(old.transformer.state_dict()) == {k.removeprefix("transformer.") for k in file_sd}
    for sd in (file_sd, v5_sd):
        old.load_state_dict(sd)  # strict
        torch.testing.assert_close(old(PROMPTS[:2]), want, atol=0, rtol=0)
        assert list(old.state_dict()) == list(old.transformer.state_dict(prefix="transformer."))
        assert set(old.state_dict()) == set(file_sd)


# -------------------------------------------------------------------------------- bigG


def test_bigg_matches_open_clip_text_tower():
    import open_clip

    torch.manual_seed(2)
    emb = _tiny_bigg()
    _scramble(emb)
    text_cfg = {**open_clip.get_model_config("ViT-bigG-14")["text_cfg"], **TINY_BIGG}
    ref = open_clip.model.CLIP(
        embed_dim=TINY_EMBED,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        text_cfg=text_cfg,
    ).eval()
    missing, unexpected = ref.load_state_dict(emb.model.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("visual.") for k in missing)
    assert {k for k in emb.state_dict()} == {"model." + k for k in ref.state_dict() if not k.startswith("visual.")}

    captured = {}

    def grab(module, args, kwargs):
        captured["penultimate"] = args[0] if args else kwargs["q_x"]

    hook = ref.transformer.resblocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
    tokens = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        pooled_ref = ref.encode_text(tokens)
    hook.remove()
    penultimate_ref = captured["penultimate"]
    if not getattr(ref.transformer, "batch_first", False):
        penultimate_ref = penultimate_ref.transpose(0, 1)

    z, pooled = emb(PROMPTS)
    assert z.shape == (4, 77, 48) and pooled.shape == (4, TINY_EMBED)
    torch.testing.assert_close(z, penultimate_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, pooled_ref, atol=1e-5, rtol=1e-5)

    last = _tiny_bigg(layer="last", always_return_pooled=False)
    last.load_state_dict(emb.state_dict())
    legacy = _tiny_bigg(layer="penultimate", always_return_pooled=False, legacy=True)
    legacy.load_state_dict(emb.state_dict())
    torch.testing.assert_close(legacy(PROMPTS), emb.model.ln_final(z))
    assert last(PROMPTS).shape == (4, 77, 48) and not torch.allclose(last(PROMPTS), z)


def test_bigg_meta_build_then_assign_load():
    torch.manual_seed(3)
    emb = _tiny_bigg()
    sd = emb.state_dict()
    assert sd["model.logit_scale"].shape == () and "model.attn_mask" not in sd
    with torch.device("meta"):
        lazy = _tiny_bigg()
    lazy.load_state_dict(sd, assign=True)
    assert not any(t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
    for a, b in zip(lazy(PROMPTS[:2]), emb(PROMPTS[:2])):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------- size embeds


def test_concat_timestep_embedder_formula():
    emb = ConcatTimestepEmbedderND(outdim=4)
    out = emb(torch.tensor([[1.0, 100.0], [0.0, 2.0]]))
    f = [1.0, math.exp(-math.log(10000) / 2)]  # = 1, 0.01

    def one(t):
        return [math.cos(t * f[0]), math.cos(t * f[1]), math.sin(t * f[0]), math.sin(t * f[1])]

    expected = torch.tensor([one(1.0) + one(100.0), one(0.0) + one(2.0)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    big = ConcatTimestepEmbedderND(outdim=256)([[1024, 768]])
    assert big.shape == (1, 512)
    i = 5
    freq = math.exp(-math.log(10000) * i / 128)
    assert big[0, 256 + i].item() == pytest.approx(math.cos(768 * freq), abs=1e-3)
    assert big[0, 256 + 128 + i].item() == pytest.approx(math.sin(768 * freq), abs=1e-3)
    assert ConcatTimestepEmbedderND(outdim=256)(torch.tensor([6.0])).shape == (1, 256)
    torch.testing.assert_close(timestep_embedding(torch.tensor([3.0]), 5)[0, -1], torch.tensor(0.0))


# ---------------------------------------------------------------------------- conditioner


@pytest.fixture(scope="module")
def tiny_parts():
    torch.manual_seed(4)
    clip = _tiny_clip(input_key="txt")
    bigg = _tiny_bigg(input_key="txt")
    return clip, bigg


def _batch(b: int = 3) -> dict:
    return {
        "txt": ["a red cube", "two dogs", "a house by the sea"][:b],
        "original_size_as_tuple": torch.tensor([[1024, 1024], [768, 1344], [512, 512]][:b]),
        "crop_coords_top_left": torch.tensor([[0, 0], [10, 20], [0, 64]][:b]),
        "target_size_as_tuple": torch.tensor([[1024, 1024], [768, 1344], [512, 512]][:b]),
    }


def _conditioner(clip, bigg, bigg_ucg: float = 0.0, legacy_ucg_val=None) -> GeneralConditioner:
    bigg.ucg_rate, bigg.legacy_ucg_val = bigg_ucg, legacy_ucg_val
    sizes = [ConcatTimestepEmbedderND(outdim=256, input_key=k)
             for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    return GeneralConditioner([clip, bigg, *sizes])


def test_conditioner_routing_and_force_zero(tiny_parts):
    clip, bigg = tiny_parts
    cond = _conditioner(clip, bigg).eval()
    batch = _batch()
    out = cond(batch)
    assert cond.output_widths() == {"crossattn": 32 + 48, "vector": TINY_EMBED + 3 * 512}
    assert out["crossattn"].shape == (3, 77, 80) and out["vector"].shape == (3, TINY_EMBED + 1536)
    z_bigg, pooled = bigg(batch["txt"])
    torch.testing.assert_close(out["crossattn"], torch.cat([clip(batch["txt"]), z_bigg], 2))
    sizes = torch.cat([ConcatTimestepEmbedderND(256)(batch[k]) for k in
                       ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")], 1)
    torch.testing.assert_close(out["vector"], torch.cat([pooled, sizes], 1))
    assert not out["crossattn"].requires_grad

    c, uc = cond.get_unconditional_conditioning(batch, force_uc_zero_embeddings=["txt"])
    torch.testing.assert_close(c["crossattn"], out["crossattn"])
    assert (uc["crossattn"] == 0).all() and (uc["vector"][:, :TINY_EMBED] == 0).all()
    torch.testing.assert_close(uc["vector"][:, TINY_EMBED:], out["vector"][:, TINY_EMBED:])
    assert (uc["vector"][:, TINY_EMBED:] != 0).any()


def test_conditioner_ucg_dropout_only_in_training(tiny_parts):
    clip, bigg = tiny_parts
    batch = _batch()
    ref = _conditioner(clip, bigg).eval()(batch)
    cond = _conditioner(clip, bigg, bigg_ucg=1.0)
    cond.train()
    assert not clip.training and not bigg.training  # frozen embedders stay in eval mode
    out = cond(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["crossattn"][..., :32], ref["crossattn"][..., :32])
    assert (out["crossattn"][..., 32:] == 0).all() and (out["vector"][:, :TINY_EMBED] == 0).all()
    torch.testing.assert_close(out["vector"][:, TINY_EMBED:], ref["vector"][:, TINY_EMBED:])
    c, _ = cond.get_unconditional_conditioning(batch)  # no dropout there, rates restored
    torch.testing.assert_close(c["crossattn"], ref["crossattn"])
    assert bigg.ucg_rate == 1.0
    cond.eval()
    torch.testing.assert_close(cond(batch)["crossattn"], ref["crossattn"])

    half = _conditioner(clip, bigg, bigg_ucg=0.5).train()
    b = {k: (v * 4 if isinstance(v, list) else v.repeat(4, 1)) for k, v in batch.items()}
    o1 = half(b, generator=torch.Generator().manual_seed(1))
    o2 = half(b, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(o1["vector"], o2["vector"])
    dropped_z = (o1["crossattn"][..., 32:] == 0).flatten(1).all(1)
    dropped_pooled = (o1["vector"][:, :TINY_EMBED] == 0).all(1)
    assert torch.equal(dropped_z, dropped_pooled) and 0 < int(dropped_z.sum()) < 12

    legacy = _conditioner(clip, bigg, bigg_ucg=1.0, legacy_ucg_val="").train()
    out = legacy(batch)
    empty_z, empty_pooled = bigg([""] * 3)
    torch.testing.assert_close(out["crossattn"][..., 32:], empty_z)
    torch.testing.assert_close(out["vector"][:, :TINY_EMBED], empty_pooled)
    assert batch["txt"][0] == "a red cube"  # the caller's batch is not modified
    bigg.ucg_rate, bigg.legacy_ucg_val = 0.0, None


def test_conditioner_from_sgm_dicts_and_hydra_nodes():
    from hydra.utils import instantiate as hydra_instantiate

    tiny = {"is_trainable": False, "input_key": "txt", "target": f"{_ENC}.FrozenCLIPEmbedder",
            "params": {"layer": "hidden", "layer_idx": 2, "text_config": TINY_CLIP}, "ucg_rate": 0.1}
    cond = instantiate({"target": "sgm.modules.GeneralConditioner",
                        "params": {"emb_models": [tiny, _size("aesthetic_score")]}})
    assert cond.embedders[0].ucg_rate == 0.1 and cond.embedders[1].input_key == "aesthetic_score"
    assert cond.output_widths() == {"crossattn": 32, "vector": 256}
    out = cond({"txt": ["x"], "aesthetic_score": torch.tensor([6.0])})
    assert out["crossattn"].shape == (1, 77, 32) and out["vector"].shape == (1, 256)

    node = {"_target_": "sgm.conditioning.GeneralConditioner", "emb_models": [
        {"_target_": "sgm.conditioning.ConcatTimestepEmbedderND", "input_key": "original_size_as_tuple",
         "is_trainable": False, "ucg_rate": 0.0, "outdim": 8},
        {"_target_": "sgm.conditioning.ConcatTimestepEmbedderND", "input_key": "aesthetic_score", "outdim": 8},
    ]}
    cond = hydra_instantiate(node)
    assert [type(e).__name__ for e in cond.embedders] == ["ConcatTimestepEmbedderND"] * 2
    out = cond({"original_size_as_tuple": torch.tensor([[64, 32]]), "aesthetic_score": torch.tensor([2.5])})
    assert out["vector"].shape == (1, 24) and cond.output_widths() == {"vector": 24}
    with pytest.raises(KeyError, match="aesthetic_score"):
        cond({"original_size_as_tuple": torch.tensor([[64, 32]])})


def test_conditioner_meta_build_then_assign_load(tiny_parts):
    clip, bigg = tiny_parts
    cond = _conditioner(clip, bigg).eval()
    sd = cond.state_dict()
    assert "embedders.0.transformer.text_model.embeddings.position_ids" in sd
    with torch.device("meta"):
        lazy = GeneralConditioner([
            _tiny_clip(input_key="txt"), _tiny_bigg(input_key="txt"),
            *[ConcatTimestepEmbedderND(outdim=256, input_key=k)
              for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")],
        ])
    lazy.load_state_dict(sd, assign=True)
    assert not any(t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
    batch = _batch(2)
    for key, value in cond(batch).items():
        torch.testing.assert_close(lazy(batch)[key], value, atol=0, rtol=0)
