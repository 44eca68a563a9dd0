//! Register-blocked f32 micro-kernel (AVX-512, or AVX2+FMA on CPUs without it) for the small products inside the fused CPU
//! kernels, where the `gemm` crate spends much of each call packing its operands: the attention
//! tiles are `64×32·256`, `64×256·32`, `256×64·32` products (K or N = head dim 32), which gemm
//! runs at 70–120 GFLOP/s on one core here (`examples/gemm_shapes.rs -- 1 --tiles`).
//!
//! The scheme is the classic outer-product micro-kernel (Goto & van de Geijn 2008, "Anatomy of
//! high-performance matrix multiplication"; BLIS's `sgemm` micro-kernels) without packing: the
//! right operand must be row-major (`b[p·ldb + j]`), so a `16·NV`-column strip of one of its rows is
//! `NV` vector loads; the left operand may have any strides (its elements are broadcast one at a
//! time), so `Aᵀ` products (`dV = Pᵀ dO`, `dK = dSᵀ Q`) need no copy. `MR × NV` accumulators (at
//! most 24 of the 32 zmm registers) sum over the whole `k` in registers, in order `p = 0, 1, …`
//! (one FMA per step, so the result does not depend on the blocking), and are written once:
//! `dst = (accumulate ? dst : 0) + alpha · acc`. Column edges use AVX-512 masks, so no element
//! outside the `m × n` block is read or written.
//!
//! [`try_mm_f32`] returns `false` (the caller falls back to gemm) when the CPU lacks both AVX-512F
//! and AVX2+FMA, or the shape is outside what the kernel is for.

/// Largest `k` the kernel takes: the `k × 64` strip of `b` a row block streams through must stay
/// in the L2 cache (256 KiB at k = 1024).
const MAX_K: usize = 1024;

/// `dst[m×n] (row stride ldd) = (accumulate ? dst : 0) + alpha · A·B`, where `A[i,p] =
/// a[i·ars + p·acs]` and `B[p,j] = b[p·ldb + j]`. Returns `false` without touching `dst` when the
/// kernel does not apply (neither AVX-512F nor AVX2+FMA, or `k` beyond [`MAX_K`]). The caller has checked that every
/// index lies inside the three slices.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn try_mm_f32(m: usize, n: usize, k: usize, dst: &mut [f32], ldd: usize, accumulate: bool, a: (&[f32], usize, usize), b: (&[f32], usize), alpha: f32) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if k == 0 || k > MAX_K {
            return false;
        }
        if avx512() {
            // SAFETY: AVX-512F is present (checked above); the caller guarantees the extents.
            unsafe { x86::mm(m, n, k, dst, ldd, accumulate, a, b, alpha) };
            return true;
        }
        if avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked above); the caller guarantees the extents.
            unsafe { x86_avx2::mm(m, n, k, dst, ldd, accumulate, a, b, alpha) };
            return true;
        }
        false
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, dst, ldd, accumulate, a, b, alpha);
        false
    }
}

/// Whether the CPU has AVX-512F and `MIXSCALE_NO_TILE_MM` is unset (the switch for A/B runs of
/// the AVX-512 f32 kernels: this one and [`super::ssd_token`]'s).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::env::var_os("MIXSCALE_NO_TILE_MM").is_none() && is_x86_feature_detected!("avx512f"))
}

