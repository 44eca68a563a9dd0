//! The pre-norm Mamba-2 sublayer with its residual as one autograd node (Dao & Gu 2024,
//! arXiv:2405.21060; mamba_ssm `Mamba2.forward` with `rmsnorm=True`, `norm_before_gate=False`,
//! `ngroups = 1` (one group of B/C and of the gated norm); `../shared/reference/mixers.md` §Mamba2):
//! ```text
//! n = RMSNorm(x; g)            [z | xBC | dt_raw] = n W_in
//! xBC ← silu(conv(xBC) + b)    (causal depthwise, [`super::short_conv_fused`])
//! dt = softplus(dt_raw + dt_bias) ;  A = −exp(A_log)
//! y = SSD(x, dt, A, B, C) + D ⊙ x            ([`super::ssd_fused`], zero initial state)
//! y ← RMSNorm(silu(z) ⊙ y; w_norm) ;  out = x + y W_out
//! ```
//! Why one node: composed from the fused ops, a Mamba2 layer's mixer was ~70 autograd nodes
//! (the in-projection column blocks, the packing of the scan's inputs, the narrow of its output,
//! the skip, the gate, the norm), and candle 0.11's backward zero-fills and adds a gradient for
//! every input of every node (`examples/graph_nodes.rs`: 93.5 M such values per step at the
//! bench size). As one node it is x plus the packed parameters
//! `p = [g ‖ W_in ‖ conv_w ‖ conv_b ‖ dt_bias ‖ A_log ‖ D ‖ w_norm ‖ W_out]`.
//!
//! The forward keeps the projection, the conv output and the scan's output and checkpoints
//! ([`Stash`]); the backward runs every step's hand-written backward in reverse (the scan's and
//! the conv's are those of their own fused ops). [`crate::blocks::mamba2::Mamba2`] composes the
//! same computation from candle ops; its tests compare the two, forward and gradients.

use super::attn_fused::Elem;
use super::cpu::{copy_of, give, row_sums, take, Stash};
use super::sublayer_op::{SublayerKernel, SublayerOp};
use super::gemm::{mm_par, Mat};
use super::norm::{bwd_into as norm_bwd_into, fwd_rows as norm_fwd_rows};
use super::simd::{sigmoid, softplus, with_fast_isa};
use super::short_conv_fused::{bwd as conv_bwd, fwd as conv_fwd, Dims as ConvDims};
use super::ssd_fused::{backward as ssd_backward, forward as ssd_forward, Dims as SsdDims};
use candle_core::{bail, Layout, Result, Tensor};
use rayon::prelude::*;

/// Sizes of one Mamba2 sublayer.
#[derive(Clone, Copy, Debug)]
pub struct Mamba2Dims {
    pub d_model: usize,
    pub d_inner: usize,
    pub heads: usize,
    pub headdim: usize,
    pub groups: usize,
    pub d_state: usize,
    pub d_conv: usize,
    /// D is `[H·P]` (true) or `[H]`.
    pub d_has_hdim: bool,
}

impl Mamba2Dims {
    fn conv_dim(&self) -> usize {
        self.d_inner + 2 * self.groups * self.d_state
    }
    fn proj_dim(&self) -> usize {
        self.d_inner + self.conv_dim() + self.heads
    }
    fn skip_len(&self) -> usize {
        if self.d_has_hdim {
            self.d_inner
        } else {
            self.heads
        }
    }
    /// Offsets of g, W_in, conv_w, conv_b, dt_bias, A_log, D, w_norm, W_out in the packed
    /// parameters, and their total length.
    fn offsets(&self) -> [usize; 10] {
        let lens = [
            self.d_model,
            self.d_model * self.proj_dim(),
            self.conv_dim() * self.d_conv,
            self.conv_dim(),
            self.heads,
            self.heads,
            self.skip_len(),
            self.d_inner,
            self.d_inner * self.d_model,
        ];
        let mut o = [0; 10];
        for (i, l) in lens.iter().enumerate() {
            o[i + 1] = o[i] + l;
        }
        o
    }
}

