//! `model.mtp:` — multi-token prediction (`../shared/reference/mixers.md` §7).
//!
//! - `{kind: gloeckle, n: 4}` — Gloeckle et al. 2024 (arXiv:2404.19737): the first L−1 layers
//!   are a shared trunk, the model's last layer is head 1 and n−1 extra layers (same block) are
//!   heads 2..n; head i predicts token t+i through the shared final norm and unembedding; the
//!   training loss is the sum of the n heads' mean cross-entropies. n = 1 is the plain model.
//! - `{kind: deepseek, depth: 1, lambda: 0.3}` — DeepSeek-V3 (arXiv:2412.19437 §2.2): D
//!   sequential modules; module k predicts t+k+1; loss L_main + (λ/D)·Σ_k L_k. depth 0 is the
//!   plain model.
//!
//! Only the main (next-token) head's loss is the trial's objective (train_loss, val_loss).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MtpSpec {
    Gloeckle {
        /// Number of heads including the main one (predicting t+1..t+n).
        n: usize,
    },
    Deepseek {
        /// D, the number of sequential modules.
        depth: usize,
        /// λ: the modules' losses are weighted λ/D each (V3: 0.3, then 0.1).
        #[serde(default = "default_lambda")]
        lambda: f64,
    },
}

impl MtpSpec {
    /// Number of extra prediction heads/modules (beyond the main head).
    pub fn extra(&self) -> usize {
        match self {
            MtpSpec::Gloeckle { n } => n.saturating_sub(1),
            MtpSpec::Deepseek { depth, .. } => *depth,
        }
    }

    /// Semantic checks; `Err((key under model.mtp, message))`.
    pub fn check(&self, seq_len: usize) -> Result<(), (String, String)> {
        match self {
            MtpSpec::Gloeckle { n } => {
                if *n == 0 {
                    return Err(("n".into(), "must be at least 1 (1 = next-token only)".into()));
                }
                if *n > seq_len {
                    return Err(("n".into(), format!("must be ≤ train.seq_len ({seq_len}); got {n}")));
                }
            }
            MtpSpec::Deepseek { depth, lambda } => {
                if *depth >= seq_len {
                    return Err(("depth".into(), format!("must be < train.seq_len ({seq_len}); got {depth}")));
                }
                if !(*lambda >= 0.0 && lambda.is_finite()) {
                    return Err(("lambda".into(), format!("must be a number ≥ 0; got {lambda}")));
                }
            }
        }
        Ok(())
    }
}

fn default_lambda() -> f64 {
    0.3
}
