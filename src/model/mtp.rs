//! Multi-token prediction (`../shared/reference/mixers.md` §7; config [`crate::config::mtp`]).
//!
//! Position p of the input predicts the token `shift` places after its next token: the main head
//! (shift 0) predicts `targets[p]`, an offset-`s` head predicts `targets[p + s]`, which exists for
//! p < T − s only; positions past the sequence have no target and are left out (the loss of each
//! head is the mean over its valid, and with a mask scored, positions: Megatron's masked mean).
//!
//! **Gloeckle et al. 2024** (arXiv:2404.19737): trunk = layers 0..L−1, head 1 = the model's last
//! layer (so the main head is exactly the plain model), heads 2..n = extra layers of the same
//! block (`mtp.heads.<j>`), each followed by the shared final norm and unembedding; head i has
//! shift i−1. Training loss Σ_i L_i. [`gloeckle_grads`] bounds memory as the paper: the trunk
//! output z is cut from the graph (a leaf `Var`), each head runs forward and backward alone
//! (its `[B·T, V]` logits and block activations are freed before the next head), ∂L/∂z is
//! accumulated, and one final backward of `Σ z ⊙ ∂L/∂z` (+ trunk MoE losses) reaches the trunk.
//! Peak memory: trunk activations + one head's activations and logits. [`loss_terms`] builds
//! the same loss in one graph (the reference; tests compare their gradients).
//!
//! **DeepSeek-V3** (arXiv:2412.19437 §2.2): h⁰ = the main model's last residual stream (before
//! the final norm); module k (`mtp.modules.<k-1>`) forms
//! `h'ᵏ_i = W_k [RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k−1}_i)]` — embedding first, the order of
//! the real implementations (vLLM/SGLang `eh_proj(cat([inputs_embeds, previous_hidden]))`), the
//! reverse of the paper's notation — with `W_k` `eh_proj` `[2d, d]` (no bias), runs one block
//! (same block and FFN as the last layer) on positions 0..T−k (the paper's `h_{1:T−k}`; causal,
//! so this equals Megatron's rolled-and-masked full-length form), and predicts t_{i+k+1} through
//! its own final norm and the shared unembedding (shift k). Embedding and head are shared with the
//! main model. Loss `L_main + (λ/D)·Σ_k L_k`.
//!
//! Mixers' cross-layer state ([`ForwardCtx`]) is not carried from the trunk into MTP blocks.

use super::params::ParamBuilder;
use super::{AuxOut, Layer, LanguageModel};
use crate::ops::linear::linear;
use crate::blocks::{BlockDims, ForwardCtx};
use crate::config::model::ModelSpec;
use crate::config::mtp::MtpSpec;
use crate::ops::norm::rms_norm;
use candle_core::{DType, Result, Tensor, Var};
use std::collections::BTreeMap;

/// One DeepSeek-V3 MTP module.
pub struct DsModule {
    enorm: Tensor,
    hnorm: Tensor,
    eh_proj: Tensor,
    layer: Layer,
    norm: Tensor,
}

pub enum Mtp {
    /// Heads 2..n (head 1 is the model's last layer).
    Gloeckle { heads: Vec<Layer> },
    Deepseek { lambda: f64, modules: Vec<DsModule> },
}

/// All loss terms of one batch in one graph.
pub struct Terms {
    /// Main (next-token) mean cross-entropy.
    pub main: Tensor,
    /// Per extra head/module: its mean cross-entropy (None when it has no scored position).
    pub extra: Vec<Option<Tensor>>,
    /// Weight of each extra loss in the training loss (Gloeckle 1, DeepSeek λ/D).
    pub weight: f64,
    pub aux: AuxOut,
}

impl Terms {
    /// The training loss: main + weight·Σ extra + MoE losses.
    pub fn total(&self) -> Result<Tensor> {
        let mut t = self.main.clone();
        for e in self.extra.iter().flatten() {
            t = (t + e.affine(self.weight, 0.0)?)?;
        }
        for a in &self.aux.losses {
            t = (t + a.to_dtype(self.main.dtype())?)?;
        }
        Ok(t)
    }
}

