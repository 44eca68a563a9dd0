//! Softmax attention, Llama style (Vaswani et al. 2017; Touvron et al. 2023): bias-free q/k/v/o
//! projections, GQA (Ainslie et al. 2023), optional per-head QK-norm before RoPE (Dehghani et al.
//! 2023), RoPE in the half-split layout, causal softmax in f32.
//! Reference: fla `fla/layers/attn.py`, `fla/ops/attn/naive.py`; `../shared/reference/mixers.md` §1.
//!
//! Forms: [`Attention::forward`] is the parallel training form (core op [`crate::ops::attn::attn`]);
//! [`Attention::step`] is the token-by-token decode form with a KV cache, the reference the
//! tests compare against.
//!
//! Parameters (weights stored `[in, out]`): wq d×(H·D), wk d×(Hkv·D), wv d×(Hkv·D), wo (H·D)×d,
//! plus q_norm, k_norm `[D]` when `qk_norm`, plus q_conv, k_conv, v_conv `[C, short_conv]` when
//! `short_conv > 0`: a residual causal depthwise short convolution on the q, k and v projections,
//! `p ← p + conv(p)` (before QK-norm and RoPE; the "Canon" layers of Allen-Zhu 2025, Zoology's
//! short conv paired with every mixer). A key that can see the previous token makes
//! associative recall a one-layer lookup, so MQAR is learned in far fewer steps. Forward FLOPs per token: 2·(params) for the
//! projections + 4·T·H·D for scores and value mixing over a full (non-causal-halved) context,
//! the PaLM convention (Chowdhery et al. 2022, App. B).

use super::{BlockConfig, BlockDims, BlockEntry, ForwardCtx, Mixer};
use crate::model::params::ParamBuilder;
use crate::ops::short_conv::causal_conv_step;
use crate::ops::attn_sublayer::{attention_sublayer, AttnWeights, Core};
use crate::ops::linear::linear;
use crate::ops::short_conv_fused::short_conv;
use crate::ops::{attn::attn, norm::rms_norm, rope::Rope};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

pub const ENTRY: BlockEntry = BlockEntry {
    name: "attention",
    about: "causal softmax attention (RoPE half-split, GQA, optional QK-norm)",
    defaults: super::defaults_of::<AttentionConfig>,
    normalize: super::normalize_with::<AttentionConfig>,
    build: |v, dims, pb| Ok(Box::new(Attention::new(&super::parse(v)?, dims, pb)?)),
};

/// Options of `blocks.attention` (every option has a default).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AttentionConfig {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA); null = num_heads (multi-head attention).
    pub num_kv_heads: Option<usize>,
    /// Head dimension; null = d_model / num_heads.
    pub head_dim: Option<usize>,
    /// Per-head RMSNorm on q and k (learned gain [head_dim]) before RoPE.
    pub qk_norm: bool,
    /// RoPE base θ (Llama-3 uses 500000).
    pub rope_theta: f64,
    /// Epsilon of the QK-norm.
    pub norm_eps: f64,
    /// Kernel width of a residual causal depthwise conv on q, k, v (0 = off, plain attention).
    pub short_conv: usize,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        Self { num_heads: 4, num_kv_heads: None, head_dim: None, qk_norm: false, rope_theta: 10000.0, norm_eps: 1e-6, short_conv: 0 }
    }
}

impl AttentionConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }
    pub fn head_dim(&self, d_model: usize) -> usize {
        self.head_dim.unwrap_or(d_model / self.num_heads.max(1))
    }
}

/// The head-layout checks every attention-family block shares: `num_heads ≥ 1`, `d_model`
/// divisible by it when `head_dim` is derived, `num_kv_heads` dividing `num_heads`.
pub fn check_heads(num_heads: usize, num_kv_heads: usize, head_dim: Option<usize>, d_model: usize) -> std::result::Result<(), (String, String)> {
    let err = |k: &str, m: String| Err((k.to_string(), m));
    if num_heads == 0 {
        return err("num_heads", "must be at least 1".into());
    }
    if head_dim.is_none() && d_model % num_heads != 0 {
        return err("num_heads", format!("d_model {d_model} is not divisible by num_heads {num_heads}"));
    }
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return err("num_kv_heads", format!("must divide num_heads {num_heads}; got {num_kv_heads}"));
    }
    Ok(())
}

