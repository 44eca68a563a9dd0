"""Shared pieces of the PyTorch references of mixscale's models (bench/README.md).

Conventions, mirroring mixscale (src/model/params.rs and the blocks):
  * every weight is a bare `nn.Parameter` stored `[in, out]` (so `x @ W`), named exactly as
    mixscale names it (`layers.0.mixer.wq`, ...), so the parameter tables can be compared
    name by name and shape by shape;
  * each parameter carries `p.decay` (AdamW weight decay on/off), set as mixscale sets it:
    N(0, std) matrices (>= 2-D) decay, vectors/constants and the explicitly listed
    exceptions (conv weights of GDN, LoRAs of RWKV-7, ...) do not;
  * init *distributions* match mixscale (values differ: mixscale seeds its own PRNG per
    parameter name, torch uses torch.manual_seed).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def param(t, decay=None):
    """An nn.Parameter from tensor `t` (f32) with the mixscale decay flag (default: ndim >= 2)."""
    p = nn.Parameter(t.float())
    p.decay = (t.dim() >= 2) if decay is None else bool(decay)
    return p


def normal(shape, std, decay=None):
    return param(torch.randn(*shape) * std, decay)


def uniform(shape, bound, decay=None):
    return param((torch.rand(*shape) * 2.0 - 1.0) * bound, decay)


def const(shape, value, decay=False):
    return param(torch.full(tuple(shape), float(value)), decay)


def values(v, decay=False):
    return param(torch.as_tensor(v, dtype=torch.float64), decay)


def orthogonal(rows, cols, scale):
    """`[rows, cols]` with orthonormal rows (rows <= cols) or columns (rows > cols), times
    `scale` and torch's gain sqrt(rows/cols) when rows > cols (BlinkDL `ortho_init`, as
    mixscale's `blocks::rwkv7::orthogonal`)."""
    n, length = min(rows, cols), max(rows, cols)
    qm, r = torch.linalg.qr(torch.randn(length, n, dtype=torch.float64))
    qm = qm * torch.sign(torch.diagonal(r))[None, :]  # [length, n], orthonormal columns
    gain = (math.sqrt(rows / cols) if rows > cols else 1.0) * scale
    return gain * (qm.t() if rows <= cols else qm)


def rms_norm(x, g, eps):
    """x / sqrt(mean(x^2, -1) + eps) * g (mixscale ops::norm)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def token_shift(x):
    """[B,T,C] -> previous token at every position (zeros at t = 0)."""
    return F.pad(x, (0, 0, 1, 0))[:, :-1]


def causal_conv(x, w):
    """Causal depthwise conv, x [B,T,C], w [C,cs]: y_t = sum_i w[:, i] x_{t-(cs-1)+i}
    (fla ShortConvolution / mixscale ops::short_conv), as F.conv1d with groups = C."""
    cs = w.shape[1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (cs - 1, 0)), w.unsqueeze(1), groups=w.shape[0])
    return y.transpose(1, 2)


def rope_tables(seq_len, head_dim, theta):
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x, cos, sin):
    """Half-split RoPE (NeoX / HF rotate_half); x [B,T,H,D], cos/sin [T,D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat([-x2, x1], dim=-1) * sin[:, None, :]


def softplus_inv(dt):
    return dt + math.log(-math.expm1(-dt))


def dt_bias_init(h, dt_min, dt_max, floor):
    """softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored (Mamba2 / GDN)."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    dts = [max(math.exp(lo + torch.rand(()).item() * (hi - lo)), floor) for _ in range(h)]
    return values([softplus_inv(d) for d in dts])
