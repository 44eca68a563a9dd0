//! Data-dependent token shift `y_t = x_t + α_t ⊙ (x_{t−1} − x_t)` (`x_{−1} = 0`) as one autograd
//! node: FoX Pro's k/v shift ("ShiftLinear": Lin et al. 2025, Forgetting Transformer,
//! arXiv:2503.02130, and its reference code `forgetting_transformer/.../fgate_cache.py`; see
//! `../shared/reference/mixers.md` §FoX), with x `[B,T,H,D]` and one mix per head and token,
//! α `[B,T,H,1]`.
//!
//! Why one node: composed it is a zero row, a narrow and a concatenation (the shifted copy), a
//! subtraction, a broadcast product and an addition, each an activation-sized candle node whose
//! backward zero-fills and adds a gradient (FoX Pro step profile: 8% of the samples in candle's
//! element-wise kernels and 3.7% in zero-filling).
//!
//! Backward: `dx_t = (1 − α_t)·dy_t + α_{t+1}·dy_{t+1}` (the last token has no successor) and
//! `dα_t = Σ_D dy_t ⊙ (x_{t−1} − x_t)`. [`shift_mix_composed`] is the reference form.

use super::cpu::{slice, take};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `x + α ⊙ (shift(x) − x)` for x `[B,T,H,D]`, α `[B,T,H,1]`; shift moves every row one token
/// later along T (zeros first). One fused node on CPU for f32/f64, composed elsewhere.
pub fn shift_mix(x: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let (b, t, h, _) = x.dims4()?;
    if alpha.dims() != [b, t, h, 1] {
        bail!("shift_mix: alpha {:?} does not fit x {:?} (want [{b}, {t}, {h}, 1])", alpha.dims(), x.dims());
    }
    if super::cpu_fusable(&[x, alpha]) {
        x.contiguous()?.apply_op2(&alpha.contiguous()?, ShiftMix)
    } else {
        shift_mix_composed(x, alpha)
    }
}

/// Reference form from candle ops.
pub fn shift_mix_composed(x: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let t = x.dim(1)?;
    let zero = x.narrow(1, 0, 1)?.zeros_like()?;
    let prev = if t == 1 { zero } else { Tensor::cat(&[&zero, &x.narrow(1, 0, t - 1)?], 1)? };
    x.broadcast_add(&(prev - x)?.broadcast_mul(alpha)?)
}

struct ShiftMix;

/// (T, H·D, D) of x's layout.
fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[_, t, h, d] => Ok((t, h * d, d)),
        other => bail!("shift_mix: x must be [B,T,H,D], got {other:?}"),
    }
}

fn fwd<T: WithDType>(x: &[T], a: &[T], t: usize, row: usize, d: usize) -> Vec<T> {
    let mut y = take(x.len()); // every element is written
    let heads = row / d;
    y.par_chunks_mut(t * row).zip(x.par_chunks(t * row).zip(a.par_chunks(t * heads))).for_each(|(yb, (xb, ab))| {
        for i in 0..t {
            for hh in 0..heads {
                let al = ab[i * heads + hh];
                let cur = &xb[i * row + hh * d..i * row + (hh + 1) * d];
                let out = &mut yb[i * row + hh * d..i * row + (hh + 1) * d];
                if i == 0 {
                    out.iter_mut().zip(cur).for_each(|(o, &c)| *o = c - al * c);
                } else {
                    let prev = &xb[(i - 1) * row + hh * d..(i - 1) * row + (hh + 1) * d];
                    out.iter_mut().zip(cur.iter().zip(prev)).for_each(|(o, (&c, &p))| *o = c + al * (p - c));
                }
            }
        }
    });
    y
}

