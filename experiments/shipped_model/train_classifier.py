"""Train the digit classifier that judges generated digits, on the MNIST sample's train split.

    python experiments/shipped_model/train_classifier.py      # writes sgm/assets/digit_classifier.safetensors
    python experiments/shipped_model/train_classifier.py --stats-only   # only the reference statistics

Also writes ``sgm/assets/digit_reference_stats.safetensors``: the FID feature statistics of the
500 held-out digits, so that sampling can report the Fréchet distance without the dataset.

Seeded (seed 0); prints the held-out accuracy (the 500 digits never trained on).
"""

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from sgm.checkpoint import write_safetensors
from sgm.data.mnist import load_mnist_5k, split, to_tensor
from sgm.metrics.digits import REFERENCE_STATS, WEIGHTS, DigitClassifier, held_out_digits, load_digit_classifier, reference_stats

log = logging.getLogger("train_classifier")


def shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (zero fill = background)."""
    out = torch.full_like(x, -1.0)
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=g).tolist()
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--stats-out", default=str(REFERENCE_STATS))
    parser.add_argument("--stats-only", action="store_true", help="only recompute the held-out feature statistics")
    args = parser.parse_args()
    if args.stats_only:
        write_stats(args.out, args.stats_out)
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    images, labels = load_mnist_5k()
    train, held = split(labels)
    x_train, y_train = to_tensor(images[train]), torch.from_numpy(labels[train])
    x_held, y_held = to_tensor(images[held]), torch.from_numpy(labels[held])
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * (len(train) // 64 + 1))
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(shift(x_train[idx], g)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_held).argmax(1) == y_held).float().mean().item()
        log.info("epoch %d: held-out accuracy %.4f (%.0f s)", epoch + 1, acc, time.perf_counter() - start)
    write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
                      {"held_out_accuracy": f"{acc:.4f}", "seed": str(args.seed), "epochs": str(args.epochs)})
    log.info("wrote %s (held-out accuracy %.4f)", args.out, acc)
    write_stats(args.out, args.stats_out)


def write_stats(classifier_path: str, out: str) -> None:
    reference, _ = held_out_digits()
    stats = reference_stats(reference, load_digit_classifier(classifier_path))
    write_safetensors(stats, out, {"images": str(len(reference)), "split": "held_out (50 per digit, seed 0)"})
    log.info("wrote %s (%d held-out digits)", out, len(reference))


if __name__ == "__main__":
    main()
