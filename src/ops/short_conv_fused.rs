//! Fused causal short convolution for the CPU: depthwise conv + optional bias + optional SiLU in
//! one pass, with a hand-written backward.
//!
//! Same semantics as [`super::short_conv::causal_conv`] (`y_t[c] = b[c] + Σ_{i<cs} w[c, i] ·
//! x_{t−(cs−1)+i}[c]`, zeros before the sequence start), followed by `silu` when asked — the
//! `ShortConvolution(activation="silu")` of fla that Gated DeltaNet and Mamba2 apply to their
//! projections (`../shared/reference/mixers.md`).
//!
//! Why: the composed form is a zero pad, `cs` narrows, `cs` broadcast products and `cs − 1` adds,
//! then candle's `silu` (seven element-wise ops in the backward). In candle 0.11 the backward of
//! each narrow materialises a zero-padded full-size copy, and the gradient of each broadcast
//! weight is a reduction over (batch, time) that candle runs with a div/mod per element: the
//! short conv and its SiLU were the largest non-matmul cost of a Mamba2 training step.
//!
//! Backward, with `p` the pre-activation and `s = σ(p)`:
//! `dp = dy · s(1 + p(1 − s))` (or `dy` without SiLU), `dx_s[c] = Σ_i w[c,i] · dp_{s+cs−1−i}[c]`,
//! `dw[c,i] = Σ_{b,t} dp_t[c] · x_{t−(cs−1)+i}[c]`, `db[c] = Σ_{b,t} dp_t[c]`.
//! Rows are split into fixed chunks and partial sums of `dw`, `db` are added in chunk order, so
//! results do not depend on the thread count.

use super::attn_fused::Elem;
use super::cpu::{slice, ROW_CHUNK};
use super::short_conv::causal_conv;
use super::simd::{sigmoid, with_fast_isa};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Causal depthwise conv of x `[B, T, C]` with w `[C, cs]`, plus `bias` `[C]`, then SiLU when
/// `silu`. Fused on the CPU for f32/f64 (see [`super::cpu_fusable`]), composed elsewhere.
pub fn short_conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, silu: bool) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(bias);
    if super::cpu_fusable(&all) {
        let (_, _, c) = x.dims3()?;
        let zeros;
        let b = match bias {
            Some(b) => b,
            None => {
                zeros = Tensor::zeros(c, x.dtype(), x.device())?;
                &zeros
            }
        };
        if w.dims() != [c, w.dim(1)?] || b.dims() != [c] || w.dim(1)? == 0 {
            bail!("short_conv: x {:?}, w {:?}, bias {:?} do not fit", x.dims(), w.dims(), b.dims());
        }
        x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, ShortConv { silu })
    } else {
        short_conv_composed(x, w, bias, silu)
    }
}

/// Reference form from candle primitives.
pub fn short_conv_composed(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, silu: bool) -> Result<Tensor> {
    let mut y = causal_conv(x, w)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

struct ShortConv {
    silu: bool,
}

/// Shapes: rows `B·T`, sequence length `T`, channels `C`, taps `cs`.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    t: usize,
    c: usize,
    cs: usize,
}

impl Dims {
    /// Sequence length t, c channels, cs taps.
    pub(super) fn of(t: usize, c: usize, cs: usize) -> Self {
        Self { t, c, cs }
    }
}

/// `w [C, cs]` → `[cs, C]`, so the per-tap loops run over contiguous channels.
fn taps<T: Elem>(w: &[T], d: Dims) -> Vec<T> {
    let mut out = vec![T::zero(); w.len()];
    for c in 0..d.c {
        for i in 0..d.cs {
            out[i * d.c + c] = w[c * d.cs + i];
        }
    }
    out
}

/// Pre-activation of row `r` (= b·T + t) into `p`.
#[inline(always)]
fn pre_row<T: Elem>(x: &[T], wt: &[T], bias: &[T], d: Dims, r: usize, p: &mut [T]) {
    let t = r % d.t;
    p.copy_from_slice(bias);
    for i in 0..d.cs {
        let back = d.cs - 1 - i;
        if back <= t {
            let xr = &x[(r - back) * d.c..(r - back + 1) * d.c];
            for ((p, &w), &x) in p.iter_mut().zip(&wt[i * d.c..(i + 1) * d.c]).zip(xr) {
                *p += w * x;
            }
        }
    }
}

