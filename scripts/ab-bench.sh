#!/usr/bin/env bash
# A/B of two mixscale binaries on one preset, alternating them so a shared machine's load moves
# both alike: `scripts/ab-bench.sh BIN_A BIN_B architectures/P.yaml [rounds=5]`.
# Prints, per side, the median and every run's training tokens/s (`bench --steps 8 --warmup 2`,
# 2 threads, no PyTorch). Build the old side from a worktree, e.g.
#   git worktree add /tmp/old <commit> && CARGO_TARGET_DIR=/tmp/old-target cargo build --release --manifest-path /tmp/old/Cargo.toml
set -euo pipefail
a=${1:?usage: ab-bench.sh BIN_A BIN_B PRESET.yaml [rounds]}
b=${2:?usage: ab-bench.sh BIN_A BIN_B PRESET.yaml [rounds]}
preset=${3:?usage: ab-bench.sh BIN_A BIN_B PRESET.yaml [rounds]}
rounds=${4:-5}
name=$(basename "$preset" .yaml)
# The side that runs first alternates between rounds: on this VM the first run of a pair was
# measurably faster (moe: A-first rounds favoured whichever binary was A by ~7%).
for r in $(seq "$rounds"); do
  order="A B"; [ $((r % 2)) = 0 ] && order="B A"
  for side in $order; do
    bin=$a; [ "$side" = B ] && bin=$b
    tok=$("$bin" bench "$preset" --threads 2 --steps 8 --warmup 2 --torch-python /nonexistent 2>/dev/null | awk -v n="$name" '$1 == n {print $3}')
    echo "$side ${tok:-NaN}"
  done
done | sort -k1,1 -k2,2n | awk '
  { v[$1] = v[$1] " " $2; x[$1, ++c[$1]] = $2 }
  END { for (k in c) { n = c[k]; m = (x[k, int((n + 1) / 2)] + x[k, int(n / 2) + 1]) / 2; printf "%s median %.0f tok/s:%s\n", k, m, v[k] } }' | sort
