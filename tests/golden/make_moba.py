"""Golden fixtures for the `moba` op from MoBA's reference algorithm.

Reference: MoonshotAI/MoBA, `moba/moba_naive.py::moba_attn_varlen_naive`
(https://github.com/MoonshotAI/MoBA/blob/main/moba/moba_naive.py, MIT licence; not on PyPI).
`moba_attn_varlen_naive` below is an independent line-for-line port of that function's algorithm
(same inputs, same steps, same float32 arithmetic), not a verbatim copy:
  1. per packed sequence, mean key of every `moba_chunk_size` block (the last one may be partial);
  2. gate = q . mean_k in float32, [H, S, N];
  3. block i gets -inf for queries before the end of block i, then +inf for queries inside it
     (only fully past blocks compete; the own block is always chosen and counts toward top-k);
  4. top-k (k = min(moba_topk, N)) over the gate; a block is attended where it is among the top-k
     indices and not below the k-th value (the reference's threshold + index mask);
  5. the block mask expanded to tokens, plus the causal mask; softmax((qk + gate) * scale) v.
The gate only enters as 0 / -inf, so no gradient flows through it (computed under no_grad here).

Each fixture: q, k, v [B,T,H,D], dO, block_size and top_k (0-d int64), o and grad_{q,k,v} of
L = sum(o * dO). The B sequences are packed as varlen (cu_seqlens = [0, T, 2T, ...]), as the
reference takes them. Inputs are drawn so that no query has a near-tie (margin < 1e-3) at its
top-k boundary.

Run: python tests/golden/make_moba.py  (needs torch and safetensors; writes tests/golden/moba_*.safetensors)
"""
import math
import os

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))


def moba_attn_varlen_naive(q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk):
    """Port of MoBA's brute-force reference. q, k, v: [S, H, D] packed; returns [S, H, D]."""
    del max_seqlen  # part of the reference's signature, unused there too
    scale = q.shape[-1] ** -0.5
    outs = []
    for s0, s1 in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        n = s1 - s0
        qs, ks, vs = q[s0:s1], k[s0:s1], v[s0:s1]
        n_blocks = math.ceil(n / moba_chunk_size)
        starts = [i * moba_chunk_size for i in range(n_blocks)]
        mean_k = torch.stack([ks[a:min(n, a + moba_chunk_size)].mean(0) for a in starts])  # [N, H, D]
        with torch.no_grad():
            gate = torch.einsum("shd,nhd->hsn", qs.float(), mean_k.float())  # [H, S, N]
            for i, a in enumerate(starts):
                gate[:, : a + moba_chunk_size, i] = -math.inf  # not fully past
                gate[:, a : a + moba_chunk_size, i] = math.inf  # own block
            top_val, top_idx = torch.topk(gate, k=min(moba_topk, n_blocks), dim=-1, largest=True, sorted=False)
            chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, top_idx, True)
            chosen &= gate >= top_val.min(-1, keepdim=True).values
            block_bias = torch.where(chosen, 0.0, -math.inf)  # [H, S, N]
            token_bias = block_bias.repeat_interleave(moba_chunk_size, dim=-1)[:, :, :n]
            future = torch.ones(n, n, dtype=torch.bool).triu(1)
            token_bias = token_bias.masked_fill(future, -math.inf)
        logits = (torch.einsum("xhd,yhd->hxy", qs.float(), ks.float()) + token_bias) * scale
        outs.append(torch.einsum("hxy,yhd->xhd", logits.softmax(-1), vs.float()).type_as(q))
    return torch.cat(outs, 0)


def min_margin(q, k, bs, top_k):
    """Smallest gap between the chosen and the best unchosen past-block score over all queries."""
    b, t, h, d = q.shape
    worst = math.inf
    if top_k == 1:
        return worst  # only the own block: nothing is ranked
    for bb in range(b):
        for i in range(t):
            c = i // bs
            if c <= top_k - 1:
                continue
            means = torch.stack([k[bb, n * bs:(n + 1) * bs].mean(0) for n in range(c)])  # [c, H, D]
            s = torch.einsum("hd,nhd->hn", q[bb, i], means).sort(-1, descending=True).values
            worst = min(worst, (s[:, top_k - 2] - s[:, top_k - 1]).min().item())
    return worst


# (name, B, T, H, D, block_size, top_k, seed): T not a multiple of the block; blocks of 16 over
# 130 tokens; T smaller than one block; top_k = 1 (own block only).
CASES = [
    ("moba_t45_bs8_k3", 2, 45, 2, 8, 8, 3, 0),
    ("moba_t130_bs16_k4", 1, 130, 3, 16, 16, 4, 1),
    ("moba_t20_bs32_k2", 1, 20, 2, 4, 32, 2, 2),
    ("moba_t40_bs6_k1", 1, 40, 2, 4, 6, 1, 3),
]

for name, b, t, h, d, bs, top_k, seed in CASES:
    gen = torch.Generator().manual_seed(seed)
    while True:
        q, k, v, d_o = (torch.randn(b, t, h, d, generator=gen) for _ in range(4))
        if min_margin(q, k, bs, top_k) > 1e-3:
            break
    leaves = [x.clone().reshape(b * t, h, d).requires_grad_(True) for x in (q, k, v)]
    cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32)
    o = moba_attn_varlen_naive(*leaves, cu, t, bs, top_k).reshape(b, t, h, d)
    (o * d_o).sum().backward()
    out = {"q": q, "k": k, "v": v, "dO": d_o, "o": o.detach()}
    for n, x in zip("qkv", leaves):
        out[f"grad_{n}"] = x.grad.reshape(b, t, h, d)
    out = {n: x.contiguous().float() for n, x in out.items()}
    out["block_size"] = torch.tensor(bs, dtype=torch.int64)
    out["top_k"] = torch.tensor(top_k, dtype=torch.int64)
    path = os.path.join(HERE, f"{name}.safetensors")
    save_file(out, path, metadata={"source": "port of MoonshotAI/MoBA moba_attn_varlen_naive", "dtype": "float32"})
    print(path, {n: tuple(x.shape) for n, x in out.items()})
