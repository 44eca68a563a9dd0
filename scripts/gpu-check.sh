#!/usr/bin/env bash
# GPU check, run ON the GPU machine (under 8 minutes on one H100/H200: every stage has a time
# budget and the whole script a deadline), from binaries built here with
# `scripts/build-cuda.sh --tests` and copied along (the GPU machine has the CUDA libraries and a
# python3 with torch, but no Rust toolchain):
#   MIXSCALE_BIN   the mixscale binary           (default target-cuda/release/mixscale)
#   MIXSCALE_TESTS the integration-test binary   (default: newest target-cuda/release/deps/main-*)
#   CHECK_BUDGET_S total seconds (default 450)   CHECK_DIR output folder (default /tmp/gpu-check)
# Stages (budget in seconds, cut to what is left):
#   1. parity tests, CPU vs CUDA: core ops, the attention model, every block kind f32 + bf16 (90)
#   2. per-preset training throughput at ~125M parameters, f32 and bf16 columns
#      (tokens/s, model FLOP/s, MFU against the chip's dense bf16 peak) (230; ≤ 25 per bench)
#   3. the quickstart sweep on the GPU: --device cuda:0 --trials-per-device 3 (90; a sweep cut
#      short is resumable, and its status is printed)
#   4. a short training run of the attention preset in bf16 on the GPU (30)
set -uo pipefail
cd "$(dirname "$0")/.."
CHECK_DIR=${CHECK_DIR:-/tmp/gpu-check}
mkdir -p "$CHECK_DIR"
BIN=${MIXSCALE_BIN:-target-cuda/release/mixscale}
TESTS=${MIXSCALE_TESTS:-$(ls -t target-cuda/release/deps/main-* 2>/dev/null | grep -v '\.d$' | head -1)}
START=$(date +%s)
DEADLINE=$((START + ${CHECK_BUDGET_S:-450}))
# Seconds for a stage: its budget, cut to what is left before the deadline (at least 1).
budget() { local left=$((DEADLINE - $(date +%s))); ((left < $1)) && echo $((left > 1 ? left : 1)) || echo "$1"; }
# shellcheck source=/dev/null
source scripts/gpu-run-env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$CHECK_DIR/gpu.txt"
GPU_NAME=$(head -1 "$CHECK_DIR/gpu.txt")
# Dense bf16 peak (TFLOP/s) of the chip, for MFU (f32 runs are measured against it too).
case "$GPU_NAME" in
  *H100*|*H200*) PEAK=989 ;;
  *A100*) PEAK=312 ;;
  *) PEAK=0 ;;
esac

echo "== parity tests (CPU vs CUDA)"
if [ -n "$TESTS" ] && [ -x "$TESTS" ]; then
  timeout "$(budget 90)" "$TESTS" gpu --nocapture --test-threads 1 2>&1 | tee "$CHECK_DIR/parity.txt" | grep -E "^test |SKIPPED|panicked" | tail -12
  PARITY=$(grep -E "^test result" "$CHECK_DIR/parity.txt" | head -1)
  [ -n "$PARITY" ] || PARITY="no result (timed out or crashed; see $CHECK_DIR/parity.txt)"
else
  PARITY="test binary not found (build it with scripts/build-cuda.sh --tests)"
fi

