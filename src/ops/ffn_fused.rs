//! The pre-norm SwiGLU feed-forward sublayer with its residual as one autograd node:
//! `y = x + (silu(n W_gate) ⊙ (n W_up)) W_down`, `n = RMSNorm(x; g)` (Llama's FFN sublayer:
//! Touvron et al. 2023, arXiv:2302.13971; SwiGLU: Shazeer 2020, arXiv:2002.05202).
//!
//! Why one node: candle 0.11's backward allocates a zero gradient and adds into it for every
//! input of every node. Composed from the fused norm, linear and SwiGLU ops, this sublayer is six
//! nodes whose inputs are activations (n twice, the gate and up projections, the SwiGLU output,
//! x and the FFN output at the residual add): at the attention preset's size, 1696 values per
//! token of zero-filling and adding per layer. As one node it is x alone (128 per token), plus
//! the packed weights (`d·(3h + 1)` values per step, not per token).
//!
//! The op takes `(x, p)` with `p = [g ‖ W_gate ‖ W_up ‖ W_down]` flattened (weights `[d, h]`,
//! `[d, h]`, `[h, d]`, row-major, as the [`crate::model::ffn::Ffn`] parameters); candle's
//! concatenation routes each piece of the gradient back to its parameter.
//!
//! Forward: the norm (row statistics in f64, as [`super::norm`]), two GEMMs, the SwiGLU gate
//! (as [`super::swiglu`]), a GEMM accumulated onto x. The gate and up projections stay in the op
//! ([`Stash`]) for the backward, which recomputes n and the gate and runs
//! `dh = dy W_downᵀ`, `da = dh ⊙ b ⊙ σ(a)(1 + a(1 − σ(a)))`, `db = dh ⊙ silu(a)`,
//! `dW_down = hᵀ dy`, `dW_gate = nᵀ da`, `dW_up = nᵀ db`, `dn = da W_gateᵀ + db W_upᵀ`, then the
//! norm's backward plus `dy` for dx. [`swiglu_ffn_residual_composed`] is the reference.
//! CPU, f32/f64; elsewhere the composed form runs.

use super::attn_fused::Elem;
use super::cpu::{copy_of, give, take, Stash};
use super::sublayer_op::{SublayerKernel, SublayerOp};
use super::gemm::{mm_par, Mat};
use super::swiglu::{gate_bwd_into, gate_into};
use super::norm::{bwd_into as norm_bwd_into, fwd_rows as norm_fwd_rows};
use candle_core::{bail, Layout, Result, Tensor};


/// `x + swiglu(n W_gate, n W_up) W_down` with `n = rms_norm(x, g, eps)`: x `[..., d]`, g `[d]`,
/// `w_gate`, `w_up` `[d, h]`, `w_down` `[h, d]`. One fused node on CPU (f32/f64).
pub fn swiglu_ffn_residual(x: &Tensor, g: &Tensor, w_gate: &Tensor, w_up: &Tensor, w_down: &Tensor, eps: f64) -> Result<Tensor> {
    let d = g.elem_count();
    let (d1, h) = w_gate.dims2()?;
    if x.dims().last() != Some(&d) || d1 != d || w_up.dims() != [d, h] || w_down.dims() != [h, d] {
        bail!("swiglu_ffn_residual: x {:?}, g {:?}, w_gate {:?}, w_up {:?}, w_down {:?} do not fit", x.dims(), g.dims(), w_gate.dims(), w_up.dims(), w_down.dims());
    }
    if !super::cpu_fusable(&[x, g, w_gate, w_up, w_down]) {
        return swiglu_ffn_residual_composed(x, g, w_gate, w_up, w_down, eps);
    }
    let p = Tensor::cat(&[g.flatten_all()?, w_gate.flatten_all()?, w_up.flatten_all()?, w_down.flatten_all()?], 0)?;
    x.contiguous()?.apply_op2(&p, SublayerOp(SwigluFfn { d, h, eps, ab: Stash::default() }))
}

/// Reference form from candle primitives (the composed norm, matmuls and SiLU).
pub fn swiglu_ffn_residual_composed(x: &Tensor, g: &Tensor, w_gate: &Tensor, w_up: &Tensor, w_down: &Tensor, eps: f64) -> Result<Tensor> {
    let d = g.elem_count();
    let n = super::norm::rms_norm_composed(x, g, eps)?.reshape((x.elem_count() / d, d))?;
    let hs = super::swiglu::swiglu_composed(&n.matmul(w_gate)?, &n.matmul(w_up)?)?;
    x + hs.matmul(w_down)?.reshape(x.shape())?
}

