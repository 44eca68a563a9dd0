#!/usr/bin/env python3
"""PyTorch (eager, f32, CPU) reference of mixscale's language models, for `mixscale bench`:
times full training steps and prints ONE JSON line to stdout.

Normal use: `mixscale bench` writes a job file and runs `torch_lm.py --model-json JOB`. The job
holds mixscale's *resolved* model config (the JSON of ModelSpec after --set overrides, with
every block option filled in), the optimizer (AdamW lr/betas/eps/weight decay), grad clip,
batch, seq_len, warmup, steps, threads, seed and the path of the token batches mixscale itself
trains on (u32 LE, per step inputs [B,T] then targets [B,T]), so both sides see the same data.
Without `--model-json` the legacy flags describe an attention LM (defaults = the attention
preset) and the data are random tokens.

Every preset's mixers live in torch_mixers_attn.py / torch_mixers_linear.py, the FFN / MoE in
torch_moe.py, the model and MTP objective in torch_model.py (see bench/README.md). A step is
zero_grad, forward, backward, global-norm clip, AdamW step (decay only on the parameters
mixscale decays); with `init_weights` in the job (a safetensors file of mixscale's initial
weights) the model starts from mixscale's exact values instead of a fresh init. Output fields: tokens_per_s, step_ms (timed steps only, warmup excluded),
params_total, param_table ({name: [shape, decay]} with mixscale's names), peak_rss_kb
(getrusage ru_maxrss of this process), losses (main-head loss of every step, warmup
included), grad_norms (global norm before clipping, every step), loss_first, loss_last,
threads, torch_version. --profile prints torch.profiler's top ops for one extra untimed step
to stderr.
"""
import argparse
import json
import resource
import sys
import time

import torch

from torch_model import LM


