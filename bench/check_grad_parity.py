#!/usr/bin/env python3
"""Parity of mixscale and the PyTorch reference on IDENTICAL weights and an IDENTICAL batch:
loss and the gradient of every parameter (bench/README.md, "Check that the references are the
same models").

Inputs, all written by mixscale itself:
  * a checkpoint folder of `mixscale train CFG --set train.optimizer.lr=1e-30 --set
    train.grad_clip=0 --stop-at-step 1 --out RUN` (RUN/ckpt-0000001): model.safetensors holds the
    initial weights (lr 1e-30 leaves them unchanged in f32), optimizer.safetensors AdamW's first
    moment after one step, m = (1 - beta1) g, so g = m / (1 - beta1) (no clipping with
    grad_clip 0), and state.json the step-1 training loss (`first_loss`);
  * the first batch of the same run: `mixscale bench CFG --worker DIR --batch B --seq-len T
    --steps 1 --warmup 0` writes DIR/tokens.u32 (bench and train draw batch i from the same
    data position, i * B);
  * the resolved model JSON (the `model:` section of RUN/config.yaml as JSON).

The torch model (bench/torch_model.py) is built from the JSON, its parameters are overwritten
with mixscale's by name, and loss and gradients are computed in f32 and f64. Prints, per
parameter, max |g_torch - g_mixscale| and the relative error ||diff|| / ||g||.

    bench/.venv/bin/python bench/check_grad_parity.py --ckpt RUN/ckpt-0000001 \
        --tokens DIR/tokens.u32 --model-json spec.json --batch 2 --seq-len 64
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_model import LM  # noqa: E402

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "U32": np.uint32, "I64": np.int64}


def read_safetensors(path):
    """{name: torch tensor} from a .safetensors file (header length u64 LE, JSON header, data)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(raw[base + a:base + b], dtype=DTYPES[v["dtype"]]).reshape(v["shape"])
        out[k] = torch.from_numpy(arr.copy())
    return out


def first_batch(path, B, T):
    raw = torch.from_numpy(np.fromfile(path, dtype="<u4").astype("int64"))
    view = raw[:3 * B * T].view(3, B, T)
    inputs, targets, mask = view
    return inputs, targets, None if bool((mask != 0).all()) else (mask != 0).float()


def torch_grads(spec, weights, batch, T, dtype):
    torch.manual_seed(0)
    model = LM(spec, T)
    named = dict(model.mixscale_names())
    missing = sorted(set(named) - set(weights))
    extra = sorted(set(weights) - set(named))
    if missing or extra:
        raise SystemExit(f"parameter names differ: torch-only {missing}, mixscale-only {extra}")
    with torch.no_grad():
        for k, p in named.items():
            if tuple(p.shape) != tuple(weights[k].shape):
                raise SystemExit(f"{k}: torch shape {tuple(p.shape)} vs mixscale {tuple(weights[k].shape)}")
            p.copy_(weights[k].to(p.dtype))
    model = model.to(dtype)
    named = dict(model.mixscale_names())
    inputs, targets, mask = batch
    loss = model.train_step_loss(inputs, targets, None if mask is None else mask.to(dtype))
    return float(loss), {k: p.grad.detach().double() for k, p in named.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--model-json", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--train-steps", type=int, default=0, help="also train torch this many steps from mixscale's init")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--mixscale-json", help="the bench worker's mixscale.json (its losses are printed beside)")
    a = ap.parse_args()
    with open(a.model_json) as f:
        spec = json.load(f)
    spec = spec.get("model", spec)
    weights = read_safetensors(os.path.join(a.ckpt, "model.safetensors"))
    optim = read_safetensors(os.path.join(a.ckpt, "optimizer.safetensors"))
    with open(os.path.join(a.ckpt, "state.json")) as f:
        state = json.load(f)
    g_mx = {k[2:]: v.double() / (1.0 - a.beta1) for k, v in optim.items() if k.startswith("m.")}
    batch = first_batch(a.tokens, a.batch, a.seq_len)
    l32, g32 = torch_grads(spec, weights, batch, a.seq_len, torch.float32)
    l64, g64 = torch_grads(spec, weights, batch, a.seq_len, torch.float64)
    print(f"loss: mixscale {state['first_loss']:.8f}  torch f32 {l32:.8f}  torch f64 {l64:.8f}")
    print(f"{'parameter':<34} {'|g| mixscale':>12} {'|g| torch64':>12} {'rel mx-t64':>11} {'rel t32-t64':>11} {'max|mx-t64|':>12}")
    worst = 0.0
    for k in sorted(g64):
        gm, gt, g3 = g_mx.get(k), g64[k], g32[k]
        if gm is None:
            print(f"{k:<34} (no mixscale gradient)")
            continue
        nt = float(gt.norm())
        rel = float((gm - gt).norm()) / max(nt, 1e-30)
        rel32 = float((g3 - gt).norm()) / max(nt, 1e-30)
        worst = max(worst, rel)
        print(f"{k:<34} {float(gm.norm()):>12.4e} {nt:>12.4e} {rel:>11.2e} {rel32:>11.2e} {float((gm - gt).abs().max()):>12.3e}")
    print(f"worst relative gradient difference mixscale vs torch f64: {worst:.3e}")
    if a.train_steps:
        train_from(spec, weights, a)


def train_from(spec, weights, a):
    """Trains torch from mixscale's initial weights on mixscale's batches (the bench worker's
    tokens file holds --train-steps batches) with AdamW as `mixscale bench` (constant lr, decay on
    the parameters mixscale decays, global-norm clip), and prints its losses beside those of the
    bench worker's mixscale.json (same config, same init seed)."""
    torch.manual_seed(0)
    model = LM(spec, a.seq_len)
    named = dict(model.mixscale_names())
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(weights[k])
    params = list(named.values())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.decay], "weight_decay": a.weight_decay},
         {"params": [p for p in params if not p.decay], "weight_decay": 0.0}],
        lr=a.lr, betas=(a.beta1, a.beta2), eps=1e-8, foreach=False)
    raw = torch.from_numpy(np.fromfile(a.tokens, dtype="<u4").astype("int64")).view(-1, 3, a.batch, a.seq_len)
    losses = []
    for i in range(a.train_steps):
        inputs, targets, mask = raw[i]
        opt.zero_grad(set_to_none=True)
        losses.append(float(model.train_step_loss(inputs, targets, None if bool((mask != 0).all()) else (mask != 0).float())))
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
    print("torch losses    ", " ".join(f"{x:.5f}" for x in losses))
    if a.mixscale_json:
        with open(a.mixscale_json) as f:
            mx = json.load(f)["losses"]
        print("mixscale losses ", " ".join(f"{x:.5f}" for x in mx[:a.train_steps]))


if __name__ == "__main__":
    main()
