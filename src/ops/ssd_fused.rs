//! Fused CPU kernel for Mamba-2's SSD recurrence (Dao & Gu 2024, arXiv:2405.21060) with a
//! hand-written backward: same semantics and layouts as [`super::ssd`]
//! (`../shared/reference/ops.md` §5), f32 or f64.
//!
//! Algorithm: the token recurrence with state checkpoints, as [`super::gdr_fused`]. Per token
//! and head (h is P×N, head h reads group h / (H/G)):
//! ```text
//! a = exp(dt_t·A) ;  h[p,:] = a·h[p,:] + (dt_t x_t[p])·B_t ;  y_t[p] = h[p,:]·C_t
//! ```
//! one pass over the state, 3PN multiply-adds per token (the chunked form costs
//! Q(N + P) + 2PN + PN/Q, and its backward several times that in candle ops). One rayon task
//! per (batch, head) on the global pool.
//!
//! Backward: the state at the start of every segment of [`SEG`] tokens is saved; the backward
//! recomputes a segment's states h_{t−1} from its checkpoint, then steps back with dh (gradient
//! w.r.t. h_t), row by row (h_t[p,:] = a·h_{t−1}[p,:] + dt x_p B rebuilt on the fly):
//! ```text
//! dh[p,:] += dy_p C ;  dC += dy_p h_t[p,:] ;  e_p = dh[p,:]·B ;  dx_p = dt e_p ;  ddt += x_p e_p
//! dB += dt x_p dh[p,:] ;  da += dh[p,:]·h_{t−1}[p,:] ;  dh[p,:] ← a·dh[p,:]
//! ddt += A·a·da ;  dA += dt·a·da
//! ```
//! dB and dC are summed over the heads of a group and dA over batch and time, in a fixed order
//! (results do not depend on the thread count).
//!
//! Packing (three op inputs): `[x | dt]` `[B,T,H,P+1]`, `[Bm | Cm]` `[B,T,G,2N]`, and
//! `[initial state (B·H·P·N) | A (H)]` flat. Output `[y | final state]`; the
//! state checkpoints stay in the op ([`super::cpu::Stash`]) for the backward.

use super::attn_fused::Elem;
use super::scan_op::{ScanKernel, ScanOp};
use super::ssd_token::{self, TokIn};
use super::simd::with_fast_isa;
use candle_core::{bail, DType, Result, Shape, Tensor};
use rayon::prelude::*;

/// Tokens per checkpoint segment.
pub const SEG: usize = 32;

/// Fused SSD, CPU only; x, dt, A, Bm, Cm (and initial_state) all f32 or all f64. Shapes as
/// [`super::ssd::ssd_recurrent`]; returns (y `[B,T,H,P]`, final state `[B,H,P,N]`),
/// differentiable w.r.t. every input.
pub fn ssd_fused(x: &Tensor, dt: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, s0: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    super::ssd::check_shapes(x, dt, a, bm, cm, s0)?;
    if !supported(x, dt, a, bm, cm, s0) {
        bail!(
            "ssd_fused: CPU only, all inputs f32 or all f64; got x {:?} on {:?}, dt {:?}, A {:?}, Bm {:?}, Cm {:?}, initial_state {:?}",
            x.dtype(),
            x.device().location(),
            dt.dtype(),
            a.dtype(),
            bm.dtype(),
            cm.dtype(),
            s0.map(|s| s.dtype())
        );
    }
    let (b, t, h, p) = x.dims4()?;
    let n = bm.dim(3)?;
    let in1 = Tensor::cat(&[x, &dt.unsqueeze(3)?], 3)?.contiguous()?;
    let in2 = Tensor::cat(&[bm, cm], 3)?.contiguous()?;
    let s0 = match s0 {
        Some(s) => s.flatten_all()?,
        None => Tensor::zeros(b * h * p * n, x.dtype(), x.device())?,
    };
    let in3 = Tensor::cat(&[&s0, a], 0)?.contiguous()?;
    let out = in1.apply_op3(&in2, &in3, ScanOp::<Ssd>::default())?;
    let n_y = b * t * h * p;
    let y = out.narrow(0, 0, n_y)?.reshape((b, t, h, p))?;
    let s = out.narrow(0, n_y, b * h * p * n)?.reshape((b, h, p, n))?;
    Ok((y, s))
}

