//! Fused CPU kernel for WKV-7, the DPLR delta rule of RWKV-7 "Goose" (Peng et al. 2025,
//! arXiv:2503.14456), with a hand-written backward: same semantics and layouts as
//! [`super::rwkv7`] (`../shared/reference/ops.md` §6), f32 or f64.
//!
//! Algorithm: the token recurrence with state checkpoints every [`SEG`] tokens, the structure
//! of BlinkDL's CUDA kernels (`RWKV-v7/train_temp/cuda/wkv7_cuda.cu`, which also checkpoint
//! every 16 tokens), here one rayon task per (batch, head) on the global pool. Per token, row
//! i of S (value dim i, S is V×K):
//! ```text
//! sa_i = S[i,:]·a ;  S[i,:] = S[i,:]⊙w + sa_i b + v_i k ;  o_i = S[i,:]·r
//! ```
//! one pass over the state, 4VK multiply-adds per token.
//!
//! Backward, row by row with dS the gradient w.r.t. S_t (S_{t−1} from the recomputed segment,
//! S_t rebuilt on the fly):
//! ```text
//! dS[i,:] += do_i r ;  dr += do_i S_t[i,:] ;  dw += dS[i,:]⊙S_{t−1}[i,:]
//! dsa_i = dS[i,:]·b ;  db += sa_i dS[i,:] ;  dv_i = dS[i,:]·k ;  dk += v_i dS[i,:]
//! da += dsa_i S_{t−1}[i,:] ;  dS[i,:] ← dS[i,:]⊙w + dsa_i a
//! ```
//!
//! Packing (three op inputs): `[r | w | k | a | b]` `[B,T,H,5K]`, v, and the initial state
//! (zeros when absent). Output `[o | final state]`; the state
//! checkpoints stay in the op ([`super::cpu::Stash`]) for the backward.

use super::attn_fused::Elem;
use super::scan_op::{ScanKernel, ScanOp};
use super::rwkv7_token::{bwd, step, Tok};
use super::simd::with_fast_isa;
use candle_core::{bail, DType, Result, Shape, Tensor};
use rayon::prelude::*;

/// Tokens per checkpoint segment (as BlinkDL's kernels).
pub const SEG: usize = 16;

/// Fused WKV-7, CPU only; r, w, k, v, a, b (and initial_state) all f32 or all f64. Shapes as
/// [`super::rwkv7::rwkv7_recurrent`]; returns (o `[B,T,H,V]`, final state `[B,H,V,K]`),
/// differentiable w.r.t. every input.
#[allow(clippy::too_many_arguments)]
pub fn rwkv7_fused(r: &Tensor, w: &Tensor, k: &Tensor, v: &Tensor, a: &Tensor, b: &Tensor, s0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    super::rwkv7::check_shapes(r, w, k, v, a, b, s0)?;
    if !supported(r, w, k, v, a, b, s0) {
        bail!(
            "rwkv7_fused: CPU only, all inputs f32 or all f64; got r {:?} on {:?}, w {:?}, k {:?}, v {:?}, a {:?}, b {:?}, initial_state {:?}",
            r.dtype(),
            r.device().location(),
            w.dtype(),
            k.dtype(),
            v.dtype(),
            a.dtype(),
            b.dtype(),
            s0.map(|s| s.dtype())
        );
    }
    let (bsz, t, h, dk) = r.dims4()?;
    let dv = v.dim(3)?;
    let in1 = Tensor::cat(&[r, w, k, a, b], 3)?.contiguous()?;
    let s0 = match s0 {
        Some(s) => s.contiguous()?,
        None => Tensor::zeros((bsz, h, dv, dk), r.dtype(), r.device())?,
    };
    let out = in1.apply_op3(&v.contiguous()?, &s0, ScanOp::<Wkv7>::default())?;
    let n_o = bsz * t * h * dv;
    let o = out.narrow(0, 0, n_o)?.reshape((bsz, t, h, dv))?;
    let s = out.narrow(0, n_o, bsz * h * dv * dk)?.reshape((bsz, h, dv, dk))?;
    Ok((o, s))
}