def legacy_spec(a):
    """The attention-LM model config described by the legacy flags."""
    return {
        "vocab_size": a.vocab, "d_model": a.d_model, "n_layers": a.n_layers, "layer_pattern": ["attention"],
        "blocks": {"attention": {"num_heads": a.n_heads, "num_kv_heads": a.n_kv_heads, "head_dim": a.head_dim,
                                 "qk_norm": a.qk_norm, "rope_theta": a.rope_theta, "norm_eps": 1e-6, "short_conv": 0}},
        "ffn": {"kind": a.ffn, "hidden_size": a.ffn_hidden}, "norm_eps": 1e-6, "tied_embeddings": a.tied,
        "init": {"std": 0.02, "residual_rescale": True},
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-json", action="append", help="job file written by `mixscale bench` (overrides the "
                   "model/run flags; repeat to run several jobs one after another, one JSON line each)")
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
    p.add_argument("--params-only", action="store_true", help="build the model, print the parameter table, no training")
    p.add_argument("--serve", action="store_true", help="one job, timed steps on demand (mixscale bench --interleave): "
                   "after the warmup print {\"ready\": true}; per stdin line `run N` time the next N steps and print "
                   "{\"elapsed\": seconds}; on `done` print the result line and exit")
    a = p.parse_args(argv)
    a.head_dim = a.head_dim or a.d_model // a.n_heads
    if a.model_json:
        jobs = []
        for path in a.model_json:
            with open(path) as f:
                jobs.append(json.load(f))
    else:
        if a.n_heads % a.n_kv_heads or a.head_dim % 2:
            p.error("need n_heads % n_kv_heads == 0 and an even head_dim")
        jobs = [{"model": legacy_spec(a), "batch": a.batch, "seq_len": a.seq_len, "warmup": a.warmup, "steps": a.steps,
               "threads": a.threads, "seed": a.seed, "grad_clip": 1.0, "tokens_file": None,
               "optimizer": {"lr": a.lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}}]
    if any(j["steps"] < 1 for j in jobs) and not a.params_only:
        p.error("steps must be >= 1")
    if a.serve and len(jobs) != 1:
        p.error("--serve takes exactly one job")
    return a, jobs


def batches(job, vocab):
    """(inputs, targets, mask or None) per step: mixscale's batches when a tokens file is given
    (u32 LE; per step inputs [B,T], targets [B,T], mask [B,T]), else random tokens."""
    B, T, n = job["batch"], job["seq_len"], job["warmup"] + job["steps"] + 1
    path = job.get("tokens_file")
    if path:
        import numpy as np
        raw = torch.from_numpy(np.fromfile(path, dtype="<u4").astype("int64"))
        per = 3 * B * T
        if raw.numel() < per or raw.numel() % per:
            raise SystemExit(f"{path}: expected a multiple of {per} u32 values, got {raw.numel()}")
        steps = raw.numel() // per
        view = raw.view(steps, 3, B, T)
        out = []
        for i in range(n):
            inputs, targets, mask = view[i % steps]
            out.append((inputs, targets, None if bool((mask != 0).all()) else (mask != 0).float()))
        return out
    gen = torch.Generator().manual_seed(job["seed"])
    out = []
    for _ in range(n):
        tok = torch.randint(0, vocab, (B, T + 1), generator=gen)
        out.append((tok[:, :-1], tok[:, 1:], None))
    return out


def load_safetensors(path):
    """{name: f32 tensor} from a safetensors file (f32/f64 entries; no extra package)."""
    import struct
    import numpy as np
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, base = json.loads(raw[8:8 + n]), 8 + n
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dt = {"F32": "<f4", "F64": "<f8"}[v["dtype"]]
        out[k] = torch.from_numpy(np.frombuffer(raw[base + a:base + b], dtype=dt).copy()).float().view(v["shape"])
    return out


def main():
    a, jobs = parse_args()
    for job in jobs:
        run(a, job)


def run(a, job):
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    spec = job["model"]
    model = LM(spec, job["seq_len"])
    named = model.mixscale_names()
    params = [p for _, p in named]
    table = {n: [list(p.shape), bool(p.decay)] for n, p in named}
    if job.get("init_weights"):  # start from mixscale's initial values (equivalence checks)
        w = load_safetensors(job["init_weights"])
        with torch.no_grad():
            for n, p in named:
                p.copy_(w[n])
    total = sum(p.numel() for p in params)
    if a.params_only:
        print(json.dumps({"impl": "torch", "params_total": total, "param_table": table}))
        return
    o = job["optimizer"]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.decay], "weight_decay": o["weight_decay"]},
         {"params": [p for p in params if not p.decay], "weight_decay": 0.0}],
        lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"], foreach=False)
    data = batches(job, spec["vocab_size"])
    clip = job.get("grad_clip", 1.0)

    def step(i):
        inputs, targets, mask = data[i]
        opt.zero_grad(set_to_none=True)
        loss = model.train_step_loss(inputs, targets, mask)
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        norms.append(float(norm))
        opt.step()
        return float(loss)

    norms = []
    losses = [step(i) for i in range(job["warmup"])]
    if a.serve:
        elapsed, timed = serve(step, losses, job["warmup"], job["steps"])
    else:
        t0 = time.perf_counter()
        for i in range(job["warmup"], job["warmup"] + job["steps"]):
            losses.append(step(i))
        elapsed, timed = time.perf_counter() - t0, job["steps"]

    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(len(data) - 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)

    tokens = job["batch"] * job["seq_len"] * timed
    print(json.dumps({
        "impl": "torch", "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "tokens_per_s": tokens / elapsed, "step_ms": 1000.0 * elapsed / timed,
        "params_total": total, "param_table": table,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "losses": losses, "grad_norms": norms[: len(losses)], "loss_first": losses[0], "loss_last": losses[-1],
        "config": {k: job[k] for k in ("batch", "seq_len", "warmup", "steps", "seed")}}))


def serve(step, losses, first, limit):
    """--serve: timed steps on demand from stdin (`run N`, `done`); returns (seconds, steps)."""
    print(json.dumps({"ready": True}), flush=True)
    elapsed, i = 0.0, first
    for line in sys.stdin:
        cmd = line.split()
        if cmd == ["done"]:
            break
        if len(cmd) != 2 or cmd[0] != "run" or not cmd[1].isdigit():
            raise SystemExit(f"torch_lm.py --serve: unknown command {line.strip()!r} (run N, done)")
        n = int(cmd[1])
        if i + n > first + limit:
            raise SystemExit(f"torch_lm.py --serve: {n} more steps asked for, {first + limit - i} prepared")
        t0 = time.perf_counter()
        for _ in range(n):
            losses.append(step(i))
            i += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        print(json.dumps({"elapsed": dt}), flush=True)
    return elapsed, i - first


if __name__ == "__main__":
    main()
