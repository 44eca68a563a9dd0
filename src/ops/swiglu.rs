//! SwiGLU gate (Shazeer 2020, arXiv:2002.05202): `h = silu(a) ⊙ b`, `silu(a) = a·σ(a)`.
//!
//! The composed form ([`swiglu_composed`]: candle's `silu` and `mul`) runs about ten full passes
//! over the `[N, hidden]` activations in the backward (candle's silu backward alone is neg, exp,
//! add, recip, two muls, two adds). The fused CPU CustomOp (f32/f64) does one pass forward and
//! one backward, with the hand-written gradient
//! `da = dh ⊙ b ⊙ σ(a)(1 + a(1 − σ(a)))`, `db = dh ⊙ silu(a)`.
//! The forward computes `a / (1 + exp(−a)) · b` in the input dtype, as candle's `silu` then `mul`.
//! f64 uses libm's `exp` (bit-identical to the composed form); f32 uses the vectorised
//! [`super::simd::exp_f32_fma`] polynomial (relative error < 4e-7, so the forward agrees with the composed form to
//! ~1 ulp-scale differences) inside [`with_fast_isa`]: libm's scalar `expf` was ~4% of an
//! attention-preset training step.

use super::cpu::slice;
use super::attn_fused::Elem;
use super::simd::{exp_f32_fma, with_fast_isa};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task (fixed, so results never depend on the thread count).
const CHUNK: usize = 16 * 1024;

/// `silu(a) ⊙ b` for two tensors of the same shape. Fused on CPU for f32/f64, composed elsewhere.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fusable = a.device().is_cpu() && matches!(a.dtype(), DType::F32 | DType::F64) && b.dtype() == a.dtype() && a.dims() == b.dims();
    if fusable {
        a.contiguous()?.apply_op2(&b.contiguous()?, SwiGlu)
    } else {
        swiglu_composed(a, b)
    }
}

/// Reference form from candle primitives.
pub fn swiglu_composed(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.silu()? * b
}

/// Float types the kernels run in.
trait Float: candle_core::WithDType + std::ops::Mul<Output = Self> + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Div<Output = Self> + std::ops::Neg<Output = Self> {
    const ONE: Self;
    fn exp(self) -> Self;
}
impl Float for f32 {
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32_fma(self)
    }
}
impl Float for f64 {
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

fn fwd<T: Elem>(a: &[T], b: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); a.len()];
    gate_into(a, b, &mut y);
    y
}

/// `h = silu(a) ⊙ b` into `h`, in parallel chunks in the widest ISA: the op's forward, also run
/// inside the fused feed-forward ops (`ffn_fused`, `moe_experts`).
pub(super) fn gate_into<T: Elem>(a: &[T], b: &[T], h: &mut [T]) {
    h.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(hc, (ac, bc))| {
        with_fast_isa(#[inline(always)] || {
            for ((y, &a), &b) in hc.iter_mut().zip(ac).zip(bc) {
                *y = a / (T::one() + (T::zero() - a).exp()) * b;
            }
        })
    });
}

/// The gate's backward inside a fused op: `dh_da` holds dh on entry and da on return; writes
/// `db` and the recomputed gate output `h = silu(a) ⊙ b` (the down projection's input).
pub(super) fn gate_bwd_into<T: Elem>(a: &[T], b: &[T], dh_da: &mut [T], db: &mut [T], h: &mut [T]) {
    dh_da
        .par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK).zip(h.par_chunks_mut(CHUNK)))
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|((dac, (dbc, hc)), (ac, bc))| {
            // Zipped slices (no bounds checks), so the loop vectorises.
            with_fast_isa(#[inline(always)] || {
                for ((da, (db, h)), (&a, &b)) in dac.iter_mut().zip(dbc.iter_mut().zip(hc.iter_mut())).zip(ac.iter().zip(bc)) {
                    let g = *da;
                    let s = T::one() / (T::one() + (T::zero() - a).exp());
                    let silu = a * s;
                    *h = silu * b;
                    *db = g * silu;
                    *da = g * b * s * (T::one() + a * (T::one() - s));
                }
            })
        });
}

