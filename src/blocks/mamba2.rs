//! Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
//! Through Structured State Space Duality", arXiv:2405.21060), parameterised as state-spaces/mamba
//! `mamba_ssm/modules/mamba2.py` (same as fla `fla/layers/mamba2.py`);
//! `../shared/reference/mixers.md` §2. Core op: [`crate::ops::ssd`].
//!
//! For x `[B,T,d]` (weights stored `[in, out]`), d_inner = expand·d, H = d_inner / headdim,
//! G = ngroups, N = d_state:
//! ```text
//! [z | xBC | dt_raw] = x W_in          z: d_inner, xBC: d_inner + 2GN, dt_raw: H   (this order)
//! xBC  = SiLU(CausalDepthwiseConv_{d_conv}(xBC) + conv_bias);  [x | Bm | Cm] = xBC
//! dt   = softplus(dt_raw + dt_bias)   (clamped to dt_limit if set)        [B,T,H]  (f32)
//! A    = −exp(A_log)                                                      [H]      (f32)
//! y    = ssd_chunked(x, dt, A, Bm, Cm) + D ⊙ x                            [B,T,H,P]
//! y    = RMSNormGated(y, z) = RMSNorm_group(y ⊙ SiLU(z)) ⊙ w   (norm_before_gate = false;
//!        norm_before_gate = true: RMSNorm_group(y) ⊙ w ⊙ SiLU(z); rmsnorm = false: y ⊙ SiLU(z))
//! out  = y W_out                                                          [B,T,d]
//! ```
//! The norm is group-wise: statistics over each of the G groups of d_inner/G channels.
//! The conv + SiLU is [`crate::ops::short_conv_fused::short_conv`] (fused on the CPU; a sum of
//! shifted zero-padded slices elsewhere, as candle's depthwise conv1d backward is slow), weight
//! `[conv_dim, d_conv]` (PyTorch `[conv_dim, 1, d_conv]`), `y_t = Σ_i w[:, i] x_{t−(d_conv−1)+i}`.
//!
//! Parameters and init (mamba_ssm): in_proj d×(2·d_inner + 2GN + H) N(0, init_std²) (the LM's
//! `_init_weights`); out_proj d_inner×d N(0, out_std²); conv weight `[conv_dim, d_conv]` and
//! bias `[conv_dim]` U(±1/√d_conv) (PyTorch's Conv1d default; U(±conv_init) for the weight when
//! `conv_init` is set); dt_bias `[H]` = softplus⁻¹(dt) with dt log-uniform in [dt_min, dt_max],
//! floored at dt_init_floor; A_log `[H]` = ln U(a_init_range); D `[H]` (or `[d_inner]` with
//! d_has_hdim) ones; norm weight `[d_inner]` ones. Weight decay: mamba_ssm exempts A_log, D and
//! dt_bias (`_no_weight_decay`); the conv bias and the norm weight are 1-D and, as everywhere in
//! mixscale, not decayed; in_proj, out_proj and the conv weight are decayed.
//!
//! Forms: [`Mamba2::forward`] (chunked SSD, training) and [`Mamba2::step`] (decode: conv buffer
//! and SSM state in [`Mamba2State`]); the tests tie them together.

use super::gated_deltanet::softplus;
use super::{BlockConfig, BlockDims, BlockEntry, ForwardCtx, Mixer};
use crate::ops::linear::linear;
use crate::model::params::ParamBuilder;
use crate::ops::norm::rms_norm;
use crate::ops::short_conv_fused::short_conv;
use crate::ops::swiglu::swiglu;
use crate::ops::ssd::ssd_step;
use crate::ops::mamba2_sublayer::{mamba2_sublayer, Mamba2Dims, Mamba2Weights};
use crate::ops::ssd_fused::ssd_train;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

pub const ENTRY: BlockEntry = BlockEntry {
    name: "mamba2",
    about: "Mamba-2 (SSD: scalar-decay state space, chunked; short conv, gated group RMSNorm)",
    defaults: super::defaults_of::<Mamba2Config>,
    normalize: super::normalize_with::<Mamba2Config>,
    build: |v, dims, pb| Ok(Box::new(Mamba2::new(&super::parse(v)?, dims, pb)?)),
};

