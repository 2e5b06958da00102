"""The benchmark sections against diffusers and with torch.compile (parts of experiments/benchmark.py).

* :func:`section_cpu_vs_diffusers` (``--sections cpu_vs_diffusers``): the tiny SDXL-family model
  end to end through our sampler and through diffusers' ``StableDiffusionXLPipeline`` on the same
  weights (:mod:`diffusers_sdxl`), interleaved, with the breakdown (text encoders, denoising loop,
  VAE, framework = loop - network); the SDXL-size UNet forward against ``UNet2DConditionModel``;
  the NCHW-output fix of the spatial transformer and convolutions without oneDNN, measured.
* :func:`gpu_variants` (inside ``--sections gpu``): eager, compiled and compiled + CUDA graphs, and
  diffusers with and without ``torch.compile``, seconds per image and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any, Callable

import benchmark as bm
import diffusers_sdxl

MED = statistics.median


# ----------------------------------------------------------------------------------------
# one end-to-end image batch, ours and diffusers', with its breakdown
# ----------------------------------------------------------------------------------------
def unit_noise(engine: Any, batch: int, H: int, W: int) -> Any:
    """The unit noise ``engine.sample_latents`` starts images 0..batch-1 from (seeds 0..batch-1)."""
    from sgm.diffusion.noise import gaussian, seeded_generators

    return gaussian((batch, *engine.latent_shape(H, W)), seeded_generators(list(range(batch))), engine.device)


def run_ours(engine: Any, sampler: Any, sigmas: Any, batch: int, H: int, W: int,
             sync: Callable[[], None] = lambda: None) -> tuple[dict, Any]:
    """Text encoders, sampling loop, VAE decode of one batch (empty negative prompt); seconds each."""
    import torch

    probe = bm._InSitu(engine.model)
    try:
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            cond, uc = engine.get_conditionings([bm.PROMPT] * batch, [""] * batch, H, W)
            sync()
            t1 = time.perf_counter()
            z = engine.sample_latents(cond, uc, list(range(batch)), engine.latent_shape(H, W), sigmas, sampler)
            sync()
            t2 = time.perf_counter()
            engine.decode_first_stage(z).clamp(-1, 1)
            sync()
            t3 = time.perf_counter()
    finally:
        probe.remove()
    return {"text": t1 - t0, "loop": t2 - t1, "vae": t3 - t2, "net": probe.total, "total": t3 - t0}, z


def run_diffusers(pipe: Any, steps: int, scale: float, noise: Any, H: int, W: int,
                  sync: Callable[[], None] = lambda: None) -> tuple[dict, Any]:
    """The same with ``StableDiffusionXLPipeline``: ``encode_prompt`` (no negative prompt: zeroed, as
    ``force_zeros_for_empty_prompt`` does), the pipeline's loop from those embeddings and ``noise``
    (``output_type="latent"``), ``vae.decode``."""
    import torch

    batch = noise.shape[0]
    probe = bm._InSitu(pipe.unet)
    try:
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            pe, npe, ppe, nppe = pipe.encode_prompt(bm.PROMPT, device=noise.device, num_images_per_prompt=batch,
                                                    do_classifier_free_guidance=True, negative_prompt=None)
            sync()
            t1 = time.perf_counter()
            z = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                     negative_pooled_prompt_embeds=nppe, num_inference_steps=steps, guidance_scale=scale,
                     latents=noise, height=H, width=W, output_type="latent").images
            sync()
            t2 = time.perf_counter()
            pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
            sync()
            t3 = time.perf_counter()
    finally:
        probe.remove()
    return {"text": t1 - t0, "loop": t2 - t1, "vae": t3 - t2, "net": probe.total, "total": t3 - t0}, z


# ----------------------------------------------------------------------------------------
# random SDXL-size UNet weights without a float32 copy
# ----------------------------------------------------------------------------------------
def materialize_random(module: Any, dtype: Any, seed: int = 0) -> Any:
    """Give every meta parameter of ``module`` values in ``dtype``: N(0, 1/fan_in) weights, zero
    biases, unit norm scales (activations stay in range through the whole network)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                data = torch.empty(p.shape, dtype=dtype)
                if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) and name == "weight":
                    data.fill_(1)
                elif p.ndim >= 2:
                    data.normal_(0, p[0].numel() ** -0.5, generator=gen)
                else:
                    data.zero_()
                mod._parameters[name] = nn.Parameter(data, requires_grad=False)
    return module.eval()


