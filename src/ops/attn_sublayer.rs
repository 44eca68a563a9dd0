//! The pre-norm softmax-attention sublayer with its residual as one autograd node:
//! `y = x + attn(rope(n W_q), rope(n W_k), n W_v) W_o`, `n = RMSNorm(x; g)` (Llama's attention
//! sublayer, Touvron et al. 2023, arXiv:2302.13971; RoPE half-split as [`super::rope`]; causal
//! GQA attention as [`super::attn_fused`]).
//!
//! Why one node: candle 0.11's backward allocates a zero gradient and adds into it for every
//! input of every node. Composed from the fused norm, linear, RoPE and attention ops this
//! sublayer is nine nodes whose inputs are activations (n three times, q and k before and after
//! RoPE, v, the attention output, x and the block output at the residual add): 11 values of
//! zero-filling and adding per model-width value of every token. As one node it is x alone, plus
//! the packed weights `p = [g ‖ W_q ‖ W_k ‖ W_v ‖ W_o]` (flattened, weights `[in, out]` as the
//! [`crate::blocks::attention::Attention`] parameters; candle's concatenation routes each piece
//! of the gradient back to its parameter).
//!
//! Forward: the norm (row statistics in f64), three GEMMs, RoPE on q and k, the flash-style
//! attention kernel, a GEMM accumulated onto x. The rotated q, k, and v, o and the attention's
//! log-sum-exp stay in the op ([`Stash`]). Backward: `dW_o = oᵀ dy`, `do = dy W_oᵀ`, the
//! attention kernel's backward, the inverse rotation of dq and dk, `dW_* = nᵀ d*` (n recomputed),
//! `dn = dq W_qᵀ + dk W_kᵀ + dv W_vᵀ`, then the norm's backward plus `dy` for dx.
//! [`attention_sublayer_composed`] is the reference. CPU, f32/f64.
//!
//! The token mixing is a [`Core`]: causal softmax attention, or MoBA's block-sparse attention
//! (Lu et al. 2025, arXiv:2502.13189; the kernel of [`super::moba_fused`]), which share every
//! other step.

use super::attn_fused::{backward as attn_backward, forward as attn_forward, Dims, Elem};
use super::cpu::{copy_of, give, take, Stash};
use super::sublayer_op::{SublayerKernel, SublayerOp};
use super::gemm::{mm_par, Mat};
use super::moba_fused::{backward_raw as moba_backward, forward_raw as moba_forward};
use super::norm::{bwd_into as norm_bwd_into, fwd_rows as norm_fwd_rows};
use super::rope::Rope;
use super::short_conv_fused::{bwd as conv_bwd, fwd as conv_fwd, Dims as ConvDims};
use candle_core::{bail, Layout, Result, Tensor};

/// The weights of one attention sublayer: `g [d]`, `wq [d, hq·hd]`, `wk`, `wv [d, hkv·hd]`,
/// `wo [hq·hd, d]`.
pub struct AttnWeights<'a> {
    pub g: &'a Tensor,
    pub wq: &'a Tensor,
    pub wk: &'a Tensor,
    pub wv: &'a Tensor,
    pub wo: &'a Tensor,
    /// The residual short convs on q, k, v (`[C, taps]` each): `p ← p + conv(p)` before RoPE.
    pub convs: Option<[&'a Tensor; 3]>,
}

/// How the heads mix tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Core {
    /// Causal softmax attention ([`super::attn::attn`]).
    Causal,
    /// MoBA ([`super::moba::moba`]) with its key block size and selected blocks per query.
    Moba { block_size: usize, top_k: usize },
}

