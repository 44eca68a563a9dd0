//! Fused CPU kernel for the gated delta rule (Gated DeltaNet; Yang, Kautz & Hatamizadeh 2024,
//! arXiv:2412.06464) with a hand-written backward: same semantics and layouts as
//! [`super::gated_delta_rule`] (`../shared/reference/ops.md` §4), f32 or f64.
//!
//! Algorithm: the token recurrence itself, with state checkpoints (the structure of BlinkDL's
//! RWKV CUDA kernels and of fla's `fused_recurrent` backward), not the chunked WY form. Per token
//! and head (S is K×V, scale = K^-½):
//! ```text
//! S_a = exp(g_t)·S ;  r_t = v_t − S_aᵀk_t ;  u_t = β_t r_t ;  S = S_a + k_t u_tᵀ ;  o_t = Sᵀ q_t·scale
//! ```
//! That is 4KV multiply-adds per token (two passes over a state that stays in L1/L2), against
//! C(3K + 2V) + C²/2 + 3KV for the chunked form (≈ 3.5× more at the presets' K = 24, V = 48,
//! C = 64), and no triangular solve. One rayon task per (batch, head); the tasks use the global
//! rayon pool, i.e. the thread count candle runs with (`RAYON_NUM_THREADS`).
//!
//! Backward: the forward saves the state at the start of every segment of [`SEG`] tokens. The
//! backward walks the segments from last to first, recomputes the segment's decayed states S_a
//! and residuals r_t from its checkpoint, then steps back through the tokens with dS (the
//! gradient w.r.t. the state after token t, initialised with the final state's gradient):
//! ```text
//! dq_t  = scale·(S_a do_t + k_t (u_t·do_t))               (S_t do_t, S_t = S_a + k_t u_tᵀ)
//! dS   += scale·q_t do_tᵀ ;  du = dSᵀk_t ;  dk_t = dS u_t
//! dβ_t  = du·r_t ;  dv_t = β_t du ;  dp = −β_t du
//! dS   += k_t dpᵀ ;  dk_t += S_a dp ;  dg_t = ⟨dS, S_a⟩ ;  dS ← exp(g_t)·dS
//! ```
//! and what is left in dS at t = 0 is the initial state's gradient. Every input gets its exact
//! gradient. The checkpoints stay in the op ([`super::cpu::Stash`], read-only after the forward),
//! so backpropagating the same output twice is correct.
//!
//! Packing (candle custom ops take at most three inputs): input 1 is `[q | k | g | β]` along the
//! last dim (`[B,T,H,2K+2]`), input 2 is v, input 3 the initial state (zeros when absent). The
//! output is one buffer `[o (B·T·H·V) | final state (B·H·K·V)]` (the forward also produces the
//! checkpoints `B·H·nseg·K·V`, which go to the stash); [`gdr_fused`] returns views of the parts.

use super::attn_fused::Elem;
use super::scan_op::{ScanKernel, ScanOp};
use super::gdr_token::{bwd, step, Tok};
use super::simd::with_fast_isa;
use candle_core::{bail, DType, Result, Shape, Tensor};
use rayon::prelude::*;

/// Tokens per checkpoint segment (BlinkDL's RWKV-7 kernels use 16).
pub const SEG: usize = 16;

/// Fused gated delta rule, CPU only; q, k, v, g, beta (and initial_state) all f32 or all f64.
/// Shapes as [`super::gated_delta_rule::gdr_recurrent`]; returns (o `[B,T,H,V]`, final state
/// `[B,H,K,V]`), differentiable w.r.t. every input.
pub fn gdr_fused(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor, s0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    super::gated_delta_rule::check_shapes(q, k, v, g, beta, s0)?;
    if !supported(q, k, v, g, beta, s0) {
        bail!(
            "gdr_fused: CPU only, all inputs f32 or all f64; got q {:?} on {:?}, k {:?}, v {:?}, g {:?}, beta {:?}, initial_state {:?}",
            q.dtype(),
            q.device().location(),
            k.dtype(),
            v.dtype(),
            g.dtype(),
            beta.dtype(),
            s0.map(|s| s.dtype())
        );
    }
    let (b, t, h, dk) = q.dims4()?;
    let dv = v.dim(3)?;
    let packed = Tensor::cat(&[q, k, &g.unsqueeze(3)?, &beta.unsqueeze(3)?], 3)?.contiguous()?;
    let s0 = match s0 {
        Some(s) => s.contiguous()?,
        None => Tensor::zeros((b, h, dk, dv), q.dtype(), q.device())?,
    };
    let out = packed.apply_op3(&v.contiguous()?, &s0, ScanOp::<Gdr>::default())?;
    let n_o = b * t * h * dv;
    let o = out.narrow(0, 0, n_o)?.reshape((b, t, h, dv))?;
    let s = out.narrow(0, n_o, b * h * dk * dv)?.reshape((b, h, dk, dv))?;
    Ok((o, s))
}

