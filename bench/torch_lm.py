#!/usr/bin/env python3
"""PyTorch (eager, f32, CPU) reference of mixscale's attention language model, for
`mixscale bench`: times full training steps and prints ONE JSON line to stdout.

Mirrors the mixscale attention-LM config (defaults = the bench config: vocab 512,
d_model 128, 4 layers, 4 heads, ffn_hidden 352 swiglu, tied embeddings, seq 256,
batch 16). KEEP IN SYNC WITH src/model (the Rust side) -- in particular:
  * RMSNorm: x / sqrt(mean(x^2, -1) + 1e-6) * g, g init ones (also used as optional
    per-head q/k norm over head_dim, applied BEFORE RoPE);
  * RoPE: half-split layout (NeoX / HF `rotate_half`), theta_i = theta^(-2i/D),
    positions 0..T-1;
  * init: embedding and all Linear weights N(0, 0.02), residual output projections
    (attn Wo, FFN down) N(0, 0.02/sqrt(2*n_layers)), untied head N(0, 0.02); no biases;
  * GQA: query head h uses kv head h // (H/Hkv) (repeat_interleave);
  * AdamW(betas=(0.9, 0.95), eps=1e-8, wd=0.1 on >=2-D params, 0 on norm gains),
    global-norm grad clipping at 1.0; loss = mean CE over all B*T next-token targets.
Data are random token ids from a seeded generator, a fresh (B, T+1) batch per step.
loss_first is the loss of the very first (warmup) step (~ln(vocab) at init);
loss_last is the loss of the last timed step. --profile prints torch.profiler's
top ops by self CPU time for one extra (untimed) step to stderr.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.g


def rope_tables(seq_len, head_dim, theta):
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # theta^(-2i/D)
    freqs = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]     # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)                                             # [T, D]
    return emb.cos().float(), emb.sin().float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):  # x [B, H, T, D], cos/sin [T, D]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.h, self.hkv, self.d = a.n_heads, a.n_kv_heads, a.head_dim
        self.wq = nn.Linear(a.d_model, self.h * self.d, bias=False)
        self.wk = nn.Linear(a.d_model, self.hkv * self.d, bias=False)
        self.wv = nn.Linear(a.d_model, self.hkv * self.d, bias=False)
        self.wo = nn.Linear(self.h * self.d, a.d_model, bias=False)
        self.q_norm = RMSNorm(self.d) if a.qk_norm else None
        self.k_norm = RMSNorm(self.d) if a.qk_norm else None

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.h, self.d)
        k = self.wk(x).view(B, T, self.hkv, self.d)
        v = self.wv(x).view(B, T, self.hkv, self.d)
        if self.q_norm is not None:  # per-head RMSNorm over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.hkv != self.h:  # GQA: query head h -> kv head h // (H/Hkv)
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(D)
        return self.wo(o.transpose(1, 2).reshape(B, T, self.h * self.d))


class FFN(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.kind = a.ffn
        if self.kind == "swiglu":
            self.gate = nn.Linear(a.d_model, a.ffn_hidden, bias=False)
        self.up = nn.Linear(a.d_model, a.ffn_hidden, bias=False)
        self.down = nn.Linear(a.ffn_hidden, a.d_model, bias=False)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.relu(self.up(x)).square())  # relu2


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(a.d_model), Attention(a)
        self.ffn_norm, self.ffn = RMSNorm(a.d_model), FFN(a)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class LM(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.emb = nn.Parameter(torch.empty(a.vocab, a.d_model))
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.d_model)
        self.head = None if a.tied else nn.Parameter(torch.empty(a.vocab, a.d_model))
        cos, sin = rope_tables(a.seq_len, a.head_dim, a.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # init: everything N(0, 0.02), residual output projections scaled down
        for p in [self.emb] + ([self.head] if self.head is not None else []):
            nn.init.normal_(p, 0.0, 0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                resid = name.endswith("attn.wo") or name.endswith("ffn.down")
                nn.init.normal_(m.weight, 0.0, 0.02 / math.sqrt(2 * a.n_layers) if resid else 0.02)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = F.embedding(idx, self.emb)
        for blk in self.blocks:
            x = blk(x, self.cos[:T], self.sin[:T])
        logits = self.norm(x) @ (self.emb if self.head is None else self.head).t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=None, help="default d_model / n_heads")
    p.add_argument("--ffn-hidden", type=int, default=352)
    p.add_argument("--ffn", choices=["swiglu", "relu2"], default="swiglu")
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--tied", dest="tied", action="store_true", default=True)
    p.add_argument("--untied", dest="tied", action="store_false")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--profile", action="store_true", help="print top ops of one step to stderr")
    a = p.parse_args(argv)
    a.head_dim = a.head_dim or a.d_model // a.n_heads
    if a.n_heads % a.n_kv_heads or a.head_dim % 2 or a.steps < 1:
        p.error("need n_heads % n_kv_heads == 0, even head_dim, steps >= 1")
    return a


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = LM(a)
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed)

    def step():
        tok = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = model(tok[:, :-1], tok[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.detach()

    losses = [step() for _ in range(a.warmup)]
    t0 = time.perf_counter()
    for _ in range(a.steps):
        losses.append(step())
    elapsed = time.perf_counter() - t0

    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)

    cfg = {k: getattr(a, k) for k in ("vocab", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                      "head_dim", "ffn_hidden", "ffn", "qk_norm", "rope_theta",
                                      "tied", "seq_len", "batch", "warmup", "steps", "seed", "lr")}
    print(json.dumps({
        "impl": "torch", "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "tokens_per_s": a.batch * a.seq_len * a.steps / elapsed,
        "step_ms": 1000.0 * elapsed / a.steps,
        "params_total": sum(p.numel() for p in params),
        "loss_first": float(losses[0]), "loss_last": float(losses[-1]), "config": cfg}))


if __name__ == "__main__":
    main()
