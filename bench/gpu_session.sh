#!/usr/bin/env bash
# The GPU checks of issues #14 and #13, prepared so that a session lent a GPU spends its device
# minutes measuring, not writing scripts. Each device part fits one device call (<= 10 minutes).
#
# A session's device time is 15 minutes, the machine's start and the transfers included (~1.5-2 min per call),
# and no machine starts with under 4 left: so ONE call of <= 600 s. A new tokenizer alone cannot be bundled (every
# token changes, so its transformer must be retrained in the same call). The next call (session 26's plan, a whole new
# pair; first since session 32, README › The whole pipeline › The next H100 call says why):
#   TOKENIZER_ARGS="config=models/VQGAN/config/VQGAN_small_wide.yml ssim_weight=3.0" \
#     MINUTES="tokenizer=5.5 transformer=2.6" bash bench/gpu_session.sh pipe $OUT 0
# (8.1 trainer minutes + ~30 s of start-up, token cache and inpainting inside pipe's 560-s timeout; the wide
# tokenizer at ~1,700 images/s by a FLOP estimate from session 17's two speeds, so ~4,400 steps of 128), then here
# `score` and bench/run.py --sets val-unseen on the pair (below); bundle only if it beats the bundled pair there.
# The decoder call after it (session 27's plan, second since session 32's CPU run of its recipe on the bundled
# tokenizer lost 3.8 FID for +0.19 dB): a decoder trained on the bundled tokenizer's frozen tokens keeps the bundled
# transformer valid:
#   bash bench/gpu_session.sh decft $OUT          # the bundled decoder trained on for 8.5 min, snapshots at 30/60/80%
# then here `score-decft FILES` (each tokenizer's floor on the unseen val images) and bench/run.py --sets val-unseen
# --combos cosine:10 --vqgan-ckpt on the best; bundle only if it beats the bundled tokenizer there.
#
# Here, before the first device call (once per machine; .devdata is ignored by git):
#   bash bench/gpu_session.sh pack                 # .devdata: the lab data as one .xz (30 MB), the pytorch-fid wheel
# On the device (the device tool's `run`, carry [".devdata"], timeout_s 600):
#   bash bench/gpu_session.sh speed  $OUT          # #14: CUDA tests, training / decoding / FID speed, every
#                                                  # variant at batch 256 and 512 (~8 min by estimate)
#   bash bench/gpu_session.sh pipe   $OUT [M]      # #13: pipeline.py --budget-minutes M (default 10: trainers 3.6 min each), up to inpainting;
#                                                  # M 0 with MINUTES="tokenizer=5.5 transformer=2.5": those minutes exactly;
#                                                  # TOKENIZER_SET="dec_channels=[64,128,256]": the tokenizer's config
#                                                  # overridden so (pipeline.py --arg tokenizer.set=...);
#                                                  # MINUTES="... decoder=2": the decoder stage too (its vqgan.pt
#                                                  # comes back as vqgan_decoder.pt; score then scores with it)
#   bash bench/gpu_session.sh tok    $OUT [M]      # #13: the tokenizer stage alone for M minutes (default 8.5; TOKENIZER_SET
#                                                  # as for pipe; TOKENIZER_ARGS="learning_rate=8e-4": its options too);
#                                                  # its vqgan.pt comes back for score-tok, then for trans. (The next call
#                                                  # is one pipe call, above; this one's recipe goes into it.) Recipe (sessions
#                                                  # 19-22's CPU ablation, two seeds each, -6.9 FID against the 2x decoder
#                                                  # alone; the recipe's learning rate, 8e-4 cost the 2x decoder 10.8 FID):
#                                                  # TOKENIZER_ARGS="config=models/VQGAN/config/VQGAN_small_wide.yml ssim_weight=3.0"
#                                                  # (encoder 48/96/192, decoder 64/128/256, 8.28 M; checked on the CPU
#                                                  # in session 23 with steps=2 batch_size=4 half=false added: tok, score-tok,
#                                                  # and trans with the smoke recipe)
#                                                  # (session 23: SSIM 2.0 -3.3 FID on two seeds; the GAN from 40% or 80% worse;
#                                                  # session 24: SSIM 3.0 and LeCam 0.1 on top of 2.0 not better, seed 0;
#                                                  # session 25: SSIM 3.0 -1.4 FID against 2.0 on two seeds, 4.0 worse than
#                                                  # 3.0 on both; weight EMA, R1, feature matching 2.0 not better; 2.0 is the
#                                                  # fallback if 3.0 loses at this scale; session 26: the l2 lookup and codes of
#                                                  # half the dimension worse)
#   bash bench/gpu_session.sh trans  $OUT [M]      # #13: the transformer alone for M minutes (default 8) on a trained
#                                                  # tokenizer (pipeline.py --tokenizer; TOKENIZER=FILE, default the
#                                                  # bundled one), and the test images inpainted (~9.5 min);
#                                                  # TRANSFORMER_SET="model_param.Transformer_param.dim=320 ..." and
#                                                  # TRANSFORMER_ARGS="warmup_steps=500": the transformer's config and options
#   bash bench/gpu_session.sh decft  $OUT [M]      # #13: the bundled tokenizer's decoder trained on for M minutes (default
#                                                  # 8.5) on its frozen tokens (SSIM 3.0, GAN + feature matching from 60%,
#                                                  # lr 4e-4; pipeline.py's decoder stage), snapshots at 30/60/80% back
#                                                  # in fp16 with the end, vqgan_decoder.pt (~45 MB)
#   bash bench/gpu_session.sh dec    $OUT [M]      # #13: decoder fine-tune of M minutes (default 2) of the pipe call's
#                                                  # tokenizer if this machine still has it, else of .devdata/vqgan_init.pt
#                                                  # (copy a returned vqgan.pt there to carry it), else of the bundled one
#   bash bench/gpu_session.sh speed-abl $OUT [S] [V,V] # one call of S seconds (560): #14's main figures (fewer
#                                                  # compiled variants), batch 512 eager, then the ablation
#                                                  # of these variants in the time left
#   bash bench/gpu_session.sh abl    $OUT [V,V]    # #13: the stage-1 ablation at GPU scale, these variants (~2 min
#                                                  # each; default the 3 of ABL_DEFAULT), PSNR there, the
#                                                  # reconstructions of the 1,118 unseen val images sent back
# Measured in session 10 (H100): CUDA tests 16 s, b256 training (3 variants, 2 compiled) 66 s, decoding
# 40 s, FID 13 s; a stage-1 ablation variant 75-90 s of training + ~15 s of reconstruction; the device
# start and the transfers ~50 s; that speed-abl call (3 variants) 437 s.
# Here again, with the call's files (its files_at folder):
#   bash bench/gpu_session.sh score  FILES [DIR]   # the pipeline's FID stage on this CPU -> DIR/pipeline/summary.md
#       then, to decide on bundling on the lab's val data (the test set is a report): python bench/run.py
#       --sets val-unseen --combos cosine:10 --skip-speed --only-ours --transformer-ckpt FILES/transformer_fp16.pth
#       --vqgan-ckpt FILES/vqgan.pt --out runs/candidate   (~10 min here; the bundled pair: README's val table)
#       and, if it is better there: python scripts/bundle.py --vqgan FILES/vqgan.pt --transformer FILES/transformer_fp16.pth
#   bash bench/gpu_session.sh score-tok FILES [DIR] # a tok call's tokenizer scored alone on this CPU: reconstruction
#       FID and PSNR on the 1,118 unseen val images (to decide on; the bundled tokenizer's FID: 18.12) and the 570
#       test originals (a report) -> DIR/tok/quality.csv; then, to train its transformer, copy FILES/vqgan.pt to
#       .devdata/vqgan_tok.pt and, on the device: TOKENIZER=.devdata/vqgan_tok.pt bash bench/gpu_session.sh trans $OUT 8
#       (its config travels in the file). To bundle a tokenizer of another YAML (e.g. VQGAN_small_wide.yml), first
#       point config/MaskGit_small.yml's VQ_config_path and config/pipeline.yml's tokenizer config at that YAML:
#       scripts/bundle.py checks both files against the bundled configs
#   bash bench/gpu_session.sh score-decft FILES [DIR] # a decft call's snapshots and end scored alone on this CPU (~5 min
#       each): reconstruction FID and PSNR on the 1,118 unseen val images -> DIR/decft/NAME/quality.csv; the bundled
#       tokenizer's: 18.12 / 27.45 dB. Then the best: python bench/run.py --sets val-unseen --combos cosine:10 --skip-speed
#       --only-ours --vqgan-ckpt FILE (the bundled transformer; ~25 min), and to bundle (the same YAML, the same
#       transformer): python scripts/bundle.py --vqgan FILE --transformer checkpoints/transformer_small_fp16.pth
#   bash bench/gpu_session.sh score-abl FILES [DIR] # the ablation's FIDs on this CPU -> DIR/ablation/results.md
#
# Why the detours. The device gets the repository and the carried paths only (never ../shared), at
# most 64 MiB in all: the lab's data is 55 MB of files, the bundled checkpoints 20 MB, and the FID
# Inception weights (87 MB; not installed there, nor pytorch-fid) cannot travel beside the data. So
# the data travels as one .xz (30 MB: the JPEG headers of 15,000 images compress away) and is unpacked
# into ../shared/data there, so every script finds it where it does here; the device trains and
# inpaints, and the FIDs of the #13 chain are computed here from the images it sends back (exact,
# a few CPU minutes). The FID *timing* of #14 does not depend on the weights' values: there it runs
# an Inception with random weights (its FID values are meaningless and marked so).
# The device tool brings back at most 8 files (16 MiB each, 64 MiB together, 2 folders down), so
# the work happens in WORK (default /tmp/gpu_session) and OUT receives, whatever happened:
# session.log (each step's command, exit status, time, output tail), results.tgz (CSVs, logs,
# summaries, grids, report pictures: everything but checkpoints and image folders), and from a
# pipeline run vqgan.pt (fp32), transformer_fp16.pth (the bundled files' format) and the inpainted
# images (images_lab.tgz, images_composited.tgz) that `score` needs; from an ablation run each
# variant's reconstructions of the held-out images (recon_VARIANT.tgz; 1,118 unseen val images by default) that `score-abl` needs.
# DEVICE=cpu RECIPE=config/pipeline_smoke.yml ... pipe $OUT 0 runs the pipe part on a CPU (0: the
# recipe's own steps), to check this script.
set -uo pipefail
# run at H100 scale in session 10: base, ema_codebook_ssim1, ema_codebook_ssim1_gan_fm (the recipe; README).
# Next (sessions 15-16, CPU ablation, README): the recipe beside the 1.5x decoder, without and with 4-channel norm groups
ABL_DEFAULT=ema_codebook_ssim1_gan_fm,recipe_dec1.5x,recipe_dec1.5x_gn4
cd "$(dirname "$0")/.."
USAGE="usage: gpu_session.sh pack | speed|pipe|tok|trans|decft|dec|speed-abl|abl OUT [MINUTES|SECONDS|VARIANTS] | score|score-tok|score-decft|score-abl FILES [DIR]"
PART=${1:?$USAGE}
RECIPE=${RECIPE:-config/pipeline.yml}
PACK=.devdata/lab3_data.tar.xz
PART_BYTES=${PART_BYTES:-15000000}
fetched() {  # fetched FILES DIR NAME: FILES/NAME, or DIR/NAME joined from FILES/NAME.part_* (what pack() split)
  if [ -f "$1/$3" ] || [ ! -f "$1/$3.part_aa" ]; then echo "$1/$3"; return; fi
  cat "$1/$3".part_* >"$2/$3" && echo "$2/$3"
}

