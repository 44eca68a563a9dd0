"""Attention-family mixers of the PyTorch reference: softmax attention (blocks/attention.rs),
MoBA (blocks/moba.rs, ops/moba.rs) and FoX / FoX Pro (blocks/fox.rs, ops/fox.rs).
Written from mixscale's equations; see bench/README.md."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_common import apply_rope, causal_conv, const, normal, rms_norm, rope_tables, uniform


def _heads(o, d_model):
    h = o.get("num_heads", 4)
    hkv = o.get("num_kv_heads") or h
    hd = o.get("head_dim") or d_model // h
    return h, hkv, hd


class Attention(nn.Module):
    """Llama attention: bias-free q/k/v/o, GQA, optional per-head QK-norm (before RoPE),
    optional residual short conv on q, k, v, half-split RoPE, causal softmax (1/sqrt(D))."""

    def __init__(self, o, dims):
        super().__init__()
        d = dims["d_model"]
        self.h, self.hkv, self.hd = _heads(o, d)
        self.eps = o.get("norm_eps", 1e-6)
        std = dims["init_std"]
        self.wq = normal((d, self.h * self.hd), std)
        self.wk = normal((d, self.hkv * self.hd), std)
        self.wv = normal((d, self.hkv * self.hd), std)
        self.wo = normal((self.h * self.hd, d), dims["out_std"])
        if o.get("qk_norm", False):
            self.q_norm = const((self.hd,), 1.0)
            self.k_norm = const((self.hd,), 1.0)
        else:
            self.q_norm = self.k_norm = None
        cs = o.get("short_conv", 0)
        if cs > 0:  # PyTorch Conv1d default U(+-1/sqrt(cs)), not decayed
            b = 1.0 / math.sqrt(cs)
            self.q_conv = uniform((self.h * self.hd, cs), b, decay=False)
            self.k_conv = uniform((self.hkv * self.hd, cs), b, decay=False)
            self.v_conv = uniform((self.hkv * self.hd, cs), b, decay=False)
        self.short_conv = cs
        self.use_rope = True
        cos, sin = rope_tables(dims["max_seq_len"], self.hd, o.get("rope_theta", 10000.0))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def qkv(self, x):
        B, T, _ = x.shape
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        if self.short_conv:
            q, k, v = q + causal_conv(q, self.q_conv), k + causal_conv(k, self.k_conv), v + causal_conv(v, self.v_conv)
        q = q.view(B, T, self.h, self.hd)
        k = k.view(B, T, self.hkv, self.hd)
        v = v.view(B, T, self.hkv, self.hd)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        cos, sin = self.cos[:T], self.sin[:T]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def core(self, q, k, v):  # [B,H,T,D] each (k, v already expanded to H heads)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.hkv != self.h:  # query head h reads kv head h // (H/Hkv)
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
        o = self.core(q, k, v)
        return o.transpose(1, 2).reshape(B, T, self.h * self.hd) @ self.wo


class Moba(Attention):
    """MoBA: attention whose query i sees its own block and the top_k-1 fully past blocks with
    the largest q_i . mean(k_block) (selection without gradient), as a 0/-inf mask."""

    def __init__(self, o, dims):
        super().__init__(o, dims)
        self.bs, self.top_k = o.get("block_size", 256), o.get("top_k", 4)

    @torch.no_grad()
    def mask(self, q, k):  # q, k [B,H,T,D] -> bool [B,H,T,T] (True = attend)
        B, H, T, D = q.shape
        bs = self.bs
        nb = T // bs  # full blocks (only full blocks can be fully past)
        own = torch.arange(T) // bs
        blk = torch.zeros(B, H, T, (T + bs - 1) // bs, dtype=torch.bool)
        blk[:, :, torch.arange(T), own] = True
        kk = self.top_k - 1
        if nb > 0 and kk > 0:
            means = k[:, :, : nb * bs].reshape(B, H, nb, bs, D).mean(3)
            s = q @ means.transpose(-1, -2)  # [B,H,T,nb]
            past = torch.arange(nb)[None, :] < own[:, None]  # [T, nb]
            s = s.masked_fill(~past, float("-inf"))
            top = s.topk(min(kk, nb), dim=-1)
            sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
            blk[..., :nb] |= sel
        tok = blk.repeat_interleave(bs, dim=-1)[..., :T]
        return tok & torch.ones(T, T, dtype=torch.bool).tril()

    def core(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q, k))


class Fox(nn.Module):
    """Forgetting attention: softmax(q.k/sqrt(D) + sum_{j<s<=i} log sigmoid(x W_f + b_f)) v per
    query head; Pro options: QK-norm (per-head gains, eps 1e-5), output RMS norm, sigmoid
    output gate, k/v token shift with per-kv-head mix sigmoid(x W_ks)."""

    def __init__(self, o, dims):
        super().__init__()
        d = dims["d_model"]
        self.h, self.hkv, self.hd = _heads(o, d)
        std = dims["init_std"]
        self.eps = o.get("norm_eps", 1e-6)
        self.wq = normal((d, self.h * self.hd), std)
        self.wk = normal((d, self.hkv * self.hd), std)
        self.wv = normal((d, self.hkv * self.hd), std)
        self.wo = normal((self.h * self.hd, d), dims["out_std"])
        self.wf = normal((d, self.h), std)
        self.bf = const((self.h,), o.get("fgate_bias_init", 0.0))
        self.wks = normal((d, self.hkv), std) if o.get("use_k_shift") else None
        self.wvs = normal((d, self.hkv), std) if o.get("use_v_shift") else None
        self.wog = normal((d, self.h * self.hd), std) if o.get("use_output_gate") else None
        qk = o.get("qk_norm", False)
        self.q_norm = const((self.h, self.hd), 1.0) if qk else None
        self.k_norm = const((self.hkv, self.hd), 1.0) if qk else None
        self.o_norm = const((self.h, self.hd), 1.0) if o.get("use_output_norm") else None
        self.use_rope = o.get("use_rope", False)
        if self.use_rope:
            cos, sin = rope_tables(dims["max_seq_len"], self.hd, o.get("rope_theta", 500000.0))
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q = (x @ self.wq).view(B, T, self.h, self.hd)
        k = (x @ self.wk).view(B, T, self.hkv, self.hd)
        v = (x @ self.wv).view(B, T, self.hkv, self.hd)
        for name, w in (("k", self.wks), ("v", self.wvs)):
            if w is not None:
                a = torch.sigmoid(x @ w).unsqueeze(-1)  # [B,T,Hkv,1]
                cur = k if name == "k" else v
                prev = F.pad(cur, (0, 0, 0, 0, 1, 0))[:, :-1]
                mixed = cur + (prev - cur) * a
                k, v = (mixed, v) if name == "k" else (k, mixed)
        if self.q_norm is not None:
            q = rms_norm(q, 1.0, 1e-5) * self.q_norm
            k = rms_norm(k, 1.0, 1e-5) * self.k_norm
        if self.use_rope:
            q, k = apply_rope(q, self.cos[:T], self.sin[:T]), apply_rope(k, self.cos[:T], self.sin[:T])
        g = F.logsigmoid(x @ self.wf + self.bf)  # [B,T,H]
        cum = g.cumsum(1).transpose(1, 2)  # [B,H,T]
        bias = cum[..., :, None] - cum[..., None, :]  # F_i - F_j
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        bias = bias.masked_fill(~causal, float("-inf"))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.hkv != self.h:
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.hd) + bias
        o = (torch.softmax(s, -1) @ v).transpose(1, 2)  # [B,T,H,D]
        if self.o_norm is not None:
            o = rms_norm(o, 1.0, self.eps) * self.o_norm
        o = o.reshape(B, T, self.h * self.hd)
        if self.wog is not None:
            o = o * torch.sigmoid(x @ self.wog)
        return o @ self.wo