/// The forward over contiguous rows x `[B·T, C]`, w `[C, cs]`, bias `[C]`.
pub(super) fn fwd<T: Elem>(x: &[T], w: &[T], bias: &[T], d: Dims, silu: bool) -> Vec<T> {
    let wt = taps(w, d);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(ROW_CHUNK * d.c).enumerate().for_each(|(k, yc)| {
        with_fast_isa(#[inline(always)] || {
            for (j, yr) in yc.chunks_mut(d.c).enumerate() {
                pre_row(x, &wt, bias, d, k * ROW_CHUNK + j, yr);
                if silu {
                    yr.iter_mut().for_each(|p| *p = *p * sigmoid(*p));
                }
            }
        })
    });
    y
}

/// Returns `[dx ++ dw ++ db]` (dw in the `[C, cs]` layout of w).
pub(super) fn bwd<T: Elem>(x: &[T], w: &[T], bias: &[T], dy: &[T], d: Dims, silu: bool) -> Vec<T> {
    let wt = taps(w, d);
    // dp: the gradient at the pre-activation, one row per (b, t).
    let mut dp = dy.to_vec();
    if silu {
        dp.par_chunks_mut(ROW_CHUNK * d.c).enumerate().for_each(|(k, dc)| {
            with_fast_isa(#[inline(always)] || {
                let mut p = vec![T::zero(); d.c];
                for (j, dr) in dc.chunks_mut(d.c).enumerate() {
                    pre_row(x, &wt, bias, d, k * ROW_CHUNK + j, &mut p);
                    for (g, &p) in dr.iter_mut().zip(&p) {
                        let s = sigmoid(p);
                        *g = *g * s * (T::one() + p * (T::one() - s));
                    }
                }
            })
        });
    }
    let n = x.len();
    let mut out = vec![T::zero(); n + d.c * d.cs + d.c];
    let (dx, rest) = out.split_at_mut(n);
    // dx_s = Σ_i w_i ⊙ dp_{s + cs−1−i} (same sequence only).
    dx.par_chunks_mut(ROW_CHUNK * d.c).enumerate().for_each(|(k, xc)| {
        with_fast_isa(#[inline(always)] || {
            for (j, xr) in xc.chunks_mut(d.c).enumerate() {
                let r = k * ROW_CHUNK + j;
                let t = r % d.t;
                for i in 0..d.cs {
                    let ahead = d.cs - 1 - i;
                    if t + ahead < d.t {
                        let g = &dp[(r + ahead) * d.c..(r + ahead + 1) * d.c];
                        for ((o, &w), &g) in xr.iter_mut().zip(&wt[i * d.c..(i + 1) * d.c]).zip(g) {
                            *o += w * g;
                        }
                    }
                }
            }
        })
    });
    // dw (as [cs, C]) and db: per-chunk partial sums, added in chunk order.
    let rows = n / d.c;
    let parts: Vec<Vec<T>> = (0..rows.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|k| {
            with_fast_isa(#[inline(always)] || {
                let mut acc = vec![T::zero(); (d.cs + 1) * d.c];
                for r in k * ROW_CHUNK..((k + 1) * ROW_CHUNK).min(rows) {
                    let t = r % d.t;
                    let g = &dp[r * d.c..(r + 1) * d.c];
                    for i in 0..d.cs {
                        let back = d.cs - 1 - i;
                        if back <= t {
                            let xr = &x[(r - back) * d.c..(r - back + 1) * d.c];
                            for ((a, &g), &x) in acc[i * d.c..(i + 1) * d.c].iter_mut().zip(g).zip(xr) {
                                *a += g * x;
                            }
                        }
                    }
                    for (a, &g) in acc[d.cs * d.c..].iter_mut().zip(g) {
                        *a += g;
                    }
                }
                acc
            })
        })
        .collect();
    let (dw, db) = rest.split_at_mut(d.c * d.cs);
    let mut sum = vec![T::zero(); (d.cs + 1) * d.c];
    for p in &parts {
        sum.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
    }
    for c in 0..d.c {
        for i in 0..d.cs {
            dw[c * d.cs + i] = sum[i * d.c + c];
        }
    }
    db.copy_from_slice(&sum[d.cs * d.c..]);
    out
}

