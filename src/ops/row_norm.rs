//! Normalisations over the last dimension without affine parameters, each one autograd node
//! with a hand-written backward (the composed forms are 5–7 candle nodes, and candle 0.11's
//! backward allocates, zero-fills and adds one gradient per node):
//! - [`layer_norm_rows`]: `(x − mean) / sqrt(var + eps)` with the population variance — RWKV-7's
//!   per-head GroupNorm (`ln_x`, BlinkDL RWKV-LM `RWKV_Tmix_x070`) before its per-channel affine;
//! - [`l2_normalize_rows`]: `x / max(‖x‖₂, eps)` (`torch.nn.functional.normalize`) — RWKV-7's
//!   `kk`.
//!
//! Statistics in f64 per row. On the CPU (f32/f64) CustomOps; elsewhere the composed forms, which
//! are also the references of the tests.

use super::cpu::slice;
use super::simd::with_fast_isa;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

/// `(x − mean) / sqrt(var + eps)` over the last dimension (population variance).
pub fn layer_norm_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
    if super::cpu_fusable(&[x]) {
        x.contiguous()?.apply_op1(RowNorm { kind: Kind::Layer, eps })
    } else {
        layer_norm_rows_composed(x, eps)
    }
}

/// Reference form of [`layer_norm_rows`] from candle ops.
pub fn layer_norm_rows_composed(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `x / max(‖x‖₂, eps)` over the last dimension.
pub fn l2_normalize_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
    if super::cpu_fusable(&[x]) {
        x.contiguous()?.apply_op1(RowNorm { kind: Kind::L2, eps })
    } else {
        l2_normalize_rows_composed(x, eps)
    }
}

/// Reference form of [`l2_normalize_rows`] from candle ops.
pub fn l2_normalize_rows_composed(x: &Tensor, eps: f64) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(eps)?)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Layer,
    L2,
}

struct RowNorm {
    kind: Kind,
    eps: f64,
}

/// Rows per parallel task.
const ROWS: usize = 64;

/// (shift, 1/scale) of one row: mean and 1/sqrt(var + eps), or 0 and 1/max(‖x‖, eps).
#[inline(always)]
fn stats<T: WithDType>(x: &[T], kind: Kind, eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    match kind {
        Kind::Layer => {
            let mean = super::simd::lanes_sum(x, |v| v.to_f64()) / n;
            let var = super::simd::lanes_sum(x, |v| (v.to_f64() - mean) * (v.to_f64() - mean)) / n;
            (mean, 1.0 / (var + eps).sqrt())
        }
        Kind::L2 => (0.0, 1.0 / super::simd::lanes_sum(x, |v| v.to_f64() * v.to_f64()).sqrt().max(eps)),
    }
}

fn fwd<T: WithDType>(x: &[T], d: usize, kind: Kind, eps: f64) -> Vec<T> {
    let mut out = super::cpu::take(x.len()); // every element is written
    out.par_chunks_mut(ROWS * d).zip(x.par_chunks(ROWS * d)).for_each(|(o, x)| {
        with_fast_isa(#[inline(always)] || {
            for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (m, inv) = stats(x, kind, eps);
                o.iter_mut().zip(x).for_each(|(o, &v)| *o = T::from_f64((v.to_f64() - m) * inv));
            }
        })
    });
    out
}

/// dx from x and dy: with y = (x − m)·inv,
/// LayerNorm `dx = inv·(dy − mean(dy) − y·mean(dy·y))`;
/// L2 `dx = inv·(dy − y·(dy·y))` when ‖x‖ > eps, else `inv·dy` (the denominator is the constant eps).
fn bwd<T: WithDType>(x: &[T], dy: &[T], d: usize, kind: Kind, eps: f64) -> Vec<T> {
    let mut out = super::cpu::take(x.len()); // every element is written
    out.par_chunks_mut(ROWS * d).zip(x.par_chunks(ROWS * d).zip(dy.par_chunks(ROWS * d))).for_each(|(o, (x, g))| {
        with_fast_isa(#[inline(always)] || {
            for (o, (x, g)) in o.chunks_exact_mut(d).zip(x.chunks_exact(d).zip(g.chunks_exact(d))) {
                let (m, inv) = stats(x, kind, eps);
                let gy = super::simd::lanes_sum_pairs(g, x, |g, v| g.to_f64() * (v.to_f64() - m) * inv);
                let (g_mean, gy_coef) = match kind {
                    Kind::Layer => (super::simd::lanes_sum(g, |v| v.to_f64()) / d as f64, gy / d as f64),
                    Kind::L2 if inv < 1.0 / eps => (0.0, gy),
                    Kind::L2 => (0.0, 0.0),
                };
                o.iter_mut().zip(x).zip(g).for_each(|((o, &v), &gv)| {
                    let y = (v.to_f64() - m) * inv;
                    *o = T::from_f64(inv * (gv.to_f64() - g_mean - y * gy_coef));
                });
            }
        })
    });
    out
}

