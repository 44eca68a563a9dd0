//! The per-token steps of the fused SSD kernel ([`super::ssd_fused`], Mamba-2: Dao & Gu 2024,
//! arXiv:2405.21060), blocked over columns so that each block's accumulators stay in registers
//! while a step runs down the rows of the state:
//! - [`fwd`]: on the transposed state `st [N,P]`, `st[j,:] = a·st[j,:] + c·B_j` and
//!   `y = Σ_j C_j st[j,:]` (j in order), in blocks of P;
//! - [`bwd`]: the backward step of the module doc of [`super::ssd_fused`] over the rows of
//!   `h_{t−1} [P,N]` and `dh [P,N]`, in blocks of N.
//!
//! Each has a generic form (f32/f64, 16-element blocks the compiler vectorises; it still keeps
//! the block accumulators in memory) and, for f32 on CPUs with AVX-512F, an intrinsic form that
//! holds up to 4 vectors (64 columns) of every accumulator in zmm registers, fuses the
//! multiply-adds (FMA) and masks the column edge; on CPUs with AVX2+FMA but no AVX-512, the same
//! intrinsic form in 8-lane ymm registers (up to 32 columns in the forward, 16 in the backward,
//! for the 16 registers). Each sums in a fixed order that depends only on
//! the shapes, never on the thread count.

use super::attn_fused::Elem;
use super::zmm_row::{f32s, f32s_mut};

/// Columns per block of the generic forms.
const L: usize = 16;

