"""Golden fixtures for RWKV-7 (op `rwkv7`, the time-mix layer and the channel-mix FFN).

Writes, next to this file:
  rwkv7_op.safetensors     WKV-7 op cases `<case>.<name>`: inputs r, w, k, v, a, b
                           (`[B,T,H,K]`, v `[B,T,H,V]`, w = decay in (0,1)), optional
                           initial_state `[B,H,V,K]`, dO; outputs o, final_state and grad_<input>
                           (d/d input of sum(o * dO)), float32.
  rwkv7_layer.safetensors  two RWKV-7 time-mix layers (`layers.0.*`, `layers.1.*`, our names and
                           [in, out] layout), input x `[1,T,C]`, outputs y0 (layer 0, sets v_first)
                           and y1 (layer 1 on the same x with layer 0's v_first), and a channel-mix
                           (`cmix.*`, output cmix_y); float64.

References (run, not ported; our Rust is written from the equations):
  * fla-core (PyPI, MIT, https://github.com/fla-org/flash-linear-attention)
    `fla/ops/generalized_delta_rule/dplr/naive.py::dplr_recurrence`, loaded from the installed
    package by file path (its package __init__ needs triton). Its conventions differ from ours
    (ops.md §6): state K×V (ours V×K, transposed), gk = log w, q scaled by K^-1/2 inside (we
    pass r·√K to undo it), layout [B,H,T,D].
  * BlinkDL/RWKV-LM (Apache-2.0) `RWKV-v7/rwkv_v7_numpy.py` (by johanwind),
    https://github.com/BlinkDL/RWKV-LM/blob/main/RWKV-v7/rwkv_v7_numpy.py — `time_mixing`,
    `channel_mixing` and `group_norm`, read from a checkout by path ($RWKV_V7_NUMPY; the file
    loads a checkpoint at import, so only those definitions are taken and run).

Run: python tests/golden/make_rwkv7.py   (needs torch, numpy, einops, safetensors, fla-core;
e.g. a venv with `pip install --no-deps fla-core einops safetensors` next to torch).
"""
import importlib.util
import os

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))


def load_fla_naive():
    spec = importlib.util.find_spec("fla")
    root = os.path.dirname(spec.origin)
    path = os.path.join(root, "ops", "generalized_delta_rule", "dplr", "naive.py")
    s = importlib.util.spec_from_file_location("fla_dplr_naive", path)
    m = importlib.util.module_from_spec(s)
    s.loader.exec_module(m)
    return m.dplr_recurrence


BLINK_NAMES = ("layer_norm", "group_norm", "sigmoid", "time_mixing", "channel_mixing")


def load_blinkdl(n_head, head_size):
    """`time_mixing`, `channel_mixing` (and the lambdas they use) from BlinkDL's
    `RWKV-v7/rwkv_v7_numpy.py`, read from the path in $RWKV_V7_NUMPY (a checkout of
    BlinkDL/RWKV-LM). The file loads a checkpoint at import, so only those top-level
    definitions are taken (by AST) and run, with its module globals N_HEAD / HEAD_SIZE set."""
    import ast

    path = os.environ.get("RWKV_V7_NUMPY")
    if not path:
        raise SystemExit("set RWKV_V7_NUMPY to BlinkDL/RWKV-LM's RWKV-v7/rwkv_v7_numpy.py")
    src = open(path).read()
    keep = []
    for node in ast.parse(src).body:
        names = [node.name] if isinstance(node, ast.FunctionDef) else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if any(n in BLINK_NAMES for n in names):
            keep.append(ast.get_source_segment(src, node))
    ns = {"np": np, "N_HEAD": n_head, "HEAD_SIZE": head_size}
    exec(compile("\n\n".join(keep), path, "exec"), ns)
    missing = [n for n in BLINK_NAMES if n not in ns]
    if missing:
        raise SystemExit(f"{path}: definitions not found: {missing}")
    return ns["time_mixing"], ns["channel_mixing"]


