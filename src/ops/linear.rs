//! `y = x W` over the last dimension of x, as one autograd node.
//!
//! The composed form `x.reshape((R, d)).matmul(W).reshape(shape)` is three nodes, and candle 0.11's
//! backward allocates a zero gradient and adds into it for every input of every node: each reshape
//! costs a full pass of zeroing, adding and allocating over an activation. The projections of a
//! block (x `[B,T,d]` → q `[B,T,H,D]`, o `[B,T,H,D]` → `[B,T,d]`, the FFN) were about a quarter of
//! the gradient traffic of an attention-preset step (`examples/graph_nodes.rs` counts it).
//!
//! On the CPU (f32/f64) [`linear`] is a CustomOp over the flattened rows: forward and backward
//! (`dx = dy Wᵀ`, `dW = xᵀ dy`) with [`mm_par`] on the contiguous buffers, the products of the
//! fused sublayers. Elsewhere it is the composed form.

use super::cpu::slice;
use super::gemm::{mm_par, Mat};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

/// x (any shape whose element count is a multiple of `d = w.dim(0)`; rows of `d` contiguous
/// elements) times w `[d, n]`, returned in `out_shape` (element count `rows·n`).
pub fn linear(x: &Tensor, w: &Tensor, out_shape: impl Into<Shape>) -> Result<Tensor> {
    let out_shape = out_shape.into();
    let (d, n) = w.dims2()?;
    let rows = x.elem_count() / d.max(1);
    if d == 0 || rows * d != x.elem_count() || out_shape.elem_count() != rows * n {
        bail!("linear: x {:?} with w {:?} cannot give {:?}", x.dims(), w.dims(), out_shape.dims());
    }
    if super::cpu_fusable(&[x, w]) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Linear { out_shape })
    } else {
        linear_composed(x, w, out_shape)
    }
}

/// Reference form from candle primitives.
pub fn linear_composed(x: &Tensor, w: &Tensor, out_shape: impl Into<Shape>) -> Result<Tensor> {
    let d = w.dim(0)?;
    x.reshape((x.elem_count() / d, d))?.matmul(w)?.reshape(out_shape)
}

struct Linear {
    out_shape: Shape,
}

/// `c[m×n] = a[m×k] b[k×n]`, row-major, on the rayon pool.
pub(super) fn gemm_rows<T: WithDType>(a: &[T], b: &[T], m: usize, k: usize, n: usize) -> Vec<T> {
    let mut c = super::cpu::take(m * n); // the product overwrites it
    mm_par(m, n, k, &mut c, n, false, Mat::rows(a, k, 0), Mat::rows(b, n, 0), T::one());
    c
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (k, n) = l2.shape().dims2()?;
        let m = l1.shape().elem_count() / k;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(gemm_rows::<f32>(slice(s1, l1)?, slice(s2, l2)?, m, k, n)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(gemm_rows::<f64>(slice(s1, l1)?, slice(s2, l2)?, m, k, n)),
            _ => bail!("linear: fused CPU form supports f32/f64 (same dtype)"),
        };
        Ok((out, self.out_shape.clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (k, n) = w.dims2()?;
        let m = x.elem_count() / k;
        let dy = dy.detach().contiguous()?;
        let (dx, dw) = match x.dtype() {
            DType::F32 => grads::<f32>(x, w, &dy, (m, k, n))?,
            DType::F64 => grads::<f64>(x, w, &dy, (m, k, n))?,
            dt => bail!("linear: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx = dy Wᵀ` (`[m, k]`) and `dW = xᵀ dy` (`[k, n]`) with [`mm_par`] (the same products as the
/// sublayer ops: the packed kernel or the k-split), in place on the contiguous buffers.
fn grads<T: WithDType>(x: &Tensor, w: &Tensor, dy: &Tensor, (m, k, n): (usize, usize, usize)) -> Result<(Tensor, Tensor)> {
    let guards: Vec<_> = [x, w, dy].iter().map(|t| t.storage_and_layout()).collect();
    let sl = guards.iter().map(|(st, l)| super::attn_fused::cpu_slice::<T>(st, l)).collect::<Result<Vec<_>>>()?;
    let (xs, ws, dys) = (sl[0], sl[1], sl[2]);
    let mut dx = super::cpu::take::<T>(m * k); // overwritten (accumulate = false)
    mm_par(m, k, n, &mut dx, k, false, Mat::rows(dys, n, 0), Mat::rows_t(ws, n, 0), T::one());
    let mut dw = super::cpu::take::<T>(k * n);
    mm_par(k, n, m, &mut dw, n, false, Mat::rows_t(xs, k, 0), Mat::rows(dys, n, 0), T::one());
    drop(sl);
    drop(guards);
    Ok((Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(dw, w.shape(), w.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Var};

    /// Fused == composed (forward and both gradients) for 3-D and 4-D inputs, f32 and f64.
    #[test]
    fn fused_matches_composed() {
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-13 } else { 1e-6 };
            let x = Var::from_tensor(&rand_tensor(&[3, 37, 4, 6], 1.0, 1).to_dtype(dt).unwrap()).unwrap();
            let w = Var::from_tensor(&rand_tensor(&[24, 10], 0.5, 2).to_dtype(dt).unwrap()).unwrap();
            let wy = rand_tensor(&[3, 37, 10], 1.0, 3).to_dtype(dt).unwrap();
            let yf = linear(x.as_tensor(), w.as_tensor(), (3, 37, 10)).unwrap();
            let yc = linear_composed(x.as_tensor(), w.as_tensor(), (3, 37, 10)).unwrap();
            assert_close("linear fwd", &yc, &yf, tol);
            let gf = (yf * &wy).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &wy).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                assert_close("linear grad", gc.get(v.as_tensor()).unwrap(), gf.get(v.as_tensor()).unwrap(), tol);
            }
        }
        assert!(linear(&rand_tensor(&[5, 7], 1.0, 1), &rand_tensor(&[6, 2], 1.0, 1), (5, 2)).is_err());
    }

    /// Finite differences in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let x = Var::from_tensor(&rand_tensor(&[2, 3, 4], 1.0, 4)).unwrap();
        let w = Var::from_tensor(&rand_tensor(&[4, 5], 0.7, 5)).unwrap();
        let wy = rand_tensor(&[2, 3, 5], 1.0, 6);
        let loss = || (linear(x.as_tensor(), w.as_tensor(), (2, 3, 5)).unwrap() * &wy).unwrap().sum_all().unwrap();
        check_grads("linear", &[("x".into(), x.clone()), ("w".into(), w.clone())], &loss, 12);
    }
}