/// One token of the forward (see the module doc): updates `st [N,P]` and writes `y [P]`, where
/// `c = dt·x [P]`, `b`, `cm` are `B`, `C` `[N]` and `a = exp(dt·A)`.
#[inline(always)]
pub(super) fn fwd<T: Elem>(st: &mut [T], c: &[T], b: &[T], cm: &[T], a: T, y: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if super::zmm_row::f32_avx512::<T>() {
        // SAFETY: T is f32 (checked), so the casts only rename the element type; AVX-512F is
        // present (checked).
        unsafe { x86::fwd(f32s_mut(st), f32s(c), f32s(b), f32s(cm), a.to_f64() as f32, f32s_mut(y)) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::zmm_row::f32_avx2::<T>() {
        // SAFETY: T is f32 (checked), so the casts only rename the element type; AVX2 and FMA
        // are present (checked).
        unsafe { x86_avx2::fwd(f32s_mut(st), f32s(c), f32s(b), f32s(cm), a.to_f64() as f32, f32s_mut(y)) };
        return;
    }
    let p = c.len();
    let full = p - p % L;
    for p0 in (0..full).step_by(L) {
        let cv: &[T; L] = c[p0..p0 + L].try_into().unwrap();
        let mut yv = [T::zero(); L];
        for ((row, &bj), &cj) in st.chunks_exact_mut(p).zip(b).zip(cm) {
            let e: &mut [T; L] = (&mut row[p0..p0 + L]).try_into().unwrap();
            for l in 0..L {
                e[l] = a * e[l] + cv[l] * bj;
                yv[l] += cj * e[l];
            }
        }
        y[p0..p0 + L].copy_from_slice(&yv);
    }
    if full < p {
        let (cv, yr) = (&c[full..], &mut y[full..]);
        yr.iter_mut().for_each(|v| *v = T::zero());
        for ((row, &bj), &cj) in st.chunks_exact_mut(p).zip(b).zip(cm) {
            for ((e, &cp), yp) in row[full..].iter_mut().zip(cv).zip(yr.iter_mut()) {
                *e = a * *e + cp * bj;
                *yp += cj * *e;
            }
        }
    }
}

/// One token's inputs to [`bwd`]: x `[P]`, dt, B and C `[N]`, `a = exp(dt·A)` and dy `[P]`.
pub(super) struct TokIn<'a, T> {
    pub x: &'a [T],
    pub dt: T,
    pub b: &'a [T],
    pub c: &'a [T],
    pub a: T,
    pub dy: &'a [T],
}

/// One backward token over `hp = h_{t−1} [P,N]` and `dh [P,N]` (gradient w.r.t. h_t on entry,
/// w.r.t. h_{t−1} on return). Writes the token's `gb = dB`, `gc = dC` `[N]` and `e [P]`
/// (`e_p = dh[p,:]·B` after adding `dy_p C`), and returns `Σ dh·h_{t−1}` (the gradient of `a`).
/// `scratch` holds `P·16` elements.
#[inline(always)]
pub(super) fn bwd<T: Elem>(hp: &[T], dh: &mut [T], t: &TokIn<T>, gb: &mut [T], gc: &mut [T], e: &mut [T], scratch: &mut [T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if super::zmm_row::f32_avx512::<T>() {
        let t32 = TokIn { x: f32s(t.x), dt: t.dt.to_f64() as f32, b: f32s(t.b), c: f32s(t.c), a: t.a.to_f64() as f32, dy: f32s(t.dy) };
        // SAFETY: as in `fwd`.
        let da = unsafe { x86::bwd(f32s(hp), f32s_mut(dh), &t32, f32s_mut(gb), f32s_mut(gc), f32s_mut(e), f32s_mut(scratch)) };
        return T::from_f64(da as f64);
    }
    #[cfg(target_arch = "x86_64")]
    if super::zmm_row::f32_avx2::<T>() {
        let t32 = TokIn { x: f32s(t.x), dt: t.dt.to_f64() as f32, b: f32s(t.b), c: f32s(t.c), a: t.a.to_f64() as f32, dy: f32s(t.dy) };
        // SAFETY: as in `fwd`.
        let da = unsafe { x86_avx2::bwd(f32s(hp), f32s_mut(dh), &t32, f32s_mut(gb), f32s_mut(gc), f32s_mut(e), f32s_mut(scratch)) };
        return T::from_f64(da as f64);
    }
    let (n, p, a) = (t.b.len(), t.x.len(), t.a);
    let full = n - n % L;
    let mut dav = [T::zero(); L];
    let el: &mut [[T; L]] = to_blocks(&mut scratch[..p * L]);
    el.iter_mut().for_each(|v| *v = [T::zero(); L]);
    for j0 in (0..full).step_by(L) {
        let bv: &[T; L] = t.b[j0..j0 + L].try_into().unwrap();
        let cv: &[T; L] = t.c[j0..j0 + L].try_into().unwrap();
        let (mut gbv, mut gcv) = ([T::zero(); L], [T::zero(); L]);
        for (c, elc) in el.iter_mut().enumerate() {
            let (dxc, dyc) = (t.dt * t.x[c], t.dy[c]);
            let hpr: &[T; L] = hp[c * n + j0..c * n + j0 + L].try_into().unwrap();
            let dhr: &mut [T; L] = (&mut dh[c * n + j0..c * n + j0 + L]).try_into().unwrap();
            for l in 0..L {
                let ht = a * hpr[l] + dxc * bv[l];
                gcv[l] += dyc * ht;
                let g = dhr[l] + dyc * cv[l];
                elc[l] += g * bv[l];
                gbv[l] += dxc * g;
                dav[l] += g * hpr[l];
                dhr[l] = a * g;
            }
        }
        gb[j0..j0 + L].copy_from_slice(&gbv);
        gc[j0..j0 + L].copy_from_slice(&gcv);
    }
    // The columns past the last full block, then the per-row totals (pairwise over the lanes).
    let mut da_tail = T::zero();
    gb[full..].iter_mut().chain(gc[full..].iter_mut()).for_each(|v| *v = T::zero());
    for (c, (ec, elc)) in e[..p].iter_mut().zip(el.iter()).enumerate() {
        let (dxc, dyc) = (t.dt * t.x[c], t.dy[c]);
        let mut tail = T::zero();
        for j in full..n {
            let hv = hp[c * n + j];
            gc[j] += dyc * (a * hv + dxc * t.b[j]);
            let g = dh[c * n + j] + dyc * t.c[j];
            tail += g * t.b[j];
            gb[j] += dxc * g;
            da_tail += g * hv;
            dh[c * n + j] = a * g;
        }
        *ec = pairwise(*elc) + tail;
    }
    pairwise(dav) + da_tail
}

/// `Σ v` halving the lanes in order (vector-friendly and fixed).
#[inline(always)]
fn pairwise<T: Elem>(mut v: [T; L]) -> T {
    let mut k = L / 2;
    while k > 0 {
        let (lo, hi) = v.split_at_mut(k);
        lo.iter_mut().zip(&hi[..k]).for_each(|(a, &b)| *a += b);
        k /= 2;
    }
    v[0]
}

fn to_blocks<T>(x: &mut [T]) -> &mut [[T; L]] {
    let (blocks, rest) = x.as_chunks_mut::<L>();
    debug_assert!(rest.is_empty());
    blocks
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::TokIn;
    use crate::ops::zmm_row::x86::Row;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fwd(st: &mut [f32], c: &[f32], b: &[f32], cm: &[f32], a: f32, y: &mut [f32]) {
        let (p, n) = (c.len(), b.len());
        assert!(st.len() >= n * p && y.len() >= p && cm.len() >= n);
        let mut p0 = 0;
        while p0 < p {
            match (p - p0).div_ceil(16) {
                1 => fwd_group::<1>(st, c, b, cm, a, y, p0),
                2 => fwd_group::<2>(st, c, b, cm, a, y, p0),
                3 => fwd_group::<3>(st, c, b, cm, a, y, p0),
                _ => fwd_group::<4>(st, c, b, cm, a, y, p0),
            }
            p0 += 64;
        }
    }

    /// Columns `p0 .. p0 + 16·NV` (masked at P) of every row of `st`.
    #[inline(always)]
    unsafe fn fwd_group<const NV: usize>(st: &mut [f32], c: &[f32], b: &[f32], cm: &[f32], a: f32, y: &mut [f32], p0: usize) {
        let p = c.len();
        let m = Row::at(p, p0).m;
        let av = _mm512_set1_ps(a);
        let cv: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(m[v], c.as_ptr().add(p0 + 16 * v)));
        let mut yv = [_mm512_setzero_ps(); NV];
        let sp = st.as_mut_ptr();
        for (j, (&bj, &cj)) in b.iter().zip(cm).enumerate() {
            let (bb, cc) = (_mm512_set1_ps(bj), _mm512_set1_ps(cj));
            let row = sp.add(j * p + p0);
            for v in 0..NV {
                let e = _mm512_maskz_loadu_ps(m[v], row.add(16 * v));
                let e = _mm512_fmadd_ps(cv[v], bb, _mm512_mul_ps(av, e));
                _mm512_mask_storeu_ps(row.add(16 * v), m[v], e);
                yv[v] = _mm512_fmadd_ps(cc, e, yv[v]);
            }
        }
        for v in 0..NV {
            _mm512_mask_storeu_ps(y.as_mut_ptr().add(p0 + 16 * v), m[v], yv[v]);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn bwd(hp: &[f32], dh: &mut [f32], t: &TokIn<f32>, gb: &mut [f32], gc: &mut [f32], e: &mut [f32], scratch: &mut [f32]) -> f32 {
        let (n, p) = (t.b.len(), t.x.len());
        assert!(hp.len() >= n * p && dh.len() >= n * p && t.c.len() >= n && t.dy.len() >= p);
        assert!(gb.len() >= n && gc.len() >= n && e.len() >= p && scratch.len() >= 16 * p);
        // One `da` accumulator per vector of a group: a single one would chain every FMA of a row.
        let mut da = [_mm512_setzero_ps(); 4];
        let mut j0 = 0;
        while j0 < n {
            let first = j0 == 0;
            da = match (n - j0).div_ceil(16) {
                1 => bwd_group::<1>(hp, dh, t, gb, gc, scratch, j0, first, da),
                2 => bwd_group::<2>(hp, dh, t, gb, gc, scratch, j0, first, da),
                3 => bwd_group::<3>(hp, dh, t, gb, gc, scratch, j0, first, da),
                _ => bwd_group::<4>(hp, dh, t, gb, gc, scratch, j0, first, da),
            };
            j0 += 64;
        }
        for (c, ec) in e[..p].iter_mut().enumerate() {
            *ec = _mm512_reduce_add_ps(_mm512_loadu_ps(scratch.as_ptr().add(16 * c)));
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(da[0], da[1]), _mm512_add_ps(da[2], da[3])))
    }

    /// Columns `j0 .. j0 + 16·NV` (masked at N) of every row; the rows' `dh·B` partial sums go to
    /// `scratch [P,16]` (stored when `first`, added otherwise).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn bwd_group<const NV: usize>(hp: &[f32], dh: &mut [f32], t: &TokIn<f32>, gb: &mut [f32], gc: &mut [f32], scratch: &mut [f32], j0: usize, first: bool, mut da: [__m512; 4]) -> [__m512; 4] {
        let n = t.b.len();
        let m = Row::at(n, j0).m;
        let a = _mm512_set1_ps(t.a);
        let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(m[v], t.b.as_ptr().add(j0 + 16 * v)));
        let cv: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(m[v], t.c.as_ptr().add(j0 + 16 * v)));
        let (mut gbv, mut gcv) = ([_mm512_setzero_ps(); NV], [_mm512_setzero_ps(); NV]);
        let (hpp, dhp, sp) = (hp.as_ptr(), dh.as_mut_ptr(), scratch.as_mut_ptr());
        for (c, (&xc, &dyc)) in t.x.iter().zip(t.dy).enumerate() {
            let (dxc, dyc) = (_mm512_set1_ps(t.dt * xc), _mm512_set1_ps(dyc));
            let mut ev = if first { _mm512_setzero_ps() } else { _mm512_loadu_ps(sp.add(16 * c)) };
            for v in 0..NV {
                let off = c * n + j0 + 16 * v;
                let h = _mm512_maskz_loadu_ps(m[v], hpp.add(off));
                let ht = _mm512_fmadd_ps(dxc, bv[v], _mm512_mul_ps(a, h));
                gcv[v] = _mm512_fmadd_ps(dyc, ht, gcv[v]);
                let g = _mm512_fmadd_ps(dyc, cv[v], _mm512_maskz_loadu_ps(m[v], dhp.add(off)));
                ev = _mm512_fmadd_ps(g, bv[v], ev);
                gbv[v] = _mm512_fmadd_ps(dxc, g, gbv[v]);
                da[v] = _mm512_fmadd_ps(g, h, da[v]);
                _mm512_mask_storeu_ps(dhp.add(off), m[v], _mm512_mul_ps(a, g));
            }
            _mm512_storeu_ps(sp.add(16 * c), ev);
        }
        for v in 0..NV {
            _mm512_mask_storeu_ps(gb.as_mut_ptr().add(j0 + 16 * v), m[v], gbv[v]);
            _mm512_mask_storeu_ps(gc.as_mut_ptr().add(j0 + 16 * v), m[v], gcv[v]);
        }
        da
    }
}

