//! Per-channel broadcasts `x ⊙ p`, `x + p` and `x + y ⊙ p` (p one value per element of x's
//! trailing dimensions), each one autograd node with a fast backward.
//!
//! Why: candle 0.11's `broadcast_mul`/`broadcast_add` backward reduces the gradient over the
//! broadcast (leading) dimensions with its strided `ReduceSum`, one element at a time: 12.9% of
//! the CPU samples of an RWKV-7 preset step (`perf --call-graph dwarf`), whose time-mix applies
//! a dozen per-channel vectors (token-shift mixes μ, w0, a0, v0, k_k, k_a, the GroupNorm affine).
//! Here `dp` is a column sum over the rows in fixed chunks ([`super::cpu::row_sums`]; the result
//! does not depend on the thread count) and `dx` one pass.
//!
//! On the CPU (f32/f64) a CustomOp; elsewhere (and for other dtypes) the candle broadcast.

use super::cpu::{row_sums, slice};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `x ⊙ p` with `p` broadcast over x's leading dimensions: `p.elem_count()` must equal the
/// product of some trailing dimensions of x (p `[C]` for x `[B,T,C]`, p `[H,N]` or `[H·N]` for
/// x `[B,T,H,N]`); p's own shape is kept for its gradient.
pub fn mul_channels(x: &Tensor, p: &Tensor) -> Result<Tensor> {
    channels(x, p, true)
}

/// `x + p` with `p` broadcast as in [`mul_channels`].
pub fn add_channels(x: &Tensor, p: &Tensor) -> Result<Tensor> {
    channels(x, p, false)
}

/// `x + y ⊙ p` (x, y of one shape; p broadcast as in [`mul_channels`]): RWKV-7's token-shift
/// mixes `x + (shift(x) − x) ⊙ μ` in one node.
pub fn mix_channels(x: &Tensor, y: &Tensor, p: &Tensor) -> Result<Tensor> {
    let dims = trailing(y, p.elem_count())?;
    if x.shape() != y.shape() {
        bail!("mix_channels: x {:?} and y {:?} differ", x.dims(), y.dims());
    }
    if super::cpu_fusable(&[x, y, p]) {
        x.contiguous()?.apply_op3(&y.contiguous()?, &p.contiguous()?, Mix)
    } else {
        x + y.broadcast_mul(&p.reshape(dims)?)?
    }
}

struct Mix;

impl CustomOp3 for Mix {
    fn name(&self) -> &'static str {
        "mix-channels"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(x: &[T], y: &[T], p: &[T]) -> Vec<T> {
            let c = p.len();
            let mut out = super::cpu::take(x.len()); // every element is written
            out.par_chunks_mut(ROWS * c).zip(x.par_chunks(ROWS * c).zip(y.par_chunks(ROWS * c))).for_each(|(o, (x, y))| {
                for (o, (x, y)) in o.chunks_exact_mut(c).zip(x.chunks_exact(c).zip(y.chunks_exact(c))) {
                    o.iter_mut().zip(x.iter().zip(y)).zip(p).for_each(|((o, (&x, &y)), &p)| *o = x + y * p);
                }
            });
            out
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(run::<f32>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?)),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(run::<f64>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?)),
            _ => bail!("mix-channels: fused CPU form supports f32/f64 (same dtype)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, p: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dy, dp) = grads(y, p, g, true)?;
        Ok((Some(g.clone()), Some(dy), Some(dp)))
    }
}

fn channels(x: &Tensor, p: &Tensor, mul: bool) -> Result<Tensor> {
    let c = p.elem_count();
    let dims = trailing(x, c)?;
    if super::cpu_fusable(&[x, p]) {
        x.contiguous()?.apply_op2(&p.contiguous()?, Chan { mul })
    } else {
        let pb = p.reshape(dims)?;
        if mul {
            x.broadcast_mul(&pb)
        } else {
            x.broadcast_add(&pb)
        }
    }
}

