#!/usr/bin/env python3
"""Make the PyPI (CUDA-enabled) torch wheel importable on a machine without CUDA.

The Linux x86_64 torch wheel on PyPI links its core libraries (libtorch_cpu,
libtorch_python, libtorch_cuda, ...) against the NVIDIA runtime libraries
(libcudart, libcublas, libcudnn, libnccl, ...), which normally come from several
GB of nvidia-* wheels. The CPU code paths never call into them, but the dynamic
loader still needs to find every DT_NEEDED library and every referenced symbol.

This script (run by setup_torch.sh after `pip install torch --no-deps`) writes
tiny stand-in shared libraries into torch/lib/ (which is on every torch
library's RUNPATH as $ORIGIN): one per missing SONAME, exporting exactly the
symbols (and symbol versions) torch references, each of which just returns an
error code (cudaErrorNoDevice for the CUDA runtime), so torch sees "no CUDA
device" and runs on the CPU. CPU kernels, BLAS (bundled MKL/oneDNN) and OpenMP
are the untouched official binaries, so CPU performance is that of stock torch.

Needs `cc` and `readelf` (gcc + binutils). Does not import torch.
Usage: python make_cuda_stubs.py   (with the venv's python)
"""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

CUDA_NAME = re.compile(
    r"^(__cuda|cuda|cu[A-Z]|cublas|cudnn|cufft|cusparse|cusolver|curand|cupti|"
    r"nccl|nvshmem|nvrtc|nvtx|nvJitLink)")
# unversioned symbol -> which stub gets it (first matching prefix wins)
PREFIX_LIB = [("cusparseLt", "libcusparseLt"), ("cublasLt", "libcublasLt"),
              ("cublas", "libcublas"), ("cudnn", "libcudnn"), ("cufft", "libcufft"),
              ("cusparse", "libcusparse"), ("cusolver", "libcusolver"),
              ("cupti", "libcupti"), ("nccl", "libnccl"), ("nvshmem", "libnvshmem"),
              ("nvrtc", "libnvrtc"), ("cuFile", "libcufile")]


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def needed(path):
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", sh("readelf", "-d", "-W", path))


def not_found(path):
    return {l.split()[0] for l in sh("ldd", path).splitlines() if "not found" in l}


def ldd_paths(path):
    return {l.split("=>")[1].split()[0] for l in sh("ldd", path).splitlines()
            if "=>" in l and "not found" not in l and "/" in l.split("=>")[1]}


def verneed(path):
    """version name -> library file, from .gnu.version_r"""
    out, cur, m = sh("readelf", "-V", "-W", path), None, {}
    for line in out.splitlines():
        f = re.search(r"File: (\S+)", line)
        if f:
            cur = f.group(1)
        n = re.search(r"Name: (\S+)\s+Flags", line)
        if n and cur:
            m[n.group(1)] = cur
    return m


def dynsyms(path):
    """yields (name, version or None, bind, type, defined)"""
    for line in sh("readelf", "--dyn-syms", "-W", path).splitlines():
        p = line.split()
        if len(p) < 8 or not p[0].endswith(":"):
            continue
        full = p[7]
        name, ver = (full.split("@")[0], full.split("@")[-1]) if "@" in full else (full, None)
        yield name, ver, p[4], p[3], p[6] != "UND"