def conv_layouts(unet: Any, x: Any, t: Any, context: Any, y: Any) -> tuple[int, int]:
    """(convolutions whose input is not NCHW-contiguous, all convolutions) of one UNet call."""
    import torch

    seen: list[bool] = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
               for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            unet(x, t, context, y)
    finally:
        for h in handles:
            h.remove()
    return seen.count(False), len(seen)


@contextlib.contextmanager
def old_transformer_output():
    """The spatial transformer's sum as sgm writes it (x + residual: channels-last strides)."""
    from sgm.networks.transformer import SpatialTransformer

    SpatialTransformer.nchw_output = False
    try:
        yield
    finally:
        SpatialTransformer.nchw_output = True


def paired(fa: Callable[[], Any], fb: Callable[[], Any], repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of ``fa`` and ``fb`` run alternately ``repeats`` times (after one warm-up each)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(bm._timed(fa))
        tb.append(bm._timed(fb))
    return ta, tb


def _ratio(ta: list[float], tb: list[float]) -> float:
    """Median of the paired ratios b / a."""
    return MED(b / a for a, b in zip(ta, tb))


# ----------------------------------------------------------------------------------------
# section: CPU lead over diffusers
# ----------------------------------------------------------------------------------------
def section_cpu_vs_diffusers(args: argparse.Namespace) -> tuple[str, dict]:
    import torch
    from hydra.utils import instantiate

    torch.set_num_threads(bm.THREADS)
    snap, t_start = bm.cpu_snapshot(), time.perf_counter()
    steps, repeats, scale = args.steps, args.repeats, 5.0
    cfg, engine = bm.build(["model=tiny", *diffusers_sdxl.MATCHING_SCHEDULE, "guider=cfg", f"guider.scale={scale}",
                            f"steps={steps}", "progress=false"])
    pipe = diffusers_sdxl.pipeline(engine, cfg)
    sampler = instantiate(cfg.sampler)
    sigmas = engine.schedule(instantiate(cfg.discretization), steps)
    pipe.scheduler.set_timesteps(steps)
    sigma_gap = float((pipe.scheduler.sigmas[:-1].double() - sigmas[:-1].double()).abs().max())
    H, W = int(cfg.H), int(cfg.W)
    raw: dict[str, Any] = {"steps": steps, "repeats": repeats, "sigma_max_abs_diff": sigma_gap, "cases": []}
    rows, rows_b = [], []
    for batch in args.diffusers_batches:
        noise = unit_noise(engine, batch, H, W)
        ours, theirs = [], []
        for _ in range(repeats + 1):  # interleaved; the first pair is the warm-up
            ours.append(run_ours(engine, sampler, sigmas, batch, H, W))
            theirs.append(run_diffusers(pipe, steps, scale, noise, H, W))
        z_ours, z_theirs = ours[-1][1], theirs[-1][1]
        gap = float((z_ours - z_theirs).abs().max() / z_ours.abs().max())
        o, d = [r for r, _ in ours[1:]], [r for r, _ in theirs[1:]]
        parts = ("total", "text", "loop", "vae", "net")
        ratio = {k: MED(b[k] / a[k] for a, b in zip(o, d)) for k in parts}
        med_o = {k: MED(r[k] for r in o) for k in parts}
        med_d = {k: MED(r[k] for r in d) for k in parts}
        fw_o = MED((r["loop"] - r["net"]) / r["net"] for r in o)
        fw_d = MED((r["loop"] - r["net"]) / r["net"] for r in d)
        case = {"batch": batch, "ours": o, "diffusers": d, "ratio": ratio, "framework_ours": fw_o,
                "framework_diffusers": fw_d, "latent_rel_diff": gap}
        raw["cases"].append(case)
        bm.log(f"[cpu_vs_diffusers] batch {batch}: ours {med_o['total'] * 1e3:.1f} ms, diffusers "
               f"{med_d['total'] * 1e3:.1f} ms per batch (x{ratio['total']:.2f}); loop x{ratio['loop']:.2f}; "
               f"framework ours {fw_o * 100:.1f}%, diffusers {fw_d * 100:.1f}% of the network; latents differ by "
               f"{gap:.1e} (relative)")
        rows.append([batch, f"{med_o['total'] / batch * 1e3:.1f}", f"{med_d['total'] / batch * 1e3:.1f}",
                     f"**x{ratio['total']:.2f}**", f"{med_o['loop'] / steps * 1e3:.2f}",
                     f"{med_d['loop'] / steps * 1e3:.2f}", f"x{ratio['loop']:.2f}", f"{gap:.1e}"])
        rows_b.append([batch, *(f"{med_o[k] * 1e3:.1f} / {med_d[k] * 1e3:.1f} (x{ratio[k]:.2f})"
                                for k in ("text", "loop", "net", "vae")),
                       f"{fw_o * 100:.1f}% / {fw_d * 100:.1f}%"])
    del pipe

    unet_md, unet_raw = _sdxl_unet(args)
    raw["sdxl_unet"] = unet_raw
    mk_md, mk_raw = _mkldnn(engine, args)
    raw["mkldnn"] = mk_raw
    raw["other_processes_cpu_share"] = busy = bm.other_load(snap)
    lead = min(c["ratio"]["total"] for c in raw["cases"])
    fw = max(c["framework_ours"] for c in raw["cases"])
    md = [f"Reproduce: `python experiments/benchmark.py --sections cpu_vs_diffusers --threads {bm.THREADS} "
          f"--steps {steps} --repeats {repeats} --sdxl-unet-repeats {args.sdxl_unet_repeats} "
          f"--sdxl-unet-dtype {args.sdxl_unet_dtype} --sdxl-unet-latent {args.sdxl_unet_latent} "
          f"--out docs/benchmarks.md` (this run: {(time.perf_counter() - t_start) / 60:.0f} minutes, most of it the "
          f"SDXL UNet).", "",
          f"Machine: {bm.machine_line()}. Other processes used {busy * 100:.0f}% of the machine's CPU time during "
          f"these measurements (from `/proc/stat`), so every comparison is interleaved and reported as the median "
          f"of paired ratios.", "",
          f"`model=tiny {' '.join(diffusers_sdxl.MATCHING_SCHEDULE)} guider=cfg guider.scale={scale} steps={steps}` "
          f"built as run.py builds it (random weights, float32, {H}x{W} images), and diffusers' "
          f"`StableDiffusionXLPipeline` sharing every tensor with it (`experiments/diffusers_sdxl.py`: the UNet and "
          f"VAE renamed, CLIP-L the same module, bigG converted to `CLIPTextModelWithProjection`) with SDXL's "
          f"`EulerDiscreteScheduler` (leading spacing, steps offset 1: its sigmas equal ours within "
          f"{sigma_gap:.1e}). Both start from the same noise, the prompt \"{bm.PROMPT}\" and no negative prompt "
          f"(zeroed embeddings on both sides). **ours**: `engine.get_conditionings`, `engine.sample_latents`, "
          f"`engine.decode_first_stage`; **diffusers**: `pipe.encode_prompt`, `pipe(prompt_embeds=..., "
          f"output_type=\"latent\")`, `pipe.vae.decode`; all under `torch.inference_mode()`. {repeats} interleaved "
          f"pairs after a warm-up pair; *latents differ* is max |ours - diffusers| / max |ours| of the final "
          f"latents (the same image up to float rounding).", "",
          bm.table(["batch", "ours ms / image", "diffusers ms / image", "diffusers / ours", "ours loop ms / step",
                    "diffusers loop ms / step", "loop ratio", "latents differ"], rows), "",
          "Breakdown, ms per batch, ours / diffusers (median ratio): the text encoders, the denoising loop, the "
          "network inside the loop (forward hooks on `engine.model` / `pipe.unet`), the VAE decode, and the "
          "framework's share: (loop - network) / network.", "",
          bm.table(["batch", "text encoders", "denoising loop", "network in the loop", "VAE decode",
                    "framework / network"], rows_b), "",
          f"Goal: ours at least 1.2x faster end to end on the tiny model, framework at most 2% of the network time. "
          f"Result: **x{lead:.2f}** (the smallest ratio over the batches); framework {fw * 100:.1f}% of the network "
          f"at most.", "", unet_md, "", mk_md]
    return "\n".join(md), raw


def _sdxl_inputs(batch: int, latent: int, dtype: Any) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    text_embeds = torch.randn(batch, 1280, generator=g).to(dtype)
    time_ids = torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]] * batch)
    from sgm.networks.util import timestep_embedding

    sizes = timestep_embedding(time_ids.flatten(), 256).reshape(batch, -1).to(dtype)  # our size embedders' rule
    return {"x": torch.randn(batch, 4, latent, latent, generator=g).to(dtype), "t": torch.tensor([500.0] * batch),
            "context": torch.randn(batch, 77, 2048, generator=g).to(dtype),
            "y": torch.cat([text_embeds, sizes], 1), "text_embeds": text_embeds, "time_ids": time_ids.to(dtype)}


