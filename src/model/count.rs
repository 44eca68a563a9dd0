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
//! - `flops_per_token_6n` = 6·N_non_embedding (Kaplan's C ≈ 6ND), stored for comparison.
//! - Compute `C = flops_per_token · tokens`.

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
}

impl Accounting {
    pub fn of(model: &LanguageModel, seq_len: usize) -> Self {
        let total = model.params.total();
        let emb = model.params.count_kind(ParamKind::Embedding) + model.params.count_kind(ParamKind::Head);
        let non_emb = total - emb;
        let s = &model.spec;
        let layers: f64 = model.layers.iter().map(|l| l.mixer.flops_per_token(seq_len) + l.ffn.flops_per_token()).sum();
        let head = 2.0 * (s.d_model * s.vocab_size) as f64;
        let fwd = layers + head;
        Self {
            params_total: total,
            params_embedding: emb,
            params_non_embedding: non_emb,
            params_active: total,
            flops_per_token_forward: fwd,
            flops_per_token: 3.0 * fwd,
            flops_per_token_6n: 6.0 * non_emb as f64,
            seq_len,
        }
    }

    /// Training compute for `tokens` tokens.
    pub fn compute(&self, tokens: u64) -> f64 {
        self.flops_per_token * tokens as f64
    }
}