/// The trailing dimensions of x holding `c` elements (for the composed broadcast).
fn trailing(x: &Tensor, c: usize) -> Result<Vec<usize>> {
    let mut n = 1;
    let mut dims = Vec::new();
    if c == 0 {
        bail!("channels: p is empty");
    }
    for &d in x.dims().iter().rev() {
        if n == c {
            break;
        }
        n *= d;
        dims.insert(0, d);
    }
    if n != c {
        bail!("channels: {c} elements are not trailing dimensions of {:?}", x.dims());
    }
    Ok(dims)
}

struct Chan {
    mul: bool,
}

/// Rows per parallel task of the element-wise passes.
const ROWS: usize = 64;

fn fwd<T: WithDType>(x: &[T], p: &[T], mul: bool) -> Vec<T> {
    let c = p.len();
    let mut out = super::cpu::take(x.len()); // every element is written
    out.par_chunks_mut(ROWS * c).zip(x.par_chunks(ROWS * c)).for_each(|(o, x)| {
        for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            if mul {
                o.iter_mut().zip(x).zip(p).for_each(|((o, &x), &p)| *o = x * p);
            } else {
                o.iter_mut().zip(x).zip(p).for_each(|((o, &x), &p)| *o = x + p);
            }
        }
    });
    out
}