/// Whether [`ssd_fused`] takes these inputs: all on the CPU, all f32 or all f64.
pub fn supported(x: &Tensor, dt: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, s0: Option<&Tensor>) -> bool {
    let d = x.dtype();
    matches!(d, DType::F32 | DType::F64) && [x, dt, a, bm, cm].into_iter().chain(s0).all(|t| t.device().is_cpu() && t.dtype() == d)
}

/// The training form: [`ssd_fused`] when `fused` and [`supported`], else the composed chunked
/// form [`super::ssd::ssd_chunked`].
#[allow(clippy::too_many_arguments)]
pub fn ssd_train(x: &Tensor, dt: &Tensor, a: &Tensor, bm: &Tensor, cm: &Tensor, s0: Option<&Tensor>, chunk: usize, fused: bool) -> Result<(Tensor, Tensor)> {
    if fused && supported(x, dt, a, bm, cm, s0) {
        ssd_fused(x, dt, a, bm, cm, s0)
    } else {
        super::ssd::ssd_chunked(x, dt, a, bm, cm, s0, chunk)
    }
}

/// The kernel, run by [`ScanOp`].
struct Ssd;

impl ScanKernel for Ssd {
    type Dims = Dims;
    const NAME: &'static str = "ssd_fused";
    fn dims(s1: &Shape, s2: &Shape) -> Result<Dims> {
        Dims::new(s1, s2)
    }
    fn out_len(d: Dims) -> usize {
        d.n_y() + d.n_s()
    }
    fn forward<T: Elem>(d: Dims, a: &[T], b: &[T], c: &[T]) -> Vec<T> {
        forward(d, a, b, c)
    }
    fn backward<T: Elem>(d: Dims, a: &[T], b: &[T], c: &[T], ck: &[T], grad: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        backward(d, a, b, c, ck, grad)
    }
}

#[derive(Clone, Copy)]
pub(super) struct Dims {
    b: usize,
    t: usize,
    h: usize,
    p: usize,
    g: usize,
    n: usize,
}

impl Dims {
    /// Batch b, length t, h heads of p channels, g groups of B/C with state size n.
    pub(super) fn of(b: usize, t: usize, h: usize, p: usize, g: usize, n: usize) -> Self {
        Self { b, t, h, p, g, n }
    }
    fn new(in1: &Shape, in2: &Shape) -> Result<Self> {
        let (b, t, h, p1) = in1.dims4()?;
        let (_, _, g, n2) = in2.dims4()?;
        if p1 < 2 || n2 < 2 || n2 % 2 != 0 || g == 0 || h % g != 0 {
            bail!("ssd_fused: bad packed shapes {in1:?}, {in2:?}");
        }
        Ok(Self { b, t, h, p: p1 - 1, g, n: n2 / 2 })
    }
    fn pn(&self) -> usize {
        self.p * self.n
    }
    fn nseg(&self) -> usize {
        self.t.div_ceil(SEG)
    }
    fn n_y(&self) -> usize {
        self.b * self.t * self.h * self.p
    }
    fn n_s(&self) -> usize {
        self.b * self.h * self.pn()
    }
    /// Row of (batch, token, head) in `[B,T,H,·]`.
    fn row(&self, bb: usize, i: usize, hh: usize) -> usize {
        (bb * self.t + i) * self.h + hh
    }
    /// Row of (batch, token, group of head hh) in `[B,T,G,·]`.
    fn grow(&self, bb: usize, i: usize, hh: usize) -> usize {
        (bb * self.t + i) * self.g + hh / (self.h / self.g)
    }
}

/// One token for one head: x row `[P]`, dt, B and C rows `[N]`.
struct Tok<'a, T> {
    x: &'a [T],
    dt: T,
    b: &'a [T],
    c: &'a [T],
}

fn tok<'a, T: Elem>(d: Dims, in1: &'a [T], in2: &'a [T], bb: usize, i: usize, hh: usize) -> Tok<'a, T> {
    let (r, gr) = (d.row(bb, i, hh), d.grow(bb, i, hh));
    let xr = &in1[r * (d.p + 1)..(r + 1) * (d.p + 1)];
    let bc = &in2[gr * 2 * d.n..(gr + 1) * 2 * d.n];
    Tok { x: &xr[..d.p], dt: xr[d.p], b: &bc[..d.n], c: &bc[d.n..] }
}

