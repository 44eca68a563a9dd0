//! The pre-norm Gated DeltaNet sublayer with its residual as one autograd node (Yang, Kautz &
//! Hatamizadeh 2024, arXiv:2412.06464; fla `GatedDeltaNet` with `use_short_conv`, `use_gate`;
//! `../shared/reference/mixers.md` §Gated DeltaNet):
//! ```text
//! n = RMSNorm(x; g)
//! q = l2norm(silu(conv(n W_q))), k = l2norm(silu(conv(n W_k))), v = silu(conv(n W_v))   (per head)
//! β = m·σ(n W_b) (m = 2 with allow_neg_eigval, else 1) ;  g = −exp(A_log)·softplus(n W_a + dt_bias)
//! o = GDR(q, k, v, g, β)  ([`super::gdr_fused`], zero initial state)
//! out = x + (silu(n W_g) ⊙ RMSNorm_V(o; w_o_norm)) W_o
//! ```
//! Why one node: composed from the fused ops, a GDN mixer is ~75 autograd nodes whose inputs are
//! activations, and candle 0.11's backward zero-fills and adds a gradient for each
//! (`examples/graph_nodes.rs`). As one node it is x plus the packed parameters
//! `p = [g ‖ W_q ‖ W_k ‖ W_v ‖ W_a ‖ W_b ‖ W_g ‖ W_o ‖ q_conv ‖ k_conv ‖ v_conv ‖ A_log ‖ dt_bias ‖ o_norm]`.
//! The backward runs each step's hand-written backward in reverse (the scan's and the convs' are
//! those of their own fused ops; `l2norm`: `dx = (dy − y (y·dy)) / ρ`, `ρ = sqrt(Σx² + ε)`).
//! [`crate::blocks::gated_deltanet::GatedDeltaNet`] composes the same computation from candle
//! ops; its tests compare the two, forward and gradients.

use super::attn_fused::Elem;
use super::cpu::{copy_of, give, row_sums, take, Stash};
use super::sublayer_op::{SublayerKernel, SublayerOp};
use super::gdr_fused::{backward as gdr_backward, forward as gdr_forward, Dims as GdrDims};
use super::gemm::{mm_par, Mat};
use super::norm::{bwd_into as norm_bwd_into, fwd_rows as norm_fwd_rows};
use super::short_conv_fused::{bwd as conv_bwd, fwd as conv_fwd, Dims as ConvDims};
use super::simd::{sigmoid, softplus, with_fast_isa};
use candle_core::{bail, Layout, Result, Tensor};
use rayon::prelude::*;

/// Sizes and constants of one GDN sublayer.
#[derive(Clone, Copy, Debug)]
pub struct GdnDims {
    pub d_model: usize,
    pub heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub conv_size: usize,
    /// β ∈ (0, 2) instead of (0, 1).
    pub allow_neg_eigval: bool,
    /// ε of the output RMSNorm.
    pub norm_eps: f64,
    /// ε of the q/k L2 normalisation.
    pub l2_eps: f64,
}

/// Indices of the packed parameters: the six input projections are `WQ..WQ + 6` (q, k, v, a, b,
/// g), the three conv weights `QC..QC + 3` (q, k, v).
const G: usize = 0;
const WQ: usize = 1;
const WO: usize = 7;
const QC: usize = 8;
const ALOG: usize = 11;
const DTB: usize = 12;
const ONORM: usize = 13;

impl GdnDims {
    /// Element counts of the packed parameters, in packing order.
    fn lens(&self) -> [usize; 14] {
        let (d, h, hk, hv, cs) = (self.d_model, self.heads, self.heads * self.key_dim, self.heads * self.value_dim, self.conv_size);
        [d, d * hk, d * hk, d * hv, d * h, d * h, d * hv, hv * d, hk * cs, hk * cs, hv * cs, h, h, self.value_dim]
    }
    fn offsets(&self) -> [usize; 15] {
        let mut o = [0; 15];
        for (i, l) in self.lens().iter().enumerate() {
            o[i + 1] = o[i] + l;
        }
        o
    }
    /// Output columns of the six input projections q, k, v, a, b, g.
    fn proj_cols(&self) -> [usize; 6] {
        let (h, hk, hv) = (self.heads, self.heads * self.key_dim, self.heads * self.value_dim);
        [hk, hk, hv, h, h, hv]
    }
}

/// The parameters, in packing order (shapes as the GDN block's).
pub struct GdnWeights<'a>(pub [&'a Tensor; 14]);

