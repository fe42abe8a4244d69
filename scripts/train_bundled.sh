#!/usr/bin/env bash
# Reproduce the bundled small models (checkpoints/*_small_fp16.pt*): pipeline.py's H100 recipe
# (config/pipeline.yml) at the stage minutes the bundled pair was trained with, optionally a fine-tune of
# the tokenizer's decoder (every token stays, so the transformer stays valid), then scripts/bundle.py,
# which checks the pair against the bundled config and writes it as fp16 CPU tensors.
#   bash scripts/train_bundled.sh DATA_ROOT [DEVICE] [BUDGET_MINUTES] [DECODER_MINUTES]
# BUDGET_MINUTES (default 0: the stage minutes as given) scales the trainers' minutes to that sum
# (pipeline.py --budget-minutes). Environment: MINUTES (stage minutes for pipeline.py --minutes; default
# "tokenizer=5.3 transformer=8", the bundled pair's), STEPS (default pipeline,bundle; add decoder for the
# decoder fine-tune, or run a subset, e.g. STEPS=decoder), INIT (the tokenizer the decoder fine-tune starts
# from; default the pipeline's vqgan.pt), DEC_ARGS (train_vqgan.py options appended to the decoder
# fine-tune's, so they win: e.g. "--batch-size 32 --learning-rate 5e-5 --ema 0.998", the CPU fine-tune's).
# The bundled pair came from two H100 calls: session 17's pipeline run (2026-11-27; tokenizer 5.3 min, 6,186
# steps of 128; docs/pipeline_h100_dec1.5x/), no decoder fine-tune (the 2-minute one of that run scored worse on
# the val images, README), and session 18's transformer of 8 min (7,068 steps of 256) on that tokenizer:
# `pipeline.py --tokenizer checkpoints/vqgan_small_fp16.pt --minutes transformer=8` (docs/transformer_h100_8min/;
# the same transformer options as this pipeline run's, so one run at these minutes is the same recipe). The pair before it
# came from --budget-minutes 9.5 of the 2.71M-parameter tokenizer and two decoder fine-tunes
# (docs/pipeline_h100/). On a CPU the trainers stop at the same minutes with far weaker models: use a GPU.
# The files land in OUT_RUNS/bundled (default runs/bundled); copy them into checkpoints/ (or pass --out-dir
# checkpoints to bundle.py) once they have shown on the val images that they are better (README, Model zoo).
set -euo pipefail
DATA=${1:?usage: train_bundled.sh DATA_ROOT [DEVICE] [BUDGET_MINUTES] [DECODER_MINUTES]}
DEVICE=${2:-cuda}
BUDGET=${3:-0}
DEC_MIN=${4:-2.0}
MINUTES=${MINUTES-tokenizer=5.3 transformer=8}
OUT=${OUT_RUNS:-runs}
STEPS=",${STEPS:-pipeline,bundle},"
TOKENIZER=$OUT/pipeline/tokenizer/vqgan.pt  # what is bundled: the pipeline's tokenizer, or its decoder fine-tune
INIT=${INIT:-$TOKENIZER}
if [[ $STEPS == *,pipeline,* ]]; then
  budget=()
  [ "$BUDGET" != 0 ] && budget=(--budget-minutes "$BUDGET")
  # shellcheck disable=SC2086  # MINUTES: several STAGE=M words
  python pipeline.py --recipe config/pipeline.yml --data "$DATA" --out "$OUT/pipeline" --device "$DEVICE" \
    "${budget[@]}" ${MINUTES:+--minutes $MINUTES} --stages tokenizer,tokens,transformer
fi
if [[ $STEPS == *,decoder,* ]]; then
  # shellcheck disable=SC2086  # DEC_ARGS: several options, appended so they replace the ones before
  # no --config: the tokenizer's architecture is the one the --init file stores
  python train_vqgan.py --data "$DATA/train" --val-data "$DATA/val" \
    --init "$INIT" --train-part decoder --out-dir "$OUT/decoder_ft" --batch-size 128 \
    --learning-rate 1e-4 --hflip --ssim-weight 1.0 --disc-start 0 --disc-weight 0.1 --fm-weight 1.0 \
    --time-budget-min "$DEC_MIN" --eval-every 3000 --ckpt-every 100000 --half --device "$DEVICE" --no-progress \
    ${DEC_ARGS:-}
  TOKENIZER=$OUT/decoder_ft/vqgan.pt
fi
if [[ $STEPS == *,bundle,* ]]; then
  python scripts/bundle.py --vqgan "$TOKENIZER" \
    --transformer "$OUT/pipeline/transformer/transformer_best.pth" --out-dir "$OUT/bundled"
fi