/// `x + attention(RMSNorm(x))` for x `[B, T, d]` with `hq` query and `hkv` kv heads of `hd`
/// dims, RoPE from `rope` (positions 0..T), token mixing by `core`. One fused node on CPU for
/// f32/f64; the composed form elsewhere.
pub fn attention_sublayer(x: &Tensor, w: &AttnWeights, rope: &Rope, heads: (usize, usize, usize), core: Core, eps: f64) -> Result<Tensor> {
    let (hq, hkv, hd) = heads;
    let (b, t, d) = x.dims3()?;
    let (qd, kd) = (hq * hd, hkv * hd);
    let conv = w.convs.map(|c| c[0].dim(1)).transpose()?.unwrap_or(0);
    let convs_fit = w.convs.is_none_or(|c| c[0].dims() == [qd, conv] && c[1].dims() == [kd, conv] && c[2].dims() == [kd, conv] && conv > 0);
    let fits = convs_fit && w.g.dims() == [d] && w.wq.dims() == [d, qd] && w.wk.dims() == [d, kd] && w.wv.dims() == [d, kd] && w.wo.dims() == [qd, d];
    if let Core::Moba { block_size, top_k } = core {
        if block_size == 0 || top_k == 0 {
            bail!("attention_sublayer: MoBA block_size and top_k must be >= 1; got {block_size}, {top_k}");
        }
    }
    if !fits || hkv == 0 || hq % hkv != 0 {
        bail!(
            "attention_sublayer: x {:?}, g {:?}, wq {:?}, wk {:?}, wv {:?}, wo {:?} do not fit {hq} query / {hkv} kv heads of {hd}",
            x.dims(),
            w.g.dims(),
            w.wq.dims(),
            w.wk.dims(),
            w.wv.dims(),
            w.wo.dims()
        );
    }
    let mut parts = vec![w.g, w.wq, w.wk, w.wv, w.wo];
    parts.extend(w.convs.iter().flatten());
    if !super::cpu_fusable(&[&[x][..], &parts].concat()) {
        return attention_sublayer_composed(x, w, rope, heads, core, eps);
    }
    let p = Tensor::cat(&parts.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let op = AttnSublayer { b, t, d, hq, hkv, hd, eps, core, rope: rope.clone(), conv, saved: Stash::default() };
    x.contiguous()?.apply_op2(&p, SublayerOp(op))
}

/// Reference form from the composed ops (norm, matmuls, RoPE, causal attention).
pub fn attention_sublayer_composed(x: &Tensor, w: &AttnWeights, rope: &Rope, heads: (usize, usize, usize), core: Core, eps: f64) -> Result<Tensor> {
    let (hq, hkv, hd) = heads;
    let (b, t, d) = x.dims3()?;
    let n = super::norm::rms_norm_composed(x, w.g, eps)?.reshape((b * t, d))?;
    let pre = |wp: &Tensor, i: usize| -> Result<Tensor> {
        let y = n.matmul(wp)?.reshape((b, t, wp.dim(1)?))?;
        match w.convs {
            Some(c) => &y + super::short_conv::causal_conv(&y, c[i])?,
            None => Ok(y),
        }
    };
    let q = rope.apply_composed(&pre(w.wq, 0)?.reshape((b, t, hq, hd))?)?;
    let k = rope.apply_composed(&pre(w.wk, 1)?.reshape((b, t, hkv, hd))?)?;
    let v = pre(w.wv, 2)?.reshape((b, t, hkv, hd))?;
    let o = match core {
        Core::Causal => super::attn::attn_composed(&q, &k, &v)?,
        Core::Moba { block_size, top_k } => super::moba::moba_composed(&q, &k, &v, block_size, top_k)?,
    };
    let o = o.reshape((b * t, hq * hd))?;
    x + o.matmul(w.wo)?.reshape((b, t, d))?
}

struct AttnSublayer {
    b: usize,
    t: usize,
    d: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    eps: f64,
    core: Core,
    rope: Rope,
    /// Taps of the residual short convs on q, k, v (0: none).
    conv: usize,
    /// `[q, k, v, o ‖ L]`: rotated q, k, v, the attention output and its log-sum-exp; with the
    /// convs also the raw projections `[q, k, v]` (the convs' inputs).
    saved: Stash,
}

impl AttnSublayer {
    /// Offsets of g, W_q, W_k, W_v, W_o, q_conv, k_conv, v_conv in the packed weights, and their
    /// total length (the convs are empty without them).
    fn offsets(&self) -> [usize; 9] {
        let (d, qd, kd, cs) = (self.d, self.hq * self.hd, self.hkv * self.hd, self.conv);
        let lens = [d, d * qd, d * kd, d * kd, qd * d, qd * cs, kd * cs, kd * cs];
        let mut o = [0; 9];
        for (i, l) in lens.iter().enumerate() {
            o[i + 1] = o[i] + l;
        }
        o
    }

    fn sizes(&self) -> (usize, usize, usize, usize, usize) {
        (self.b, self.t, self.hq, self.hkv, self.hd)
    }

    /// The core's forward: `[o ‖ L]`.
    fn mix<T: Elem>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        match self.core {
            Core::Causal => attn_forward(Dims::plain(self.b, self.t, self.hq, self.hkv, self.hd), q, k, v),
            Core::Moba { block_size, top_k } => moba_forward(self.sizes(), block_size, top_k, q, k, v),
        }
    }

    /// The core's backward: (dq, dk, dv).
    #[allow(clippy::type_complexity)]
    fn mix_back<T: Elem>(&self, q: &[T], k: &[T], v: &[T], o: &[T], lse: &[T], d_o: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        match self.core {
            Core::Causal => attn_backward(Dims::plain(self.b, self.t, self.hq, self.hkv, self.hd), q, k, v, o, lse, d_o),
            Core::Moba { block_size, top_k } => moba_backward(self.sizes(), block_size, top_k, q, k, v, o, lse, d_o),
        }
    }

    fn forward_impl<T: Elem>(&self, x: &[T], p: &[T]) -> Result<Vec<T>> {
        let (rows, d, t) = (self.b * self.t, self.d, self.t);
        let (qd, kd) = (self.hq * self.hd, self.hkv * self.hd);
        let o = self.offsets();
        let mut n = take(x.len());
        norm_fwd_rows(x, &p[..d], d, self.eps, &mut n);
        let raw: Vec<Vec<T>> = [(1, qd), (2, kd), (3, kd)]
            .into_iter()
            .map(|(i, cols)| {
                let mut y = take(rows * cols);
                mm_par(rows, cols, d, &mut y, cols, false, Mat::rows(&n, d, 0), Mat::rows(&p[o[i]..o[i + 1]], cols, 0), T::one());
                y
            })
            .collect();
        give(n);
        // `p + conv(p)` with the residual short convs, else p.
        // Without the convs the raw projections are used as they are (and not kept twice).
        let (pre, raw): (Vec<Vec<T>>, Vec<Vec<T>>) = if self.conv > 0 {
            let pre = raw.iter().enumerate().map(|(i, r)| {
                let c = r.len() / rows;
                let mut y = conv_fwd(r, &p[o[5 + i]..o[6 + i]], &vec![T::zero(); c], ConvDims::of(t, c, self.conv), false);
                y.iter_mut().zip(r).for_each(|(y, &v)| *y += v);
                y
            }).collect();
            (pre, raw)
        } else {
            (raw, Vec::new())
        };
        let mut pre = pre.into_iter();
        let (pq, pk, v) = (pre.next().expect("q"), pre.next().expect("k"), pre.next().expect("v"));
        let q = self.rope.rotate_cpu(&pq, t, self.hq, self.hd, false)?;
        let k = self.rope.rotate_cpu(&pk, t, self.hkv, self.hd, false)?;
        give(pq);
        give(pk);
        let ol = self.mix(&q, &k, &v);
        let mut y = copy_of(x);
        mm_par(rows, d, qd, &mut y, d, true, Mat::rows(&ol[..rows * qd], qd, 0), Mat::rows(&p[o[4]..o[5]], d, 0), T::one());
        let mut saved = vec![q, k, v, ol];
        saved.extend(raw);
        self.saved.put_parts(saved);
        Ok(y)
    }

    /// Returns `(dx, dp)`.
    fn backward_impl<T: Elem>(&self, x: &[T], p: &[T], saved: &[&[T]], dy: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        let (rows, d, t) = (self.b * self.t, self.d, self.t);
        let (qd, kd) = (self.hq * self.hd, self.hkv * self.hd);
        let o = self.offsets();
        let (q, k, v) = (saved[0], saved[1], saved[2]);
        let (out, lse) = saved[3].split_at(rows * qd);
        let mut dp = vec![T::zero(); o[8]];
        mm_par(qd, d, rows, &mut dp[o[4]..o[5]], d, false, Mat::rows_t(out, qd, 0), Mat::rows(dy, d, 0), T::one());
        let mut d_o = take(rows * qd);
        mm_par(rows, qd, d, &mut d_o, qd, false, Mat::rows(dy, d, 0), Mat::rows_t(&p[o[4]..o[5]], d, 0), T::one());
        let (dq, dk, dv) = self.mix_back(q, k, v, out, lse, &d_o);
        give(d_o);
        let (dq0, dk0) = (dq, dk);
        let dq = self.rope.rotate_cpu(&dq0, t, self.hq, self.hd, true)?;
        let dk = self.rope.rotate_cpu(&dk0, t, self.hkv, self.hd, true)?;
        give(dq0);
        give(dk0);
        let mut g = [dq, dk, dv];
        if self.conv > 0 {
            // Through `p + conv(p)`: dp_raw = dpre + convᵀ(dpre); the conv weights' gradients.
            for (i, gi) in g.iter_mut().enumerate() {
                let c = gi.len() / rows;
                let cg = conv_bwd(saved[4 + i], &p[o[5 + i]..o[6 + i]], &vec![T::zero(); c], gi, ConvDims::of(t, c, self.conv), false);
                gi.iter_mut().zip(&cg[..rows * c]).for_each(|(v, &w)| *v += w);
                dp[o[5 + i]..o[6 + i]].copy_from_slice(&cg[rows * c..rows * c + c * self.conv]);
            }
        }
        let mut n = take(x.len());
        norm_fwd_rows(x, &p[..d], d, self.eps, &mut n);
        let parts = [(&g[0], qd, o[1]..o[2]), (&g[1], kd, o[2]..o[3]), (&g[2], kd, o[3]..o[4])];
        for (g, cols, range) in parts.clone() {
            mm_par(d, cols, rows, &mut dp[range], cols, false, Mat::rows_t(&n, d, 0), Mat::rows(g, cols, 0), T::one());
        }
        // dn (into n's buffer).
        for (i, (g, cols, range)) in parts.into_iter().enumerate() {
            mm_par(rows, d, cols, &mut n, d, i > 0, Mat::rows(g, cols, 0), Mat::rows_t(&p[range], cols, 0), T::one());
        }
        let mut dx = take(x.len());
        norm_bwd_into(x, &p[..d], &n, d, self.eps, Some(dy), &mut dx, &mut dp[..d]);
        give(n);
        g.into_iter().for_each(give);
        Ok((dx, dp))
    }

}