/// The intrinsic forms in AVX2 + FMA (8 f32 lanes, 16 registers): the forward holds up to 4
/// vectors (32 columns) per group, the backward 2 (16 columns); `vmaskmovps` at the column edge.
#[cfg(target_arch = "x86_64")]
mod x86_avx2 {
    use super::TokIn;
    use crate::ops::zmm_row::x86_avx2::{lane_mask, total};
    use std::arch::x86_64::*;

    /// Masks of the `NV` vectors of columns `j0 ..` of a row of `n` (all-ones lanes inside).
    #[inline(always)]
    unsafe fn masks<const NV: usize>(n: usize, j0: usize) -> [__m256i; NV] {
        std::array::from_fn(|v| lane_mask(n.saturating_sub(j0 + 8 * v).min(8) as i32))
    }

    /// Load of vector `v` of a group: masked only for the last vector of an edge group (AMD
    /// CPUs run `vmaskmovps`, above all the store, much slower than a plain access).
    #[inline(always)]
    unsafe fn load<const NV: usize, const EDGE: bool>(p: *const f32, m: &[__m256i; NV], v: usize) -> __m256 {
        if EDGE && v + 1 == NV {
            _mm256_maskload_ps(p, m[v])
        } else {
            _mm256_loadu_ps(p)
        }
    }