/// `x + GDN(RMSNorm(x; g))` for x `[B, T, d]` as one fused node: CPU, f32/f64 (all inputs the
/// same dtype); `eps` is the pre-norm's.
pub fn gdn_sublayer(x: &Tensor, w: &GdnWeights, dims: GdnDims, eps: f64) -> Result<Tensor> {
    let mut all = vec![x];
    all.extend(w.0.iter().copied());
    if !super::cpu_fusable(&all) {
        bail!("gdn_sublayer: CPU only, all inputs f32 or all f64");
    }
    let (b, t, d) = x.dims3()?;
    let lens = dims.lens();
    if d != dims.d_model || w.0.iter().zip(lens).any(|(p, l)| p.elem_count() != l) {
        bail!("gdn_sublayer: x {:?} and parameters {:?} do not fit {dims:?}", x.dims(), w.0.iter().map(|p| p.dims().to_vec()).collect::<Vec<_>>());
    }
    let flat = w.0.iter().map(|p| p.flatten_all()).collect::<Result<Vec<_>>>()?;
    let p = Tensor::cat(&flat, 0)?;
    x.contiguous()?.apply_op2(&p, SublayerOp(GdnSublayer { b, t, m: dims, eps, saved: Stash::default() }))
}

struct GdnSublayer {
    b: usize,
    t: usize,
    m: GdnDims,
    eps: f64,
    /// `[q, k, v, a, b, g projections, conv outputs of q, k, v, scan out]`.
    saved: Stash,
}

/// Per-row `1/sqrt(Σx² + ε)` of rows of `w` elements.
fn inv_l2<T: Elem>(x: &[T], w: usize, eps: f64) -> Vec<T> {
    x.par_chunks(w).map(|r| T::from_f64(1.0 / (super::simd::dot(r, r).to_f64() + eps).sqrt())).collect()
}

impl GdnSublayer {
    fn rows(&self) -> usize {
        self.b * self.t
    }

    fn gdr_dims(&self) -> GdrDims {
        GdrDims::of(self.b, self.t, self.m.heads, self.m.key_dim, self.m.value_dim)
    }

    /// `-exp(A_log)` per head and `β` scale.
    fn decay_and_beta_scale<T: Elem>(&self, p: &[T]) -> (Vec<T>, T) {
        let o = self.m.offsets();
        let neg_a = (0..self.m.heads).map(|h| T::zero() - p[o[ALOG] + h].exp()).collect();
        (neg_a, if self.m.allow_neg_eigval { T::from_f64(2.0) } else { T::one() })
    }

    /// The scan's packed input `[q | k | g | β]` `[R, H, 2K+2]` from the conv outputs (q, k
    /// L2-normalised here) and the a, b projections.
    /// Also returns the per-(row, head) `1/ρ` of q and k (the L2 norms' backward reads them).
    #[allow(clippy::type_complexity)]
    fn scan_input<T: Elem>(&self, p: &[T], cq: &[T], ck: &[T], pa: &[T], pb: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (h, kd) = (self.m.heads, self.m.key_dim);
        let o = self.m.offsets();
        let w = 2 * kd + 2;
        let (neg_a, bscale) = self.decay_and_beta_scale(p);
        let (iq, ik) = (inv_l2(cq, kd, self.m.l2_eps), inv_l2(ck, kd, self.m.l2_eps));
        let mut packed = take(self.rows() * h * w);
        packed.par_chunks_mut(w).enumerate().for_each(|(rh, row)| {
            let hh = rh % h;
            for j in 0..kd {
                row[j] = cq[rh * kd + j] * iq[rh];
                row[kd + j] = ck[rh * kd + j] * ik[rh];
            }
            row[2 * kd] = neg_a[hh] * softplus(pa[rh] + p[o[DTB] + hh]);
            row[2 * kd + 1] = bscale * sigmoid(pb[rh]);
        });
        (packed, iq, ik)
    }

