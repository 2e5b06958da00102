"""oneDNN convolutions per model size (issue 14): the UNet's CFG call with and without oneDNN.

For each model (shipped digit model, tiny, a quarter-width and a full mid-size UNet on the tiny
conditioner/VAE), image size and number of images per batch, one sampling step's network input is
captured (a batch of 2 per image: uncond + cond), then ``--calls`` calls of ``engine.model`` are timed
with ``torch.backends.mkldnn`` on and off, interleaved ``--repeats`` times, at the thread count
``cpu_threads: null`` picks for that model (sgm/tasks/threads.py). The ratio is the median of the paired ratios (off / on); below 1 oneDNN is
slower. The outputs of both paths are compared too. ``cpu_onednn: auto`` (sgm/networks/onednn.py)
is what the last column says run.py does.

    nice -n 5 python experiments/onednn_policy.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bm  # noqa: E402
from cold_start import publish  # noqa: E402

SECTION, TITLE = "onednn", "oneDNN convolutions per model size (CPU)"
QUARTER = ["model.network.model_channels=64", *bm.MID_OVERRIDES[1:]]
# (model, overrides, image size, images per batch): the small latents at several batch sizes (run.py's
# batch_size is 8), the larger ones at one image
CASES = [*[("digits (shipped)", ["model=digits"], 32, n) for n in (1, 2, 4, 8)],
         *[("tiny", ["model=tiny"], 32, n) for n in (1, 2, 4, 8)], ("tiny", ["model=tiny"], 64, 1),
         ("tiny", ["model=tiny"], 64, 2), ("tiny", ["model=tiny"], 128, 1),
         ("mid, 64 channels", ["model=tiny", *QUARTER], 64, 1), ("mid, 64 channels", ["model=tiny", *QUARTER], 128, 1),
         ("mid (benchmark.py's)", ["model=tiny", *bm.MID_OVERRIDES], 64, 1),
         ("mid (benchmark.py's)", ["model=tiny", *bm.MID_OVERRIDES], 128, 1)]
_ENGINES: dict[tuple[str, ...], tuple] = {}


def cfg_call_inputs(engine: Any, cfg: Any, size: int, images: int = 1) -> tuple:
    """The network's arguments at the first step of a CFG sampling run of ``images`` images at ``size`` x
    ``size`` pixels (a network batch of 2 x images: uncond + cond)."""
    import torch
    from hydra.utils import instantiate

    cond, uc = engine.get_conditionings([bm.PROMPT] * images, [""] * images, size, size)
    sigmas = engine.schedule(instantiate(cfg.discretization), 2)
    with torch.inference_mode():
        calls = bm._capture_inputs(engine, lambda: engine.sample_latents(
            cond, uc, list(range(images)), engine.latent_shape(size, size), sigmas[:2], instantiate(cfg.sampler)))
    return calls[0]


def relative_gap(engine: Any, inputs: tuple, a: bool, b: bool) -> float:
    """max |A - B| / max |A| of the features entering the UNet's output block (a random UNet's zero-initialised
    output convolution would make its output 0 either way) and of the output, with oneDNN ``a`` and ``b``."""
    import torch

    from sgm.networks.onednn import onednn_context

    seen: list[torch.Tensor] = []
    handle = engine.model.diffusion_model.out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        outs = []
        for enabled in (a, b):
            with torch.inference_mode(), onednn_context(enabled):
                outs.append(engine.model(*inputs))
    finally:
        handle.remove()
    pairs = [(seen[0], seen[1]), (outs[0], outs[1])]
    return max(float((x - y).abs().max() / x.abs().max().clamp(min=1e-30)) for x, y in pairs)


def measure(name: str, overrides: list[str], size: int, images: int, args: argparse.Namespace) -> dict:
    import torch

    from sgm.networks.onednn import auto_onednn, onednn_context
    from sgm.tasks.threads import choose_threads

    key = tuple(overrides)
    if key not in _ENGINES:
        _ENGINES.clear()  # one model held at a time
        _ENGINES[key] = bm.build([*overrides, "guider=cfg", "guider.scale=5.0", "progress=false"])
    cfg, engine = _ENGINES[key]
    threads = choose_threads(args.threads, engine.model)
    inputs = cfg_call_inputs(engine, cfg, size, images)
    latent = (images, *engine.latent_shape(size, size))

    def calls(enabled: bool):
        def run():
            with torch.inference_mode(), onednn_context(enabled):
                for _ in range(args.calls):
                    out = engine.model(*inputs)
            return out
        return run

    with_, without = calls(True), calls(False)
    diff = relative_gap(engine, inputs, True, False)
    t_on, t_off = [], []
    with_(), without()
    for _ in range(args.repeats):
        t_on.append(bm._timed(with_))
        t_off.append(bm._timed(without))
    ratio = statistics.median(b / a for a, b in zip(t_on, t_off))
    res = {"model": name, "overrides": overrides, "size": size, "images": images,
           "params": bm.count_params(engine.model),
           "threads": threads, "latent": list(inputs[0].shape), "on_ms": statistics.median(t_on) / args.calls * 1e3,
           "off_ms": statistics.median(t_off) / args.calls * 1e3, "ratio": ratio, "rel_diff": diff,
           "auto": auto_onednn(latent, torch.float32)}
    bm.log(f"[onednn] {name} {size}px x{images} ({res['params'] / 1e6:.1f}M, {threads} threads): "
           f"on {res['on_ms']:.2f} ms, "
           f"off {res['off_ms']:.2f} ms per call (x{ratio:.2f}); outputs differ by {diff:.1e}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="network calls per timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cpu_threads: null's choice)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    snap = bm.cpu_snapshot()
    results = [measure(name, o, size, n, args) for name, o, size, n in CASES]
    busy = bm.other_load(snap)
    rows = [[r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['size']}x{r['size']}", r["images"],
             "x".join(str(v) for v in r["latent"]), r["threads"], f"{r['on_ms']:.2f}", f"{r['off_ms']:.2f}",
             f"**x{r['ratio']:.2f}**", f"{r['rel_diff']:.1e}", "on" if r["auto"] else "off"] for r in results]
    text = "\n".join([
        f"Reproduce: `python experiments/onednn_policy.py --repeats {args.repeats} --calls {args.calls} "
        + (f"--threads {args.threads} " if args.threads else "") + "--out docs/benchmarks.md`.", "",
        f"Machine: {bm.machine_line().split('; ')[0]}; torch threads: "
        + (f"{args.threads}. " if args.threads else "as `cpu_threads: null` picks them per model. ")
        + f"Other processes used {busy * 100:.0f}% of the machine's CPU time during the measurement (`/proc/stat`), "
        f"so on and off are interleaved and the ratio is the median of the paired ratios.", "",
        "One CFG network call (uncond + cond batched, `engine.model` with the first step's real input, float32; "
        "*images*: images per batch, the network's batch is twice that) "
        f"timed {args.calls} times per repeat with `torch.backends.mkldnn` on and off; *off / on* below 1 means "
        "the convolutions are faster without oneDNN. *Differ*: max |on - off| / max |on| of the output and of the features entering the UNet's output block (a random UNet's output is 0). "
        "Mid models are `model=tiny` with a wider UNet (`experiments/onednn_policy.py`, `QUARTER` and "
        "`benchmark.py`'s `MID_OVERRIDES`). *auto*: what `cpu_onednn: auto` (the default, "
        "`sgm/networks/onednn.py`) chooses.", "",
        bm.table(["model", "UNet parameters", "image", "images", "network input", "threads", "oneDNN on ms / call",
                  "off ms / call", "off / on", "differ", "auto"], rows)])
    publish(args, SECTION, TITLE, text, {"results": results, "other_processes_cpu_share": busy})


if __name__ == "__main__":
    main()
