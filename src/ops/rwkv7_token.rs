//! The per-token steps of the fused WKV-7 kernel ([`super::rwkv7_fused`], RWKV-7 "Goose": Peng
//! et al. 2025, arXiv:2503.14456): [`step`] (the forward token, also the backward's
//! recomputation) and [`bwd`] (one backward token), equations in the module doc of
//! [`super::rwkv7_fused`]. The state S is `[V,K]`, walked row by row (rows of K).
//!
//! Each has a generic form (f32/f64; `dot`/`axpy` over the rows) and, for f32 with K ≤ 64 on CPUs
//! with AVX-512F, an intrinsic form: the five `[K]` gradient accumulators of [`bwd`] (dr, dw,
//! dk, da, db: at most 4 zmm each) stay in registers across the V rows, the multiply-adds are
//! fused (FMA) and the column edge is masked. Both sum in a fixed order that depends only on the
//! shapes, never on the thread count.

use super::attn_fused::Elem;
use super::simd::{axpy, dot};
use super::zmm_row::{f32s, f32s_mut};

/// One token of one head: r, w, k, a, b rows `[K]`, v row `[V]`.
pub(super) struct Tok<'a, T> {
    pub r: &'a [T],
    pub w: &'a [T],
    pub k: &'a [T],
    pub a: &'a [T],
    pub b: &'a [T],
    pub v: &'a [T],
}

impl<'a, T: candle_core::WithDType> Tok<'a, T> {
    #[cfg(target_arch = "x86_64")]
    fn f32(&self) -> Tok<'a, f32> {
        Tok { r: f32s(self.r), w: f32s(self.w), k: f32s(self.k), a: f32s(self.a), b: f32s(self.b), v: f32s(self.v) }
    }
}

/// S[i,:] ← S[i,:]⊙w + (S[i,:]·a) b + v_i k for every row; writes `o_i = S[i,:]·r` if given.
#[inline(always)]
pub(super) fn step<T: Elem>(s: &mut [T], x: &Tok<T>, mut o: Option<&mut [T]>) {
    let dk = x.k.len();
    #[cfg(target_arch = "x86_64")]
    if dk <= 64 && super::zmm_row::f32_avx512::<T>() {
        // SAFETY: T is f32 (checked), so the casts only rename the element type; AVX-512F is
        // present (checked).
        unsafe { x86::step(f32s_mut(s), &x.f32(), o.map(f32s_mut)) };
        return;
    }
    for (i, row) in s.chunks_exact_mut(dk).enumerate() {
        let sa = dot(row, x.a);
        let vi = x.v[i];
        row.iter_mut().zip(x.w).zip(x.b.iter().zip(x.k)).for_each(|((e, &w), (&b, &k))| *e = *e * w + sa * b + vi * k);
        if let Some(o) = o.as_deref_mut() {
            o[i] = dot(row, x.r);
        }
    }
}

