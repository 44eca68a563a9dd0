//! RWKV-7 "Goose" time-mix (Peng et al. 2025, arXiv:2503.14456), parameterised and initialised
//! as BlinkDL/RWKV-LM `RWKV-v7/train_temp/src/model.py::RWKV_Tmix_x070` with the current
//! ("clampw") decay, checked against `RWKV-v7/rwkv_v7_numpy.py::time_mixing`;
//! `../shared/reference/mixers.md` §4. Core op: [`crate::ops::rwkv7`].
//!
//! For x `[B,T,C]` (weights stored `[in, out]`, H = C / N heads of size N):
//! ```text
//! xx = shift(x) − x                        (shift: x_{t−1}, zero (or the carried token) at t=0)
//! x_∗ = x + xx ⊙ μ_∗   for ∗ ∈ r, w, k, v, a, g
//! r = x_r W_r ;  k = x_k W_k ;  v = x_v W_v
//! w = exp(−e^{−½} · σ(w0 + tanh(x_w W_w1) W_w2))          ∈ (0.545, 1)   (f32/f64)
//! layer 0: v_first = v ;  later: v = v + (v_first − v) ⊙ σ(v0 + (x_v W_v1) W_v2)
//! a = σ(a0 + (x_a W_a1) W_a2) ;  g = σ(x_g W_g1) W_g2
//! kk = L2normalize_head(k ⊙ k_k)  (eps 1e-12) ;  k = k ⊙ (1 + (a − 1) ⊙ k_a)
//! y = wkv7(r, w, k, v, a = −kk, b = kk ⊙ a)               (no scale on r)
//! y = GroupNorm_H(y; ln_w, ln_b, eps 64e-5) + (Σ_head r ⊙ k ⊙ r_k) v
//! out = (y ⊙ g) W_o
//! ```
//! `v_first` travels through [`ForwardCtx`]: the first RWKV-7 layer to run (no value residual
//! parameters when it is layer 0) stores its v; later layers lerp toward it.
//!
//! Init (BlinkDL, ℓ = layer, L = layers, ddd_i = i/C, r1 = 1 − ℓ/L, r0 = ℓ/(L−1)):
//! μ_r = μ_g = 1 − ddd^{0.2 r1}, μ_w = μ_a = 1 − ddd^{0.9 r1}, μ_k = μ_v = 1 − ddd^{0.7 r1};
//! w0 = −6 + 6 (n/(C−1))^{1 + r0^{0.3}} + 0.5 + 2.5 zigzag; a0 = −0.19 + 0.3 zigzag + 0.4 linear;
//! v0 = 0.73 − 0.4 linear; k_k = 0.71 − 0.1 linear; k_a = 1.02; r_k = −0.04; LoRA down-projections
//! zero, up-projections orthogonal × 0.1; W_r, W_v ~ U(±0.5/√C), W_k ~ U(±0.05/√C), W_o = 0;
//! ln_w = ((1+ℓ)/L)^{0.7} (BlinkDL `generate_init_weight`), ln_b = 0. The model-level
//! `init.std` does not apply to this block. Weight decay: only W_r, W_k, W_v, W_o (BlinkDL
//! decays 2-D `.weight` matrices only; LoRAs, μ, biases, k_k, k_a, r_k, ln_x are exempt).
//!
//! Forms: [`Rwkv7::forward`] (chunked op, training), [`Rwkv7::forward_with_state`] (carries
//! the token-shift and WKV state between segments) and [`Rwkv7::step`] (one token, step op).

use super::{BlockConfig, BlockDims, BlockEntry, ForwardCtx, Mixer};
use crate::ops::channel::{add_channels, mix_channels, mul_channels};
use crate::ops::linear::linear;
use crate::ops::row_norm::{l2_normalize_rows, layer_norm_rows};
use crate::model::params::ParamBuilder;
use crate::ops::rwkv7::rwkv7_step;
use crate::ops::rwkv7_fused::rwkv7_train;
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

pub const ENTRY: BlockEntry = BlockEntry {
    name: "rwkv7",
    about: "RWKV-7 time-mix (token shift, LoRA decay/ICLR/value-residual/gate, WKV-7 DPLR delta rule, GroupNorm, bonus)",
    defaults: super::defaults_of::<Rwkv7Config>,
    normalize: super::normalize_with::<Rwkv7Config>,
    build: |v, dims, pb| Ok(Box::new(Rwkv7::new(&super::parse(v)?, dims, pb)?)),
};