struct SwigluFfn {
    d: usize,
    h: usize,
    eps: f64,
    /// `[a ‖ b]`: the gate and up projections `n W_gate`, `n W_up` (`[rows, h]` each).
    ab: Stash,
}

/// Offsets of `g`, `W_gate`, `W_up`, `W_down` in the packed parameters, and their total length.
fn offsets(d: usize, h: usize) -> [usize; 5] {
    [0, d, d + d * h, d + 2 * d * h, d + 3 * d * h]
}

impl SwigluFfn {
    /// Returns y and keeps `[a ‖ b]` in the stash.
    fn forward_impl<T: Elem>(&self, x: &[T], p: &[T]) -> Vec<T> {
        let (d, h) = (self.d, self.h);
        let o = offsets(d, h);
        let rows = x.len() / d;
        let mut n = take(x.len());
        norm_fwd_rows(x, &p[..d], d, self.eps, &mut n);
        let mut ab = take(2 * rows * h);
        let (a, b) = ab.split_at_mut(rows * h);
        mm_par(rows, h, d, a, h, false, Mat::rows(&n, d, 0), Mat::rows(&p[o[1]..o[2]], h, 0), T::one());
        mm_par(rows, h, d, b, h, false, Mat::rows(&n, d, 0), Mat::rows(&p[o[2]..o[3]], h, 0), T::one());
        give(n);
        let mut hs = take(rows * h);
        gate_into(a, b, &mut hs);
        let mut y = copy_of(x);
        mm_par(rows, d, h, &mut y, d, true, Mat::rows(&hs, h, 0), Mat::rows(&p[o[3]..o[4]], d, 0), T::one());
        give(hs);
        self.ab.put(ab);
        y
    }

    /// Returns `(dx, dp)`.
    fn backward_impl<T: Elem>(&self, x: &[T], p: &[T], ab: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let (d, h) = (self.d, self.h);
        let o = offsets(d, h);
        let rows = x.len() / d;
        let (a, b) = ab.split_at(rows * h);
        // dh = dy W_downᵀ, then in place da; db and the gate output h beside it.
        let mut da = take(rows * h);
        mm_par(rows, h, d, &mut da, h, false, Mat::rows(dy, d, 0), Mat::rows_t(&p[o[3]..o[4]], d, 0), T::one());
        let mut db = take(rows * h);
        let mut hs = take(rows * h);
        gate_bwd_into(a, b, &mut da, &mut db, &mut hs);
        let mut dp = vec![T::zero(); o[4]];
        mm_par(h, d, rows, &mut dp[o[3]..o[4]], d, false, Mat::rows_t(&hs, h, 0), Mat::rows(dy, d, 0), T::one());
        give(hs);
        let mut n = take(x.len());
        norm_fwd_rows(x, &p[..d], d, self.eps, &mut n);
        mm_par(d, h, rows, &mut dp[o[1]..o[2]], h, false, Mat::rows_t(&n, d, 0), Mat::rows(&da, h, 0), T::one());
        mm_par(d, h, rows, &mut dp[o[2]..o[3]], h, false, Mat::rows_t(&n, d, 0), Mat::rows(&db, h, 0), T::one());
        // dn = da W_gateᵀ + db W_upᵀ (into n's buffer).
        mm_par(rows, d, h, &mut n, d, false, Mat::rows(&da, h, 0), Mat::rows_t(&p[o[1]..o[2]], h, 0), T::one());
        mm_par(rows, d, h, &mut n, d, true, Mat::rows(&db, h, 0), Mat::rows_t(&p[o[2]..o[3]], h, 0), T::one());
        give(da);
        give(db);
        let mut dx = take(x.len());
        norm_bwd_into(x, &p[..d], &n, d, self.eps, Some(dy), &mut dx, &mut dp[..d]);
        give(n);
        (dx, dp)
    }

}

impl SublayerKernel for SwigluFfn {
    const NAME: &'static str = "swiglu_ffn_residual";

    fn check(&self, x: &Layout, p: &Layout) -> Result<()> {
        if p.shape().elem_count() != offsets(self.d, self.h)[4] || x.shape().elem_count() % self.d != 0 {
            bail!("swiglu_ffn_residual: x {:?} / packed weights {:?} do not fit d {} h {}", x.dims(), p.dims(), self.d, self.h);
        }
        Ok(())
    }

    fn stash(&self) -> &Stash {
        &self.ab
    }

    fn forward<T: Elem>(&self, x: &[T], p: &[T]) -> Result<Vec<T>> {
        Ok(self.forward_impl(x, p))
    }