case "$PART" in
  pack)
    mkdir -p .devdata/whl
    python -m pip download -q --no-deps --only-binary=:all: -d .devdata/whl pytorch-fid==0.3.0 || exit
    tar -cf - -C ../shared/data lab3_dataset lab3_test_gt lab3_test_gt_mapping.csv | xz -9e -T2 >"$PACK.tmp" \
      && mv "$PACK.tmp" "$PACK" && ls -l "$PACK" .devdata/whl
    exit ;;
  score)
    FILES=${2:?$USAGE}; DIR=${3:-runs/gpu_session}
    mkdir -p "$DIR"
    for f in results images_lab images_composited; do tar -xzf "$(fetched "$FILES" "$DIR" "$f.tgz")" -C "$DIR" || exit; done
    cp "$(fetched "$FILES" "$DIR" vqgan.pt)" "$DIR/pipeline/tokenizer/vqgan.pt" || exit
    DEC=$(fetched "$FILES" "$DIR" vqgan_decoder.pt)  # the decoder stage's, when the call ran one (fid then uses it)
    if [ -f "$DEC" ]; then cp "$DEC" "$DIR/pipeline/decoder/vqgan.pt" || exit; fi
    python pipeline.py --recipe "$RECIPE" --out "$DIR/pipeline" --stages fid --device "${DEVICE:-auto}" || exit
    cat "$DIR/pipeline/summary.md"
    exit ;;
  score-tok)  # SCORE_ARGS: more bench/run.py options (e.g. "--n 48" for a quick look)
    FILES=${2:?$USAGE}; DIR=${3:-runs/gpu_session}
    mkdir -p "$DIR"
    VQ=$(fetched "$FILES" "$DIR" vqgan.pt) || exit
    # shellcheck disable=SC2086
    python bench/run.py --sets val-unseen,test --combos none --only-ours --skip-speed --vqgan-ckpt "$VQ" \
      --device "${DEVICE:-auto}" --out "$DIR/tok" ${SCORE_ARGS:-} || exit
    exit ;;
  score-decft)  # a decft call's tokenizers (its snapshots and its end) scored alone on this CPU: reconstruction FID and
                # PSNR on the 1,118 unseen val images (the bundled tokenizer's: 18.12 / 27.45 dB), ~5 min each -> DIR/decft/
    FILES=${2:?$USAGE}; DIR=${3:-runs/gpu_session}
    mkdir -p "$DIR/decft"
    for f in "$FILES"/vqgan_step*.pt "$(fetched "$FILES" "$DIR" vqgan_decoder.pt)"; do
      [ -f "$f" ] || continue
      name=$(basename "${f%.pt}")
      # shellcheck disable=SC2086
      python bench/run.py --sets val-unseen --combos none --only-ours --skip-speed --vqgan-ckpt "$f" \
        --device "${DEVICE:-auto}" --out "$DIR/decft/$name" ${SCORE_ARGS:-} >"$DIR/decft/$name.log" 2>&1 \
        || { tail -3 "$DIR/decft/$name.log"; exit 1; }
      echo "== $name"; cat "$DIR/decft/$name/quality.csv"
    done
    exit ;;
  score-abl)
    FILES=${2:?$USAGE}; DIR=${3:-runs/gpu_session}
    mkdir -p "$DIR"
    for f in "$FILES"/results.tgz "$FILES"/recon_*.tgz "$FILES"/recon_*.tgz.part_aa; do
      [ -f "$f" ] || continue
      tar -xzf "$(fetched "$FILES" "$DIR" "$(basename "${f%.part_aa}")")" -C "$DIR" || exit
    done
    # shellcheck disable=SC2086
    python bench/stage1_ablation.py ${ABL_ARGS:---scale h100} --out "$DIR/ablation" --rescore --device "${DEVICE:-cpu}" \
      || exit
    cat "$DIR/ablation/results.md"
    exit ;;