    fn forward_impl<T: Elem>(&self, x: &[T], p: &[T]) -> Vec<T> {
        let m = self.m;
        let (rows, o, d, h, vd) = (self.rows(), m.offsets(), m.d_model, m.heads, m.value_dim);
        let hv = h * vd;
        let mut n = take(x.len());
        norm_fwd_rows(x, &p[..d], d, self.eps, &mut n);
        let cols = m.proj_cols();
        let mut proj: Vec<Vec<T>> = Vec::with_capacity(6);
        for (i, &c) in cols.iter().enumerate() {
            let mut y = take(rows * c);
            mm_par(rows, c, d, &mut y, c, false, Mat::rows(&n, d, 0), Mat::rows(&p[o[WQ + i]..o[WQ + i + 1]], c, 0), T::one());
            proj.push(y);
        }
        give(n);
        let conv = |i: usize| {
            let c = cols[i];
            conv_fwd(&proj[i], &p[o[QC + i]..o[QC + i + 1]], &vec![T::zero(); c], ConvDims::of(self.t, c, m.conv_size), true)
        };
        let (cq, ck, cv) = (conv(0), conv(1), conv(2));
        let (packed, _, _) = self.scan_input(p, &cq, &ck, &proj[3], &proj[4]);
        let scan = gdr_forward(self.gdr_dims(), &packed, &cv, &vec![T::zero(); self.b * h * m.key_dim * vd]);
        give(packed);
        let mut on = take(rows * hv);
        norm_fwd_rows(&scan[..rows * hv], &p[o[ONORM]..o[ONORM + 1]], vd, m.norm_eps, &mut on);
        let pg = &proj[5];
        on.par_chunks_mut(CH).zip(pg.par_chunks(CH)).for_each(|(oc, gc)| {
            with_fast_isa(#[inline(always)] || {
                for (o, &g) in oc.iter_mut().zip(gc) {
                    *o = g * sigmoid(g) * *o;
                }
            })
        });
        let mut y = copy_of(x);
        mm_par(rows, d, hv, &mut y, d, true, Mat::rows(&on, hv, 0), Mat::rows(&p[o[WO]..o[WO + 1]], d, 0), T::one());
        give(on);
        let mut saved = proj;
        saved.extend([cq, ck, cv, scan]);
        self.saved.put_parts(saved);
        y
    }

    fn backward_impl<T: Elem>(&self, x: &[T], p: &[T], s: &[&[T]], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let m = self.m;
        let (rows, o, d, h, kd, vd) = (self.rows(), m.offsets(), m.d_model, m.heads, m.key_dim, m.value_dim);
        let (hk, hv) = (h * kd, h * vd);
        let cols = m.proj_cols();
        let (proj, cq, ck, cv, scan) = (&s[..6], s[6], s[7], s[8], s[9]);
        let mut dp = vec![T::zero(); o[14]];
        // Every column block is written below: 5 with the gate, 3 and 4 with q/k, 0–2 from the convs.
        let mut dproj: Vec<Vec<T>> = cols.iter().map(|&c| take(rows * c)).collect();
        // Output projection, gate and output norm.
        let mut on = take(rows * hv);
        norm_fwd_rows(&scan[..rows * hv], &p[o[ONORM]..o[ONORM + 1]], vd, m.norm_eps, &mut on);
        let pg = proj[5];
        let mut gated = copy_of(&on);
        gated.par_chunks_mut(CH).zip(pg.par_chunks(CH)).for_each(|(oc, gc)| {
            with_fast_isa(#[inline(always)] || oc.iter_mut().zip(gc).for_each(|(o, &g)| *o = g * sigmoid(g) * *o))
        });
        mm_par(hv, d, rows, &mut dp[o[WO]..o[WO + 1]], d, false, Mat::rows_t(&gated, hv, 0), Mat::rows(dy, d, 0), T::one());
        give(gated);
        let mut dgated = take(rows * hv);
        mm_par(rows, hv, d, &mut dgated, hv, false, Mat::rows(dy, d, 0), Mat::rows_t(&p[o[WO]..o[WO + 1]], d, 0), T::one());
        // dg_raw into dproj[5]; d(on) in place of dgated.
        dgated.par_chunks_mut(CH).zip(dproj[5].par_chunks_mut(CH)).zip(on.par_chunks(CH).zip(pg.par_chunks(CH))).for_each(|((dc, dgc), (oc, gc))| {
            with_fast_isa(#[inline(always)] || {
                for i in 0..dc.len() {
                    let (g, dv) = (gc[i], dc[i]);
                    let s = sigmoid(g);
                    dgc[i] = dv * oc[i] * s * (T::one() + g * (T::one() - s));
                    dc[i] = dv * g * s;
                }
            })
        });
        give(on);
        let mut d_o = take(rows * hv + self.b * h * kd * vd);
        d_o[rows * hv..].fill(T::zero()); // no gradient into the final state
        norm_bwd_into(&scan[..rows * hv], &p[o[ONORM]..o[ONORM + 1]], &dgated, vd, m.norm_eps, None, &mut d_o[..rows * hv], &mut dp[o[ONORM]..o[ONORM + 1]]);
        give(dgated);
        // The scan.
        let (packed, iq, ik) = self.scan_input(p, cq, ck, proj[3], proj[4]);
        let n_s = self.b * h * kd * vd;
        let (gpk, gv, _ds0) = gdr_backward(self.gdr_dims(), &packed, cv, &scan[rows * hv + n_s..], &d_o);
        give(d_o);
        // Unpack: q, k through the L2 norm; g and β to the a, b projections.
        let (neg_a, bscale) = self.decay_and_beta_scale(p);
        let w = 2 * kd + 2;
        let mut dcq = take(rows * hk);
        let mut dck = take(rows * hk);
        let (dpa, dpb) = {
            let (left, right) = dproj.split_at_mut(4);
            (&mut left[3], &mut right[0])
        };
        dcq.par_chunks_mut(kd)
            .zip(dck.par_chunks_mut(kd))
            .zip(dpa.par_chunks_mut(1).zip(dpb.par_chunks_mut(1)))
            .enumerate()
            .for_each(|(rh, ((dq, dk), (da, db)))| {
                let hh = rh % h;
                let g = &gpk[rh * w..(rh + 1) * w];
                for (dx, gy, xs, inv) in [(dq, &g[..kd], &cq[rh * kd..(rh + 1) * kd], iq[rh]), (dk, &g[kd..2 * kd], &ck[rh * kd..(rh + 1) * kd], ik[rh])] {
                    // y = x·inv: dx = inv·(dy − y (y·dy)).
                    let ydy = inv * super::simd::dot(xs, gy);
                    for j in 0..kd {
                        dx[j] = inv * (gy[j] - xs[j] * inv * ydy);
                    }
                }
                let pre = proj[3][rh] + p[o[DTB] + hh];
                da[0] = g[2 * kd] * neg_a[hh] * sigmoid(pre);
                let sb = sigmoid(proj[4][rh]);
                db[0] = g[2 * kd + 1] * bscale * sb * (T::one() - sb);
            });
        let dtb = row_sums::<T>(rows, h, |r, acc| acc.iter_mut().zip(&dproj[3][r * h..(r + 1) * h]).for_each(|(a, &v)| *a += v));
        dp[o[DTB]..o[DTB + 1]].copy_from_slice(&dtb);
        // g = −exp(A_log)·softplus(·): dA_log = Σ dg·g.
        let dal = row_sums::<T>(rows, h, |r, acc| {
            for (hh, a) in acc.iter_mut().enumerate() {
                let rh = r * h + hh;
                *a += gpk[rh * w + 2 * kd] * packed[rh * w + 2 * kd];
            }
        });
        dp[o[ALOG]..o[ALOG + 1]].copy_from_slice(&dal);
        give(gpk);
        give(packed);
        // The convs: [d raw ‖ dw ‖ db] each.
        for (i, dconv) in [dcq, dck, gv].into_iter().enumerate() {
            let c = cols[i];
            let g = conv_bwd(proj[i], &p[o[QC + i]..o[QC + i + 1]], &vec![T::zero(); c], &dconv, ConvDims::of(self.t, c, m.conv_size), true);
            dproj[i].copy_from_slice(&g[..rows * c]);
            dp[o[QC + i]..o[QC + i + 1]].copy_from_slice(&g[rows * c..rows * c + c * m.conv_size]);
            give(dconv);
        }
        // Input projections and the pre-norm.
        let mut n = take(x.len());
        norm_fwd_rows(x, &p[..d], d, self.eps, &mut n);
        for (i, &c) in cols.iter().enumerate() {
            mm_par(d, c, rows, &mut dp[o[WQ + i]..o[WQ + i + 1]], c, false, Mat::rows_t(&n, d, 0), Mat::rows(&dproj[i], c, 0), T::one());
        }
        for (i, &c) in cols.iter().enumerate() {
            mm_par(rows, d, c, &mut n, d, i > 0, Mat::rows(&dproj[i], c, 0), Mat::rows_t(&p[o[WQ + i]..o[WQ + i + 1]], c, 0), T::one());
        }
        let mut dx = take(x.len());
        norm_bwd_into(x, &p[..d], &n, d, self.eps, Some(dy), &mut dx, &mut dp[o[G]..o[G + 1]]);
        give(n);
        dproj.into_iter().for_each(give);
        (dx, dp)
    }

}

/// Elements per parallel task of the element-wise passes.
const CH: usize = 16 * 1024;

impl SublayerKernel for GdnSublayer {
    const NAME: &'static str = "gdn_sublayer";

    fn check(&self, x: &Layout, p: &Layout) -> Result<()> {
        if x.dims() != [self.b, self.t, self.m.d_model] || p.shape().elem_count() != self.m.offsets()[14] {
            bail!("gdn_sublayer: x {:?} / packed parameters {:?} do not fit the op", x.dims(), p.dims());
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
