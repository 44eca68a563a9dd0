//! The output head and the cross-entropy as one autograd node: per-row
//! `ce_r = logsumexp(x_r Wᵀ) − (x_r Wᵀ)_{t_r}` for hidden rows x `[N, d]`, the head (or tied
//! embedding) W `[V, d]` and targets t `[N]`.
//!
//! Why one node: as `linear` + `cross_entropy` the logits `[N, V]` are a graph tensor, so candle
//! 0.11's backward zero-fills an `[N, V]` gradient and adds `dlogits` into it (two extra passes
//! over the largest activation of a small-d model: V = 512 is 4× d = 128), the cross-entropy's
//! backward recomputes every row's log-sum-exp (N·V more `exp`s), and the tied head needs
//! `Wᵀ` as a contiguous copy (one more node). Here the forward keeps the logits and the row
//! log-sum-exps ([`Stash`]), and the backward writes `dlogits = (softmax − onehot(t)) · g` once
//! and runs `dx = dlogits W`, `dW = dlogitsᵀ x` on it. Same row kernels as
//! [`super::softmax::cross_entropy_each`] (log-sum-exp in f64), same products as
//! [`super::linear`]. CPU f32/f64; elsewhere [`head_ce_composed`].

use super::cpu::{give, slice, take, Stash, ROW_CHUNK};
use super::gemm::{mm_par, Mat};
use super::simd::with_fast_isa;
use super::softmax::{check_targets, CeElem};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per-row cross-entropy `[N]` (nats) of the logits `x Wᵀ`: x `[..., d]` with `N` rows of `d`
/// (no reshape node: candle's backward would zero-fill and add a gradient for it), w `[V, d]`,
/// targets with `N` elements (u32). Differentiable w.r.t. x and w.
pub fn head_ce(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (v, d2) = w.dims2()?;
    let d = x.dims().last().copied().unwrap_or(0);
    let n = x.elem_count() / d.max(1);
    if d != d2 || d == 0 || targets.elem_count() != n {
        bail!("head_ce: x {:?}, w {:?}, targets {:?} do not fit", x.dims(), w.dims(), targets.dims());
    }
    if super::cpu_fusable(&[x, w]) {
        let t = targets.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
        x.contiguous()?.apply_op3(&w.contiguous()?, &t, HeadCe { vocab: v, logits: Stash::default(), lse: Stash::default() })
    } else {
        head_ce_composed(x, w, targets)
    }
}

/// Reference form: the head as [`super::linear::linear`] on `Wᵀ`, then
/// [`super::softmax::cross_entropy_each`] in the reduction dtype (the model's path before this op).
pub fn head_ce_composed(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = w.dim(0)?;
    let logits = super::linear::linear(x, &w.t()?.contiguous()?, (targets.elem_count(), v))?;
    let logits = logits.to_dtype(super::reduction_dtype(logits.dtype()))?;
    super::softmax::cross_entropy_each(&logits, &targets.flatten_all()?)
}

struct HeadCe {
    vocab: usize,
    /// The forward's logits `[N, V]`.
    logits: Stash,
    /// The forward's row log-sum-exps `[N]` (f64).
    lse: Stash,
}