impl BlockConfig for AttentionConfig {
    fn check(&self, d_model: usize) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        check_heads(self.num_heads, self.kv_heads(), self.head_dim, d_model)?;
        let hd = self.head_dim(d_model);
        if hd == 0 || hd % 2 != 0 {
            return err("head_dim", format!("must be even (RoPE rotates pairs); got {hd}"));
        }
        if !(self.rope_theta > 0.0) || !(self.norm_eps > 0.0) {
            return err("rope_theta", "rope_theta and norm_eps must be > 0".into());
        }
        Ok(())
    }
}

pub struct Attention {
    cfg: AttentionConfig,
    d_model: usize,
    head_dim: usize,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// q, k, v short-conv weights `[C, short_conv]` (when `short_conv > 0`).
    convs: Option<[Tensor; 3]>,
    rope: Rope,
}

/// Keys and values seen so far, `[B, t, Hkv, D]` each (rotated keys).
#[derive(Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// The last `short_conv − 1` pre-conv q, k, v projections.
    conv: Option<[Tensor; 3]>,
}

impl Attention {
    pub fn new(cfg: &AttentionConfig, dims: &BlockDims, pb: &mut ParamBuilder) -> Result<Self> {
        let d = dims.d_model;
        let hd = cfg.head_dim(d);
        let (h, hkv) = (cfg.num_heads, cfg.kv_heads());
        let wq = pb.normal("wq", &[d, h * hd], dims.init_std)?;
        let wk = pb.normal("wk", &[d, hkv * hd], dims.init_std)?;
        let wv = pb.normal("wv", &[d, hkv * hd], dims.init_std)?;
        let wo = pb.normal("wo", &[h * hd, d], dims.out_std)?;
        let (q_norm, k_norm) = if cfg.qk_norm {
            (Some(pb.constant("q_norm", &[hd], 1.0)?), Some(pb.constant("k_norm", &[hd], 1.0)?))
        } else {
            (None, None)
        };
        let convs = if cfg.short_conv > 0 {
            // PyTorch's Conv1d default init U(±1/sqrt(fan_in)), fan_in = kernel width for a
            // depthwise conv — what Zoology's ShortConvolution keeps (its `_init_weights` only
            // re-inits Linear and Embedding), so previous-token mixing is strong from step 0.
            let cs = cfg.short_conv;
            let bound = 1.0 / (cs as f64).sqrt();
            let mut conv = |name: &str, c: usize| {
                let mut rng = pb.rng_for(name);
                let v = (0..c * cs).map(|_| (2.0 * rng.next_f64() - 1.0) * bound).collect();
                pb.values(name, &[c, cs], v, false)
            };
            Some([conv("q_conv", h * hd)?, conv("k_conv", hkv * hd)?, conv("v_conv", hkv * hd)?])
        } else {
            None
        };
        let rope = Rope::new(dims.max_seq_len, hd, cfg.rope_theta, pb.dtype, &pb.device)?;
        Ok(Self { cfg: cfg.clone(), d_model: d, head_dim: hd, wq, wk, wv, wo, q_norm, k_norm, convs, rope })
    }