/// Whether the CPU has AVX2 and FMA (and `MIXSCALE_NO_TILE_MM` is unset): the 8-lane form of the
/// kernel, for CPUs without AVX-512 (e.g. AMD EPYC before Zen 4).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::env::var_os("MIXSCALE_NO_TILE_MM").is_none() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Column strip width in vectors (16 f32 each) and row-block height for each strip width:
    /// `MR · NV ≤ 24` accumulators.
    const NV_MAX: usize = 4;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn mm(m: usize, n: usize, k: usize, dst: &mut [f32], ldd: usize, accumulate: bool, a: (&[f32], usize, usize), b: (&[f32], usize), alpha: f32) {
        let (ap, ars, acs) = (a.0.as_ptr(), a.1, a.2);
        let (bp, ldb) = (b.0.as_ptr(), b.1);
        let cp = dst.as_mut_ptr();
        let mut j0 = 0;
        while j0 < n {
            let w = (n - j0).min(16 * NV_MAX);
            let nv = w.div_ceil(16);
            let mask: __mmask16 = if w.is_multiple_of(16) { 0xFFFF } else { (1u16 << (w % 16)) - 1 };
            let s = Strip { k, b: bp.add(j0), ldb, ars, acs, ldc: ldd, accumulate, alpha, mask };
            let c = cp.add(j0);
            match nv {
                1 => s.rows::<1, 12>(m, ap, c),
                2 => s.rows::<2, 12>(m, ap, c),
                3 => s.rows::<3, 8>(m, ap, c),
                _ => s.rows::<4, 6>(m, ap, c),
            }
            j0 += w;
        }
    }

    /// One column strip of `16·NV` (the last vector masked) columns.
    struct Strip {
        k: usize,
        b: *const f32,
        ldb: usize,
        ars: usize,
        acs: usize,
        ldc: usize,
        accumulate: bool,
        alpha: f32,
        mask: __mmask16,
    }

    impl Strip {
        /// All `m` rows of the strip in blocks of `MR` (the last block shorter).
        #[target_feature(enable = "avx512f")]
        unsafe fn rows<const NV: usize, const MR: usize>(&self, m: usize, a: *const f32, c: *mut f32) {
            let mut i = 0;
            while i + MR <= m {
                self.block::<NV, MR>(a.add(i * self.ars), c.add(i * self.ldc));
                i += MR;
            }
            let (a, c) = (a.add(i * self.ars), c.add(i * self.ldc));
            match m - i {
                0 => {}
                1 => self.block::<NV, 1>(a, c),
                2 => self.block::<NV, 2>(a, c),
                3 => self.block::<NV, 3>(a, c),
                4 => self.block::<NV, 4>(a, c),
                5 => self.block::<NV, 5>(a, c),
                6 => self.block::<NV, 6>(a, c),
                7 => self.block::<NV, 7>(a, c),
                8 => self.block::<NV, 8>(a, c),
                r => {
                    // 9..=11 rows (only below MR = 12): two blocks.
                    self.block::<NV, 8>(a, c);
                    self.rows::<NV, 4>(r - 8, a.add(8 * self.ars), c.add(8 * self.ldc));
                }
            }
        }

        /// `MR` rows × `NV` vectors: all of `k` in registers, then one write.
        #[inline(always)]
        unsafe fn block<const NV: usize, const MR: usize>(&self, a: *const f32, c: *mut f32) {
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            let masks: [__mmask16; NV] = std::array::from_fn(|v| if v + 1 == NV { self.mask } else { 0xFFFF });
            for p in 0..self.k {
                let brow = self.b.add(p * self.ldb);
                let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], brow.add(16 * v)));
                let ap = a.add(p * self.acs);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(r * self.ars));
                    for (acc_v, &b_v) in acc_r.iter_mut().zip(&bv) {
                        *acc_v = _mm512_fmadd_ps(x, b_v, *acc_v);
                    }
                }
            }
            let alpha = _mm512_set1_ps(self.alpha);
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, &acc_v) in acc_r.iter().enumerate() {
                    let cv = c.add(r * self.ldc + 16 * v);
                    let out = if self.accumulate {
                        _mm512_fmadd_ps(acc_v, alpha, _mm512_maskz_loadu_ps(masks[v], cv))
                    } else {
                        _mm512_mul_ps(acc_v, alpha)
                    };
                    _mm512_mask_storeu_ps(cv, masks[v], out);
                }
            }
        }
    }
}