/// Whether [`rwkv7_fused`] takes these inputs: all on the CPU, all f32 or all f64.
#[allow(clippy::too_many_arguments)]
pub fn supported(r: &Tensor, w: &Tensor, k: &Tensor, v: &Tensor, a: &Tensor, b: &Tensor, s0: Option<&Tensor>) -> bool {
    let d = r.dtype();
    matches!(d, DType::F32 | DType::F64) && [r, w, k, v, a, b].into_iter().chain(s0).all(|x| x.device().is_cpu() && x.dtype() == d)
}

/// The training form: [`rwkv7_fused`] when `fused` and [`supported`], else the composed
/// chunked form [`super::rwkv7::rwkv7_chunked`].
#[allow(clippy::too_many_arguments)]
pub fn rwkv7_train(r: &Tensor, w: &Tensor, k: &Tensor, v: &Tensor, a: &Tensor, b: &Tensor, s0: Option<&Tensor>, chunk: usize, fused: bool) -> Result<(Tensor, Tensor)> {
    if fused && supported(r, w, k, v, a, b, s0) {
        rwkv7_fused(r, w, k, v, a, b, s0)
    } else {
        super::rwkv7::rwkv7_chunked(r, w, k, v, a, b, s0, chunk)
    }
}

/// The kernel, run by [`ScanOp`].
struct Wkv7;

impl ScanKernel for Wkv7 {
    type Dims = Dims;
    const NAME: &'static str = "rwkv7_fused";
    fn dims(s1: &Shape, s2: &Shape) -> Result<Dims> {
        Dims::new(s1, s2)
    }
    fn out_len(d: Dims) -> usize {
        d.n_o() + d.n_s()
    }
    fn forward<T: Elem>(d: Dims, a: &[T], b: &[T], c: &[T]) -> Vec<T> {
        forward(d, a, b, c)
    }
    fn backward<T: Elem>(d: Dims, a: &[T], b: &[T], _c: &[T], ck: &[T], grad: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        backward(d, a, b, ck, grad)
    }
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    k: usize,
    v: usize,
}

impl Dims {
    fn new(in1: &Shape, v: &Shape) -> Result<Self> {
        let (b, t, h, w5) = in1.dims4()?;
        let (_, _, _, dv) = v.dims4()?;
        if w5 == 0 || w5 % 5 != 0 {
            bail!("rwkv7_fused: packed input width {w5} is not 5K");
        }
        Ok(Self { b, t, h, k: w5 / 5, v: dv })
    }
    fn vk(&self) -> usize {
        self.v * self.k
    }
    fn nseg(&self) -> usize {
        self.t.div_ceil(SEG)
    }
    fn n_o(&self) -> usize {
        self.b * self.t * self.h * self.v
    }
    fn n_s(&self) -> usize {
        self.b * self.h * self.vk()
    }
    fn row(&self, bb: usize, i: usize, hh: usize) -> usize {
        (bb * self.t + i) * self.h + hh
    }
}

fn tok<'a, T: Elem>(d: Dims, in1: &'a [T], v: &'a [T], bb: usize, i: usize, hh: usize) -> Tok<'a, T> {
    let row = d.row(bb, i, hh);
    let x = &in1[row * 5 * d.k..(row + 1) * 5 * d.k];
    let part = |j: usize| &x[j * d.k..(j + 1) * d.k];
    Tok { r: part(0), w: part(1), k: part(2), a: part(3), b: part(4), v: &v[row * d.v..(row + 1) * d.v] }
}

fn forward<T: Elem>(d: Dims, in1: &[T], v: &[T], s0: &[T]) -> Vec<T> {
    let (vk, nseg) = (d.vk(), d.nseg());
    let heads: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..d.b * d.h)
        .into_par_iter()
        .map(|bh| {
            with_fast_isa(#[inline(always)] || {
                let (bb, hh) = (bh / d.h, bh % d.h);
                let mut s = s0[bh * vk..(bh + 1) * vk].to_vec();
                let mut o = vec![T::zero(); d.t * d.v];
                let mut ck = Vec::with_capacity(nseg * vk);
                for i in 0..d.t {
                    if i % SEG == 0 {
                        ck.extend_from_slice(&s);
                    }
                    step(&mut s, &tok(d, in1, v, bb, i, hh), Some(&mut o[i * d.v..(i + 1) * d.v]));
                }
                (o, s, ck)
            })
        })
        .collect();
    let (n_o, n_s) = (d.n_o(), d.n_s());
    let mut out = vec![T::zero(); n_o + n_s * (1 + nseg)];
    let (o_all, rest) = out.split_at_mut(n_o);
    let (s_all, ck_all) = rest.split_at_mut(n_s);
    for (bh, (o, s, ck)) in heads.iter().enumerate() {
        let (bb, hh) = (bh / d.h, bh % d.h);
        for i in 0..d.t {
            let r = d.row(bb, i, hh);
            o_all[r * d.v..(r + 1) * d.v].copy_from_slice(&o[i * d.v..(i + 1) * d.v]);
        }
        s_all[bh * vk..(bh + 1) * vk].copy_from_slice(s);
        ck_all[bh * nseg * vk..(bh + 1) * nseg * vk].copy_from_slice(ck);
    }
    out
}

