"""Benchmarks: framework overhead of sampling, checkpoint-loading memory, SDXL size on a GPU.

Every section composes the real config tree with Hydra (:func:`sgm.tasks.common.compose`,
``conf/sample.yaml`` plus overrides) and builds the engine as run.py does, with
:func:`sgm.tasks.common.build_engine` (``weights.checkpoint`` / ``weights.dtype`` /
``weights.random``); samplers get the run's schedule, ``engine.schedule(discretization, steps)``.

Sections (``--sections``, comma-separated; default ``overhead,load``, plus ``gpu`` when CUDA
is available or ``--gpu`` is given):

* ``overhead`` (CPU, ``model=tiny``): seconds per step of a full ``engine.sample_latents``
  run (Euler, CFG) against the bare network evaluations it makes (the same batched inputs,
  replayed through ``engine.model``), the overhead (sampling - bare) / bare, the
  framework-only time per step (the same run with a no-op network) and where it goes.
* ``load`` (CPU): peak RSS while ``build_engine`` loads a safetensors checkpoint
  (``weights.checkpoint=PATH``), in a fresh subprocess, against the file size; the tiny
  model and a mid-size UNet (``MID_OVERRIDES``); ``--sdxl-load`` adds SDXL base in float16.
* ``cpu_vs_diffusers`` (CPU): the tiny model end to end against diffusers' StableDiffusionXLPipeline
  on the same weights, with the breakdown, and the SDXL UNet forward against UNet2DConditionModel
  (:mod:`benchmark_diffusers`).
* ``gpu``: SDXL base at 1024x1024 in bfloat16 with SDPA attention, random (seeded)
  weights (``weights.random=true weights.dtype=bfloat16``, parameters created on the GPU):
  seconds per image (30 Euler steps, CFG), UNet time per step, VAE decode time, peak GPU
  memory; eager, compiled and compiled + CUDA graphs, and diffusers with and without torch.compile
  on the same weights; the refiner UNet's time per step (``model=sdxl_refiner``). It needs the package's
  dependencies (Hydra and OmegaConf included) on the GPU machine. ``--gpu-dry-run`` runs the
  same code on the CPU with ``model=tiny`` (64x64, 2 steps, float32) and builds SDXL base and
  refiner on the meta device.

Usage:

    python experiments/benchmark.py --out docs/benchmarks.md             # CPU sections
    python experiments/benchmark.py --gpu-dry-run                         # check the GPU path on CPU
    python experiments/benchmark.py --sections gpu --gpu-json gpu.json --out gpu.md   # on a GPU machine
    python experiments/benchmark.py --render-gpu-json gpu.json --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the GPU machine may run the repository without installing it
    sys.path.insert(0, str(ROOT))
sys.modules.setdefault("benchmark", sys.modules[__name__])  # one module for benchmark_diffusers' `import benchmark`

THREADS = 2  # torch threads of the CPU measurements (--threads)
PROMPT = "a photograph of an astronaut riding a horse"
# A mid-size UNet on the tiny conditioner/VAE: ~74M parameters, ~315 MB in float32.
MID_OVERRIDES = ["model.network.model_channels=96", "model.network.channel_mult=[1,2,4]",
                 "model.network.attention_resolutions=[2,4]", "model.network.transformer_depth=[0,2,2]",
                 "model.network.num_res_blocks=2", "model.network.num_head_channels=32"]


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------
# markdown output
# ----------------------------------------------------------------------------------------
DOC_HEADER = """# Benchmarks

Produced by `experiments/benchmark.py`; each section names the command that reproduces it, and
a section is replaced in place when its command is rerun with `--out docs/benchmarks.md`.
`python experiments/benchmark.py --out docs/benchmarks.md` reruns both CPU sections (about 1.5 minutes
on 2 cores); `--sdxl-load` adds the SDXL rows of the loading table (1-2 minutes more, 7 GB of disk,
18 GiB of free memory). `python experiments/benchmark.py --gpu-dry-run` checks the GPU section's code
on the CPU.
"""

GPU_PLACEHOLDER = """Not measured yet (no GPU where the CPU sections ran). On a CUDA machine run

    python experiments/benchmark.py --sections gpu --gpu-json gpu.json --out docs/benchmarks.md

(or `--render-gpu-json gpu.json --out docs/benchmarks.md` afterwards, on any machine, from the JSON file)."""

SECTION_TITLES = {"overhead": "Framework overhead of sampling (tiny model, CPU)",
                  "load": "Peak memory when loading a checkpoint (CPU)",
                  "cpu_vs_diffusers": "Against diffusers on the CPU (same weights)",
                  "gpu": "SDXL-size on GPU"}
SECTION_ORDER = ["overhead", "load", "cpu_vs_diffusers", "gpu"]


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- benchmark:{key}:start -->", f"<!-- benchmark:{key}:end -->"


def write_sections(path: Path, sections: dict[str, str]) -> None:
    """Replace (or add, in SECTION_ORDER) the marked sections of ``path``; add the GPU placeholder if missing."""
    text = path.read_text() if path.is_file() else DOC_HEADER
    sections = dict(sections)
    if "gpu" not in sections and _markers("gpu")[0] not in text:
        sections["gpu"] = GPU_PLACEHOLDER
    for key in SECTION_ORDER:
        if key not in sections:
            continue
        start, end = _markers(key)
        block = f"{start}\n## {SECTION_TITLES[key]}\n\n{sections[key].strip()}\n{end}"
        if start in text and end in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    log(f"wrote {path}")


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def machine_line() -> str:
    import torch

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    return (f"{cpu}, {os.cpu_count()} cores{mem}, torch.set_num_threads({THREADS}); "
            f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}")


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its children, wall time)."""
    busy = float("nan")
    with contextlib.suppress(OSError, ValueError):
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.perf_counter()


def other_load(start: tuple[float, float, float]) -> float:
    """Fraction of the machine's CPU capacity used by other processes since ``start``."""
    busy, own, wall = cpu_snapshot()
    return max(0.0, (busy - start[0]) - (own - start[1])) / ((wall - start[2]) * (os.cpu_count() or 1))


def command_line(args: argparse.Namespace, section: str) -> str:
    extra = [f"--threads {THREADS}"] if THREADS != 2 else []
    if section == "overhead":
        if args.steps != 20:
            extra.append(f"--steps {args.steps}")
        if args.repeats != 11:
            extra.append(f"--repeats {args.repeats}")
    if section == "load" and args.sdxl_load:
        extra.append("--sdxl-load")
    return " ".join(["python experiments/benchmark.py", f"--sections {section}", *extra, "--out docs/benchmarks.md"])


