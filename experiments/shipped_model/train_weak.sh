#!/usr/bin/env bash
# The weak model of autoguidance (docs/autoguidance.md): the shipped digit UNet's recipe at half
# width (model_channels 32) and a quarter of the training (1,500 of 6,000 steps), trained with the
# shipped model's own frozen text encoders and autoencoder, so that it reads the same
# conditioning and latents. Writes sgm/assets/digits_weak.safetensors (the weak UNet alone).
#   bash experiments/shipped_model/train_weak.sh [train.py overrides, e.g. cpu_threads=1]   # in the project's venv
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
SEED=${SEED:-0}
STEPS=${STEPS:-1500}
WIDTH=${WIDTH:-32}
OUT=${OUT:-sgm/assets/digits_weak.safetensors}
RUN=${RUN:-runs/digits_weak}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}

[ -d data/mnist/train ] || $PY experiments/shipped_model/prepare_data.py --out data/mnist --seed "$SEED"
MODEL=("+experiment=digits" "seed=$SEED" "model.network.model_channels=$WIDTH" "model.first_stage.ckpt_path=null")

# 1. the starting point: a seeded random UNet of the weak width beside the shipped model's text
#    encoders and autoencoder (train.py builds the text encoders from the seed, and the random
#    stream depends on the UNet's size, so they would otherwise differ from the shipped ones)
$PY - "$RUN/init.safetensors" "$SEED" "${MODEL[@]}" <<'EOF'
import sys

from safetensors import safe_open

import sgm
from sgm.checkpoint import save_checkpoint
from sgm.tasks.common import build_engine, compose

out, seed, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = compose("train", overrides)
engine = build_engine(cfg.model, {"random": True}, seed=seed)
state = engine.state_dict()
with safe_open(sgm.asset("digits.safetensors"), "pt") as f:
    for key in f.keys():
        if key.startswith(("conditioner.", "first_stage_model.")):
            state[key] = f.get_tensor(key).float()
save_checkpoint(state, out)
print(f"wrote {out}: random UNet of width {cfg.model.network.model_channels}, shipped text encoders and autoencoder")
EOF

# 2. the UNet with train.py: the shipped recipe (conf/experiment/digits.yaml), fewer steps
#    (validation.prompts: the experiment's ${model.default_prompts} no longer exists; the model's prompts)
$PY train.py "${MODEL[@]}" weights.checkpoint="$RUN/init.safetensors" weights.random=false \
  trainer.max_steps="$STEPS" data.cache_dir="$RUN/cache" output_name=weak_full.safetensors \
  validation.sample_every_n_steps=0 'validation.prompts=${prompts}' hydra.run.dir="$RUN/unet" "$@"

# 3. keep the UNet alone (float16, as trained with EMA), with the recipe in the metadata
$PY - "$RUN/unet/weak_full.safetensors" "$OUT" "$STEPS" "$WIDTH" <<'EOF'
import sys

from safetensors import safe_open

from sgm.checkpoint import save_checkpoint

src, out, steps, width = sys.argv[1:]
with safe_open(src, "pt") as f:
    unet = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
    meta = dict(f.metadata() or {})
meta["autoguidance_weak"] = f"the shipped digit UNet recipe at model_channels={width}, {steps} steps"
save_checkpoint(unet, out, dtype="float16", metadata=meta)
print(f"wrote {out}: {sum(v.numel() for v in unet.values())} UNet parameters")
EOF
