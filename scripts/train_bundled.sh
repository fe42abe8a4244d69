#!/usr/bin/env bash
# Reproduce the bundled small models (checkpoints/*_small_fp16.pt*): pipeline.py's H100 recipe
# (config/pipeline.yml) at the budget the bundled pair was trained with, a fine-tune of the tokenizer's
# decoder (every token stays, so the transformer stays valid), then scripts/bundle.py, which checks
# the pair against the bundled config and writes it as fp16 CPU tensors.
#   bash scripts/train_bundled.sh DATA_ROOT [DEVICE] [BUDGET_MINUTES] [DECODER_MINUTES]
# Environment: STEPS (default pipeline,decoder,bundle: run a subset, e.g. STEPS=decoder), INIT (the
# tokenizer the decoder fine-tune starts from; default the pipeline's vqgan_fp16.pt), MINUTES (stage
# minutes for pipeline.py --minutes, e.g. "tokenizer=5.5 transformer=2.5"; before the budget's scaling),
# DEC_ARGS (train_vqgan.py options appended to the decoder fine-tune's, so they win: e.g.
# "--batch-size 32 --learning-rate 5e-5 --ema 0.998", the CPU fine-tune's recipe).
# The bundled pair came from `--budget-minutes 9.5` on one H100 (2026-11-27: tokenizer 3.4 min,
# transformer 3.4 min, 7 min 36 s through inpainting; docs/pipeline_h100/) and a 2.1-minute decoder
# fine-tune of that tokenizer (started from its fp16 file). On a CPU the trainers stop
# at the same minutes with far weaker models: use a GPU. The files land in OUT_RUNS/bundled (default
# runs/bundled); copy them into checkpoints/ (or pass --out-dir checkpoints to bundle.py) once they
# have shown on the val images that they are better (README, "Bundling another pair").
set -euo pipefail
DATA=${1:?usage: train_bundled.sh DATA_ROOT [DEVICE] [BUDGET_MINUTES] [DECODER_MINUTES]}
DEVICE=${2:-cuda}
BUDGET=${3:-9.5}
DEC_MIN=${4:-2.1}
OUT=${OUT_RUNS:-runs}
STEPS=",${STEPS:-pipeline,decoder,bundle},"
INIT=${INIT:-$OUT/pipeline/tokenizer/vqgan_fp16.pt}
if [[ $STEPS == *,pipeline,* ]]; then
  # shellcheck disable=SC2086  # MINUTES: several STAGE=M words
  python pipeline.py --recipe config/pipeline.yml --data "$DATA" --out "$OUT/pipeline" --device "$DEVICE" \
    --budget-minutes "$BUDGET" ${MINUTES:+--minutes $MINUTES} --stages tokenizer,tokens,transformer
fi
if [[ $STEPS == *,decoder,* ]]; then
  # shellcheck disable=SC2086  # DEC_ARGS: several options, appended so they replace the ones before
  python train_vqgan.py --data "$DATA/train" --val-data "$DATA/val" --config models/VQGAN/config/VQGAN_small.yml \
    --init "$INIT" --train-part decoder --out-dir "$OUT/decoder_ft" --batch-size 128 \
    --learning-rate 1e-4 --hflip --ssim-weight 1.0 --disc-start 0 --disc-weight 0.1 --fm-weight 1.0 \
    --time-budget-min "$DEC_MIN" --eval-every 3000 --ckpt-every 100000 --half --device "$DEVICE" --no-progress \
    ${DEC_ARGS:-}
fi
if [[ $STEPS == *,bundle,* ]]; then
  python scripts/bundle.py --vqgan "$OUT/decoder_ft/vqgan.pt" \
    --transformer "$OUT/pipeline/transformer/transformer_best.pth" --out-dir "$OUT/bundled"
fi