/// The same kernel in 8-lane AVX2 with FMA: 16 ymm registers, so at most 12 accumulators
/// (`MR × NV` of 8×1 or 6×2), column strips of 16; edges use `vmaskmovps`, which neither reads
/// nor writes the masked-off lanes. One FMA per `p` in order, as the AVX-512 form: both give the
/// same bits.
#[cfg(target_arch = "x86_64")]
mod x86_avx2 {
    use std::arch::x86_64::*;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn mm(m: usize, n: usize, k: usize, dst: &mut [f32], ldd: usize, accumulate: bool, a: (&[f32], usize, usize), b: (&[f32], usize), alpha: f32) {
        let (ap, ars, acs) = (a.0.as_ptr(), a.1, a.2);
        let (bp, ldb) = (b.0.as_ptr(), b.1);
        let cp = dst.as_mut_ptr();
        let mut j0 = 0;
        while j0 < n {
            let w = (n - j0).min(16);
            let nv = w.div_ceil(8);
            let tail = if w.is_multiple_of(8) { 8 } else { (w % 8) as i32 };
            let mask = crate::ops::zmm_row::x86_avx2::lane_mask(tail);
            let s = Strip { k, b: bp.add(j0), ldb, ars, acs, ldc: ldd, accumulate, alpha, mask };
            let c = cp.add(j0);
            match (nv, w.is_multiple_of(8)) {
                (1, true) => s.rows::<1, 8, false>(m, ap, c),
                (1, false) => s.rows::<1, 8, true>(m, ap, c),
                (_, true) => s.rows::<2, 6, false>(m, ap, c),
                (_, false) => s.rows::<2, 6, true>(m, ap, c),
            }
            j0 += w;
        }
    }

    /// One column strip of `8·NV` columns (the last vector masked when `MASKED`: a masked load
    /// is slower than a plain one on some CPUs, so full strips use plain loads).
    struct Strip {
        k: usize,
        b: *const f32,
        ldb: usize,
        ars: usize,
        acs: usize,
        ldc: usize,
        accumulate: bool,
        alpha: f32,
        mask: __m256i,
    }

    impl Strip {
        /// All `m` rows of the strip in blocks of `MR` (the last block shorter).
        #[target_feature(enable = "avx2,fma")]
        unsafe fn rows<const NV: usize, const MR: usize, const MASKED: bool>(&self, m: usize, a: *const f32, c: *mut f32) {
            let mut i = 0;
            while i + MR <= m {
                self.block::<NV, MR, MASKED>(a.add(i * self.ars), c.add(i * self.ldc));
                i += MR;
            }
            let (a, c) = (a.add(i * self.ars), c.add(i * self.ldc));
            match m - i {
                0 => {}
                1 => self.block::<NV, 1, MASKED>(a, c),
                2 => self.block::<NV, 2, MASKED>(a, c),
                3 => self.block::<NV, 3, MASKED>(a, c),
                4 => self.block::<NV, 4, MASKED>(a, c),
                5 => self.block::<NV, 5, MASKED>(a, c),
                6 => self.block::<NV, 6, MASKED>(a, c),
                _ => {
                    // 7 rows (only below MR = 8): two blocks.
                    self.block::<NV, 4, MASKED>(a, c);
                    self.block::<NV, 3, MASKED>(a.add(4 * self.ars), c.add(4 * self.ldc));
                }
            }
        }