    fn backward<T: Elem>(&self, x: &[T], p: &[T], saved: &[&[T]], dy: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        Ok(self.backward_impl(x, p, saved[0], dy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Var};

    fn vars(d: usize, h: usize, dt: DType, seed: u64) -> Vec<Var> {
        let shapes: [&[usize]; 4] = [&[d], &[d, h], &[d, h], &[h, d]];
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = rand_tensor(s, if i == 0 { 0.5 } else { 0.4 }, seed + i as u64);
                let t = if i == 0 { (t + 1.0).unwrap() } else { t };
                Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap()
            })
            .collect()
    }

    /// Fused == composed, forward and the gradient of every input, f64 and f32, with a row count
    /// that is not a multiple of the parallel chunk sizes.
    #[test]
    fn fused_matches_composed() {
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let (d, h) = (12, 20);
            let x = Var::from_tensor(&rand_tensor(&[3, 411, d], 1.0, 1).to_dtype(dt).unwrap()).unwrap();
            let w = vars(d, h, dt, 2);
            let wy = rand_tensor(&[3, 411, d], 1.0, 9).to_dtype(dt).unwrap();
            let f = |fused: bool| {
                let (g, wg, wu, wd) = (w[0].as_tensor(), w[1].as_tensor(), w[2].as_tensor(), w[3].as_tensor());
                let y = if fused {
                    swiglu_ffn_residual(x.as_tensor(), g, wg, wu, wd, 1e-6).unwrap()
                } else {
                    swiglu_ffn_residual_composed(x.as_tensor(), g, wg, wu, wd, 1e-6).unwrap()
                };
                let grads = (&y * &wy).unwrap().sum_all().unwrap().backward().unwrap();
                let gs: Vec<Tensor> = std::iter::once(&x).chain(&w).map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
                (y, gs)
            };
            let ((yf, gf), (yc, gc)) = (f(true), f(false));
            assert_close("ffn fwd", &yc, &yf, tol);
            for (i, (c, f)) in gc.iter().zip(&gf).enumerate() {
                assert_close(&format!("ffn grad {i}"), c, f, tol);
            }
        }
    }

    /// Finite differences in f64 w.r.t. x and every weight.
    #[test]
    fn gradients_match_finite_differences() {
        let (d, h) = (5, 7);
        let x = Var::from_tensor(&rand_tensor(&[2, 3, d], 1.0, 4)).unwrap();
        let w = vars(d, h, DType::F64, 5);
        let wy = rand_tensor(&[2, 3, d], 1.0, 6);
        let loss = || {
            let y = swiglu_ffn_residual(x.as_tensor(), w[0].as_tensor(), w[1].as_tensor(), w[2].as_tensor(), w[3].as_tensor(), 1e-6).unwrap();
            (y * &wy).unwrap().sum_all().unwrap()
        };
        let names = ["x", "g", "w_gate", "w_up", "w_down"];
        let all: Vec<(String, Var)> = names.iter().map(|s| s.to_string()).zip(std::iter::once(x.clone()).chain(w.iter().cloned())).collect();
        check_grads("swiglu_ffn_residual", &all, &loss, 20);
    }

    /// Backpropagating the same output twice gives the same gradients (the stash is read-only).
    #[test]
    fn backward_twice() {
        let x = Var::from_tensor(&rand_tensor(&[2, 9, 4], 1.0, 7)).unwrap();
        let w = vars(4, 6, DType::F64, 8);
        let y = swiglu_ffn_residual(x.as_tensor(), w[0].as_tensor(), w[1].as_tensor(), w[2].as_tensor(), w[3].as_tensor(), 1e-6).unwrap();
        let l = y.sqr().unwrap().sum_all().unwrap();
        let (g1, g2) = (l.backward().unwrap(), l.backward().unwrap());
        for v in std::iter::once(&x).chain(&w) {
            assert_close("twice", g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap(), 0.0);
        }
    }

    /// Shapes that do not fit are an error, not a panic.
    #[test]
    fn bad_shapes_error() {
        let x = rand_tensor(&[2, 3, 4], 1.0, 1);
        let g = rand_tensor(&[4], 1.0, 2);
        let (wg, wu, wd) = (rand_tensor(&[4, 6], 1.0, 3), rand_tensor(&[4, 6], 1.0, 4), rand_tensor(&[6, 4], 1.0, 5));
        assert!(swiglu_ffn_residual(&x, &g, &wg, &wu, &wd, 1e-6).is_ok());
        assert!(swiglu_ffn_residual(&x, &g, &wg, &wu, &wu, 1e-6).is_err());
        assert!(swiglu_ffn_residual(&x, &rand_tensor(&[5], 1.0, 2), &wg, &wu, &wd, 1e-6).is_err());
        assert!(swiglu_ffn_residual(&x, &g, &wg, &rand_tensor(&[4, 5], 1.0, 4), &wd, 1e-6).is_err());
    }
}
