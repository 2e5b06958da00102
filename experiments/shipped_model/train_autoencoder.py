"""Train the shipped digit model's AutoencoderKL (``conf/first_stage/tiny.yaml``) on MNIST.

    python experiments/shipped_model/train_autoencoder.py --out runs/digits/autoencoder.safetensors

``train.py`` trains the denoiser only; the first stage gets this short stage-one training
(Rombach et al. 2022, sec. 3: reconstruction + a small KL term towards N(0, I)) on the
train split only. Half the digits are drawn in a random ink colour (and a few on a dark
coloured background) so the latent space also holds colour: the red-ink LoRA experiment
needs that. Writes the autoencoder's weights (``encoder.*``, ``decoder.*``, ``quant_conv``,
``post_quant_conv``) and the latent scale factor 1 / std (as SD's 0.18215) in its metadata.
Seeded (seed 0); logs held-out reconstruction error.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sgm.checkpoint import write_safetensors
from sgm.config import instantiate
from sgm.data.mnist import load_mnist_5k, split, to_tensor

log = logging.getLogger("train_autoencoder")
ROOT = Path(__file__).resolve().parents[2]


def colourize(ink: torch.Tensor, g: torch.Generator, p_colour: float = 0.5, p_background: float = 0.15) -> torch.Tensor:
    """Intensity [B, 1, H, W] -> RGB in [-1, 1]: white ink on black, or (with ``p_colour``)
    a random ink colour, and (with ``p_background``) a random dark background."""
    b = ink.shape[0]
    ink_rgb = torch.ones(b, 3, 1, 1)
    coloured = torch.rand(b, generator=g) < p_colour
    ink_rgb[coloured] = torch.rand(int(coloured.sum()), 3, 1, 1, generator=g)
    # make sure each coloured ink is bright in at least one channel
    ink_rgb[coloured] /= ink_rgb[coloured].amax(dim=1, keepdim=True).clamp_min(1e-3)
    bg = torch.zeros(b, 3, 1, 1)
    dark = torch.rand(b, generator=g) < p_background
    bg[dark] = torch.rand(int(dark.sum()), 3, 1, 1, generator=g) * 0.3
    return (bg + ink * (ink_rgb - bg)) * 2 - 1


def first(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``x``; all of them for ``n <= 0``."""
    return x[:n] if n > 0 else x


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/digits/autoencoder.safetensors")
    parser.add_argument("--config", default=str(ROOT / "conf/first_stage/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="per-sample KL (summed) vs summed L1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stats-images", type=int, default=0,
                        help="training images the latent statistics (scale_factor) are taken over; 0: all of them")
    parser.add_argument("--eval-images", type=int, default=0,
                        help="held-out images the reconstruction L1 is measured on; 0: all of them")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    images, labels = load_mnist_5k()
    train, held = split(labels)
    x_train, x_held = ((to_tensor(images[i]) + 1) / 2 for i in (train, held))  # ink intensity in [0, 1]
    model = instantiate(OmegaConf.load(args.config))
    log.info("autoencoder: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=max(0.05, 2 / args.steps))  # >= 2 warm-up steps
    g = torch.Generator().manual_seed(args.seed)
    held_rgb = colourize(first(x_held, args.eval_images), torch.Generator().manual_seed(1))
    start = time.perf_counter()
    perm, pos = torch.randperm(len(x_train), generator=g), 0
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(perm):
            perm, pos = torch.randperm(len(x_train), generator=g), 0
        x = colourize(x_train[perm[pos:pos + args.batch_size]], g)
        pos += args.batch_size
        model.train()
        posterior = model.encode_posterior(x)
        z = posterior.sample(generator=g)
        rec = model.decode(z)
        l1 = (rec - x).abs().sum(dim=(1, 2, 3)).mean()
        mse = F.mse_loss(rec, x, reduction="none").sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()
        loss = (l1 + mse + args.kl_weight * kl) / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                post = model.encode_posterior(held_rgb)
                rec = model.decode(post.mode())
                held_l1 = (rec - held_rgb).abs().mean().item()
            log.info("step %d: train l1 %.4f kl %.1f | held-out l1 %.4f (%.0f s)", step, l1.item() / x[0].numel(),
                     kl.item(), held_l1, time.perf_counter() - start)
    model.eval()
    x_stats = first(x_train, args.stats_images)
    with torch.no_grad():
        z = torch.cat([model.encode_posterior(colourize(x_stats[i:i + 500], g)).sample(generator=g)
                       for i in range(0, len(x_stats), 500)])
        gray = torch.cat([model.encode_posterior(x_stats[i:i + 500].expand(-1, 3, -1, -1) * 2 - 1).mode()
                          for i in range(0, len(x_stats), 500)])
    std = z.std().item()
    log.info("latent std %.4f (white-ink digits only: %.4f), mean %.4f: scale_factor %.4f",
             std, gray.std().item(), z.mean().item(), 1 / std)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
                      {"scale_factor": f"{1 / std:.5f}", "held_out_l1": f"{held_l1:.5f}", "seed": str(args.seed),
                       "steps": str(args.steps), "kl_weight": str(args.kl_weight),
                       "stats_images": str(len(x_stats)), "eval_images": str(len(held_rgb))})
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