# ----------------------------------------------------------------------------------------
# configs and engines, as run.py composes and builds them
# ----------------------------------------------------------------------------------------
def build(overrides: Sequence[str], seed: int = 0, device: Any = None) -> tuple[Any, Any]:
    """``conf/sample.yaml`` with ``overrides`` and its engine, as run.py builds it: the runtime settings
    (attention backend, threads), then ``build_engine(cfg.model, cfg.weights)`` and its ``cpu_onednn``.

    With ``device``, random weights are created there directly (no CPU copy of an SDXL-size model).
    """
    import torch

    from sgm.networks.onednn import set_cpu_onednn
    from sgm.tasks.common import apply_runtime_settings, build_engine, compose

    cfg = compose("sample", overrides)
    apply_runtime_settings(cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        engine = build_engine(cfg.model, cfg.weights, seed=seed)
    if device is not None:
        engine.to(device)  # the denoiser's level table and Lightning's device record
    set_cpu_onednn(cfg.get("cpu_onednn"), engine)
    return cfg, engine


def meta_engine(overrides: Sequence[str]) -> Any:
    """The engine of ``conf/sample.yaml`` + ``overrides`` on the meta device: shapes and parameter counts, no memory."""
    import torch
    from hydra.utils import instantiate

    from sgm.tasks.common import compose

    with torch.device("meta"):
        return instantiate(compose("sample", overrides).model)


def count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------
# section 1: framework overhead of sampling (tiny, CPU)
# ----------------------------------------------------------------------------------------
class NullNetwork:
    """Stands in for ``engine.model``: returns its input, so a sampling run times the framework alone."""

    def __call__(self, x, t, c, **kwargs):
        return x


def _capture_inputs(engine, fn: Callable[[], Any]) -> list[tuple]:
    calls: list[tuple] = []
    handle = engine.model.register_forward_pre_hook(lambda module, args: calls.append(args))
    try:
        fn()
    finally:
        handle.remove()
    return calls


def _timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@contextlib.contextmanager
def swapped_network(engine, stub):
    real = engine.model
    if not hasattr(stub, "diffusion_model"):
        stub.diffusion_model = real.diffusion_model  # what the engine asks of its network (the dtype, cpu_onednn)
    engine._modules["model"] = stub  # nn.Module.__setattr__ would refuse a non-Module
    try:
        yield
    finally:
        engine._modules["model"] = real


def profile_framework(engine, run: Callable[[], Any], steps: int, runs: int = 30, top: int = 12) -> list[list[str]]:
    """cProfile of sampling runs with the no-op network: the framework's own time per step, by function."""
    import torch

    prof = cProfile.Profile()
    with swapped_network(engine, NullNetwork()), torch.inference_mode():
        run()
        prof.enable()
        for _ in range(runs):
            run()
        prof.disable()
    st = pstats.Stats(prof)
    entries = []
    total = 0.0
    for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():  # type: ignore[attr-defined]
        total += tt
        entries.append((tt, nc, file, line, func))
    entries.sort(reverse=True)
    per_step = runs * steps
    rows = []
    for tt, nc, file, line, func in entries[:top]:
        where = func if file == "~" else f"{_short(file)}:{line} {func}"
        rows.append([f"`{where}`", f"{nc / per_step:.1f}", f"{tt / per_step * 1e6:.1f}", f"{100 * tt / total:.0f}%"])
    rows.append(["total (profiled)", "", f"{total / per_step * 1e6:.1f}", "100%"])
    return rows


def count_ops(engine, run: Callable[[], Any], steps: int) -> float:
    """Top-level ATen operators per step of a sampling run with the no-op network (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with swapped_network(engine, NullNetwork()), torch.inference_mode():
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    return sum(1 for ev in prof.events() if ev.cpu_parent is None and ev.name.startswith("aten::")) / steps


def _short(file: str) -> str:
    for marker in ("/sgm/", "/torch/", "/site-packages/"):
        if marker in file:
            return marker.strip("/") + "/" + file.split(marker, 1)[1]
    return Path(file).name


class _InSitu:
    """Forward hooks on ``engine.model`` that add up the time spent inside it during a sampling run."""

    def __init__(self, module):
        self.total = 0.0
        self._t0 = 0.0
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._t0 = time.perf_counter()

    def _post(self, module, args, out):
        self.total += time.perf_counter() - self._t0

    def remove(self):
        for h in self.handles:
            h.remove()


def section_overhead(args: argparse.Namespace) -> tuple[str, dict]:
    """Seconds per step of sampling against the bare network calls it makes; the framework-only time and profile."""
    import torch
    from hydra.utils import instantiate

    from sgm.networks.onednn import onednn_context
    from sgm.networks.reuse import sampling_run

    torch.set_num_threads(THREADS)
    snap = cpu_snapshot()
    steps, repeats = args.steps, args.repeats
    cfg, engine = build(["model=tiny", "sampler=euler", f"steps={steps}", "guider=cfg", "progress=false"])
    sampler = instantiate(cfg.sampler)
    sigmas = engine.schedule(instantiate(cfg.discretization), steps)
    log(f"[overhead] tiny engine: UNet {count_params(engine.model) / 1e6:.2f}M params; sampler {sampler!r}; "
        f"schedule {sigmas[0]:.4g} .. {sigmas[-2]:.4g}, 0")
    cases = [(1, 32), (8, 32), (1, 64), (8, 64)]
    rows, rows2, raw = [], [], []
    med = statistics.median
    for batch, res in cases:
        seeds = list(range(batch))
        cond, uc = engine.get_conditionings([PROMPT] * batch, [""] * batch, res, res)
        shape = engine.latent_shape(res, res)

        def sample():
            return engine.sample_latents(cond, uc, seeds, shape, sigmas, sampler)

        with torch.inference_mode():
            calls = _capture_inputs(engine, sample)
            assert len(calls) == steps, (len(calls), steps)

            onednn = engine.onednn_for(calls[0][0][:batch])  # the replay runs under sampling's oneDNN choice

            def bare():  # in a sampling run, as the calls were made (the prompt's keys reused: sgm.networks.reuse)
                with onednn_context(onednn), sampling_run():
                    for x_in, t, c in calls:
                        engine.model(x_in, t, c)

            sample(), bare()  # warm-up
            ts, tb, ti, tu = [], [], [], []
            for _ in range(repeats):  # interleaved, so drifts in machine load hit all alike
                ts.append(_timed(sample))
                tb.append(_timed(bare))
                probe = _InSitu(engine.model)  # in situ: time inside engine.model during a sampling run
                try:
                    ti.append(_timed(sample))
                finally:
                    probe.remove()
                tu.append(probe.total)
        tn = [_timed(sample) for _ in range(repeats)]  # as user code calls it: sample_latents' own no_grad only
        with swapped_network(engine, NullNetwork()), torch.inference_mode():
            sample()
            tf = [_timed(sample) for _ in range(repeats)]
            sampler.verbose = True
            with contextlib.redirect_stderr(io.StringIO()):
                sample()
                tq = [_timed(sample) for _ in range(repeats)]
            sampler.verbose = False
        s, b, n_, f, q = (med(v) / steps for v in (ts, tb, tn, tf, tq))
        overhead = (s - b) / b
        paired = med((x - y) / y for x, y in zip(ts, tb))
        insitu = med((x - u) / u for x, u in zip(ti, tu))
        unet_insitu = med(tu) / steps
        spread = (max(tb) - min(tb)) / med(tb)
        x_in = calls[0][0]
        entry = {"batch": batch, "res": res, "latent": list(shape), "unet_batch": int(x_in.shape[0]), "steps": steps,
                 "sample_s_per_step": s, "bare_s_per_step": b, "overhead": overhead, "overhead_paired": paired,
                 "unet_in_situ_s_per_step": unet_insitu, "overhead_in_situ": insitu, "bare_spread": spread,
                 "sample_no_grad_s_per_step": n_, "framework_only_s_per_step": f, "framework_only_share": f / b,
                 "framework_only_with_progress_s_per_step": q,
                 "raw": {"sample": ts, "bare": tb, "sample_in_situ": ti, "unet_in_situ": tu, "sample_no_grad": tn,
                         "framework_only": tf, "framework_only_progress": tq}}
        raw.append(entry)
        log(f"[overhead] batch {batch} {res}x{res}: sample {s * 1e3:.2f} ms/step, bare {b * 1e3:.2f} ms/step, "
            f"overhead {overhead * 100:+.1f}% (paired {paired * 100:+.1f}%, bare spread {spread * 100:.0f}%); in situ: "
            f"UNet {unet_insitu * 1e3:.2f} ms/step, rest {insitu * 100:+.1f}%; no-op network {f * 1e6:.0f} us/step "
            f"({f / b * 100:.1f}% of bare); no_grad-only sampling {n_ * 1e3:.2f} ms/step")
        rows.append([batch, f"{res}x{res}", "x".join(map(str, shape)), int(x_in.shape[0]), f"{s * 1e3:.2f}",
                     f"{b * 1e3:.2f}", f"**{overhead * 100:+.1f}%**", f"{paired * 100:+.1f}%", f"{spread * 100:.0f}%"])
        rows2.append([batch, f"{res}x{res}", f"{unet_insitu * 1e3:.2f}", f"{(unet_insitu - b) / b * 100:+.1f}%",
                      f"{(med(ti) - med(tu)) / steps * 1e6:.0f}",
                      f"{insitu * 100:+.1f}%", f"{f * 1e6:.0f}", f"{f / b * 100:.1f}%", f"{n_ * 1e3:.2f}"])

    batch, res = 1, 32
    cond, uc = engine.get_conditionings([PROMPT] * batch, [""] * batch, res, res)
    shape = engine.latent_shape(res, res)

    def sample_one() -> Any:
        return engine.sample_latents(cond, uc, [0], shape, sigmas, sampler)

    prof_rows = profile_framework(engine, sample_one, steps)
    try:
        n_ops = count_ops(engine, sample_one, steps)
    except Exception as exc:  # noqa: BLE001 - the profiler is an extra
        log(f"[overhead] torch.profiler failed: {exc}")
        n_ops = float("nan")
    log("[overhead] framework-only profile (batch 1, 32x32), per step:")
    for r in prof_rows:
        log("    " + " | ".join(r))

    busy_other = other_load(snap)
    log(f"[overhead] other processes used {busy_other * 100:.0f}% of the machine's CPU during the measurements")
    worst = max(e["overhead"] for e in raw)
    above = [f"batch {e['batch']} {e['res']}x{e['res']} ({e['overhead'] * 100:+.1f}%)" for e in raw if e["overhead"] > 0.05]
    worst_insitu = max(e["overhead_in_situ"] for e in raw)
    worst_noop = max(e["framework_only_share"] for e in raw)
    fixed = med(e["framework_only_s_per_step"] for e in raw)
    lo, hi = min(e["framework_only_s_per_step"] for e in raw), max(e["framework_only_s_per_step"] for e in raw)
    progress = med(e["framework_only_with_progress_s_per_step"] - e["framework_only_s_per_step"] for e in raw)
    md = [f"Reproduce: `{command_line(args, 'overhead')}` (about a minute).", "",
          f"Machine: {machine_line()}. Other processes used {busy_other * 100:.0f}% of the machine's CPU time "
          f"during these measurements (from `/proc/stat`).", "",
          f"`model=tiny sampler=euler guider=cfg steps={steps}` composed with Hydra "
          f"(`sgm.tasks.common.compose`) and built as run.py builds it, with `sgm.tasks.common.build_engine` "
          f"(random weights, float32), CFG scale 5, empty negative prompt, no network patches. "
          f"**sampling**: one `engine.sample_latents(cond, uc, seeds, shape, sigmas, sampler)` run over the "
          f"schedule `sigmas = engine.schedule(discretization, {steps})` (EDM over the model's sigma range) "
          f"under `torch.inference_mode()`, divided by {steps}. **bare**: the {steps} "
          f"`engine.model(x_in, t, c)` calls (the OpenAIWrapper around the UNet) that this run made, replayed "
          f"with the same batched inputs (CFG doubles the batch: *UNet batch*), under `torch.inference_mode()` and "
          f"the oneDNN setting sampling chose (`cpu_onednn: auto`: off for batch 1 at 32x32), inside one "
          f"`sgm.networks.reuse.sampling_run()` like the sampler's calls (the prompt's keys and values made "
          f"once). "
          f"Median of {repeats} runs each, sampling and bare runs interleaved, after one warm-up. "
          f"**overhead** = (sampling - bare) / bare; *paired* is the median of the per-repeat ratios; "
          f"*bare spread* = (max - min) / median of the bare runs, the run-to-run noise of one measurement "
          f"on this machine.", "",
          table(["batch", "image", "latent", "UNet batch", "sampling ms/step", "bare UNet ms/step", "overhead",
                 "overhead, paired", "bare spread"], rows), "",
          "The difference of two noisy medians is a weak estimate of a few percent, so each repeat also makes a "
          "third, instrumented sampling run, **in situ**: forward hooks on `engine.model` add up the time spent "
          "inside it; the rest of the run is the framework (median of the per-run ratios rest / UNet). "
          "*in-situ UNet vs bare* compares the UNet's own time inside the loop with the back-to-back replay "
          "(run-order and allocator effects; not framework code). "
          "**no-op network**: the sampling run with `engine.model` replaced by a function that returns its input "
          "(the guider's branches and their batching, denoiser scalings and sigma quantization, Euler update: "
          "everything but the network). "
          "Last column: the sampling run without the outer `inference_mode` (only `sample_latents`' own "
          "`no_grad`), as user code calls it.", "",
          table(["batch", "image", "in-situ UNet ms/step", "in-situ UNet vs bare", "in-situ rest µs/step",
                 "in-situ rest / UNet",
                 "no-op network µs/step", "no-op / bare", "sampling, no_grad only, ms/step"], rows2), "",
          f"The progress bar (`progress=true`, the default of `run.py`) adds about {progress * 1e6:.0f} µs/step "
          f"(no-op network, median over the cases).", ""]
    if above:
        direct = (f"the direct difference was above 5% for {', '.join(above)} in this run, within the run-to-run "
                  f"spread of the bare timings (up to {max(e['bare_spread'] for e in raw) * 100:.0f}%)")
    else:
        direct = f"the direct difference was at most {worst * 100:+.1f}% in this run"
    verdict = "within" if worst_insitu <= 0.05 and worst_noop <= 0.05 else "**above**"
    md.append(f"Requirement: framework overhead <= 5%. Result: {verdict} the bound by the in-situ and no-op "
              f"measurements (at most {worst_insitu * 100:+.1f}% and {worst_noop * 100:.1f}%); {direct}. The "
              f"framework costs {lo * 1e6:.0f}-{hi * 1e6:.0f} µs per step on this CPU, growing "
              f"with the batch but not with the network ({n_ops:.0f} small ATen operators per step, by torch.profiler), "
              f"so its share shrinks as the network grows; for SDXL on a GPU see the last section.")
    rest = med((med(e["raw"]["sample_in_situ"]) - med(e["raw"]["unet_in_situ"])) / steps for e in raw)
    md.append("")
    md.append(f"In situ the framework's part of a step takes ~{rest * 1e6:.0f} µs (median over the cases) against "
              f"~{fixed * 1e6:.0f} µs with the no-op network: the same operators run slower right after a UNet call "
              f"(cold caches), which is why the in-situ share is the larger of the two estimates.")
    md += ["", f"Where the no-op-network time goes (cProfile of 30 sampling runs, batch 1, 32x32, {steps} steps; "
           f"own time per step of the top functions; cProfile inflates Python-heavy code):", "",
           table(["function", "calls/step", "own µs/step", "share"], prof_rows)]
    return "\n".join(md), {"cases": raw, "profile": prof_rows, "aten_ops_per_step": n_ops,
                            "other_processes_cpu_share": busy_other}


# ----------------------------------------------------------------------------------------
# section 2: peak memory when loading a checkpoint
# ----------------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def load_child(path: str, overrides: list[str]) -> None:
    """Runs in a fresh process: baseline RSS after imports, then build_engine with weights.checkpoint=path."""
    import torch

    torch.set_num_threads(THREADS)
    import open_clip.model  # noqa: F401  - imported lazily by the embedders; import it before the baseline
    import transformers  # noqa: F401
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: F401

    from sgm.tasks.common import build_engine, compose

    cfg = compose("sample", [*overrides, f"weights.checkpoint='{path}'"])
    gc.collect()
    baseline = _proc_status()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM and ru_maxrss to the current RSS
            fh.write("5")
    except OSError:
        reset = False
    t0 = time.perf_counter()
    engine = build_engine(cfg.model, cfg.weights, seed=0)
    load_s = time.perf_counter() - t0
    after = _proc_status()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = engine.state_dict()
    weights = sum(t.numel() * t.element_size() for t in state.values())
    storages = {t.untyped_storage().data_ptr() for t in state.values() if t.numel()}
    t1 = time.perf_counter()
    with torch.no_grad():  # read every weight once, as a first forward pass would
        for t in state.values():
            if t.numel():
                t.float().sum() if t.is_floating_point() else t.sum()
    touch_s = time.perf_counter() - t1
    touched = _proc_status()
    maxrss_touched = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({
        "baseline": baseline, "after": after, "touched": touched, "ru_maxrss": maxrss,
        "ru_maxrss_touched": maxrss_touched, "hwm_reset": reset, "load_s": load_s, "touch_s": touch_s,
        "weights_bytes": weights, "params": count_params(engine), "storages": len(storages),
        "dtypes": sorted({str(t.dtype) for t in state.values()}),
    }), flush=True)


def make_sdxl_checkpoint(path: Path) -> int:
    """SDXL base with random float16 weights (built on meta, materialized in float16), saved; returns params."""
    import torch

    from sgm.checkpoint import save_checkpoint

    engine = meta_engine(["model=sdxl_base"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # materialize each tensor directly in float16 (to_empty would allocate 14 GB of float32)
        for module in engine.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    data = torch.empty(p.shape, dtype=torch.float16 if p.is_floating_point() else p.dtype)
                    data.normal_(0, 0.02, generator=gen) if data.is_floating_point() else data.zero_()
                    module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    module._buffers[name] = torch.zeros(b.shape, dtype=torch.float16 if b.is_floating_point() else b.dtype)
    n = count_params(engine)
    save_checkpoint(engine, path, dtype=torch.float16)
    del engine
    gc.collect()
    return n


def section_load(args: argparse.Namespace) -> tuple[str, dict]:
    """Peak RSS of build_engine loading a checkpoint (fresh subprocesses), against the file size."""
    import torch

    from sgm.checkpoint import save_checkpoint

    torch.set_num_threads(THREADS)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = [("tiny", ["model=tiny"]), ("mid (tiny + wider UNet)", ["model=tiny", *MID_OVERRIDES])]
    if args.sdxl_load:
        models.append(("SDXL base, float16", ["model=sdxl_base"]))
    rows, raw = [], []
    mb = lambda v: f"{v / 1e6:,.0f}"  # noqa: E731
    variants = [("", []), ("cast to bfloat16", ["weights.dtype=bfloat16"])]
    for label, overrides in models:
        slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        path = work / f"{slug}.safetensors"
        try:
            t0 = time.perf_counter()
            if "sdxl" in slug:
                st = os.statvfs(work)
                free_disk = st.f_bavail * st.f_frsize
                avail = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
                if not path.is_file() and free_disk < 10 * 2**30:
                    raise RuntimeError(f"needs 10 GiB free disk, have {free_disk / 2**30:.1f} GiB")
                if avail < 18 * 2**30:
                    raise RuntimeError(f"needs 18 GiB available memory, have {avail / 2**30:.1f} GiB")
                if not path.is_file():
                    make_sdxl_checkpoint(path)
            else:
                _, engine = build(overrides)
                save_checkpoint(engine, path)
                del engine
                gc.collect()
            log(f"[load] {path} ({path.stat().st_size / 1e6:.1f} MB) ready in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # noqa: BLE001
            log(f"[load] {label}: FAILED to write the checkpoint: {exc}")
            rows.append([label] + ["failed"] * 10)
            raw.append({"model": label, "error": str(exc)})
            continue
        size = path.stat().st_size
        for variant, extra in variants:
            name = f"{label}, {variant}" if variant else label
            try:
                # through sh, which forks Python: an exec'd child straight from this (large) process would
                # inherit its RSS as ru_maxrss (Linux records the pre-exec image's peak in the rusage)
                proc = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable,
                                       str(Path(__file__).resolve()), "--_load-child", str(THREADS), str(path),
                                       *overrides, *extra],
                                      capture_output=True, text=True, cwd=ROOT, timeout=1800)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                res = json.loads(line[-1][len("RESULT "):])
            except Exception as exc:  # noqa: BLE001
                log(f"[load] {name}: FAILED: {exc}")
                rows.append([name] + ["failed"] * 10)
                raw.append({"model": name, "error": str(exc)})
                continue
            base = res["baseline"]["VmRSS"]
            peak = max(res["ru_maxrss"], res["after"]["VmHWM"])
            used = max(res["ru_maxrss_touched"], res["touched"]["VmHWM"])
            d_anon = res["touched"].get("RssAnon", 0) - res["baseline"].get("RssAnon", 0)
            d_file = res["touched"].get("RssFile", 0) - res["baseline"].get("RssFile", 0)
            raw.append({"model": name, "overrides": overrides + extra, "file_bytes": size, **res})
            log(f"[load] {name}: file {mb(size)} MB, weights {mb(res['weights_bytes'])} MB {res['dtypes']}, baseline "
                f"{mb(base)} MB, peak during load {mb(peak)} MB ((peak - baseline) / file = {(peak - base) / size:.2f}; "
                f"ru_maxrss {mb(res['ru_maxrss'])}, VmHWM {mb(res['after']['VmHWM'])}), after reading every weight "
                f"{mb(used)} MB (/file {(used - base) / size:.2f}; anon +{mb(d_anon)} MB, file-backed +{mb(d_file)} MB), "
                f"load {res['load_s']:.2f} s, first read {res['touch_s']:.2f} s"
                + ("" if res["hwm_reset"] else " (peak RSS could not be reset after imports)"))
            rows.append([name, f"{res['params'] / 1e6:.1f}M", mb(size), mb(base), mb(peak), mb(peak - base),
                         f"**{(peak - base) / size:.2f}**", mb(used), f"**{(used - base) / size:.2f}**",
                         f"+{mb(d_anon)} / +{mb(d_file)}", f"{res['load_s']:.2f} / {res['touch_s']:.2f}"])
    cmd = command_line(args, "load")
    more = "; 1-2 minutes more with `--sdxl-load`" if args.sdxl_load else ""
    md = [f"Reproduce: `{cmd}` (about half a minute{more}).",
          "", f"Machine: {machine_line()}.", "",
          "A model is built with random weights and written with `sgm.checkpoint.save_checkpoint` "
          "(safetensors, float32 unless noted). A fresh Python process then imports torch, transformers, "
          "open_clip and `sgm.tasks.common`, composes the config with `weights.checkpoint=PATH`, records its RSS "
          "(**baseline**), resets the peak-RSS counter (`/proc/self/clear_refs`) and calls `build_engine`, which "
          "builds the engine on the meta device and loads the file with `load_checkpoint` (as stored, and with "
          "`weights.dtype=bfloat16`, which casts every tensor while loading). **peak during load** is "
          "`resource.getrusage(RUSAGE_SELF).ru_maxrss` right after `build_engine` "
          "returns (equal to `VmHWM`; the child is started through `sh` because an exec'd child of a large process "
          "inherits that process' RSS in `ru_maxrss`). Then every weight is read once (as a first forward "
          "pass would) and the peak is taken again: **after reading every weight**, split into anonymous memory "
          "and file-backed pages (`/proc/self/status`). The last column is the time of `build_engine` / of that "
          "first read. "
          f"The mid-size model is `model=tiny` with `{' '.join(MID_OVERRIDES)}`.", "",
          table(["model", "params", "file MB", "baseline RSS MB", "peak during load MB", "peak - baseline MB",
                 "(peak - baseline) / file", "peak after reading every weight MB", "(that - baseline) / file",
                 "anon / file-backed increase MB", "load / first read s"], rows), "",
          "`load_checkpoint` keeps the tensors that safetensors' `get_tensor` returns: on the CPU these are views "
          "of a private (copy-on-write) memory map of the file, so without a cast `build_engine` returns before "
          "any weight is read, and the weights become resident on first use as file-backed pages shared with the "
          "page cache (two processes loading the same file share them), not as a second, anonymous copy: once "
          "every weight has been read, RSS exceeds the baseline by about the file size. With a cast "
          "(`weights.dtype` set) the file is not mapped: each tensor is read into its own buffer and cast, "
          "so the peak is the cast copy plus one tensor (about 1x the file for float16 -> bfloat16, 0.5x for "
          "float32 -> bfloat16). An in-place write to a weight "
          "loaded without a cast (e.g. merging a LoRA) copies the pages it touches into anonymous memory."]
    if not args.sdxl_load:
        md += ["", "`--sdxl-load` adds SDXL base (random weights written in float16, ~6.9 GB; needs 10 GiB of "
               "free disk and 18 GiB of available memory); not run for this table."]
    return "\n".join(md), {"models": raw}


# ----------------------------------------------------------------------------------------
# section 3: SDXL size on a GPU
# ----------------------------------------------------------------------------------------
def gpu_spec(args: argparse.Namespace) -> dict:
    """What the GPU section measures; the dry run: the same code on the CPU with model=tiny at 64x64."""
    if args.gpu_dry_run:  # the eager pipeline at two batches, the compiled variants (a trace each) at the first
        return {"model": "tiny", "refiner": "tiny", "res": 64, "steps": 2, "batches": [1, 2], "variant_batches": [1],
                "dtype": args.gpu_dry_run_dtype, "device": "cpu", "repeats": 1, "unet_calls": 3, "decode_repeats": 1,
                "meta_check": ["sdxl_base", "sdxl_refiner"], "cfg_scale": 5.0, "refiner_latent": 16,
                "variant_repeats": 1, "compile_mode": "default", "compile_estimate_s": 0}
    return {"model": "sdxl_base", "refiner": "sdxl_refiner", "res": args.gpu_res, "steps": args.gpu_steps,
            "batches": args.gpu_batches, "dtype": "bfloat16", "device": "cuda", "repeats": 2, "unet_calls": 10,
            "decode_repeats": 3, "meta_check": [], "cfg_scale": 5.0, "refiner_latent": args.gpu_res // 8,
            "variant_repeats": 2, "compile_mode": args.gpu_compile_mode, "compile_estimate_s": 150}


def gpu_overrides(spec: dict, model: str) -> list[str]:
    """The GPU section's run config for ``model``: seeded random weights in the spec's dtype, Euler, CFG, SDPA."""
    return [f"model={model}", "weights.random=true", f"weights.dtype={spec['dtype']}", "sampler=euler", "guider=cfg",
            f"guider.scale={spec['cfg_scale']}", "discretization=edm", f"steps={spec['steps']}",
            f"H={spec['res']}", f"W={spec['res']}", "attention=sdpa", "progress=false"]


def section_gpu(args: argparse.Namespace) -> tuple[str, dict]:
    """SDXL base seconds per image, UNet and VAE times, peak memory; the refiner UNet's time per step."""
    t_start = time.perf_counter()
    spec = gpu_spec(args)
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sgm.tasks.common import check_size

    device = torch.device(spec["device"])
    on_cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize()) if on_cuda else (lambda: None)
    if not on_cuda:
        torch.set_num_threads(THREADS)
    res: dict[str, Any] = {"spec": spec, "errors": [], "torch": torch.__version__, "cuda": torch.version.cuda,
                           "python": platform.python_version(),
                           "device_name": torch.cuda.get_device_name(0) if on_cuda else platform.processor() or "cpu",
                           "dry_run": bool(args.gpu_dry_run), "overrides": gpu_overrides(spec, spec["model"])}
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"[gpu] {res['device_name']}, torch {torch.__version__}, {spec['dtype']}, SDPA attention")

    def attempt(name: str, fn: Callable[[], Any], optional: bool = False, need_s: float = 30) -> Any:
        t0 = time.perf_counter()
        left = args.gpu_budget_s - (t0 - t_start)
        if optional and left < need_s:  # need_s: about what the step takes (a compilation: minutes)
            log(f"[gpu] {name} skipped: {left:.0f} s of the {args.gpu_budget_s} s budget left")
            res["errors"].append({"step": name, "error": "skipped (time budget)"})
            return None
        log(f"[gpu] {name} ... ({time.perf_counter() - t_start:.0f} s elapsed)")
        try:
            out = fn()
            log(f"[gpu] {name} done in {time.perf_counter() - t0:.1f} s")
            return out
        except Exception as exc:  # noqa: BLE001
            log(f"[gpu] {name} FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            sys.stdout.flush()
            res["errors"].append({"step": name, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-4000:]})
            if on_cuda:
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
            return None

    def gib(v: float) -> float:
        return round(v / 2**30, 3)

    for name in spec["meta_check"]:
        def meta_build(name: str = name) -> None:
            engine = meta_engine([f"model={name}"])
            counts = {"unet": count_params(engine.model), "conditioner": count_params(engine.conditioner),
                      "vae": count_params(engine.first_stage_model)}
            res.setdefault("meta_check", {})[name] = counts
            log(f"[gpu] meta build of {name}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
        attempt(f"meta build {name}", meta_build)

    def build_base() -> tuple[Any, Any]:
        t0 = time.perf_counter()
        cfg, engine = build(res["overrides"], seed=0, device=device)
        sync()
        res["build_s"] = time.perf_counter() - t0
        res["params"] = {"unet": count_params(engine.model), "conditioner": count_params(engine.conditioner),
                         "vae": count_params(engine.first_stage_model)}
        if on_cuda:
            torch.cuda.empty_cache()
            res["weights_gib"] = gib(torch.cuda.memory_allocated())
        log(f"[gpu] built {spec['model']} in {res['build_s']:.1f} s: "
            + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in res["params"].items()))
        return cfg, engine

    built = attempt(f"build {spec['model']}", build_base)
    if built is not None:
        cfg, engine = built
        sampler = instantiate(cfg.sampler)
        discretization = instantiate(cfg.discretization)
        H, W = check_size(cfg.model, cfg.H, cfg.W)
        steps = spec["steps"]
        schedule = engine.schedule(discretization, steps)
        log(f"[gpu] {sampler!r}, {discretization!r}: sigmas {float(schedule[0]):.4g} .. {float(schedule[-2]):.4g}, 0")

        def pipeline(batch: int, sigmas: Any, capture: list | None = None) -> dict:
            seeds = list(range(batch))
            with torch.inference_mode():
                sync()
                t0 = time.perf_counter()
                cond, uc = engine.get_conditionings([PROMPT] * batch, [""] * batch, H, W)
                sync()
                t1 = time.perf_counter()
                run = lambda: engine.sample_latents(cond, uc, seeds, engine.latent_shape(H, W), sigmas,  # noqa: E731
                                                    sampler)
                if capture is not None:
                    handle = engine.model.register_forward_pre_hook(lambda m, a: capture.append(a))
                    try:
                        z = run()
                    finally:
                        handle.remove()
                else:
                    z = run()
                sync()
                t2 = time.perf_counter()
                img = engine.decode_first_stage(z)
                sync()
                t3 = time.perf_counter()
            if not torch.isfinite(img).all():
                log("[gpu] warning: non-finite values in the decoded images")
            return {"cond_s": t1 - t0, "sample_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t0,
                    "image_shape": list(img.shape)}

        def measure(batch: int) -> None:
            out: dict[str, Any] = {"batch": batch, "steps": steps, "res": H}
            res.setdefault("pipelines", []).append(out)
            pipeline(batch, engine.schedule(discretization, min(2, steps)))  # warm-up at this shape
            runs = []
            calls: list = []
            for r in range(spec["repeats"]):
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats()
                runs.append(pipeline(batch, schedule, capture=calls if r == 0 else None))
                if on_cuda:
                    out.setdefault("peak_gib", []).append(gib(torch.cuda.max_memory_allocated()))
                log(f"[gpu]   batch {batch} run {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()
                                                                    if k.endswith("_s")))
            out["runs"] = runs
            best = min(runs, key=lambda d: d["total_s"])
            out["total_s"] = best["total_s"]
            out["s_per_image"] = best["total_s"] / batch
            out["cond_s"], out["decode_s"] = best["cond_s"], best["decode_s"]
            out["sample_s_per_step"] = min(d["sample_s"] for d in runs) / steps
            out["unet_batch"] = int(calls[0][0].shape[0])

            def bare():
                with torch.inference_mode():
                    for x_in, t, c in calls:
                        engine.model(x_in, t, c)

            bare_times = [_timed(bare, sync) for _ in range(spec["repeats"])]
            out["bare_s_per_step"] = min(bare_times) / len(calls)
            out["overhead"] = (out["sample_s_per_step"] - out["bare_s_per_step"]) / out["bare_s_per_step"]
            del calls
            log(f"[gpu] batch {batch}: {out['s_per_image']:.3f} s/image, sampling {out['sample_s_per_step'] * 1e3:.1f} "
                f"ms/step, bare UNet {out['bare_s_per_step'] * 1e3:.1f} ms/step (overhead {out['overhead'] * 100:+.1f}%), "
                f"decode {out['decode_s']:.3f} s, peak {out.get('peak_gib')} GiB")

        for batch in spec["batches"]:
            attempt(f"pipeline batch {batch}", lambda batch=batch: measure(batch), optional=batch != spec["batches"][0])

        def decode_only() -> None:
            lat = torch.randn(1, *engine.latent_shape(H, W), device=device)
            with torch.inference_mode():
                engine.decode_first_stage(lat)
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats()
                times = [_timed(lambda: engine.decode_first_stage(lat), sync) for _ in range(spec["decode_repeats"])]
            res["decode_b1_s"] = min(times)
            if on_cuda:
                res["decode_b1_peak_gib"] = gib(torch.cuda.max_memory_allocated())
            log(f"[gpu] VAE decode batch 1: {res['decode_b1_s']:.3f} s")

        attempt("VAE decode batch 1", decode_only, optional=True)
        import benchmark_diffusers

        benchmark_diffusers.gpu_variants(res, spec, engine, cfg, attempt, sync, on_cuda)
        del engine, built
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def refiner() -> None:
        cfg, ref = build(gpu_overrides(spec, spec["refiner"]), seed=1, device=device)
        wrapper = ref.model
        node = OmegaConf.to_container(cfg.model.network, resolve=True)
        ctx = node["context_dim"][0] if isinstance(node["context_dim"], list) else node["context_dim"]
        latent = spec["refiner_latent"]
        b = 2  # CFG batch of one image
        x = torch.randn(b, node["in_channels"], latent, latent, device=device)
        t = torch.full((b,), 500, device=device, dtype=torch.long)
        c = {"crossattn": torch.randn(b, 77, ctx, device=device),
             "vector": torch.randn(b, node["adm_in_channels"], device=device)}
        with torch.inference_mode():
            wrapper(x, t, c)
            wrapper(x, t, c)
            dt = _timed(lambda: [wrapper(x, t, c) for _ in range(spec["unet_calls"])], sync)
        res["refiner"] = {"params": count_params(wrapper), "unet_batch": b, "latent": latent,
                          "s_per_step": dt / spec["unet_calls"]}
        log(f"[gpu] refiner UNet ({count_params(wrapper) / 1e6:.0f}M): {res['refiner']['s_per_step'] * 1e3:.1f} ms/step "
            f"(batch {b}, latent {latent}x{latent})")

    attempt(f"refiner UNet (model={spec['refiner']})", refiner, optional=True)
    res["wall_s"] = time.perf_counter() - t_start
    log(f"[gpu] finished in {res['wall_s']:.0f} s with {len(res['errors'])} error(s)")
    return render_gpu(res), res