impl Mtp {
    pub fn new(spec: &MtpSpec, model: &ModelSpec, max_seq_len: usize, pb: &mut ParamBuilder) -> Result<Self> {
        let d = model.d_model;
        let std = model.init.std;
        let out_std = if model.init.residual_rescale { std / (2.0 * model.n_layers as f64).sqrt() } else { std };
        let last = model.n_layers - 1;
        let dims = BlockDims { d_model: d, max_seq_len, n_layers: model.n_layers, layer_idx: last, init_std: std, out_std };
        let block = model.block_of_layer(last);
        match spec {
            MtpSpec::Gloeckle { .. } => {
                let heads = (0..spec.extra())
                    .map(|j| Layer::new(model, block, &dims, &mut pb.pp(format!("heads.{j}"))))
                    .collect::<Result<_>>()?;
                Ok(Mtp::Gloeckle { heads })
            }
            MtpSpec::Deepseek { depth, lambda } => {
                let mut modules = Vec::with_capacity(*depth);
                for k in 0..*depth {
                    let mut p = pb.pp(format!("modules.{k}"));
                    modules.push(DsModule {
                        enorm: p.constant("enorm", &[d], 1.0)?,
                        hnorm: p.constant("hnorm", &[d], 1.0)?,
                        eh_proj: p.normal("eh_proj", &[2 * d, d], std)?,
                        layer: Layer::new(model, block, &dims, &mut p.pp("layer"))?,
                        norm: p.constant("norm", &[d], 1.0)?,
                    });
                }
                Ok(Mtp::Deepseek { lambda: *lambda, modules })
            }
        }
    }

    /// Number of extra heads/modules.
    pub fn extra(&self) -> usize {
        match self {
            Mtp::Gloeckle { heads } => heads.len(),
            Mtp::Deepseek { modules, .. } => modules.len(),
        }
    }

    /// Metrics column names of the extra losses: `mtp_head<i>_loss` (Gloeckle head i predicts
    /// t+i, i ≥ 2) or `mtp_depth<k>_loss` (DeepSeek module k predicts t+k+1).
    pub fn loss_names(&self) -> Vec<String> {
        match self {
            Mtp::Gloeckle { heads } => (0..heads.len()).map(|j| format!("mtp_head{}_loss", j + 2)).collect(),
            Mtp::Deepseek { modules, .. } => (1..=modules.len()).map(|k| format!("mtp_depth{k}_loss")).collect(),
        }
    }

    /// The blocks of the extra heads/modules, in forward order.
    pub fn layers(&self) -> Vec<&Layer> {
        match self {
            Mtp::Gloeckle { heads } => heads.iter().collect(),
            Mtp::Deepseek { modules, .. } => modules.iter().map(|m| &m.layer).collect(),
        }
    }

    /// Training forward FLOPs per token of the extra heads/modules: block + unembedding 2·d·V
    /// (+ eh_proj 4·d² for DeepSeek), each at full length T (an upper bound for the shortened
    /// DeepSeek sequences).
    pub fn flops_per_token(&self, seq_len: usize, d: usize, vocab: usize) -> f64 {
        let head = 2.0 * (d * vocab) as f64;
        let proj = match self {
            Mtp::Gloeckle { .. } => 0.0,
            Mtp::Deepseek { .. } => 4.0 * (d * d) as f64,
        };
        self.layers().iter().map(|l| l.mixer.flops_per_token(seq_len) + l.ffn.flops_per_token() + head + proj).sum()
    }
}

/// Mean cross-entropy of normalized hidden states `hn` `[B, S, d]` against `targets` `[B, S]`,
/// over the positions where `mask` `[B, S]` is nonzero (all without a mask). None when no
/// position is scored.
pub fn mean_ce(model: &LanguageModel, hn: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    let each = model.head_ce_each(hn, targets)?;
    match mask {
        None => Ok(Some(each.mean_all()?)),
        Some(m) => {
            let w = m.flatten_all()?.to_dtype(each.dtype())?;
            let n = w.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            if n == 0.0 {
                return Ok(None);
            }
            Ok(Some(((each * w)?.sum_all()? / n)?))
        }
    }
}

/// The loss of a head with offset `shift` on hidden states `h` `[B, T, d]` (before `norm`).
fn head_loss(model: &LanguageModel, h: &Tensor, norm: &Tensor, targets: &Tensor, mask: Option<&Tensor>, shift: usize) -> Result<Option<Tensor>> {
    let t = targets.dim(1)?;
    let len = t - shift;
    let hn = rms_norm(&h.narrow(1, 0, len)?, norm, model.spec.norm_eps)?;
    let m = mask.map(|m| m.narrow(1, shift, len)).transpose()?;
    mean_ce(model, &hn, &targets.narrow(1, shift, len)?, m.as_ref())
}

