//! Softmax, log-softmax and cross-entropy with exact gradients.
//!
//! candle 0.11's fused `softmax_last_dim` has no backward, so [`softmax_last_dim`] and
//! [`log_softmax_last_dim`] are composed from primitive ops. Cross-entropy has a fused CPU
//! CustomOp (f32/f64; per-row log-sum-exp in f64) with the hand-written backward
//! `dlogits = (softmax − onehot(target)) · dloss`, and the composed form as its reference
//! ([`cross_entropy_each_composed`]), used on other devices.

use super::cpu::{slice, ROW_CHUNK};
use super::simd::{exp_f32_fma, with_fast_isa};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

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
    cross_entropy_each(logits, targets)?.mean_all()
}

/// Per-row cross-entropy `[N]` (nats). Fused on CPU for f32/f64.
pub fn cross_entropy_each(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (_n, v) = logits.dims2()?;
    if logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64) {
        let t = targets.to_dtype(DType::U32)?.contiguous()?;
        logits.contiguous()?.apply_op2(&t, CrossEntropy { vocab: v })
    } else {
        cross_entropy_each_composed(logits, targets)
    }
}

/// Reference form from primitive ops.
pub fn cross_entropy_each_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = log_softmax_last_dim(logits)?;
    lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

struct CrossEntropy {
    vocab: usize,
}

/// Row kernels of the fused cross-entropy. f64 runs libm's `exp` in f64; f32 runs the vectorised
/// [`exp_f32_fma`] (called under [`with_fast_isa`] only) on `x − max` (in `[−∞, 0]`, so no overflow), sums in 16 f32 lanes and takes the log
/// in f64: libm's scalar f64 `exp` was ~5% of an attention-preset training step.
pub(super) trait CeElem: WithDType {
    /// `log Σ_j exp(row_j)`.
    fn lse(row: &[Self]) -> f64;
    /// `out_j = exp(row_j − l) · g`.
    fn softmax_scaled(row: &[Self], l: f64, g: f64, out: &mut [Self]);
}

impl CeElem for f64 {
    fn lse(row: &[f64]) -> f64 {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
        m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }
    fn softmax_scaled(row: &[f64], l: f64, g: f64, out: &mut [f64]) {
        for (o, x) in out.iter_mut().zip(row) {
            *o = (x - l).exp() * g;
        }
    }
}

impl CeElem for f32 {
    #[inline(always)]
    fn lse(row: &[f32]) -> f64 {
        // Lane-wise maximum (a single running max is a chain of dependent compares).
        let m = super::simd::max(row, f32::NEG_INFINITY);
        let mut acc = [0f32; 16];
        let chunks = row.chunks_exact(16);
        let tail = chunks.remainder().iter().map(|&x| exp_f32_fma(x - m) as f64).sum::<f64>();
        for c in chunks {
            for i in 0..16 {
                acc[i] += exp_f32_fma(c[i] - m);
            }
        }
        m as f64 + (acc.iter().map(|&a| a as f64).sum::<f64>() + tail).ln()
    }
    #[inline(always)]
    fn softmax_scaled(row: &[f32], l: f64, g: f64, out: &mut [f32]) {
        // x − l ≤ ln(row length): l is the row's log-sum-exp, within a few units of max(x).
        let (l, g) = (l as f32, g as f32);
        for (o, &x) in out.iter_mut().zip(row) {
            *o = exp_f32_fma(x - l) * g;
        }
    }
}

pub(super) fn check_targets(t: &[u32], v: usize) -> Result<()> {
    if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
        candle_core::bail!("cross_entropy: target {bad} ≥ vocabulary size {v}");
    }
    Ok(())
}

fn ce_fwd<T: CeElem>(x: &[T], t: &[u32], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); t.len()];
    out.par_chunks_mut(ROW_CHUNK).zip(x.par_chunks(ROW_CHUNK * v)).zip(t.par_chunks(ROW_CHUNK)).for_each(|((o, xc), tc)| {
        with_fast_isa(#[inline(always)] || {
            for ((oi, row), &ti) in o.iter_mut().zip(xc.chunks(v)).zip(tc) {
                *oi = T::from_f64(T::lse(row) - row[ti as usize].to_f64());
            }
        })
    });
    out
}

fn ce_bwd<T: CeElem>(x: &[T], t: &[u32], g: &[T], v: usize) -> Vec<T> {
    // Every row is written by softmax_scaled.
    let mut out = super::cpu::take(x.len());
    out.par_chunks_mut(ROW_CHUNK * v).zip(x.par_chunks(ROW_CHUNK * v)).zip(t.par_chunks(ROW_CHUNK).zip(g.par_chunks(ROW_CHUNK))).for_each(
        |((oc, xc), (tc, gc))| {
            with_fast_isa(#[inline(always)] || {
                for (((orow, row), &ti), gi) in oc.chunks_mut(v).zip(xc.chunks(v)).zip(tc).zip(gc) {
                    let l = T::lse(row);
                    let gi = gi.to_f64();
                    T::softmax_scaled(row, l, gi, orow);
                    orow[ti as usize] = T::from_f64(orow[ti as usize].to_f64() - gi);
                }
            })
        },
    );
    out
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l1.dims()[0];
        let t = slice::<u32>(s2, l2)?;
        if t.len() != n {
            candle_core::bail!("cross_entropy: {} targets for {n} rows", t.len());
        }
        check_targets(t, self.vocab)?;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(ce_fwd(slice::<f32>(s1, l1)?, t, self.vocab)),
            CpuStorage::F64(_) => CpuStorage::F64(ce_fwd(slice::<f64>(s1, l1)?, t, self.vocab)),
            _ => candle_core::bail!("cross_entropy: fused CPU form supports f32/f64"),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = logits.apply_op2_no_bwd(&targets.contiguous()?, &CrossEntropyBwd { vocab: self.vocab, grad: grad.contiguous()? })?;
        Ok((Some(d), None))
    }
}

/// `dlogits` for a given per-row upstream gradient.
struct CrossEntropyBwd {
    vocab: usize,
    grad: Tensor,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross_entropy_bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = slice::<u32>(s2, l2)?;
        let (gs, gl) = self.grad.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else { candle_core::bail!("cross_entropy_bwd: CPU only") };
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(ce_bwd(slice::<f32>(s1, l1)?, t, slice::<f32>(gs, gl)?, self.vocab)),
            CpuStorage::F64(_) => CpuStorage::F64(ce_bwd(slice::<f64>(s1, l1)?, t, slice::<f64>(gs, gl)?, self.vocab)),
            _ => candle_core::bail!("cross_entropy_bwd: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}
