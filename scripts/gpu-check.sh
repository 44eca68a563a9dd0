#!/usr/bin/env bash
# GPU check, run ON the GPU machine (under 8 minutes on one H100/H200), from binaries built
# here with scripts/build-cuda.sh and copied along (the GPU machine has the CUDA libraries and
# a python3 with torch, but no Rust toolchain):
#   MIXSCALE_BIN   the mixscale binary           (default target-cuda/release/mixscale)
#   MIXSCALE_TESTS the integration-test binary   (default: newest target-cuda/release/deps/main-*)
# Prints a table: parity tests, per-preset training throughput at ~125M parameters (tokens/s,
# model FLOP/s, MFU against the chip's dense bf16 peak), and a short training run on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECK_DIR=${CHECK_DIR:-/tmp/gpu-check}
mkdir -p "$CHECK_DIR"
BIN=${MIXSCALE_BIN:-target-cuda/release/mixscale}
TESTS=${MIXSCALE_TESTS:-$(ls -t target-cuda/release/deps/main-* 2>/dev/null | grep -v '\.d$' | head -1)}
# shellcheck source=/dev/null
source scripts/gpu-run-env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$CHECK_DIR/gpu.txt"
GPU_NAME=$(head -1 "$CHECK_DIR/gpu.txt")
# Dense bf16 peak (TFLOP/s) of the chip, for MFU.
case "$GPU_NAME" in
  *H100*|*H200*) PEAK=989 ;;
  *A100*) PEAK=312 ;;
  *) PEAK=0 ;;
esac

echo "== parity tests (CPU vs CUDA)"
if [ -n "$TESTS" ] && [ -x "$TESTS" ]; then
  timeout 120 "$TESTS" gpu --nocapture 2>&1 | tee "$CHECK_DIR/parity.txt" | tail -5
  PARITY=$(grep -E "^test result" "$CHECK_DIR/parity.txt" | head -1)
else
  PARITY="test binary not found"
fi

echo "== bench at ~125M parameters (d_model 768, 12 layers, vocab 50304), batch 8 x 1024"
ROWS=""
for arch in architectures/*.yaml; do
  name=$(basename "$arch" .yaml)
  # 12 heads for every block of the preset's pattern that has a num_heads option.
  heads=()
  for block in attention gated_deltanet; do
    "$BIN" check "$arch" 2>/dev/null | grep -q "^    $block:" && heads+=(--set "model.blocks.$block.num_heads=12")
  done
  timeout 150 "$BIN" bench "$arch" --device cuda:0 --batch 8 --seq-len 1024 --steps 5 --warmup 2 \
    --set model.d_model=768 --set model.n_layers=12 --set model.vocab_size=50304 \
    "${heads[@]}" > "$CHECK_DIR/bench-$name.txt" 2>&1
  line=$(grep -E "^$name " "$CHECK_DIR/bench-$name.txt")
  if [ -n "$line" ]; then
    tps=$(echo "$line" | awk '{print $3}'); gf=$(echo "$line" | awk '{print $6}')
    mfu=$(awk -v g="$gf" -v p="$PEAK" 'BEGIN { if (p > 0) printf "%.1f%%", 100 * g / 1000 / p; else print "-" }')
    ROWS+=$(printf "%-22s %12s %14s %8s" "$name" "$tps" "$gf" "$mfu")$'\n'
  else
    ROWS+=$(printf "%-22s failed: %s" "$name" "$(tail -1 "$CHECK_DIR/bench-$name.txt")")$'\n'
  fi
done

echo "== training the attention preset on the GPU"
timeout 180 "$BIN" train architectures/attention.yaml --device cuda:0 --out "$CHECK_DIR/run-attention" --overwrite --quiet \
  > "$CHECK_DIR/train.txt" 2>&1
TRAIN=$(grep -E "^(status|train loss|steps)" "$CHECK_DIR/train.txt" | tr '\n' ' ')

echo
echo "================ gpu-check: $GPU_NAME"
echo "parity: $PARITY"
printf "%-22s %12s %14s %8s\n" "preset (125M)" "tokens/s" "model GFLOP/s" "MFU"
printf "%s" "$ROWS"
echo "attention preset trained on GPU: $TRAIN"
