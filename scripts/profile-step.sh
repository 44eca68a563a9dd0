#!/usr/bin/env bash
# Profile of mixscale training steps: `scripts/profile-step.sh <preset> [threads] [extra bench args...]`
#
# 1. Builds the binary (profile $PROFILE: `release` by default, whose symbols suffice for the
#    grouping; `PROFILE=profiling` adds line tables for `perf annotate`) into $CARGO_TARGET_DIR.
# 2. Runs `mixscale bench <preset> --profile` under `perf record -g`: prints the per-phase wall
#    time (forward, backward, grad norm, clip, optimizer) from the instrumented bench.
# 3. Prints the CPU samples grouped by op kind (matmul, candle elementwise, candle thread-pool
#    waiting, memory, libm exp, each fused mixscale op, ...) and the top 25 symbols.
# The perf data is kept in ${PROFILE_DIR:-/tmp/mixscale-profile}/<preset>.data for `perf report -i`.
set -euo pipefail
preset=${1:?usage: scripts/profile-step.sh <preset.yaml> [threads] [extra bench args...]}
threads=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
root=$(cd "$(dirname "$0")/.." && pwd)
tgt=${CARGO_TARGET_DIR:-$root/target}
out=${PROFILE_DIR:-/tmp/mixscale-profile}
mkdir -p "$out"
name=$(basename "$preset" .yaml)
profile=${PROFILE:-release}
# NO_BUILD=1: profile the binary already built.
[ -n "${NO_BUILD:-}" ] || (cd "$root" && cargo build --profile "$profile" --bin mixscale >&2)
bin=$tgt/$profile/mixscale
command -v perf >/dev/null || { echo "perf not found" >&2; exit 1; }
perf record -F 999 -g -o "$out/$name.data" -- "$bin" bench "$preset" --threads "$threads" --profile \
    --torch-python /nonexistent "$@" 2>&1 | grep -v "^pytorch: skipped"
perf report -i "$out/$name.data" --no-children --sort symbol --stdio 2>/dev/null \
  | awk '/^ +[0-9.]+%/ {
      p = $1; sub("%", "", p); $1 = ""; $2 = ""; s = $0
      k = "other"
      if (s ~ /gemm/) k = "matmul (gemm)"
      else if (s ~ /BarrierGuard|BarrierPool|call_trampoline|__rust_begin_short_backtrace/) k = "candle thread pool (spin/wait)"
      else if (s ~ /rayon_core|crossbeam|sched_yield|futex/) k = "rayon scheduling/idle"
      else if (s ~ /attn_fused|backward_head|forward_head|exp_shifted/) k = "mixscale attn_fused"
      else if (s ~ /mixscale::ops::norm/) k = "mixscale rms_norm"
      else if (s ~ /mixscale::ops::rope/) k = "mixscale rope"
      else if (s ~ /mixscale::ops::softmax/) k = "mixscale cross_entropy"
      else if (s ~ /mixscale::ops::swiglu/) k = "mixscale swiglu"
      else if (s ~ /mixscale::train::optim/) k = "mixscale adamw"
      else if (s ~ /with_fast_isa/) k = "mixscale fused kernels (AVX-512/AVX2)"
      else if (s ~ /mixscale::/) k = "mixscale other"
      else if (s ~ /memset|memmove|memcpy|clear_page|page_fault|_mi_|mi_|malloc|free|alloc/) k = "memory (alloc/zero/copy)"
      else if (s ~ /exp|log|cos|sin/) k = "libm (exp/log)"
      else if (s ~ /candle_core::cpu_backend|call_mut|unary_map|binary_map|copy_strided|index_select|reduce/) k = "candle elementwise/reduce/copy"
      else if (s ~ /\[k\]/) k = "kernel"
      sum[k] += p
    }
    END { printf "\n%-34s %7s\n", "CPU samples by op kind", "%"; for (k in sum) printf "%-34s %7.2f\n", k, sum[k] | "sort -t\"|\" -k1,1"; }' \
  | sort -k2 -t$'\t' 
echo
echo "top symbols:"
perf report -i "$out/$name.data" --no-children --sort symbol --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -25 | cut -c1-120