impl SublayerKernel for AttnSublayer {
    const NAME: &'static str = "attention_sublayer";

    fn check(&self, x: &Layout, p: &Layout) -> Result<()> {
        if x.dims() != [self.b, self.t, self.d] || p.shape().elem_count() != self.offsets()[8] {
            bail!("attention_sublayer: x {:?} / packed weights {:?} do not fit the op", x.dims(), p.dims());
        }
        Ok(())
    }

    fn stash(&self) -> &Stash {
        &self.saved
    }

    fn forward<T: Elem>(&self, x: &[T], p: &[T]) -> Result<Vec<T>> {
        self.forward_impl(x, p)
    }

    fn backward<T: Elem>(&self, x: &[T], p: &[T], saved: &[&[T]], dy: &[T]) -> Result<(Vec<T>, Vec<T>)> {
        self.backward_impl(x, p, saved, dy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor};
    use candle_core::{DType, Device, Var};

    /// g, wq, wk, wv, wo for width d, heads (hq, hkv, hd).
    fn vars(d: usize, (hq, hkv, hd): (usize, usize, usize), dt: DType, seed: u64) -> Vec<Var> {
        let shapes: [&[usize]; 5] = [&[d], &[d, hq * hd], &[d, hkv * hd], &[d, hkv * hd], &[hq * hd, d]];
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = rand_tensor(s, 0.5, seed + i as u64);
                let t = if i == 0 { (t + 1.0).unwrap() } else { t };
                Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap()
            })
            .collect()
    }

    fn weights(w: &[Var]) -> AttnWeights<'_> {
        AttnWeights { g: w[0].as_tensor(), wq: w[1].as_tensor(), wk: w[2].as_tensor(), wv: w[3].as_tensor(), wo: w[4].as_tensor(), convs: None }
    }

    /// Fused == composed, forward and every gradient, f64 and f32, with GQA and a sequence
    /// length that is not a multiple of the kernel's block.
    #[test]
    fn fused_matches_composed() {
        let moba = Core::Moba { block_size: 16, top_k: 2 };
        for (dt, tol) in [(DType::F64, 1e-11), (DType::F32, 5e-5)] {
            for (heads, core) in [((4, 2, 6), Core::Causal), ((2, 2, 4), Core::Causal), ((4, 2, 6), moba), ((2, 2, 4), moba)] {
                let (b, t, d) = (2, 70, 10);
                let rope = Rope::new(80, heads.2, 10000.0, dt, &Device::Cpu).unwrap();
                let x = Var::from_tensor(&rand_tensor(&[b, t, d], 1.0, 1).to_dtype(dt).unwrap()).unwrap();
                let w = vars(d, heads, dt, 2);
                let wy = rand_tensor(&[b, t, d], 1.0, 9).to_dtype(dt).unwrap();
                let run = |fused: bool| {
                    let f = if fused { attention_sublayer } else { attention_sublayer_composed };
                    let y = f(x.as_tensor(), &weights(&w), &rope, heads, core, 1e-6).unwrap();
                    let grads = (&y * &wy).unwrap().sum_all().unwrap().backward().unwrap();
                    let gs: Vec<Tensor> = std::iter::once(&x).chain(&w).map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
                    (y, gs)
                };
                let ((yf, gf), (yc, gc)) = (run(true), run(false));
                assert_close("attention sublayer fwd", &yc, &yf, tol);
                for (i, (c, f)) in gc.iter().zip(&gf).enumerate() {
                    assert_close(&format!("attention sublayer grad {i} {heads:?} {core:?} {dt:?}"), c, f, tol);
                }
            }
        }
    }

    /// Finite differences in f64 w.r.t. x and every weight.
    #[test]
    fn gradients_match_finite_differences() {
        let heads = (2, 1, 4);
        let rope = Rope::new(6, 4, 10000.0, DType::F64, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&rand_tensor(&[2, 5, 6], 1.0, 4)).unwrap();
        let w = vars(6, heads, DType::F64, 5);
        let wy = rand_tensor(&[2, 5, 6], 1.0, 6);
        let names = ["x", "g", "wq", "wk", "wv", "wo"];
        let all: Vec<(String, Var)> = names.iter().map(|s| s.to_string()).zip(std::iter::once(x.clone()).chain(w.iter().cloned())).collect();
        for core in [Core::Causal, Core::Moba { block_size: 2, top_k: 1 }] {
            let loss = || (attention_sublayer(x.as_tensor(), &weights(&w), &rope, heads, core, 1e-6).unwrap() * &wy).unwrap().sum_all().unwrap();
            check_grads(&format!("attention_sublayer {core:?}"), &all, &loss, 20);
        }
    }

    /// Backpropagating the same output twice gives the same gradients; shapes that do not fit
    /// are errors.
    #[test]
    fn backward_twice_and_bad_shapes() {
        let heads = (2, 1, 4);
        let rope = Rope::new(9, 4, 10000.0, DType::F64, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&rand_tensor(&[1, 9, 6], 1.0, 7)).unwrap();
        let w = vars(6, heads, DType::F64, 8);
        let l = attention_sublayer(x.as_tensor(), &weights(&w), &rope, heads, Core::Causal, 1e-6).unwrap().sqr().unwrap().sum_all().unwrap();
        let (g1, g2) = (l.backward().unwrap(), l.backward().unwrap());
        for v in std::iter::once(&x).chain(&w) {
            assert_close("twice", g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap(), 0.0);
        }
        assert!(attention_sublayer(x.as_tensor(), &weights(&w), &rope, (2, 2, 4), Core::Causal, 1e-6).is_err());
        let long = rand_tensor(&[1, 10, 6], 1.0, 7);
        assert!(attention_sublayer(&long, &weights(&w), &rope, heads, Core::Causal, 1e-6).is_err());
        assert!(attention_sublayer(x.as_tensor(), &weights(&w), &rope, heads, Core::Moba { block_size: 0, top_k: 1 }, 1e-6).is_err());
    }
}
