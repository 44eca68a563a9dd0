//! RMSNorm rows ([`super::norm`]) for f32 in AVX-512 (and AVX2, [`x86_avx2`]): the same arithmetic as the generic rows, in
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

/// The same rows in AVX2 for CPUs without AVX-512: the 8 f64 lanes are two `ymm` halves (lanes
/// 0–3 and 4–7), each lane doing exactly what the AVX-512 and generic forms do, so all three give
/// the same bits.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86_avx2 {
    use crate::ops::simd::lanes_total;
    use std::arch::x86_64::*;

    /// 8 f64 lanes.
    #[derive(Clone, Copy)]
    struct D8(__m256d, __m256d);

    impl D8 {
        #[inline(always)]
        unsafe fn splat(v: f64) -> Self {
            Self(_mm256_set1_pd(v), _mm256_set1_pd(v))
        }
        /// 8 f32 widened.
        #[inline(always)]
        unsafe fn from_f32(p: *const f32) -> Self {
            Self(_mm256_cvtps_pd(_mm_loadu_ps(p)), _mm256_cvtps_pd(_mm_loadu_ps(p.add(4))))
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            Self(_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4)))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f64) {
            _mm256_storeu_pd(p, self.0);
            _mm256_storeu_pd(p.add(4), self.1);
        }
        /// Narrowed to 8 f32.
        #[inline(always)]
        unsafe fn to_f32(self) -> __m256 {
            _mm256_set_m128(_mm256_cvtpd_ps(self.1), _mm256_cvtpd_ps(self.0))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Self(_mm256_mul_pd(self.0, o.0), _mm256_mul_pd(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Self(_mm256_add_pd(self.0, o.0), _mm256_add_pd(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            Self(_mm256_sub_pd(self.0, o.0), _mm256_sub_pd(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn total(self) -> f64 {
            let mut lanes = [0f64; 8];
            self.store(lanes.as_mut_ptr());
            lanes_total(&lanes)
        }
    }

    #[inline(always)]
    unsafe fn inv_rms(x: &[f32], eps: f64) -> f64 {
        let whole = x.len() - x.len() % 8;
        let mut acc = D8::splat(0.0);
        for i in (0..whole).step_by(8) {
            let v = D8::from_f32(x.as_ptr().add(i));
            acc = acc.add(v.mul(v));
        }
        let tail = x[whole..].iter().fold(0f64, |s, &v| s + v as f64 * v as f64);
        1.0 / ((acc.total() + tail) / x.len() as f64 + eps).sqrt()
    }

    /// [`super::x86::fwd_row`] in AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn fwd_row(x: &[f32], gf: &[f64], eps: f64, y: &mut [f32]) {
        let d = x.len();
        assert!(gf.len() == d && y.len() == d);
        let r = inv_rms(x, eps);
        let rv = D8::splat(r);
        let whole = d - d % 8;
        for i in (0..whole).step_by(8) {
            let o = D8::from_f32(x.as_ptr().add(i)).mul(rv).mul(D8::load(gf.as_ptr().add(i)));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), o.to_f32());
        }
        for i in whole..d {
            y[i] = (x[i] as f64 * r * gf[i]) as f32;
        }
    }

    /// [`super::x86::bwd_row`] in AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub unsafe fn bwd_row(x: &[f32], dy: &[f32], gf: &[f64], eps: f64, res: Option<&[f32]>, dx: &mut [f32], dg: &mut [f64]) {
        let d = x.len();
        assert!(dy.len() == d && gf.len() == d && dx.len() == d && dg.len() == d && res.is_none_or(|r| r.len() == d));
        let r = inv_rms(x, eps);
        let rv = D8::splat(r);
        let whole = d - d % 8;
        let (xp, dyp, gp, dgp) = (x.as_ptr(), dy.as_ptr(), gf.as_ptr(), dg.as_mut_ptr());
        let mut acc = D8::splat(0.0);
        for i in (0..whole).step_by(8) {
            let xv = D8::from_f32(xp.add(i));
            let dyv = D8::from_f32(dyp.add(i));
            let gv = D8::load(gp.add(i));
            D8::load(dgp.add(i)).add(dyv.mul(xv.mul(rv))).store(dgp.add(i));
            acc = acc.add(dyv.mul(gv).mul(xv));
        }
        let mut tail = 0f64;
        for i in whole..d {
            let (xv, dyv) = (x[i] as f64, dy[i] as f64);
            dg[i] += dyv * (xv * r);
            tail += dyv * gf[i] * xv;
        }
        let mean = (acc.total() + tail) * r / d as f64;
        let mv = D8::splat(mean);
        let dxp = dx.as_mut_ptr();
        for i in (0..whole).step_by(8) {
            let xv = D8::from_f32(xp.add(i));
            let dyv = D8::from_f32(dyp.add(i));
            let gv = D8::load(gp.add(i));
            let mut o = rv.mul(dyv.mul(gv).sub(xv.mul(rv).mul(mv))).to_f32();
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
