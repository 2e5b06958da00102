#!/usr/bin/env bash
# Rebuild the shipped digit model from nothing (seed 0), as docs/shipped_model.md reports it.
#   bash experiments/shipped_model/rebuild.sh        # in the project's venv (make install)
# Writes data/mnist, runs/digits/* and finally sgm/assets/digits.safetensors.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
SEED=${SEED:-0}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}

# 1. data: 4,500 train digits (captions half words, half numerals), 500 held-out (never trained on)
$PY experiments/shipped_model/prepare_data.py --out data/mnist --seed "$SEED"
# 2. the judge: digit classifier + the held-out feature statistics (sgm/assets)
$PY experiments/shipped_model/train_classifier.py --seed "$SEED"
# 3. the first stage: AutoencoderKL (conf/first_stage/tiny.yaml), 1,500 steps
$PY experiments/shipped_model/train_autoencoder.py --seed "$SEED" --steps 1500 --out runs/digits/autoencoder.safetensors
SCALE=$($PY -c "from safetensors import safe_open; print(safe_open('runs/digits/autoencoder.safetensors', 'pt').metadata()['scale_factor'])")
echo "latent scale factor: $SCALE (conf/model/digits.yaml's scale_factor must be this value)"
# 4. the UNet with our train.py: full training, frozen tiny text encoders, EMA, cached latents
$PY train.py +experiment=digits seed="$SEED" model.scale_factor="$SCALE" hydra.run.dir=runs/digits/unet
cp runs/digits/unet/digits.safetensors sgm/assets/digits.safetensors
echo "wrote sgm/assets/digits.safetensors"