/// `[y ‖ final state ‖ checkpoints]` from the packed inputs (see the module doc).
pub(super) fn forward<T: Elem>(d: Dims, in1: &[T], in2: &[T], in3: &[T]) -> Vec<T> {
    let (pn, nseg) = (d.pn(), d.nseg());
    let (s0, a) = in3.split_at(d.n_s());
    let heads: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..d.b * d.h)
        .into_par_iter()
        .map(|bh| with_fast_isa(#[inline(always)] || forward_head(d, in1, in2, &s0[bh * pn..(bh + 1) * pn], a[bh % d.h], bh)))
        .collect();
    let (n_y, n_s) = (d.n_y(), d.n_s());
    // Every head's rows, final state and checkpoints are written below.
    let mut out = super::cpu::take(n_y + n_s * (1 + nseg));
    let (y_all, rest) = out.split_at_mut(n_y);
    let (s_all, ck_all) = rest.split_at_mut(n_s);
    for (bh, (y, s, ck)) in heads.iter().enumerate() {
        let (bb, hh) = (bh / d.h, bh % d.h);
        for i in 0..d.t {
            let r = d.row(bb, i, hh);
            y_all[r * d.p..(r + 1) * d.p].copy_from_slice(&y[i * d.p..(i + 1) * d.p]);
        }
        s_all[bh * pn..(bh + 1) * pn].copy_from_slice(s);
        ck_all[bh * nseg * pn..(bh + 1) * nseg * pn].copy_from_slice(ck);
    }
    out
}

/// One head: (y `[T,P]`, final state `[P,N]`, checkpoints `[nseg,P,N]`).
#[inline(always)]
fn forward_head<T: Elem>(d: Dims, in1: &[T], in2: &[T], s0: &[T], a_h: T, bh: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (bb, hh) = (bh / d.h, bh % d.h);
    let (p, n) = (d.p, d.n);
    // The state transposed, `[N, P]`: the update and `y = hᵀ C` then run along P with no
    // horizontal sums (`y_p = Σ_j C_j h[j, p]`, j in order). Checkpoints and the final state
    // are stored `[P, N]`, as the backward reads them.
    let mut st = transpose(s0, p, n);
    let mut y = vec![T::zero(); d.t * p];
    let mut ck = Vec::with_capacity(d.nseg() * d.pn());
    let mut c = vec![T::zero(); p];
    for i in 0..d.t {
        if i % SEG == 0 {
            ck.extend_from_slice(&transpose(&st, n, p));
        }
        let x = tok(d, in1, in2, bb, i, hh);
        let a = (x.dt * a_h).exp();
        c.iter_mut().zip(x.x).for_each(|(c, &xp)| *c = x.dt * xp);
        ssd_token::fwd(&mut st, &c, x.b, x.c, a, &mut y[i * p..(i + 1) * p]);
    }
    (y, transpose(&st, n, p), ck)
}

/// `m [rows, cols]` → `[cols, rows]`.
#[inline(always)]
fn transpose<T: Elem>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::zero(); m.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
    out
}

/// Per head: d[x|dt] `[T,P+1]`, d[B|C] `[T,2N]`, ds0 `[P,N]`, dA.
type HeadGrads<T> = (Vec<T>, Vec<T>, Vec<T>, T);

