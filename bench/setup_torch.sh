#!/usr/bin/env bash
# Install a CPU-usable PyTorch into bench/.venv for `mixscale bench` (idempotent).
# Prints the venv's python path on success.
#
# Only PyPI is reachable here, and PyPI's Linux x86_64 torch wheel is the CUDA build whose
# dependencies are several GB of nvidia-* wheels. We install the torch wheel with --no-deps
# plus its pure-python dependencies, then (only if `import torch` fails for lack of the CUDA
# libraries) let make_cuda_stubs.py write small stand-in libcudart/libcublas/... into
# torch/lib so the loader is satisfied; torch then reports no CUDA device and runs on the
# CPU with its stock kernels (MKL, oneDNN, OpenMP). Needs: python3 (>= 3.10) with venv/pip
# (Debian: python3-venv), and cc + readelf for the stubs (Debian: gcc, binutils).
# Verified: torch 2.15.0 (cp311, manylinux_2_28_x86_64) on Debian 12, python 3.11.
set -euo pipefail

TORCH_VERSION=2.15.0
# pure-python deps of torch 2.15.0 (versions verified together), plus numpy
PY_DEPS=(filelock==4.3.1 "typing-extensions==4.16.0" sympy==1.14.0 mpmath==1.3.0
         networkx==3.6.1 jinja2==3.1.6 MarkupSafe==3.0.4 fsspec==2026.9.0 numpy==2.4.6)

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$BENCH/.venv"
PY="$VENV/bin/python"
CHECK="import torch, numpy; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__; \
x = torch.randn(8, 8, requires_grad=True); (x @ x).sum().backward(); assert x.grad is not None"

if [ -x "$PY" ] && "$PY" -c "$CHECK" >/dev/null 2>&1; then
  echo "$PY"
  exit 0
fi

say() { echo "setup_torch: $*" >&2; }

if [ ! -x "$PY" ]; then
  say "creating venv $VENV"
  python3 -m venv "$VENV" >&2 || { say "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
fi
PIP=("$PY" -m pip install --disable-pip-version-check --no-warn-conflicts --quiet)

say "installing torch==$TORCH_VERSION without its CUDA dependencies (~540 MB download)"
"${PIP[@]}" --no-deps "torch==$TORCH_VERSION" >&2
say "installing pure-python dependencies"
"${PIP[@]}" "${PY_DEPS[@]}" >&2

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  for tool in cc readelf ldd; do
    command -v "$tool" >/dev/null || { say "need '$tool' to stub the CUDA libraries (Debian: apt-get install gcc binutils)"; exit 1; }
  done
  say "import torch fails without the CUDA libraries: writing CPU-only stub libraries"
  "$PY" "$BENCH/make_cuda_stubs.py" >&2
fi

if ! err="$("$PY" -c "$CHECK" 2>&1)"; then
  say "torch still does not work:"
  echo "$err" >&2
  exit 1
fi
"$PY" -c "import torch; print('setup_torch: torch', torch.__version__, 'cuda available:', torch.cuda.is_available())" >&2
echo "$PY"
