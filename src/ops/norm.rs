//! RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467): `y = x / sqrt(mean(x², -1) + eps) · g`.
//!
//! candle 0.11's fused `candle_nn::ops::rms_norm` has no backward (gradients silently vanish).
//! Two forms here: [`rms_norm_composed`] from primitive ops (exact autograd on every device; the
//! reference), and a fused CPU CustomOp with a hand-written backward, used for f32/f64 on CPU:
//! `x̂ = x·r`, `r = 1/sqrt(mean(x²)+eps)`; `dg = Σ_rows dy·x̂`;
//! `dx = r·(dy·g − x̂·mean(dy·g·x̂))`. Row statistics are accumulated in f64.

use super::cpu::{slice, ROW_CHUNK};
use super::zmm_row::{f32_avx2, f32_avx512, f32s, f32s_mut};
use super::simd::{lanes_sum, lanes_total, with_fast_isa, LANES};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

/// RMSNorm over the last dim: x `[..., d]`, gain `[d]`. Fused on CPU (f32/f64), composed elsewhere.
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let fusable = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && gain.dtype() == x.dtype();
    if fusable {
        x.contiguous()?.apply_op2(&gain.contiguous()?, RmsNorm { eps })
    } else {
        rms_norm_composed(x, gain, eps)
    }
}

/// Reference form from primitive ops (statistics in f32, or f64 for f64 inputs).
pub fn rms_norm_composed(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(super::reduction_dtype(dt))?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&inv)?.to_dtype(dt)?.broadcast_mul(gain)
}

struct RmsNorm {
    eps: f64,
}

#[inline(always)]
fn inv_rms<T: WithDType>(row: &[T], eps: f64) -> f64 {
    1.0 / (lanes_sum(row, |v| v.to_f64() * v.to_f64()) / row.len() as f64 + eps).sqrt()
}

fn fwd<T: WithDType>(x: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut y = super::cpu::take(x.len()); // every row is written
    fwd_rows(x, g, d, eps, &mut y);
    y
}

/// Returns `[dx (len x) ++ dg (d)]`.
fn bwd<T: WithDType>(x: &[T], g: &[T], dy: &[T], d: usize, eps: f64) -> Vec<T> {
    let n = x.len();
    let mut out = super::cpu::take(n + d); // dx and dg are assigned whole
    let (dx, dg) = out.split_at_mut(n);
    bwd_into(x, g, dy, d, eps, None, dx, dg);
    out
}

/// RMSNorm backward into `dx` (len x) and `dg` (d), with `residual` (len x) added to `dx` when
/// given (the gradient reaching x around a pre-norm sublayer). Row statistics in f64.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd_into<T: WithDType>(x: &[T], g: &[T], dy: &[T], d: usize, eps: f64, residual: Option<&[T]>, dx: &mut [T], dg_out: &mut [T]) {
    let isa = RowIsa::of::<T>();
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(ROW_CHUNK * d)
        .enumerate()
        .zip(x.par_chunks(ROW_CHUNK * d).zip(dy.par_chunks(ROW_CHUNK * d)))
        .map(|((c, dxc), (xc, dyc))| {
            let res = residual.map(|r| &r[c * ROW_CHUNK * d..c * ROW_CHUNK * d + xc.len()]);
            let mut dg = vec![0f64; d];
            let gf: Vec<f64> = g.iter().map(|v| v.to_f64()).collect();
            let rows = dxc.chunks_mut(d).zip(xc.chunks(d)).zip(dyc.chunks(d)).enumerate();
            if isa != RowIsa::Generic {
                #[cfg(target_arch = "x86_64")]
                for (row, ((dxr, xr), dyr)) in rows {
                    let res = res.map(|r| f32s(&r[row * d..(row + 1) * d]));
                    let (x, dy, dx) = (f32s(xr), f32s(dyr), f32s_mut(dxr));
                    // SAFETY: RowIsa::of checked the ISA (and T = f32, which f32s asserts).
                    unsafe {
                        match isa {
                            RowIsa::Avx512 => super::norm_x86::x86::bwd_row(x, dy, &gf, eps, res, dx, &mut dg),
                            _ => super::norm_x86::x86_avx2::bwd_row(x, dy, &gf, eps, res, dx, &mut dg),
                        }
                    }
                }
            } else {
                with_fast_isa(#[inline(always)] || {
                    for (row, ((dxr, xr), dyr)) in rows {
                        bwd_row(xr, dyr, &gf, eps, res.map(|r| &r[row * d..(row + 1) * d]), dxr, &mut dg);
                    }
                });
            }
            dg
        })
        .collect();
    for (i, slot) in dg_out.iter_mut().enumerate() {
        *slot = T::from_f64(partials.iter().map(|p| p[i]).sum());
    }
}