def _sdxl_unet(args: argparse.Namespace) -> tuple[str, dict]:
    """SDXL base's UNet forward, ours against ``UNet2DConditionModel`` on the same (shared) weights."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sgm.tasks.common import compose

    dtype = getattr(torch, args.sdxl_unet_dtype)
    latent, repeats = args.sdxl_unet_latent, args.sdxl_unet_repeats
    cfg = compose("sample", ["model=sdxl_base"])
    node = OmegaConf.to_container(cfg.model.network, resolve=True)
    with torch.device("meta"):
        meta = instantiate(cfg.model.network)
    t0 = time.perf_counter()
    ours = materialize_random(meta, dtype)
    small = _sdxl_inputs(1, 16, dtype)  # layouts propagate through norms and activations: count on real tensors
    bad_new, n_conv = conv_layouts(ours, *(small[k] for k in ("x", "t", "context", "y")))
    with old_transformer_output():
        bad_old, _ = conv_layouts(ours, *(small[k] for k in ("x", "t", "context", "y")))
    bm.log(f"[cpu_vs_diffusers] SDXL UNet convolutions with a non-NCHW input: {bad_old} of {n_conv} before the fix, "
           f"{bad_new} after")
    node.pop("_target_", None)
    theirs = diffusers_sdxl.unet(ours, node, 256)
    build_s = time.perf_counter() - t0
    inp = _sdxl_inputs(1, latent, dtype)
    added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}

    def f_ours():
        with torch.inference_mode():
            return ours(inp["x"], inp["t"], inp["context"], inp["y"])

    def f_theirs():
        with torch.inference_mode():
            return theirs(inp["x"], inp["t"], encoder_hidden_states=inp["context"], added_cond_kwargs=added).sample

    a, b = f_ours().float(), f_theirs().float()
    gap = float((a - b).abs().max() / a.abs().max())
    t_ours, t_theirs = paired(f_ours, f_theirs, repeats)

    def f_old():
        with old_transformer_output():
            return f_ours()

    t_new, t_old = paired(f_ours, f_old, repeats)
    res = {"dtype": str(dtype), "latent": latent, "params": bm.count_params(ours), "build_s": build_s,
           "ours_s": t_ours, "diffusers_s": t_theirs, "ratio": _ratio(t_ours, t_theirs), "output_rel_diff": gap,
           "conv_non_nchw_before": bad_old, "conv_non_nchw_after": bad_new, "convs": n_conv,
           "nchw_fix_s": t_new, "before_fix_s": t_old, "fix_ratio": _ratio(t_new, t_old)}
    bm.log(f"[cpu_vs_diffusers] SDXL UNet {latent}x{latent} {dtype}: ours {MED(t_ours):.2f} s, diffusers "
           f"{MED(t_theirs):.2f} s (x{res['ratio']:.2f}); before the NCHW fix {MED(t_old):.2f} s "
           f"(x{res['fix_ratio']:.2f}); outputs differ by {gap:.1e}")
    md = (f"**SDXL base UNet forward** (`conf/network/sdxl_base.yaml`, {res['params'] / 1e6:.0f}M parameters, random "
          f"weights in {args.sdxl_unet_dtype}, batch 1, {latent}x{latent} latent, one thread): ours "
          f"{MED(t_ours):.2f} s, diffusers' `UNet2DConditionModel` on the same tensors {MED(t_theirs):.2f} s: "
          f"diffusers / ours **x{res['ratio']:.2f}** (median of {repeats} interleaved pairs; outputs agree within "
          f"{gap:.1e} relative). The spatial transformer used to return its output with the channels-last strides "
          f"of a transposed view, so {bad_old} of the UNet's {n_conv} convolutions got a non-NCHW input and copied "
          f"it (counted with hooks on one call at a 16x16 latent); it now returns NCHW ({bad_new} left), same values: "
          f"the old sum takes x{res['fix_ratio']:.2f} the time of the new one per forward "
          f"({MED(t_old):.2f} s against {MED(t_new):.2f} s).")
    del ours, theirs
    return md, res


def _mkldnn(engine: Any, args: argparse.Namespace) -> tuple[str, dict]:
    """The tiny UNet's CFG call with and without oneDNN convolutions (``torch.backends.mkldnn``)."""
    import torch

    unet = engine.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0])
    c, y = torch.randn(2, 77, 80, generator=g), torch.randn(2, 224, generator=g)

    def calls(n: int = 20):
        with torch.inference_mode():
            for _ in range(n):
                unet(x, t, c, y)

    def without():
        with torch.backends.mkldnn.flags(enabled=False):
            calls()

    t_on, t_off = paired(calls, without, args.repeats)
    r = _ratio(t_on, t_off)
    md = (f"**Convolutions without oneDNN** (`torch.backends.mkldnn.flags(enabled=False)`, the tiny UNet's CFG call, "
          f"batch 2, 8x8 latent, 20 calls): {MED(t_off) / 20 * 1e3:.2f} ms per call against {MED(t_on) / 20 * 1e3:.2f} "
          f"ms with oneDNN (x{r:.2f} the time, median of paired ratios): "
          + ("slower here." if r >= 1 else "faster here.") + " `cpu_onednn: auto` (run.py's default, "
          "`sgm/networks/onednn.py`) samples batches of at most two 8x8 latents without oneDNN and larger ones with "
          "it, so *ours* above ran without it at batch 1 and with it at batch 4 (see the section oneDNN convolutions "
          "per model size).")
    return md, {"with_s": t_on, "without_s": t_off, "ratio": r}


