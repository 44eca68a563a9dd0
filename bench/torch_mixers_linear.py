"""Linear-recurrent mixers of the PyTorch reference, each with the same chunked algorithm as
mixscale's op: Gated DeltaNet (blocks/gated_deltanet.rs, ops/gated_delta_rule.rs: WY/UT form),
Mamba-2 (blocks/mamba2.rs, ops/ssd_chunked.rs: chunked SSD) and RWKV-7 time mix
(blocks/rwkv7.rs, ops/rwkv7_chunk.rs: chunkwise DPLR). Written from the equations."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_common import (causal_conv, const, dt_bias_init, normal, orthogonal, param, rms_norm,
                          token_shift, uniform, values)


def _chunks(x, c):
    """[B,T,H,X] -> [N,B,H,C,X] (T zero-padded to a multiple of c)."""
    B, T, H, X = x.shape
    n = -(-T // c)
    x = F.pad(x, (0, 0, 0, 0, 0, n * c - T))
    return x.view(B, n, c, H, X).permute(1, 0, 3, 2, 4)


def _unchunk(o, T):
    """[N,B,H,C,X] -> [B,T,H,X]."""
    n, B, H, c, X = o.shape
    return o.permute(1, 0, 3, 2, 4).reshape(B, n * c, H, X)[:, :T]


def gdr_chunked(q, k, v, g, beta, chunk):
    """Gated delta rule, chunkwise WY/UT form. q, k [B,T,H,K], v [B,T,H,V], g (log decay),
    beta [B,T,H]; per token S <- e^g S; u = beta (v - S^T k); S += k u^T; o = S^T q / sqrt(K)."""
    B, T, H, K = q.shape
    c = min(chunk, T)
    q = _chunks(q, c) * K ** -0.5
    k, v = _chunks(k, c), _chunks(v, c)
    g = _chunks(g.unsqueeze(-1), c).squeeze(-1)  # [N,B,H,C]
    beta = _chunks(beta.unsqueeze(-1), c).squeeze(-1)
    eye = torch.eye(c)
    strict = torch.ones(c, c).tril(-1)
    gc = g.cumsum(-1)
    gamma = ((gc[..., :, None] - gc[..., None, :]) * strict).exp() * strict + eye
    kt = k.transpose(-1, -2)
    L = (k @ kt) * gamma * beta[..., :, None] * strict
    A = eye + L  # unit lower triangular
    u = torch.linalg.solve_triangular(A, v * beta[..., None], upper=False, unitriangular=True)
    decay = gc.exp()
    w = torch.linalg.solve_triangular(A, k * (beta * decay)[..., None], upper=False, unitriangular=True)
    p = (q @ kt) * gamma
    qg = q * decay[..., None]
    to_end = (gc[..., -1:] - gc).exp()
    kd = (k * to_end[..., None]).transpose(-1, -2)
    s_decay = gc[..., -1].exp()[..., None, None]
    S = q.new_zeros(B, H, K, v.shape[-1])
    os = []
    for i in range(q.shape[0]):
        vn = u[i] - w[i] @ S
        os.append(qg[i] @ S + p[i] @ vn)
        S = S * s_decay[i] + kd[i] @ vn
    return _unchunk(torch.stack(os), T)


class GatedDeltaNet(nn.Module):
    def __init__(self, o, dims):
        super().__init__()
        d, std = dims["d_model"], dims["init_std"]
        h = o.get("num_heads", 4)
        kdim = o.get("head_dim") or 3 * d // (4 * h)
        vdim = int(round(kdim * o.get("expand_v", 2.0)))
        self.h, self.k, self.v = h, kdim, vdim
        self.chunk, self.eps, self.neg = o.get("chunk_size", 64), o.get("norm_eps", 1e-5), o.get("allow_neg_eigval", False)
        self.wq = normal((d, h * kdim), std)
        self.wk = normal((d, h * kdim), std)
        self.wv = normal((d, h * vdim), std)
        self.wa = normal((d, h), std)
        self.wb = normal((d, h), std)
        self.wg = normal((d, h * vdim), std) if o.get("use_gate", True) else None
        self.wo = normal((h * vdim, d), dims["out_std"])
        self.conv = o.get("use_short_conv", True)
        if self.conv:
            cs = o.get("conv_size", 4)
            self.q_conv = normal((h * kdim, cs), std, decay=False)
            self.k_conv = normal((h * kdim, cs), std, decay=False)
            self.v_conv = normal((h * vdim, cs), std, decay=False)
        self.A_log = values((16.0 * (1.0 - torch.rand(h, dtype=torch.float64))).log())  # ln U(0, 16]
        self.dt_bias = dt_bias_init(h, 1e-3, 0.1, 1e-4)
        self.o_norm = const((vdim,), 1.0)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        h, kd, vd = self.h, self.k, self.v

        def proj(w, cw):
            y = x @ w
            return F.silu(causal_conv(y, cw) if self.conv else y)

        def l2(t):
            return t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)

        q = l2(proj(self.wq, getattr(self, "q_conv", None)).view(B, T, h, kd))
        k = l2(proj(self.wk, getattr(self, "k_conv", None)).view(B, T, h, kd))
        v = proj(self.wv, getattr(self, "v_conv", None)).view(B, T, h, vd)
        beta = torch.sigmoid(x @ self.wb) * (2.0 if self.neg else 1.0)
        g = -self.A_log.exp() * F.softplus(x @ self.wa + self.dt_bias)
        o = rms_norm(gdr_chunked(q, k, v, g, beta, self.chunk), self.o_norm, self.eps)
        if self.wg is not None:
            o = o * F.silu(x @ self.wg).view(B, T, h, vd)
        return o.reshape(B, T, h * vd) @ self.wo


def ssd_chunked(x, dt, A, Bm, Cm, chunk):
    """Chunked SSD. x [B,T,H,P], dt [B,T,H], A [H], Bm, Cm [B,T,G,N]:
    h_t = exp(dt A) h_{t-1} + dt x_t B_t^T; y_t = h_t C_t."""
    Bsz, T, H, P = x.shape
    G = Bm.shape[2]
    Bm = Bm.repeat_interleave(H // G, dim=2)
    Cm = Cm.repeat_interleave(H // G, dim=2)
    q = min(chunk, T)
    xs = _chunks(x * dt[..., None], q)  # X = dt x  [N,B,H,Q,P]
    bh, ch = _chunks(Bm, q), _chunks(Cm, q)
    la = _chunks((dt * A).unsqueeze(-1), q).squeeze(-1)  # [N,B,H,Q]
    tril = torch.ones(q, q, dtype=torch.bool).tril()
    acum = la.double().cumsum(-1)
    seg = (acum[..., :, None] - acum[..., None, :]).masked_fill(~tril, 0.0)
    Lm = seg.to(x.dtype).exp() * tril
    to_end = seg[..., -1, :].to(x.dtype).exp()  # [N,B,H,Q]
    from_start = acum.to(x.dtype).exp()
    chunk_decay = acum[..., -1].to(x.dtype).exp()[..., None, None]
    y_diag = ((ch @ bh.transpose(-1, -2)) * Lm) @ xs
    states = (xs * to_end[..., None]).transpose(-1, -2) @ bh  # [N,B,H,P,N]
    s = x.new_zeros(Bsz, H, P, Bm.shape[-1])
    s_in = []
    for c in range(xs.shape[0]):
        s_in.append(s)
        s = s * chunk_decay[c] + states[c]
    s_in = torch.stack(s_in)
    y_off = (ch * from_start[..., None]) @ s_in.transpose(-1, -2)
    return _unchunk(y_diag + y_off, T)


class Mamba2(nn.Module):
    def __init__(self, o, dims):
        super().__init__()
        d, std = dims["d_model"], dims["init_std"]
        self.di = o.get("expand", 2) * d
        self.p = o.get("headdim", 64)
        self.h = self.di // self.p
        self.g, self.n = o.get("ngroups", 1), o.get("d_state", 128)
        self.dconv = o.get("d_conv", 4)
        conv_dim = self.di + 2 * self.g * self.n
        self.o = o
        self.in_proj = normal((d, 2 * self.di + 2 * self.g * self.n + self.h), std)
        self.out_proj = normal((self.di, d), dims["out_std"])
        bound = 1.0 / math.sqrt(self.dconv)
        self.conv_w = uniform((conv_dim, self.dconv), o.get("conv_init") or bound, decay=True)
        self.conv_b = uniform((conv_dim,), bound, decay=False) if o.get("conv_bias", True) else None
        self.dt_bias = dt_bias_init(self.h, o.get("dt_min", 1e-3), o.get("dt_max", 0.1), o.get("dt_init_floor", 1e-4))
        lo, hi = o.get("a_init_range", [1.0, 16.0])
        self.A_log = values((lo + torch.rand(self.h, dtype=torch.float64) * (hi - lo)).log())
        self.D = const((self.di if o.get("d_has_hdim") else self.h,), 1.0)
        self.norm = const((self.di,), 1.0) if o.get("rmsnorm", True) else None

    def forward(self, x, ctx):
        B, T, _ = x.shape
        di, h, p, g, n = self.di, self.h, self.p, self.g, self.n
        zxbcdt = x @ self.in_proj
        z, xbc, dt_raw = zxbcdt.split([di, di + 2 * g * n, h], dim=-1)
        xbc = causal_conv(xbc, self.conv_w)
        if self.conv_b is not None:
            xbc = xbc + self.conv_b
        xbc = F.silu(xbc)
        xh = xbc[..., :di].reshape(B, T, h, p)
        bm = xbc[..., di:di + g * n].reshape(B, T, g, n)
        cm = xbc[..., di + g * n:].reshape(B, T, g, n)
        dt = F.softplus(dt_raw + self.dt_bias)
        lim = self.o.get("dt_limit")
        if lim:
            dt = dt.clamp(lim[0], lim[1])
        y = ssd_chunked(xh, dt, -self.A_log.exp(), bm, cm, self.o.get("chunk_size", 256))
        dsk = self.D.view(1, 1, h, p) if self.o.get("d_has_hdim") else self.D.view(1, 1, h, 1)
        y = (y + xh * dsk).reshape(B, T, di)
        gate = F.silu(z)
        if self.norm is None:
            y = y * gate
        else:
            pre = y if self.o.get("norm_before_gate") else y * gate
            eps = self.o.get("norm_eps", 1e-5)
            normed = rms_norm(pre.view(B, T, g, di // g), 1.0, eps).reshape(B, T, di) * self.norm
            y = normed * gate if self.o.get("norm_before_gate") else normed
        return y @ self.out_proj


def rwkv7_chunked(r, w, k, v, a, b, chunk):
    """WKV-7, chunkwise. r, w, k, a, b [B,T,H,K], v [B,T,H,V], w in (0,1); per token (from the
    undecayed S): S = S diag(w) + (S a) b^T + v k^T; o = S r. Works with Z = S^T [K,V]."""
    Bsz, T, H, K = r.shape
    c = min(chunk, T)
    lw = _chunks(w.log(), c)  # padding: ln w = 0
    r, k, v, a, b = (_chunks(t, c) for t in (r, k, v, a, b))
    eye = torch.eye(c)
    strict = torch.ones(c, c).tril(-1)
    G = lw.cumsum(-2)  # G_t = sum_{s<=t} ln w_s  [N,B,H,C,K]
    g_ex = G - lw  # G^-_t = sum_{s<t}
    to_end = G[..., -1:, :] - G  # sum_{s>i}
    t_i_s = torch.arange(c)
    between = ((t_i_s[None, :, None] < t_i_s[None, None, :]) & (t_i_s[None, None, :] < t_i_s[:, None, None])).to(lw.dtype)
    # between[t, i, s] = 1 for i < s < t; E[t,i,:] = exp(sum_{i<s<t} ln w_s) for i < t
    diff = torch.einsum("tis,...sk->...tik", between, lw)
    E = diff.exp() * strict[..., None]
    rw = r * lw.exp()

    def mix(key):
        p = E * key.unsqueeze(-3)  # [...,t,i,K]
        return torch.einsum("...tik,...tk->...ti", p, a), torch.einsum("...tik,...tk->...ti", p, rw)

    a_ak, a_rk = mix(k)
    a_ab, a_rb = mix(b)
    a_rk = a_rk + eye * (r * k).sum(-1, keepdim=True)
    a_rb = a_rb + eye * (r * b).sum(-1, keepdim=True)
    Mi = eye - a_ab  # unit lower triangular
    wmat = torch.linalg.solve_triangular(Mi, a * g_ex.exp(), upper=False, unitriangular=True)
    u_base = torch.linalg.solve_triangular(Mi, a_ak @ v, upper=False, unitriangular=True)
    o_base = a_rk @ v
    rg = r * G.exp()
    tail = to_end.exp()
    kd, bd = (k * tail).transpose(-1, -2), (b * tail).transpose(-1, -2)
    z_in = kd @ v
    z_decay = G[..., -1, :].exp()[..., None]  # [N,B,H,K,1]
    Z = r.new_zeros(Bsz, H, K, v.shape[-1])
    os = []
    for i in range(r.shape[0]):
        u = u_base[i] + wmat[i] @ Z
        os.append(rg[i] @ Z + o_base[i] + a_rb[i] @ u)
        Z = Z * z_decay[i] + z_in[i] + bd[i] @ u
    return _unchunk(torch.stack(os), T)


def lora_dim(factor, c):
    return max(32, int(round(factor * math.sqrt(c) / 32.0)) * 32)


class Rwkv7(nn.Module):
    """RWKV-7 time mix with BlinkDL's init (W_o = 0, LoRA down = 0, up orthogonal x 0.1)."""

    def __init__(self, o, dims):
        super().__init__()
        c, n = dims["d_model"], o.get("head_size", 64)
        self.c, self.n, self.h = c, n, c // n
        self.chunk, self.eps = o.get("chunk_size", 16), o.get("norm_eps", 64e-5)
        li, nl = dims["layer_idx"], max(dims["n_layers"], 1)
        r0 = li / (nl - 1) if dims["n_layers"] > 1 else 0.0
        r1 = 1.0 - li / nl
        i = torch.arange(c, dtype=torch.float64)
        ddd = i / c
        linear = i / max(c - 1, 1) - 0.5
        half = (n - 1) / 2
        zz = ((i % n) - half) / half if half > 0 else torch.zeros(c, dtype=torch.float64)
        zigzag = zz * zz.abs()
        for name, pw in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            setattr(self, name, values(1.0 - ddd ** (pw * r1)))
        bound = 1.0 / math.sqrt(c)
        self.wr = uniform((c, c), 0.5 * bound, decay=True)
        self.wk = uniform((c, c), 0.05 * bound, decay=True)
        self.wv = uniform((c, c), 0.5 * bound, decay=True)
        self.wo = param(torch.zeros(c, c), decay=True)
        dw = o.get("decay_low_rank_dim") or lora_dim(2.5, c)
        da = o.get("a_low_rank_dim") or lora_dim(2.5, c)
        dv = o.get("v_low_rank_dim") or lora_dim(1.7, c)
        dg = o.get("gate_low_rank_dim") or lora_dim(5.0, c)
        loras = [("w", dw), ("a", da), ("g", dg)] + ([("v", dv)] if li > 0 else [])
        for pre, dd in loras:
            setattr(self, pre + "1", param(torch.zeros(c, dd), decay=False))
            setattr(self, pre + "2", param(orthogonal(dd, c, 0.1), decay=False))
        self.has_v = li > 0
        cf = max(c - 1, 1)
        self.w0 = values(-6.0 + 6.0 * (i / cf) ** (1.0 + r0 ** 0.3) + 0.5 + 2.5 * zigzag)
        self.a0 = values(-0.19 + 0.3 * zigzag + 0.4 * linear)
        if self.has_v:
            self.v0 = values(0.73 - 0.4 * linear)
        self.k_k = values(0.71 - 0.1 * linear)
        self.k_a = const((c,), 1.02)
        self.r_k = const((self.h, n), -0.04)
        self.ln_w = const((c,), ((1.0 + li) / nl) ** 0.7)
        self.ln_b = const((c,), 0.0)

    def forward(self, x, ctx):
        B, T, C = x.shape
        h, n = self.h, self.n
        xx = token_shift(x) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r, k, v = xr @ self.wr, xk @ self.wk, xv @ self.wv
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2))
        if self.has_v and ctx.get("v_first") is not None:
            v = v + (ctx["v_first"] - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        else:
            ctx["v_first"] = v
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = (k * self.k_k).view(B, T, h, n)
        kk = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k * (1.0 + (a - 1.0) * self.k_a)
        r4, k4, v4, a4, w4 = (t.view(B, T, h, n) for t in (r, k, v, a, w))
        y = rwkv7_chunked(r4, w4, k4, v4, -kk, kk * a4, self.chunk)
        mean = y.mean(-1, keepdim=True)
        var = (y - mean).pow(2).mean(-1, keepdim=True)
        y = ((y - mean) / torch.sqrt(var + self.eps)).reshape(B, T, C) * self.ln_w + self.ln_b
        bonus = ((r4 * k4 * self.r_k).sum(-1, keepdim=True) * v4).reshape(B, T, C)
        return ((y + bonus) * g) @ self.wo
