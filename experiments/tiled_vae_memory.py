"""Peak memory and exactness of tiled VAE decoding/encoding on the CPU (docs/tiled_vae.md).

Each case runs in a fresh process on the SDXL VAE (conf/first_stage/sdxl_vae.yaml, full width,
seeded random weights): the process's resident-set high-water mark (``VmHWM`` of
/proc/self/status) after the call, less its resident size just before it, is the memory the
call needed. The output is saved and compared with the untiled one (largest difference over the
untiled output's range).

    nice -n 10 python experiments/tiled_vae_memory.py --size 512 --cases 0 2 3 4 5 6   # docs/tiled_vae.md
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("tiled_vae_memory")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's sgm, as run.py imports it
    sys.path.insert(0, str(ROOT))
# (name, operation, tiled_mode or None for untiled, tile_size in latent pixels)
CASES = [
    ("decode, untiled", "decode", None, 0),
    ("decode, exact, 64-latent tiles", "decode", "exact", 64),
    ("decode, exact, 32-latent tiles", "decode", "exact", 32),
    ("decode, exact, 16-latent tiles", "decode", "exact", 16),
    ("decode, blend, 32-latent tiles (overlap 8)", "decode", "blend", 32),
    ("encode, untiled", "encode", None, 0),
    ("encode, exact, 32-latent tiles", "encode", "exact", 32),
]


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(op: str, mode: str | None, tile: int, size: int, threads: int, out: Path) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.set_num_threads(threads)
    node = OmegaConf.load(ROOT / "conf" / "first_stage" / "sdxl_vae.yaml")
    node.ddconfig.attn_type = "vanilla"  # SDPA
    torch.manual_seed(0)
    vae = instantiate(node).eval()
    vae.set_tiling(mode is not None, tile_size=tile or 64, tile_overlap=8 if tile else 16, mode=mode or "exact")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 4, size // 8, size // 8, generator=g) if op == "decode"
         else torch.rand(1, 3, size, size, generator=g) * 2 - 1)
    with torch.no_grad():
        before = _status("VmRSS")
        t0 = time.perf_counter()
        y = vae.decode(x) if op == "decode" else vae.encode(x)
        seconds = time.perf_counter() - t0
        peak = _status("VmHWM")
    torch.save(y, out)
    print(json.dumps({"extra_bytes": peak - before, "baseline_bytes": before, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (latent side / 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--cases", type=int, nargs="+", help="indices into CASES (default: all; each op's untiled first)")
    ap.add_argument("--child", nargs=3, metavar=("OP", "MODE", "TILE"), help=argparse.SUPPRESS)
    ap.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        op, mode, tile = args.child
        child(op, None if mode == "none" else mode, int(tile), args.size, args.threads, args.save)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    rows, reference = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, op, mode, tile in [CASES[i] for i in args.cases] if args.cases else CASES:
            save = Path(tmp) / f"{len(rows)}.pt"
            cmd = [sys.executable, __file__, "--size", str(args.size), "--threads", str(args.threads),
                   "--child", op, mode or "none", str(tile), "--save", str(save)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            m = json.loads(res.stdout.strip().splitlines()[-1])
            y = torch.load(save)
            if mode is None:
                reference[op] = y
            ref = reference[op]
            m["error"] = float((y - ref).abs().max() / (ref.max() - ref.min()))
            rows.append((name, m))
            log.info("%s: %.0f MiB, %.1f s, error %.2e", name, m["extra_bytes"] / 2**20, m["seconds"], m["error"])
    text = markdown(rows, args.size, args.threads)
    log.info("\n%s", text)
    if args.out:
        args.out.write_text(text)


def markdown(rows: list[tuple[str, dict]], size: int, threads: int) -> str:
    """The results as a markdown table, each case's memory also as a share of its operation's untiled one."""
    untiled = {n.split(",")[0]: m["extra_bytes"] for n, m in rows if n.endswith("untiled")}
    head = [f"SDXL VAE (full width, random weights), {size}x{size} image ({size // 8}x{size // 8} latent), "
            f"float32, CPU, {threads} thread(s):", "",
            "| case | peak extra memory | vs untiled | seconds | max error / output range |",
            "|---|---:|---:|---:|---:|"]
    body = [f"| {n} | {m['extra_bytes'] / 2**20:,.0f} MiB | {m['extra_bytes'] / untiled[n.split(',')[0]]:.2f} | "
            f"{m['seconds']:.1f} | {m['error']:.1e} |" for n, m in rows]
    return "\n".join(head + body) + "\n"


if __name__ == "__main__":
    main()
