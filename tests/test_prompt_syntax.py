"""Prompt syntax (issue 13): A1111's parse examples, chunks and BREAK, A1111/ComfyUI weighting (compel
as the oracle where it coincides), per-step prompt editing, textual inversion, clip_skip, and the
unweighted prompt giving exactly the conditioning it gave before."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from sgm.conditioning import GeneralConditioner
from sgm.conditioning.prompt_schedule import CondSchedule, PromptOptions, check_prompt_options, prompt_mode
from sgm.conditioning.prompt_syntax import parse_attention, parse_schedule, prompt_at
from sgm.conditioning.textual_inversion import EmbeddingLibrary
from sgm.conditioning.weighting import PromptMode, encode_prompts, prompt_chunks
from sgm.conditioning.embedders import bpe_encode
from test_conditioning import _scramble, _tiny_bigg, _tiny_clip, hf_clip_tokenizer  # noqa: F401

# ------------------------------------------------------------------------------- parsing

ATTENTION = [  # modules/prompt_parser.py, parse_prompt_attention's docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("unmatched) close]", [("unmatched) close]", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION)
def test_attention_parse_matches_a1111(text, expected):
    got = parse_attention(text)
    assert [f for f, _ in got] == [f for f, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


SCHEDULES = [  # get_learned_conditioning_prompt_schedules' docstring (10 steps)
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
    ("[fe|]male", [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
    ("[fe|||]male", [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
]


def _per_step(schedule, steps):
    return [prompt_at([tuple(e) for e in schedule], s) for s in range(1, steps + 1)]


@pytest.mark.parametrize(("text", "expected"), SCHEDULES)
def test_editing_schedule_matches_a1111(text, expected):
    got = parse_schedule(text, 10)
    assert _per_step(got, 10) == _per_step(expected, 10)
    assert all(a[1] != b[1] for a, b in zip(got, got[1:]))  # equal neighbours merged: encoded once


def test_editing_schedule_wiki_example_at_100_steps():
    text = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]")
    assert parse_schedule(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful")]


# ------------------------------------------------------------------------------- chunks


def _ids(text: str) -> list[int]:
    return bpe_encode(text, "transformers")


def test_chunks_break_comma_backtrack_and_embedding_slots():
    long = prompt_chunks("word " * 100, "a1111", _ids)
    assert [len(c.ids) for c in long] == [75, 25]
    broken = prompt_chunks("a cat BREAK a dog", "a1111", _ids)
    assert [c.ids for c in broken] == [_ids("a cat"), _ids("a dog")]
    # a comma within the last 20 tokens of a full chunk: what follows it moves to the next chunk
    comma = prompt_chunks("word " * 70 + ", " + "more " * 10, "a1111", _ids)
    assert [len(c.ids) for c in comma] == [71, 10] and comma[0].ids[-1] == _ids(",")[0]
    far = prompt_chunks("word " * 50 + ", " + "more " * 30, "a1111", _ids)  # comma 24 tokens back: no move
    assert [len(c.ids) for c in far] == [75, 6]
    vec = torch.zeros(3, 8)
    emb = prompt_chunks("word " * 74 + "embedding:x", "a1111", _ids, lambda name: vec)
    assert [len(c.ids) for c in emb] == [74, 3] and emb[1].vectors[0][0] == 0  # never split across chunks
    weighted = prompt_chunks("a (cat:1.5)", "a1111", _ids)
    assert weighted[0].weights == [1.0, 1.5]


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    clip, bigg = _tiny_clip(always_return_pooled=True), _tiny_bigg()
    _scramble(clip, 1)
    _scramble(bigg, 2)
    return clip, bigg


@pytest.mark.parametrize("which", [0, 1])
def test_long_prompts_are_chunks_encoded_apart_pooled_from_the_first(encoders, which):
    enc = encoders[which]
    text = "word " * 80 + "BREAK tail"
    z, pooled = encode_prompts(enc, [text, "short"], PromptMode("a1111"))
    assert z.shape == (2, 3 * 77, z.shape[-1])
    first, _ = enc.encode_tokens(enc.tokenize(["word " * 75]))
    second, _ = enc.encode_tokens(enc.tokenize(["word " * 5]))
    third, _ = enc.encode_tokens(enc.tokenize(["tail"]))
    empty, _ = enc.encode_tokens(enc.tokenize([""]))
    torch.testing.assert_close(z[0], torch.cat([first[0], second[0], third[0]]))
    torch.testing.assert_close(z[1, 77:], torch.cat([empty[0], empty[0]]))  # padded with empty chunks
    _, pooled_first = enc(["word " * 75])
    torch.testing.assert_close(pooled[0], pooled_first[0])


# ---------------------------------------------------------------------------- weighting


@pytest.mark.parametrize("which", [0, 1])
def test_a1111_weighting_scales_tokens_and_restores_the_chunk_mean(encoders, which):
    enc = encoders[which]
    z, _ = encode_prompts(enc, ["a (cat:1.5) [sat]"], PromptMode("a1111"))
    plain, _ = enc.encode_tokens(enc.tokenize(["a cat sat"]))
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1  # BOS, a, cat, sat
    scaled = plain[0] * w[:, None]
    expected = scaled * (plain[0].mean() / scaled.mean())
    torch.testing.assert_close(z[0], expected)
    torch.testing.assert_close(z[0].mean(), plain[0].mean())


@pytest.mark.parametrize("which", [0, 1])
def test_comfy_weighting_interpolates_from_the_empty_prompt(encoders, which):
    enc = encoders[which]
    z, _ = encode_prompts(enc, ["a (cat:1.5) (sat:0.5)"], PromptMode("comfy"))
    plain, _ = enc.encode_tokens(enc.tokenize(["a cat sat"]))
    empty, _ = enc.encode_tokens(enc.tokenize([""]))
    w = torch.ones(77)
    w[2], w[3] = 1.5, 0.5
    torch.testing.assert_close(z[0], empty[0] + w[:, None] * (plain[0] - empty[0]))


def test_comfy_upweighting_matches_compel(encoders, hf_clip_tokenizer):  # noqa: F811
    """compel's weights >= 1 are the same interpolation from the empty prompt (its downweighting differs)."""
    from compel import EmbeddingsProvider, ReturnedEmbeddingsType

    clip = encoders[0]
    assert clip.layer_idx == clip.num_layers - 1  # our hidden layer is compel's "penultimate"
    provider = EmbeddingsProvider(hf_clip_tokenizer, clip.transformer, device="cpu", model_max_length=77,
                                  returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED)
    ref = provider.get_embeddings_for_weighted_prompt_fragments([["a", "red cat", "sat on a", "mat"]],
                                                                [[1.0, 1.3, 1.0, 1.2]])
    ours, _ = encode_prompts(clip, ["a (red cat:1.3) sat on a (mat:1.2)"], PromptMode("comfy"))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def conditioner(encoders):
    from sgm.conditioning import ConcatTimestepEmbedderND

    clip, bigg = (copy.deepcopy(e) for e in encoders)
    for e in (clip, bigg):
        e.input_key, e.return_pooled = "txt", True
    size = ConcatTimestepEmbedderND(outdim=8, input_key="original_size_as_tuple")
    return GeneralConditioner([clip, bigg, size]).eval()