esac

OUT=${2:?$USAGE}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/gpu_session}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
if [ ! -d ../shared/data/lab3_dataset ]; then  # on the device: the data came as $PACK
  [ -f "$PACK" ] || { echo "no ../shared/data/lab3_dataset and no $PACK: run 'bash bench/gpu_session.sh pack' here and carry .devdata" >&2; exit 2; }
  mkdir -p ../shared/data && tar -xJf "$PACK" -C ../shared/data || { echo "cannot unpack $PACK into ../shared/data" >&2; exit 2; }
fi
if ! python -c "import pytorch_fid" 2>/dev/null; then  # the FID Inception's architecture
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devdata/whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
FID_WEIGHTS=1  # real FID Inception weights here? (on the device: no)
python -c "from utils.inception import find_weights; find_weights()" >/dev/null 2>&1 || FID_WEIGHTS=0

pack() {  # what comes back
  cp "$WORK/session.log" "$OUT/session.log" 2>/dev/null
  local run="$WORK/pipeline"
  cp "$WORK/decoder_ft/vqgan.pt" "$OUT/vqgan_decoder_ft.pt" 2>/dev/null
  # the transformer in fp16 (the bundled files' format); the tokenizer in fp32, unless its fp32 file is over
  # VQ_FP32_MAX bytes (20 MB): the wide tokenizer's 33 MB beside the transformer and the images would pass the
  # device tool's 64 MiB, so it comes back in fp16 under the same name (every loader takes either); decft's
  # snapshots (the pipeline's decoder/vqgan_step*.pt) in fp16; the pipeline's decoder stage's tokenizer, when it
  # ran, the same way as the tokenizer's, as vqgan_decoder.pt; the tokenizer not at all with SEND_TOKENIZER=0
  local tok="$run/tokenizer/vqgan.pt"
  [ "${SEND_TOKENIZER:-1}" = 0 ] && tok=""
  python - "$run/transformer/transformer_best.pth" "$OUT/transformer_fp16.pth" "${VQ_FP32_MAX:-20000000}" \
    "$run/decoder" "$OUT" "$tok" "$OUT/vqgan.pt" "$run/decoder/vqgan.pt" "$OUT/vqgan_decoder.pt" <<'PY'
import glob, os, shutil, sys
import torch
from utils.checkpoint import half_state_dict
trans, trans_out, vq_max, snap_dir, out, *tokenizers = sys.argv[1:]
def save_half(src, dst):
    torch.save(half_state_dict(torch.load(src, map_location="cpu", weights_only=True)), dst)
if os.path.isfile(trans):
    save_half(trans, trans_out)
for vq, vq_out in zip(tokenizers[::2], tokenizers[1::2]):
    if os.path.isfile(vq) and os.path.getsize(vq) <= int(vq_max):
        shutil.copyfile(vq, vq_out)
    elif os.path.isfile(vq):
        save_half(vq, vq_out)
        print(f"{vq}: {os.path.getsize(vq)} bytes in fp32, sent back in fp16 ({os.path.getsize(vq_out)} bytes)")
for snap in sorted(glob.glob(os.path.join(snap_dir, "vqgan_step*.pt"))):
    save_half(snap, os.path.join(out, os.path.basename(snap)))
PY
  for rec in "$WORK"/ablation/*/recon; do
    [ -d "$rec" ] && tar -czf "$OUT/recon_$(basename "$(dirname "$rec")").tgz" -C "$WORK" "${rec#"$WORK"/}"
  done
  for kind in lab composited; do
    [ -d "$run/inpaint/$kind/test_results" ] && tar -czf "$OUT/images_$kind.tgz" -C "$WORK" "pipeline/inpaint/$kind/test_results"
  done
  tar -czf "$OUT/results.tgz" -C "$WORK" --exclude='*.pt' --exclude='*.pth' --exclude='pipeline/tokens/cache' \
    --exclude='fid_cache' --exclude='*/test_results' --exclude='*/imga' --exclude='*/mask_scheduling' --exclude='ablation/*/recon' .
  # a file over the device tool's 16 MiB (the 1.5x decoder's fp32 vqgan.pt is 17.8 MB) comes back in parts:
  # F.part_aa, F.part_ab, ... (`score` joins them; by hand: cat F.part_* >F)
  for f in "$OUT"/*; do
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt "$PART_BYTES" ]; then
      split -b "$PART_BYTES" "$f" "$f.part_" && rm "$f"
    fi
  done
  ls -l "$OUT"
}
trap pack EXIT

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv; } | tee "$WORK/gpu.txt"
run() {  # run NAME CMD...: time one step, keep its log, go on after a failure
  local name=$1; shift
  echo "== $name: $*" | tee -a "$WORK/session.log"
  local t0=$SECONDS
  "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc in $((SECONDS - t0)) s" | tee -a "$WORK/session.log"
  # the tail without progress bars (a recipe may not set no_progress): carriage returns split, bar lines,
  # cursor escapes and the blanks a cleared bar leaves dropped
  tr '\r' '\n' <"$WORK/$name.log" | sed 's/\x1b\[[0-9;]*[A-Za-z]//g; s/^ \{10,\}\[/[/; s/^ *$//' | grep -av -e '[0-9]%|' -e '^$' \
    | tail -n 25 | tee -a "$WORK/session.log"
}
fid_time() {  # fid_time TIMEOUT_S
  local env=()
  if [ "$FID_WEIGHTS" = 0 ]; then  # timing only: an Inception of random weights, same work per image
    python -c "import torch; from utils.inception import _architecture; torch.save(_architecture().state_dict(), '$WORK/random_inception.pth')"
    echo "FID timing with RANDOM Inception weights (no real ones on this machine): the seconds hold, the FID values do not" | tee -a "$WORK/session.log"
    env=(FID_INCEPTION_WEIGHTS="$WORK/random_inception.pth" MASKGIT_CACHE="$WORK/fid_cache")
  fi
  run fid env "${env[@]}" timeout "$1" python bench/fid_speed.py --device "$DEVICE" --csv "$WORK/fid.csv"
}
TRAIN_FULL=(--compile --fused-attn --recompute-attn)  # every training variant (6, 3 compiled)
DECODE_FULL=(--fused-attn --compile --breakdown)      # every decoding variant (2 compiled)
speed_steps() {  # speed_steps TESTS_S TRAIN_S DECODE_S FID_S [quick]: #14's figures, each step with its timeout
  local train=("${TRAIN_FULL[@]}") decode=("${DECODE_FULL[@]}")
  [ "${5:-}" = quick ] && train=(--compile --fused-attn) && decode=(--fused-attn --breakdown)
  run gpu_tests timeout "$1" python -m pytest -q -m gpu tests
  run train_b256 timeout "$2" python bench/train_throughput.py --config config/MaskGit.yml --device "$DEVICE" \
    --batch-size 256 "${train[@]}" --no-naive --csv "$WORK/train_b256.csv"
  run decode timeout "$3" python bench/decode_throughput.py --config config/MaskGit.yml --device "$DEVICE" \
    "${decode[@]}" --csv "$WORK/decode.csv"
  fid_time "$4"
}
pipeline() {  # pipeline BUDGET_MINUTES (0: the recipe's own) [TIMEOUT_S]; TOKENIZER=FILE: pipeline.py --tokenizer FILE
  local budget=() stages=${STAGES:-tokenizer,tokens,transformer,decoder,inpaint} given=()
  # a stage's config overrides added to its `set` (TOKENIZER_SET="dec_channels=[64,128,256]", TRANSFORMER_SET=
  # "model_param.Transformer_param.dim=320") and options to its args (TOKENIZER_ARGS="learning_rate=8e-4",
  # TRANSFORMER_ARGS="warmup_steps=500"; DECODER_SET, DECODER_ARGS alike; values read as YAML), each several KEY=VALUE
  # words: pipeline.py --arg
  local recipe_args=() words word stage kind var
  for stage in tokenizer transformer decoder; do
    for kind in SET ARGS; do
      var=${stage^^}_$kind
      read -ra words <<<"${!var:-}"
      for word in "${words[@]}"; do
        if [ "$kind" = SET ]; then recipe_args+=("$stage.set=$word"); else recipe_args+=("$stage.$word"); fi
      done
    done
  done
  if [ ${#recipe_args[@]} -gt 0 ]; then
    echo "recipe: $RECIPE with --arg ${recipe_args[*]}" | tee -a "$WORK/session.log"
    recipe_args=(--arg "${recipe_args[@]}")
  fi
  [ "$1" != 0 ] && budget=(--budget-minutes "$1")
  [ -n "${TOKENIZER:-}" ] && given=(--tokenizer "$TOKENIZER")
  [ "$FID_WEIGHTS" = 1 ] && [ -z "${STAGES:-}" ] && stages=$stages,fid
  # shellcheck disable=SC2086  # MINUTES: several STAGE=M words
  run pipeline timeout "${2:-560}" python pipeline.py --recipe "$RECIPE" --out "$WORK/pipeline" --device "$DEVICE" \
    --stages "$stages" "${budget[@]}" "${given[@]}" "${recipe_args[@]}" ${MINUTES:+--minutes $MINUTES}
  cat "$WORK/pipeline/summary.md" >>"$WORK/session.log" 2>/dev/null
}
case "$PART" in
  speed)  # the call's own 600-s limit bounds each step
    speed_steps 600 600 600 300
    run train_b512 python bench/train_throughput.py --config config/MaskGit.yml --device "$DEVICE" --batch-size 512 \
      "${TRAIN_FULL[@]}" --no-naive --csv "$WORK/train_b512.csv"
    ;;
  pipe)
    pipeline "${3:-10}"  # ~8.7 min by estimate; the timeout leaves 40 s of the 600 for packing
    ;;
  decft)  # #13, session 27's plan, now second: the bundled tokenizer's own decoder trained on for M minutes (default
          # 8.5) on its frozen tokens with the stage-1 ablation's loss (SSIM 3.0; the GAN and its feature matching from 60%
          # of the run, as the tokenizer stage's), the recipe's step size; snapshots at 30, 60 (the GAN's start) and 80% beside
          # the end come back for `score-decft`. Every token kept, so the bundled transformer (8 minutes) stays valid.
          # It is pipeline.py's decoder stage on the bundled tokenizer (--tokenizer), with the recipe's decoder args; DECFT_ARGS:
          # more of them as KEY=VALUE words. Checked on the CPU: DEVICE=cpu WORK=/tmp/w1 DECFT_ARGS="steps=10 batch_size=4
          # limit=64 warmup_steps=1" bash bench/gpu_session.sh decft /tmp/o1 0   (0: no time budget, DECFT_ARGS' steps)
    SEND_TOKENIZER=0  # its copy of the bundled tokenizer stays there (the 8 files back: 7 without it)
    TOKENIZER=${DECFT_INIT:-checkpoints/vqgan_small_fp16.pt} STAGES=tokenizer,decoder MINUTES="decoder=${3:-8.5}" \
      DECODER_ARGS="snapshot_at=0.3,0.6,0.8 ${DECFT_ARGS:-}" pipeline 0
    ;;
  dec)  # the decoder fine-tune of scripts/train_bundled.sh (every token kept, so the transformer stays valid)
    INIT=$WORK/pipeline/tokenizer/vqgan.pt
    [ -f "$INIT" ] || INIT=.devdata/vqgan_init.pt
    [ -f "$INIT" ] || INIT=checkpoints/vqgan_small_fp16.pt
    # the pipe call's tokenizer overrides hold for its decoder too (e.g. TOKENIZER_SET="dec_channels=[48,96,192]")
    echo "decoder fine-tune of $INIT" | tee -a "$WORK/session.log"
    run decoder_ft timeout 560 env OUT_RUNS="$WORK" STEPS=decoder INIT="$INIT" \
      DEC_ARGS="${DEC_ARGS:-}${TOKENIZER_SET:+ --set $TOKENIZER_SET}" bash scripts/train_bundled.sh \
      ../shared/data/lab3_dataset "$DEVICE" 0 "${3:-2}"
    ;;
  speed-abl)  # one call of S seconds (default 560): #14's figures incl. batch 512, then the ablation in the time left
    T0=$SECONDS; LIMIT=${3:-560}
    speed_steps 150 150 75 45 quick
    run train_b512 timeout 120 python bench/train_throughput.py --config config/MaskGit.yml --device "$DEVICE" \
      --batch-size 512 --fused-attn --recompute-attn --no-naive --csv "$WORK/train_b512.csv"
    LEFT=$((LIMIT - (SECONDS - T0) - 40))  # 40 s for packing the reconstructions
    if [ "$LEFT" -lt 120 ]; then echo "only $LEFT s left: ablation not started" | tee -a "$WORK/session.log"; exit 0; fi
    # shellcheck disable=SC2086
    run ablation timeout "$LEFT" python bench/stage1_ablation.py ${ABL_ARGS:---scale h100} --device "$DEVICE" \
      --out "$WORK/ablation" --variants "${4:-$ABL_DEFAULT}"
    cat "$WORK/ablation/results.md" >>"$WORK/session.log" 2>/dev/null
    ;;
  tok)  # #13: the tokenizer stage alone, M minutes of training (0: the recipe's own steps); ~25 s more for start-up
        # and its final evaluation, so 8.5 fits the 560-s timeout. Checked on the CPU:
        # DEVICE=cpu RECIPE=config/pipeline_smoke.yml WORK=/tmp/w1 bash bench/gpu_session.sh tok /tmp/o1 0
    [ "${3:-8.5}" != 0 ] && MINUTES="tokenizer=${3:-8.5}"
    STAGES=tokenizer pipeline 0
    ;;
  trans)  # #13: the transformer alone, M minutes (default 8), on a trained tokenizer (TOKENIZER, default the bundled
          # one; its copy comes back as vqgan.pt), then the 747 test images inpainted twice (lab, --paste-known).
          # Checked on the CPU with the smoke recipe and a tokenizer trained by it (WORK: a folder per call):
          # DEVICE=cpu RECIPE=config/pipeline_smoke.yml WORK=/tmp/w1 bash bench/gpu_session.sh pipe /tmp/o1 0, then
          # DEVICE=cpu RECIPE=config/pipeline_smoke.yml WORK=/tmp/w2 TOKENIZER=/tmp/w1/pipeline/tokenizer/vqgan.pt ... trans /tmp/o2 0
          # (0: no time budget, the smoke recipe's epochs)
          # Scored back here: `score` (the test FIDs), and to decide on bundling, python bench/run.py --sets val-unseen
          # --combos cosine:10 --skip-speed --only-ours --transformer-ckpt FILES/transformer_fp16.pth --vqgan-ckpt FILES/vqgan.pt
    TOKENIZER=${TOKENIZER:-checkpoints/vqgan_small_fp16.pt} MINUTES="transformer=${3:-8}" pipeline 0
    ;;
  abl)  # ~2 min per variant on an H100 (2,000 steps of batch 128 + scoring); rerun to finish the rest
    # shellcheck disable=SC2086  # ABL_ARGS: several words (e.g. "--scale cpu --steps 2" to check this script on a CPU)
    run ablation timeout 540 python bench/stage1_ablation.py ${ABL_ARGS:---scale h100} --device "$DEVICE" \
      --out "$WORK/ablation" --variants "${3:-$ABL_DEFAULT}"
    cat "$WORK/ablation/results.md" >>"$WORK/session.log" 2>/dev/null
    ;;
  *) echo "unknown part $PART: $USAGE" >&2; exit 2 ;;
esac