/// Options of `blocks.rwkv7`. Defaults follow BlinkDL's train_temp (head size 64, LoRA ranks
/// from d_model, GroupNorm eps 64e-5); dim_att = d_model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Rwkv7Config {
    /// Head size N (key = value head dim); d_model must be a multiple of it.
    pub head_size: usize,
    /// Decay LoRA rank; null = max(32, round(2.5·√C / 32)·32).
    pub decay_low_rank_dim: Option<usize>,
    /// In-context-learning-rate LoRA rank; null = max(32, round(2.5·√C / 32)·32).
    pub a_low_rank_dim: Option<usize>,
    /// Value-residual LoRA rank; null = max(32, round(1.7·√C / 32)·32).
    pub v_low_rank_dim: Option<usize>,
    /// Output-gate LoRA rank; null = max(32, round(5·√C / 32)·32).
    pub gate_low_rank_dim: Option<usize>,
    /// Chunk length of the chunked WKV form (memory per token grows with it).
    pub chunk_size: usize,
    /// Epsilon of the per-head GroupNorm (ln_x); the reference uses 64e-5.
    pub norm_eps: f64,
    /// Run WKV-7 through the fused CPU kernel ([`crate::ops::rwkv7_fused`]) when the inputs are
    /// f32/f64 on the CPU (true); false forces the composed chunked form (always used on CUDA
    /// and for half precision).
    pub fused_kernel: bool,
}

impl Default for Rwkv7Config {
    fn default() -> Self {
        Self {
            head_size: 64,
            decay_low_rank_dim: None,
            a_low_rank_dim: None,
            v_low_rank_dim: None,
            gate_low_rank_dim: None,
            chunk_size: crate::ops::rwkv7::DEFAULT_CHUNK,
            norm_eps: 64e-5,
            fused_kernel: true,
        }
    }
}

/// BlinkDL's LoRA rank suggestion: max(32, round(f·√C / 32)·32).
pub fn lora_dim(factor: f64, c: usize) -> usize {
    (((factor * (c as f64).sqrt()) / 32.0).round() as usize * 32).max(32)
}

impl Rwkv7Config {
    /// (decay, a, v, gate) LoRA ranks for width `c`.
    pub fn lora_dims(&self, c: usize) -> (usize, usize, usize, usize) {
        (
            self.decay_low_rank_dim.unwrap_or_else(|| lora_dim(2.5, c)),
            self.a_low_rank_dim.unwrap_or_else(|| lora_dim(2.5, c)),
            self.v_low_rank_dim.unwrap_or_else(|| lora_dim(1.7, c)),
            self.gate_low_rank_dim.unwrap_or_else(|| lora_dim(5.0, c)),
        )
    }
}

impl BlockConfig for Rwkv7Config {
    fn check(&self, d_model: usize) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if self.head_size == 0 || d_model % self.head_size != 0 {
            return err("head_size", format!("must divide d_model = {d_model}; got {}", self.head_size));
        }
        for (k, v) in [
            ("decay_low_rank_dim", self.decay_low_rank_dim),
            ("a_low_rank_dim", self.a_low_rank_dim),
            ("v_low_rank_dim", self.v_low_rank_dim),
            ("gate_low_rank_dim", self.gate_low_rank_dim),
        ] {
            if v == Some(0) {
                return err(k, "must be at least 1 (or null for the reference formula)".into());
            }
        }
        if self.chunk_size == 0 {
            return err("chunk_size", "must be at least 1".into());
        }
        if !(self.norm_eps > 0.0) {
            return err("norm_eps", format!("must be > 0; got {}", self.norm_eps));
        }
        Ok(())
    }
}

/// A LoRA: `x W1 W2` (W1 `[C, D]` zero-init, W2 `[D, C]` orthogonal × 0.1).
pub struct Lora {
    pub w1: Tensor,
    pub w2: Tensor,
}

pub struct Rwkv7 {
    cfg: Rwkv7Config,
    c: usize,
    heads: usize,
    /// μ for r, w, k, v, a, g, each `[C]`.
    mu: [Tensor; 6],
    wr: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    w0: Tensor,
    w_lora: Lora,
    a0: Tensor,
    a_lora: Lora,
    /// v0 and its LoRA (absent in layer 0, which sets v_first).
    v_res: Option<(Tensor, Lora)>,
    g_lora: Lora,
    k_k: Tensor,
    k_a: Tensor,
    /// `[H, N]`.
    r_k: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
}