impl CustomOp1 for RowNorm {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Layer => "layer-norm-rows",
            Kind::L2 => "l2-normalize-rows",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(fwd::<f32>(slice(s, l)?, d, self.kind, self.eps)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd::<f64>(slice(s, l)?, d, self.kind, self.eps)),
            _ => bail!("{}: fused CPU form supports f32/f64", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &RowNormBwd { kind: self.kind, eps: self.eps })?))
    }
}

struct RowNormBwd {
    kind: Kind,
    eps: f64,
}

impl CustomOp2 for RowNormBwd {
    fn name(&self) -> &'static str {
        "row-norm-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(bwd::<f32>(slice(s1, l1)?, slice(s2, l2)?, d, self.kind, self.eps)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(bwd::<f64>(slice(s1, l1)?, slice(s2, l2)?, d, self.kind, self.eps)),
            _ => bail!("row-norm-bwd: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Var};

    /// Fused == composed (forward and gradient), f64 and f32, including rows of a constant 0.25
    /// (LayerNorm: zero variance; L2 with eps 2: ‖x‖ ≈ 1.22 < eps, the constant-denominator
    /// branch, while the random rows, ‖x‖ ≈ 4.9, take the other).
    #[test]
    fn fused_matches_composed() {
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-11 } else { 1e-5 };
            let base = rand_tensor(&[3, 5, 2, 24], 1.0, 1);
            let zero_row = Tensor::zeros((1, 5, 2, 24), DType::F64, &candle_core::Device::Cpu).unwrap();
            let x = Tensor::cat(&[&base, &(zero_row + 0.25).unwrap()], 0).unwrap().to_dtype(dt).unwrap();
            let wy = rand_tensor(&[4, 5, 2, 24], 1.0, 3).to_dtype(dt).unwrap();
            for (kind, eps) in [(Kind::Layer, 6.4e-4), (Kind::L2, 1e-12), (Kind::L2, 2.0)] {
                let xv = Var::from_tensor(&x).unwrap();
                let (f, c) = match kind {
                    Kind::Layer => (layer_norm_rows(xv.as_tensor(), eps).unwrap(), layer_norm_rows_composed(xv.as_tensor(), eps).unwrap()),
                    Kind::L2 => (l2_normalize_rows(xv.as_tensor(), eps).unwrap(), l2_normalize_rows_composed(xv.as_tensor(), eps).unwrap()),
                };
                assert_close("row norm fwd", &c, &f, tol);
                let gf = (f * &wy).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (c * &wy).unwrap().sum_all().unwrap().backward().unwrap();
                assert_close("row norm grad", gc.get(xv.as_tensor()).unwrap(), gf.get(xv.as_tensor()).unwrap(), tol);
            }
        }
    }

    /// Finite differences in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let x = Var::from_tensor(&rand_tensor(&[2, 3, 7], 1.0, 4)).unwrap();
        let wy = rand_tensor(&[2, 3, 7], 1.0, 6);
        let vars = vec![("x".to_string(), x.clone())];
        let loss = || {
            let y = layer_norm_rows(x.as_tensor(), 1e-3).unwrap();
            let z = l2_normalize_rows(&(x.as_tensor() * 1.5).unwrap(), 1e-12).unwrap();
            ((y + z).unwrap() * &wy).unwrap().sum_all().unwrap()
        };
        check_grads("row norms", &vars, &loss, 12);
    }
}
