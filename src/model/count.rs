//! Parameter and FLOP accounting (`../shared/reference/scaling-laws.md` §6: store every variant,
//! fit with one, say which).
//!
//! - `params_embedding` = input embedding + untied head (the tied head is counted once, as the
//!   embedding); `params_non_embedding` = total − embedding (Kaplan et al. 2020's N);
//!   `params_active` = parameters used per token (= total for dense models).
//! - `flops_per_token` = 3 × forward FLOPs (backward ≈ 2× forward), forward =
//!   Σ_layers [mixer projections 2·P + token mixing (attention 4·T·H·D at full context T, PaLM
//!   convention) + FFN 2·P] + head 2·d·V. **The head (unembedding) is counted**; embedding lookups,
//!   norms and the softmax are not. For a dense attention model this is
//!   6·(N_non_embedding + V·d) + 12·L·H·D·T (Porian et al. "standard" + the attention term).
//! - `flops_per_token_6n` = 6·N_non_embedding (Kaplan's C ≈ 6ND; active parameters only, MTP
//!   modules excluded), stored for comparison.
//! - Compute `C = flops_per_token · tokens`.
//! - **MoE** (Abnar et al. 2025, arXiv:2501.12370): `params_active` counts per MoE layer the
//!   router + K routed experts + shared experts (the other E − K experts are inactive), and the FFN
//!   FLOPs are those of the active parameters (router 2·d·E included), so
//!   `flops_per_token ≈ 6·N_active` + attention; `sparsity` = 1 − K/E (0 for dense models).
//!   The router's selection-bias buffers are not parameters.
//! - **MTP**: the extra heads/modules are trained every step, so their parameters are in
//!   `params_total` (and `params_mtp`) and their forward FLOPs in `flops_per_token`; they are not
//!   used at inference, so `params_active` (the main model's per-token parameters) excludes them.

use super::params::ParamKind;
use super::LanguageModel;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Accounting {
    pub params_total: usize,
    pub params_embedding: usize,
    pub params_non_embedding: usize,
    pub params_active: usize,
    pub flops_per_token_forward: f64,
    pub flops_per_token: f64,
    pub flops_per_token_6n: f64,
    pub seq_len: usize,
    /// MoE sparsity S = 1 − K/E (0 for dense models).
    #[serde(default)]
    pub sparsity: f64,
    /// Parameters of the multi-token-prediction heads/modules (in `params_total`).
    #[serde(default)]
    pub params_mtp: usize,
}

impl Accounting {
    pub fn of(model: &LanguageModel, seq_len: usize) -> Self {
        let total = model.params.total() - model.params.count_kind(ParamKind::Buffer);
        let emb = model.params.count_kind(ParamKind::Embedding) + model.params.count_kind(ParamKind::Head);
        let non_emb = total - emb;
        let s = &model.spec;
        let layers: f64 = model.layers.iter().map(|l| l.mixer.flops_per_token(seq_len) + l.ffn.flops_per_token()).sum();
        let head = 2.0 * (s.d_model * s.vocab_size) as f64;
        let mtp_flops = model.mtp.as_ref().map(|m| m.flops_per_token(seq_len, s.d_model, s.vocab_size)).unwrap_or(0.0);
        let fwd = layers + head + mtp_flops;
        let params_mtp: usize = model
            .params
            .params
            .iter()
            .filter(|(k, p)| k.starts_with("mtp.") && p.kind != ParamKind::Buffer)
            .map(|(_, p)| p.var.elem_count())
            .sum();
        let inactive: usize = model.moe_layers().map(|m| m.total_params() - m.active_params()).sum();
        Self {
            params_total: total,
            params_embedding: emb,
            params_non_embedding: non_emb,
            params_active: total - params_mtp - inactive,
            flops_per_token_forward: fwd,
            flops_per_token: 3.0 * fwd,
            flops_per_token_6n: 6.0 * (non_emb - params_mtp - inactive) as f64,
            seq_len,
            sparsity: s.moe.as_ref().map(|m| m.sparsity()).unwrap_or(0.0),
            params_mtp,
        }
    }

    /// Training compute for `tokens` tokens.
    pub fn compute(&self, tokens: u64) -> f64 {
        self.flops_per_token * tokens as f64
    }
}