/// The parameters, in the order of the packing (shapes as the Mamba2 block's).
pub struct Mamba2Weights<'a> {
    pub g: &'a Tensor,
    pub in_proj: &'a Tensor,
    pub conv_w: &'a Tensor,
    pub conv_b: &'a Tensor,
    pub dt_bias: &'a Tensor,
    pub a_log: &'a Tensor,
    pub d_skip: &'a Tensor,
    pub norm_w: &'a Tensor,
    pub out_proj: &'a Tensor,
}

/// `x + Mamba2(RMSNorm(x; g))` for x `[B, T, d]` as one fused node: CPU, f32/f64 (all inputs the
/// same dtype); `eps` is the pre-norm's, `norm_eps` the gated norm's.
pub fn mamba2_sublayer(x: &Tensor, w: &Mamba2Weights, dims: Mamba2Dims, eps: f64, norm_eps: f64) -> Result<Tensor> {
    let all = [x, w.g, w.in_proj, w.conv_w, w.conv_b, w.dt_bias, w.a_log, w.d_skip, w.norm_w, w.out_proj];
    if !super::cpu_fusable(&all) {
        bail!("mamba2_sublayer: CPU only, all inputs f32 or all f64");
    }
    let (b, t, d) = x.dims3()?;
    let m = dims;
    let o = m.offsets();
    let parts = &all[1..];
    let fits = d == m.d_model
        && m.heads * m.headdim == m.d_inner
        && m.groups == 1
        && parts.iter().enumerate().all(|(i, p)| p.elem_count() == o[i + 1] - o[i]);
    if !fits {
        bail!("mamba2_sublayer: x {:?} and parameters {:?} do not fit {m:?} (one group only)", x.dims(), parts.iter().map(|p| p.dims().to_vec()).collect::<Vec<_>>());
    }
    let flat = parts.iter().map(|p| p.flatten_all()).collect::<Result<Vec<_>>>()?;
    let p = Tensor::cat(&flat, 0)?;
    x.contiguous()?.apply_op2(&p, SublayerOp(Mamba2Sublayer { b, t, m, eps, norm_eps, saved: Stash::default() }))
}

struct Mamba2Sublayer {
    b: usize,
    t: usize,
    m: Mamba2Dims,
    eps: f64,
    norm_eps: f64,
    /// `[proj, conv out, scan out]` (three buffers): `n W_in` `[R, proj_dim]`, `silu(conv(xBC))` `[R, conv_dim]`,
    /// and the scan's `[y ‖ final state ‖ checkpoints]`.
    saved: Stash,
}

impl Mamba2Sublayer {
    fn rows(&self) -> usize {
        self.b * self.t
    }

    fn ssd_dims(&self) -> SsdDims {
        SsdDims::of(self.b, self.t, self.m.heads, self.m.headdim, self.m.groups, self.m.d_state)
    }

    /// The xBC columns of the projection, contiguous `[R, conv_dim]` (the conv's input).
    fn conv_input<T: Elem>(&self, proj: &[T]) -> Vec<T> {
        let (w, c, di) = (self.m.proj_dim(), self.m.conv_dim(), self.m.d_inner);
        let mut raw = take(self.rows() * c);
        raw.par_chunks_mut(c).zip(proj.par_chunks(w)).for_each(|(r, p)| r.copy_from_slice(&p[di..di + c]));
        raw
    }