/// Carried state between segments / tokens: the last input token `[B, 1, C]` (token shift)
/// and the WKV state S `[B,H,N,N]` (rows = value dim), both empty at the start.
#[derive(Default, Clone)]
pub struct Rwkv7State {
    pub last_x: Option<Tensor>,
    pub s: Option<Tensor>,
}

/// f32 for half-precision activations (gates and decays), else the dtype itself.
fn gate_dtype(dt: DType) -> DType {
    if dt == DType::F64 { DType::F64 } else { DType::F32 }
}

/// sigmoid(x) = 1 / (1 + e^−x): candle-nn's op, one autograd node with its backward
/// `s(1 − s)·dy` (finite for any x; the composed `(1 + tanh(x/2)) / 2` was four nodes).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(x)
}

/// Token shift: `[B,T,C]` → the previous token at every position (`prev` `[B,1,C]`, or zeros,
/// at t = 0).
pub fn token_shift(x: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let first = match prev {
        Some(p) => p.to_dtype(x.dtype())?,
        None => Tensor::zeros((b, 1, c), x.dtype(), x.device())?,
    };
    if t == 1 {
        return Ok(first);
    }
    Tensor::cat(&[&first, &x.narrow(1, 0, t - 1)?], 1)
}

/// `n` values U(−bound, bound) from `rng`.
pub fn uniform(rng: &mut crate::data::rng::Rng, n: usize, bound: f64) -> Vec<f64> {
    (0..n).map(|_| (2.0 * rng.next_f64() - 1.0) * bound).collect()
}

/// A `[rows, cols]` matrix with orthonormal rows (rows ≤ cols) or columns (rows > cols), times
/// `scale` and torch's gain √(rows/cols) when rows > cols (BlinkDL `ortho_init`), from
/// Gram–Schmidt on Gaussian vectors.
pub fn orthogonal(rng: &mut crate::data::rng::Rng, rows: usize, cols: usize, scale: f64) -> Vec<f64> {
    let (n, len) = (rows.min(cols), rows.max(cols));
    let mut vecs: Vec<Vec<f64>> = Vec::with_capacity(n);
    while vecs.len() < n {
        let mut x: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
        for _ in 0..2 {
            for q in &vecs {
                let d: f64 = x.iter().zip(q).map(|(a, b)| a * b).sum();
                x.iter_mut().zip(q).for_each(|(a, b)| *a -= d * b);
            }
        }
        let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-6 {
            vecs.push(x.into_iter().map(|a| a / norm).collect());
        }
    }
    let gain = if rows > cols { (rows as f64 / cols as f64).sqrt() } else { 1.0 } * scale;
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] = gain * if rows <= cols { vecs[i][j] } else { vecs[j][i] };
        }
    }
    out
}