impl HeadCe {
    fn fwd<T: CeElem>(&self, x: &[T], w: &[T], t: &[u32]) -> Vec<T> {
        let v = self.vocab;
        let (n, d) = (t.len(), w.len() / v);
        let mut logits = take::<T>(n * v); // the product overwrites it
        mm_par(n, v, d, &mut logits, v, false, Mat::rows(x, d, 0), Mat::rows_t(w, d, 0), T::one());
        let mut ce = vec![T::zero(); n];
        let mut lse = vec![0f64; n];
        ce.par_chunks_mut(ROW_CHUNK).zip(lse.par_chunks_mut(ROW_CHUNK)).zip(logits.par_chunks(ROW_CHUNK * v).zip(t.par_chunks(ROW_CHUNK))).for_each(
            |((cc, lc), (xc, tc))| {
                with_fast_isa(#[inline(always)] || {
                    for (((ci, li), row), &ti) in cc.iter_mut().zip(lc.iter_mut()).zip(xc.chunks(v)).zip(tc) {
                        *li = T::lse(row);
                        *ci = T::from_f64(*li - row[ti as usize].to_f64());
                    }
                })
            },
        );
        self.logits.put(logits);
        self.lse.put(lse);
        ce
    }

    /// `(dx, dw)` for the per-row upstream gradient `g`.
    fn bwd<T: CeElem>(&self, x: &[T], w: &[T], t: &[u32], g: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        let v = self.vocab;
        let (n, d) = (t.len(), w.len() / v);
        let mut dl = take::<T>(n * v); // every row is written by softmax_scaled
        self.lse.with(|lse: &[f64]| {
            self.logits.with(|logits: &[T]| {
                dl.par_chunks_mut(ROW_CHUNK * v).zip(logits.par_chunks(ROW_CHUNK * v)).zip(t.par_chunks(ROW_CHUNK).zip(g.par_chunks(ROW_CHUNK).zip(lse.par_chunks(ROW_CHUNK)))).for_each(
                    |((oc, xc), (tc, (gc, lc)))| {
                        with_fast_isa(#[inline(always)] || {
                            for ((((orow, row), &ti), gi), &l) in oc.chunks_mut(v).zip(xc.chunks(v)).zip(tc).zip(gc).zip(lc) {
                                let gi = gi.to_f64();
                                T::softmax_scaled(row, l, gi, orow);
                                orow[ti as usize] = T::from_f64(orow[ti as usize].to_f64() - gi);
                            }
                        })
                    },
                )
            })
        })??;
        let mut dx = take::<T>(n * d);
        mm_par(n, d, v, &mut dx, d, false, Mat::rows(&dl, v, 0), Mat::rows(w, d, 0), T::one());
        // dWᵀ = xᵀ dlogits `[d, V]`, then transposed (V·d values): the packed GEMM reads
        // dlogits as its row-major B operand. `dW = dlogitsᵀ x` directly (dlogits as a transposed
        // A) ran the op's fwd + bwd in 11.5–11.7 ms best-of-55 against 11.1–11.2 this way
        // (`examples/head_ce_speed.rs`, 2048 rows, d 128, V 512, one thread).
        let mut dwt = take::<T>(d * v);
        mm_par(d, v, n, &mut dwt, v, false, Mat::rows_t(x, d, 0), Mat::rows(&dl, v, 0), T::one());
        let dw = super::attn_fused::transpose(super::attn_fused::Rows::dense(&dwt, v), d, v);
        give(dwt);
        give(dl);
        Ok((dx, dw))
    }
}

impl CustomOp3 for HeadCe {
    fn name(&self) -> &'static str {
        "head_ce"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = slice::<u32>(s3, l3)?;
        check_targets(t, self.vocab)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.fwd(slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?, t)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.fwd(slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?, t)),
            _ => bail!("head_ce: fused CPU form supports f32/f64 (same dtype)"),
        };
        Ok((out, Shape::from(t.len())))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        let (dx, dw) = match x.dtype() {
            DType::F32 => self.grads::<f32>(x, w, t, &g)?,
            DType::F64 => self.grads::<f64>(x, w, t, &g)?,
            dt => bail!("head_ce: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dw), None))
    }
}

