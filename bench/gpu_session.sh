#!/usr/bin/env bash
# The GPU checks of issues #14 and #13, prepared so that a session lent a GPU spends its device
# minutes measuring, not writing scripts. Each part fits one device call (<= 10 minutes):
#
#   bash bench/gpu_session.sh speed  OUT     # #14: CUDA tests, training / decoding / FID speed (~6 min)
#   bash bench/gpu_session.sh abl    OUT     # #13: the stage-1 ablation at GPU scale (resumable per variant)
#   bash bench/gpu_session.sh pipe   OUT M   # #13: pipeline.py with --budget-minutes M (default 8)
#
# OUT collects logs and CSVs (the device tool's $OUT). Every figure comes with its baseline from
# the same run (the benchmark scripts time before/after side by side).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: gpu_session.sh speed|abl|pipe OUT [MINUTES]}
OUT=${2:?usage: gpu_session.sh speed|abl|pipe OUT [MINUTES]}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
run() {  # run NAME CMD...: time one step, keep its log, go on after a failure
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/session.log"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/session.log"
  tail -n 25 "$OUT/$name.log"
}
case "$PART" in
  speed)
    run gpu_tests python -m pytest -q -m gpu tests
    run train_b256 python bench/train_throughput.py --config config/MaskGit.yml --device cuda --batch-size 256 \
      --compile --fused-attn --no-naive --csv "$OUT/train_b256.csv"
    run train_b512 python bench/train_throughput.py --config config/MaskGit.yml --device cuda --batch-size 512 \
      --compile --no-naive --csv "$OUT/train_b512.csv"
    run decode python bench/decode_throughput.py --config config/MaskGit.yml --device cuda --csv "$OUT/decode.csv"
    run fid python bench/fid_speed.py --device cuda --csv "$OUT/fid.csv"
    ;;
  abl)  # ~2 min per variant on an H100 (2,000 steps of batch 128 + scoring); rerun to finish the rest
    run ablation timeout 540 python bench/stage1_ablation.py --scale h100 --device cuda --out "$OUT/ablation"
    find "$OUT/ablation" -name "*.pt" -delete  # keep results.json / results.md and the grids
    ;;
  pipe)
    run pipeline python pipeline.py --out "$OUT/pipeline" --device cuda --budget-minutes "${3:-8}"
    cp "$OUT/pipeline/summary.md" "$OUT/summary.md" 2>/dev/null
    rm -rf "$OUT/pipeline/tokens" "$OUT/pipeline/inpaint"  # large; the figures are in summary.*
    ;;
  *) echo "unknown part $PART (speed | abl | pipe)" >&2; exit 2 ;;
esac