impl Rwkv7 {
    pub fn new(cfg: &Rwkv7Config, dims: &BlockDims, pb: &mut ParamBuilder) -> Result<Self> {
        let c = dims.d_model;
        let n = cfg.head_size;
        let heads = c / n;
        let (l, nl) = (dims.layer_idx as f64, dims.n_layers.max(1) as f64);
        let r0 = if dims.n_layers > 1 { l / (nl - 1.0) } else { 0.0 };
        let r1 = 1.0 - l / nl;
        let ddd: Vec<f64> = (0..c).map(|i| i as f64 / c as f64).collect();
        let linear: Vec<f64> = (0..c).map(|i| i as f64 / (c as f64 - 1.0).max(1.0) - 0.5).collect();
        let half = (n as f64 - 1.0) / 2.0;
        let zigzag: Vec<f64> = (0..c)
            .map(|i| {
                let z = if half > 0.0 { ((i % n) as f64 - half) / half } else { 0.0 };
                z * z.abs()
            })
            .collect();
        let per = |f: &dyn Fn(usize) -> f64| (0..c).map(f).collect::<Vec<f64>>();
        let mut mu = Vec::with_capacity(6);
        for (name, p) in [("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)] {
            mu.push(pb.values(name, &[c], per(&|i| 1.0 - ddd[i].powf(p * r1)), false)?);
        }
        let mu: [Tensor; 6] = mu.try_into().map_err(|_| candle_core::Error::Msg("six mix vectors".into()))?;
        let bound = 1.0 / (c as f64).sqrt();
        let mut mat = |name: &str, scale: f64| -> Result<Tensor> {
            let mut rng = pb.rng_for(name);
            let v = uniform(&mut rng, c * c, scale * bound);
            pb.values(name, &[c, c], v, true)
        };
        let wr = mat("wr", 0.5)?;
        let wk = mat("wk", 0.05)?;
        let wv = mat("wv", 0.5)?;
        let wo = pb.values("wo", &[c, c], vec![0.0; c * c], true)?;
        let (dw, da, dv, dg) = cfg.lora_dims(c);
        let mut lora = |prefix: &str, d: usize| -> Result<Lora> {
            let w1 = pb.values(&format!("{prefix}1"), &[c, d], vec![0.0; c * d], false)?;
            let mut rng = pb.rng_for(&format!("{prefix}2"));
            let w2 = pb.values(&format!("{prefix}2"), &[d, c], orthogonal(&mut rng, d, c, 0.1), false)?;
            Ok(Lora { w1, w2 })
        };
        let w_lora = lora("w", dw)?;
        let a_lora = lora("a", da)?;
        let g_lora = lora("g", dg)?;
        let v_lora = if dims.layer_idx > 0 { Some(lora("v", dv)?) } else { None };
        let cf = (c as f64 - 1.0).max(1.0);
        let w0 = pb.values("w0", &[c], per(&|i| -6.0 + 6.0 * (i as f64 / cf).powf(1.0 + r0.powf(0.3)) + 0.5 + 2.5 * zigzag[i]), false)?;
        let a0 = pb.values("a0", &[c], per(&|i| -0.19 + 0.3 * zigzag[i] + 0.4 * linear[i]), false)?;
        let v_res = match v_lora {
            Some(lo) => Some((pb.values("v0", &[c], per(&|i| 0.73 - 0.4 * linear[i]), false)?, lo)),
            None => None,
        };
        let k_k = pb.values("k_k", &[c], per(&|i| 0.71 - 0.1 * linear[i]), false)?;
        let k_a = pb.constant("k_a", &[c], 1.02)?;
        let r_k = pb.constant("r_k", &[heads, n], -0.04)?;
        let ln_w = pb.constant("ln_w", &[c], ((1.0 + l) / nl).powf(0.7))?;
        let ln_b = pb.constant("ln_b", &[c], 0.0)?;
        Ok(Self { cfg: cfg.clone(), c, heads, mu, wr, wk, wv, wo, w0, w_lora, a0, a_lora, v_res, g_lora, k_k, k_a, r_k, ln_w, ln_b })
    }

    /// x `[B,T,C]` → y `[B,T,C]` continuing from `state` (token shift and WKV state) and
    /// leaving the state after the last token in it. `step` selects the one-token step op
    /// (T must be 1) instead of the chunked form.
    pub fn forward_with_state(&self, x: &Tensor, ctx: &mut ForwardCtx, state: &mut Rwkv7State, step: bool) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, n) = (self.heads, self.cfg.head_size);
        let gt = gate_dtype(x.dtype());
        let xx = (token_shift(x, state.last_x.as_ref())? - x)?;
        state.last_x = Some(x.narrow(1, t - 1, 1)?);
        let mixed = |i: usize| -> Result<Tensor> { mix_channels(x, &xx, &self.mu[i])?.reshape((b * t, c)) };
        let (xr, xw, xk, xv, xa, xg) = (mixed(0)?, mixed(1)?, mixed(2)?, mixed(3)?, mixed(4)?, mixed(5)?);
        let r = xr.matmul(&self.wr)?;
        let k = xk.matmul(&self.wk)?;
        let mut v = xv.matmul(&self.wv)?;
        let lora = |x: &Tensor, lo: &Lora, act: bool| -> Result<Tensor> {
            let z = x.matmul(&lo.w1)?;
            let z = if act { z.tanh()? } else { z };
            z.matmul(&lo.w2)
        };
        // Decay in the gate dtype: w = exp(−e^{−½} σ(w0 + tanh(x_w W1) W2)).
        let w_raw = add_channels(&lora(&xw, &self.w_lora, true)?.to_dtype(gt)?, &self.w0.to_dtype(gt)?)?;
        let w = (sigmoid(&w_raw)? * -(-0.5f64).exp())?.exp()?;
        match (&self.v_res, &ctx.v_first) {
            (Some((v0, lo)), Some(vf)) => {
                let gate = sigmoid(&add_channels(&lora(&xv, lo, false)?, v0)?)?;
                v = (&v + (vf.reshape((b * t, c))? - &v)?.mul(&gate)?)?;
            }
            _ => ctx.v_first = Some(v.reshape((b, t, c))?),
        }
        let a = sigmoid(&add_channels(&lora(&xa, &self.a_lora, false)?, &self.a0)?)?;
        let g = sigmoid(&xg.matmul(&self.g_lora.w1)?)?.matmul(&self.g_lora.w2)?;
        let kk = mul_channels(&k, &self.k_k)?.reshape((b, t, h, n))?;
        // L2 normalization with f32 statistics for bf16/f16 activations.
        let kk = l2_normalize_rows(&kk.to_dtype(gt)?, 1e-12)?.to_dtype(x.dtype())?;
        let k = k.mul(&(mul_channels(&(&a - 1.0)?, &self.k_a)? + 1.0)?)?;
        let heads4 = |x: &Tensor| x.reshape((b, t, h, n));
        let (r4, k4, v4, a4) = (heads4(&r)?, heads4(&k)?, heads4(&v)?, heads4(&a)?);
        let w4 = heads4(&w)?;
        let (aa, bb) = (kk.neg()?, (&kk * &a4)?);
        let (y, s) = if step {
            if t != 1 {
                candle_core::bail!("rwkv7 step: expected one token, got {t}");
            }
            let s = match state.s.take() {
                Some(s) => s,
                None => Tensor::zeros((b, h, n, n), gt, x.device())?,
            };
            let one = |x: &Tensor| x.squeeze(1);
            let (o, s) = rwkv7_step(&one(&r4)?, &one(&w4)?, &one(&k4)?, &one(&v4)?, &one(&aa)?, &one(&bb)?, &s)?;
            (o.unsqueeze(1)?, s)
        } else {
            rwkv7_train(&r4, &w4, &k4, &v4, &aa, &bb, state.s.as_ref(), self.cfg.chunk_size, self.cfg.fused_kernel)?
        };
        state.s = Some(s);
        let y = self.group_norm(&y)?;
        let bonus = mul_channels(&(&r4 * &k4)?, &self.r_k)?.sum_keepdim(D::Minus1)?.broadcast_mul(&v4)?;
        let y = (y + bonus)?.reshape((b * t, c))?;
        linear(&(y * g)?, &self.wo, (b, t, c))
    }

    /// Per-head GroupNorm of y `[B,T,H,N]` (population variance, eps `norm_eps`) with the
    /// per-channel affine ln_w, ln_b; computed in the gate dtype, returned in y's dtype.
    fn group_norm(&self, y: &Tensor) -> Result<Tensor> {
        let (b, t, h, n) = y.dims4()?;
        let dt = y.dtype();
        let normed = layer_norm_rows(&y.to_dtype(gate_dtype(dt))?, self.cfg.norm_eps)?.reshape((b, t, h * n))?.to_dtype(dt)?;
        add_channels(&mul_channels(&normed, &self.ln_w)?, &self.ln_b)?.reshape((b, t, h, n))
    }

    /// Decode form: one token x_t `[B, C]` → y_t `[B, C]`, advancing `state`; `ctx.v_first`
    /// holds this token's first-layer value `[B, 1, C]` (set by the first layer).
    pub fn step(&self, x_t: &Tensor, ctx: &mut ForwardCtx, state: &mut Rwkv7State) -> Result<Tensor> {
        self.forward_with_state(&x_t.unsqueeze(1)?, ctx, state, true)?.squeeze(1)
    }
}

impl Mixer for Rwkv7 {
    /// x `[B,T,C]` → `[B,T,C]` through the chunked WKV-7 op from a zero state.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        self.forward_with_state(x, ctx, &mut Rwkv7State::default(), false)
    }

    /// 2·(4C² for r, k, v, o + the LoRAs 2C·(D_w + D_a + D_g [+ D_v])) + the chunked WKV core
    /// ([`crate::ops::rwkv7_chunk::flops_per_token`] with C = min(chunk, seq_len)); element-wise
    /// mixes, gates and the GroupNorm are not counted.
    fn flops_per_token(&self, seq_len: usize) -> f64 {
        let c = self.c;
        let (dw, da, dv, dg) = self.cfg.lora_dims(c);
        let dv = if self.v_res.is_some() { dv } else { 0 };
        let proj = 4 * c * c + 2 * c * (dw + da + dg + dv);
        let chunk = self.cfg.chunk_size.min(seq_len.max(1));
        let n = self.cfg.head_size;
        2.0 * proj as f64 + crate::ops::rwkv7_chunk::flops_per_token(self.heads, n, n, chunk)
    }
}

#[cfg(test)]
#[path = "rwkv7_tests.rs"]
mod tests;
