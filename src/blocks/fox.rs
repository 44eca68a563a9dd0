//! Forgetting Transformer attention layer (FoX; Lin, Nikishin, He & Courville, ICLR 2025,
//! arXiv:2503.02130), parameterised as zhixuan-lin/forgetting-transformer
//! (`ForgettingAttentionLayer`, `configs/model/forgetting_transformer.py`, the "Pro" recipe in
//! `configs/experiment/longcrawl64/forgetting_transformer/pro_*.yaml`);
//! `../shared/reference/mixers.md` §6. Core op: [`crate::ops::fox`].
//!
//! For x `[B,T,d]` (weights stored `[in, out]`):
//! ```text
//! q = x W_q [B,T,H,D];  k' = x W_k, v' = x W_v [B,T,Hkv,D]
//! k/v shift (use_k_shift / use_v_shift, ShiftLinear): α = σ(x W_ks) [B,T,Hkv],
//!     k_t = α_t ⊙ k'_{t−1} + (1 − α_t) ⊙ k'_t  (k'_{−1} = 0; same for v with W_vs)
//! qk_norm: per-head RMSNorm over D with a separate gain per head ([H,D], [Hkv,D]; eps 1e-5)
//! use_rope: RoPE (half-split, θ = rope_theta) on q, k — OFF by default, as in FoX
//! g = logsigmoid(x W_f + b_f)  [B,T,H]  (f32, or f64 for f64 models; one gate per query head)
//! o = fox(q, k, v, g)  (softmax(q·k/√D + Σ_{t=j+1..i} g_t) v)
//! use_output_norm: o = RMSNorm_D per head (gain [H,D], eps norm_eps)
//! use_output_gate: o = o ⊙ σ(x W_og)       (normalise, then gate: FusedGroupNormGated order)
//! y = o W_o
//! ```
//! Parameters: wq d×(H·D), wk, wv d×(Hkv·D), wo (H·D)×d, wf d×H (all N(0, init_std²), wo
//! N(0, out_std²)); bf `[H]` = `fgate_bias_init` (0 = the reference's default: f ≈ σ(0) at init),
//! not weight-decayed; with the Pro options wks, wvs d×Hkv, wog d×(H·D) (N(0, init_std²)) and
//! q_norm `[H,D]`, k_norm `[Hkv,D]`, o_norm `[H,D]` (ones, not decayed).
//!
//! Forms: [`Fox::forward`] (parallel, fused CPU kernel) and [`Fox::step`] (decode: KV cache plus
//! the cumulative log gate and the shift buffers), tied together by the tests.

use super::{BlockConfig, BlockDims, BlockEntry, ForwardCtx, Mixer};
use crate::ops::linear::linear;
use crate::model::params::ParamBuilder;
use crate::ops::fox::{fox, log_sigmoid};
use crate::ops::{norm::rms_norm, rope::Rope};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// Epsilon of the QK-norm: the reference builds q_norm/k_norm as `GroupRMSNorm` without passing
/// `norm_eps`, so they use that class's default 1e-5 (the output norm uses `norm_eps`).
pub const QK_NORM_EPS: f64 = 1e-5;

pub const ENTRY: BlockEntry = BlockEntry {
    name: "fox",
    about: "forgetting attention (FoX: per-head forget gate; RoPE off; Pro options: QK-norm, output gate/norm, k/v shift)",
    defaults: super::defaults_of::<FoxConfig>,
    normalize: super::normalize_with::<FoxConfig>,
    build: |v, dims, pb| Ok(Box::new(Fox::new(&super::parse(v)?, dims, pb)?)),
};