    /// The scan's packed inputs `[x | dt]`, `[B | C]`, `[0 | A]` from the conv output and the
    /// projection's dt columns.
    fn scan_inputs<T: Elem>(&self, p: &[T], proj: &[T], xbc: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let m = self.m;
        let (rows, o) = (self.rows(), m.offsets());
        let (h, hp, gn, c, w) = (m.heads, m.headdim, m.groups * m.d_state, m.conv_dim(), m.proj_dim());
        let mut in1 = take(rows * h * (hp + 1));
        in1.par_chunks_mut(h * (hp + 1)).enumerate().for_each(|(r, row)| {
            for hh in 0..h {
                let dst = &mut row[hh * (hp + 1)..(hh + 1) * (hp + 1)];
                dst[..hp].copy_from_slice(&xbc[r * c + hh * hp..r * c + (hh + 1) * hp]);
                dst[hp] = softplus(proj[r * w + m.d_inner + c + hh] + p[o[4] + hh]);
            }
        });
        let mut in2 = take(rows * 2 * gn);
        in2.par_chunks_mut(2 * gn).enumerate().for_each(|(r, row)| {
            let (bm, cm) = (&xbc[r * c + m.d_inner..r * c + m.d_inner + gn], &xbc[r * c + m.d_inner + gn..(r + 1) * c]);
            for g in 0..m.groups {
                let n = m.d_state;
                row[g * 2 * n..g * 2 * n + n].copy_from_slice(&bm[g * n..(g + 1) * n]);
                row[g * 2 * n + n..(g + 1) * 2 * n].copy_from_slice(&cm[g * n..(g + 1) * n]);
            }
        });
        let n_s = self.b * h * hp * m.d_state;
        let mut in3 = vec![T::zero(); n_s + h];
        for hh in 0..h {
            in3[n_s + hh] = T::zero() - p[o[5] + hh].exp();
        }
        (in1, in2, in3)
    }

    /// D per inner channel `[d_inner]` (D is per head or per channel).
    fn d_full<T: Elem>(&self, p: &[T]) -> Vec<T> {
        let (o, m) = (self.m.offsets(), self.m);
        (0..m.d_inner).map(|i| p[o[6] + if m.d_has_hdim { i } else { i / m.headdim }]).collect()
    }

