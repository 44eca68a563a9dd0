//! Rotary position embedding (Su et al. 2021, arXiv:2104.09864) in the half-split layout
//! (NeoX / HF `rotate_half`: dimension i pairs with i + D/2).
//!
//! candle 0.11's fused `rotary_emb::rope` has no backward. Two forms here: [`Rope::apply_composed`]
//! from primitive ops (the reference, any device) and a CPU CustomOp (f32/f64) whose backward
//! is the inverse rotation (RoPE is orthogonal: dx = Rᵀ dy).

use super::simd::with_fast_isa;
use super::cpu::slice;
use super::zmm_row::{f32s, f32s_mut};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;
use std::sync::Arc;

/// cos/sin tables `[T, D/2]` for positions 0..T with θ_i = base^(−2i/D).
#[derive(Clone, Debug)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    /// The same tables in f64, row-major `[T, D/2]`, for the fused CPU op.
    table: Arc<(Vec<f64>, Vec<f64>)>,
    /// First table row used (position offset; the decode form rotates at one position).
    offset: usize,
}

impl Rope {
    pub fn new(seq_len: usize, head_dim: usize, base: f64, dtype: DType, dev: &Device) -> Result<Self> {
        if head_dim % 2 != 0 {
            candle_core::bail!("RoPE needs an even head dim; got {head_dim}");
        }
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for p in 0..seq_len {
            for i in 0..half {
                let phi = p as f64 * base.powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(phi.cos());
                sin.push(phi.sin());
            }
        }
        let c = Tensor::from_vec(cos.clone(), (seq_len, half), dev)?.to_dtype(dtype)?;
        let s = Tensor::from_vec(sin.clone(), (seq_len, half), dev)?.to_dtype(dtype)?;
        Ok(Self { cos: c, sin: s, table: Arc::new((cos, sin)), offset: 0 })
    }

    /// The same rotation starting at position `pos` (x's time index 0 is rotated as `pos`).
    pub fn at(&self, pos: usize) -> Result<Self> {
        let n = self.cos.dim(0)?;
        if pos > n {
            candle_core::bail!("RoPE position {pos} beyond table length {n}");
        }
        Ok(Self {
            cos: self.cos.narrow(0, pos, n - pos)?,
            sin: self.sin.narrow(0, pos, n - pos)?,
            table: self.table.clone(),
            offset: self.offset + pos,
        })
    }

    /// Rotates x `[B, T, H, D]` (T ≤ table length). Fused on CPU for f32/f64.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(1)?;
        if t > self.cos.dim(0)? {
            candle_core::bail!("RoPE: sequence length {t} beyond table length {}", self.cos.dim(0)?);
        }
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            x.contiguous()?.apply_op1(RopeOp { table: self.table.clone(), offset: self.offset, inverse: false })
        } else {
            self.apply_composed(x)
        }
    }

    /// The CPU rotation of a contiguous `[B, t, h, d]` buffer (by −φ when `inverse`), for fused
    /// ops that rotate inside their own kernels. Errors when `t` exceeds the table.
    pub(crate) fn rotate_cpu<T: WithDType>(&self, x: &[T], t: usize, h: usize, d: usize, inverse: bool) -> Result<Vec<T>> {
        let (rows, half) = self.cos.dims2()?;
        if t > rows || d != 2 * half || x.len() % (t * h * d).max(1) != 0 {
            candle_core::bail!("RoPE: {} values as [B, {t}, {h}, {d}] do not fit the table [{rows}, {half}]", x.len());
        }
        Ok(RopeOp { table: self.table.clone(), offset: self.offset, inverse }.run(x, t, h, d))
    }

    /// Reference form: `[a, b] → [a cos − b sin, a sin + b cos]` from primitive ops.
    pub fn apply_composed(&self, x: &Tensor) -> Result<Tensor> {
        let (_b, t, _h, d) = x.dims4()?;
        let half = d / 2;
        let cos = self.cos.narrow(0, 0, t)?.unsqueeze(1)?; // [T, 1, D/2]
        let sin = self.sin.narrow(0, 0, t)?.unsqueeze(1)?;
        let a = x.narrow(D::Minus1, 0, half)?;
        let b = x.narrow(D::Minus1, half, half)?;
        let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
        Tensor::cat(&[ra, rb], D::Minus1)
    }
}

/// Rotation by +φ (or −φ when `inverse`) of a contiguous `[B, T, H, D]` tensor.
struct RopeOp {
    table: Arc<(Vec<f64>, Vec<f64>)>,
    offset: usize,
    inverse: bool,
}