/// Whether [`gdr_fused`] takes these inputs: all on the CPU, all f32 or all f64.
pub fn supported(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor, s0: Option<&Tensor>) -> bool {
    let dt = q.dtype();
    matches!(dt, DType::F32 | DType::F64)
        && [q, k, v, g, beta].into_iter().chain(s0).all(|x| x.device().is_cpu() && x.dtype() == dt)
}

/// The training form: [`gdr_fused`] when `fused` and [`supported`], else the composed chunked
/// form [`super::gated_delta_rule::gdr_chunked`] (CUDA, half precision, or `fused = false`).
#[allow(clippy::too_many_arguments)]
pub fn gdr_train(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor, s0: Option<&Tensor>, chunk: usize, fused: bool) -> Result<(Tensor, Tensor)> {
    if fused && supported(q, k, v, g, beta, s0) {
        gdr_fused(q, k, v, g, beta, s0)
    } else {
        super::gated_delta_rule::gdr_chunked(q, k, v, g, beta, s0, chunk)
    }
}

/// The kernel, run by [`ScanOp`].
struct Gdr;

impl ScanKernel for Gdr {
    type Dims = Dims;
    const NAME: &'static str = "gdr_fused";
    fn dims(s1: &Shape, s2: &Shape) -> Result<Dims> {
        Dims::new(s1, s2)
    }
    fn out_len(d: Dims) -> usize {
        d.n_o() + d.n_s()
    }
    fn forward<T: Elem>(d: Dims, x: &[T], v: &[T], s0: &[T]) -> Vec<T> {
        forward(d, x, v, s0)
    }
    fn backward<T: Elem>(d: Dims, x: &[T], v: &[T], _s0: &[T], ck: &[T], grad: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        backward(d, x, v, ck, grad)
    }
}

/// Problem sizes, read from the packed input and v.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    b: usize,
    t: usize,
    h: usize,
    k: usize,
    v: usize,
}

impl Dims {
    /// Batch b, length t, h heads with key dim k and value dim v.
    pub(super) fn of(b: usize, t: usize, h: usize, k: usize, v: usize) -> Self {
        Self { b, t, h, k, v }
    }
    fn new(packed: &Shape, v: &Shape) -> Result<Self> {
        let (b, t, h, w) = packed.dims4()?;
        let (_, _, _, dv) = v.dims4()?;
        if w < 4 || w % 2 != 0 {
            bail!("gdr_fused: packed input width {w} is not 2K+2");
        }
        Ok(Self { b, t, h, k: (w - 2) / 2, v: dv })
    }
    fn w(&self) -> usize {
        2 * self.k + 2
    }
    fn kv(&self) -> usize {
        self.k * self.v
    }
    fn nseg(&self) -> usize {
        self.t.div_ceil(SEG)
    }
    fn n_o(&self) -> usize {
        self.b * self.t * self.h * self.v
    }
    fn n_s(&self) -> usize {
        self.b * self.h * self.kv()
    }
    /// Offset of row (batch bb, token i, head hh) in a `[B,T,H,X]` tensor, in rows.
    fn row(&self, bb: usize, i: usize, hh: usize) -> usize {
        (bb * self.t + i) * self.h + hh
    }
}

fn tok<'a, T: Elem>(d: Dims, x: &'a [T], v: &'a [T], bb: usize, i: usize, hh: usize) -> Tok<'a, T> {
    let r = d.row(bb, i, hh);
    let xr = &x[r * d.w()..(r + 1) * d.w()];
    Tok { q: &xr[..d.k], k: &xr[d.k..2 * d.k], v: &v[r * d.v..(r + 1) * d.v], g: xr[2 * d.k], beta: xr[2 * d.k + 1] }
}