/// Per head: d[r|w|k|a|b] `[T,5K]`, dv `[T,V]`, ds0 `[V,K]`.
type HeadGrads<T> = (Vec<T>, Vec<T>, Vec<T>);

fn backward<T: Elem>(d: Dims, in1: &[T], v: &[T], ck_all: &[T], grad: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (vk, nseg, n_o, n_s) = (d.vk(), d.nseg(), d.n_o(), d.n_s());
    let (d_o, d_sf) = grad.split_at(n_o);
    let heads: Vec<HeadGrads<T>> = (0..d.b * d.h)
        .into_par_iter()
        .map(|bh| {
            let ck = &ck_all[bh * nseg * vk..(bh + 1) * nseg * vk];
            with_fast_isa(#[inline(always)] || backward_head(d, in1, v, ck, d_o, &d_sf[bh * vk..(bh + 1) * vk], bh))
        })
        .collect();
    let w1 = 5 * d.k;
    let mut g1 = vec![T::zero(); in1.len()];
    let mut g2 = vec![T::zero(); v.len()];
    let mut g3 = vec![T::zero(); n_s];
    for (bh, (hx, hv, hs)) in heads.iter().enumerate() {
        let (bb, hh) = (bh / d.h, bh % d.h);
        for i in 0..d.t {
            let r = d.row(bb, i, hh);
            g1[r * w1..(r + 1) * w1].copy_from_slice(&hx[i * w1..(i + 1) * w1]);
            g2[r * d.v..(r + 1) * d.v].copy_from_slice(&hv[i * d.v..(i + 1) * d.v]);
        }
        g3[bh * vk..(bh + 1) * vk].copy_from_slice(hs);
    }
    (g1, g2, g3)
}

#[inline(always)]
fn backward_head<T: Elem>(d: Dims, in1: &[T], v: &[T], ck: &[T], d_o: &[T], d_sf: &[T], bh: usize) -> HeadGrads<T> {
    let (bb, hh) = (bh / d.h, bh % d.h);
    let (dk, dv, vk) = (d.k, d.v, d.vk());
    let w1 = 5 * dk;
    let mut gx = vec![T::zero(); d.t * w1];
    let mut gv = vec![T::zero(); d.t * dv];
    let mut ds = d_sf.to_vec();
    let mut prev = vec![T::zero(); SEG * vk];
    let mut s = vec![T::zero(); vk];
    let mut st = vec![T::zero(); dk];
    for seg in (0..d.nseg()).rev() {
        let t0 = seg * SEG;
        let len = SEG.min(d.t - t0);
        s.copy_from_slice(&ck[seg * vk..(seg + 1) * vk]);
        for j in 0..len {
            prev[j * vk..(j + 1) * vk].copy_from_slice(&s);
            step(&mut s, &tok(d, in1, v, bb, t0 + j, hh), None);
        }
        for j in (0..len).rev() {
            let i = t0 + j;
            let x = tok(d, in1, v, bb, i, hh);
            let sp = &prev[j * vk..(j + 1) * vk];
            let row = d.row(bb, i, hh);
            let dor = &d_o[row * dv..(row + 1) * dv];
            let gxr = &mut gx[i * w1..(i + 1) * w1];
            let gvr = &mut gv[i * dv..(i + 1) * dv];
            bwd(sp, &mut ds, &x, dor, gxr, gvr, &mut st);
        }
    }
    (gx, gv, ds)
}