fn dims(lx: &Layout, lw: &Layout) -> Result<Dims> {
    let (_, t, c) = lx.shape().dims3()?;
    let (cw, cs) = lw.shape().dims2()?;
    if cw != c {
        bail!("short_conv: weight {:?} for {c} channels", lw.dims());
    }
    Ok(Dims { t, c, cs })
}

impl CustomOp3 for ShortConv {
    fn name(&self) -> &'static str {
        "short_conv"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = dims(l1, l2)?;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(fwd(slice::<f32>(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, d, self.silu)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd(slice::<f64>(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, d, self.silu)),
            _ => bail!("short_conv: fused CPU form supports f32/f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let (c, cs) = w.dims2()?;
        let packed = x.apply_op3_no_bwd(w, b, &ShortConvBwd { silu: self.silu, dy: dy.contiguous()? })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, c * cs)?.reshape((c, cs))?;
        let db = packed.narrow(0, n + c * cs, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward as an op over (x, w, bias) holding the upstream gradient.
struct ShortConvBwd {
    silu: bool,
    dy: Tensor,
}

impl CustomOp3 for ShortConvBwd {
    fn name(&self) -> &'static str {
        "short_conv_bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = dims(l1, l2)?;
        let (gs, gl) = self.dy.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else { bail!("short_conv_bwd: CPU only") };
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(bwd(slice::<f32>(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, slice(gs, gl)?, d, self.silu)),
            CpuStorage::F64(_) => CpuStorage::F64(bwd(slice::<f64>(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, slice(gs, gl)?, d, self.silu)),
            _ => bail!("short_conv_bwd: f32/f64 only"),
        };
        let len = l1.shape().elem_count() + d.c * d.cs + d.c;
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Var};

    /// Fused == composed, forward and every gradient, with and without bias and SiLU, over
    /// more than one row chunk (sequences cross chunk boundaries), in f64 and f32.
    #[test]
    fn fused_matches_composed() {
        let (b, t, c, cs) = (3, 50, 5, 4);
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-12 } else { 2e-6 };
            let x = Var::from_tensor(&rand_tensor(&[b, t, c], 1.5, 1).to_dtype(dt).unwrap()).unwrap();
            let w = Var::from_tensor(&rand_tensor(&[c, cs], 0.7, 2).to_dtype(dt).unwrap()).unwrap();
            let bias = Var::from_tensor(&rand_tensor(&[c], 0.5, 3).to_dtype(dt).unwrap()).unwrap();
            let wy = rand_tensor(&[b, t, c], 1.0, 4).to_dtype(dt).unwrap();
            for (with_bias, silu) in [(false, false), (true, false), (false, true), (true, true)] {
                let bb = with_bias.then(|| bias.as_tensor());
                let yf = short_conv(x.as_tensor(), w.as_tensor(), bb, silu).unwrap();
                let yc = short_conv_composed(x.as_tensor(), w.as_tensor(), bb, silu).unwrap();
                assert_close("short_conv fwd", &yc, &yf, tol);
                let gf = (yf * &wy).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (yc * &wy).unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&x, &w] {
                    assert_close("short_conv grad", gc.get(v.as_tensor()).unwrap(), gf.get(v.as_tensor()).unwrap(), tol);
                }
                if with_bias {
                    assert_close("short_conv dbias", gc.get(bias.as_tensor()).unwrap(), gf.get(bias.as_tensor()).unwrap(), tol);
                }
            }
        }
    }

    /// Finite differences in f64 on the fused op (SiLU and bias on), with a kernel longer than
    /// the sequence.
    #[test]
    fn gradients_match_finite_differences() {
        for (t, cs) in [(6, 3), (2, 4)] {
            let x = Var::from_tensor(&rand_tensor(&[2, t, 3], 1.0, 5)).unwrap();
            let w = Var::from_tensor(&rand_tensor(&[3, cs], 0.8, 6)).unwrap();
            let b = Var::from_tensor(&rand_tensor(&[3], 0.5, 7)).unwrap();
            let wy = rand_tensor(&[2, t, 3], 1.0, 8);
            let loss = || (short_conv(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), true).unwrap() * &wy).unwrap().sum_all().unwrap();
            check_grads("short_conv", &[("x".into(), x.clone()), ("w".into(), w.clone()), ("b".into(), b.clone())], &loss, 12);
        }
    }
}