fn need_main(main: Option<Tensor>) -> Result<Tensor> {
    main.ok_or_else(|| candle_core::Error::Msg("training batch has no scored positions".into()))
}

/// Every loss term of a batch in one graph (plain model, DeepSeek, and the Gloeckle reference).
pub fn loss_terms(model: &LanguageModel, inputs: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Terms> {
    let eps = model.spec.norm_eps;
    let n_layers = model.layers.len();
    let mut aux = AuxOut::default();
    let x = model.embed_tokens(inputs)?;
    match &model.mtp {
        Some(Mtp::Gloeckle { heads }) if !heads.is_empty() => {
            let z = model.run_layers(x, 0..n_layers - 1, &mut ForwardCtx::default(), &mut aux)?;
            let mut outs = Vec::with_capacity(heads.len() + 1);
            for (i, layer) in std::iter::once(&model.layers[n_layers - 1]).chain(heads).enumerate() {
                let h = layer.forward(&z, eps, &mut ForwardCtx::default(), &mut aux)?;
                outs.push(head_loss(model, &h, &model.final_norm, targets, mask, i)?);
            }
            let main = need_main(outs.remove(0))?;
            Ok(Terms { main, extra: outs, weight: 1.0, aux })
        }
        Some(Mtp::Deepseek { lambda, modules }) if !modules.is_empty() => {
            let mut h = model.run_layers(x, 0..n_layers, &mut ForwardCtx::default(), &mut aux)?;
            let main = need_main(head_loss(model, &h, &model.final_norm, targets, mask, 0)?)?;
            let (b, t) = inputs.dims2()?;
            let d = model.spec.d_model;
            let mut extra = Vec::with_capacity(modules.len());
            for (j, m) in modules.iter().enumerate() {
                let k = j + 1;
                let len = t - k;
                let e = model.embed_tokens(&inputs.narrow(1, k, len)?)?;
                let cat = Tensor::cat(&[rms_norm(&e, &m.enorm, eps)?, rms_norm(&h.narrow(1, 0, len)?, &m.hnorm, eps)?], 2)?;
                let hp = linear(&cat, &m.eh_proj, (b, len, d))?;
                h = m.layer.forward(&hp, eps, &mut ForwardCtx::default(), &mut aux)?;
                let tg = targets.narrow(1, k, len)?;
                let mk = mask.map(|x| x.narrow(1, k, len)).transpose()?;
                extra.push(mean_ce(model, &rms_norm(&h, &m.norm, eps)?, &tg, mk.as_ref())?);
            }
            Ok(Terms { main, extra, weight: lambda / modules.len() as f64, aux })
        }
        _ => {
            let h = model.run_layers(x, 0..n_layers, &mut ForwardCtx::default(), &mut aux)?;
            let main = need_main(head_loss(model, &h, &model.final_norm, targets, mask, 0)?)?;
            Ok(Terms { main, extra: Vec::new(), weight: 1.0, aux })
        }
    }
}

/// Reference forms for tests: every head's logits `[B, T, V]` at full length, no shifting.
/// Gloeckle: head i's logits at every position. DeepSeek: Megatron's rolled form — module k sees
/// the input ids rolled left by k with 0 filled in past the end, and the full-length h^{k−1};
/// positions whose target lies past the sequence are garbage the caller must mask.
pub fn reference_logits(model: &LanguageModel, inputs: &Tensor) -> Result<Vec<Tensor>> {
    let eps = model.spec.norm_eps;
    let n_layers = model.layers.len();
    let (b, t) = inputs.dims2()?;
    let (d, v) = (model.spec.d_model, model.spec.vocab_size);
    let mut aux = AuxOut::default();
    let logits = |h: &Tensor, norm: &Tensor| model.logits_flat(&rms_norm(h, norm, eps)?)?.reshape((b, t, v));
    let x = model.embed_tokens(inputs)?;
    match &model.mtp {
        Some(Mtp::Gloeckle { heads }) => {
            let z = model.run_layers(x, 0..n_layers - 1, &mut ForwardCtx::default(), &mut aux)?;
            std::iter::once(&model.layers[n_layers - 1])
                .chain(heads)
                .map(|l| logits(&l.forward(&z, eps, &mut ForwardCtx::default(), &mut aux)?, &model.final_norm))
                .collect()
        }
        Some(Mtp::Deepseek { modules, .. }) => {
            let mut h = model.run_layers(x, 0..n_layers, &mut ForwardCtx::default(), &mut aux)?;
            let mut out = vec![logits(&h, &model.final_norm)?];
            let ids: Vec<u32> = inputs.flatten_all()?.to_vec1()?;
            for (j, m) in modules.iter().enumerate() {
                let k = j + 1;
                let rolled: Vec<u32> = (0..b * t).map(|i| if i % t + k < t { ids[i + k] } else { 0 }).collect();
                let e = model.embed_tokens(&Tensor::from_vec(rolled, (b, t), inputs.device())?)?;
                let cat = Tensor::cat(&[rms_norm(&e, &m.enorm, eps)?, rms_norm(&h, &m.hnorm, eps)?], 2)?;
                let hp = linear(&cat, &m.eh_proj, (b, t, d))?;
                h = m.layer.forward(&hp, eps, &mut ForwardCtx::default(), &mut aux)?;
                out.push(logits(&h, &m.norm)?);
            }
            Ok(out)
        }
        None => Ok(vec![logits(&model.run_layers(x, 0..n_layers, &mut ForwardCtx::default(), &mut aux)?, &model.final_norm)?]),
    }
}

/// Adds the gradients in `g` of every model parameter to `grads` (by name), detached.
pub fn collect_grads(model: &LanguageModel, g: &candle_core::backprop::GradStore, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
    for (name, p) in &model.params.params {
        if let Some(gi) = g.get(p.var.as_tensor()) {
            let gi = gi.detach();
            let sum = match grads.remove(name) {
                Some(prev) => (prev + gi)?,
                None => gi,
            };
            grads.insert(name.clone(), sum);
        }
    }
    Ok(())
}

/// Gloeckle MTP, head by head (see the module doc): adds `scale ×` the gradients of the
/// training loss (Σ heads + MoE losses) to `grads`; returns the terms' values (main, extras)
/// and the MoE statistics. The model must have Gloeckle heads.
pub fn gloeckle_grads(
    model: &LanguageModel,
    inputs: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    grads: &mut BTreeMap<String, Tensor>,
) -> Result<(f64, Vec<Option<f64>>, AuxOut)> {
    let Some(Mtp::Gloeckle { heads }) = &model.mtp else { candle_core::bail!("gloeckle_grads: the model has no Gloeckle heads") };
    let eps = model.spec.norm_eps;
    let n_layers = model.layers.len();
    let mut trunk_aux = AuxOut::default();
    let z = model.run_layers(model.embed_tokens(inputs)?, 0..n_layers - 1, &mut ForwardCtx::default(), &mut trunk_aux)?;
    let zv = Var::from_tensor(&z.detach())?;
    let mut dz: Option<Tensor> = None;
    let mut values = Vec::with_capacity(heads.len() + 1);
    let mut routes = std::mem::take(&mut trunk_aux.routes);
    for (i, layer) in std::iter::once(&model.layers[n_layers - 1]).chain(heads).enumerate() {
        let mut aux = AuxOut::default();
        let h = layer.forward(zv.as_tensor(), eps, &mut ForwardCtx::default(), &mut aux)?;
        let ce = head_loss(model, &h, &model.final_norm, targets, mask, i)?;
        if i == 0 && ce.is_none() {
            need_main(None)?;
        }
        values.push(ce.as_ref().map(|c| c.to_dtype(DType::F64)?.to_scalar::<f64>()).transpose()?);
        let mut total: Option<Tensor> = ce;
        for a in aux.losses {
            total = Some(match total {
                Some(t) => (t + a)?,
                None => a,
            });
        }
        routes.extend(aux.routes);
        let Some(total) = total else { continue };
        let g = (total * scale)?.backward()?;
        if let Some(gz) = g.get(zv.as_tensor()) {
            dz = Some(match dz {
                Some(prev) => (prev + gz.detach())?,
                None => gz.detach(),
            });
        }
        collect_grads(model, &g, grads)?;
    }
    let mut trunk = match dz {
        Some(dz) => (z * dz)?.sum_all()?,
        None => z.sum_all()?.zeros_like()?,
    };
    for a in trunk_aux.losses {
        let dt = trunk.dtype();
        trunk = (trunk + (a * scale)?.to_dtype(dt)?)?;
    }
    collect_grads(model, &trunk.backward()?, grads)?;
    let main = values.remove(0).expect("checked above");
    Ok((main, values, AuxOut { losses: Vec::new(), routes }))
}