def op_case(rng, dplr, b, t, h, dk, dv, with_state, strong):
    f = lambda *s, sc=1.0: (rng.standard_normal(s) * sc).astype(np.float32)
    sig = lambda z: 1 / (1 + np.exp(-z))
    r, k, v = f(b, t, h, dk), f(b, t, h, dk), f(b, t, h, dv)
    scale = 5.0 if strong else np.exp(-0.5)
    w = np.exp(-scale * sig(f(b, t, h, dk, sc=2.0))).astype(np.float32)
    kk = f(b, t, h, dk)
    kk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
    lr = sig(f(b, t, h, dk, sc=1.5))
    a, bb = (-kk).astype(np.float32), (kk * lr).astype(np.float32)
    s0 = f(b, h, dv, dk, sc=0.5) if with_state else None
    d_o = f(b, t, h, dv)

    ins = {"r": r, "w": w, "k": k, "v": v, "a": a, "b": bb}
    if with_state:
        ins["initial_state"] = s0
    tt = {n: torch.tensor(x, dtype=torch.float32, requires_grad=True) for n, x in ins.items()}
    bhtd = lambda x: x.permute(0, 2, 1, 3)  # [B,T,H,D] -> [B,H,T,D]
    o, s = dplr(
        q=bhtd(tt["r"]) * dk**0.5,  # undo fla's internal q * K^-1/2 (RWKV-7 uses scale 1)
        k=bhtd(tt["k"]),
        v=bhtd(tt["v"]),
        alpha=bhtd(tt["a"]),
        beta=bhtd(tt["b"]),
        gk=bhtd(torch.log(tt["w"])),
        initial_state=tt["initial_state"].transpose(-1, -2) if with_state else None,
        output_final_state=True,
    )
    o = bhtd(o)  # back to [B,T,H,V]
    s = s.transpose(-1, -2)  # fla K×V -> ours V×K
    (o * torch.tensor(d_o)).sum().backward()

    # Cross-check: the WKV-7 state update as BlinkDL's numpy reference states it, f64, per (batch, head).
    o_np = np.zeros((b, t, h, dv))
    for bi in range(b):
        for hi in range(h):
            S = s0[bi, hi].astype(np.float64) if with_state else np.zeros((dv, dk))
            for ti in range(t):
                col = lambda x: x[bi, ti, hi].astype(np.float64)[:, None]
                S = S * col(w).T + S @ col(a) * col(bb).T + col(v) * col(k).T
                o_np[bi, ti, hi] = (S @ col(r))[:, 0]
    rel = np.abs(o_np - o.detach().numpy()).max() / np.abs(o_np).max()
    assert rel < 1e-4, f"fla dplr_recurrence vs BlinkDL numpy WKV: {rel}"

    out = dict(ins)
    out["dO"] = d_o
    out["o"] = o.detach().numpy()
    out["final_state"] = s.detach().contiguous().numpy()
    for n, x in tt.items():
        out["grad_" + n] = x.grad.numpy()
    return out


def layer_params(rng, c, n, dw, da, dv, dg, layer):
    """Random (not init) values for every parameter, in BlinkDL's numpy layout."""
    f = lambda *s, sc=0.5: rng.standard_normal(s) * sc
    p = {}
    for m in ["mr", "mw", "mk", "mv", "ma", "mg"]:
        p[m] = rng.uniform(0, 1, c)
    p["w_bias"], p["r_k"] = f(c, sc=1.0), f(c)
    p["Ww1"], p["Ww2"] = f(c, dw), f(dw, c)
    p["Wa1"], p["Wa2"], p["a_bias"] = f(c, da), f(da, c), f(c)
    p["Wg1"], p["Wg2"] = f(c, dg), f(dg, c)
    if layer > 0:
        p["Wv2"], p["Wv1"], p["v_bias"] = f(dv, c), f(c, dv), f(c)
    p["k_k"], p["k_a"] = 1 + f(c, sc=0.2), 1 + f(c, sc=0.2)
    for m in ["Wr", "Wk", "Wv", "Wo"]:
        p[m] = f(c, c, sc=c**-0.5)
    p["ln_w"], p["ln_b"] = 1 + f(c, sc=0.2), f(c, sc=0.2)
    return p


def as_list(p):
    head = [p[k] for k in ["mr", "mw", "mk", "mv", "ma", "mg", "w_bias", "r_k", "Ww1", "Ww2", "Wa1", "Wa2", "a_bias", "Wg1", "Wg2"]]
    mid = [p[k] for k in ["Wv2", "Wv1", "v_bias"]] if "Wv1" in p else []
    return head + mid + [p[k] for k in ["k_k", "k_a", "Wr", "Wk", "Wv", "Wo", "ln_w", "ln_b"]]


