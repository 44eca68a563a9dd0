#!/usr/bin/env python3
"""Golden fixtures for the `ssd` op (Mamba-2 core), written by the reference implementation.

Reference: state-spaces/mamba, mamba_ssm/modules/ssd_minimal.py (`segsum`,
`ssd_minimal_discrete`), https://github.com/state-spaces/mamba/blob/main/mamba_ssm/modules/ssd_minimal.py
Copyright (c) 2024, Albert Gu and Tri Dao; Apache License 2.0. mamba_ssm cannot be installed on a
CPU-only machine (its build needs CUDA and that file imports the triton kernel at the top), so the
script can also load that one file by path ($MAMBA_SSD_MINIMAL) without the triton import. The
fixture records which source was used in its metadata.

Semantics (../shared/reference/ops.md §5): y, final_state = ssd_minimal_discrete(x*dt, A*dt, B, C)
with the optional initial state. ssd_minimal sums its einsums over the group axis, so it is
only the real per-group semantics for ngroups = 1; for G > 1 this script calls it once per head
with that head's group (head h reads group h // (H/G)), which is what the CUDA kernel computes.
T is zero-padded to a multiple of the chunk (dt = 0 tokens leave the state unchanged) and cut.

Each fixture holds the inputs under the op's names (x, dt, A, Bm, Cm, optional initial_state,
dO) and the reference outputs: y, final_state, and grad_<input> = d sum(y*dO) / d input, all
float32 (the reference computes in fp32). Run: python tests/golden/make_ssd.py (needs torch,
einops, safetensors); writes tests/golden/ssd_*.safetensors next to this file.
"""
import os

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from safetensors.torch import save_file

def _load_reference():
    """mamba_ssm's `ssd_minimal_discrete`, from the installed package or from the file itself.

    mamba_ssm does not install on a CPU-only machine (its build needs CUDA), so without it the
    script reads `mamba_ssm/modules/ssd_minimal.py` from the path in $MAMBA_SSD_MINIMAL — e.g.
    from the sdist: `pip download --no-deps --no-binary :all: mamba-ssm` and unpack it — and
    runs it with its top-level triton import removed (the two functions used are pure torch).
    """
    try:  # pragma: no cover - only on machines with mamba_ssm + triton
        from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

        return ssd_minimal_discrete, "mamba_ssm (installed)"
    except Exception:  # noqa: BLE001
        path = os.environ.get("MAMBA_SSD_MINIMAL")
        if not path:
            raise SystemExit("mamba_ssm is not importable: set MAMBA_SSD_MINIMAL to mamba_ssm/modules/ssd_minimal.py")
        src = "\n".join(l for l in open(path).read().splitlines() if "triton" not in l or not l.lstrip().startswith(("from", "import")))
        ns = {}
        exec(compile(src, path, "exec"), ns)
        return ns["ssd_minimal_discrete"], f"mamba_ssm/modules/ssd_minimal.py ({path})"


ssd_minimal_discrete, SOURCE = _load_reference()
# Released mamba_ssm (≤ 2.3.x) takes B, C per head `(b, l, h, n)`; the GitHub main version adds a
# group axis `(b, l, g, n)` (and sums its einsums over it). Detect which one was loaded.
PER_HEAD = "n_groups" not in (ssd_minimal_discrete.__doc__ or "")


