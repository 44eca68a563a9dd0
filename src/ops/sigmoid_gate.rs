//! Sigmoid output gate `y = o ⊙ σ(z)` (o, z of one shape) as one autograd node: FoX Pro's output
//! gate (Lin et al. 2025, arXiv:2503.02130; `../shared/reference/mixers.md` §FoX, the
//! FusedGroupNormGated order: normalise, then gate).
//!
//! Why one node: composed it is candle-nn's sigmoid and a product, two activation-sized nodes
//! whose backward each zero-fills and adds a gradient. Backward: `do = dy ⊙ σ(z)`,
//! `dz = dy ⊙ o ⊙ σ(z)(1 − σ(z))`. [`sigmoid_gate_composed`] is the reference form.

use super::attn_fused::Elem;
use super::cpu::{slice, take};
use super::simd::{sigmoid, with_fast_isa};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `o ⊙ σ(z)`; one fused node on CPU for f32/f64, composed elsewhere.
pub fn sigmoid_gate(o: &Tensor, z: &Tensor) -> Result<Tensor> {
    if o.shape() != z.shape() {
        bail!("sigmoid_gate: o {:?} and z {:?} differ", o.dims(), z.dims());
    }
    if super::cpu_fusable(&[o, z]) {
        o.contiguous()?.apply_op2(&z.contiguous()?, SigmoidGate)
    } else {
        sigmoid_gate_composed(o, z)
    }
}

/// Reference form from candle ops.
pub fn sigmoid_gate_composed(o: &Tensor, z: &Tensor) -> Result<Tensor> {
    o * candle_nn::ops::sigmoid(z)?
}

struct SigmoidGate;

fn fwd<T: Elem>(o: &[T], z: &[T]) -> Vec<T> {
    let mut y = take(o.len()); // every element is written
    y.par_chunks_mut(CHUNK).zip(o.par_chunks(CHUNK).zip(z.par_chunks(CHUNK))).for_each(|(y, (o, z))| {
        with_fast_isa(#[inline(always)] || y.iter_mut().zip(o.iter().zip(z)).for_each(|(y, (&o, &z))| *y = o * sigmoid(z)))
    });
    y
}

/// `[do ‖ dz]`.
fn bwd<T: Elem>(o: &[T], z: &[T], dy: &[T]) -> Vec<T> {
    let n = o.len();
    let mut out = take(2 * n); // every element is written
    let (d_o, dz) = out.split_at_mut(n);
    d_o.par_chunks_mut(CHUNK).zip(dz.par_chunks_mut(CHUNK)).zip(o.par_chunks(CHUNK).zip(z.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK))).for_each(|((d_o, dz), ((o, z), dy))| {
        with_fast_isa(#[inline(always)] || {
            for ((d_o, dz), ((&o, &z), &g)) in d_o.iter_mut().zip(dz.iter_mut()).zip(o.iter().zip(z).zip(dy)) {
                let s = sigmoid(z);
                *d_o = g * s;
                *dz = g * o * s * (T::one() - s);
            }
        })
    });
    out
}

impl CustomOp2 for SigmoidGate {
    fn name(&self) -> &'static str {
        "sigmoid-gate"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(fwd::<f32>(slice(s1, l1)?, slice(s2, l2)?)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(fwd::<f64>(slice(s1, l1)?, slice(s2, l2)?)),
            _ => bail!("sigmoid-gate: fused CPU form supports f32/f64 (same dtype)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, o: &Tensor, z: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = o.apply_op3_no_bwd(z, &g.contiguous()?, &SigmoidGateBwd)?;
        let n = o.elem_count();
        Ok((Some(packed.narrow(0, 0, n)?.reshape(o.shape())?), Some(packed.narrow(0, n, n)?.reshape(z.shape())?)))
    }
}

/// The backward as a no-grad op returning `[do ‖ dz]` flat.
struct SigmoidGateBwd;

impl candle_core::CustomOp3 for SigmoidGateBwd {
    fn name(&self) -> &'static str {
        "sigmoid-gate-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(bwd::<f32>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?)),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(bwd::<f64>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?)),
            _ => bail!("sigmoid-gate-bwd: fused CPU form supports f32/f64 (same dtype)"),
        };
        Ok((out, Shape::from(2 * n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Var};

    /// Fused == composed (values and both gradients, f64 and f32, a size over one task), and
    /// finite differences of the fused op in f64.
    #[test]
    fn fused_matches_composed_and_finite_differences() {
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            for shape in [&[2usize, 3, 4, 5][..], &[3, 70, 4, 32]] {
                let o = Var::from_tensor(&rand_tensor(shape, 1.0, 1).to_dtype(dt).unwrap()).unwrap();
                let z = Var::from_tensor(&rand_tensor(shape, 3.0, 2).to_dtype(dt).unwrap()).unwrap();
                let w = rand_tensor(shape, 1.0, 3).to_dtype(dt).unwrap();
                let yf = sigmoid_gate(o.as_tensor(), z.as_tensor()).unwrap();
                let yc = sigmoid_gate_composed(o.as_tensor(), z.as_tensor()).unwrap();
                assert_close("sigmoid_gate fwd", &yc, &yf, tol);
                let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
                assert_close("sigmoid_gate do", gc.get(o.as_tensor()).unwrap(), gf.get(o.as_tensor()).unwrap(), tol);
                assert_close("sigmoid_gate dz", gc.get(z.as_tensor()).unwrap(), gf.get(z.as_tensor()).unwrap(), tol);
            }
        }
        let o = Var::from_tensor(&rand_tensor(&[2, 3, 4], 1.0, 4)).unwrap();
        let z = Var::from_tensor(&rand_tensor(&[2, 3, 4], 2.0, 5)).unwrap();
        let w = rand_tensor(&[2, 3, 4], 1.0, 6);
        let named = vec![("o".to_string(), o.clone()), ("z".to_string(), z.clone())];
        check_grads("sigmoid_gate", &named, &|| (sigmoid_gate(o.as_tensor(), z.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap(), 12);
    }
}