def render_gpu(res: dict) -> str:
    spec = res["spec"]
    title = "DRY RUN on CPU (model=tiny; not SDXL numbers)" if res.get("dry_run") else res.get("device_name", "?")
    overrides = " ".join(res.get("overrides") or gpu_overrides(spec, spec["model"]))
    md = ["Reproduce on a CUDA machine: `python experiments/benchmark.py --sections gpu --gpu-json gpu.json "
          "--out docs/benchmarks.md` (needs the package's dependencies, Hydra and OmegaConf included).", "",
          f"Device: {title}; torch {res.get('torch')}, Python {res.get('python')}. "
          f"`{overrides}` composed with Hydra and built with `sgm.tasks.common.build_engine`, parameters created "
          f"on the {'GPU' if spec['device'] == 'cuda' else 'CPU'}: random weights (seed 0), UNet, text encoders "
          f"and VAE in {spec['dtype']}, SDPA attention, TF32 allowed. "
          f"Euler (EDM schedule over the model's sigma range), CFG {spec['cfg_scale']}, {spec['steps']} steps, "
          f"{spec['res']}x{spec['res']}. Timings are the best of {spec['repeats']} runs after a warm-up. "
          + (f"Build: {res['build_s']:.1f} s. " if "build_s" in res else "")
          + (f"Weights on the GPU: {res['weights_gib']:.2f} GiB. " if "weights_gib" in res else ""), ""]
    rows = []
    for p in res.get("pipelines", []):
        if "s_per_image" not in p:
            continue
        rows.append([p["batch"], p["unet_batch"], f"{p['s_per_image']:.2f}", f"{p['total_s']:.2f}",
                     f"{p['sample_s_per_step'] * 1e3:.1f}", f"{p['bare_s_per_step'] * 1e3:.1f}",
                     f"{p['overhead'] * 100:+.1f}%", f"{p['cond_s'] * 1e3:.0f}", f"{p['decode_s'] * 1e3:.0f}",
                     f"{max(p['peak_gib']):.1f}" if p.get("peak_gib") else "n/a"])
    if rows:
        md.append(table(["batch", "UNet batch", "s / image", "s / batch", "sampling ms/step", "bare UNet ms/step",
                         "overhead", "text encoders ms", "VAE decode ms", "peak GPU memory GiB"], rows))
        md.append("")
    done = [p for p in res.get("pipelines", []) if "overhead" in p]
    if done:
        worst = max(p["overhead"] for p in done)
        md.append(f"Framework overhead, (sampling - bare UNet) / bare UNet per step: at most {worst * 100:+.1f}% "
                  f"(requirement: <= 5%; *bare* replays the run's own {spec['steps']} `engine.model` calls).")
        md.append("")
    import benchmark_diffusers

    md += benchmark_diffusers.render_variants(res)
    if md[-1]:
        md.append("")
    if "decode_b1_s" in res:
        md.append(f"VAE decode of one {spec['res']}x{spec['res']} image alone: {res['decode_b1_s'] * 1e3:.0f} ms"
                  + (f", peak {res['decode_b1_peak_gib']:.1f} GiB (weights included)." if "decode_b1_peak_gib" in res
                     else "."))
    if "refiner" in res:
        r = res["refiner"]
        md.append(f"Refiner UNet (`model={spec['refiner']}`, {r['params'] / 1e6:.0f}M params): "
                  f"{r['s_per_step'] * 1e3:.1f} ms per step at batch {r['unet_batch']} (one image with CFG), "
                  f"latent {r['latent']}x{r['latent']}.")
    if res.get("errors"):
        md += ["", "Failed measurements: " + "; ".join(f"{e['step']}: {e['error']}" for e in res["errors"])]
    return "\n".join(md)


# ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=None,
                   help="comma-separated: overhead,load,cpu_vs_diffusers,gpu (default overhead,load [+gpu])")
    p.add_argument("--out", type=Path, default=None, help="markdown file whose sections are replaced/added")
    p.add_argument("--json", type=Path, default=None, help="raw results of the CPU sections")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the overhead section")
    p.add_argument("--repeats", type=int, default=11, help="repeats of the overhead section")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads on the CPU (1 is steadier on a machine that other jobs keep busy)")
    p.add_argument("--profile", action="store_true", help="always print the framework-only profile")
    p.add_argument("--workdir", default="/tmp/sgm-benchmark", help="where checkpoints are written")
    p.add_argument("--sdxl-load", action="store_true", help="also the SDXL base float16 checkpoint (~6.9 GB)")
    p.add_argument("--gpu", action="store_true", help="run the GPU section")
    p.add_argument("--gpu-json", type=Path, default=None, help="write the GPU section's results here")
    p.add_argument("--gpu-dry-run", action="store_true",
                   help="run the GPU section's code on the CPU (model=tiny, 64x64, 2 steps, float32)")
    p.add_argument("--gpu-budget-s", type=int, default=420,
                   help="skip the optional GPU measurements (batch > first, decode, refiner) once this is spent")
    p.add_argument("--gpu-dry-run-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--gpu-res", type=int, default=1024)
    p.add_argument("--gpu-steps", type=int, default=30)
    p.add_argument("--gpu-batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    p.add_argument("--gpu-compile-mode", default="default",
                   help="torch.compile mode of the GPU section's compiled rows (max-autotune* modes compile for minutes)")
    p.add_argument("--diffusers-batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4],
                   help="batches of the cpu_vs_diffusers section")
    p.add_argument("--sdxl-unet-latent", type=int, default=64, help="latent size of the SDXL UNet comparison")
    p.add_argument("--sdxl-unet-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--sdxl-unet-repeats", type=int, default=3)
    p.add_argument("--render-gpu-json", type=Path, default=None, help="write the GPU section from a JSON file")
    return p.parse_args(argv)


