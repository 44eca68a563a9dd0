//! Softmax, log-softmax and cross-entropy composed from primitive ops (exact autograd).
//! candle 0.11's fused `softmax_last_dim` has no backward.

use candle_core::{Result, Tensor, D};

/// Softmax over the last dimension with max subtraction (the max is detached: softmax is
/// shift-invariant, so its gradient contribution is exactly zero).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    z.broadcast_sub(&lse)
}

/// Mean cross-entropy: logits `[N, V]`, targets `[N]` (u32). Returns a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = log_softmax_last_dim(logits)?;
    let picked = lp.gather(&targets.unsqueeze(1)?, 1)?; // [N, 1]
    picked.mean_all()?.neg()
}

/// Per-position cross-entropy `[N]` (no reduction); used by evaluation.
pub fn cross_entropy_each(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = log_softmax_last_dim(logits)?;
    lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}