def main():
    spec = importlib.util.find_spec("torch")
    if spec is None:
        sys.exit("torch is not installed in this python")
    tdir = spec.submodule_search_locations[0]
    lib = os.path.join(tdir, "lib")
    # libraries torch loads at import: _C, libtorch_global_deps, and what they need from torch/lib
    todo = [os.path.join(tdir, f) for f in os.listdir(tdir) if f.startswith("_C.") and f.endswith(".so")]
    todo.append(os.path.join(lib, "libtorch_global_deps.so"))
    closure = []
    while todo:
        p = todo.pop()
        if p in closure:
            continue
        closure.append(p)
        todo += [os.path.join(lib, n) for n in needed(p) if os.path.exists(os.path.join(lib, n))]
    missing = set()
    for p in closure:
        missing |= not_found(p)
    missing = {m for m in missing if not os.path.exists(os.path.join(lib, m))}
    if not missing:
        print("make_cuda_stubs: nothing missing, no stubs needed")
        return
    # symbols defined by what does load (to leave unversioned non-CUDA references alone)
    defined = set()
    for p in set(closure) | set().union(*(ldd_paths(p) for p in closure)):
        defined |= {s[0] for s in dynsyms(p) if s[4]}
    by_base = {m.split(".so")[0]: m for m in missing}
    stubs = {m: {} for m in missing}  # soname -> {symbol: (version or None, type)}
    for p in closure:
        vmap = verneed(p)
        for name, ver, bind, typ, is_def in dynsyms(p):
            if is_def:
                continue
            if ver and vmap.get(ver) in missing:
                stubs[vmap[ver]][name] = (ver, typ)
            elif not ver and bind != "WEAK" and name not in defined and CUDA_NAME.match(name):
                target = next((by_base.get(b) for pre, b in PREFIX_LIB if name.startswith(pre)), None)
                target = target or by_base.get("libcudart") or sorted(missing)[0]
                stubs[target].setdefault(name, (None, typ))
    tmp = tempfile.mkdtemp(prefix="cuda_stubs_")
    for soname, syms in sorted(stubs.items()):
        base = soname.split(".so")[0]
        err = 100 if base == "libcudart" else 1  # cudaErrorNoDevice / generic *_NOT_INITIALIZED
        c = ['/* stand-in for %s generated by mixscale bench/make_cuda_stubs.py: no CUDA here */' % soname,
             'static const char msg[] = "CUDA is not available (CPU-only stub library)";']
        versions = {}
        for name, (ver, typ) in sorted(syms.items()):
            if typ == "OBJECT":
                c.append("char %s[256];" % name)
            elif re.search(r"(ErrorString|ErrorName|StatusString|StatusName|GetString)$", name):
                c.append("const char *%s(void) { return msg; }" % name)
            elif name in ("__cudaRegisterFatBinary",) or name.endswith("GetProcAddress"):
                c.append("void *%s(void) { return 0; }" % name)
            elif name.startswith("__cuda"):
                c.append("long %s(void) { return 0; }" % name)  # fatbin/kernel registration at load
            else:
                c.append("long %s(void) { return %d; }" % (name, err))
            versions.setdefault(ver, []).append(name)
        cfile, vfile = os.path.join(tmp, base + ".c"), os.path.join(tmp, base + ".map")
        with open(cfile, "w") as f:
            f.write("\n".join(c) + "\n")
        nodes = [v for v in versions if v] or [base.upper() + "_STUB"]
        vs = []
        for i, v in enumerate(nodes):
            names = versions.get(v, []) + (versions.get(None, []) if i == 0 else [])
            vs.append("%s {\n  global:\n%s\n%s};" % (
                v, "".join("    %s;\n" % n for n in names), "  local: *;\n" if i == 0 else ""))
        with open(vfile, "w") as f:
            f.write("\n".join(vs) + "\n")
        out = os.path.join(lib, soname)
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-w", "-o", out, cfile,
                        "-Wl,-soname," + soname, "-Wl,--version-script=" + vfile], check=True)
        print("make_cuda_stubs: %-24s %4d symbols -> %s" % (soname, len(syms), out))
    with open(os.path.join(lib, "CUDA_STUBS.txt"), "w") as f:
        f.write("The following libraries in this folder are CPU-only stand-ins written by\n"
                "mixscale bench/make_cuda_stubs.py; delete them and install the nvidia-* wheels\n"
                "to use CUDA:\n" + "".join(s + "\n" for s in sorted(stubs)))


if __name__ == "__main__":
    main()
