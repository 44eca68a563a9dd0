//! Fused in-place CPU kernels for the optimizer step (f32/f64 parameters): the AdamW moment and
//! parameter updates as three streaming in-place passes (candle's composed form allocates about
//! twelve temporaries per parameter), with gradient clipping folded into the moment passes, and
//! the squared L2 norm of a gradient in f64 without a converted copy.
//!
//! Every expression is evaluated exactly as the composed form in [`super::AdamW::step_composed`]
//! (candle's `affine(mul, add)` is `v * T::from_f64(mul) + T::from_f64(add)` in the tensor's
//! dtype; `sqr` is `v * v`), so both forms produce bit-identical parameters and state.

use crate::ops::cpu::slice;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Storage, Tensor, WithDType};
use crate::ops::simd::{lanes_sum, with_fast_isa};
use rayon::prelude::*;

/// Elements per parallel task (fixed: results never depend on the thread count).
const CHUNK: usize = 16 * 1024;

/// Whether the fused kernels apply to a parameter and its gradient.
pub fn fusable(theta: &Tensor, g: &Tensor) -> bool {
    theta.device().is_cpu() && matches!(theta.dtype(), DType::F32 | DType::F64) && g.dtype() == theta.dtype() && g.dims() == theta.dims() && theta.is_contiguous()
}

/// The float types the kernels run in: `sqrt` and mutable access to CPU storage.
pub trait Float: WithDType {
    fn sqrt(self) -> Self;
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}
impl Float for f32 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}
impl Float for f64 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

fn dst_slice<'a, T: Float>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [T]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("in-place optimizer op needs a contiguous destination".into()))?;
    let v = T::vec_mut(s).ok_or_else(|| candle_core::Error::Msg("in-place optimizer op: dtype mismatch".into()))?;
    Ok(&mut v[a..b])
}

/// The clipped gradient `g·coef + 0` (candle's `g * coef`), or `g` when not clipping.
#[inline(always)]
fn scaled<T: WithDType>(g: T, coef: Option<T>) -> T {
    match coef {
        Some(c) => g * c + T::zero(),
        None => g,
    }
}

/// `m ← m·β1 + (g·(1−β1) + 0)` in place (affine forms of the composed update), g clipped first.
pub struct Moment {
    /// Decay (β1 or β2).
    pub beta: f64,
    /// Second moment (uses g²) instead of first.
    pub squared: bool,
    /// Clipping coefficient applied to g first.
    pub coef: Option<f64>,
}

impl Moment {
    fn run<T: Float>(&self, m: &mut [T], g: &[T]) {
        let (beta, one_minus) = (T::from_f64(self.beta), T::from_f64(1.0 - self.beta));
        let coef = self.coef.map(T::from_f64);
        let zero = T::zero();
        let sq = self.squared;
        // Widest vector ISA (results are exact IEEE operations, identical on every width).
        m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(mc, gc)| {
            with_fast_isa(#[inline(always)] || {
                for (m, &g) in mc.iter_mut().zip(gc) {
                    let g = scaled(g, coef);
                    let x = if sq { g * g } else { g };
                    *m = (*m * beta + zero) + (x * one_minus + zero);
                }
            })
        });
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw_moment"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<()> {
        match gs {
            CpuStorage::F32(_) => self.run(dst_slice::<f32>(dst, dst_l)?, slice::<f32>(gs, gl)?),
            CpuStorage::F64(_) => self.run(dst_slice::<f64>(dst, dst_l)?, slice::<f64>(gs, gl)?),
            _ => candle_core::bail!("adamw_moment: f32/f64 only"),
        }
        Ok(())
    }
}

/// `θ ← θ·(1 − lr·wd) + 0` (decayed parameters), then
/// `θ ← θ − ((m / (sqrt(v)·(1/sqrt(bc2)) + ε))·step_size + 0)`.
pub struct Theta {
    pub decay: Option<f64>,
    pub inv_sqrt_bc2: f64,
    pub eps: f64,
    pub step_size: f64,
}

impl Theta {
    fn run<T: Float>(&self, th: &mut [T], m: &[T], v: &[T]) {
        let decay = self.decay.map(T::from_f64);
        let (ib, eps, ss, zero) = (T::from_f64(self.inv_sqrt_bc2), T::from_f64(self.eps), T::from_f64(self.step_size), T::zero());
        th.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(tc, (mc, vc))| {
            with_fast_isa(#[inline(always)] || {
                for ((t, &m), &v) in tc.iter_mut().zip(mc).zip(vc) {
                    let mut x = *t;
                    if let Some(d) = decay {
                        x = x * d + zero;
                    }
                    let denom = v.sqrt() * ib + eps;
                    *t = x - ((m / denom) * ss + zero);
                }
            })
        });
    }
}

impl InplaceOp3 for Theta {
    fn name(&self) -> &'static str {
        "adamw_theta"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, ms: &CpuStorage, ml: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<()> {
        match ms {
            CpuStorage::F32(_) => self.run(dst_slice::<f32>(dst, dst_l)?, slice::<f32>(ms, ml)?, slice::<f32>(vs, vl)?),
            CpuStorage::F64(_) => self.run(dst_slice::<f64>(dst, dst_l)?, slice::<f64>(ms, ml)?, slice::<f64>(vs, vl)?),
            _ => candle_core::bail!("adamw_theta: f32/f64 only"),
        }
        Ok(())
    }
}

/// Σ g² in f64 for a CPU f32/f64 tensor (fixed-size chunks summed in order: deterministic),
/// or None when the tensor is not a contiguous CPU f32/f64 tensor.
pub fn sum_squares(g: &Tensor) -> Result<Option<f64>> {
    if !g.device().is_cpu() || !matches!(g.dtype(), DType::F32 | DType::F64) || !g.is_contiguous() {
        return Ok(None);
    }
    let (s, l) = g.storage_and_layout();
    let Storage::Cpu(s) = &*s else { return Ok(None) };
    fn run<T: WithDType>(x: &[T]) -> f64 {
        // Lane-wise per chunk (`simd::lanes_sum`; a single running sum was a chain of dependent
        // adds: the grad-norm phase of a MoE step took 3.6 ms).
        let lanes = |c: &[T]| lanes_sum(c, |v| v.to_f64() * v.to_f64());
        let parts: Vec<f64> = x.par_chunks(CHUNK).map(|c| with_fast_isa(#[inline(always)] || lanes(c))).collect();
        parts.iter().sum()
    }
    Ok(Some(match s {
        CpuStorage::F32(_) => run(slice::<f32>(s, l)?),
        CpuStorage::F64(_) => run(slice::<f64>(s, l)?),
        _ => return Ok(None),
    }))
}