/// Gradients of the three packed inputs from the checkpoints and the gradient of `[y ‖ final state]`.
pub(super) fn backward<T: Elem>(d: Dims, in1: &[T], in2: &[T], in3: &[T], ck_all: &[T], grad: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (pn, nseg, n_y, n_s) = (d.pn(), d.nseg(), d.n_y(), d.n_s());
    let a = &in3[n_s..];
    let (dy, d_sf) = grad.split_at(n_y);
    let heads: Vec<HeadGrads<T>> = (0..d.b * d.h)
        .into_par_iter()
        .map(|bh| {
            let ck = &ck_all[bh * nseg * pn..(bh + 1) * nseg * pn];
            with_fast_isa(#[inline(always)] || backward_head(d, in1, in2, a[bh % d.h], ck, dy, &d_sf[bh * pn..(bh + 1) * pn], bh))
        })
        .collect();
    let (w1, w2) = (d.p + 1, 2 * d.n);
    // g1 and g3's state part are written for every head below; g2 and dA are sums.
    let mut g1 = super::cpu::take(in1.len());
    let mut g2 = vec![T::zero(); in2.len()];
    let mut g3 = super::cpu::take(in3.len());
    g3[n_s..].fill(T::zero());
    // Fixed order: heads in (batch, head) order.
    for (bh, (hx, hbc, hs, da)) in heads.iter().enumerate() {
        let (bb, hh) = (bh / d.h, bh % d.h);
        for i in 0..d.t {
            let (r, gr) = (d.row(bb, i, hh), d.grow(bb, i, hh));
            g1[r * w1..(r + 1) * w1].copy_from_slice(&hx[i * w1..(i + 1) * w1]);
            g2[gr * w2..(gr + 1) * w2].iter_mut().zip(&hbc[i * w2..(i + 1) * w2]).for_each(|(g, &x)| *g += x);
        }
        g3[bh * pn..(bh + 1) * pn].copy_from_slice(hs);
        g3[n_s + hh] += *da;
    }
    heads.into_iter().for_each(|(hx, hbc, _, _)| {
        super::cpu::give(hx);
        super::cpu::give(hbc);
    });
    (g1, g2, g3)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_head<T: Elem>(d: Dims, in1: &[T], in2: &[T], a_h: T, ck: &[T], dy: &[T], d_sf: &[T], bh: usize) -> HeadGrads<T> {
    let (bb, hh) = (bh / d.h, bh % d.h);
    let (p, n, pn) = (d.p, d.n, d.pn());
    let (w1, w2) = (p + 1, 2 * n);
    // Every row of gx is written (the P columns and dt) before the function returns.
    let mut gx = super::cpu::take(d.t * w1);
    // Every row of gbc is written by `ssd_token::bwd`.
    let mut gbc = super::cpu::take(d.t * w2);
    let mut dh = d_sf.to_vec();
    let mut d_a = T::zero();
    // States before each token of the segment: h_{t−1} `[SEG,P,N]`.
    // Rows 0..len are written before they are read, in every segment.
    let mut prev = super::cpu::take(SEG * pn);
    let (mut scratch, mut e) = (vec![T::zero(); 16 * p], vec![T::zero(); p]);
    for seg in (0..d.nseg()).rev() {
        let t0 = seg * SEG;
        let len = SEG.min(d.t - t0);
        // Each recomputed state is written straight into the next slot (no per-token copy).
        prev[..pn].copy_from_slice(&ck[seg * pn..(seg + 1) * pn]);
        for j in 0..len - 1 {
            let (cur, next) = prev[j * pn..(j + 2) * pn].split_at_mut(pn);
            let x = tok(d, in1, in2, bb, t0 + j, hh);
            let a = (x.dt * a_h).exp();
            for ((out, row), &xp) in next.chunks_exact_mut(n).zip(cur.chunks_exact(n)).zip(x.x) {
                let c = x.dt * xp;
                out.iter_mut().zip(row).zip(x.b).for_each(|((o, &e), &bj)| *o = a * e + c * bj);
            }
        }
        for j in (0..len).rev() {
            let i = t0 + j;
            let x = tok(d, in1, in2, bb, i, hh);
            let a = (x.dt * a_h).exp();
            let hp = &prev[j * pn..(j + 1) * pn];
            let r = d.row(bb, i, hh);
            let dyr = &dy[r * p..(r + 1) * p];
            let gxr = &mut gx[i * w1..(i + 1) * w1];
            let (gb, gc) = gbc[i * w2..(i + 1) * w2].split_at_mut(n);
            let tk = TokIn { x: x.x, dt: x.dt, b: x.b, c: x.c, a, dy: dyr };
            let da = ssd_token::bwd(hp, &mut dh, &tk, gb, gc, &mut e, &mut scratch);
            let mut ddt = T::zero();
            for ((g, &ec), &xc) in gxr[..p].iter_mut().zip(&e).zip(x.x) {
                *g = x.dt * ec;
                ddt += xc * ec;
            }
            // a = exp(dt·A): da/d(dt) = A·a, da/dA = dt·a.
            gxr[p] = ddt + a_h * a * da;
            d_a += x.dt * a * da;
        }
    }
    super::cpu::give(prev);
    (gx, gbc, dh, d_a)
}