/// Options of `blocks.mamba2`; defaults are mamba_ssm's `Mamba2` (and fla's `Mamba2Config`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Mamba2Config {
    /// SSM state size N per head (mamba_ssm: 128).
    pub d_state: usize,
    /// Kernel width of the causal depthwise conv (4).
    pub d_conv: usize,
    /// d_inner = expand · d_model (2).
    pub expand: usize,
    /// Head dimension P; heads = d_inner / headdim (64).
    pub headdim: usize,
    /// Groups of B/C shared by H/ngroups heads each, and of the gated norm (1).
    pub ngroups: usize,
    /// A = −U(lo, hi) at init (A_log = ln U) ([1, 16]).
    pub a_init_range: [f64; 2],
    /// Initial dt log-uniform in [dt_min, dt_max] (1e-3, 0.1), floored at dt_init_floor (1e-4).
    pub dt_min: f64,
    pub dt_max: f64,
    pub dt_init_floor: f64,
    /// Clamp of dt after softplus, [lo, hi]; null = none (mamba_ssm: (0, inf)).
    pub dt_limit: Option<[f64; 2]>,
    /// Bias on the conv (true).
    pub conv_bias: bool,
    /// Conv weight init U(±conv_init); null = PyTorch's default U(±1/√d_conv).
    pub conv_init: Option<f64>,
    /// D per channel `[d_inner]` instead of per head `[H]` (false).
    pub d_has_hdim: bool,
    /// Gated RMSNorm before out_proj (true); false: y ⊙ SiLU(z) only.
    pub rmsnorm: bool,
    /// Normalise before gating: RMSNorm(y) ⊙ SiLU(z) (false: RMSNorm(y ⊙ SiLU(z))).
    pub norm_before_gate: bool,
    /// Epsilon of the gated RMSNorm (1e-5).
    pub norm_eps: f64,
    /// Chunk length of the chunked SSD (256).
    pub chunk_size: usize,
    /// Run the SSD through the fused CPU kernel ([`crate::ops::ssd_fused`]) when the inputs are
    /// f32/f64 on the CPU (true); false forces the composed chunked form (always used on CUDA
    /// and for half precision).
    pub fused_kernel: bool,
}

impl Default for Mamba2Config {
    fn default() -> Self {
        Self {
            d_state: 128,
            d_conv: 4,
            expand: 2,
            headdim: 64,
            ngroups: 1,
            a_init_range: [1.0, 16.0],
            dt_min: 1e-3,
            dt_max: 0.1,
            dt_init_floor: 1e-4,
            dt_limit: None,
            conv_bias: true,
            conv_init: None,
            d_has_hdim: false,
            rmsnorm: true,
            norm_before_gate: false,
            norm_eps: 1e-5,
            chunk_size: 256,
            fused_kernel: true,
        }
    }
}

impl Mamba2Config {
    pub fn d_inner(&self, d_model: usize) -> usize {
        self.expand * d_model
    }
    pub fn nheads(&self, d_model: usize) -> usize {
        self.d_inner(d_model) / self.headdim.max(1)
    }
    /// Channels through the conv: x, B and C.
    pub fn conv_dim(&self, d_model: usize) -> usize {
        self.d_inner(d_model) + 2 * self.ngroups * self.d_state
    }
}

impl BlockConfig for Mamba2Config {
    fn check(&self, d_model: usize) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        for (k, v) in [("d_state", self.d_state), ("d_conv", self.d_conv), ("expand", self.expand), ("headdim", self.headdim), ("ngroups", self.ngroups), ("chunk_size", self.chunk_size)] {
            if v == 0 {
                return err(k, "must be at least 1".into());
            }
        }
        let di = self.d_inner(d_model);
        if di % self.headdim != 0 {
            return err("headdim", format!("d_inner = expand·d_model = {di} is not a multiple of headdim {}", self.headdim));
        }
        let h = di / self.headdim;
        if h % self.ngroups != 0 {
            return err("ngroups", format!("the {h} heads (d_inner {di} / headdim {}) do not split into {} groups", self.headdim, self.ngroups));
        }
        let [lo, hi] = self.a_init_range;
        if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
            return err("a_init_range", format!("need 0 < lo ≤ hi < inf; got [{lo}, {hi}]"));
        }
        if !(self.dt_min > 0.0 && self.dt_max >= self.dt_min && self.dt_max.is_finite()) {
            return err("dt_max", format!("need 0 < dt_min ≤ dt_max < inf; got dt_min {}, dt_max {}", self.dt_min, self.dt_max));
        }
        if !(self.dt_init_floor > 0.0) {
            return err("dt_init_floor", format!("must be > 0; got {}", self.dt_init_floor));
        }
        if let Some([lo, hi]) = self.dt_limit {
            if !(lo >= 0.0 && hi > lo) {
                return err("dt_limit", format!("need 0 ≤ lo < hi; got [{lo}, {hi}]"));
            }
        }
        if let Some(c) = self.conv_init {
            if !(c > 0.0 && c.is_finite()) {
                return err("conv_init", format!("must be > 0 (or null); got {c}"));
            }
        }
        if !(self.norm_eps > 0.0) {
            return err("norm_eps", format!("must be > 0; got {}", self.norm_eps));
        }
        Ok(())
    }
}

