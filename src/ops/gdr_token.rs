//! The per-token steps of the fused gated delta rule ([`super::gdr_fused`], Gated DeltaNet: Yang,
//! Kautz & Hatamizadeh 2024, arXiv:2412.06464): [`step`] (the forward token, also the
//! backward's recomputation) and [`bwd`] (one token of the backward), equations in the module doc
//! of [`super::gdr_fused`]. The state S is `[K,V]`, walked row by row (rows of V).
//!
//! Each has a generic form (f32/f64; `dot`/`axpy` over the rows) and, for f32 with V ≤ 64 on CPUs
//! with AVX-512F, an intrinsic form that keeps every V-vector of the step (r, o, u, dp, du and
//! the `dg` accumulator: at most 4 zmm each) in registers across the K rows, fuses the
//! multiply-adds (FMA) and masks the column edge. Both sum in a fixed order that depends only on
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