    /// Store of vector `v` of a group (see [`load`]).
    #[inline(always)]
    unsafe fn store<const NV: usize, const EDGE: bool>(p: *mut f32, m: &[__m256i; NV], v: usize, x: __m256) {
        if EDGE && v + 1 == NV {
            _mm256_maskstore_ps(p, m[v], x)
        } else {
            _mm256_storeu_ps(p, x)
        }
    }


    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fwd(st: &mut [f32], c: &[f32], b: &[f32], cm: &[f32], a: f32, y: &mut [f32]) {
        let (p, n) = (c.len(), b.len());
        assert!(st.len() >= n * p && y.len() >= p && cm.len() >= n);
        let mut p0 = 0;
        while p0 < p {
            match ((p - p0).div_ceil(8), p - p0 < 32 && !(p - p0).is_multiple_of(8)) {
                (1, false) => fwd_group::<1, false>(st, c, b, cm, a, y, p0),
                (1, true) => fwd_group::<1, true>(st, c, b, cm, a, y, p0),
                (2, false) => fwd_group::<2, false>(st, c, b, cm, a, y, p0),
                (2, true) => fwd_group::<2, true>(st, c, b, cm, a, y, p0),
                (3, false) => fwd_group::<3, false>(st, c, b, cm, a, y, p0),
                (3, true) => fwd_group::<3, true>(st, c, b, cm, a, y, p0),
                (_, false) => fwd_group::<4, false>(st, c, b, cm, a, y, p0),
                (_, true) => fwd_group::<4, true>(st, c, b, cm, a, y, p0),
            }
            p0 += 32;
        }
    }

