#!/usr/bin/env python3
"""Golden fixtures for the `gated_delta_rule` op (Gated DeltaNet core), written by fla.

Reference: fla-org/flash-linear-attention, fla/ops/gated_delta_rule/naive.py
(`naive_recurrent_gated_delta_rule`, cross-checked against `naive_chunk_gated_delta_rule`),
from the PyPI package fla-core (MIT licence), https://github.com/fla-org/flash-linear-attention.
fla's package __init__ imports triton, which is absent on CPU-only machines, so the file is
loaded directly from the installed package by path (it needs only torch and einops):

    python -m venv /tmp/venv && /tmp/venv/bin/pip install torch && /tmp/venv/bin/pip install --no-deps fla-core einops safetensors
    /tmp/venv/bin/python tests/golden/make_gated_delta_rule.py

Semantics (../shared/reference/ops.md §4): q, k [B,T,H,K], v [B,T,H,V], g (log decay), beta
[B,T,H], optional initial_state [B,H,K,V]; o and final_state [B,H,K,V]; scale K^-1/2. k is
L2-normalised, beta = sigmoid(.), g = -softplus(.) as the layer feeds them. Each fixture holds the
inputs under the op's names plus dO, and the reference outputs o, final_state and
grad_<input> = d sum(o*dO) / d input, all float32 (fla's naive functions compute in fp32).
"""
import importlib.metadata
import importlib.util
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def load_fla_naive():
    spec = importlib.util.find_spec("fla")  # locates the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fla-core is not installed: pip install --no-deps fla-core einops")
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", "gated_delta_rule", "naive.py")
    mod_spec = importlib.util.spec_from_file_location("fla_gdr_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod, path


NAIVE, NAIVE_PATH = load_fla_naive()
FLA_VERSION = importlib.metadata.version("fla-core")


def make(name, b, t, h, dk, dv, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32)  # noqa: E731
    inputs = {
        "q": rnd(b, t, h, dk),
        "k": F.normalize(rnd(b, t, h, dk), p=2, dim=-1),
        "v": rnd(b, t, h, dv),
        "g": -F.softplus(rnd(b, t, h)) * 0.7,
        "beta": torch.sigmoid(1.5 * rnd(b, t, h)),
    }
    if with_state:
        inputs["initial_state"] = 0.5 * rnd(b, h, dk, dv)
    d_o = rnd(b, t, h, dv)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    o, fs = NAIVE.naive_recurrent_gated_delta_rule(
        leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves["g"],
        initial_state=leaves.get("initial_state"), output_final_state=True,
    )
    (o * d_o).sum().backward()
    with torch.no_grad():
        oc, fc = NAIVE.naive_chunk_gated_delta_rule(
            inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], chunk_size=16,
            initial_state=inputs.get("initial_state"), output_final_state=True,
        )
    err = max(((o - oc).abs().max() / o.abs().max()).item(), ((fs - fc).abs().max() / fs.abs().max()).item())
    assert err < 1e-4, f"{name}: fla naive recurrent vs chunk {err:.2e}"
    out = dict(inputs)
    out["dO"] = d_o
    out["o"] = o.detach()
    out["final_state"] = fs.detach()
    for k, v in leaves.items():
        out["grad_" + k] = v.grad
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
    meta = {
        "reference": "fla-core %s fla/ops/gated_delta_rule/naive.py::naive_recurrent_gated_delta_rule" % FLA_VERSION,
        "torch": torch.__version__,
        "script": "tests/golden/make_gated_delta_rule.py",
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.safetensors")
    save_file(out, path, metadata=meta)
    print(f"{path}: {os.path.getsize(path)} bytes; fla naive recurrent vs chunk {err:.1e}; {NAIVE_PATH}")


if __name__ == "__main__":
    # With an initial state, T = 21 (not a multiple of any chunk).
    make("gated_delta_rule_state", b=2, t=21, h=2, dk=4, dv=3, with_state=True, seed=1)
    # No initial state, T = 70 (crosses mixscale's chunk of 64 once).
    make("gated_delta_rule_t70", b=1, t=70, h=1, dk=3, dv=2, with_state=False, seed=2)
