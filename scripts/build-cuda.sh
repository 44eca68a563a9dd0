#!/usr/bin/env bash
# scripts/build-cuda.sh — build `mixscale --features cuda` on a machine with NO GPU and NO system CUDA.
#
# The binary it produces is meant to be copied to a GPU machine (CUDA 13.0 driver, r580) and run there
# after `source scripts/gpu-run-env.sh`. See scripts/README-gpu.md.
#
# What it does (idempotent: re-running skips whatever is already in place):
#   1. Creates a venv ($CUDA_VENV, default .venv-cuda, git-ignored) holding the CUDA 13.0 toolchain
#      from PyPI wheels (nvcc, crt, nvvm, cudart, cccl, nvrtc, cublas, curand), pinned below. The
#      toolkit lands in site-packages/nvidia/cu13/{bin,include,lib,nvvm}.
#      13.0 (not the newest 13.x) on purpose: the GPU machines run driver 580 = CUDA 13.0, and candle
#      loads its kernels as PTX, which a driver rejects when nvcc is newer than the driver
#      (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). The run-time libraries there (torch cu130 wheels) are 13.0 too.
#   2. Exports CUDA_ROOT/CUDA_PATH/PATH, CUDA_COMPUTE_CAP (default 90 = Hopper H100/H200; there is no GPU
#      here to detect it), CUDARC_CUDA_VERSION (default 13000; cudarc 0.19.10 cannot parse a newer nvcc
#      than 13.4 and we want the 13.0 driver API anyway).
#   3. Makes a link-only folder ($CUDA_VENV/cuda-link) with
#        - unversioned names (libcudart.so, libcublas.so, libcublasLt.so, libcurand.so, libnvrtc.so)
#          pointing at the wheels' versioned libraries (the wheels ship only libX.so.N), and
#        - a generated stub libcuda.so (SONAME libcuda.so.1) that exports every driver function cudarc's
#          bindings can reference (scraped from cudarc's src/driver/sys/mod.rs). No wheel ships the driver.
#      The folder is passed with RUSTFLAGS `-L native=…` and `-Wl,-rpath-link,…` (link time only). No rpath
#      is baked into the binary, and the folder has no libcuda.so.1 file, so the stub can never be picked
#      up at run time: the GPU machine's real libcuda.so.1 is used.
#   4. Runs `cargo build --release --features cuda` (niced) into $CARGO_TARGET_DIR (default target-cuda/)
#      and prints where the binary is and which CUDA libraries it needs.
#
# Usage:   scripts/build-cuda.sh [extra cargo args]
#          scripts/build-cuda.sh --tests   both binaries scripts/gpu-check.sh needs: the mixscale binary
#                                          and the integration-test binary (`cargo test --release
#                                          --features cuda --no-run --test main`, which also builds
#                                          the mixscale binary); prints both paths
# Env:     CUDA_VENV, CARGO_TARGET_DIR, CUDA_COMPUTE_CAP, CUDARC_CUDA_VERSION, PYTHON (venv creator),
#          NICE_LEVEL (default 19; the dev machines are shared), CUDA_SKIP_BUILD=1 (only set up the toolchain).
# Cost:    ~1.2 GB venv; a cold build is ~20+ minutes on 2 cores, mostly nvcc compiling candle-kernels.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-cuda}
NICE=(nice -n "${NICE_LEVEL:-19}")
PYTHON=${PYTHON:-python3}

# Pinned CUDA 13.0 wheels (verified together: nvcc 13.0.88 builds all candle-kernels for sm_90).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)

log() { printf '[build-cuda] %s\n' "$*" >&2; }

# ---- 1. venv with the toolchain -------------------------------------------------------------------
STAMP=$VENV/.cuda-wheels
if [[ ! -x $VENV/bin/python ]]; then
  log "creating venv $VENV"
  "${NICE[@]}" "$PYTHON" -m venv "$VENV"
fi
if [[ ! -f $STAMP ]] || [[ "$(cat "$STAMP")" != "${WHEELS[*]}" ]]; then
  log "installing ${WHEELS[*]}"
  "${NICE[@]}" "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${WHEELS[@]}"
  printf '%s' "${WHEELS[*]}" >"$STAMP"
else
  log "wheels already installed (stamp $STAMP)"
fi

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CUDA_ROOT=$SITE/nvidia/cu13
[[ -x $CUDA_ROOT/bin/nvcc ]] || { log "no nvcc at $CUDA_ROOT/bin/nvcc"; exit 1; }

# ---- 2. environment --------------------------------------------------------------------------------
export CUDA_ROOT CUDA_PATH=$CUDA_ROOT PATH=$CUDA_ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
log "nvcc: $(nvcc --version | tail -2 | head -1)"