    /// Columns `p0 .. p0 + 8·NV` (masked at P) of every row of `st`.
    #[inline(always)]
    unsafe fn fwd_group<const NV: usize, const EDGE: bool>(st: &mut [f32], c: &[f32], b: &[f32], cm: &[f32], a: f32, y: &mut [f32], p0: usize) {
        let p = c.len();
        let m = masks::<NV>(p, p0);
        let av = _mm256_set1_ps(a);
        let cv: [__m256; NV] = std::array::from_fn(|v| load::<NV, EDGE>(c.as_ptr().add(p0 + 8 * v), &m, v));
        let mut yv = [_mm256_setzero_ps(); NV];
        let sp = st.as_mut_ptr();
        for (j, (&bj, &cj)) in b.iter().zip(cm).enumerate() {
            let (bb, cc) = (_mm256_set1_ps(bj), _mm256_set1_ps(cj));
            let row = sp.add(j * p + p0);
            for v in 0..NV {
                let e = load::<NV, EDGE>(row.add(8 * v), &m, v);
                let e = _mm256_fmadd_ps(cv[v], bb, _mm256_mul_ps(av, e));
                store::<NV, EDGE>(row.add(8 * v), &m, v, e);
                yv[v] = _mm256_fmadd_ps(cc, e, yv[v]);
            }
        }
        for v in 0..NV {
            store::<NV, EDGE>(y.as_mut_ptr().add(p0 + 8 * v), &m, v, yv[v]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bwd(hp: &[f32], dh: &mut [f32], t: &TokIn<f32>, gb: &mut [f32], gc: &mut [f32], e: &mut [f32], scratch: &mut [f32]) -> f32 {
        let (n, p) = (t.b.len(), t.x.len());
        assert!(hp.len() >= n * p && dh.len() >= n * p && t.c.len() >= n && t.dy.len() >= p);
        assert!(gb.len() >= n && gc.len() >= n && e.len() >= p && scratch.len() >= 8 * p);
        // One `da` accumulator per vector of a group: a single one would chain every FMA of a row.
        let mut da = [_mm256_setzero_ps(); 2];
        let mut j0 = 0;
        while j0 < n {
            let first = j0 == 0;
            da = match ((n - j0).div_ceil(8), n - j0 < 16 && !(n - j0).is_multiple_of(8)) {
                (1, false) => bwd_group::<1, false>(hp, dh, t, gb, gc, scratch, j0, first, da),
                (1, true) => bwd_group::<1, true>(hp, dh, t, gb, gc, scratch, j0, first, da),
                (_, false) => bwd_group::<2, false>(hp, dh, t, gb, gc, scratch, j0, first, da),
                (_, true) => bwd_group::<2, true>(hp, dh, t, gb, gc, scratch, j0, first, da),
            };
            j0 += 16;
        }
        for (c, ec) in e[..p].iter_mut().enumerate() {
            *ec = total(_mm256_loadu_ps(scratch.as_ptr().add(8 * c)));
        }
        total(_mm256_add_ps(da[0], da[1]))
    }

    /// Columns `j0 .. j0 + 8·NV` (masked at N) of every row; the rows' `dh·B` partial sums go to
    /// `scratch [P,8]` (stored when `first`, added otherwise).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn bwd_group<const NV: usize, const EDGE: bool>(hp: &[f32], dh: &mut [f32], t: &TokIn<f32>, gb: &mut [f32], gc: &mut [f32], scratch: &mut [f32], j0: usize, first: bool, mut da: [__m256; 2]) -> [__m256; 2] {
        let n = t.b.len();
        let m = masks::<NV>(n, j0);
        let a = _mm256_set1_ps(t.a);
        let bv: [__m256; NV] = std::array::from_fn(|v| load::<NV, EDGE>(t.b.as_ptr().add(j0 + 8 * v), &m, v));
        let cv: [__m256; NV] = std::array::from_fn(|v| load::<NV, EDGE>(t.c.as_ptr().add(j0 + 8 * v), &m, v));
        let (mut gbv, mut gcv) = ([_mm256_setzero_ps(); NV], [_mm256_setzero_ps(); NV]);
        let (hpp, dhp, sp) = (hp.as_ptr(), dh.as_mut_ptr(), scratch.as_mut_ptr());
        for (c, (&xc, &dyc)) in t.x.iter().zip(t.dy).enumerate() {
            let (dxc, dyc) = (_mm256_set1_ps(t.dt * xc), _mm256_set1_ps(dyc));
            let mut ev = if first { _mm256_setzero_ps() } else { _mm256_loadu_ps(sp.add(8 * c)) };
            for v in 0..NV {
                let off = c * n + j0 + 8 * v;
                let h = load::<NV, EDGE>(hpp.add(off), &m, v);
                let ht = _mm256_fmadd_ps(dxc, bv[v], _mm256_mul_ps(a, h));
                gcv[v] = _mm256_fmadd_ps(dyc, ht, gcv[v]);
                let g = _mm256_fmadd_ps(dyc, cv[v], load::<NV, EDGE>(dhp.add(off), &m, v));
                ev = _mm256_fmadd_ps(g, bv[v], ev);
                gbv[v] = _mm256_fmadd_ps(dxc, g, gbv[v]);
                da[v] = _mm256_fmadd_ps(g, h, da[v]);
                store::<NV, EDGE>(dhp.add(off), &m, v, _mm256_mul_ps(a, g));
            }
            _mm256_storeu_ps(sp.add(8 * c), ev);
        }
        for v in 0..NV {
            store::<NV, EDGE>(gb.as_mut_ptr().add(j0 + 8 * v), &m, v, gbv[v]);
            store::<NV, EDGE>(gc.as_mut_ptr().add(j0 + 8 * v), &m, v, gcv[v]);
        }
        da
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::rand_vec as vals;

    fn close(name: &str, got: &[f32], want: &[f64]) {
        crate::testing::assert_close_f32(name, got, want, 1e-4);
    }

    /// Each intrinsic f32 form present on this CPU (AVX-512, AVX2) against the generic form in
    /// f64, forward and backward, with column edges (N, P not multiples of 8 or 16) and several
    /// groups per row.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn intrinsic_forms_match_generic_f64() {
        type Fwd = unsafe fn(&mut [f32], &[f32], &[f32], &[f32], f32, &mut [f32]);
        type Bwd = unsafe fn(&[f32], &mut [f32], &TokIn<f32>, &mut [f32], &mut [f32], &mut [f32], &mut [f32]) -> f32;
        let forms: [(&str, bool, Fwd, Bwd); 2] = [
            ("AVX-512", is_x86_feature_detected!("avx512f"), x86::fwd, x86::bwd),
            ("AVX2", is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"), x86_avx2::fwd, x86_avx2::bwd),
        ];
        let f32v = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        for (name, present, simd_fwd, simd_bwd) in forms {
            if !present {
                eprintln!("intrinsic_forms_match_generic_f64: no {name} here, skipped");
                continue;
            }
            for (n, p) in [(16usize, 32usize), (5, 7), (37, 70), (64, 9), (24, 40), (13, 35)] {
                let (st, c, b, cm) = (vals(n * p, 1), vals(p, 2), vals(n, 3), vals(n, 4));
                let a = 0.9;
                let (mut st64, mut y64) = (st.clone(), vec![0f64; p]);
                fwd(&mut st64, &c, &b, &cm, a, &mut y64);
                let (mut st32, mut y32) = (f32v(&st), vec![0f32; p]);
                // SAFETY: the ISA was checked above; the slices have the asserted lengths.
                unsafe { simd_fwd(&mut st32, &f32v(&c), &f32v(&b), &f32v(&cm), a as f32, &mut y32) };
                close(&format!("{name} fwd st n{n} p{p}"), &st32, &st64);
                close(&format!("{name} fwd y n{n} p{p}"), &y32, &y64);

                let (hp, dh, x, dy) = (vals(n * p, 5), vals(n * p, 6), vals(p, 7), vals(p, 8));
                let t64 = TokIn { x: &x, dt: 0.3, b: &b, c: &cm, a, dy: &dy };
                let (mut dh64, mut gb64, mut gc64, mut e64, mut s64) = (dh.clone(), vec![0f64; n], vec![0f64; n], vec![0f64; p], vec![0f64; 16 * p]);
                let da64 = bwd(&hp, &mut dh64, &t64, &mut gb64, &mut gc64, &mut e64, &mut s64);
                let (x32, b32, c32, dy32) = (f32v(&x), f32v(&b), f32v(&cm), f32v(&dy));
                let t32 = TokIn { x: &x32, dt: 0.3, b: &b32, c: &c32, a: a as f32, dy: &dy32 };
                let (mut dh32, mut gb32, mut gc32, mut e32, mut s32) = (f32v(&dh), vec![0f32; n], vec![0f32; n], vec![0f32; p], vec![7f32; 16 * p]);
                // SAFETY: as above.
                let da32 = unsafe { simd_bwd(&f32v(&hp), &mut dh32, &t32, &mut gb32, &mut gc32, &mut e32, &mut s32) };
                close(&format!("{name} bwd dh n{n} p{p}"), &dh32, &dh64);
                close(&format!("{name} bwd gb n{n} p{p}"), &gb32, &gb64);
                close(&format!("{name} bwd gc n{n} p{p}"), &gc32, &gc64);
                close(&format!("{name} bwd e n{n} p{p}"), &e32, &e64);
                close(&format!("{name} bwd da n{n} p{p}"), &[da32], &[da64]);
            }
        }
    }
}
