//! Grouped projection for mixture-of-experts dispatch: rows `offsets[e]..offsets[e+1]` of x are
//! multiplied by expert e's weight, as one autograd node (the "grouped GEMM" of MoE kernels such as
//! MegaBlocks, Gale et al. 2022, arXiv:2211.15841, without the block-sparse part).
//!
//! The per-expert composed form (narrow or gather the expert's rows, matmul, concatenate) is
//! several nodes per expert, and in candle 0.11 the backward of every one of them zero-fills and
//! adds a full gradient; with 8 experts that was most of the non-matmul time of the MoE preset.
//! On the CPU (f32/f64) [`grouped_linear`] is a CustomOp: forward one `gemm` per group, backward
//! `dx_e = dy_e W_eᵀ`, `dW_e = x_eᵀ dy_e` (candle matmuls on detached views). Elsewhere it is the
//! composed form.

use super::cpu::slice;
use super::linear::gemm_rows;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// x `[R, d]` (rows grouped by expert, `offsets` `[E+1]` ascending from 0 to R) times w `[E, d, n]`
/// → `[R, n]`.
pub fn grouped_linear(x: &Tensor, w: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let (r, d) = x.dims2()?;
    let (e, dw, _n) = w.dims3()?;
    if dw != d || offsets.len() != e + 1 || offsets[0] != 0 || offsets[e] != r || offsets.windows(2).any(|p| p[0] > p[1]) {
        bail!("grouped_linear: x {:?}, w {:?}, offsets {offsets:?} do not fit", x.dims(), w.dims());
    }
    if super::cpu_fusable(&[x, w]) {
        x.contiguous()?.apply_op2(&w.contiguous()?, GroupedLinear { offsets: offsets.to_vec() })
    } else {
        grouped_linear_composed(x, w, offsets)
    }
}

/// Reference form: a narrow and a matmul per non-empty group, concatenated.
pub fn grouped_linear_composed(x: &Tensor, w: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let n = w.dim(2)?;
    let mut parts = Vec::new();
    for (e, p) in offsets.windows(2).enumerate() {
        if p[1] > p[0] {
            parts.push(x.narrow(0, p[0], p[1] - p[0])?.matmul(&w.get(e)?)?);
        }
    }
    if parts.is_empty() {
        return Tensor::zeros((0, n), x.dtype(), x.device());
    }
    Tensor::cat(&parts, 0)
}

struct GroupedLinear {
    offsets: Vec<usize>,
}

fn fwd<T: candle_core::WithDType>(x: &[T], w: &[T], offsets: &[usize], d: usize, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(offsets[offsets.len() - 1] * n);
    for (e, p) in offsets.windows(2).enumerate() {
        let rows = p[1] - p[0];
        if rows > 0 {
            out.extend(gemm_rows(&x[p[0] * d..p[1] * d], &w[e * d * n..(e + 1) * d * n], rows, d, n));
        }
    }
    out
}

impl CustomOp2 for GroupedLinear {
    fn name(&self) -> &'static str {
        "grouped_linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, d) = l1.shape().dims2()?;
        let (_, _, n) = l2.shape().dims3()?;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(fwd::<f32>(slice(s1, l1)?, slice(s2, l2)?, &self.offsets, d, n)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(fwd::<f64>(slice(s1, l1)?, slice(s2, l2)?, &self.offsets, d, n)),
            _ => bail!("grouped_linear: fused CPU form supports f32/f64 (same dtype)"),
        };
        Ok((out, Shape::from((r, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, dy) = (x.detach(), w.detach(), dy.detach().contiguous()?);
        let (_, d, n) = w.dims3()?;
        let mut dx = Vec::new();
        let mut dw = Vec::new();
        for (e, p) in self.offsets.windows(2).enumerate() {
            let rows = p[1] - p[0];
            if rows == 0 {
                dw.push(Tensor::zeros((d, n), w.dtype(), w.device())?);
                continue;
            }
            let (xe, dye) = (x.narrow(0, p[0], rows)?, dy.narrow(0, p[0], rows)?);
            dx.push(dye.matmul(&w.get(e)?.t()?)?);
            dw.push(xe.t()?.matmul(&dye)?);
        }
        let dx = if dx.is_empty() { x.zeros_like()? } else { Tensor::cat(&dx, 0)? };
        Ok((Some(dx), Some(Tensor::stack(&dw, 0)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Var};

    /// Fused == composed, forward and both gradients, with an empty group, f32 and f64.
    #[test]
    fn fused_matches_composed() {
        let offsets = [0, 7, 7, 20, 21];
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-13 } else { 1e-6 };
            let x = Var::from_tensor(&rand_tensor(&[21, 6], 1.0, 1).to_dtype(dt).unwrap()).unwrap();
            let w = Var::from_tensor(&rand_tensor(&[4, 6, 5], 0.5, 2).to_dtype(dt).unwrap()).unwrap();
            let wy = rand_tensor(&[21, 5], 1.0, 3).to_dtype(dt).unwrap();
            let yf = grouped_linear(x.as_tensor(), w.as_tensor(), &offsets).unwrap();
            let yc = grouped_linear_composed(x.as_tensor(), w.as_tensor(), &offsets).unwrap();
            assert_close("grouped_linear fwd", &yc, &yf, tol);
            let gf = (yf * &wy).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &wy).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close("grouped_linear dx", gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap(), tol);
            // The empty group's weight gets no gradient in the composed form; zeros in the fused.
            let dwc = gc.get(w.as_tensor()).unwrap();
            assert_close("grouped_linear dw", dwc, gf.get(w.as_tensor()).unwrap(), tol);
            assert_eq!(gf.get(w.as_tensor()).unwrap().get(1).unwrap().abs().unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), 0.0);
        }
        assert!(grouped_linear(&rand_tensor(&[5, 6], 1.0, 1), &rand_tensor(&[2, 6, 3], 1.0, 1), &[0, 2, 4]).is_err());
    }

    /// Finite differences in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let x = Var::from_tensor(&rand_tensor(&[5, 3], 1.0, 4)).unwrap();
        let w = Var::from_tensor(&rand_tensor(&[2, 3, 4], 0.7, 5)).unwrap();
        let wy = rand_tensor(&[5, 4], 1.0, 6);
        let loss = || (grouped_linear(x.as_tensor(), w.as_tensor(), &[0, 2, 5]).unwrap() * &wy).unwrap().sum_all().unwrap();
        check_grads("grouped_linear", &[("x".into(), x.clone()), ("w".into(), w.clone())], &loss, 12);
    }
}