# ----------------------------------------------------------------------------------------
# inside the GPU section: compiled variants and diffusers
# ----------------------------------------------------------------------------------------
def gpu_variants(res: dict, spec: dict, engine: Any, cfg: Any, attempt: Callable, sync: Callable[[], None],
                 on_cuda: bool) -> None:
    """Seconds per image and peak memory of eager / compiled / compiled + CUDA graphs (ours) and of
    diffusers' pipeline with and without ``torch.compile`` (same weights), at the spec's batches;
    ``res["variants"]`` gets one entry per measurement. Compilations are the expensive part (one per
    shape and mode): each optional measurement is skipped when the time budget is spent."""
    import torch
    from hydra.utils import instantiate

    from sgm.networks.compile import CompileSettings, apply_compile
    from sgm.tasks.common import check_size

    H, W = check_size(cfg.model, cfg.H, cfg.W)
    steps, scale = spec["steps"], spec["cfg_scale"]
    sampler = instantiate(cfg.sampler)
    sigmas = engine.schedule(instantiate(cfg.discretization), steps)
    # the dry run captures each UNet whole (fullgraph) with dynamo and runs the captured graph, generating no
    # code; tests/test_compile.py holds our UNet's aot_eager and inductor graphs to eager sampling
    backend = "inductor" if on_cuda else "eager"
    mode = spec.get("compile_mode", "default")
    variants = res.setdefault("variants", [])
    reference: dict[int, Any] = {}

    def measure(name: str, batch: int, fn: Callable[[], tuple[dict, Any]]) -> None:
        fn()  # warm-up (compiles)
        times, z = [], None
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(spec["variant_repeats"]):
            t, z = fn()
            times.append(t)
        best = min(times, key=lambda r: r["total"])
        entry = {"name": name, "batch": batch, "s_per_image": best["total"] / batch, **best,
                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None}
        if name.startswith("ours"):
            ref = reference.setdefault(batch, z)  # eager runs first: compiled latents against eager
            entry["rel_diff_vs_eager"] = float((z.float() - ref.float()).abs().max() / ref.float().abs().max())
        variants.append(entry)
        bm.log(f"[gpu] {name} batch {batch}: {entry['s_per_image']:.3f} s/image, peak {entry['peak_gib']} GiB"
               + (f", vs eager {entry['rel_diff_vs_eager']:.1e}" if "rel_diff_vs_eager" in entry else ""))

    def ours(settings: CompileSettings | None, batch: int) -> Callable[[], tuple[dict, Any]]:
        engine.model._compiled = []
        if settings is not None:
            apply_compile(engine, settings)  # compiled at the first call of each shape
        return lambda: run_ours(engine, sampler, sigmas, batch, H, W, sync)

    pipe = attempt("diffusers pipeline build", lambda: diffusers_sdxl.pipeline(engine, cfg), optional=True)

    def theirs_compiled(batch: int, noise: Any) -> None:
        eager_unet = pipe.unet
        pipe.unet = torch.compile(eager_unet, backend=backend, mode=mode if backend == "inductor" else None,
                                  fullgraph=True)
        try:
            measure("diffusers compiled", batch, lambda: run_diffusers(pipe, steps, scale, noise, H, W, sync))
        finally:
            pipe.unet = eager_unet

    compiled = CompileSettings(enabled=True, mode=mode, backend=backend)
    graphs = CompileSettings(enabled=True, mode=mode, backend=backend, cuda_graphs=True)
    compile_s = spec.get("compile_estimate_s", 30)
    for batch in spec.get("variant_batches", spec["batches"]):
        first = batch == spec["batches"][0]
        noise = None if pipe is None else unit_noise(engine, batch, H, W).to(dtype=pipe.unet.dtype)
        steps_plan: list[tuple[str, Callable[[], None], float]] = []
        for name, settings in [("ours eager", None), ("ours compiled", compiled)]:
            steps_plan.append((name, lambda n=name, s=settings, b=batch: measure(n, b, ours(s, b)),
                               compile_s if settings else 30))
        if pipe is not None:
            steps_plan.append(("diffusers eager", lambda b=batch, z=noise: measure(
                "diffusers eager", b, lambda: run_diffusers(pipe, steps, scale, z, H, W, sync)), 30))
            steps_plan.append(("diffusers compiled", lambda b=batch, z=noise: theirs_compiled(b, z), compile_s))
        if on_cuda:
            steps_plan.append(("ours compiled + CUDA graphs", lambda b=batch: measure(
                "ours compiled + CUDA graphs", b, ours(graphs, b)), compile_s))
        for name, fn, need in steps_plan:
            attempt(f"{name} batch {batch}", fn, optional=not (first and name == "ours eager"), need_s=need)
            engine.model._compiled = []
    engine.model._compiled = []


