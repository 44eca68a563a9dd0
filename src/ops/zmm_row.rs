//! Shared pieces of the AVX-512 f32 token steps of the scans ([`super::ssd_token`],
//! [`super::gdr_token`], [`super::rwkv7_token`]): the f32 view of a generic kernel's slices, and
//! [`x86::Row`], a row of up to 64 columns held as 4 zmm registers, masked at its end; and
//! [`x86::transpose16`], the 16-row column gather of the attention kernels' transposes (and
//! [`x86_avx2::transpose8x8`], its AVX2 form).

use candle_core::{DType, WithDType};

/// `x` as `&[f32]`; panics unless `T` is f32 (the callers dispatch on `T::DTYPE`).
pub(super) fn f32s<T: WithDType>(x: &[T]) -> &[f32] {
    assert_eq!(T::DTYPE, DType::F32);
    // SAFETY: T is f32 (asserted), so the cast only renames the element type.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) }
}

/// `x` as `&mut [f32]`; panics unless `T` is f32.
pub(super) fn f32s_mut<T: WithDType>(x: &mut [T]) -> &mut [f32] {
    assert_eq!(T::DTYPE, DType::F32);
    // SAFETY: T is f32 (asserted), so the cast only renames the element type.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) }
}

/// Whether the AVX-512 f32 kernels run for element type `T`: T is f32, the CPU has AVX-512F and
/// `MIXSCALE_NO_TILE_MM` is unset ([`super::tile_mm::avx512`]). Always false off x86_64.
pub(super) fn f32_avx512<T: WithDType>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        T::DTYPE == DType::F32 && super::tile_mm::avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX2 f32 row kernels (RMSNorm, RoPE) run for `T` instead: T is f32, the CPU lacks
/// AVX-512F but has AVX2 and FMA, and `MIXSCALE_NO_TILE_MM` is unset. Always false off x86_64.
pub(super) fn f32_avx2<T: WithDType>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        T::DTYPE == DType::F32 && !super::tile_mm::avx512() && super::tile_mm::avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// Up to 4 vectors of 16 f32 (masked-off lanes load as 0 and are never stored).
    pub type V4 = [__m512; 4];

    /// Columns `j0 .. min(j0 + 64, n)` of a row of `n`: `nv` vectors and their masks.
    #[derive(Clone, Copy)]
    pub struct Row {
        pub nv: usize,
        pub m: [__mmask16; 4],
    }

    impl Row {
        pub fn at(n: usize, j0: usize) -> Self {
            let m = std::array::from_fn(|j| {
                let w = n.saturating_sub(j0 + 16 * j).min(16);
                if w == 16 { 0xFFFF } else { ((1u32 << w) - 1) as u16 }
            });
            Self { nv: n.saturating_sub(j0).div_ceil(16).min(4), m }
        }
        /// A whole row of `n ≤ 64` columns.
        pub fn new(n: usize) -> Self {
            Self::at(n, 0)
        }
        /// # Safety
        /// AVX-512F; `p .. p + 16·nv` (masked) readable.
        #[inline(always)]
        pub unsafe fn load(&self, p: *const f32) -> V4 {
            std::array::from_fn(|j| if j < self.nv { _mm512_maskz_loadu_ps(self.m[j], p.add(16 * j)) } else { _mm512_setzero_ps() })
        }
        /// # Safety
        /// AVX-512F; `p .. p + 16·nv` (masked) writable.
        #[inline(always)]
        pub unsafe fn store(&self, p: *mut f32, x: &V4) {
            for (j, (&m, &v)) in self.m.iter().zip(x).take(self.nv).enumerate() {
                _mm512_mask_storeu_ps(p.add(16 * j), m, v);
            }
        }
        /// `Σ a·b` over the vectors, then across the lanes.
        /// # Safety
        /// AVX-512F.
        #[inline(always)]
        pub unsafe fn dot(&self, a: &V4, b: &V4) -> f32 {
            let mut acc = _mm512_mul_ps(a[0], b[0]);
            for j in 1..self.nv {
                acc = _mm512_fmadd_ps(a[j], b[j], acc);
            }
            _mm512_reduce_add_ps(acc)
        }
    }

    /// `out[c·ldo + r] = src[r·stride + c]` for 16 rows r and `d` columns c: one gather of 16
    /// values per column (the scalar loop over the 16 strided rows was ~3% of an attention step).
    ///
    /// # Safety
    /// AVX-512F; `src[r·stride + c]` readable and `out[c·ldo + r]` writable for r < 16, c < d;
    /// `15·stride` fits in i32.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose16(src: *const f32, stride: usize, d: usize, out: *mut f32, ldo: usize) {
        let s = stride as i32;
        let idx = _mm512_setr_epi32(0, s, 2 * s, 3 * s, 4 * s, 5 * s, 6 * s, 7 * s, 8 * s, 9 * s, 10 * s, 11 * s, 12 * s, 13 * s, 14 * s, 15 * s);
        for c in 0..d {
            let v = _mm512_i32gather_ps::<4>(idx, src.add(c));
            _mm512_storeu_ps(out.add(c * ldo), v);
        }
    }
}

/// The AVX2 form of the attention kernels' transposes, for CPUs without AVX-512 (whose gathers
/// are slow on AMD Zen 1–3): 8×8 blocks transposed in registers.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86_avx2 {
    use std::arch::x86_64::*;

    /// The `vmaskmovps` mask of the first `w` lanes (`w` ≤ 0: none; ≥ 8: all).
    ///
    /// # Safety
    /// Called from code compiled with AVX2.
    #[inline(always)]
    pub unsafe fn lane_mask(w: i32) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// The sum of the 8 lanes in a fixed order.
    ///
    /// # Safety
    /// Called from code compiled with AVX.
    #[inline(always)]
    pub unsafe fn total(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// [`super::x86::transpose16`] in AVX2: 16 rows and `d` columns as 8×8 register blocks, the
    /// last `d mod 8` columns element by element.
    ///
    /// # Safety
    /// AVX2; `src[r·stride + c]` readable and `out[c·ldo + r]` writable for r < 16, c < d.
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose16(src: *const f32, stride: usize, d: usize, out: *mut f32, ldo: usize) {
        let whole = d - d % 8;
        for c0 in (0..whole).step_by(8) {
            for r0 in [0, 8] {
                transpose8x8(src.add(r0 * stride + c0), stride, out.add(c0 * ldo + r0), ldo);
            }
        }
        for c in whole..d {
            for r in 0..16 {
                *out.add(c * ldo + r) = *src.add(r * stride + c);
            }
        }
    }

    /// `out[c·ldo + r] = src[r·stride + c]` for 8 rows r and 8 columns c (unpack, shuffle and
    /// 128-bit lane permutes: the classic 8×8 f32 register transpose).
    ///
    /// # Safety
    /// AVX2; `src[r·stride + c]` readable and `out[c·ldo + r]` writable for r, c < 8.
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose8x8(src: *const f32, stride: usize, out: *mut f32, ldo: usize) {
        let cols = transpose8(std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * stride))));
        for (c, v) in cols.into_iter().enumerate() {
            _mm256_storeu_ps(out.add(c * ldo), v);
        }
    }

    /// The 8×8 register transpose: lane `c` of output `r'` is lane `r'` of input `c`
    /// (unpack, shuffle and 128-bit lane permutes).
    ///
    /// # Safety
    /// Called from code compiled with AVX2.
    #[inline(always)]
    pub unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}

