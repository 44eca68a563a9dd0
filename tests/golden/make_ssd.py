#!/usr/bin/env python3
"""Golden fixtures for the `ssd` op (Mamba-2 core), written by the reference implementation.

Reference: state-spaces/mamba, mamba_ssm/modules/ssd_minimal.py (`segsum`,
`ssd_minimal_discrete`), https://github.com/state-spaces/mamba/blob/main/mamba_ssm/modules/ssd_minimal.py
Copyright (c) 2024, Albert Gu and Tri Dao; Apache License 2.0. mamba_ssm cannot be installed on a
CPU-only machine (its build needs CUDA and that file imports the triton kernel at the top), so the
two functions are vendored below verbatim, minus that import. When mamba_ssm *is* importable the
installed copy is used instead. Either way the fixture records which one in its metadata.

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

try:  # pragma: no cover - only on machines with mamba_ssm + triton
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    SOURCE = "mamba_ssm (installed)"
except Exception:  # noqa: BLE001
    SOURCE = "mamba_ssm/modules/ssd_minimal.py (vendored verbatim in make_ssd.py)"

    # ---- vendored verbatim from state-spaces/mamba mamba_ssm/modules/ssd_minimal.py ----------
    def segsum(x):
        """More stable segment sum calculation."""
        T = x.size(-1)
        x = repeat(x, "... d -> ... d e", e=T)
        mask = torch.tril(torch.ones(T, T, device=x.device, dtype=bool), diagonal=-1)
        x = x.masked_fill(~mask, 0)
        x_segsum = torch.cumsum(x, dim=-2)
        mask = torch.tril(torch.ones(T, T, device=x.device, dtype=bool), diagonal=0)
        x_segsum = x_segsum.masked_fill(~mask, -torch.inf)
        return x_segsum

    def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
        """
        Arguments:
            X: (batch, length, n_heads, d_head)
            A: (batch, length, n_heads)
            B: (batch, length, n_groups, d_state)
            C: (batch, length, n_groups, d_state)
        Return:
            Y: (batch, length, n_heads, d_head)
        """
        assert X.dtype == A.dtype == B.dtype == C.dtype
        assert X.shape[1] % block_len == 0

        # Rearrange into blocks/chunks
        X, A, B, C = [rearrange(x, "b (c l) ... -> b c l ...", l=block_len) for x in (X, A, B, C)]

        A = rearrange(A, "b c l h -> b h c l")
        A_cumsum = torch.cumsum(A, dim=-1)

        # 1. Compute the output for each intra-chunk (diagonal blocks)
        L = torch.exp(segsum(A))
        Y_diag = torch.einsum("bclgn,bcsgn,bhcls,bcshp->bclhp", C, B, L, X)

        # 2. Compute the state for each intra-chunk
        # (right term of low-rank factorization of off-diagonal blocks; B terms)
        decay_states = torch.exp((A_cumsum[:, :, :, -1:] - A_cumsum))
        states = torch.einsum("bclgn,bhcl,bclhp->bcghpn", B, decay_states, X)

        # 3. Compute the inter-chunk SSM recurrence; produces correct SSM states at chunk boundaries
        # (middle term of factorization of off-diag blocks; A terms)
        if initial_states is None:
            initial_states = torch.zeros_like(states[:, :1])
        states = torch.cat([initial_states, states], dim=1)
        decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
        new_states = torch.einsum("bhzc,bcghpn->bzghpn", decay_chunk, states)
        states, final_state = new_states[:, :-1], new_states[:, -1]

        # 4. Compute state -> output conversion per chunk
        # (left term of low-rank factorization of off-diagonal blocks; C terms)
        state_decay_out = torch.exp(A_cumsum)
        Y_off = torch.einsum("bclgn,bcghpn,bhcl->bclhp", C, states, state_decay_out)

        # Add output of intra-chunk and inter-chunk terms (diagonal and off-diagonal blocks)
        Y = rearrange(Y_diag + Y_off, "b c l h p -> b (c l) h p")
        return Y, final_state
    # ---- end of vendored code -----------------------------------------------------------------


def reference_ssd(x, dt, A, Bm, Cm, s0, block_len):
    """ops.md `ssd` through ssd_minimal_discrete: y [B,T,H,P], final_state [B,H,P,N]."""
    b, t, h, p = x.shape
    g = Bm.shape[2]
    pad = (-t) % block_len
    X = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))
    Ad = F.pad(A[None, None, :] * dt, (0, 0, 0, pad))
    Bp = F.pad(Bm, (0, 0, 0, 0, 0, pad))
    Cp = F.pad(Cm, (0, 0, 0, 0, 0, pad))
    if g == 1:
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