/// One backward token over `sp = S_{t−1} [V,K]` and `ds [V,K]` (gradient w.r.t. S_t on entry,
/// w.r.t. S_{t−1} on return), with the output's gradient `d_o [V]`. Writes
/// `gx = [dr | dw | dk | da | db]` `[5K]` and `gv = dv` `[V]`; `st` is a scratch row `[K]`.
#[inline(always)]
pub(super) fn bwd<T: Elem>(sp: &[T], ds: &mut [T], x: &Tok<T>, d_o: &[T], gx: &mut [T], gv: &mut [T], st: &mut [T]) {
    let (dk, dv) = (x.k.len(), x.v.len());
    #[cfg(target_arch = "x86_64")]
    if dk <= 64 && super::zmm_row::f32_avx512::<T>() {
        // SAFETY: as in `step`.
        unsafe { x86::bwd(f32s(sp), f32s_mut(ds), &x.f32(), f32s(d_o), f32s_mut(gx), f32s_mut(gv)) };
        return;
    }
    gx[..5 * dk].iter_mut().for_each(|g| *g = T::zero());
    let (g_r, rest) = gx.split_at_mut(dk);
    let (g_w, rest) = rest.split_at_mut(dk);
    let (g_k, rest) = rest.split_at_mut(dk);
    let (g_a, g_b) = rest.split_at_mut(dk);
    for c in 0..dv {
        let spr = &sp[c * dk..(c + 1) * dk];
        let dsr = &mut ds[c * dk..(c + 1) * dk];
        let sa = dot(spr, x.a);
        let vi = x.v[c];
        st.iter_mut().zip(spr).zip(x.w).zip(x.b.iter().zip(x.k)).for_each(|(((e, &p), &w), (&b, &k))| *e = p * w + sa * b + vi * k);
        let doi = d_o[c];
        axpy(dsr, doi, x.r);
        axpy(g_r, doi, st);
        g_w.iter_mut().zip(dsr.iter()).zip(spr).for_each(|((g, &dsv), &p)| *g += dsv * p);
        let dsa = dot(dsr, x.b);
        axpy(g_b, sa, dsr);
        gv[c] = dot(dsr, x.k);
        axpy(g_k, vi, dsr);
        axpy(g_a, dsa, spr);
        dsr.iter_mut().zip(x.w).zip(x.a).for_each(|((e, &w), &a)| *e = *e * w + dsa * a);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Tok;
    use crate::ops::zmm_row::x86::Row;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn step(s: &mut [f32], x: &Tok<f32>, o: Option<&mut [f32]>) {
        let (dk, dv) = (x.k.len(), x.v.len());
        assert!(s.len() >= dk * dv && [x.r, x.w, x.a, x.b].iter().all(|v| v.len() >= dk));
        assert!(o.as_ref().is_none_or(|o| o.len() >= dv));
        let rw = Row::new(dk);
        let (w, a, b, k) = (rw.load(x.w.as_ptr()), rw.load(x.a.as_ptr()), rw.load(x.b.as_ptr()), rw.load(x.k.as_ptr()));
        let r = rw.load(x.r.as_ptr());
        let sp = s.as_mut_ptr();
        let op = o.map(|o| o.as_mut_ptr());
        for (i, &vi) in x.v.iter().enumerate() {
            let row = sp.add(i * dk);
            let mut e = rw.load(row);
            let sa = _mm512_set1_ps(rw.dot(&e, &a));
            let vi = _mm512_set1_ps(vi);
            for j in 0..rw.nv {
                e[j] = _mm512_fmadd_ps(vi, k[j], _mm512_fmadd_ps(sa, b[j], _mm512_mul_ps(e[j], w[j])));
            }
            rw.store(row, &e);
            if let Some(op) = op {
                *op.add(i) = rw.dot(&e, &r);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn bwd(sp: &[f32], ds: &mut [f32], x: &Tok<f32>, d_o: &[f32], gx: &mut [f32], gv: &mut [f32]) {
        let (dk, dv) = (x.k.len(), x.v.len());
        assert!(sp.len() >= dk * dv && ds.len() >= dk * dv && d_o.len() >= dv && gv.len() >= dv && gx.len() >= 5 * dk);
        assert!([x.r, x.w, x.a, x.b].iter().all(|v| v.len() >= dk));
        let rw = Row::new(dk);
        let z = [_mm512_setzero_ps(); 4];
        let (mut g_r, mut g_w, mut g_k, mut g_a, mut g_b) = (z, z, z, z, z);
        let (spp, dsp) = (sp.as_ptr(), ds.as_mut_ptr());
        let (pr, pw, pk, pa, pb) = (x.r.as_ptr(), x.w.as_ptr(), x.k.as_ptr(), x.a.as_ptr(), x.b.as_ptr());
        for c in 0..dv {
            // The token's rows are reloaded per state row (L1 hits): 20 more live zmm would spill.
            let (a, b) = (rw.load(pa), rw.load(pb));
            let p = rw.load(spp.add(c * dk));
            let mut d = rw.load(dsp.add(c * dk));
            let sa = rw.dot(&p, &a);
            let (sa_v, vi, doi) = (_mm512_set1_ps(sa), _mm512_set1_ps(x.v[c]), _mm512_set1_ps(d_o[c]));
            let (r, w, k) = (rw.load(pr), rw.load(pw), rw.load(pk));
            for j in 0..rw.nv {
                d[j] = _mm512_fmadd_ps(doi, r[j], d[j]);
                let st = _mm512_fmadd_ps(vi, k[j], _mm512_fmadd_ps(sa_v, b[j], _mm512_mul_ps(p[j], w[j])));
                g_r[j] = _mm512_fmadd_ps(doi, st, g_r[j]);
                g_w[j] = _mm512_fmadd_ps(d[j], p[j], g_w[j]);
                g_b[j] = _mm512_fmadd_ps(sa_v, d[j], g_b[j]);
                g_k[j] = _mm512_fmadd_ps(vi, d[j], g_k[j]);
            }
            let dsa = rw.dot(&d, &b);
            gv[c] = rw.dot(&d, &k);
            let dsa_v = _mm512_set1_ps(dsa);
            for j in 0..rw.nv {
                g_a[j] = _mm512_fmadd_ps(dsa_v, p[j], g_a[j]);
                d[j] = _mm512_fmadd_ps(dsa_v, a[j], _mm512_mul_ps(d[j], w[j]));
            }
            rw.store(dsp.add(c * dk), &d);
        }
        let gp = gx.as_mut_ptr();
        for (i, g) in [g_r, g_w, g_k, g_a, g_b].iter().enumerate() {
            rw.store(gp.add(i * dk), g);
        }
    }
}
