//! The per-token steps of the fused gated delta rule ([`super::gdr_fused`], Gated DeltaNet: Yang,
//! Kautz & Hatamizadeh 2024, arXiv:2412.06464): [`step`] (the forward token, also the
//! backward's recomputation) and [`bwd`] (one token of the backward), equations in the module doc
//! of [`super::gdr_fused`]. The state S is `[K,V]`, walked row by row (rows of V).
//!
//! Each has a generic form (f32/f64; `dot`/`axpy` over the rows) and, for f32 with V ≤ 64 on CPUs
//! with AVX-512F, an intrinsic form that keeps every V-vector of the step (r, o, u, dp, du and
//! the `dg` accumulator: at most 4 zmm each) in registers across the K rows, fuses the
//! multiply-adds (FMA) and masks the column edge; on CPUs with AVX2+FMA but no AVX-512, the same
//! form in up to 8 ymm vectors per row ([`x86_avx2`]; some spill at V > 32). Each sums in a fixed order that depends only on
//! the shapes, never on the thread count.

use super::attn_fused::Elem;
use super::simd::{axpy, dot};
use super::zmm_row::{f32s, f32s_mut};

/// One token's inputs for one head: q, k rows `[K]`, v row `[V]`, g, β.
pub(super) struct Tok<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub g: T,
    pub beta: T,
}