impl HeadCe {
    fn grads<T: CeElem>(&self, x: &Tensor, w: &Tensor, t: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let guards: Vec<_> = [x, w, g].iter().map(|a| a.storage_and_layout()).collect();
        let sl = guards.iter().map(|(st, l)| super::attn_fused::cpu_slice::<T>(st, l)).collect::<Result<Vec<_>>>()?;
        let (tg, tl) = t.storage_and_layout();
        let ts = super::attn_fused::cpu_slice::<u32>(&tg, tl)?;
        let (dx, dw) = self.bwd(sl[0], sl[1], ts, sl[2])?;
        drop(sl);
        drop(guards);
        Ok((Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(dw, w.shape(), w.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{Device, Var};

    fn targets(n: usize, v: usize, seed: u64) -> Tensor {
        let mut r = crate::data::rng::Rng::new(seed);
        Tensor::from_vec((0..n).map(|_| r.below(v as u64) as u32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap()
    }

    /// Fused == composed: per-row losses and the gradients of x and w under a weighted sum of
    /// the rows (so every row's upstream gradient differs), f64 and f32, a row count that is not
    /// a multiple of the row chunk; the op backpropagated twice gives the same gradients.
    #[test]
    fn fused_matches_composed() {
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-12 } else { 2e-5 };
            let (n, d, v) = (150, 12, 37);
            let x = Var::from_tensor(&rand_tensor(&[n, d], 1.0, 1).to_dtype(dt).unwrap()).unwrap();
            let w = Var::from_tensor(&rand_tensor(&[v, d], 0.7, 2).to_dtype(dt).unwrap()).unwrap();
            let t = targets(n, v, 3);
            let wr = rand_tensor(&[n], 1.0, 4).to_dtype(dt).unwrap();
            let cf = head_ce(x.as_tensor(), w.as_tensor(), &t).unwrap();
            let cc = head_ce_composed(x.as_tensor(), w.as_tensor(), &t).unwrap();
            assert_close("head_ce fwd", &cc, &cf, tol);
            let lf = (&cf * &wr).unwrap().sum_all().unwrap();
            let gf = lf.backward().unwrap();
            let gf2 = lf.backward().unwrap();
            let gc = (cc * &wr).unwrap().sum_all().unwrap().backward().unwrap();
            for p in [&x, &w] {
                assert_close("head_ce grad", gc.get(p.as_tensor()).unwrap(), gf.get(p.as_tensor()).unwrap(), tol);
                assert_close("head_ce grad, second backward", gf.get(p.as_tensor()).unwrap(), gf2.get(p.as_tensor()).unwrap(), 0.0);
            }
        }
        // x `[B, T, d]` as the model passes it: the same rows.
        let x3 = rand_tensor(&[2, 5, 4], 1.0, 5);
        let w3 = rand_tensor(&[7, 4], 1.0, 6);
        let t3 = targets(10, 7, 7);
        assert_close("head_ce 3-D", &head_ce(&x3.reshape((10, 4)).unwrap(), &w3, &t3).unwrap(), &head_ce(&x3, &w3, &t3).unwrap(), 0.0);
        let x = rand_tensor(&[4, 3], 1.0, 1);
        assert!(head_ce(&x, &rand_tensor(&[5, 2], 1.0, 1), &targets(4, 5, 1)).is_err(), "d mismatch");
        assert!(head_ce(&x, &rand_tensor(&[5, 3], 1.0, 1), &targets(3, 5, 1)).is_err(), "target count");
        let bad = Tensor::from_vec(vec![0u32, 1, 5, 2], 4, &Device::Cpu).unwrap();
        assert!(head_ce(&x, &rand_tensor(&[5, 3], 1.0, 1), &bad).is_err(), "target ≥ V");
    }

    /// Finite differences of the mean loss in f64, w.r.t. x and w.
    #[test]
    fn finite_differences() {
        let x = Var::from_tensor(&rand_tensor(&[9, 5], 1.0, 7)).unwrap();
        let w = Var::from_tensor(&rand_tensor(&[6, 5], 0.8, 8)).unwrap();
        let t = targets(9, 6, 9);
        let loss = || head_ce(x.as_tensor(), w.as_tensor(), &t).unwrap().mean_all().unwrap();
        check_grads("head_ce", &[("x".into(), x.clone()), ("w".into(), w.clone())], &loss, 60);
    }
}