pub struct Mamba2 {
    cfg: Mamba2Config,
    d_model: usize,
    /// (d_inner, H, P, G, N).
    dims: (usize, usize, usize, usize, usize),
    in_proj: Tensor,
    conv_w: Tensor,
    conv_b: Option<Tensor>,
    dt_bias: Tensor,
    a_log: Tensor,
    d_skip: Tensor,
    norm_w: Option<Tensor>,
    out_proj: Tensor,
}

/// Decode state: the last `d_conv − 1` pre-conv xBC rows `[B, d_conv−1, conv_dim]` and the SSM
/// state `[B,H,P,N]` (empty before the first token).
#[derive(Default)]
pub struct Mamba2State {
    conv: Option<Tensor>,
    ssm: Option<Tensor>,
}

/// f32 for half-precision activations (dt, A and decays), else the dtype itself.
fn gate_dtype(dt: DType) -> DType {
    crate::ops::reduction_dtype(dt)
}

impl Mamba2 {
    pub fn new(cfg: &Mamba2Config, dims: &BlockDims, pb: &mut ParamBuilder) -> Result<Self> {
        let d = dims.d_model;
        let (di, h, p, g, n) = (cfg.d_inner(d), cfg.nheads(d), cfg.headdim, cfg.ngroups, cfg.d_state);
        let conv_dim = cfg.conv_dim(d);
        let in_proj = pb.normal("in_proj", &[d, 2 * di + 2 * g * n + h], dims.init_std)?;
        let out_proj = pb.normal("out_proj", &[di, d], dims.out_std)?;
        let bound = 1.0 / (cfg.d_conv as f64).sqrt();
        let uniform = |pb: &ParamBuilder, name: &str, len: usize, b: f64| -> Vec<f64> {
            let mut rng = pb.rng_for(name);
            (0..len).map(|_| (2.0 * rng.next_f64() - 1.0) * b).collect()
        };
        let w = uniform(pb, "conv_w", conv_dim * cfg.d_conv, cfg.conv_init.unwrap_or(bound));
        let conv_w = pb.values("conv_w", &[conv_dim, cfg.d_conv], w, true)?;
        let conv_b = if cfg.conv_bias {
            let v = uniform(pb, "conv_b", conv_dim, bound);
            Some(pb.values("conv_b", &[conv_dim], v, false)?)
        } else {
            None
        };
        // dt log-uniform in [dt_min, dt_max], floored; dt_bias = softplus⁻¹(dt) = dt + ln(1 − e^−dt).
        let mut rng = pb.rng_for("dt_bias");
        let (lo, hi) = (cfg.dt_min.ln(), cfg.dt_max.ln());
        let dt_bias = (0..h)
            .map(|_| {
                let dt = (lo + rng.next_f64() * (hi - lo)).exp().max(cfg.dt_init_floor);
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect();
        let dt_bias = pb.values("dt_bias", &[h], dt_bias, false)?;
        let mut rng = pb.rng_for("A_log");
        let [alo, ahi] = cfg.a_init_range;
        let a_log = (0..h).map(|_| (alo + rng.next_f64() * (ahi - alo)).ln()).collect();
        let a_log = pb.values("A_log", &[h], a_log, false)?;
        let d_len = if cfg.d_has_hdim { di } else { h };
        let d_skip = pb.values("D", &[d_len], vec![1.0; d_len], false)?;
        let norm_w = if cfg.rmsnorm { Some(pb.constant("norm", &[di], 1.0)?) } else { None };
        Ok(Self { cfg: cfg.clone(), d_model: d, dims: (di, h, p, g, n), in_proj, conv_w, conv_b, dt_bias, a_log, d_skip, norm_w, out_proj })
    }

    /// dt `[R, H]` (gate dtype) from the raw projection `[R, H]`: softplus(raw + dt_bias), clamped.
    fn dt(&self, raw: &Tensor) -> Result<Tensor> {
        let gt = gate_dtype(raw.dtype());
        let dt = softplus(&raw.to_dtype(gt)?.broadcast_add(&self.dt_bias.to_dtype(gt)?)?)?;
        match self.cfg.dt_limit {
            Some([lo, hi]) => dt.clamp(lo, hi),
            None => Ok(dt),
        }
    }

    /// A = −exp(A_log) `[H]` in the gate dtype.
    fn a(&self, dt: DType) -> Result<Tensor> {
        self.a_log.to_dtype(gate_dtype(dt))?.exp()?.neg()
    }

    /// D skip: y + D ⊙ x for y, x `[B,T,H,P]`.
    fn skip(&self, y: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (_, h, p, _, _) = self.dims;
        let d = if self.cfg.d_has_hdim { self.d_skip.reshape((1, 1, h, p))? } else { self.d_skip.reshape((1, 1, h, 1))? };
        y + x.broadcast_mul(&d.to_dtype(x.dtype())?)?
    }

    /// Gated group RMSNorm and out_proj: y, z `[R, d_inner]` → `[R, d]`.
    fn out(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        let (di, _, _, g, _) = self.dims;
        let y = match &self.norm_w {
            None => swiglu(z, y)?,
            Some(w) => {
                let pre = if self.cfg.norm_before_gate { y.clone() } else { swiglu(z, y)? };
                let normed = if g == 1 {
                    rms_norm(&pre.contiguous()?, w, self.cfg.norm_eps)?
                } else {
                    let r = pre.dim(0)?;
                    let ones = Tensor::ones(di / g, pre.dtype(), pre.device())?;
                    rms_norm(&pre.reshape((r, g, di / g))?, &ones, self.cfg.norm_eps)?.reshape((r, di))?.broadcast_mul(w)?
                };
                if self.cfg.norm_before_gate { swiglu(z, &normed)? } else { normed }
            }
        };
        linear(&y, &self.out_proj, (y.dim(0)?, self.out_proj.dim(1)?))
    }

    /// Splits the projection `[R, ·]` into (z, xBC, dt_raw).
    fn split(&self, zxbcdt: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (di, h, _, g, n) = self.dims;
        let cd = di + 2 * g * n;
        Ok((zxbcdt.narrow(1, 0, di)?, zxbcdt.narrow(1, di, cd)?, zxbcdt.narrow(1, di + cd, h)?))
    }

    /// Splits activated xBC `[B,T,conv_dim]` into x `[B,T,H,P]`, Bm, Cm `[B,T,G,N]`.
    fn split_xbc(&self, xbc: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (di, h, p, g, n) = self.dims;
        let (b, t, _) = xbc.dims3()?;
        let x = xbc.narrow(2, 0, di)?.reshape((b, t, h, p))?;
        let bm = xbc.narrow(2, di, g * n)?.reshape((b, t, g, n))?;
        let cm = xbc.narrow(2, di + g * n, g * n)?.reshape((b, t, g, n))?;
        Ok((x, bm, cm))
    }

    /// Decode form: one token x_t `[B, d]` → y_t `[B, d]`, advancing `state`.
    pub fn step(&self, x_t: &Tensor, state: &mut Mamba2State) -> Result<Tensor> {
        let (b, _d) = x_t.dims2()?;
        let (di, h, p, _, _) = self.dims;
        let (z, xbc, dt_raw) = self.split(&x_t.matmul(&self.in_proj)?)?;
        let cs = self.cfg.d_conv;
        let prev = match state.conv.take() {
            Some(p) => p,
            None => Tensor::zeros((b, cs - 1, xbc.dim(1)?), x_t.dtype(), x_t.device())?,
        };
        let win = Tensor::cat(&[&prev, &xbc.unsqueeze(1)?], 1)?; // [B, d_conv, conv_dim]
        let mut conv = win.broadcast_mul(&self.conv_w.t()?.unsqueeze(0)?)?.sum(1)?;
        if let Some(cb) = &self.conv_b {
            conv = conv.broadcast_add(cb)?;
        }
        state.conv = Some(win.narrow(1, 1, cs - 1)?);
        let (x, bm, cm) = self.split_xbc(&conv.silu()?.unsqueeze(1)?)?;
        let dt = self.dt(&dt_raw)?;
        let ssm = match state.ssm.take() {
            Some(s) => s,
            None => Tensor::zeros((b, h, p, self.dims.4), gate_dtype(x_t.dtype()), x_t.device())?,
        };
        let (y, s) = ssd_step(&x.squeeze(1)?, &dt, &self.a(x_t.dtype())?, &bm.squeeze(1)?, &cm.squeeze(1)?, &ssm)?;
        state.ssm = Some(s);
        let y = self.skip(&y.unsqueeze(1)?, &x)?.reshape((b, di))?;
        self.out(&y, &z)
    }
}

impl Mixer for Mamba2 {
    /// x `[B,T,d]` → `[B,T,d]` through the chunked SSD.
    fn forward(&self, x: &Tensor, _ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (b, t, _d) = x.dims3()?;
        let (di, h, p, g, n) = self.dims;
        // in_proj's column blocks [z | x | B | C | dt] and the matching conv rows, each applied
        // on its own: slicing the small weights instead of the [B·T, ·] activations keeps the
        // activations' narrow backward (a zero-padded full-size copy per slice in candle) out of
        // the step. Same parameters and values as the split of the full projection (`step`).
        let cols = |start: usize, len: usize| -> Result<Tensor> { linear(x, &self.in_proj.narrow(1, start, len)?.contiguous()?, (b * t, len)) };
        let conv = |start: usize, len: usize| -> Result<Tensor> {
            let w = self.conv_w.narrow(0, start, len)?;
            let bias = self.conv_b.as_ref().map(|cb| cb.narrow(0, start, len)).transpose()?;
            short_conv(&cols(di + start, len)?.reshape((b, t, len))?, &w, bias.as_ref(), true)
        };
        let z = cols(0, di)?;
        let xh = conv(0, di)?.reshape((b, t, h, p))?;
        let bm = conv(di, g * n)?.reshape((b, t, g, n))?;
        let cm = conv(di + g * n, g * n)?.reshape((b, t, g, n))?;
        let dt = self.dt(&cols(2 * di + 2 * g * n, h)?)?.reshape((b, t, h))?;
        let (y, _state) = ssd_train(&xh, &dt, &self.a(x.dtype())?, &bm, &cm, None, self.cfg.chunk_size, self.cfg.fused_kernel)?;
        let y = self.skip(&y, &xh)?.reshape((b * t, di))?;
        self.out(&y, &z)?.reshape((b, t, self.d_model))
    }

    /// One fused node ([`crate::ops::mamba2_sublayer`]) on CPU in f32/f64 for the mamba_ssm
    /// default form: fused scan kernel, conv bias, gated RMSNorm after the gate, one group, no
    /// dt clamp.
    fn forward_residual(&self, x: &Tensor, g: &Tensor, eps: f64, _ctx: &mut ForwardCtx) -> Option<Result<Tensor>> {
        let c = &self.cfg;
        let (di, h, p, groups, n) = self.dims;
        let (Some(conv_b), Some(norm_w)) = (&self.conv_b, &self.norm_w) else { return None };
        if !c.fused_kernel || c.norm_before_gate || c.dt_limit.is_some() || groups != 1 || !crate::ops::cpu_fusable(&[x, g, &self.in_proj]) {
            return None;
        }
        let w = Mamba2Weights {
            g,
            in_proj: &self.in_proj,
            conv_w: &self.conv_w,
            conv_b,
            dt_bias: &self.dt_bias,
            a_log: &self.a_log,
            d_skip: &self.d_skip,
            norm_w,
            out_proj: &self.out_proj,
        };
        let dims = Mamba2Dims { d_model: self.d_model, d_inner: di, heads: h, headdim: p, groups, d_state: n, d_conv: c.d_conv, d_has_hdim: c.d_has_hdim };
        Some(mamba2_sublayer(x, &w, dims, eps, c.norm_eps))
    }

    /// 2·(in_proj + out_proj weights) + 2·d_conv·conv_dim for the conv + the chunked core:
    /// 2·H·[Q(N + P) + 2PN + PN/Q] with Q = min(chunk_size, seq_len) (see [`crate::ops::ssd::ssd_chunked`]);
    /// element-wise gates, skip and norm are not counted.
    fn flops_per_token(&self, seq_len: usize) -> f64 {
        let (di, h, p, g, n) = self.dims;
        let d = self.d_model;
        let proj = d * (2 * di + 2 * g * n + h) + di * d;
        let conv = 2 * self.cfg.d_conv * self.cfg.conv_dim(d);
        let q = self.cfg.chunk_size.min(seq_len.max(1)) as f64;
        let (hf, pf, nf) = (h as f64, p as f64, n as f64);
        let core = 2.0 * hf * (q * (nf + pf) + 2.0 * pf * nf + pf * nf / q);
        2.0 * proj as f64 + conv as f64 + core
    }
}

#[cfg(test)]
#[path = "mamba2_tests.rs"]
mod tests;