def render_variants(res: dict) -> list[str]:
    """The GPU section's table of compiled and diffusers variants (empty when none was measured)."""
    rows = []
    for v in res.get("variants", []):
        rows.append([v["name"], v["batch"], f"{v['s_per_image']:.3f}", f"{v['loop'] * 1e3 / res['spec']['steps']:.1f}",
                     f"{v['text'] * 1e3:.0f}", f"{v['vae'] * 1e3:.0f}",
                     "n/a" if v.get("peak_gib") is None else f"{v['peak_gib']:.1f}",
                     f"{v['rel_diff_vs_eager']:.1e}" if "rel_diff_vs_eager" in v else ""])
    if not rows:
        return []
    mode = res["spec"].get("compile_mode", "default")
    return ["", f"Compiled sampling and diffusers (`StableDiffusionXLPipeline` on the same weights, "
            f"`experiments/diffusers_sdxl.py`; its leading-spacing Euler schedule, ours EDM: the same 30 steps of "
            f"work). Compiled: `compile.enabled=true compile.mode={mode}` (torch.compile once per shape, fullgraph); "
            f"+ CUDA graphs: `compile.cuda_graphs=true`; diffusers compiled: `torch.compile(pipe.unet, "
            f"mode={mode}, fullgraph=True)`. Best of {res['spec'].get('variant_repeats')} runs after a warm-up "
            f"(which compiles); peak memory from `torch.cuda.max_memory_allocated` over the timed runs; last column: "
            f"max |latents - eager latents| / max |eager latents| (bf16).", "",
            bm.table(["variant", "batch", "s / image", "loop ms / step", "text encoders ms", "VAE decode ms",
                      "peak GPU memory GiB", "vs eager"], rows)]