/// Forward over all (batch, head) pairs: the packed output buffer.
pub(super) fn forward<T: Elem>(d: Dims, x: &[T], v: &[T], s0: &[T]) -> Vec<T> {
    let kv = d.kv();
    let nseg = d.nseg();
    let heads: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..d.b * d.h).into_par_iter().map(|bh| with_fast_isa(#[inline(always)] || forward_head(d, x, v, &s0[bh * kv..(bh + 1) * kv], bh))).collect();
    let (n_o, n_s) = (d.n_o(), d.n_s());
    // Every head's rows, final state and checkpoints are written below.
    let mut out = super::cpu::take(n_o + n_s * (1 + nseg));
    let (o_all, rest) = out.split_at_mut(n_o);
    let (s_all, ck_all) = rest.split_at_mut(n_s);
    for (bh, (o, s, ck)) in heads.iter().enumerate() {
        let (bb, hh) = (bh / d.h, bh % d.h);
        for i in 0..d.t {
            let r = d.row(bb, i, hh);
            o_all[r * d.v..(r + 1) * d.v].copy_from_slice(&o[i * d.v..(i + 1) * d.v]);
        }
        s_all[bh * kv..(bh + 1) * kv].copy_from_slice(s);
        ck_all[bh * nseg * kv..(bh + 1) * nseg * kv].copy_from_slice(ck);
    }
    out
}

/// One head: (o `[T,V]`, final state `[K,V]`, checkpoints `[nseg,K,V]`).
#[inline(always)]
fn forward_head<T: Elem>(d: Dims, x: &[T], v: &[T], s0: &[T], bh: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (bb, hh) = (bh / d.h, bh % d.h);
    let scale = T::from_f64((d.k as f64).powf(-0.5));
    let mut s = s0.to_vec();
    let mut o = vec![T::zero(); d.t * d.v];
    let mut ck = Vec::with_capacity(d.nseg() * d.kv());
    let mut r = vec![T::zero(); d.v];
    for i in 0..d.t {
        if i % SEG == 0 {
            ck.extend_from_slice(&s);
        }
        step(&mut s, &tok(d, x, v, bb, i, hh), scale, &mut r, None, Some(&mut o[i * d.v..(i + 1) * d.v]));
    }
    (o, s, ck)
}

/// Per-head gradients: d[q|k|g|β] `[T,2K+2]`, dv `[T,V]`, ds0 `[K,V]`.
type HeadGrads<T> = (Vec<T>, Vec<T>, Vec<T>);

/// Backward over all heads from the forward's checkpoints `ck_all` and the gradient `grad` of
/// its `[o | final state]` output.
pub(super) fn backward<T: Elem>(d: Dims, x: &[T], v: &[T], ck_all: &[T], grad: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let kv = d.kv();
    let nseg = d.nseg();
    let (n_o, n_s) = (d.n_o(), d.n_s());
    let (d_o, d_sf) = grad.split_at(n_o);
    let heads: Vec<HeadGrads<T>> = (0..d.b * d.h)
        .into_par_iter()
        .map(|bh| {
            let ck = &ck_all[bh * nseg * kv..(bh + 1) * nseg * kv];
            with_fast_isa(#[inline(always)] || backward_head(d, x, v, ck, d_o, &d_sf[bh * kv..(bh + 1) * kv], bh))
        })
        .collect();
    let w = d.w();
    // Every head's rows and state are written below.
    let mut dx = super::cpu::take(x.len());
    let mut dvv = super::cpu::take(v.len());
    let mut ds0 = super::cpu::take(n_s);
    for (bh, (hx, hv, hs)) in heads.iter().enumerate() {
        let (bb, hh) = (bh / d.h, bh % d.h);
        for i in 0..d.t {
            let r = d.row(bb, i, hh);
            dx[r * w..(r + 1) * w].copy_from_slice(&hx[i * w..(i + 1) * w]);
            dvv[r * d.v..(r + 1) * d.v].copy_from_slice(&hv[i * d.v..(i + 1) * d.v]);
        }
        ds0[bh * kv..(bh + 1) * kv].copy_from_slice(hs);
    }
    (dx, dvv, ds0)
}

/// One head's backward (see the module doc).
#[inline(always)]
fn backward_head<T: Elem>(d: Dims, x: &[T], v: &[T], ck: &[T], d_o: &[T], d_sf: &[T], bh: usize) -> HeadGrads<T> {
    let (bb, hh) = (bh / d.h, bh % d.h);
    let (dv_, kv, w) = (d.v, d.kv(), d.w());
    let scale = T::from_f64((d.k as f64).powf(-0.5));
    let mut dx = vec![T::zero(); d.t * w];
    let mut dvv = vec![T::zero(); d.t * dv_];
    let mut ds = d_sf.to_vec();
    // Recomputed per segment: decayed states S_a `[SEG,K,V]` and residuals r `[SEG,V]`.
    let mut sa = vec![T::zero(); SEG * kv];
    let mut rr = vec![T::zero(); SEG * dv_];
    let mut s = vec![T::zero(); kv];
    let mut du = vec![T::zero(); dv_];
    let mut u = vec![T::zero(); dv_];
    for seg in (0..d.nseg()).rev() {
        let t0 = seg * SEG;
        let len = SEG.min(d.t - t0);
        s.copy_from_slice(&ck[seg * kv..(seg + 1) * kv]);
        for j in 0..len {
            let xt = tok(d, x, v, bb, t0 + j, hh);
            step(&mut s, &xt, scale, &mut rr[j * dv_..(j + 1) * dv_], Some(&mut sa[j * kv..(j + 1) * kv]), None);
        }
        for j in (0..len).rev() {
            let i = t0 + j;
            let xt = tok(d, x, v, bb, i, hh);
            let s_a = &sa[j * kv..(j + 1) * kv];
            let r = &rr[j * dv_..(j + 1) * dv_];
            let row = d.row(bb, i, hh);
            let dot_ = &d_o[row * dv_..(row + 1) * dv_];
            let gx = &mut dx[i * w..(i + 1) * w];
            let gv = &mut dvv[i * dv_..(i + 1) * dv_];
            bwd(&xt, s_a, r, dot_, scale, &mut ds, gx, gv, &mut u, &mut du);
        }
    }
    (dx, dvv, ds)
}