/// One row of the backward, generic form: `dg += dy·x̂`, `dx = r·(dy·g − x̂·mean) (+ res)`.
#[inline(always)]
fn bwd_row<T: WithDType>(xr: &[T], dyr: &[T], gf: &[f64], eps: f64, res: Option<&[T]>, dxr: &mut [T], dg: &mut [f64]) {
    let d = xr.len();
    let r = inv_rms(xr, eps);
    // dg += dy·x̂ and Σ dy·g·x, lane-wise (see LANES); zipped slices, so no bounds checks
    // stop the vectoriser.
    let mut acc = [0f64; LANES];
    let lanes = dg.chunks_exact_mut(LANES).zip(gf.chunks_exact(LANES)).zip(xr.chunks_exact(LANES).zip(dyr.chunks_exact(LANES)));
    for ((dgc, gc), (xc8, dyc8)) in lanes {
        for l in 0..LANES {
            let (xv, dyv) = (xc8[l].to_f64(), dyc8[l].to_f64());
            dgc[l] += dyv * (xv * r);
            acc[l] += dyv * gc[l] * xv;
        }
    }
    let whole = d - d % LANES;
    let mut tail = 0f64;
    for i in whole..d {
        let (xv, dyv) = (xr[i].to_f64(), dyr[i].to_f64());
        dg[i] += dyv * (xv * r);
        tail += dyv * gf[i] * xv;
    }
    let mean = (lanes_total(&acc) + tail) * r / d as f64;
    let dx_of = |xv: T, dyv: T, gv: f64| T::from_f64(r * (dyv.to_f64() * gv - xv.to_f64() * r * mean));
    let elems = dxr.iter_mut().zip(xr.iter().zip(dyr)).zip(gf);
    match res {
        Some(res) => {
            for (((o, (&xv, &dyv)), &gv), &rv) in elems.zip(res) {
                *o = dx_of(xv, dyv, gv) + rv;
            }
        }
        None => {
            for ((o, (&xv, &dyv)), &gv) in elems {
                *o = dx_of(xv, dyv, gv);
            }
        }
    }
}

/// The forward into `y` (len x): `y = x·g/sqrt(mean(x²) + eps)` per row of `d` elements, in f64.
pub(super) fn fwd_rows<T: WithDType>(x: &[T], g: &[T], d: usize, eps: f64, y: &mut [T]) {
    let isa = RowIsa::of::<T>();
    y.par_chunks_mut(ROW_CHUNK * d).zip(x.par_chunks(ROW_CHUNK * d)).for_each(|(yc, xc)| {
        let gf: Vec<f64> = g.iter().map(|v| v.to_f64()).collect();
        if isa != RowIsa::Generic {
            #[cfg(target_arch = "x86_64")]
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                // SAFETY: RowIsa::of checked the ISA (and T = f32, which f32s asserts).
                unsafe {
                    match isa {
                        RowIsa::Avx512 => super::norm_x86::x86::fwd_row(f32s(xr), &gf, eps, f32s_mut(yr)),
                        _ => super::norm_x86::x86_avx2::fwd_row(f32s(xr), &gf, eps, f32s_mut(yr)),
                    }
                }
            }
        } else {
            with_fast_isa(#[inline(always)] || {
                for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                    fwd_row(xr, &gf, eps, yr);
                }
            });
        }
    });
}

/// Which rows run: the f32 rows of [`super::norm_x86`] in AVX-512 or AVX2 (same bits as the
/// generic rows), or the generic rows.
#[derive(Clone, Copy, PartialEq)]
enum RowIsa {
    Avx512,
    Avx2,
    Generic,
}

impl RowIsa {
    fn of<T: WithDType>() -> Self {
        if f32_avx512::<T>() {
            Self::Avx512
        } else if f32_avx2::<T>() {
            Self::Avx2
        } else {
            Self::Generic
        }
    }
}

