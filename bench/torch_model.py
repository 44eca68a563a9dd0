"""The PyTorch reference language model, built from mixscale's resolved model config (the
JSON of `ModelSpec` after --set overrides and block defaults): embed -> n_layers x
[x += mixer(RMSNorm(x)); x += ffn(RMSNorm(x))] -> RMSNorm -> head (src/model/mod.rs), dense or
MoE feed-forwards, and the multi-token-prediction heads of src/model/mtp.rs (Gloeckle: shared
trunk, per-head forward/backward through a detached trunk output; DeepSeek-V3: sequential
modules). Parameter names equal mixscale's."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_common import const, normal, rms_norm
from torch_mixers_attn import Attention, Fox, Moba
from torch_mixers_linear import GatedDeltaNet, Mamba2, Rwkv7
from torch_moe import Ffn, Moe, ffn_hidden

MIXERS = {"attention": Attention, "moba": Moba, "fox": Fox, "gated_deltanet": GatedDeltaNet, "mamba2": Mamba2, "rwkv7": Rwkv7}


class Layer(nn.Module):
    def __init__(self, spec, name, dims):
        super().__init__()
        d = spec["d_model"]
        if name not in MIXERS:
            raise ValueError(f"no PyTorch reference for block `{name}` (known: {', '.join(sorted(MIXERS))})")
        self.norm1 = const((d,), 1.0)
        self.mixer = MIXERS[name](spec["blocks"].get(name) or {}, dims)
        self.norm2 = const((d,), 1.0)
        f = spec.get("ffn", {})
        dense = ffn_hidden(f, d)
        m = spec.get("moe")
        if m and dims["layer_idx"] >= m.get("first_dense_layers", 0):
            s = m.get("num_shared_experts", 0)
            eh = m.get("expert_hidden_size") or max(1, int(round(dense / (m["top_k"] + s))))
            self.ffn = Moe(m, d, eh, dims["init_std"], dims["out_std"])
        else:
            self.ffn = Ffn(f.get("kind", "swiglu"), d, dense, dims["init_std"], dims["out_std"], (dims["layer_idx"], spec["n_layers"]))
        self.eps = spec.get("norm_eps", 1e-6)

    def forward(self, x, ctx, aux):
        x = x + self.mixer(rms_norm(x, self.norm1, self.eps), ctx)
        f = self.ffn(rms_norm(x, self.norm2, self.eps))
        if isinstance(f, tuple):
            f, losses = f
            aux.extend(losses)
        return x + f


class DsModule(nn.Module):
    def __init__(self, spec, block, dims):
        super().__init__()
        d = spec["d_model"]
        self.enorm = const((d,), 1.0)
        self.hnorm = const((d,), 1.0)
        self.eh_proj = normal((2 * d, d), spec.get("init", {}).get("std", 0.02))
        self.layer = Layer(spec, block, dims)
        self.norm = const((d,), 1.0)


class LM(nn.Module):
    def __init__(self, spec, max_seq_len):
        super().__init__()
        self.spec = spec
        d, L, V = spec["d_model"], spec["n_layers"], spec["vocab_size"]
        init = spec.get("init", {})
        std = init.get("std", 0.02)
        out_std = std / math.sqrt(2 * L) if init.get("residual_rescale", True) else std
        pattern = spec.get("layer_pattern") or ["attention"]
        self.eps = spec.get("norm_eps", 1e-6)
        self.embed = normal((V, d), std)
        dims = lambda i: {"d_model": d, "max_seq_len": max_seq_len, "n_layers": L, "layer_idx": i, "init_std": std, "out_std": out_std}
        self.layers = nn.ModuleList(Layer(spec, pattern[i % len(pattern)], dims(i)) for i in range(L))
        self.final_norm = const((d,), 1.0)
        self.head = None if spec.get("tied_embeddings", True) else normal((V, d), std)
        self.mtp_kind, self.mtp = None, None
        m = spec.get("mtp")
        if m:
            block = pattern[(L - 1) % len(pattern)]
            self.mtp_kind = m["kind"]
            if m["kind"] == "gloeckle":
                self.mtp = nn.Module()
                self.mtp.heads = nn.ModuleList(Layer(spec, block, dims(L - 1)) for _ in range(m["n"] - 1))
            else:
                self.mtp = nn.Module()
                self.mtp.mods = nn.ModuleList(DsModule(spec, block, dims(L - 1)) for _ in range(m["depth"]))
                self.mtp_lambda = m.get("lambda", 0.3)

    def mixscale_names(self):
        """(mixscale name, parameter) pairs: nn names with `mtp.mods` -> `mtp.modules`."""
        return [(n.replace("mtp.mods.", "mtp.modules."), p) for n, p in self.named_parameters()]

    def begin_step(self):
        for m in self.modules():
            if isinstance(m, Moe):
                m.begin_step()

    def ce(self, h, norm, targets, mask=None):
        """Mean cross-entropy over the positions where mask != 0 (all without a mask)."""
        w = self.embed if self.head is None else self.head
        logits = rms_norm(h, norm, self.eps) @ w.t()
        if mask is None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        each = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return (each * mask.reshape(-1)).sum() / mask.sum()

    def train_step_loss(self, inputs, targets, mask=None):
        """Forward + backward of the training loss (main CE + MTP terms + MoE losses);
        returns the main head's loss (the reported train loss)."""
        self.begin_step()
        T = inputs.shape[1]
        x = F.embedding(inputs, self.embed)
        aux = []
        if self.mtp_kind == "gloeckle" and len(self.mtp.heads) > 0:
            ctx = {}
            for l in self.layers[:-1]:
                x = l(x, ctx, aux)
            z = x.detach().requires_grad_(True)
            main = None
            for i, layer in enumerate([self.layers[-1]] + list(self.mtp.heads)):
                head_aux = []
                h = layer(z, {}, head_aux)
                loss = self.ce(h[:, : T - i], self.final_norm, targets[:, i:], None if mask is None else mask[:, i:])
                total = loss + sum(head_aux) if head_aux else loss
                total.backward()
                main = loss.detach() if i == 0 else main
            trunk = (x * z.grad).sum()
            if aux:
                trunk = trunk + sum(aux)
            trunk.backward()
            return main
        ctx = {}
        for l in self.layers:
            x = l(x, ctx, aux)
        main = self.ce(x, self.final_norm, targets, mask)
        total = main
        if self.mtp_kind == "deepseek" and len(self.mtp.mods) > 0:
            h, B, D = x, inputs.shape[0], len(self.mtp.mods)
            for j, m in enumerate(self.mtp.mods):
                k = j + 1
                e = F.embedding(inputs[:, k:], self.embed)
                cat = torch.cat([rms_norm(e, m.enorm, self.eps), rms_norm(h[:, : T - k], m.hnorm, self.eps)], -1)
                h = m.layer(cat @ m.eh_proj, {}, aux)
                total = total + (self.mtp_lambda / D) * self.ce(h, m.norm, targets[:, k:], None if mask is None else mask[:, k:])
        if aux:
            total = total + sum(aux)
        total.backward()
        return main.detach()
