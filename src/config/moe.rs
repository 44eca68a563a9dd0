//! `model.moe:` — mixture-of-experts feed-forward options (`../shared/reference/mixers.md` §8).
//!
//! When the section is present, the feed-forward of every layer from `first_dense_layers` on is
//! a DeepSeekMoE-style layer: `num_shared_experts` always-on SwiGLU experts plus `num_experts`
//! fine-grained routed SwiGLU experts of width `expert_hidden_size`, of which each token uses
//! `top_k`. The dense `model.ffn` spec still defines the first `first_dense_layers` layers and
//! the default expert width. Sparsity (Abnar et al. 2025, arXiv:2501.12370) is S = 1 − K/E.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MoeSpec {
    /// E, routed experts per layer.
    pub num_experts: usize,
    /// K, routed experts per token.
    pub top_k: usize,
    /// Always-on experts of the same width (DeepSeekMoE), 0 for none.
    #[serde(default)]
    pub num_shared_experts: usize,
    /// Hidden width of one expert. Default: the dense FFN width ÷ (top_k + num_shared_experts),
    /// rounded, so the active FFN width equals the dense model's (fine-grained segmentation,
    /// DeepSeekMoE).
    #[serde(default)]
    pub expert_hidden_size: Option<usize>,
    /// The first layers keep the dense `model.ffn` (DeepSeek-V3 keeps 3).
    #[serde(default)]
    pub first_dense_layers: usize,
    /// Router score: `softmax` over experts (Switch, DeepSeek-V2) or per-expert `sigmoid`
    /// (DeepSeek-V3).
    #[serde(default)]
    pub score: RouterScore,
    /// Divide the K selected scores by their sum. Default (null): true for sigmoid, false for
    /// softmax.
    #[serde(default)]
    pub normalize_top_k: Option<bool>,
    /// Multiplies the routed gates (DeepSeek-V3 route_scale 2.5).
    #[serde(default = "one")]
    pub route_scale: f64,
    #[serde(default)]
    pub balance: BalanceSpec,
    /// Router z-loss coefficient (ST-MoE: 1e-3 · mean(logsumexp(logits)²)); 0 = off.
    #[serde(default)]
    pub z_loss_coef: f64,
    /// Expert capacity = ceil(capacity_factor · tokens · K / E) slots; tokens past it are
    /// dropped (their slot contributes nothing). Null (default) = dropless.
    #[serde(default)]
    pub capacity_factor: Option<f64>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RouterScore {
    #[default]
    Softmax,
    Sigmoid,
}

/// `model.moe.balance:` — load balancing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BalanceSpec {
    /// Switch/GShard auxiliary loss coefficient α in α·E·Σ f_i·P_i; 0 = off.
    #[serde(default = "default_aux")]
    pub aux_loss_coef: f64,
    /// Where f_i (routed-slot fractions) come from: `micro_batch` (every token of the
    /// micro-batch), `sequence` (per sequence, averaged: DeepSeek-V3's sequence-wise loss) or
    /// `global_batch` (counts accumulated over the optimizer step's micro-batches so far, as
    /// Megatron's global_aux_loss; Qiu et al. 2025, arXiv:2501.11873).
    #[serde(default)]
    pub stats: BalanceStats,
    /// Auxiliary-loss-free bias update rate γ (DeepSeek-V3; Wang et al. arXiv:2408.15664):
    /// after each step b_i += γ·sign(mean load − load_i); the bias only affects selection. 0 = off.
    #[serde(default)]
    pub bias_update_rate: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BalanceStats {
    #[default]
    MicroBatch,
    Sequence,
    GlobalBatch,
}

impl Default for BalanceSpec {
    fn default() -> Self {
        Self { aux_loss_coef: default_aux(), stats: BalanceStats::default(), bias_update_rate: 0.0 }
    }
}

impl MoeSpec {
    /// Abnar et al.'s sparsity S = 1 − K/E.
    pub fn sparsity(&self) -> f64 {
        1.0 - self.top_k as f64 / self.num_experts as f64
    }

    /// Whether the K selected gates are renormalized.
    pub fn normalizes(&self) -> bool {
        self.normalize_top_k.unwrap_or(self.score == RouterScore::Sigmoid)
    }

    /// Expert width given the dense FFN width.
    pub fn expert_hidden(&self, dense_hidden: usize) -> usize {
        self.expert_hidden_size
            .unwrap_or_else(|| ((dense_hidden as f64 / (self.top_k + self.num_shared_experts) as f64).round() as usize).max(1))
    }

    /// Semantic checks; `Err((key under model.moe, message))`.
    pub fn check(&self, n_layers: usize) -> Result<(), (String, String)> {
        let e = |k: &str, m: String| Err((k.to_string(), m));
        if self.num_experts == 0 {
            return e("num_experts", "must be at least 1".into());
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return e("top_k", format!("must be in 1..=num_experts ({}); got {}", self.num_experts, self.top_k));
        }
        if self.expert_hidden_size == Some(0) {
            return e("expert_hidden_size", "must be at least 1".into());
        }
        if self.first_dense_layers > n_layers {
            return e("first_dense_layers", format!("must be ≤ model.n_layers ({n_layers}); got {}", self.first_dense_layers));
        }
        if !(self.route_scale > 0.0 && self.route_scale.is_finite()) {
            return e("route_scale", format!("must be a positive number; got {}", self.route_scale));
        }
        if !(self.z_loss_coef >= 0.0) {
            return e("z_loss_coef", format!("must be ≥ 0; got {}", self.z_loss_coef));
        }
        if !(self.balance.aux_loss_coef >= 0.0) {
            return e("balance.aux_loss_coef", format!("must be ≥ 0; got {}", self.balance.aux_loss_coef));
        }
        if !(self.balance.bias_update_rate >= 0.0) {
            return e("balance.bias_update_rate", format!("must be ≥ 0; got {}", self.balance.bias_update_rate));
        }
        if let Some(c) = self.capacity_factor {
            if !(c > 0.0 && c.is_finite()) {
                return e("capacity_factor", format!("must be a positive number (or null for dropless); got {c}"));
            }
        }
        Ok(())
    }
}

fn one() -> f64 {
    1.0
}
fn default_aux() -> f64 {
    1e-2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(e: usize, k: usize, shared: usize) -> MoeSpec {
        serde_yaml_ng::from_str(&format!("{{num_experts: {e}, top_k: {k}, num_shared_experts: {shared}}}")).unwrap()
    }

    #[test]
    fn defaults_sparsity_and_expert_width() {
        let s = spec(8, 2, 0);
        assert_eq!(s.sparsity(), 0.75);
        assert_eq!(s.expert_hidden(352), 176);
        assert_eq!(spec(16, 2, 1).expert_hidden(352), 117);
        assert_eq!(spec(4, 4, 0).sparsity(), 0.0);
        assert!(!s.normalizes() && s.balance.aux_loss_coef == 1e-2 && s.capacity_factor.is_none());
        let mut sig = spec(8, 2, 0);
        sig.score = RouterScore::Sigmoid;
        assert!(sig.normalizes());
        assert!(spec(4, 5, 0).check(2).unwrap_err().0 == "top_k");
        let mut d = spec(4, 2, 0);
        d.first_dense_layers = 3;
        assert_eq!(d.check(2).unwrap_err().0, "first_dense_layers");
    }
}
