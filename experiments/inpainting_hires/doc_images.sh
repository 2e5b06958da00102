#!/usr/bin/env bash
# The images of docs/inpainting_hires.md, made by the commands the page documents (shipped model, CPU).
# Usage: bash experiments/inpainting_hires/doc_images.sh   (from the repository root; about a minute)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/doc_inpainting_hires}
IMG=docs/img
rm -rf "$OUT"
run() { nice -n 10 "$PY" run.py progress=false ~logger cpu_threads=1 "$@"; }

# 1. a generated "three" (seed 42), and masks of its left and right halves (white = repaint)
run prompt="a handwritten digit three" num_images_per_prompt=1 ~metrics hydra.run.dir="$OUT/three"
cp "$OUT/three/00000.png" "$IMG/inpaint_three.png"
"$PY" - "$IMG" <<'PYEOF'
import sys
from PIL import Image
for name, box in (("inpaint_mask_left.png", (0, 0, 16, 32)), ("inpaint_mask_right.png", (16, 0, 32, 32))):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, box)
    mask.save(f"{sys.argv[1]}/{name}")
PYEOF

# 2. inpainting: one half repainted as an "eight" (four seeds), latent-mask blending
for side in left right; do
  run init_image="$IMG/inpaint_three.png" mask="$IMG/inpaint_mask_$side.png" prompt="a handwritten digit eight" \
      num_images_per_prompt=4 grid_columns=4 mask_blur=1 hydra.run.dir="$OUT/eight_$side"
  cp "$OUT/eight_$side/grid.png" "$IMG/inpaint_eight_$side.png"
done

# 3. outpainting: 8 new pixels on each side of the three (48 x 48 output)
run init_image="$IMG/inpaint_three.png" outpaint=[8,8,8,8] H=48 W=48 prompt="a handwritten digit three" \
    num_images_per_prompt=4 grid_columns=4 ~metrics hydra.run.dir="$OUT/outpaint"
cp "$OUT/outpaint/grid.png" "$IMG/inpaint_outpaint.png"

# 4. hires fix: 32 -> 64 (latent and pixel), against the plain 32 x 32 run
run prompt="a handwritten digit five" num_images_per_prompt=4 grid_columns=4 hydra.run.dir="$OUT/five"
run prompt="a handwritten digit five" num_images_per_prompt=4 grid_columns=4 hires=latent hires.scale=2 \
    hydra.run.dir="$OUT/five_latent"
run prompt="a handwritten digit five" num_images_per_prompt=4 grid_columns=4 hires=pixel hires.scale=2 \
    hires.strength=0.3 hydra.run.dir="$OUT/five_pixel"
cp "$OUT/five/grid.png" "$IMG/hires_before.png"
cp "$OUT/five_latent/grid.png" "$IMG/hires_latent.png"
cp "$OUT/five_pixel/grid.png" "$IMG/hires_pixel.png"
for d in eight_left eight_right five five_latent five_pixel; do echo "$d: $(cat "$OUT/$d/metrics.json")"; done
