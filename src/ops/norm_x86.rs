//! RMSNorm rows ([`super::norm`]) for f32 in AVX-512: the same arithmetic as the generic rows, in
//! the same order (f64 statistics over 8 lanes, element i into lane i mod 8, the tail last; mul
//! then add, no fused multiply-add), so both give the same bits; the tests check that.
//!
//! Why: the generic rows compiled to 128-bit and scalar f64 code (the f32→f64 conversions and the
//! per-column `dg` accumulators kept LLVM from widening them): the forward and backward were 5%
//! of an attention or MTP step (`perf`, `mtp_deepseek` and `attention` presets).

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use crate::ops::simd::lanes_total;
    use std::arch::x86_64::*;

    /// `Σ x_i²` in f64: [`crate::ops::simd::lanes_sum`]'s lanes and order.
    #[inline(always)]
    unsafe fn sum_sq(x: &[f32]) -> f64 {
        let whole = x.len() - x.len() % 8;
        let mut acc = _mm512_setzero_pd();
        for i in (0..whole).step_by(8) {
            let v = _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i)));
            acc = _mm512_add_pd(acc, _mm512_mul_pd(v, v));
        }
        let tail = x[whole..].iter().fold(0f64, |s, &v| s + v as f64 * v as f64);
        let mut lanes = [0f64; 8];
        _mm512_storeu_pd(lanes.as_mut_ptr(), acc);
        lanes_total(&lanes) + tail
    }

    /// `1/sqrt(mean(x²) + eps)`, as the generic `inv_rms`.
    #[inline(always)]
    unsafe fn inv_rms(x: &[f32], eps: f64) -> f64 {
        1.0 / (sum_sq(x) / x.len() as f64 + eps).sqrt()
    }

    /// One row of the forward: `y = f32(x·r·g)` (g in f64, `gf.len() == x.len() == y.len()`).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fwd_row(x: &[f32], gf: &[f64], eps: f64, y: &mut [f32]) {
        let d = x.len();
        assert!(gf.len() == d && y.len() == d);
        let r = inv_rms(x, eps);
        let rv = _mm512_set1_pd(r);
        let whole = d - d % 8;
        for i in (0..whole).step_by(8) {
            let xv = _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i)));
            let o = _mm512_mul_pd(_mm512_mul_pd(xv, rv), _mm512_loadu_pd(gf.as_ptr().add(i)));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm512_cvtpd_ps(o));
        }
        for i in whole..d {
            y[i] = (x[i] as f64 * r * gf[i]) as f32;
        }
    }

    /// One row of the backward: `dg += dy·x̂` (f64), `dx = f32(r·(dy·g − x̂·mean)) (+ res)`,
    /// `mean = r·Σ(dy·g·x)/d`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn bwd_row(x: &[f32], dy: &[f32], gf: &[f64], eps: f64, res: Option<&[f32]>, dx: &mut [f32], dg: &mut [f64]) {
        let d = x.len();
        assert!(dy.len() == d && gf.len() == d && dx.len() == d && dg.len() == d && res.is_none_or(|r| r.len() == d));
        let r = inv_rms(x, eps);
        let rv = _mm512_set1_pd(r);
        let whole = d - d % 8;
        let (xp, dyp, gp, dgp) = (x.as_ptr(), dy.as_ptr(), gf.as_ptr(), dg.as_mut_ptr());
        let mut acc = _mm512_setzero_pd();
        for i in (0..whole).step_by(8) {
            let xv = _mm512_cvtps_pd(_mm256_loadu_ps(xp.add(i)));
            let dyv = _mm512_cvtps_pd(_mm256_loadu_ps(dyp.add(i)));
            let gv = _mm512_loadu_pd(gp.add(i));
            let dgv = _mm512_add_pd(_mm512_loadu_pd(dgp.add(i)), _mm512_mul_pd(dyv, _mm512_mul_pd(xv, rv)));
            _mm512_storeu_pd(dgp.add(i), dgv);
            acc = _mm512_add_pd(acc, _mm512_mul_pd(_mm512_mul_pd(dyv, gv), xv));
        }
        let mut tail = 0f64;
        for i in whole..d {
            let (xv, dyv) = (x[i] as f64, dy[i] as f64);
            dg[i] += dyv * (xv * r);
            tail += dyv * gf[i] * xv;
        }
        let mut lanes = [0f64; 8];
        _mm512_storeu_pd(lanes.as_mut_ptr(), acc);
        let mean = (lanes_total(&lanes) + tail) * r / d as f64;
        let mv = _mm512_set1_pd(mean);
        let dxp = dx.as_mut_ptr();
        for i in (0..whole).step_by(8) {
            let xv = _mm512_cvtps_pd(_mm256_loadu_ps(xp.add(i)));
            let dyv = _mm512_cvtps_pd(_mm256_loadu_ps(dyp.add(i)));
            let gv = _mm512_loadu_pd(gp.add(i));
            let v = _mm512_mul_pd(rv, _mm512_sub_pd(_mm512_mul_pd(dyv, gv), _mm512_mul_pd(_mm512_mul_pd(xv, rv), mv)));
            let mut o = _mm512_cvtpd_ps(v);
            if let Some(res) = res {
                o = _mm256_add_ps(o, _mm256_loadu_ps(res.as_ptr().add(i)));
            }
            _mm256_storeu_ps(dxp.add(i), o);
        }
        for i in whole..d {
            let o = (r * (dy[i] as f64 * gf[i] - x[i] as f64 * r * mean)) as f32;
            dx[i] = match res {
                Some(res) => o + res[i],
                None => o,
            };
        }
    }
}
