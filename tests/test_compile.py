"""Compiled sampling (sgm.networks.compile): no graph break in the UNet, compiled == eager, the
``compile`` node checked before any weight is read."""

from __future__ import annotations

import shutil

import pytest
import torch
from hydra.utils import instantiate

import sgm.tasks.sample
from sgm.networks.compile import CompileSettings, apply_compile, compile_settings
from sgm.tasks.common import build_engine
from test_catalogue import QUIET, no_weights  # noqa: F401 - a fixture: every weight loader raises

STEPS = 2


@pytest.fixture(scope="module")
def tiny(compose):
    cfg = compose("sample", ["model=tiny", "sampler=euler", f"steps={STEPS}", "guider=cfg"])
    return cfg, build_engine(cfg.model, cfg.weights, seed=0)


def _unet_inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0][:batch]),
            torch.randn(batch, 7, 80, generator=g), torch.randn(batch, 224, generator=g))


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_unet_has_no_graph_break(tiny):
    import torch._dynamo

    unet = tiny[1].model.diffusion_model
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(*_unet_inputs())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _latents(engine, cfg):
    sampler = instantiate(cfg.sampler)
    sigmas = engine.schedule(instantiate(cfg.discretization), STEPS)
    cond, uc = engine.get_conditionings(["a red cube", "a blue sphere"], ["", ""], 32, 32)
    return engine.sample_latents(cond, uc, [0, 1], engine.latent_shape(32, 32), sigmas, sampler)


def _compiled_vs_eager(cfg, settings):
    import torch._dynamo

    eager = build_engine(cfg.model, cfg.weights, seed=0)
    compiled = build_engine(cfg.model, cfg.weights, seed=0)
    torch._dynamo.reset()
    assert apply_compile(compiled, settings).startswith(f"torch.compile(backend={settings.backend}")
    assert compiled.model._compiled and list(compiled.state_dict()) == list(eager.state_dict())
    want, got = _latents(eager, cfg), _latents(compiled, cfg)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.slow  # about 2 s or more: outside the quick loop (make test runs it)
def test_compiled_sampling_equals_eager(tiny):
    """aot_eager traces the whole UNet (fullgraph) and runs the traced graph: fast on a CPU."""
    _compiled_vs_eager(tiny[0], CompileSettings(enabled=True, backend="aot_eager", fuse_qkv=True, channels_last=True))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_sampling_equals_eager(tiny):
    """inductor's lowering and fusion of the whole UNet, as C++ kernels. Scalar kernels (``cpp.vec_isa_ok=False``)
    built without optimization (``aot_inductor.debug_compile``: g++ -O0), all ~40 of them and the graph's wrapper
    in one C++ file (``cpp_wrapper``): the same graph, lowering and fusion as the vectorized -O3 kernels behind
    a Python wrapper, in one compiler run instead of one per kernel (31 against 50 CPU-seconds on these machines,
    2026-12-04; vectorized C++ codegen and the compiler's optimizer are inductor's and g++'s own, tested
    upstream; compiled runs of users are on GPUs)."""
    import torch._inductor.config

    with torch._inductor.config.patch({"cpp.vec_isa_ok": False, "aot_inductor.debug_compile": True,
                                       "cpp_wrapper": True}):
        _compiled_vs_eager(tiny[0], CompileSettings(enabled=True, mode="default"))


@pytest.mark.parametrize("node, message", [
    ({"mode": "fastest"}, r"compile\.mode must be one of"),
    ({"enabled": True, "backend": "nope"}, r"compile\.backend must be one of"),
    ({"fullgraph": "yes"}, r"compile\.fullgraph must be a bool"),
    ({"speed": 1}, r"compile has unknown keys \['speed'\]"),
    ({"enabled": False, "cuda_graphs": True}, r"compile\.cuda_graphs=true replays inductor's compiled graph"),
    ({"enabled": True, "cuda_graphs": True}, r"compile\.cuda_graphs=true needs a CUDA device"),
    (3, r"compile must be true, false or a node"),
])
def test_bad_compile_node_is_named(node, message):
    with pytest.raises(ValueError, match=message):
        compile_settings(node, device="cpu")


def test_compile_true_means_the_defaults():
    assert compile_settings(True) == CompileSettings(enabled=True)
    assert not compile_settings(False).active and compile_settings(None) == CompileSettings()
    assert CompileSettings(enabled=True, cuda_graphs=True).compile_mode == "max-autotune"


@pytest.mark.parametrize("overrides, message", [
    (["compile.mode=fastest"], r"compile\.mode must be one of"),
    (["compile.enabled=true", "compile.backend=nope"], r"compile\.backend must be one of"),
    (["+compile.speed=1"], r"compile has unknown keys \['speed'\]"),
])
def test_run_refuses_a_bad_compile_node_before_reading_weights(hydra_runtime, no_weights, tmp_path, overrides,  # noqa: F811
                                                               message):
    cfg = hydra_runtime("sample", [*QUIET, *overrides], tmp_path / "new")
    with pytest.raises(ValueError, match=message):
        sgm.tasks.sample.run(cfg)
    assert not list((tmp_path / "new").glob("*.png"))


def test_run_with_fused_qkv_and_channels_last(run_task, tmp_path):
    """run.py with the eager options (no compile): the same digits as without, up to float rounding."""
    base = ["model=digits", "steps=2", "prompts=[a handwritten digit 3]", "~logger", "~metrics", "progress=false"]
    plain, _ = run_task("sample", base, tmp_path / "a", files=False)
    fast, _ = run_task("sample", [*base, "compile.fuse_qkv=true", "compile.channels_last=true"], tmp_path / "b",
                       files=False)
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(sorted((tmp_path / d).glob("*.png"))[0]), dtype=np.int16) for d in "ab")
    assert np.abs(a - b).max() <= 1 and plain.keys() == fast.keys()


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path, monkeypatch):
    """`experiments/benchmark.py --gpu-dry-run`: the GPU section's code (eager, compiled, diffusers with and
    without torch.compile) on the CPU at tiny sizes; its ``main`` raises SystemExit on any error. In this
    process (the script's imports are the test session's): its globals are put back afterwards."""
    import importlib
    import json
    import sys
    from pathlib import Path

    import torch._dynamo

    from conftest import preserved_globals

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    monkeypatch.syspath_prepend(str(root / "experiments"))  # as `python experiments/benchmark.py` has it
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--gpu-dry-run", "--threads", "1", "--gpu-json", str(out)])
    try:
        with preserved_globals():
            importlib.import_module("benchmark").main()
    finally:
        torch._dynamo.reset()
    res = json.loads(out.read_text())
    names = {(v["name"], v["batch"]) for v in res["variants"]}
    assert {("ours eager", 1), ("ours compiled", 1), ("diffusers eager", 1), ("diffusers compiled", 1)} <= names
    assert {p["batch"] for p in res["pipelines"]} == {1, 2} and not res["errors"]
    compiled = next(v for v in res["variants"] if v["name"] == "ours compiled")
    assert compiled["rel_diff_vs_eager"] < 1e-3
