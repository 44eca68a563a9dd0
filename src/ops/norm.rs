//! RMSNorm (Zhang & Sennrich 2019) composed from primitive candle ops, so autograd is exact.
//! candle 0.11's fused `candle_nn::ops::rms_norm` has no backward (gradients silently vanish).

use candle_core::{DType, Result, Tensor, D};

/// `x / sqrt(mean(x², -1) + eps) * gain`, statistics in f32 (or f64 when x is f64).
/// x `[..., d]`, gain `[d]`.
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = if dt == DType::F64 { x.clone() } else { x.to_dtype(DType::F32)? };
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&inv)?.to_dtype(dt)?.broadcast_mul(gain)
}

/// RMSNorm without a gain (the gain is applied by the caller, or there is none).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)
}