/// One row of the forward, generic form.
#[inline(always)]
fn fwd_row<T: WithDType>(xr: &[T], gf: &[f64], eps: f64, yr: &mut [T]) {
    let r = inv_rms(xr, eps);
    for ((o, &xv), &gv) in yr.iter_mut().zip(xr).zip(gf) {
        *o = T::from_f64(xv.to_f64() * r * gv);
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims()[l1.dims().len() - 1];
        if l2.dims() != [d] {
            candle_core::bail!("rms_norm: gain shape {:?} does not match last dim {d}", l2.dims());
        }
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(fwd(slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?, d, self.eps)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd(slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?, d, self.eps)),
            _ => candle_core::bail!("rms_norm: fused CPU form supports f32/f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, g: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let d = g.elem_count();
        let packed = x.apply_op3_no_bwd(g, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dg = packed.narrow(0, n, d)?;
        Ok((Some(dx), Some(dg)))
    }
}

struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms_norm_bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l2.dims()[0];
        let n = l1.shape().elem_count();
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(bwd(slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?, slice::<f32>(s3, l3)?, d, self.eps)),
            CpuStorage::F64(_) => CpuStorage::F64(bwd(slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?, slice::<f64>(s3, l3)?, d, self.eps)),
            _ => candle_core::bail!("rms_norm_bwd: f32/f64 only"),
        };
        Ok((out, Shape::from(n + d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 and AVX2 f32 rows give the same bits as the generic rows (forward; backward dx
    /// with and without the residual, and the f64 dg accumulators), for widths with and without a
    /// tail of fewer than 8 columns. Each form is skipped (prints why) on CPUs without its ISA.
    #[test]
    fn simd_rows_match_generic_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            type Fwd = unsafe fn(&[f32], &[f64], f64, &mut [f32]);
            type Bwd = unsafe fn(&[f32], &[f32], &[f64], f64, Option<&[f32]>, &mut [f32], &mut [f64]);
            let forms: [(&str, bool, Fwd, Bwd); 2] = [
                ("AVX-512", is_x86_feature_detected!("avx512f"), super::super::norm_x86::x86::fwd_row, super::super::norm_x86::x86::bwd_row),
                ("AVX2", is_x86_feature_detected!("avx2"), super::super::norm_x86::x86_avx2::fwd_row, super::super::norm_x86::x86_avx2::bwd_row),
            ];
            let vals = |n: usize, seed: u64| -> Vec<f32> {
                crate::testing::rand_tensor(&[n], 1.0, seed).to_dtype(DType::F32).unwrap().to_vec1().unwrap()
            };
            for (name, present, simd_fwd, simd_bwd) in forms {
                if !present {
                    eprintln!("simd_rows_match_generic_bits: no {name} here, skipped");
                    continue;
                }
                for d in [128usize, 37, 8, 5, 200] {
                    let (x, dy, res) = (vals(d, d as u64), vals(d, 100 + d as u64), vals(d, 200 + d as u64));
                    let gf: Vec<f64> = vals(d, 300 + d as u64).iter().map(|&v| v as f64).collect();
                    let (mut y0, mut y1) = (vec![0f32; d], vec![0f32; d]);
                    fwd_row(&x, &gf, 1e-6, &mut y0);
                    // SAFETY: the ISA was checked above.
                    unsafe { simd_fwd(&x, &gf, 1e-6, &mut y1) };
                    assert_eq!(y0, y1, "{name} forward d={d}");
                    for r in [None, Some(&res[..])] {
                        let dg_start: Vec<f64> = (0..d).map(|i| 0.1 * i as f64).collect();
                        let (mut dx0, mut dx1) = (vec![0f32; d], vec![0f32; d]);
                        let (mut dg0, mut dg1) = (dg_start.clone(), dg_start);
                        bwd_row(&x, &dy, &gf, 1e-6, r, &mut dx0, &mut dg0);
                        // SAFETY: the ISA was checked above.
                        unsafe { simd_bwd(&x, &dy, &gf, 1e-6, r, &mut dx1, &mut dg1) };
                        assert_eq!(dx0, dx1, "{name} dx d={d} residual={}", r.is_some());
                        assert_eq!(dg0, dg1, "{name} dg d={d}");
                        assert!(dx0.iter().any(|&v| v != 0.0));
                    }
                }
            }
        }
    }
}
