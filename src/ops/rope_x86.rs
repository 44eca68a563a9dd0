//! The RoPE rotation ([`super::rope`]) of f32 head rows in AVX-512: the same f64 arithmetic in the
//! same order as the generic row (`a·c − b·s`, `a·s + b·c`, each product rounded, no fused
//! multiply-add), so both give the same bits; the tests check that.
//!
//! Why: the generic row (five zipped iterators over two half-rows) compiled to slow code: a
//! `[16, 256, 4, 32]` rotation took 0.29 ms on 2 threads (~1.1 ns per value), 2–3% of an
//! attention or MoE step.

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// One head row `x = [a ‖ b]` (halves of `c.len()`) into `y`: `[a·c − b·s ‖ a·s + b·c]` with
    /// `s = sign·sin`, in f64, rounded to f32 once per value.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rotate_row(x: &[f32], c: &[f64], s: &[f64], sign: f64, y: &mut [f32]) {
        let half = c.len();
        assert!(s.len() == half && x.len() == 2 * half && y.len() == 2 * half);
        let (xa, xb) = x.split_at(half);
        let (ya, yb) = y.split_at_mut(half);
        let whole = half - half % 8;
        let sg = _mm512_set1_pd(sign);
        for i in (0..whole).step_by(8) {
            let a = _mm512_cvtps_pd(_mm256_loadu_ps(xa.as_ptr().add(i)));
            let b = _mm512_cvtps_pd(_mm256_loadu_ps(xb.as_ptr().add(i)));
            let ci = _mm512_loadu_pd(c.as_ptr().add(i));
            let si = _mm512_mul_pd(sg, _mm512_loadu_pd(s.as_ptr().add(i)));
            let oa = _mm512_sub_pd(_mm512_mul_pd(a, ci), _mm512_mul_pd(b, si));
            let ob = _mm512_add_pd(_mm512_mul_pd(a, si), _mm512_mul_pd(b, ci));
            _mm256_storeu_ps(ya.as_mut_ptr().add(i), _mm512_cvtpd_ps(oa));
            _mm256_storeu_ps(yb.as_mut_ptr().add(i), _mm512_cvtpd_ps(ob));
        }
        for i in whole..half {
            let (a, b, si) = (xa[i] as f64, xb[i] as f64, sign * s[i]);
            ya[i] = (a * c[i] - b * si) as f32;
            yb[i] = (a * si + b * c[i]) as f32;
        }
    }
}

/// The same row in AVX2 (4 f64 lanes per step; every value is computed as in the other forms, so
/// all three give the same bits).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86_avx2 {
    use std::arch::x86_64::*;

    /// [`super::x86::rotate_row`] in AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn rotate_row(x: &[f32], c: &[f64], s: &[f64], sign: f64, y: &mut [f32]) {
        let half = c.len();
        assert!(s.len() == half && x.len() == 2 * half && y.len() == 2 * half);
        let (xa, xb) = x.split_at(half);
        let (ya, yb) = y.split_at_mut(half);
        let whole = half - half % 4;
        let sg = _mm256_set1_pd(sign);
        for i in (0..whole).step_by(4) {
            let a = _mm256_cvtps_pd(_mm_loadu_ps(xa.as_ptr().add(i)));
            let b = _mm256_cvtps_pd(_mm_loadu_ps(xb.as_ptr().add(i)));
            let ci = _mm256_loadu_pd(c.as_ptr().add(i));
            let si = _mm256_mul_pd(sg, _mm256_loadu_pd(s.as_ptr().add(i)));
            let oa = _mm256_sub_pd(_mm256_mul_pd(a, ci), _mm256_mul_pd(b, si));
            let ob = _mm256_add_pd(_mm256_mul_pd(a, si), _mm256_mul_pd(b, ci));
            _mm_storeu_ps(ya.as_mut_ptr().add(i), _mm256_cvtpd_ps(oa));
            _mm_storeu_ps(yb.as_mut_ptr().add(i), _mm256_cvtpd_ps(ob));
        }
        for i in whole..half {
            let (a, b, si) = (xa[i] as f64, xb[i] as f64, sign * s[i]);
            ya[i] = (a * c[i] - b * si) as f32;
            yb[i] = (a * si + b * c[i]) as f32;
        }
    }
}