impl RopeOp {
    fn run<T: WithDType>(&self, x: &[T], t: usize, h: usize, d: usize) -> Vec<T> {
        let half = d / 2;
        let (cos, sin) = (&self.table.0, &self.table.1);
        let sign = if self.inverse { -1.0 } else { 1.0 };
        // Every element is written (d is even: checked where the table is built).
        let mut y = super::cpu::take(x.len());
        // Zipped half-rows (no bounds checks), compiled for the widest ISA: the rotation vectorises.
        // Tasks of TOKENS tokens: one token (h·d values) per task was mostly scheduling.
        const TOKENS: usize = 16;
        let (avx512, avx2) = (super::zmm_row::f32_avx512::<T>(), super::zmm_row::f32_avx2::<T>());
        y.par_chunks_mut(TOKENS * h * d).zip(x.par_chunks(TOKENS * h * d)).enumerate().for_each(|(chunk, (yc, xc))| {
            let tokens = yc.chunks_mut(h * d).zip(xc.chunks(h * d)).enumerate();
            let table = |i: usize| {
                let p = (chunk * TOKENS + i) % t + self.offset;
                (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half])
            };
            if avx512 || avx2 {
                #[cfg(target_arch = "x86_64")]
                for (i, (yr, xr)) in tokens {
                    let (c, s) = table(i);
                    for (yo, xo) in yr.chunks_exact_mut(d).zip(xr.chunks_exact(d)) {
                        // SAFETY: f32_avx512 / f32_avx2 checked the ISA (and T = f32, which f32s asserts).
                        unsafe {
                            if avx512 {
                                super::rope_x86::x86::rotate_row(f32s(xo), c, s, sign, f32s_mut(yo))
                            } else {
                                super::rope_x86::x86_avx2::rotate_row(f32s(xo), c, s, sign, f32s_mut(yo))
                            }
                        }
                    }
                }
            } else {
                with_fast_isa(#[inline(always)] || {
                    for (i, (yr, xr)) in tokens {
                        let (c, s) = table(i);
                        for (yo, xo) in yr.chunks_exact_mut(d).zip(xr.chunks_exact(d)) {
                            rotate_row(xo, c, s, sign, yo);
                        }
                    }
                })
            }
        });
        y
    }
}

/// One head row `[a ‖ b]` → `[a·c − b·s ‖ a·s + b·c]`, `s = sign·sin`, in f64 (generic form).
#[inline(always)]
fn rotate_row<T: WithDType>(xo: &[T], c: &[f64], s: &[f64], sign: f64, yo: &mut [T]) {
    let half = c.len();
    let (ya, yb) = yo.split_at_mut(half);
    let (xa, xb) = xo.split_at(half);
    for ((((ya, yb), (&a, &b)), &ci), &si) in ya.iter_mut().zip(yb.iter_mut()).zip(xa.iter().zip(xb)).zip(c).zip(s) {
        let (a, b, si) = (a.to_f64(), b.to_f64(), sign * si);
        *ya = T::from_f64(a * ci - b * si);
        *yb = T::from_f64(a * si + b * ci);
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope_half_split"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() != 4 {
            candle_core::bail!("rope: expected [B, T, H, D], got {dims:?}");
        }
        let (t, h, d) = (dims[1], dims[2], dims[3]);
        if d % 2 != 0 {
            candle_core::bail!("rope: head dim {d} must be even");
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.run(slice::<f32>(s, l)?, t, h, d)),
            CpuStorage::F64(_) => CpuStorage::F64(self.run(slice::<f64>(s, l)?, t, h, d)),
            _ => candle_core::bail!("rope: fused CPU form supports f32/f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let inv = RopeOp { table: self.table.clone(), offset: self.offset, inverse: !self.inverse };
        Ok(Some(dy.contiguous()?.apply_op1(inv)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 and AVX2 f32 rows give the same bits as the generic row, both directions, for
    /// half widths with and without a vector tail. Each form is skipped (prints why) on CPUs
    /// without its ISA.
    #[test]
    fn simd_rows_match_generic_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            type Row = unsafe fn(&[f32], &[f64], &[f64], f64, &mut [f32]);
            let forms: [(&str, bool, Row); 2] = [
                ("AVX-512", is_x86_feature_detected!("avx512f"), super::super::rope_x86::x86::rotate_row),
                ("AVX2", is_x86_feature_detected!("avx2"), super::super::rope_x86::x86_avx2::rotate_row),
            ];
            for (name, present, simd_row) in forms {
                if !present {
                    eprintln!("simd_rows_match_generic_bits: no {name} here, skipped");
                    continue;
                }
                for half in [16usize, 5, 8, 37, 3] {
                    let x: Vec<f32> = crate::testing::rand_tensor(&[2 * half], 1.0, half as u64).to_dtype(DType::F32).unwrap().to_vec1().unwrap();
                    let c: Vec<f64> = (0..half).map(|i| (0.3 * i as f64 + 0.1).cos()).collect();
                    let s: Vec<f64> = (0..half).map(|i| (0.3 * i as f64 + 0.1).sin()).collect();
                    for sign in [1.0, -1.0] {
                        let (mut y0, mut y1) = (vec![0f32; 2 * half], vec![0f32; 2 * half]);
                        rotate_row(&x, &c, &s, sign, &mut y0);
                        // SAFETY: the ISA was checked above.
                        unsafe { simd_row(&x, &c, &s, sign, &mut y1) };
                        assert_eq!(y0, y1, "{name} half={half} sign={sign}");
                        assert!(y0.iter().zip(&x).any(|(a, b)| a != b), "the rotation moved something");
                    }
                }
            }
        }
    }
}