    /// Projections (+ short conv) + QK-norm for x `[B, T, d]` → (q `[B,T,H,D]`, k, v
    /// `[B,T,Hkv,D]`), before RoPE. `conv_state` switches the conv to its step form (T = 1).
    fn qkv(&self, x: &Tensor, conv_state: Option<&mut Option<[Tensor; 3]>>) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _d) = x.dims3()?;
        let (h, hkv, hd) = (self.cfg.num_heads, self.cfg.kv_heads(), self.head_dim);
        let heads = [h, hkv, hkv];
        let ws = [&self.wq, &self.wk, &self.wv];
        // One autograd node per projection, straight into the head layout (see ops::linear).
        let p: Vec<Tensor> = match (&self.convs, conv_state) {
            (None, _) => (0..3).map(|i| linear(x, ws[i], (b, t, heads[i], hd))).collect::<Result<_>>()?,
            (Some(cw), None) => (0..3)
                .map(|i| {
                    let pi = linear(x, ws[i], (b, t, heads[i] * hd))?;
                    (&pi + short_conv(&pi, &cw[i], None, false)?)?.reshape((b, t, heads[i], hd))
                })
                .collect::<Result<_>>()?,
            (Some(cw), Some(state)) => {
                let prev = state.take();
                let mut next = Vec::with_capacity(3);
                let mut p = Vec::with_capacity(3);
                for i in 0..3 {
                    let pi = linear(x, ws[i], (b * t, heads[i] * hd))?;
                    let (y, win) = causal_conv_step(&pi, prev.as_ref().map(|s| &s[i]), &cw[i])?;
                    p.push((&pi + y)?.reshape((b, t, heads[i], hd))?);
                    next.push(win);
                }
                *state = Some([next[0].clone(), next[1].clone(), next[2].clone()]);
                p
            }
        };
        let [mut q, mut k, v]: [Tensor; 3] = p.try_into().map_err(|_| candle_core::Error::Msg("attention: three projections".into()))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm(&q, qn, self.cfg.norm_eps)?;
            k = rms_norm(&k, kn, self.cfg.norm_eps)?;
        }
        Ok((q, k, v))
    }

    fn out(&self, o: &Tensor) -> Result<Tensor> {
        let (b, t, _h, _hd) = o.dims4()?;
        linear(o, &self.wo, (b, t, self.d_model))
    }

    /// Decode form: one token x_t `[B, d]` at position `cache length`, appending to `cache`.
    pub fn step(&self, x_t: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let pos = cache.k.as_ref().map(|k| k.dim(1)).transpose()?.unwrap_or(0);
        let (q, k, v) = self.qkv(&x_t.unsqueeze(1)?, Some(&mut cache.conv))?;
        let rope = self.rope.at(pos)?;
        let (q, k) = (rope.apply(&q)?, rope.apply(&k)?);
        let k_all = match &cache.k { Some(c) => Tensor::cat(&[c, &k], 1)?, None => k };
        let v_all = match &cache.v { Some(c) => Tensor::cat(&[c, &v], 1)?, None => v };
        // Attention of the newest query over every cached position (all are in its past).
        let (b, _t, hkv, hd) = k_all.dims4()?;
        let g = self.cfg.num_heads / hkv;
        let qh = q.reshape((b, hkv, g, hd))?; // [B, Hkv, g, D]
        let kh = k_all.permute((0, 2, 3, 1))?.contiguous()?; // [B, Hkv, D, t]
        let s = (qh.matmul(&kh)? / (hd as f64).sqrt())?; // [B, Hkv, g, t]
        let p = crate::ops::softmax::softmax_last_dim(&s)?;
        let vh = v_all.transpose(1, 2)?.contiguous()?; // [B, Hkv, t, D]
        let o = p.matmul(&vh)?.reshape((b, 1, self.cfg.num_heads, hd))?;
        cache.k = Some(k_all);
        cache.v = Some(v_all);
        self.out(&o)?.squeeze(1)
    }
}

impl Attention {
    /// `x + self(RMSNorm(x; g))` with token mixing `core` as one fused node
    /// ([`crate::ops::attn_sublayer`]) on CPU in f32/f64, with or without the short convs;
    /// `None` with QK-norm or elsewhere.
    pub fn sublayer(&self, x: &Tensor, g: &Tensor, eps: f64, core: Core) -> Option<Result<Tensor>> {
        if self.q_norm.is_some() || !crate::ops::cpu_fusable(&[x, g, &self.wq, &self.wk, &self.wv, &self.wo]) {
            return None;
        }
        let convs = self.convs.as_ref().map(|[a, b, c]| [a, b, c]);
        let w = AttnWeights { g, wq: &self.wq, wk: &self.wk, wv: &self.wv, wo: &self.wo, convs };
        Some(attention_sublayer(x, &w, &self.rope, (self.cfg.num_heads, self.cfg.kv_heads(), self.head_dim), core, eps))
    }

    /// The parallel form with another core op in place of [`attn`] (same projections, QK-norm,
    /// RoPE, GQA): for blocks that change only how the heads mix tokens (e.g. MoBA).
    pub fn forward_with(&self, x: &Tensor, core: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x, None)?;
        let (q, k) = (self.rope.apply(&q)?, self.rope.apply(&k)?);
        self.out(&core(&q, &k, &v)?)
    }
}

impl Mixer for Attention {
    fn forward(&self, x: &Tensor, _ctx: &mut ForwardCtx) -> Result<Tensor> {
        self.forward_with(x, &attn)
    }