# ---- 3. link folder: unversioned names + libcuda stub ---------------------------------------------
LINK=$VENV/cuda-link
mkdir -p "$LINK"
for lib in cudart cublas cublasLt curand nvrtc; do
  real=$(cd "$CUDA_ROOT/lib" && ls lib$lib.so.* 2>/dev/null | grep -E "^lib$lib\.so\.[0-9]+$" | head -1 || true)
  [[ -n $real ]] || { log "lib$lib.so.N missing in $CUDA_ROOT/lib"; exit 1; }
  ln -sfn "$CUDA_ROOT/lib/$real" "$LINK/lib$lib.so"
  ln -sfn "$CUDA_ROOT/lib/$real" "$LINK/$real"   # for -rpath-link (libcublas.so.13 needs libcublasLt.so.13)
done

# Driver symbols: every `fn cu…(` declared in an extern "C" block of cudarc's driver bindings (all
# CUDA versions: a superset is harmless for a link-only stub).
CUDARC_DIR=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | "$VENV/bin/python" -c '
import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
SYS=$CUDARC_DIR/src/driver/sys/mod.rs
[[ -f $SYS ]] || { log "cudarc driver bindings not found at $SYS"; exit 1; }
STUB_SRC=$LINK/libcuda-stub.c
if [[ ! -f $LINK/libcuda.so || $SYS -nt $LINK/libcuda.so || $0 -nt $LINK/libcuda.so ]]; then
  {
    echo "/* Link-time stub for libcuda.so.1, generated by scripts/build-cuda.sh from $SYS. Never load it. */"
    grep -oE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$SYS" | sed -E 's/^[[:space:]]+fn (cu[A-Za-z0-9_]+)\(/\1/' |
      sort -u | sed -E 's/.*/void &(void) { __builtin_trap(); }/'
  } >"$STUB_SRC"
  "${NICE[@]}" cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$STUB_SRC"
  log "stub libcuda.so: $(grep -c '^void' "$STUB_SRC") driver symbols"
fi
rm -f "$LINK/libcuda.so.1"   # make sure nothing named like the real driver sits here

# ---- 4. build ---------------------------------------------------------------------------------------
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$LINK -C link-arg=-Wl,-rpath-link,$LINK"
if [[ ${CUDA_SKIP_BUILD:-0} == 1 ]]; then
  log "CUDA_SKIP_BUILD=1: environment ready, not building"
  exit 0
fi
log "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
log "RUSTFLAGS=$RUSTFLAGS"
start=$(date +%s)
TESTBIN=""
if [[ ${1:-} == --tests ]]; then
  shift
  # The test build's stderr names the test executable: "Executable tests/main.rs (…/deps/main-HASH)".
  mkdir -p "$CARGO_TARGET_DIR"
  "${NICE[@]}" cargo test --release --features cuda --no-run --test main "$@" 2>&1 | tee "$CARGO_TARGET_DIR/.build-cuda-tests.log" >&2
  TESTBIN=$(sed -nE 's/.*Executable tests\/main\.rs \((.*)\)$/\1/p' "$CARGO_TARGET_DIR/.build-cuda-tests.log" | tail -1)
  [[ -n $TESTBIN && $TESTBIN != /* ]] && TESTBIN=$ROOT/$TESTBIN
  [[ -x $TESTBIN ]] || { log "test binary not found in the cargo output"; exit 1; }
else
  "${NICE[@]}" cargo "${CARGO_SUBCOMMAND:-build}" --release --features cuda "$@"
fi
log "cargo build took $(( $(date +%s) - start )) s"

BIN=$CARGO_TARGET_DIR/release/mixscale
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do   # `--example NAME` builds examples/NAME instead
  if [[ ${args[i]} == --example && -n ${args[i+1]:-} ]]; then BIN=$CARGO_TARGET_DIR/release/examples/${args[i+1]}; fi
  if [[ ${args[i]} == --example=* ]]; then BIN=$CARGO_TARGET_DIR/release/examples/${args[i]#--example=}; fi
done
log "binary: $BIN ($(du -h "$BIN" | cut -f1))"
log "CUDA libraries it needs (DT_NEEDED):"
readelf -d "$BIN" | grep -E 'NEEDED.*(cu|nvrtc)' | sed -E 's/.*\[(.*)\]/  \1/' >&2
if readelf -d "$BIN" | grep -qE 'R(UN)?PATH'; then log "WARNING: binary has an rpath/runpath"; fi
echo "$BIN"
if [[ -n $TESTBIN ]]; then
  log "test binary: $TESTBIN ($(du -h "$TESTBIN" | cut -f1)); on the GPU machine: MIXSCALE_TESTS=<it> scripts/gpu-check.sh"
  echo "$TESTBIN"
fi