/// Options of `blocks.fox` (defaults: the plain FoX of the reference; the Pro block sets the
/// five `qk_norm` … `use_v_shift` switches to true).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FoxConfig {
    /// Query heads (one forget gate per query head).
    pub num_heads: usize,
    /// Key/value heads (GQA); null = num_heads.
    pub num_kv_heads: Option<usize>,
    /// Head dimension; null = d_model / num_heads.
    pub head_dim: Option<usize>,
    /// RoPE on q, k (FoX default: off).
    pub use_rope: bool,
    /// RoPE base when use_rope (the reference uses 500000).
    pub rope_theta: f64,
    /// Initial forget-gate bias b_f (0 as in the reference: f ≈ 0.5 at init; large = no forgetting).
    pub fgate_bias_init: f64,
    /// Pro: per-head RMSNorm of q and k with per-head gains.
    pub qk_norm: bool,
    /// Pro: sigmoid output gate σ(x W_og).
    pub use_output_gate: bool,
    /// Pro: per-head RMS group norm of the attention output.
    pub use_output_norm: bool,
    /// Pro: token shift of k with a learned per-head mix.
    pub use_k_shift: bool,
    /// Pro: token shift of v with a learned per-head mix.
    pub use_v_shift: bool,
    /// Epsilon of the output norm (the QK-norm uses [`QK_NORM_EPS`], as the reference).
    pub norm_eps: f64,
}

impl Default for FoxConfig {
    fn default() -> Self {
        Self {
            num_heads: 4,
            num_kv_heads: None,
            head_dim: None,
            use_rope: false,
            rope_theta: 500000.0,
            fgate_bias_init: 0.0,
            qk_norm: false,
            use_output_gate: false,
            use_output_norm: false,
            use_k_shift: false,
            use_v_shift: false,
            norm_eps: 1e-6,
        }
    }
}

impl FoxConfig {
    fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }
    fn head_dim(&self, d_model: usize) -> usize {
        self.head_dim.unwrap_or(d_model / self.num_heads.max(1))
    }
}

impl BlockConfig for FoxConfig {
    fn check(&self, d_model: usize) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        super::attention::check_heads(self.num_heads, self.kv_heads(), self.head_dim, d_model)?;
        let hd = self.head_dim(d_model);
        if hd == 0 || (self.use_rope && hd % 2 != 0) {
            return err("head_dim", format!("must be >= 1 (and even with use_rope); got {hd}"));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return err("rope_theta", format!("must be > 0; got {}", self.rope_theta));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return err("norm_eps", format!("must be > 0; got {}", self.norm_eps));
        }
        if !self.fgate_bias_init.is_finite() {
            return err("fgate_bias_init", "must be finite".into());
        }
        Ok(())
    }
}

pub struct Fox {
    cfg: FoxConfig,
    d_model: usize,
    head_dim: usize,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    wf: Tensor,
    bf: Tensor,
    wks: Option<Tensor>,
    wvs: Option<Tensor>,
    wog: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o_norm: Option<Tensor>,
    /// Unit gain `[D]` for the per-head norms (their learned gains are `[heads, D]`).
    ones: Tensor,
    rope: Option<Rope>,
}

/// Decode state: rotated keys and values so far `[B,t,Hkv,D]`, the cumulative log gate
/// `[B,t,H]`, and the previous token's unshifted k', v' `[B,1,Hkv,D]` for the shifts.
#[derive(Default)]
pub struct FoxCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    cum: Option<Tensor>,
    prev_k: Option<Tensor>,
    prev_v: Option<Tensor>,
}

impl Fox {
    pub fn new(cfg: &FoxConfig, dims: &BlockDims, pb: &mut ParamBuilder) -> Result<Self> {
        let d = dims.d_model;
        let hd = cfg.head_dim(d);
        let (h, hkv, std) = (cfg.num_heads, cfg.kv_heads(), dims.init_std);
        let opt = |on: bool, pb: &mut ParamBuilder, name: &str, shape: &[usize], ones: bool| -> Result<Option<Tensor>> {
            match (on, ones) {
                (false, _) => Ok(None),
                (true, false) => pb.normal(name, shape, std).map(Some),
                (true, true) => pb.constant(name, shape, 1.0).map(Some),
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            d_model: d,
            head_dim: hd,
            wq: pb.normal("wq", &[d, h * hd], std)?,
            wk: pb.normal("wk", &[d, hkv * hd], std)?,
            wv: pb.normal("wv", &[d, hkv * hd], std)?,
            wo: pb.normal("wo", &[h * hd, d], dims.out_std)?,
            wf: pb.normal("wf", &[d, h], std)?,
            bf: pb.values("bf", &[h], vec![cfg.fgate_bias_init; h], false)?,
            wks: opt(cfg.use_k_shift, pb, "wks", &[d, hkv], false)?,
            wvs: opt(cfg.use_v_shift, pb, "wvs", &[d, hkv], false)?,
            wog: opt(cfg.use_output_gate, pb, "wog", &[d, h * hd], false)?,
            q_norm: opt(cfg.qk_norm, pb, "q_norm", &[h, hd], true)?,
            k_norm: opt(cfg.qk_norm, pb, "k_norm", &[hkv, hd], true)?,
            o_norm: opt(cfg.use_output_norm, pb, "o_norm", &[h, hd], true)?,
            ones: Tensor::ones(hd, pb.dtype, &pb.device)?,
            rope: if cfg.use_rope { Some(Rope::new(dims.max_seq_len, hd, cfg.rope_theta, pb.dtype, &pb.device)?) } else { None },
        })
    }

