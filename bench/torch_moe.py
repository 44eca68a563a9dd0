"""Feed-forwards of the PyTorch reference: dense SwiGLU / squared ReLU / RWKV-7 channel mix
(model/ffn.rs) and the mixture of experts (model/moe.rs): router scores (softmax or sigmoid),
top-K by score + selection bias, gates normalised / scaled as configured, capacity (rank-major
slot grants), gather/scatter dispatch (each expert runs on its own tokens only; the combine
is index_add), Switch/GShard auxiliary loss (micro_batch / sequence / global_batch stats) and
ST-MoE z-loss. Written from mixscale's equations."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_common import normal, param, token_shift, uniform, values


def ffn_hidden(f, d):
    if f.get("hidden_size"):
        return f["hidden_size"]
    m = max(f.get("multiple_of", 32), 1)
    raw = int(round(f.get("hidden_ratio", 8.0 / 3.0) * d))
    return -(-raw // m) * m


class Ffn(nn.Module):
    def __init__(self, kind, d, hidden, std, out_std, layer=(0, 1)):
        super().__init__()
        self.kind = kind
        if kind == "rwkv7_cmix":  # mu_k = 1 - (i/d)^((1 - l/L)^4); W_up U(+-0.5/sqrt d); W_down 0
            r1 = 1.0 - layer[0] / max(layer[1], 1)
            self.x_k = values(1.0 - (torch.arange(d, dtype=torch.float64) / d) ** (r1 ** 4))
            self.w_up = uniform((d, hidden), 0.5 / math.sqrt(d), decay=True)
            self.w_down = param(torch.zeros(hidden, d), decay=True)
            return
        if kind == "swiglu":
            self.w_gate = normal((d, hidden), std)
        self.w_up = normal((d, hidden), std)
        self.w_down = normal((hidden, d), out_std)

    def forward(self, x):
        if self.kind == "rwkv7_cmix":
            x = x + (token_shift(x) - x) * self.x_k
            return F.relu(x @ self.w_up).square() @ self.w_down
        if self.kind == "swiglu":
            return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down
        return F.relu(x @ self.w_up).square() @ self.w_down


class Expert(nn.Module):
    def __init__(self, d, h, std, out_std):
        super().__init__()
        self.w_gate = normal((d, h), std)
        self.w_up = normal((d, h), std)
        self.w_down = normal((h, d), out_std)

    def forward(self, x):
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


class Moe(nn.Module):
    def __init__(self, m, d, hidden, std, out_std):
        super().__init__()
        self.m, self.e, self.k = m, m["num_experts"], m["top_k"]
        self.router = normal((d, self.e), std)
        if m.get("balance", {}).get("bias_update_rate", 0.0) > 0:
            self.register_buffer("router_bias", torch.zeros(self.e))  # not a parameter
        else:
            self.router_bias = None
        self.experts = nn.ModuleList(Expert(d, hidden, std, out_std) for _ in range(self.e))
        s = m.get("num_shared_experts", 0)
        self.shared = Ffn("swiglu", d, s * hidden, std, out_std) if s else None
        self.running = torch.zeros(self.e)
        self.running_n = 0

    def begin_step(self):
        self.running.zero_()
        self.running_n = 0

    def forward(self, x):
        B, T, d = x.shape
        n, e, k = B * T, self.e, self.k
        x2 = x.reshape(n, d)
        logits = x2 @ self.router
        sig = self.m.get("score", "softmax") == "sigmoid"
        scores = torch.sigmoid(logits) if sig else torch.softmax(logits, -1)
        with torch.no_grad():
            sel = scores if self.router_bias is None else scores + self.router_bias
            # top-K, ties to the lower index (stable sort on -score)
            chosen = torch.sort(-sel, dim=-1, stable=True).indices[:, :k]  # [N,K]
            selected = torch.bincount(chosen.reshape(-1), minlength=e).float()
            cf = self.m.get("capacity_factor")
            if cf:  # rank-major grants: every token's first choice before any second choice
                cap = math.ceil(cf * n * k / e)
                flat = chosen.t().reshape(-1)  # rank-major order
                onehot = F.one_hot(flat, e)
                rank_in_expert = (onehot.cumsum(0) * onehot).sum(-1) - 1
                keep = (rank_in_expert < cap).view(k, n).t()
            else:
                keep = torch.ones(n, k, dtype=torch.bool)
        gates = scores.gather(1, chosen)
        norm = self.m.get("normalize_top_k")
        if (sig if norm is None else norm):
            gates = gates / gates.sum(-1, keepdim=True)
        gates = gates * self.m.get("route_scale", 1.0)
        # dispatch: group kept slots by expert, run each expert on its tokens, index_add back
        tok = torch.arange(n)[:, None].expand(n, k)
        y = torch.zeros_like(x2)
        flat_e, flat_t, flat_g = chosen[keep], tok[keep], gates[keep]
        order = torch.argsort(flat_e, stable=True)
        flat_e, flat_t, flat_g = flat_e[order], flat_t[order], flat_g[order]
        counts = torch.bincount(flat_e, minlength=e).tolist()
        start = 0
        for i, c in enumerate(counts):
            if c:
                t_i = flat_t[start:start + c]
                out = self.experts[i](x2.index_select(0, t_i)) * flat_g[start:start + c, None]
                y = y.index_add(0, t_i, out)
            start += c
        if self.shared is not None:
            y = y + self.shared(x2)
        return y.view(B, T, d), self.losses(logits, scores, selected, chosen, B)

    def losses(self, logits, scores, selected, chosen, B):
        n, e, k = scores.shape[0], self.e, self.k
        terms = []
        bal = self.m.get("balance", {})
        coef = bal.get("aux_loss_coef", 1e-2)
        if coef > 0:
            sig = self.m.get("score", "softmax") == "sigmoid"
            p = scores / scores.sum(-1, keepdim=True) if sig else scores
            stats = bal.get("stats", "micro_batch")
            if stats == "sequence":
                T = n // B
                f = F.one_hot(chosen, e).float().view(B, T * k, e).sum(1) / (T * k)
                aux = (p.view(B, T, e).mean(1) * f).sum() / B
            else:
                counts = selected
                if stats == "global_batch":
                    self.running += selected
                    self.running_n += 1
                    counts = self.running / self.running_n
                aux = (p.mean(0) * (counts / (n * k))).sum()
            terms.append(aux * coef * e)
        z = self.m.get("z_loss_coef", 0.0)
        if z > 0:
            terms.append(z * torch.logsumexp(logits, -1).square().mean())
        return terms
