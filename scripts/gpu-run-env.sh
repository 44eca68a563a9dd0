# scripts/gpu-run-env.sh — SOURCE this on the GPU machine before running a mixscale binary built
# by scripts/build-cuda.sh:
#
#     source scripts/gpu-run-env.sh [path/to/mixscale]
#
# The binary has no rpath; it needs these SONAMEs from the loader:
#     libcuda.so.1                               the driver (system; never the build stub)
#     libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10
# On the lent GPU machines the CUDA 13 libraries are the nvidia-* wheels of the PyTorch install
# (site-packages/nvidia/cu13/lib, or nvidia/<pkg>/lib with older wheel layouts). This script finds
# them through the python that holds them ($CUDA_PYTHON, default python3), falls back to
# /usr/local/cuda*/lib64 and the ld cache, and prepends the folders to LD_LIBRARY_PATH. Given a
# binary path it then runs ldd on it and reports any library still "not found".
# It sets no shell options (safe to source); it returns non-zero if something is missing.

_mixscale_gpu_env() {
  local py=${CUDA_PYTHON:-python3} bin=${1:-} d f soname
  local want=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10)
  local cands=() dirs=() missing=()

  # 1. nvidia wheel folders of the python environment (namespace package `nvidia`).
  if command -v "$py" >/dev/null 2>&1; then
    while IFS= read -r d; do [[ -n $d ]] && cands+=("$d"); done < <("$py" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = []
try:
    import nvidia
    roots += list(nvidia.__path__)
except Exception:
    pass
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    roots.append(os.path.join(sp, "nvidia"))
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        d = os.path.realpath(d)
        if d not in seen:
            seen.add(d); print(d)
EOF
)
  fi
  # 2. a system toolkit, if any.
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64; do
    [[ -d $d ]] && cands+=("$d")
  done

  for soname in "${want[@]}"; do
    f=""
    for d in "${cands[@]}"; do
      if [[ -e $d/$soname ]]; then f=$d; break; fi
    done
    if [[ -z $f ]]; then
      if ldconfig -p 2>/dev/null | grep -q "^[[:space:]]*$soname "; then continue; fi
      missing+=("$soname"); continue
    fi
    [[ " ${dirs[*]} " == *" $f "* ]] || dirs+=("$f")
  done

  # 3. the driver: libcuda.so.1 from the ld cache or the usual driver folders; never the stub.
  local cuda1=""
  cuda1=$(ldconfig -p 2>/dev/null | awk '/^[[:space:]]*libcuda\.so\.1 .*x86-64/ {print $NF; exit}')
  if [[ -z $cuda1 ]]; then
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
      if [[ -e $d/libcuda.so.1 ]]; then cuda1=$d/libcuda.so.1; break; fi
    done
    [[ -n $cuda1 ]] && dirs+=("$(dirname "$cuda1")")
  fi
  if [[ -z $cuda1 ]]; then missing+=(libcuda.so.1); fi
  case $cuda1 in *cuda-link*|*.venv-cuda*) echo "gpu-run-env: $cuda1 is the build stub, not a driver" >&2; missing+=(libcuda.so.1);; esac

  if ((${#dirs[@]})); then
    local joined
    joined=$(IFS=:; printf '%s' "${dirs[*]}")
    export LD_LIBRARY_PATH="$joined${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  echo "gpu-run-env: libcuda.so.1 = ${cuda1:-NOT FOUND}" >&2
  echo "gpu-run-env: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2

  if [[ -n $bin ]]; then
    if ldd "$bin" | grep -E 'not found'; then missing+=("(ldd: see above)"); fi
    ldd "$bin" | grep -E 'libcu|nvrtc' >&2
  fi
  if ((${#missing[@]})); then
    echo "gpu-run-env: MISSING: ${missing[*]}" >&2
    return 1
  fi
  return 0
}
_mixscale_gpu_env "$@"