/// Advances `s` `[K×V]` by one token. Leaves the decayed state S_a in `s_a` when given, the
/// residual `r = v − S_aᵀk` in `r`, and writes `o = Sᵀq·scale` when given.
#[inline(always)]
pub(super) fn step<T: Elem>(s: &mut [T], x: &Tok<T>, scale: T, r: &mut [T], s_a: Option<&mut [T]>, o: Option<&mut [T]>) {
    let dv = x.v.len();
    #[cfg(target_arch = "x86_64")]
    if dv <= 64 && super::zmm_row::f32_avx512::<T>() {
        let x32 = Tok { q: f32s(x.q), k: f32s(x.k), v: f32s(x.v), g: x.g.to_f64() as f32, beta: x.beta.to_f64() as f32 };
        // SAFETY: T is f32 (checked), so the casts only rename the element type; AVX-512F is
        // present (checked).
        unsafe { x86::step(f32s_mut(s), &x32, scale.to_f64() as f32, f32s_mut(r), s_a.map(f32s_mut), o.map(f32s_mut)) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if dv <= 64 && super::zmm_row::f32_avx2::<T>() {
        let x32 = Tok { q: f32s(x.q), k: f32s(x.k), v: f32s(x.v), g: x.g.to_f64() as f32, beta: x.beta.to_f64() as f32 };
        // SAFETY: T is f32 (checked), so the casts only rename the element type; AVX2 and FMA
        // are present (checked).
        unsafe { x86_avx2::step(f32s_mut(s), &x32, scale.to_f64() as f32, f32s_mut(r), s_a.map(f32s_mut), o.map(f32s_mut)) };
        return;
    }
    let a = x.g.exp();
    r.copy_from_slice(x.v);
    for (row, &ki) in s.chunks_exact_mut(dv).zip(x.k) {
        row.iter_mut().for_each(|e| *e *= a);
        axpy(r, T::zero() - ki, row);
    }
    if let Some(sa) = s_a {
        sa.copy_from_slice(s);
    }
    let beta = x.beta;
    match o {
        Some(o) => {
            o.fill(T::zero());
            for ((row, &ki), &qi) in s.chunks_exact_mut(dv).zip(x.k).zip(x.q) {
                let c = ki * beta;
                row.iter_mut().zip(r.iter()).for_each(|(e, &rj)| *e += c * rj);
                axpy(o, qi * scale, row);
            }
        }
        None => {
            for (row, &ki) in s.chunks_exact_mut(dv).zip(x.k) {
                let c = ki * beta;
                row.iter_mut().zip(r.iter()).for_each(|(e, &rj)| *e += c * rj);
            }
        }
    }
}

/// One token of the backward: `s_a` `[K,V]` and `r` `[V]` recomputed by [`step`], `d_o` `[V]`
/// the output's gradient, `ds` `[K,V]` the state's gradient (after the token on entry, before it
/// on return). Writes `gx = [dq | dk | dg | dβ]` `[2K+2]` and `gv = dv` `[V]`; `u`, `du` are
/// scratch rows `[V]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn bwd<T: Elem>(x: &Tok<T>, s_a: &[T], r: &[T], d_o: &[T], scale: T, ds: &mut [T], gx: &mut [T], gv: &mut [T], u: &mut [T], du: &mut [T]) {
    let (dk_, dv_) = (x.k.len(), x.v.len());
    #[cfg(target_arch = "x86_64")]
    if dv_ <= 64 && super::zmm_row::f32_avx512::<T>() {
        let x32 = Tok { q: f32s(x.q), k: f32s(x.k), v: f32s(x.v), g: x.g.to_f64() as f32, beta: x.beta.to_f64() as f32 };
        // SAFETY: as in `step`.
        unsafe { x86::bwd(&x32, f32s(s_a), f32s(r), f32s(d_o), scale.to_f64() as f32, f32s_mut(ds), f32s_mut(gx), f32s_mut(gv)) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if dv_ <= 64 && super::zmm_row::f32_avx2::<T>() {
        let x32 = Tok { q: f32s(x.q), k: f32s(x.k), v: f32s(x.v), g: x.g.to_f64() as f32, beta: x.beta.to_f64() as f32 };
        // SAFETY: as in `step`.
        unsafe { x86_avx2::bwd(&x32, f32s(s_a), f32s(r), f32s(d_o), scale.to_f64() as f32, f32s_mut(ds), f32s_mut(gx), f32s_mut(gv)) };
        return;
    }
    u.iter_mut().zip(r).for_each(|(u, &r)| *u = x.beta * r);
    let u_do = dot(u, d_o);
    du.fill(T::zero());
    // Pass 1: dq, dS += scale·q doᵀ, du = dSᵀk, dk = dS u.
    for c in 0..dk_ {
        let sa_row = &s_a[c * dv_..(c + 1) * dv_];
        let ds_row = &mut ds[c * dv_..(c + 1) * dv_];
        gx[c] = scale * (dot(sa_row, d_o) + x.k[c] * u_do);
        axpy(ds_row, scale * x.q[c], d_o);
        axpy(du, x.k[c], ds_row);
        gx[dk_ + c] = dot(ds_row, u);
    }
    let dbeta = dot(du, r);
    gv.iter_mut().zip(du.iter()).for_each(|(g, &v)| *g = x.beta * v);
    // dp = −β du, reusing `du`.
    du.iter_mut().for_each(|v| *v = T::zero() - x.beta * *v);
    // Pass 2: dS += k dpᵀ, dk += S_a dp, dg = ⟨dS, S_a⟩, dS ← exp(g)·dS.
    let a = x.g.exp();
    let mut dg = T::zero();
    for c in 0..dk_ {
        let sa_row = &s_a[c * dv_..(c + 1) * dv_];
        let ds_row = &mut ds[c * dv_..(c + 1) * dv_];
        axpy(ds_row, x.k[c], du);
        gx[dk_ + c] += dot(sa_row, du);
        dg += dot(ds_row, sa_row);
        ds_row.iter_mut().for_each(|e| *e *= a);
    }
    gx[2 * dk_] = dg;
    gx[2 * dk_ + 1] = dbeta;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Tok;
    use crate::ops::zmm_row::x86::Row;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn step(s: &mut [f32], x: &Tok<f32>, scale: f32, r: &mut [f32], s_a: Option<&mut [f32]>, o: Option<&mut [f32]>) {
        let (kd, vd) = (x.k.len(), x.v.len());
        assert!(s.len() >= kd * vd && r.len() >= vd && x.q.len() >= kd);
        assert!(s_a.as_ref().is_none_or(|sa| sa.len() >= kd * vd) && o.as_ref().is_none_or(|o| o.len() >= vd));
        let rw = Row::new(vd);
        let a = _mm512_set1_ps(crate::ops::simd::exp_f32(x.g));
        let sp = s.as_mut_ptr();
        let sap = s_a.map(|sa| sa.as_mut_ptr());
        let mut rv = rw.load(x.v.as_ptr());
        for (c, &kc) in x.k.iter().enumerate() {
            let row = sp.add(c * vd);
            let mut e = rw.load(row);
            let kc = _mm512_set1_ps(kc);
            for j in 0..rw.nv {
                e[j] = _mm512_mul_ps(a, e[j]);
                rv[j] = _mm512_fnmadd_ps(kc, e[j], rv[j]);
            }
            rw.store(row, &e);
            if let Some(sap) = sap {
                rw.store(sap.add(c * vd), &e);
            }
        }
        rw.store(r.as_mut_ptr(), &rv);
        let mut ov = [_mm512_setzero_ps(); 4];
        for (c, (&kc, &qc)) in x.k.iter().zip(x.q).enumerate() {
            let row = sp.add(c * vd);
            let mut e = rw.load(row);
            let (kb, qs) = (_mm512_set1_ps(kc * x.beta), _mm512_set1_ps(qc * scale));
            for j in 0..rw.nv {
                e[j] = _mm512_fmadd_ps(kb, rv[j], e[j]);
                ov[j] = _mm512_fmadd_ps(qs, e[j], ov[j]);
            }
            rw.store(row, &e);
        }
        if let Some(o) = o {
            rw.store(o.as_mut_ptr(), &ov);
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn bwd(x: &Tok<f32>, s_a: &[f32], r: &[f32], d_o: &[f32], scale: f32, ds: &mut [f32], gx: &mut [f32], gv: &mut [f32]) {
        let (kd, vd) = (x.k.len(), x.v.len());
        assert!(s_a.len() >= kd * vd && ds.len() >= kd * vd && r.len() >= vd && d_o.len() >= vd);
        assert!(gx.len() >= 2 * kd + 2 && gv.len() >= vd && x.q.len() >= kd);
        let rw = Row::new(vd);
        let beta = _mm512_set1_ps(x.beta);
        let (rv, dov) = (rw.load(r.as_ptr()), rw.load(d_o.as_ptr()));
        let u: [__m512; 4] = std::array::from_fn(|j| _mm512_mul_ps(beta, rv[j]));
        let u_do = rw.dot(&u, &dov);
        let (sap, dsp) = (s_a.as_ptr(), ds.as_mut_ptr());
        // Pass 1: dq, dS += scale·q doᵀ, du = dSᵀk, dk = dS u.
        let mut du = [_mm512_setzero_ps(); 4];
        for c in 0..kd {
            let sa = rw.load(sap.add(c * vd));
            let mut d = rw.load(dsp.add(c * vd));
            gx[c] = scale * (rw.dot(&sa, &dov) + x.k[c] * u_do);
            let (qs, kc) = (_mm512_set1_ps(scale * x.q[c]), _mm512_set1_ps(x.k[c]));
            for j in 0..rw.nv {
                d[j] = _mm512_fmadd_ps(qs, dov[j], d[j]);
                du[j] = _mm512_fmadd_ps(kc, d[j], du[j]);
            }
            gx[kd + c] = rw.dot(&d, &u);
            rw.store(dsp.add(c * vd), &d);
        }
        gx[2 * kd + 1] = rw.dot(&du, &rv);
        let gvv: [__m512; 4] = std::array::from_fn(|j| _mm512_mul_ps(beta, du[j]));
        rw.store(gv.as_mut_ptr(), &gvv);
        let dp: [__m512; 4] = std::array::from_fn(|j| _mm512_sub_ps(_mm512_setzero_ps(), gvv[j]));
        // Pass 2: dS += k dpᵀ, dk += S_a dp, dg = ⟨dS, S_a⟩, dS ← exp(g)·dS.
        let a = _mm512_set1_ps(crate::ops::simd::exp_f32(x.g));
        let mut dg = [_mm512_setzero_ps(); 4];
        for c in 0..kd {
            let sa = rw.load(sap.add(c * vd));
            let mut d = rw.load(dsp.add(c * vd));
            let kc = _mm512_set1_ps(x.k[c]);
            for j in 0..rw.nv {
                d[j] = _mm512_fmadd_ps(kc, dp[j], d[j]);
                dg[j] = _mm512_fmadd_ps(d[j], sa[j], dg[j]);
                d[j] = _mm512_mul_ps(a, d[j]);
            }
            gx[kd + c] += rw.dot(&sa, &dp);
            rw.store(dsp.add(c * vd), &d);
        }
        gx[2 * kd] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(dg[0], dg[1]), _mm512_add_ps(dg[2], dg[3])));
    }
}

/// The intrinsic forms in AVX2 + FMA: a V-row is `NV ≤ 8` ymm vectors (a const parameter, so the
/// row arrays can live in registers; at V > 32 some spill to L1), `vmaskmovps` only on the last
/// vector of a row whose V is not a multiple of 8 (AMD runs masked stores far slower).
#[cfg(target_arch = "x86_64")]
mod x86_avx2 {
    use super::Tok;
    use crate::ops::zmm_row::x86_avx2::{lane_mask, total};
    use std::arch::x86_64::*;

    /// A row of `8·(NV−1) < V ≤ 8·NV` columns, masked at its end when `EDGE`.
    #[derive(Clone, Copy)]
    struct Row<const NV: usize, const EDGE: bool> {
        m: __m256i,
    }

    impl<const NV: usize, const EDGE: bool> Row<NV, EDGE> {
        #[inline(always)]
        unsafe fn new(v: usize) -> Self {
            Self { m: lane_mask((v - 8 * (NV - 1)) as i32) }
        }
        #[inline(always)]
        unsafe fn load(&self, p: *const f32) -> [__m256; NV] {
            std::array::from_fn(|j| if EDGE && j + 1 == NV { _mm256_maskload_ps(p.add(8 * j), self.m) } else { _mm256_loadu_ps(p.add(8 * j)) })
        }
        #[inline(always)]
        unsafe fn store(&self, p: *mut f32, x: &[__m256; NV]) {
            for (j, &v) in x.iter().enumerate() {
                if EDGE && j + 1 == NV {
                    _mm256_maskstore_ps(p.add(8 * j), self.m, v);
                } else {
                    _mm256_storeu_ps(p.add(8 * j), v);
                }
            }
        }
        /// `Σ a·b` over the vectors, then across the lanes (fixed order).
        #[inline(always)]
        unsafe fn dot(&self, a: &[__m256; NV], b: &[__m256; NV]) -> f32 {
            let mut acc = _mm256_mul_ps(a[0], b[0]);
            for j in 1..NV {
                acc = _mm256_fmadd_ps(a[j], b[j], acc);
            }
            total(acc)
        }
    }

    /// Calls `$f::<NV, EDGE>` for a row of `$v ≤ 64` columns.
    macro_rules! dispatch {
        ($v:expr, $f:ident ( $($arg:expr),* )) => {{
            let v: usize = $v;
            match (v.div_ceil(8), v % 8 != 0) {
                (1, false) => $f::<1, false>($($arg),*), (1, true) => $f::<1, true>($($arg),*),
                (2, false) => $f::<2, false>($($arg),*), (2, true) => $f::<2, true>($($arg),*),
                (3, false) => $f::<3, false>($($arg),*), (3, true) => $f::<3, true>($($arg),*),
                (4, false) => $f::<4, false>($($arg),*), (4, true) => $f::<4, true>($($arg),*),
                (5, false) => $f::<5, false>($($arg),*), (5, true) => $f::<5, true>($($arg),*),
                (6, false) => $f::<6, false>($($arg),*), (6, true) => $f::<6, true>($($arg),*),
                (7, false) => $f::<7, false>($($arg),*), (7, true) => $f::<7, true>($($arg),*),
                (_, false) => $f::<8, false>($($arg),*), (_, true) => $f::<8, true>($($arg),*),
            }
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn step(s: &mut [f32], x: &Tok<f32>, scale: f32, r: &mut [f32], s_a: Option<&mut [f32]>, o: Option<&mut [f32]>) {
        let (kd, vd) = (x.k.len(), x.v.len());
        assert!((1..=64).contains(&vd) && s.len() >= kd * vd && r.len() >= vd && x.q.len() >= kd);
        assert!(s_a.as_ref().is_none_or(|sa| sa.len() >= kd * vd) && o.as_ref().is_none_or(|o| o.len() >= vd));
        dispatch!(vd, step_nv(s, x, scale, r, s_a, o))
    }

    #[inline(always)]
    unsafe fn step_nv<const NV: usize, const EDGE: bool>(s: &mut [f32], x: &Tok<f32>, scale: f32, r: &mut [f32], s_a: Option<&mut [f32]>, o: Option<&mut [f32]>) {
        let vd = x.v.len();
        let rw = Row::<NV, EDGE>::new(vd);
        let a = _mm256_set1_ps(crate::ops::simd::exp_f32(x.g));
        let sp = s.as_mut_ptr();
        let sap = s_a.map(|sa| sa.as_mut_ptr());
        let mut rv = rw.load(x.v.as_ptr());
        for (c, &kc) in x.k.iter().enumerate() {
            let row = sp.add(c * vd);
            let mut e = rw.load(row);
            let kc = _mm256_set1_ps(kc);
            for j in 0..NV {
                e[j] = _mm256_mul_ps(a, e[j]);
                rv[j] = _mm256_fnmadd_ps(kc, e[j], rv[j]);
            }
            rw.store(row, &e);
            if let Some(sap) = sap {
                rw.store(sap.add(c * vd), &e);
            }
        }
        rw.store(r.as_mut_ptr(), &rv);
        let mut ov = [_mm256_setzero_ps(); NV];
        for (c, (&kc, &qc)) in x.k.iter().zip(x.q).enumerate() {
            let row = sp.add(c * vd);
            let mut e = rw.load(row);
            let (kb, qs) = (_mm256_set1_ps(kc * x.beta), _mm256_set1_ps(qc * scale));
            for j in 0..NV {
                e[j] = _mm256_fmadd_ps(kb, rv[j], e[j]);
                ov[j] = _mm256_fmadd_ps(qs, e[j], ov[j]);
            }
            rw.store(row, &e);
        }
        if let Some(o) = o {
            rw.store(o.as_mut_ptr(), &ov);
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bwd(x: &Tok<f32>, s_a: &[f32], r: &[f32], d_o: &[f32], scale: f32, ds: &mut [f32], gx: &mut [f32], gv: &mut [f32]) {
        let (kd, vd) = (x.k.len(), x.v.len());
        assert!((1..=64).contains(&vd) && s_a.len() >= kd * vd && ds.len() >= kd * vd && r.len() >= vd && d_o.len() >= vd);
        assert!(gx.len() >= 2 * kd + 2 && gv.len() >= vd && x.q.len() >= kd);
        dispatch!(vd, bwd_nv(x, s_a, r, d_o, scale, ds, gx, gv))
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn bwd_nv<const NV: usize, const EDGE: bool>(x: &Tok<f32>, s_a: &[f32], r: &[f32], d_o: &[f32], scale: f32, ds: &mut [f32], gx: &mut [f32], gv: &mut [f32]) {
        let (kd, vd) = (x.k.len(), x.v.len());
        let rw = Row::<NV, EDGE>::new(vd);
        let beta = _mm256_set1_ps(x.beta);
        let (rv, dov) = (rw.load(r.as_ptr()), rw.load(d_o.as_ptr()));
        let u: [__m256; NV] = std::array::from_fn(|j| _mm256_mul_ps(beta, rv[j]));
        let u_do = rw.dot(&u, &dov);
        let (sap, dsp) = (s_a.as_ptr(), ds.as_mut_ptr());
        // Pass 1: dq, dS += scale·q doᵀ, du = dSᵀk, dk = dS u.
        let mut du = [_mm256_setzero_ps(); NV];
        for c in 0..kd {
            let sa = rw.load(sap.add(c * vd));
            let mut d = rw.load(dsp.add(c * vd));
            gx[c] = scale * (rw.dot(&sa, &dov) + x.k[c] * u_do);
            let (qs, kc) = (_mm256_set1_ps(scale * x.q[c]), _mm256_set1_ps(x.k[c]));
            for j in 0..NV {
                d[j] = _mm256_fmadd_ps(qs, dov[j], d[j]);
                du[j] = _mm256_fmadd_ps(kc, d[j], du[j]);
            }
            gx[kd + c] = rw.dot(&d, &u);
            rw.store(dsp.add(c * vd), &d);
        }
        gx[2 * kd + 1] = rw.dot(&du, &rv);
        let gvv: [__m256; NV] = std::array::from_fn(|j| _mm256_mul_ps(beta, du[j]));
        rw.store(gv.as_mut_ptr(), &gvv);
        let dp: [__m256; NV] = std::array::from_fn(|j| _mm256_sub_ps(_mm256_setzero_ps(), gvv[j]));
        // Pass 2: dS += k dpᵀ, dk += S_a dp, dg = ⟨dS, S_a⟩, dS ← exp(g)·dS.
        let a = _mm256_set1_ps(crate::ops::simd::exp_f32(x.g));
        let mut dg = [_mm256_setzero_ps(); NV];
        for c in 0..kd {
            let sa = rw.load(sap.add(c * vd));
            let mut d = rw.load(dsp.add(c * vd));
            let kc = _mm256_set1_ps(x.k[c]);
            for j in 0..NV {
                d[j] = _mm256_fmadd_ps(kc, dp[j], d[j]);
                dg[j] = _mm256_fmadd_ps(d[j], sa[j], dg[j]);
                d[j] = _mm256_mul_ps(a, d[j]);
            }
            gx[kd + c] += rw.dot(&sa, &dp);
            rw.store(dsp.add(c * vd), &d);
        }
        let mut acc = dg[0];
        for v in &dg[1..] {
            acc = _mm256_add_ps(acc, *v);
        }
        gx[2 * kd] = total(acc);
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
    /// f64: the step (state, decayed state, residual, output) and the backward token (dS, dq,
    /// dk, dg, dβ, dv), for V with and without a vector tail, up to 64.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn intrinsic_forms_match_generic_f64() {
        type Step = unsafe fn(&mut [f32], &Tok<f32>, f32, &mut [f32], Option<&mut [f32]>, Option<&mut [f32]>);
        type Bwd = unsafe fn(&Tok<f32>, &[f32], &[f32], &[f32], f32, &mut [f32], &mut [f32], &mut [f32]);
        let forms: [(&str, bool, Step, Bwd); 2] = [
            ("AVX-512", is_x86_feature_detected!("avx512f"), x86::step, x86::bwd),
            ("AVX2", is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"), x86_avx2::step, x86_avx2::bwd),
        ];
        let f32v = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        for (name, present, simd_step, simd_bwd) in forms {
            if !present {
                eprintln!("intrinsic_forms_match_generic_f64: no {name} here, skipped");
                continue;
            }
            for (kd, vd) in [(24usize, 48usize), (5, 7), (16, 64), (9, 33), (3, 8)] {
                let (q, k, v) = (vals(kd, 1), vals(kd, 2), vals(vd, 3));
                let (g, beta, scale) = (-0.2, 0.7, 0.4);
                let x64 = Tok { q: &q, k: &k, v: &v, g, beta };
                let (q32, k32, v32) = (f32v(&q), f32v(&k), f32v(&v));
                let x32 = Tok { q: &q32, k: &k32, v: &v32, g: g as f32, beta: beta as f32 };
                let s0 = vals(kd * vd, 4);
                let (mut s64, mut r64, mut sa64, mut o64) = (s0.clone(), vec![0f64; vd], vec![0f64; kd * vd], vec![0f64; vd]);
                step(&mut s64, &x64, scale, &mut r64, Some(&mut sa64), Some(&mut o64));
                let (mut s32, mut r32, mut sa32, mut o32) = (f32v(&s0), vec![0f32; vd], vec![0f32; kd * vd], vec![0f32; vd]);
                // SAFETY: the ISA was checked above; the slices have the asserted lengths.
                unsafe { simd_step(&mut s32, &x32, scale as f32, &mut r32, Some(&mut sa32), Some(&mut o32)) };
                close(&format!("{name} step s k{kd} v{vd}"), &s32, &s64);
                close(&format!("{name} step s_a k{kd} v{vd}"), &sa32, &sa64);
                close(&format!("{name} step r k{kd} v{vd}"), &r32, &r64);
                close(&format!("{name} step o k{kd} v{vd}"), &o32, &o64);

                let (d_o, ds0) = (vals(vd, 5), vals(kd * vd, 6));
                let (mut ds64, mut gx64, mut gv64, mut u, mut du) = (ds0.clone(), vec![0f64; 2 * kd + 2], vec![0f64; vd], vec![0f64; vd], vec![0f64; vd]);
                bwd(&x64, &sa64, &r64, &d_o, scale, &mut ds64, &mut gx64, &mut gv64, &mut u, &mut du);
                let (mut ds32, mut gx32, mut gv32) = (f32v(&ds0), vec![0f32; 2 * kd + 2], vec![0f32; vd]);
                // SAFETY: as above.
                unsafe { simd_bwd(&x32, &f32v(&sa64), &f32v(&r64), &f32v(&d_o), scale as f32, &mut ds32, &mut gx32, &mut gv32) };
                close(&format!("{name} bwd ds k{kd} v{vd}"), &ds32, &ds64);
                close(&format!("{name} bwd gx k{kd} v{vd}"), &gx32, &gx64);
                close(&format!("{name} bwd gv k{kd} v{vd}"), &gv32, &gv64);
            }
        }
    }
}