def test_unweighted_prompts_give_todays_conditioning_bit_for_bit(conditioner):
    batch = {"txt": ["a photo of a cat", "two dogs, a house", ""], "original_size_as_tuple": torch.ones(3, 2)}
    today = conditioner(batch)
    with prompt_mode(conditioner, PromptMode("a1111")):
        parsed = conditioner(batch)
    with prompt_mode(conditioner, PromptMode("comfy")):
        comfy = conditioner(batch)
    for key in today:
        assert torch.equal(today[key], parsed[key]) and torch.equal(today[key], comfy[key])


@pytest.fixture(scope="module")
def digits(compose):
    from sgm.tasks.common import build_engine

    cfg = compose("sample", ["model=digits"])
    engine = build_engine(cfg.model, cfg.weights)
    return engine, cfg


def test_shipped_model_unweighted_is_unchanged_and_weights_parse(digits):
    engine, cfg = digits
    prompts, negatives = ["a handwritten digit seven", "a handwritten digit two"], ["", ""]
    engine.prompt_options = None
    c0, u0 = engine.get_conditionings(prompts, negatives, 32, 32)
    engine.set_prompt_options(PromptOptions("a1111"))
    try:
        c1, u1 = engine.get_conditionings(prompts, negatives, 32, 32)
        weighted, _ = engine.get_conditionings(["a handwritten digit (seven:1.2)"], [""], 32, 32)
    finally:
        engine.prompt_options = None
    for key in c0:
        assert torch.equal(c0[key], c1[key]) and torch.equal(u0[key], u1[key])
    assert weighted["crossattn"].shape == c0["crossattn"][:1].shape  # the brackets are not text
    assert not torch.equal(weighted["crossattn"], c0["crossattn"][:1])
    # the pooled vector (unweighted, first chunk) is the plain prompt's
    torch.testing.assert_close(weighted["vector"], c0["vector"][:1])