/// Returns (dx, dα).
fn bwd<T: WithDType>(x: &[T], a: &[T], dy: &[T], t: usize, row: usize, d: usize) -> (Vec<T>, Vec<T>) {
    let heads = row / d;
    let mut dx = take(x.len()); // every element is written
    let mut da = vec![T::zero(); a.len()];
    dx.par_chunks_mut(t * row).zip(da.par_chunks_mut(t * heads)).zip(x.par_chunks(t * row).zip(a.par_chunks(t * heads)).zip(dy.par_chunks(t * row))).for_each(|((dxb, dab), ((xb, ab), dyb))| {
        for i in 0..t {
            for hh in 0..heads {
                let (lo, hi) = (i * row + hh * d, i * row + (hh + 1) * d);
                let al = ab[i * heads + hh];
                let one_minus = T::one() - al;
                let (g, cur) = (&dyb[lo..hi], &xb[lo..hi]);
                let out = &mut dxb[lo..hi];
                if i + 1 < t {
                    let an = ab[(i + 1) * heads + hh];
                    let gn = &dyb[lo + row..hi + row];
                    out.iter_mut().zip(g.iter().zip(gn)).for_each(|(o, (&g, &gn))| *o = one_minus * g + an * gn);
                } else {
                    out.iter_mut().zip(g).for_each(|(o, &g)| *o = one_minus * g);
                }
                let mut s = T::zero();
                if i == 0 {
                    g.iter().zip(cur).for_each(|(&g, &c)| s += g * (T::zero() - c));
                } else {
                    g.iter().zip(cur.iter().zip(&xb[lo - row..hi - row])).for_each(|(&g, (&c, &p))| s += g * (p - c));
                }
                dab[i * heads + hh] = s;
            }
        }
    });
    (dx, da)
}

impl CustomOp2 for ShiftMix {
    fn name(&self) -> &'static str {
        "shift-mix"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, row, d) = dims(l1)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(fwd::<f32>(slice(s1, l1)?, slice(s2, l2)?, t, row, d)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(fwd::<f64>(slice(s1, l1)?, slice(s2, l2)?, t, row, d)),
            _ => bail!("shift-mix: fused CPU form supports f32/f64 (same dtype)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, alpha: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.device().is_cpu() {
            bail!("shift-mix: CPU only, got inputs on {:?}", x.device().location());
        }
        let g = g.contiguous()?;
        let (dx, da) = match x.dtype() {
            candle_core::DType::F32 => grads::<f32>(x, alpha, &g)?,
            candle_core::DType::F64 => grads::<f64>(x, alpha, &g)?,
            dt => bail!("shift-mix: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(da)))
    }
}

fn grads<T: super::attn_fused::Elem>(x: &Tensor, alpha: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (t, row, d) = dims(x.layout())?;
    let guards: Vec<_> = [x, alpha, g].iter().map(|v| v.storage_and_layout()).collect();
    let sl = guards.iter().map(|(st, l)| super::attn_fused::cpu_slice::<T>(st, l)).collect::<Result<Vec<_>>>()?;
    let (dx, da) = bwd(sl[0], sl[1], sl[2], t, row, d);
    drop(sl);
    drop(guards);
    Ok((Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(da, alpha.shape(), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Var};

    fn vars(dt: DType, t: usize) -> (Var, Var) {
        let x = Var::from_tensor(&rand_tensor(&[2, t, 3, 5], 1.0, 1).to_dtype(dt).unwrap()).unwrap();
        let a = rand_tensor(&[2, t, 3, 1], 1.0, 2).to_dtype(dt).unwrap();
        let a = Var::from_tensor(&candle_nn::ops::sigmoid(&a).unwrap()).unwrap();
        (x, a)
    }

    /// Fused == composed (values and both gradients, f64 and f32, T = 1 and T > 1), and finite
    /// differences of the fused op in f64.
    #[test]
    fn fused_matches_composed_and_finite_differences() {
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for t in [1usize, 7] {
                let (x, a) = vars(dt, t);
                let w = rand_tensor(&[2, t, 3, 5], 1.0, 3).to_dtype(dt).unwrap();
                let yf = shift_mix(x.as_tensor(), a.as_tensor()).unwrap();
                let yc = shift_mix_composed(x.as_tensor(), a.as_tensor()).unwrap();
                assert_close("shift_mix fwd", &yc, &yf, tol);
                let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
                assert_close("shift_mix dx", gc.get(x.as_tensor()).unwrap(), gf.get(x.as_tensor()).unwrap(), tol);
                assert_close("shift_mix dalpha", gc.get(a.as_tensor()).unwrap(), gf.get(a.as_tensor()).unwrap(), tol);
            }
        }
        let (x, a) = vars(DType::F64, 6);
        let w = rand_tensor(&[2, 6, 3, 5], 1.0, 4);
        let named = vec![("x".to_string(), x.clone()), ("alpha".to_string(), a.clone())];
        check_grads("shift_mix", &named, &|| (shift_mix(x.as_tensor(), a.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap(), 12);
    }

    #[test]
    fn bad_alpha_shape_errors() {
        let (x, _) = vars(DType::F64, 4);
        let a = Tensor::zeros((2, 4, 3, 5), DType::F64, x.device()).unwrap();
        assert!(shift_mix(x.as_tensor(), &a).is_err());
    }
}