impl CustomOp2 for Chan {
    fn name(&self) -> &'static str {
        "channels"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(fwd::<f32>(slice(s1, l1)?, slice(s2, l2)?, self.mul)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(fwd::<f64>(slice(s1, l1)?, slice(s2, l2)?, self.mul)),
            _ => bail!("channels: fused CPU form supports f32/f64 (same dtype)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = grads(x, p, g, self.mul)?;
        Ok((Some(dx), Some(dp)))
    }
}

/// Gradients of `x ⊙ p` (`mul`) or `x + p` w.r.t. x and p from the output's gradient g: `g ⊙ p`
/// or g itself (no copy), and the column sums of `g ⊙ x` or g.
fn grads(x: &Tensor, p: &Tensor, g: &Tensor, mul: bool) -> Result<(Tensor, Tensor)> {
    let (n, c) = (x.elem_count(), p.elem_count());
    let packed = x.apply_op3_no_bwd(p, &g.contiguous()?, &ChanBwd { mul })?;
    if mul {
        Ok((packed.narrow(0, 0, n)?.reshape(x.shape())?, packed.narrow(0, n, c)?.reshape(p.shape())?))
    } else {
        Ok((g.clone(), packed.reshape(p.shape())?))
    }
}

/// Backward: `[dx (x's elements) | dp (p's)]` for `mul`, `[dp]` for the sum (whose dx is g).
struct ChanBwd {
    mul: bool,
}

fn bwd<T: WithDType>(x: &[T], p: &[T], g: &[T], mul: bool) -> Vec<T> {
    let (n, c) = (x.len(), p.len());
    let n_dx = if mul { n } else { 0 };
    let mut out = super::cpu::take(n_dx + c); // every element is written
    let (dx, dp) = out.split_at_mut(n_dx);
    dx.par_chunks_mut(ROWS * c).zip(g.par_chunks(ROWS * c)).for_each(|(d, g)| {
        for (d, g) in d.chunks_exact_mut(c).zip(g.chunks_exact(c)) {
            d.iter_mut().zip(g).zip(p).for_each(|((d, &g), &p)| *d = g * p);
        }
    });
    let sums = row_sums::<T>(n / c, c, |r, acc| {
        let gr = &g[r * c..(r + 1) * c];
        if mul {
            acc.iter_mut().zip(gr).zip(&x[r * c..(r + 1) * c]).for_each(|((a, &g), &x)| *a += g * x);
        } else {
            acc.iter_mut().zip(gr).for_each(|(a, &g)| *a += g);
        }
    });
    dp.copy_from_slice(&sums);
    out
}

impl CustomOp3 for ChanBwd {
    fn name(&self) -> &'static str {
        "channels-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = (if self.mul { l1.shape().elem_count() } else { 0 }, l2.shape().elem_count());
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(bwd::<f32>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, self.mul)),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(bwd::<f64>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, self.mul)),
            _ => bail!("channels-bwd: f32/f64 only"),
        };
        Ok((out, Shape::from(n + c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Var};

    /// Fused == candle's broadcast (forward and gradients), p `[C]` and `[H, N]`, f32/f64; the
    /// same for [`mix_channels`].
    #[test]
    fn fused_matches_broadcast() {
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            for (xs, ps) in [(vec![3usize, 70, 12], vec![12usize]), (vec![2, 9, 3, 5], vec![3, 5]), (vec![4, 1, 7], vec![7])] {
                let x = Var::from_tensor(&rand_tensor(&xs, 1.0, 1).to_dtype(dt).unwrap()).unwrap();
                let p = Var::from_tensor(&rand_tensor(&ps, 0.8, 2).to_dtype(dt).unwrap()).unwrap();
                let wy = rand_tensor(&xs, 1.0, 3).to_dtype(dt).unwrap();
                for mul in [true, false] {
                    let yf = channels(x.as_tensor(), p.as_tensor(), mul).unwrap();
                    let yc = if mul { x.as_tensor().broadcast_mul(p.as_tensor()) } else { x.as_tensor().broadcast_add(p.as_tensor()) }.unwrap();
                    assert_close("channels fwd", &yc, &yf, tol);
                    let gf = (yf * &wy).unwrap().sum_all().unwrap().backward().unwrap();
                    let gc = (yc * &wy).unwrap().sum_all().unwrap().backward().unwrap();
                    for v in [&x, &p] {
                        let (a, b) = (gc.get(v.as_tensor()).unwrap(), gf.get(v.as_tensor()).unwrap());
                        assert_eq!(a.dims(), b.dims());
                        assert_close("channels grad", a, b, tol);
                    }
                }
            }
        }
        for dt in [DType::F64, DType::F32] {
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            let v = |s: &[usize], sd: f64, seed: u64| Var::from_tensor(&rand_tensor(s, sd, seed).to_dtype(dt).unwrap()).unwrap();
            let (x, y, p) = (v(&[3, 70, 12], 1.0, 7), v(&[3, 70, 12], 1.0, 8), v(&[12], 0.8, 9));
            let wy = rand_tensor(&[3, 70, 12], 1.0, 10).to_dtype(dt).unwrap();
            let yf = mix_channels(x.as_tensor(), y.as_tensor(), p.as_tensor()).unwrap();
            let yc = (x.as_tensor() + y.as_tensor().broadcast_mul(p.as_tensor()).unwrap()).unwrap();
            assert_close("mix fwd", &yc, &yf, tol);
            let gf = (yf * &wy).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (yc * &wy).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &y, &p] {
                assert_close("mix grad", gc.get(v.as_tensor()).unwrap(), gf.get(v.as_tensor()).unwrap(), tol);
            }
        }
        assert!(mul_channels(&rand_tensor(&[4, 6], 1.0, 1), &rand_tensor(&[4], 1.0, 1)).is_err());
        assert!(mul_channels(&rand_tensor(&[4, 6], 1.0, 1), &rand_tensor(&[12], 1.0, 1)).is_err());
    }

    /// Finite differences in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let x = Var::from_tensor(&rand_tensor(&[2, 5, 3], 1.0, 4)).unwrap();
        let p = Var::from_tensor(&rand_tensor(&[3], 0.7, 5)).unwrap();
        let wy = rand_tensor(&[2, 5, 3], 1.0, 6);
        let vars = vec![("x".to_string(), x.clone()), ("p".to_string(), p.clone())];
        let loss = || {
            let y = mul_channels(x.as_tensor(), p.as_tensor()).unwrap();
            let y = add_channels(&y.sqr().unwrap(), p.as_tensor()).unwrap();
            let y = mix_channels(&y, x.as_tensor(), &p.as_tensor().sqr().unwrap()).unwrap();
            (y * &wy).unwrap().sum_all().unwrap()
        };
        check_grads("channels", &vars, &loss, 12);
    }
}