def main() -> None:
    global THREADS
    if "--_load-child" in sys.argv:
        i = sys.argv.index("--_load-child")
        THREADS = int(sys.argv[i + 1])
        load_child(sys.argv[i + 2], sys.argv[i + 3:])
        return
    args = parse_args()
    THREADS = args.threads
    if args.render_gpu_json:
        res = json.loads(args.render_gpu_json.read_text())
        md = render_gpu(res)
        print(md)
        if args.out:
            write_sections(args.out, {"gpu": md})
        return
    if args.gpu_dry_run:
        sections = ["gpu"]
    elif args.sections:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    else:
        import torch

        sections = ["overhead", "load"] + (["gpu"] if args.gpu or torch.cuda.is_available() else [])
    unknown = set(sections) - set(SECTION_ORDER)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTION_ORDER}")
    t0 = time.perf_counter()
    md: dict[str, str] = {}
    raw: dict[str, Any] = {}
    import benchmark_diffusers

    funcs = {"overhead": section_overhead, "load": section_load, "gpu": section_gpu,
             "cpu_vs_diffusers": benchmark_diffusers.section_cpu_vs_diffusers}
    for name in SECTION_ORDER:
        if name not in sections:
            continue
        log(f"== {SECTION_TITLES[name]}")
        try:
            md[name], raw[name] = funcs[name](args)
        except Exception:  # noqa: BLE001 - keep the other sections
            traceback.print_exc()
            log(f"== section {name} failed")
            continue
        print("\n" + md[name] + "\n", flush=True)
        if name == "gpu" and args.gpu_json:
            args.gpu_json.parent.mkdir(parents=True, exist_ok=True)
            args.gpu_json.write_text(json.dumps(raw[name], indent=1, default=str))
            log(f"wrote {args.gpu_json}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if args.out and md:
        if args.gpu_dry_run:
            log("dry run: not writing the markdown file")
        else:
            write_sections(args.out, md)
    log(f"total {time.perf_counter() - t0:.0f} s")
    if args.gpu_dry_run:
        if "gpu" not in raw:
            raise SystemExit("dry run: the GPU section failed")
        if raw["gpu"]["errors"]:
            raise SystemExit(f"dry run had {len(raw['gpu']['errors'])} error(s)")


if __name__ == "__main__":
    main()
