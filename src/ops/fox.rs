//! Core op `fox`: forgetting attention (Lin, Nikishin, He & Courville, "Forgetting Transformer:
//! Softmax Attention with a Forget Gate", ICLR 2025, arXiv:2503.02130), layout `[B, T, H, D]`
//! (semantics: `../shared/reference/ops.md` §2; reference fla
//! `fla/ops/forgetting_attn/naive.py::naive_forgetting_attn`).
//!
//! q `[B,T,Hq,D]`, k, v `[B,T,Hkv,D]` (GQA: query head h reads kv head `h / (Hq/Hkv)`),
//! g `[B,T,Hq]` = log forget gate per query head (`g = logsigmoid(·) ≤ 0`, computed by the caller):
//! ```text
//! G = cumsum_t(g)   (inclusive)
//! o_i = Σ_{j≤i} softmax_j( q_i·k_j/√D + G_i − G_j ) v_j      (bias = Σ_{t=j+1..i} g_t)
//! ```
//! Forms: [`fox`] dispatches to the fused flash-style CPU kernel
//! [`crate::ops::attn_fused::fox_fused`] (f32/f64 on CPU; tiled, no T×T matrix, hand-written
//! backward including dg) or to [`fox_composed`] (materialises `[B,Hq,T,T]`, candle autograd,
//! any device; bias and softmax in f32, or f64 for f64 inputs). [`fox_reference`] is a plain f64
//! loop that sums the bias directly from g (no cumsum differences), used by tests.

use super::attn::{causal_mask, expand_kv};
use candle_core::{bail, DType, Result, Tensor};

/// Forgetting attention. q `[B,T,Hq,D]`, k/v `[B,T,Hkv,D]`, g `[B,T,Hq]` → o `[B,T,Hq,D]`.
/// CPU f32/f64 inputs run the fused kernel (g is cast to q's dtype), others the composed form.
pub fn fox(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Result<Tensor> {
    let cpu = [q, k, v, g].iter().all(|x| x.device().is_cpu());
    if cpu && matches!(q.dtype(), DType::F32 | DType::F64) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        return super::attn_fused::fox_fused(q, k, v, &g.to_dtype(q.dtype())?);
    }
    fox_composed(q, k, v, g)
}

/// Forgetting attention from candle primitives (exact autograd). The bias `G_i − G_j` and the
/// softmax run in f32 (f64 for f64 inputs); the output has v's dtype.
pub fn fox_composed(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Result<Tensor> {
    check_shapes(q, k, v, g)?;
    let (_b, t, hq, d) = q.dims4()?;
    let hkv = k.dim(2)?;
    let rt = super::reduction_dtype(q.dtype());
    let qh = q.transpose(1, 2)?.contiguous()?.to_dtype(rt)?; // [B,Hq,T,D]
    let kh = expand_kv(&k.transpose(1, 2)?, hq / hkv)?.to_dtype(rt)?;
    let vh = expand_kv(&v.transpose(1, 2)?, hq / hkv)?;
    let cum = g.to_dtype(rt)?.transpose(1, 2)?.contiguous()?.cumsum(2)?; // [B,Hq,T]
    let bias = cum.unsqueeze(3)?.broadcast_sub(&cum.unsqueeze(2)?)?; // [B,Hq,T,T]: G_i − G_j
    let s = ((qh.matmul(&kh.transpose(2, 3)?)? * (1.0 / (d as f64).sqrt()))? + bias)?;
    let s = s.broadcast_add(&causal_mask(t, rt, q.device())?)?;
    // P·V in the reduction dtype too (as flash-attention's f32 accumulators): for bf16 inputs
    // the backward's dP = dO·Vᵀ stays f32 before the softmax backward's cancellation.
    let p = super::softmax::softmax_last_dim(&s)?;
    p.matmul(&vh.to_dtype(rt)?)?.to_dtype(v.dtype())?.transpose(1, 2)?.contiguous()
}

/// Plain f64 reference, row-major slices: q `[B,T,Hq,D]`, k, v `[B,T,Hkv,D]`, g `[B,T,Hq]`.
/// The bias of key j for query i is summed directly as `Σ_{t=j+1..i} g_t`.
#[allow(clippy::too_many_arguments)]
pub fn fox_reference(q: &[f64], k: &[f64], v: &[f64], g: &[f64], b: usize, t: usize, hq: usize, hkv: usize, d: usize) -> Vec<f64> {
    let grp = hq / hkv;
    let qi = |bb: usize, tt: usize, h: usize| ((bb * t + tt) * hq + h) * d;
    let ki = |bb: usize, tt: usize, h: usize| ((bb * t + tt) * hkv + h) * d;
    let mut o = vec![0.0; b * t * hq * d];
    let scale = 1.0 / (d as f64).sqrt();
    for bb in 0..b {
        for h in 0..hq {
            let kh = h / grp;
            for i in 0..t {
                // s[j] for j = i, i−1, …, 0 with the bias accumulated backwards from the diagonal.
                let mut s = vec![0.0; i + 1];
                let mut bias = 0.0;
                for j in (0..=i).rev() {
                    let dot: f64 = (0..d).map(|x| q[qi(bb, i, h) + x] * k[ki(bb, j, kh) + x]).sum();
                    s[j] = dot * scale + bias;
                    bias += g[(bb * t + j) * hq + h];
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for x in 0..d {
                        o[qi(bb, i, h) + x] += ej / z * v[ki(bb, j, kh) + x];
                    }
                }
            }
        }
    }
    o
}

/// Shape check: attention shapes plus g `[B,T,Hq]`.
pub fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Result<()> {
    super::attn::check_shapes(q, k, v)?;
    let (b, t, hq, _) = q.dims4()?;
    if g.dims() != [b, t, hq] {
        bail!("fox: expected g [B,T,Hq] = [{b}, {t}, {hq}] (one log forget gate per query head); got {:?}", g.dims());
    }
    Ok(())
}

/// `log σ(x) = −softplus(−x) = min(x, 0) − ln(1 + e^{−|x|})`, stable for any x (never `ln σ`).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let lin = x.neg()?.relu()?.neg()?; // min(x, 0)
    lin - (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}