def ours(p, prefix, h, n):
    """Our parameter names and layouts (weights [in, out]; see src/blocks/rwkv7.rs)."""
    m = {"x_r": "mr", "x_w": "mw", "x_k": "mk", "x_v": "mv", "x_a": "ma", "x_g": "mg", "w0": "w_bias",
         "w1": "Ww1", "w2": "Ww2", "a0": "a_bias", "a1": "Wa1", "a2": "Wa2", "g1": "Wg1", "g2": "Wg2",
         "k_k": "k_k", "k_a": "k_a", "ln_w": "ln_w", "ln_b": "ln_b"}
    if "Wv1" in p:
        m.update({"v0": "v_bias", "v1": "Wv1", "v2": "Wv2"})
    out = {f"{prefix}.{k}": p[v] for k, v in m.items()}
    for k, v in {"wr": "Wr", "wk": "Wk", "wv": "Wv", "wo": "Wo"}.items():
        out[f"{prefix}.{k}"] = p[v].T.copy()
    out[f"{prefix}.r_k"] = p["r_k"].reshape(h, n)
    return out


def main():
    global N_HEAD, HEAD_SIZE
    rng = np.random.default_rng(20250127)
    dplr = load_fla_naive()
    cases = {
        "state_t21": dict(b=2, t=21, h=2, dk=6, dv=5, with_state=True, strong=False),
        "nostate_t9": dict(b=1, t=9, h=2, dk=4, dv=4, with_state=False, strong=False),
        "strong_t19": dict(b=1, t=19, h=1, dk=4, dv=3, with_state=True, strong=True),
    }
    op = {}
    for name, kw in cases.items():
        for k, x in op_case(rng, dplr, **kw).items():
            op[f"{name}.{k}"] = np.ascontiguousarray(x, dtype=np.float32)
    save_file(op, os.path.join(HERE, "rwkv7_op.safetensors"))

    # Two time-mix layers + a channel-mix, token by token through BlinkDL's numpy functions.
    c, n, t, hidden = 8, 4, 9, 12
    N_HEAD, HEAD_SIZE = c // n, n
    time_mixing, channel_mixing = load_blinkdl(N_HEAD, HEAD_SIZE)
    dims = dict(dw=4, da=3, dv=2, dg=5)
    p0 = layer_params(rng, c, n, layer=0, **dims)
    p1 = layer_params(rng, c, n, layer=1, **dims)
    x = rng.standard_normal((t, c))
    st0 = (np.zeros(c), np.zeros((N_HEAD, n, n)))
    st1 = (np.zeros(c), np.zeros((N_HEAD, n, n)))
    y0, y1 = np.zeros((t, c)), np.zeros((t, c))
    for i in range(t):
        out0, v_first, lx, S = time_mixing(x[i].copy(), None, st0[0], st0[1], as_list(p0))
        st0 = (lx, S)
        y0[i] = out0
        out1, _, lx, S = time_mixing(x[i].copy(), v_first, st1[0], st1[1], as_list(p1))
        st1 = (lx, S)
        y1[i] = out1
    mix, wk, wv = rng.uniform(0, 1, c), rng.standard_normal((hidden, c)) * c**-0.5, rng.standard_normal((c, hidden)) * hidden**-0.5
    cy, last = np.zeros((t, c)), np.zeros(c)
    for i in range(t):
        cy[i], last = channel_mixing(x[i], last, mix, wk, wv)
    layer = {"x": x[None], "y0": y0[None], "y1": y1[None], "cmix_y": cy[None],
             "cmix.x_k": mix, "cmix.w_up": wk.T.copy(), "cmix.w_down": wv.T.copy()}
    layer.update(ours(p0, "layers.0", N_HEAD, n))
    layer.update(ours(p1, "layers.1", N_HEAD, n))
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in layer.items()}, os.path.join(HERE, "rwkv7_layer.safetensors"))
    print("wrote rwkv7_op.safetensors, rwkv7_layer.safetensors")


if __name__ == "__main__":
    main()
