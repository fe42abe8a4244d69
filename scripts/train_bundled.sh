#!/usr/bin/env bash
# Reproduce the bundled small models (checkpoints/*_small_fp16.pt*).
#   bash scripts/train_bundled.sh DATA_ROOT [DEVICE] [VQ_MINUTES] [T_MINUTES]
# DATA_ROOT is a lab dataset (lab3_dataset layout). The bundled files were made on one H100
# with the defaults below; on a CPU pass DEVICE=cpu and larger budgets.
set -euo pipefail
DATA=${1:?usage: train_bundled.sh DATA_ROOT [DEVICE] [VQ_MINUTES] [T_MINUTES]}
DEVICE=${2:-cuda}
VQ_MIN=${3:-3.5}
T_MIN=${4:-4.5}
OUT=${OUT_RUNS:-runs}
python train_vqgan.py --data "$DATA/train" --val-data "$DATA/val" --config models/VQGAN/config/VQGAN_small.yml \
  --out-dir "$OUT/vqgan_small" --batch-size 128 --learning-rate 4e-4 --hflip --time-budget-min "$VQ_MIN" \
  --disc-start-frac 0.6 --disc-weight 0.1 --eval-every 2000 --ckpt-every 2000 --half --device "$DEVICE" --no-progress
python training_transformer.py --train_d_path "$DATA/train" --val_d_path "$DATA/val" \
  --MaskGitConfig config/MaskGit_small.yml --vqgan-ckpt "$OUT/vqgan_small/vqgan.pt" --out_d_path "$OUT/transformer_small" \
  --cache-dir "$OUT/cache" --batch-size 256 --learning-rate 1e-3 --warmup-steps 300 --hflip \
  --time-budget-min "$T_MIN" --device "$DEVICE" --no-progress
python - "$OUT" <<'PY'
import sys
import torch
from utils.checkpoint import half_state_dict  # keeps the stored config (utils.checkpoint.lab_state_dict)
out = sys.argv[1]
sd = torch.load(f"{out}/transformer_small/transformer_best.pth", map_location="cpu", weights_only=True)
torch.save(half_state_dict(sd), f"{out}/transformer_small/transformer_small_fp16.pth")
PY