def reference_ssd(x, dt, A, Bm, Cm, s0, block_len):
    """ops.md `ssd` through ssd_minimal_discrete: y [B,T,H,P], final_state [B,H,P,N]."""
    b, t, h, p = x.shape
    g = Bm.shape[2]
    pad = (-t) % block_len
    X = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))
    Ad = F.pad(A[None, None, :] * dt, (0, 0, 0, pad))
    Bp = F.pad(Bm, (0, 0, 0, 0, 0, pad))
    Cp = F.pad(Cm, (0, 0, 0, 0, 0, pad))
    if PER_HEAD:
        rep = h // g  # head hh reads group hh // (h/g)
        Bh, Ch = Bp.repeat_interleave(rep, dim=2), Cp.repeat_interleave(rep, dim=2)
        init = None if s0 is None else s0[:, None]  # (b, 1 chunk, h, p, n)
        y, fs = ssd_minimal_discrete(X, Ad, Bh, Ch, block_len, initial_states=init)
    elif g == 1:
        init = None if s0 is None else s0[:, None, None]  # (b, 1 chunk, 1 group, h, p, n)
        y, fs = ssd_minimal_discrete(X, Ad, Bp, Cp, block_len, initial_states=init)
        fs = fs[:, 0]
    else:
        ys, fss = [], []
        for hh in range(h):
            gg = hh // (h // g)
            init = None if s0 is None else s0[:, None, None, hh : hh + 1]
            y1, f1 = ssd_minimal_discrete(
                X[:, :, hh : hh + 1], Ad[:, :, hh : hh + 1], Bp[:, :, gg : gg + 1], Cp[:, :, gg : gg + 1], block_len, initial_states=init
            )
            ys.append(y1)
            fss.append(f1[:, 0])
        y, fs = torch.cat(ys, 2), torch.cat(fss, 1)
    return y[:, :t], fs


def loop_ssd(x, dt, A, Bm, Cm, s0):
    """The recurrence of ops.md §5 token by token in float64: only a sanity check of the above."""
    x, dt, A, Bm, Cm = (z.double() for z in (x, dt, A, Bm, Cm))
    b, t, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    S = torch.zeros(b, h, p, n, dtype=torch.float64) if s0 is None else s0.double().clone()
    ys = []
    for i in range(t):
        Bh = Bm[:, i].repeat_interleave(h // g, dim=1)
        Ch = Cm[:, i].repeat_interleave(h // g, dim=1)
        S = torch.exp(dt[:, i] * A)[..., None, None] * S + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch))
    return torch.stack(ys, 1), S


def make(name, b, t, h, p, g, n, chunk, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32)  # noqa: E731
    inputs = {
        "x": rnd(b, t, h, p),
        "dt": F.softplus(rnd(b, t, h) - 1.0),
        "A": -(0.5 + 3.5 * torch.rand(h, generator=gen)),
        "Bm": rnd(b, t, g, n),
        "Cm": rnd(b, t, g, n),
    }
    if with_state:
        inputs["initial_state"] = 0.5 * rnd(b, h, p, n)
    d_o = rnd(b, t, h, p)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, fs = reference_ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["Bm"], leaves["Cm"], leaves.get("initial_state"), chunk)
    (y * d_o).sum().backward()
    y_loop, fs_loop = loop_ssd(*(inputs[k] for k in ("x", "dt", "A", "Bm", "Cm")), inputs.get("initial_state"))
    err = max(((y.double() - y_loop).abs().max() / y_loop.abs().max()).item(), ((fs.double() - fs_loop).abs().max() / fs_loop.abs().max()).item())
    assert err < 1e-5, f"{name}: ssd_minimal vs token loop {err:.2e}"
    out = dict(inputs)
    out["dO"] = d_o
    out["y"] = y.detach()
    out["final_state"] = fs.detach()
    for k, v in leaves.items():
        out["grad_" + k] = v.grad
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
    meta = {"reference": SOURCE, "torch": torch.__version__, "block_len": str(chunk), "script": "tests/golden/make_ssd.py"}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.safetensors")
    save_file(out, path, metadata=meta)
    print(f"{path}: {os.path.getsize(path)} bytes; ssd_minimal vs fp64 loop {err:.1e}; reference: {SOURCE}")


if __name__ == "__main__":
    # One group with an initial state (ssd_minimal called directly), T = 21 over chunks of 8.
    make("ssd_g1_state", b=2, t=21, h=2, p=3, g=1, n=4, chunk=8, with_state=True, seed=1)
    # Two groups of two heads (per-head calls), no initial state, T = 19 over chunks of 8.
    make("ssd_g2", b=1, t=19, h=4, p=2, g=2, n=3, chunk=8, with_state=False, seed=2)