    /// `u = silu(z) ⊙ (y + D ⊙ x)` `[R, d_inner]`, and `y + D ⊙ x` when `keep_y2`.
    fn gate<T: Elem>(&self, p: &[T], proj: &[T], xbc: &[T], y: &[T], keep_y2: bool) -> (Vec<T>, Vec<T>) {
        let m = self.m;
        let (di, c, w) = (m.d_inner, m.conv_dim(), m.proj_dim());
        let dfull = self.d_full(p);
        let mut u = take(self.rows() * di);
        let mut y2 = take(if keep_y2 { self.rows() * di } else { 0 });
        let work = |r: usize, ur: &mut [T], yr: Option<&mut [T]>| {
            with_fast_isa(#[inline(always)] || {
                // Zipped slices (no indexing): the loops vectorise, `exp` included.
                let (z, x, yv) = (&proj[r * w..r * w + di], &xbc[r * c..r * c + di], &y[r * di..(r + 1) * di]);
                let skip = |(&yv, &dv), &x| yv + dv * x;
                for (((u, &z), v), x) in ur.iter_mut().zip(z).zip(yv.iter().zip(&dfull[..di])).zip(x) {
                    *u = z * sigmoid(z) * skip(v, x);
                }
                if let Some(yr) = yr {
                    for ((y2, v), x) in yr.iter_mut().zip(yv.iter().zip(&dfull[..di])).zip(x) {
                        *y2 = skip(v, x);
                    }
                }
            })
        };
        if keep_y2 {
            u.par_chunks_mut(di).zip(y2.par_chunks_mut(di)).enumerate().for_each(|(r, (ur, yr))| work(r, ur, Some(yr)));
        } else {
            u.par_chunks_mut(di).enumerate().for_each(|(r, ur)| work(r, ur, None));
        }
        (u, y2)
    }

    fn forward_impl<T: Elem>(&self, x: &[T], p: &[T]) -> Vec<T> {
        let m = self.m;
        let (rows, o, d, w, c, di) = (self.rows(), m.offsets(), m.d_model, m.proj_dim(), m.conv_dim(), m.d_inner);
        let mut n = take(x.len());
        norm_fwd_rows(x, &p[..d], d, self.eps, &mut n);
        let mut proj = take(rows * w);
        mm_par(rows, w, d, &mut proj, w, false, Mat::rows(&n, d, 0), Mat::rows(&p[o[1]..o[2]], w, 0), T::one());
        give(n);
        let raw = self.conv_input(&proj);
        let xbc = conv_fwd(&raw, &p[o[2]..o[3]], &p[o[3]..o[4]], ConvDims::of(self.t, c, m.d_conv), true);
        give(raw);
        let (in1, in2, in3) = self.scan_inputs(p, &proj, &xbc);
        let scan = ssd_forward(self.ssd_dims(), &in1, &in2, &in3);
        give(in1);
        give(in2);
        let (u, _) = self.gate(p, &proj, &xbc, &scan[..rows * di], false);
        let mut un = take(u.len());
        norm_fwd_rows(&u, &p[o[7]..o[8]], di, self.norm_eps, &mut un);
        give(u);
        let mut y = copy_of(x);
        mm_par(rows, d, di, &mut y, d, true, Mat::rows(&un, di, 0), Mat::rows(&p[o[8]..o[9]], d, 0), T::one());
        give(un);
        self.saved.put_parts(vec![proj, xbc, scan]);
        y
    }

    fn backward_impl<T: Elem>(&self, x: &[T], p: &[T], saved: &[&[T]], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let m = self.m;
        let (rows, o, d, w, c, di, h, hp) = (self.rows(), m.offsets(), m.d_model, m.proj_dim(), m.conv_dim(), m.d_inner, m.heads, m.headdim);
        let (proj, xbc, scan) = (saved[0], saved[1], saved[2]);
        let sd = self.ssd_dims();
        let n_y = rows * di;
        let n_s = self.b * h * hp * m.d_state;
        let mut dp = vec![T::zero(); o[9]];
        // Output projection and the gated norm.
        let (u, y2) = self.gate(p, proj, xbc, &scan[..n_y], true);
        let mut un = take(u.len());
        norm_fwd_rows(&u, &p[o[7]..o[8]], di, self.norm_eps, &mut un);
        mm_par(di, d, rows, &mut dp[o[8]..o[9]], d, false, Mat::rows_t(&un, di, 0), Mat::rows(dy, d, 0), T::one());
        let mut dun = un;
        mm_par(rows, di, d, &mut dun, di, false, Mat::rows(dy, d, 0), Mat::rows_t(&p[o[8]..o[9]], d, 0), T::one());
        let mut du = take(u.len());
        norm_bwd_into(&u, &p[o[7]..o[8]], &dun, di, self.norm_eps, None, &mut du, &mut dp[o[7]..o[8]]);
        give(u);
        give(dun);
        // Gate: dz into the projection's gradient, dy2 (the scan output's and the skip's) in du.
        // Every column of dproj is written: z here, dt with dxBC below, xBC from the conv.
        let mut dproj = take(rows * w);
        dproj.par_chunks_mut(w).zip(du.par_chunks_mut(di)).enumerate().for_each(|(r, (dpr, dur))| {
            with_fast_isa(#[inline(always)] || {
                let (zr, yr) = (&proj[r * w..r * w + di], &y2[r * di..(r + 1) * di]);
                for (((dz, gu), &z), &y) in dpr[..di].iter_mut().zip(dur.iter_mut()).zip(zr).zip(yr) {
                    let (g, s) = (*gu, sigmoid(z));
                    *dz = g * y * s * (T::one() + z * (T::one() - s));
                    *gu = g * z * s;
                }
            })
        });
        let dy2 = du;
        // D skip.
        let d_chan = row_sums::<T>(rows, di, |r, acc| {
            let (g, x) = (&dy2[r * di..(r + 1) * di], &xbc[r * c..r * c + di]);
            acc.iter_mut().zip(g).zip(x).for_each(|((a, &g), &x)| *a += g * x);
        });
        if m.d_has_hdim {
            dp[o[6]..o[7]].copy_from_slice(&d_chan);
        } else {
            for (hh, slot) in dp[o[6]..o[7]].iter_mut().enumerate() {
                *slot = d_chan[hh * hp..(hh + 1) * hp].iter().fold(T::zero(), |a, &v| a + v);
            }
        }
        // The scan.
        let (in1, in2, in3) = self.scan_inputs(p, proj, xbc);
        let mut grad = take(n_y + n_s);
        grad[..n_y].copy_from_slice(&dy2);
        grad[n_y..].fill(T::zero());
        let (g1, g2, g3) = ssd_backward(sd, &in1, &in2, &in3, &scan[n_y + n_s..], &grad);
        give(grad);
        give(in1);
        give(in2);
        // dxBC (conv output) from the scan's gradients and the skip; ddt → dt_raw.
        let gn = m.groups * m.d_state;
        let dfull = self.d_full(p);
        let mut dxbc = take(rows * c);
        dxbc.par_chunks_mut(c).zip(dproj.par_chunks_mut(w)).enumerate().for_each(|(r, (dxr, dpr))| {
            for hh in 0..h {
                let g = &g1[(r * h + hh) * (hp + 1)..(r * h + hh + 1) * (hp + 1)];
                with_fast_isa(#[inline(always)] || {
                    let (dv, gy) = (&dfull[hh * hp..(hh + 1) * hp], &dy2[r * di + hh * hp..r * di + (hh + 1) * hp]);
                    for (((dx, &g), &dv), &gy) in dxr[hh * hp..(hh + 1) * hp].iter_mut().zip(&g[..hp]).zip(dv).zip(gy) {
                        *dx = g + dv * gy;
                    }
                });
                let pre = proj[r * w + di + c + hh] + p[o[4] + hh];
                dpr[di + c + hh] = g[hp] * sigmoid(pre);
            }
            for gg in 0..m.groups {
                let n = m.d_state;
                let src = &g2[(r * m.groups + gg) * 2 * n..(r * m.groups + gg + 1) * 2 * n];
                dxr[di + gg * n..di + (gg + 1) * n].copy_from_slice(&src[..n]);
                dxr[di + gn + gg * n..di + gn + (gg + 1) * n].copy_from_slice(&src[n..]);
            }
        });
        give(g1);
        give(g2);
        give(y2);
        let dtb = row_sums::<T>(rows, h, |r, acc| acc.iter_mut().zip(&dproj[r * w + di + c..(r + 1) * w]).for_each(|(a, &v)| *a += v));
        dp[o[4]..o[5]].copy_from_slice(&dtb);
        for hh in 0..h {
            dp[o[5] + hh] = g3[n_s + hh] * (T::zero() - p[o[5] + hh].exp());
        }
        // The conv (its backward returns [d raw ‖ dw ‖ db]).
        let raw = self.conv_input(proj);
        let cg = conv_bwd(&raw, &p[o[2]..o[3]], &p[o[3]..o[4]], &dxbc, ConvDims::of(self.t, c, m.d_conv), true);
        give(raw);
        give(dxbc);
        dproj.par_chunks_mut(w).zip(cg[..rows * c].par_chunks(c)).for_each(|(dpr, g)| dpr[di..di + c].copy_from_slice(g));
        dp[o[2]..o[4]].copy_from_slice(&cg[rows * c..]);
        // In-projection and the pre-norm.
        let mut n = take(x.len());
        norm_fwd_rows(x, &p[..d], d, self.eps, &mut n);
        mm_par(d, w, rows, &mut dp[o[1]..o[2]], w, false, Mat::rows_t(&n, d, 0), Mat::rows(&dproj, w, 0), T::one());
        mm_par(rows, d, w, &mut n, d, false, Mat::rows(&dproj, w, 0), Mat::rows_t(&p[o[1]..o[2]], w, 0), T::one());
        let mut dx = take(x.len());
        norm_bwd_into(x, &p[..d], &n, d, self.eps, Some(dy), &mut dx, &mut dp[..d]);
        give(n);
        give(dproj);
        give(dy2);
        (dx, dp)
    }

}

impl SublayerKernel for Mamba2Sublayer {
    const NAME: &'static str = "mamba2_sublayer";

    fn check(&self, x: &Layout, p: &Layout) -> Result<()> {
        if x.dims() != [self.b, self.t, self.m.d_model] || p.shape().elem_count() != self.m.offsets()[9] {
            bail!("mamba2_sublayer: x {:?} / packed parameters {:?} do not fit the op", x.dims(), p.dims());
        }
        Ok(())
    }

    fn stash(&self) -> &Stash {
        &self.saved
    }

    fn forward<T: Elem>(&self, x: &[T], p: &[T]) -> Result<Vec<T>> {
        Ok(self.forward_impl(x, p))
    }

    fn backward<T: Elem>(&self, x: &[T], p: &[T], saved: &[&[T]], dy: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        Ok(self.backward_impl(x, p, saved, dy))
    }
}