    /// Per-head RMSNorm of x `[B,T,heads,D]` with gains `[heads,D]`.
    fn head_norm(&self, x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
        crate::ops::channel::mul_channels(&rms_norm(x, &self.ones, eps)?, gain)
    }

    /// Shift mix `α = σ(x W_s)` `[B,T,Hkv,1]` for x2 `[B·T, d]`.
    fn alpha(&self, x2: &Tensor, w: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        candle_nn::ops::sigmoid(&x2.matmul(w)?)?.reshape((b, t, self.cfg.kv_heads(), 1))
    }

    /// Everything before the core op for x `[B,T,d]`: q, unshifted k', v', shift mixes, and the
    /// log forget gate g `[B,T,H]` (f32 or f64).
    #[allow(clippy::type_complexity)]
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>, Option<Tensor>, Tensor)> {
        let (b, t, d) = x.dims3()?;
        let x2 = x.reshape((b * t, d))?;
        let (h, hkv, hd) = (self.cfg.num_heads, self.cfg.kv_heads(), self.head_dim);
        let q = linear(x, &self.wq, (b, t, h, hd))?;
        let k = linear(x, &self.wk, (b, t, hkv, hd))?;
        let v = linear(x, &self.wv, (b, t, hkv, hd))?;
        let ak = self.wks.as_ref().map(|w| self.alpha(&x2, w, b, t)).transpose()?;
        let av = self.wvs.as_ref().map(|w| self.alpha(&x2, w, b, t)).transpose()?;
        let gt = crate::ops::reduction_dtype(x.dtype());
        let logit = crate::ops::channel::add_channels(&x2.matmul(&self.wf)?.to_dtype(gt)?, &self.bf.to_dtype(gt)?)?;
        let g = log_sigmoid(&logit)?.reshape((b, t, h))?;
        Ok((q, k, v, ak, av, g))
    }

    /// `α ⊙ prev + (1 − α) ⊙ cur`.
    fn mix(alpha: &Tensor, prev: &Tensor, cur: &Tensor) -> Result<Tensor> {
        cur.broadcast_add(&(prev - cur)?.broadcast_mul(alpha)?)
    }

    /// QK-norm (before RoPE, as attention).
    fn norm_qk(&self, q: Tensor, k: Tensor) -> Result<(Tensor, Tensor)> {
        match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => Ok((self.head_norm(&q, qn, QK_NORM_EPS)?, self.head_norm(&k, kn, QK_NORM_EPS)?)),
            _ => Ok((q, k)),
        }
    }

    /// Output norm, gate and projection of o `[B,T,H,D]` for input x `[B,T,d]`.
    fn out(&self, o: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (b, t, h, hd) = o.dims4()?;
        let mut o = match &self.o_norm {
            Some(on) => self.head_norm(o, on, self.cfg.norm_eps)?,
            None => o.clone(),
        };
        if let Some(w) = &self.wog {
            o = crate::ops::sigmoid_gate::sigmoid_gate(&o, &linear(x, w, (b, t, h, hd))?)?;
        }
        linear(&o, &self.wo, (b, t, self.d_model))
    }

    /// Decode form: one token x_t `[B, d]`, appending to `cache`.
    pub fn step(&self, x_t: &Tensor, cache: &mut FoxCache) -> Result<Tensor> {
        let pos = cache.k.as_ref().map(|k| k.dim(1)).transpose()?.unwrap_or(0);
        let x = x_t.unsqueeze(1)?;
        let (q, k1, v1, ak, av, g) = self.project(&x)?;
        let shift = |a: &Option<Tensor>, prev: &Option<Tensor>, cur: &Tensor| -> Result<Tensor> {
            match a {
                Some(a) => Self::mix(a, &prev.clone().unwrap_or(cur.zeros_like()?), cur),
                None => Ok(cur.clone()),
            }
        };
        let (k, v) = (shift(&ak, &cache.prev_k, &k1)?, shift(&av, &cache.prev_v, &v1)?);
        let (mut q, mut k) = self.norm_qk(q, k)?;
        if let Some(r) = &self.rope {
            let r = r.at(pos)?;
            (q, k) = (r.apply(&q)?, r.apply(&k)?);
        }
        let cum_t = match &cache.cum {
            Some(c) => (c.narrow(1, pos - 1, 1)? + &g)?,
            None => g,
        };
        let cat = |c: &Option<Tensor>, x: Tensor| match c {
            Some(c) => Tensor::cat(&[c, &x], 1),
            None => Ok(x),
        };
        let (k_all, v_all, cum) = (cat(&cache.k, k)?, cat(&cache.v, v)?, cat(&cache.cum, cum_t.clone())?);
        // Logits of the newest query over every cached key: q·k/√D + F_t − F_j.
        let (b, n, hkv, hd) = k_all.dims4()?;
        let h = self.cfg.num_heads;
        let qh = q.reshape((b, hkv, h / hkv, hd))?.to_dtype(cum.dtype())?;
        let kh = k_all.permute((0, 2, 3, 1))?.contiguous()?.to_dtype(cum.dtype())?; // [B,Hkv,D,n]
        let bias = cum_t.reshape((b, h, 1))?.broadcast_sub(&cum.transpose(1, 2)?)?.reshape((b, hkv, h / hkv, n))?;
        let s = ((qh.matmul(&kh)? / (hd as f64).sqrt())? + bias)?;
        let p = crate::ops::softmax::softmax_last_dim(&s)?.to_dtype(v_all.dtype())?;
        let o = p.matmul(&v_all.transpose(1, 2)?.contiguous()?)?.reshape((b, 1, h, hd))?;
        *cache = FoxCache { k: Some(k_all), v: Some(v_all), cum: Some(cum), prev_k: Some(k1), prev_v: Some(v1) };
        self.out(&o, &x)?.squeeze(1)
    }
}

