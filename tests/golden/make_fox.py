"""Golden fixtures for the `fox` op (forgetting attention) from fla-core's reference.

Reference: fla-org/flash-linear-attention, `fla/ops/forgetting_attn/naive.py::naive_forgetting_attn`
(installed from PyPI as `fla-core`; MIT licence). The naive module is loaded from its file so that
fla's package __init__ (which needs triton) is not imported. Like the reference, everything runs in
float32. Each fixture holds the inputs q, k, v [B,T,H*,D], g [B,T,Hq] (log forget gate), dO, and
the outputs o and grad_{q,k,v,g} of L = sum(o * dO) (torch autograd through the reference).

Run (writes tests/golden/fox_*.safetensors):
    python3 -m venv /tmp/venv && echo <torch site-packages> > /tmp/venv/lib/python3.X/site-packages/torch.pth
    /tmp/venv/bin/pip install --no-deps fla-core einops safetensors
    /tmp/venv/bin/python tests/golden/make_fox.py
"""
import importlib.util
import os

import fla
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "fla_fox_naive", os.path.join(os.path.dirname(fla.__file__), "ops", "forgetting_attn", "naive.py"))
naive = importlib.util.module_from_spec(spec)
spec.loader.exec_module(naive)

# (name, B, T, Hq, Hkv, D, gate logit mean, seed): GQA with T not a multiple of 64; T crossing two
# 64-row tiles with strong forgetting; T = 1.
CASES = [
    ("fox_gqa_t37", 2, 37, 4, 2, 8, 1.0, 0),
    ("fox_t130_strong", 1, 130, 2, 2, 16, -1.0, 1),
    ("fox_t1", 1, 1, 2, 1, 4, 0.0, 2),
]

for name, b, t, hq, hkv, d, mu, seed in CASES:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=gen)
    k = torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, d, generator=gen)
    g = F.logsigmoid(1.5 * torch.randn(b, t, hq, generator=gen) + mu)
    d_o = torch.randn(b, t, hq, d, generator=gen)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
    o = naive.naive_forgetting_attn(*leaves)
    (o * d_o).sum().backward()
    out = {"q": q, "k": k, "v": v, "g": g, "dO": d_o, "o": o.detach()}
    for n, x in zip("qkvg", leaves):
        out[f"grad_{n}"] = x.grad
    out = {n: x.contiguous().float() for n, x in out.items()}
    path = os.path.join(HERE, f"{name}.safetensors")
    save_file(out, path, metadata={"source": "fla-core " + fla.__version__ + " naive_forgetting_attn", "dtype": "float32"})
    print(path, {n: tuple(x.shape) for n, x in out.items()})