/// Returns `[da ++ db]`.
fn bwd<T: Float>(a: &[T], b: &[T], dh: &[T]) -> Vec<T> {
    let n = a.len();
    let mut out = vec![T::zero(); 2 * n];
    let (da, db) = out.split_at_mut(n);
    da.par_chunks_mut(CHUNK).zip(db.par_chunks_mut(CHUNK)).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).zip(dh.par_chunks(CHUNK))).for_each(
        |((dac, dbc), ((ac, bc), gc))| {
            with_fast_isa(#[inline(always)] || {
                for ((da, db), ((&a, &b), &g)) in dac.iter_mut().zip(dbc.iter_mut()).zip(ac.iter().zip(bc).zip(gc)) {
                    let s = T::ONE / (T::ONE + (-a).exp());
                    let silu = a * s;
                    *da = g * b * (s * (T::ONE + a * (T::ONE - s)));
                    *db = g * silu;
                }
            })
        },
    );
    out
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            candle_core::bail!("swiglu: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(fwd(slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd(slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?)),
            _ => candle_core::bail!("swiglu: fused CPU form supports f32/f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, dh: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = a.elem_count();
        let packed = a.apply_op3_no_bwd(b, &dh.contiguous()?, &SwiGluBwd)?;
        let da = packed.narrow(0, 0, n)?.reshape(a.shape())?;
        let db = packed.narrow(0, n, n)?.reshape(a.shape())?;
        Ok((Some(da), Some(db)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu_bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(bwd(slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?, slice::<f32>(s3, l3)?)),
            CpuStorage::F64(_) => CpuStorage::F64(bwd(slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?, slice::<f64>(s3, l3)?)),
            _ => candle_core::bail!("swiglu_bwd: f32/f64 only"),
        };
        Ok((out, Shape::from(2 * n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::Var;

    /// Fused forward equals the composed form over more than one parallel chunk: bit for bit in
    /// f64 (same formula, libm exp), and in f32 within the polynomial exp's error (relative
    /// < 4e-7 per exp, so < 1e-6 of the largest output).
    #[test]
    fn forward_matches_composed() {
        for (dt, tol) in [(DType::F32, 1e-6), (DType::F64, 0.0)] {
            let a = rand_tensor(&[3, CHUNK / 7 + 5, 7], 2.0, 1).to_dtype(dt).unwrap();
            let b = rand_tensor(&[3, CHUNK / 7 + 5, 7], 1.0, 2).to_dtype(dt).unwrap();
            assert_close("swiglu fwd", &swiglu_composed(&a, &b).unwrap(), &swiglu(&a, &b).unwrap(), tol);
        }
    }

    /// Gradients of the fused op equal candle's autograd through the composed form.
    #[test]
    fn gradients_match_composed() {
        for (dt, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-14)] {
            let a = Var::from_tensor(&rand_tensor(&[5, 1000], 2.0, 3).to_dtype(dt).unwrap()).unwrap();
            let b = Var::from_tensor(&rand_tensor(&[5, 1000], 1.0, 4).to_dtype(dt).unwrap()).unwrap();
            let w = rand_tensor(&[5, 1000], 1.0, 5).to_dtype(dt).unwrap();
            let loss = |f: fn(&Tensor, &Tensor) -> Result<Tensor>| (f(a.as_tensor(), b.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (loss(swiglu), loss(swiglu_composed));
            for v in [&a, &b] {
                assert_close("swiglu grad", gc.get(v.as_tensor()).unwrap(), gf.get(v.as_tensor()).unwrap(), tol);
            }
        }
    }

    /// Finite differences in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let a = Var::from_tensor(&rand_tensor(&[3, 4], 2.0, 6)).unwrap();
        let b = Var::from_tensor(&rand_tensor(&[3, 4], 1.0, 7)).unwrap();
        let w = rand_tensor(&[3, 4], 1.0, 8);
        let loss = || (swiglu(a.as_tensor(), b.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
        check_grads("swiglu", &[("a".into(), a.clone()), ("b".into(), b.clone())], &loss, 12);
    }
}