impl Mixer for Fox {
    fn forward(&self, x: &Tensor, _ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (q, k, v, ak, av, g) = self.project(x)?;
        // The shifts as one node each (ops::token_shift, whose reference form is the composed
        // shift and `mix`; the fox tests compare this forward with the token-by-token `step`).
        let k = match &ak {
            Some(a) => crate::ops::token_shift::shift_mix(&k, a)?,
            None => k,
        };
        let v = match &av {
            Some(a) => crate::ops::token_shift::shift_mix(&v, a)?,
            None => v,
        };
        let (mut q, mut k) = self.norm_qk(q, k)?;
        if let Some(r) = &self.rope {
            (q, k) = (r.apply(&q)?, r.apply(&k)?);
        }
        self.out(&fox(&q, &k, &v, &g)?, x)
    }

    /// 2·(weights) + 4·T·H·D (scores and value mixing over a full context, as attention).
    fn flops_per_token(&self, seq_len: usize) -> f64 {
        let (d, h, hkv, hd) = (self.d_model, self.cfg.num_heads, self.cfg.kv_heads(), self.head_dim);
        let mut weights = d * h * hd * 2 + d * hkv * hd * 2 + d * h;
        weights += d * hkv * (self.cfg.use_k_shift as usize + self.cfg.use_v_shift as usize);
        weights += d * h * hd * self.cfg.use_output_gate as usize;
        2.0 * weights as f64 + 4.0 * (seq_len * h * hd) as f64
    }
}

#[cfg(test)]
#[path = "fox_tests.rs"]
mod tests;