# ------------------------------------------------------------------------- prompt editing


def test_prompt_editing_switches_per_step_and_encodes_each_prompt_once(digits):
    from sgm.diffusion.guiders import VanillaCFG
    from sgm.diffusion.samplers import EulerEDMSampler

    engine, _ = digits
    steps = 6
    sigmas = torch.linspace(10, 0.1, steps).tolist() + [0.0]
    sigmas = torch.tensor(sigmas)
    sampler = EulerEDMSampler(guider=VanillaCFG(scale=3.0))
    engine.configure_prediction(32, 32, sigmas, sampler)
    prompts = ["a handwritten digit [one:seven:0.5]", "a handwritten digit [two|three]"]
    encoded: list[str] = []
    clip = engine.conditioner.embedders[0]
    original = clip.encode_tokens

    def counting(tokens):
        encoded.extend(tuple(row.tolist()) for row in tokens)
        return original(tokens)

    clip.encode_tokens = counting
    engine.set_prompt_options(PromptOptions("a1111"))
    try:
        cond, uc = engine.get_conditionings(prompts, ["", ""], 32, 32)
    finally:
        engine.prompt_options = None
        del clip.encode_tokens
    texts = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit two",
             "a handwritten digit three"]
    # each distinct prompt once (cond's four), not once per step; the empty negative, which the shipped
    # model zeroes (uc_zero_keys), is not encoded at all
    assert sorted(encoded) == sorted(tuple(clip.tokenize([t])[0].tolist()) for t in texts)
    assert isinstance(cond, CondSchedule) and not isinstance(uc, CondSchedule)

    seen: list[tuple[float, torch.Tensor]] = []

    def denoise(x, sigma, c):
        seen.append((float(sigma[0]), c["crossattn"][x.shape[0] // 2:]))  # uc first, then cond
        return torch.zeros_like(x)

    sampler.sample(denoise, torch.zeros(2, 4, 8, 8), sigmas, cond, uc)
    plain = {t: engine.plain_conditionings([t], [""], 32, 32)[0]["crossattn"][0] for t in texts}
    assert len(seen) == steps
    for step, (sigma, got) in enumerate(seen, start=1):
        first = "a handwritten digit " + ("one" if step <= 3 else "seven")
        second = "a handwritten digit " + ("two" if step % 2 else "three")
        torch.testing.assert_close(got[0], plain[first])
        torch.testing.assert_close(got[1], plain[second])
        assert not torch.allclose(got[0], plain["a handwritten digit " + ("seven" if step <= 3 else "one")], atol=1e-3)
        assert not torch.allclose(got[1], plain["a handwritten digit " + ("three" if step % 2 else "two")], atol=1e-3)


def test_break_pads_cond_and_uc_to_one_length(digits):
    engine, _ = digits
    engine.set_prompt_options(PromptOptions("a1111"))
    try:
        cond, uc = engine.get_conditionings(["a handwritten digit BREAK seven"], ["blurry"], 32, 32)
        _, zero_uc = engine.get_conditionings(["a handwritten digit BREAK seven"], [""], 32, 32)
    finally:
        engine.prompt_options = None
    width = cond["crossattn"].shape[-1]
    assert cond["crossattn"].shape == uc["crossattn"].shape == zero_uc["crossattn"].shape == (1, 154, width)
    negative = engine.plain_conditionings(["x"], ["blurry"], 32, 32)[1]
    torch.testing.assert_close(uc["crossattn"][:, :77], negative["crossattn"])  # then an empty-prompt chunk
    first = engine.plain_conditionings(["a handwritten digit"], [""], 32, 32)[0]
    torch.testing.assert_close(cond["crossattn"][:, :77], first["crossattn"])
    torch.testing.assert_close(cond["vector"], first["vector"])  # pooled from the first chunk
    assert not zero_uc["crossattn"].any()  # the empty negative is still the zeroed branch


# ------------------------------------------------------------------------ embeddings


def _embedding(path, n=2, l_width=32, g_width=48, keys=("clip_l", "clip_g"), seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = {"clip_l": l_width, "clip_g": g_width}
    save_file({k: torch.randn(n, widths[k], generator=g) for k in keys}, str(path))


def test_embedding_vectors_replace_token_embeddings(encoders, tmp_path):
    _embedding(tmp_path / "mystyle.safetensors")
    library = EmbeddingLibrary(tmp_path)
    for enc in encoders:
        vec = library.vectors("mystyle", enc.embedding_key)
        ours, _ = encode_prompts(enc, ["a embedding:mystyle cat"], PromptMode("comfy", library))
        bare, _ = encode_prompts(enc, ["a mystyle cat"], PromptMode("a1111", library))
        literal, _ = encode_prompts(enc, ["a mystyle cat"], PromptMode("comfy", library))  # no bare names in comfy
        # oracle: the vectors as two new rows of the token table, written as their ids
        oracle = copy.deepcopy(enc)
        with torch.no_grad():
            oracle.token_embedding.weight[1000:1002] = vec
        tokens = torch.tensor([[49406, *_ids("a"), 1000, 1001, *_ids("cat"), 49407]])
        tokens = torch.cat([tokens, torch.full((1, 77 - tokens.shape[1]), enc.pad_id)], 1)
        expected, _ = oracle.encode_tokens(tokens)
        torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(bare, expected)
        assert not torch.allclose(literal, expected)


@pytest.fixture
def meta_conditioners(compose):
    from hydra.utils import instantiate

    cfg = compose("sample", ["model=digits"])
    with torch.device("meta"):
        built = [instantiate(cfg.model.conditioner)]
    return lambda: built


def test_embedding_errors_are_named_before_weights(tmp_path, meta_conditioners):
    _embedding(tmp_path / "good.safetensors")
    _embedding(tmp_path / "wide.safetensors", l_width=768, g_width=1280)
    _embedding(tmp_path / "half.safetensors", keys=("clip_l",))
    ok = check_prompt_options("a1111", tmp_path, None, ["a embedding:good cat", "a good dog"], 10, meta_conditioners)
    assert set(ok.library.files) == {"good", "wide", "half"}
    with pytest.raises(FileNotFoundError, match=r"'foo'.*available: good, half, wide"):
        check_prompt_options("comfy", tmp_path, None, ["a [cat:dog:3] embedding:foo"], 10, meta_conditioners)
    with pytest.raises(ValueError, match=r"wide.*clip_l has shape \[2, 768\].*\[n, 32\]"):
        check_prompt_options("a1111", tmp_path, None, ["wide"], 10, meta_conditioners)
    with pytest.raises(ValueError, match=r"half.*no 'clip_g'"):
        check_prompt_options("a1111", tmp_path, None, ["(embedding:half:1.2)"], 10, meta_conditioners)
    with pytest.raises(ValueError, match=r"prompt_syntax must be one of a1111\|comfy\|none"):
        check_prompt_options("webui", tmp_path, None, ["x"], 10, meta_conditioners)
    with pytest.raises(ValueError, match="clip_skip"):
        check_prompt_options("a1111", tmp_path, 0, ["x"], 10, meta_conditioners)
    with pytest.raises(ValueError, match=r"clip_skip=9 is out of range.*1\.\.4"):
        check_prompt_options("a1111", tmp_path, 9, ["x"], 10, meta_conditioners)


def test_run_stops_on_a_missing_embedding_before_building(run_task, tmp_path, monkeypatch):
    from sgm.tasks import common

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(common, "build_engine", no_build)
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="embedding 'nothere'"):
        run_task("sample", ["progress=false", "~logger", f"embeddings_dir={tmp_path}",
                            "prompt='a digit embedding:nothere'"], out)
    assert not list(out.glob("*.png"))


# --------------------------------------------------------------------------- clip_skip


def test_clip_skip_is_the_nth_hidden_state_from_the_last(encoders):
    clip, bigg = (copy.deepcopy(e) for e in encoders)
    tokens = clip.tokenize(["a photo of a cat"])
    default_l, default_g = clip.encode_tokens(tokens)[0], bigg.encode_tokens(bigg.tokenize(["a photo of a cat"]))[0]
    ref = clip.transformer(input_ids=tokens, output_hidden_states=True).hidden_states
    captured = []
    hooks = [b.register_forward_hook(lambda m, a, out: captured.append(out)) for b in bigg.model.transformer.resblocks]
    bigg.encode_tokens(bigg.tokenize(["a photo of a cat"]))  # fills captured with each block's output
    for h in hooks:
        h.remove()
    for n in range(1, clip.num_layers + 2):
        clip.clip_skip = bigg.clip_skip = n
        torch.testing.assert_close(clip.encode_tokens(tokens)[0], ref[-n])
        z = bigg.encode_tokens(bigg.tokenize(["a photo of a cat"]))[0]
        layers = len(captured)
        if n <= layers:
            torch.testing.assert_close(z, captured[layers - n])
        if n == 2:  # SDXL's own layer for both encoders
            assert torch.equal(clip.encode_tokens(tokens)[0], default_l) and torch.equal(z, default_g)


# ------------------------------------------------------------------------ shipped model


@pytest.mark.slow
def test_weighted_digit_prompt_draws_sevens(run_task, tmp_path):
    overrides = ["progress=false", "~logger", "prompt='a handwritten digit (seven:1.2)'", "num_images_per_prompt=10",
                 "steps=15"]
    metrics, _ = run_task("sample", overrides, tmp_path / "a1111")
    assert metrics["accuracy"] >= 0.9
    metrics, _ = run_task("sample", [*overrides, "prompt_syntax=none"], tmp_path / "none")
    assert metrics["accuracy"] < 0.5


@pytest.mark.slow
def test_run_samples_an_edited_prompt_end_to_end(run_task, tmp_path):
    """run.py with prompt editing and a weighted negative: the schedule reaches the sampler through predict_step."""
    overrides = ["progress=false", "~logger", "~metrics", "steps=4", "sampler=heun",
                 "prompt='a handwritten digit [one:(seven:1.1):0.5]'", "negative_prompt='[blurry|smudged]'"]
    run_task("sample", overrides, tmp_path / "run")
    assert len(list((tmp_path / "run").glob("*.png"))) == 2  # the image and the grid