        /// `MR` rows × `NV` vectors: all of `k` in registers, then one write.
        #[inline(always)]
        unsafe fn block<const NV: usize, const MR: usize, const MASKED: bool>(&self, a: *const f32, c: *mut f32) {
            let mut acc = [[_mm256_setzero_ps(); NV]; MR];
            let full = _mm256_set1_epi32(-1);
            let masks: [__m256i; NV] = std::array::from_fn(|v| if v + 1 == NV { self.mask } else { full });
            for p in 0..self.k {
                let brow = self.b.add(p * self.ldb);
                let bv: [__m256; NV] = std::array::from_fn(|v| if MASKED && v + 1 == NV { _mm256_maskload_ps(brow.add(8 * v), masks[v]) } else { _mm256_loadu_ps(brow.add(8 * v)) });
                let ap = a.add(p * self.acs);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(*ap.add(r * self.ars));
                    for (acc_v, &b_v) in acc_r.iter_mut().zip(&bv) {
                        *acc_v = _mm256_fmadd_ps(x, b_v, *acc_v);
                    }
                }
            }
            let alpha = _mm256_set1_ps(self.alpha);
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, &acc_v) in acc_r.iter().enumerate() {
                    let cv = c.add(r * self.ldc + 8 * v);
                    let edge = MASKED && v + 1 == NV;
                    let out = match (self.accumulate, edge) {
                        (true, true) => _mm256_fmadd_ps(acc_v, alpha, _mm256_maskload_ps(cv, masks[v])),
                        (true, false) => _mm256_fmadd_ps(acc_v, alpha, _mm256_loadu_ps(cv)),
                        (false, _) => _mm256_mul_ps(acc_v, alpha),
                    };
                    if edge {
                        _mm256_maskstore_ps(cv, masks[v], out);
                    } else {
                        _mm256_storeu_ps(cv, out);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    type Mm<'a> = &'a dyn Fn(usize, usize, usize, &mut [f32], usize, bool, (&[f32], usize, usize), (&[f32], usize), f32);

    /// Every strip width and row remainder, both layouts of A, accumulate on/off, against an f64
    /// product; the padding around the destination block must stay untouched.
    fn check_edges(mm: Mm) {
        for &m in &[1, 2, 5, 6, 7, 8, 9, 11, 12, 13, 25, 64] {
            for &n in &[1, 7, 8, 9, 15, 16, 17, 24, 32, 33, 48, 63, 64, 65, 130, 256] {
                for &k in &[1, 3, 32, 64] {
                    for &(ta, acc) in &[(false, false), (true, true), (false, true), (true, false)] {
                        let (lda, ldb, ldd) = (k + 3, n + 5, n + 7);
                        let a = lcg((m * 1000 + n * 10 + k) as u64, if ta { k * (m + 2) } else { m * lda });
                        let b = lcg(7 + k as u64, k * ldb);
                        let init = lcg(99, m * ldd);
                        let mut d = init.clone();
                        let (ars, acs) = if ta { (1, m + 2) } else { (lda, 1) };
                        mm(m, n, k, &mut d, ldd, acc, (&a, ars, acs), (&b, ldb), 0.75);
                        let ctx = format!("m{m} n{n} k{k} ta{ta} acc{acc}");
                        crate::testing::assert_product(&ctx, &d, &init, (m, n, k, ldd), (&a, ars, acs), (&b, ldb, 1), acc, 0.75, 1e-5);
                    }
                }
            }
        }
    }

    /// The dispatched kernel (AVX-512 or AVX2) on every edge.
    #[test]
    fn matches_f64_product_on_edges() {
        if !try_mm_f32(1, 1, 1, &mut [0.0], 1, false, (&[1.0], 1, 1), (&[1.0], 1), 1.0) {
            eprintln!("no AVX-512F or AVX2+FMA: tile_mm not exercised");
            return;
        }
        check_edges(&|m, n, k, d, ldd, acc, a, b, al| assert!(try_mm_f32(m, n, k, d, ldd, acc, a, b, al)));
    }

    /// The AVX2 form on every edge even where AVX-512 is dispatched, and the same bits as the
    /// AVX-512 form where both exist.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_form_matches_f64_product_and_avx512_bits() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("no AVX2+FMA: AVX2 tile_mm not exercised");
            return;
        }
        // SAFETY: AVX2 and FMA checked above; check_edges passes in-bounds extents.
        check_edges(&|m, n, k, d, ldd, acc, a, b, al| unsafe { x86_avx2::mm(m, n, k, d, ldd, acc, a, b, al) });
        if is_x86_feature_detected!("avx512f") {
            let (m, n, k) = (37, 75, 64);
            let a = lcg(1, m * k);
            let b = lcg(2, k * n);
            let (mut d1, mut d2) = (lcg(3, m * n), lcg(3, m * n));
            // SAFETY: both feature sets checked; the extents fit the slices.
            unsafe {
                x86_avx2::mm(m, n, k, &mut d1, n, true, (&a, k, 1), (&b, n), 0.5);
                x86::mm(m, n, k, &mut d2, n, true, (&a, k, 1), (&b, n), 0.5);
            }
            assert!(d1.iter().zip(&d2).all(|(x, y)| x.to_bits() == y.to_bits()), "AVX2 and AVX-512 forms differ");
        }
    }
}