    /// Attention without QK-norm on CPU in f32/f64: one fused node ([`crate::ops::attn_sublayer`]).
    fn forward_residual(&self, x: &Tensor, g: &Tensor, eps: f64, _ctx: &mut ForwardCtx) -> Option<Result<Tensor>> {
        self.sublayer(x, g, eps, Core::Causal)
    }

    fn flops_per_token(&self, seq_len: usize) -> f64 {
        let (d, h, hkv, hd) = (self.d_model, self.cfg.num_heads, self.cfg.kv_heads(), self.head_dim);
        let proj = d * h * hd * 2 + d * hkv * hd * 2;
        let conv = 2 * self.cfg.short_conv * (h * hd + 2 * hkv * hd);
        2.0 * proj as f64 + conv as f64 + 4.0 * (seq_len * h * hd) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::ParamStore;
    use crate::testing::{assert_close, check_block_grads, check_sublayer, rand_tensor};
    use candle_core::{DType, Device};

    fn build(cfg: &AttentionConfig, d: usize, t: usize, store: &mut ParamStore) -> Attention {
        let dims = BlockDims { d_model: d, max_seq_len: t, n_layers: 2, layer_idx: 0, init_std: 0.3, out_std: 0.3 };
        let mut pb = ParamBuilder::new(store, 7, DType::F64, &Device::Cpu);
        Attention::new(cfg, &dims, &mut pb).unwrap()
    }

    /// Parallel form == token-by-token decode with a KV cache, in f64, for GQA + QK-norm.
    #[test]
    fn parallel_matches_step_b2_t13_h4_kv2() {
        for (qk_norm, short_conv) in [(false, 0), (true, 0), (true, 3)] {
            let cfg = AttentionConfig { num_heads: 4, num_kv_heads: Some(2), head_dim: Some(6), qk_norm, short_conv, ..Default::default() };
            let mut store = ParamStore::default();
            let a = build(&cfg, 12, 13, &mut store);
            let x = rand_tensor(&[2, 13, 12], 1.0, 3);
            let par = a.forward(&x, &mut ForwardCtx::default()).unwrap();
            let mut cache = KvCache::default();
            let steps: Vec<Tensor> = (0..13).map(|i| a.step(&x.narrow(1, i, 1).unwrap().squeeze(1).unwrap(), &mut cache).unwrap()).collect();
            let seq = Tensor::stack(&steps, 1).unwrap();
            assert_close("attention parallel vs step", &par, &seq, 1e-12);
        }
    }

    /// The fused sublayer (norm, projections, short convs, RoPE, attention, residual in one node)
    /// == the composed block with its pre-norm and residual, with GQA, with and without the short
    /// convs, f64 (plus finite differences) and f32; QK-norm keeps the composed path.
    #[test]
    fn fused_sublayer_matches_composed() {
        let cfg = AttentionConfig { num_heads: 4, num_kv_heads: Some(2), ..Default::default() };
        let dims = BlockDims { d_model: 16, max_seq_len: 70, n_layers: 2, layer_idx: 0, init_std: 0.3, out_std: 0.3 };
        for c in [cfg.clone(), AttentionConfig { short_conv: 3, ..cfg.clone() }] {
            for (dt, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
                let mut store = ParamStore::default();
                let a = Attention::new(&c, &dims, &mut ParamBuilder::new(&mut store, 7, dt, &Device::Cpu)).unwrap();
                check_sublayer(&a, &store, &[2, 70, 16], tol);
            }
        }
        for c in [AttentionConfig { qk_norm: true, ..cfg.clone() }, AttentionConfig { qk_norm: true, short_conv: 2, ..cfg }] {
            let a = build(&c, 16, 5, &mut ParamStore::default());
            let x = rand_tensor(&[1, 5, 16], 1.0, 1);
            assert!(a.forward_residual(&x, &Tensor::ones(16, DType::F64, &Device::Cpu).unwrap(), 1e-6, &mut ForwardCtx::default()).is_none());
        }
    }

    /// Finite-difference check of the whole layer w.r.t. its input and every parameter.
    #[test]
    fn gradients_match_finite_differences() {
        for short_conv in [0, 2] {
            let cfg = AttentionConfig { num_heads: 2, num_kv_heads: Some(1), qk_norm: true, short_conv, ..Default::default() };
            let mut store = ParamStore::default();
            let a = build(&cfg, 8, 5, &mut store);
            check_block_grads(&a, &store, &[2, 5, 8]);
        }
    }
}