echo "== bench at ~125M parameters (d_model 768, 12 layers, vocab 50304), batch 8 x 1024 (MQAR/MAD: x their seq_len), f32 and bf16"
BENCH_END=$(($(date +%s) + $(budget 230)))
cell() { # tokens/s, GFLOP/s and MFU of preset $2's row in bench output file $1, or why it failed
  local line tps gf
  line=$(grep -E "^$2 " "$1")
  if [ -z "$line" ]; then
    if grep -q "timed out" "$1"; then echo "timeout"; else echo "failed"; fi
    return
  fi
  # Columns of `mixscale bench`'s table: preset params mix-tok/s torch-tok/s ratio mix-GF/s ...
  tps=$(echo "$line" | awk '{print $3}'); gf=$(echo "$line" | awk '{print $6}')
  awk -v t="$tps" -v g="$gf" -v p="$PEAK" 'BEGIN { if (p > 0) printf "%.0f %.0f %.1f%%", t, g, 100 * g / 1000 / p; else printf "%.0f %.0f -", t, g }'
}
ROWS=""
for arch in architectures/*.yaml; do
  name=$(basename "$arch" .yaml)
  # 12 heads for every block of the preset's pattern that has a num_heads option.
  heads=()
  for block in attention gated_deltanet fox moba; do
    "$BIN" check "$arch" 2>/dev/null | grep -q "^    $block:" && heads+=(--set "model.blocks.$block.num_heads=12")
  done
  # Synthetic-task presets (MQAR, MAD) keep their own train.seq_len: their data fix the example
  # length (MAD) or need vocab_size > seq_len (MQAR).
  seq=(--seq-len 1024)
  grep -qE "^  kind: (mqar|mad)$" "$arch" && seq=()
  cells=()
  for prec in f32 bf16; do
    out="$CHECK_DIR/bench-$name-$prec.txt"
    left=$((BENCH_END - $(date +%s)))
    if ((left < 5)); then echo "skipped: stage budget spent" >"$out"; cells+=("skipped"); continue; fi
    timeout "$((left < 25 ? left : 25))" "$BIN" bench "$arch" --device cuda:0 --precision "$prec" --batch 8 "${seq[@]}" --steps 3 --warmup 1 \
      --set model.d_model=768 --set model.n_layers=12 --set model.vocab_size=50304 \
      "${heads[@]}" >"$out" 2>&1 || { [ $? = 124 ] && echo "timed out" >>"$out"; }
    cells+=("$(cell "$out" "$name")")
  done
  ROWS+=$(printf "%-22s | %-28s | %-28s" "$name" "${cells[0]}" "${cells[1]}")$'\n'
done

echo "== quickstart sweep on the GPU (cuda:0, 3 trials at a time)"
SWEEP_RUNS="$CHECK_DIR/sweep-runs"
timeout "$(budget 90)" "$BIN" sweep run sweeps/quickstart.yaml --runs-dir "$SWEEP_RUNS" --device cuda:0 --trials-per-device 3 \
  >"$CHECK_DIR/sweep.txt" 2>&1
SWEEP_RC=$?
"$BIN" sweep status sweeps/quickstart.yaml --runs-dir "$SWEEP_RUNS" >"$CHECK_DIR/sweep-status.txt" 2>&1
SWEEP="exit $SWEEP_RC$([ "$SWEEP_RC" = 124 ] && echo ' (stage budget spent; resumable)'); $(grep -E "^[0-9]+ trials:|^best:" "$CHECK_DIR/sweep-status.txt" | tr '\n' ' ')"

echo "== training the attention preset on the GPU in bf16"
timeout "$(budget 30)" "$BIN" train architectures/attention.yaml --device cuda:0 --precision bf16 --set train.steps=100 \
  --out "$CHECK_DIR/run-attention" --overwrite --quiet >"$CHECK_DIR/train.txt" 2>&1
TRAIN=$(grep -E "^(status|train loss|steps)" "$CHECK_DIR/train.txt" | tr '\n' ' ')
[ -n "$TRAIN" ] || TRAIN="no result: $(tail -1 "$CHECK_DIR/train.txt")"

echo
echo "================ gpu-check: $GPU_NAME ($(( $(date +%s) - START )) s)"
echo "parity: $PARITY"
printf "%-22s | %-28s | %-28s\n" "preset (125M)" "f32: tok/s GFLOP/s MFU" "bf16: tok/s GFLOP/s MFU"
printf "%s" "$ROWS"
echo "quickstart sweep on cuda:0: $SWEEP"
echo "attention preset, bf16, trained on GPU: $TRAIN"
echo "outputs: $CHECK_DIR"
