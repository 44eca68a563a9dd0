//! Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2
//! with Delta Rule", arXiv:2412.06464), parameterised as fla `fla/layers/gated_deltanet.py`
//! (`use_gate_in_kernel` semantics: gate, L2 norm and β applied here, before the core op);
//! `../shared/reference/mixers.md` §3. Core op: [`crate::ops::gated_delta_rule`].
//!
//! For x `[B,T,d]` (weights stored `[in, out]`):
//! ```text
//! q, k = L2norm_head(SiLU(ShortConv(x W_q | x W_k)))     [B,T,H,K]   (eps 1e-6)
//! v    = SiLU(ShortConv(x W_v))                          [B,T,H,V]
//! β    = sigmoid(x W_b)  (×2 if allow_neg_eigval)        [B,T,H]
//! g    = −exp(A_log) · softplus(x W_a + dt_bias)         [B,T,H]     (log α, f32 or f64)
//! o    = gdr_chunked(q, k, v, g, β)                      [B,T,H,V]   (or the fused CPU kernel)
//! o    = RMSNorm_V(o) ⊙ SiLU(x W_g)   (use_gate; else RMSNorm_V(o))
//! y    = o W_o                                           [B,T,d]
//! ```
//! ShortConv is fla's `ShortConvolution`: causal depthwise conv, kernel `conv_size`, no bias,
//! weight `[C, conv_size]` (fla `[C, 1, conv_size]`), `y_t = Σ_i w[:, i] x_{t−(conv_size−1)+i}`,
//! computed as a sum of shifted zero-padded slices (candle's depthwise conv1d backward is slow).
//! Without `use_short_conv`, q, k, v are SiLU(x W) as in fla. No GVA (num_v_heads = num_heads).
//!
//! Parameters: wq, wk d×(H·K); wv, wg d×(H·V); wa, wb d×H; wo (H·V)×d (all N(0, init_std²),
//! wo N(0, out_std²)); q_conv, k_conv `[H·K, conv_size]`, v_conv `[H·V, conv_size]`
//! N(0, init_std²) as fla's nn.Conv1d init, not decayed; A_log `[H]` = ln U(0, 16]; dt_bias `[H]`
//! = softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1] floored at 1e-4 (Mamba2); o_norm `[V]` ones.
//! A_log, dt_bias, o_norm and the conv weights are not weight-decayed.
//!
//! The core op runs through [`crate::ops::gdr_fused`] (fused CPU kernel, hand-written backward)
//! for f32/f64 on the CPU unless `fused_kernel: false`; else through the composed [`crate::ops::gated_delta_rule::gdr_chunked`].
//!
//! Forms: [`GatedDeltaNet::forward`] (chunked, training) and [`GatedDeltaNet::step`] (decode,
//! conv buffers + recurrent state in [`GdnState`]); the tests tie them together.

use super::{BlockConfig, BlockDims, BlockEntry, ForwardCtx, Mixer};
use crate::ops::gdn_sublayer::{gdn_sublayer, GdnDims, GdnWeights};
use crate::ops::linear::linear;
use crate::model::params::ParamBuilder;
use crate::ops::gated_delta_rule::gdr_step;
use crate::ops::gdr_fused::gdr_train;
use crate::ops::norm::rms_norm;
use crate::ops::swiglu::swiglu;
use crate::ops::short_conv::causal_conv_step;
use crate::ops::short_conv_fused::short_conv;
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

pub const ENTRY: BlockEntry = BlockEntry {
    name: "gated_deltanet",
    about: "Gated DeltaNet (gated delta rule, chunked WY form; short convs, L2-normed q/k, gated RMSNorm output)",
    defaults: super::defaults_of::<GatedDeltaNetConfig>,
    normalize: super::normalize_with::<GatedDeltaNetConfig>,
    build: |v, dims, pb| Ok(Box::new(GatedDeltaNet::new(&super::parse(v)?, dims, pb)?)),
};

/// Options of `blocks.gated_deltanet`. Defaults follow fla's `GatedDeltaNetConfig` except the
/// head count/width, sized for small models: 4 heads of 0.75·d/4 key dims (fla keeps
/// num_heads·head_dim = 0.75·d, so the layer has about 6d² weights).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatedDeltaNetConfig {
    /// Heads (q/k and v heads alike).
    pub num_heads: usize,
    /// Key (q/k) head dimension K; null = 0.75·d_model / num_heads.
    pub head_dim: Option<usize>,
    /// Value head dimension V = expand_v · K (must be a whole number).
    pub expand_v: f64,
    /// Output gate: RMSNorm(o) ⊙ SiLU(x W_g).
    pub use_gate: bool,
    /// Causal depthwise short convolutions on q, k, v.
    pub use_short_conv: bool,
    /// Kernel width of the short convolutions.
    pub conv_size: usize,
    /// β ∈ (0, 2) instead of (0, 1) (negative eigenvalues of the transition).
    pub allow_neg_eigval: bool,
    /// Chunk length of the chunked form (fla: 64).
    pub chunk_size: usize,
    /// Epsilon of the per-head output RMSNorm.
    pub norm_eps: f64,
    /// Run the core op through the fused CPU kernel ([`crate::ops::gdr_fused`]) when the inputs
    /// are f32/f64 on the CPU; false forces the composed chunked form (it is always used on
    /// CUDA and for half precision).
    pub fused_kernel: bool,
}

impl Default for GatedDeltaNetConfig {
    fn default() -> Self {
        Self {
            num_heads: 4,
            head_dim: None,
            expand_v: 2.0,
            use_gate: true,
            use_short_conv: true,
            conv_size: 4,
            allow_neg_eigval: false,
            chunk_size: 64,
            norm_eps: 1e-5,
            fused_kernel: true,
        }
    }
}

impl GatedDeltaNetConfig {
    pub fn key_dim(&self, d_model: usize) -> usize {
        self.head_dim.unwrap_or(3 * d_model / (4 * self.num_heads.max(1)))
    }
    pub fn value_dim(&self, d_model: usize) -> usize {
        (self.key_dim(d_model) as f64 * self.expand_v).round() as usize
    }
}

impl BlockConfig for GatedDeltaNetConfig {
    fn check(&self, d_model: usize) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if self.num_heads == 0 {
            return err("num_heads", "must be at least 1".into());
        }
        if self.head_dim.is_none() && (3 * d_model % (4 * self.num_heads) != 0 || 3 * d_model < 4 * self.num_heads) {
            return err("num_heads", format!("0.75·d_model = {} is not a positive multiple of num_heads {}; set head_dim", 0.75 * d_model as f64, self.num_heads));
        }
        let k = self.key_dim(d_model);
        if k == 0 {
            return err("head_dim", "must be at least 1".into());
        }
        let v = k as f64 * self.expand_v;
        if !(v >= 1.0) || (v - v.round()).abs() > 1e-9 {
            return err("expand_v", format!("head_dim·expand_v must be a whole number ≥ 1; got {k}·{} = {v}", self.expand_v));
        }
        if self.conv_size == 0 {
            return err("conv_size", "must be at least 1".into());
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

pub struct GatedDeltaNet {
    cfg: GatedDeltaNetConfig,
    d_model: usize,
    /// (H, K, V).
    hkv: (usize, usize, usize),
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wa: Tensor,
    wb: Tensor,
    wg: Option<Tensor>,
    wo: Tensor,
    /// q, k, v conv weights `[C, conv_size]` (when use_short_conv).
    convs: Option<[Tensor; 3]>,
    a_log: Tensor,
    dt_bias: Tensor,
    o_norm: Tensor,
}

/// Decode state: the last `conv_size − 1` pre-conv q, k, v projections `[B, conv_size−1, C]`
/// each, and the recurrent state S `[B,H,K,V]` (empty before the first token).
#[derive(Default)]
pub struct GdnState {
    conv: Option<[Tensor; 3]>,
    s: Option<Tensor>,
}

/// f32 for half-precision activations (gates and decays), else the dtype itself.
fn gate_dtype(dt: DType) -> DType {
    if dt == DType::F64 { DType::F64 } else { DType::F32 }
}

/// sigmoid(x) = (1 + tanh(x/2)) / 2 (finite gradients for any x).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

/// softplus(x) = relu(x) + ln(1 + exp(−|x|)) (no overflow).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// L2 normalisation over the last dim: x / sqrt(Σx² + eps) (fla `l2norm`).
fn l2norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    // The sum of squares in f32 for bf16/f16 inputs (a bf16 accumulator loses the small terms).
    let xf = x.to_dtype(gate_dtype(x.dtype()))?;
    xf.broadcast_div(&(xf.sqr()?.sum_keepdim(D::Minus1)? + eps)?.sqrt()?)?.to_dtype(x.dtype())
}

const L2_EPS: f64 = 1e-6;

impl GatedDeltaNet {
    pub fn new(cfg: &GatedDeltaNetConfig, dims: &BlockDims, pb: &mut ParamBuilder) -> Result<Self> {
        let d = dims.d_model;
        let (h, k, v) = (cfg.num_heads, cfg.key_dim(d), cfg.value_dim(d));
        let std = dims.init_std;
        let wq = pb.normal("wq", &[d, h * k], std)?;
        let wk = pb.normal("wk", &[d, h * k], std)?;
        let wv = pb.normal("wv", &[d, h * v], std)?;
        let wa = pb.normal("wa", &[d, h], std)?;
        let wb = pb.normal("wb", &[d, h], std)?;
        let wg = if cfg.use_gate { Some(pb.normal("wg", &[d, h * v], std)?) } else { None };
        let wo = pb.normal("wo", &[h * v, d], dims.out_std)?;
        let convs = if cfg.use_short_conv {
            let cs = cfg.conv_size;
            Some([
                pb.normal_with_decay("q_conv", &[h * k, cs], std, false)?,
                pb.normal_with_decay("k_conv", &[h * k, cs], std, false)?,
                pb.normal_with_decay("v_conv", &[h * v, cs], std, false)?,
            ])
        } else {
            None
        };
        // A = U(0, 16], A_log = ln A (fla; Mamba2 uses U(1, 16)).
        let mut rng = pb.rng_for("A_log");
        let a_log = (0..h).map(|_| (16.0 * (1.0 - rng.next_f64())).ln()).collect();
        let a_log = pb.values("A_log", &[h], a_log, false)?;
        // dt log-uniform in [1e-3, 0.1], floored at 1e-4; dt_bias = softplus⁻¹(dt) = dt + ln(1 − e^−dt).
        let mut rng = pb.rng_for("dt_bias");
        let (lo, hi) = (1e-3f64.ln(), 0.1f64.ln());
        let dt_bias = (0..h)
            .map(|_| {
                let dt = (lo + rng.next_f64() * (hi - lo)).exp().max(1e-4);
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect();
        let dt_bias = pb.values("dt_bias", &[h], dt_bias, false)?;
        let o_norm = pb.constant("o_norm", &[v], 1.0)?;
        Ok(Self { cfg: cfg.clone(), d_model: d, hkv: (h, k, v), wq, wk, wv, wa, wb, wg, wo, convs, a_log, dt_bias, o_norm })
    }

    /// β `[B,T,H]` and g `[B,T,H]` (gate dtype) from x2 `[B·T, d]`.
    fn gates(&self, x2: &Tensor, b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let gt = gate_dtype(x2.dtype());
        let h = self.hkv.0;
        let mut beta = sigmoid(&x2.matmul(&self.wb)?.to_dtype(gt)?)?;
        if self.cfg.allow_neg_eigval {
            beta = (beta * 2.0)?;
        }
        let a = self.a_log.to_dtype(gt)?.exp()?;
        let sp = softplus(&crate::ops::channel::add_channels(&x2.matmul(&self.wa)?.to_dtype(gt)?, &self.dt_bias.to_dtype(gt)?)?)?;
        let g = sp.broadcast_mul(&a)?.neg()?;
        Ok((beta.reshape((b, t, h))?, g.reshape((b, t, h))?))
    }

    /// Output gate, norm and projection: o `[B,T,H,V]`, x2 `[B·T, d]` → y `[B·T, d]`.
    fn out(&self, o: &Tensor, x2: &Tensor) -> Result<Tensor> {
        let (b, t, h, v) = o.dims4()?;
        let mut o = rms_norm(&o.contiguous()?, &self.o_norm, self.cfg.norm_eps)?;
        if let Some(wg) = &self.wg {
            o = swiglu(&linear(x2, wg, (b, t, h, v))?, &o)?;
        }
        linear(&o, &self.wo, (b * t, self.wo.dim(1)?))
    }

    /// Decode form: one token x_t `[B, d]` → y_t `[B, d]`, advancing `state`.
    pub fn step(&self, x_t: &Tensor, state: &mut GdnState) -> Result<Tensor> {
        let (b, _d) = x_t.dims2()?;
        let (h, k, v) = self.hkv;
        let raw = [x_t.matmul(&self.wq)?, x_t.matmul(&self.wk)?, x_t.matmul(&self.wv)?]; // [B, C] each
        let act: Vec<Tensor> = match &self.convs {
            Some(ws) => {
                let prev = state.conv.take();
                let mut out = Vec::with_capacity(3);
                let mut next = Vec::with_capacity(3);
                for i in 0..3 {
                    let (y, win) = causal_conv_step(&raw[i], prev.as_ref().map(|p| &p[i]), &ws[i])?;
                    out.push(y.silu()?);
                    next.push(win);
                }
                state.conv = Some([next[0].clone(), next[1].clone(), next[2].clone()]);
                out
            }
            None => raw.iter().map(|r| r.silu()).collect::<Result<_>>()?,
        };
        let q = l2norm(&act[0].reshape((b, h, k))?, L2_EPS)?;
        let kk = l2norm(&act[1].reshape((b, h, k))?, L2_EPS)?;
        let vv = act[2].reshape((b, h, v))?;
        let (beta, g) = self.gates(x_t, b, 1)?;
        let s = match state.s.take() {
            Some(s) => s,
            None => Tensor::zeros((b, h, k, v), gate_dtype(x_t.dtype()), x_t.device())?,
        };
        let (o, s) = gdr_step(&q, &kk, &vv, &g.squeeze(1)?, &beta.squeeze(1)?, &s)?;
        state.s = Some(s);
        self.out(&o.unsqueeze(1)?, x_t)
    }
}

impl Mixer for GatedDeltaNet {
    /// x `[B,T,d]` → `[B,T,d]` through the chunked core op.
    fn forward(&self, x: &Tensor, _ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, k, v) = self.hkv;
        let x2 = x.reshape((b * t, d))?;
        let proj = |w: &Tensor, i: usize| -> Result<Tensor> {
            let y = linear(x, w, (b, t, w.dim(1)?))?;
            match &self.convs {
                Some(ws) => short_conv(&y, &ws[i], None, true),
                None => y.silu(),
            }
        };
        let q = l2norm(&proj(&self.wq, 0)?.reshape((b, t, h, k))?, L2_EPS)?;
        let kk = l2norm(&proj(&self.wk, 1)?.reshape((b, t, h, k))?, L2_EPS)?;
        let vv = proj(&self.wv, 2)?.reshape((b, t, h, v))?;
        let (beta, g) = self.gates(&x2, b, t)?;
        let (o, _state) = gdr_train(&q, &kk, &vv, &g, &beta, None, self.cfg.chunk_size, self.cfg.fused_kernel)?;
        self.out(&o, &x2)?.reshape((b, t, self.d_model))
    }

    /// One fused node ([`crate::ops::gdn_sublayer`]) on CPU in f32/f64 for the fla default form
    /// (short convs, output gate, fused scan kernel).
    fn forward_residual(&self, x: &Tensor, g: &Tensor, eps: f64, _ctx: &mut ForwardCtx) -> Option<Result<Tensor>> {
        let (Some([qc, kc, vc]), Some(wg)) = (&self.convs, &self.wg) else { return None };
        if !self.cfg.fused_kernel || !crate::ops::cpu_fusable(&[x, g, &self.wq]) {
            return None;
        }
        let (h, k, v) = self.hkv;
        let w = GdnWeights([g, &self.wq, &self.wk, &self.wv, &self.wa, &self.wb, wg, &self.wo, qc, kc, vc, &self.a_log, &self.dt_bias, &self.o_norm]);
        let dims = GdnDims {
            d_model: self.d_model,
            heads: h,
            key_dim: k,
            value_dim: v,
            conv_size: self.cfg.conv_size,
            allow_neg_eigval: self.cfg.allow_neg_eigval,
            norm_eps: self.cfg.norm_eps,
            l2_eps: L2_EPS,
        };
        Some(gdn_sublayer(x, &w, dims, eps))
    }

    /// 2·(projection weights) + 2·conv_size·(2HK + HV) for the convs + the chunked core:
    /// 2·H·[C(3K + 2V) + C²/2 + 3KV] with C = min(chunk_size, seq_len) (see
    /// [`crate::ops::gated_delta_rule::gdr_chunked`]); element-wise gates and norms are not counted.
    fn flops_per_token(&self, seq_len: usize) -> f64 {
        let (h, k, v) = self.hkv;
        let d = self.d_model;
        let gate = if self.cfg.use_gate { d * h * v } else { 0 };
        let proj = d * h * k * 2 + d * h * v + gate + 2 * d * h + h * v * d;
        let conv = if self.cfg.use_short_conv { 2 * self.cfg.conv_size * (2 * h * k + h * v) } else { 0 };
        let c = self.cfg.chunk_size.min(seq_len.max(1)) as f64;
        let (hf, kf, vf) = (h as f64, k as f64, v as f64);
        let core = 2.0 * hf * (c * (3.0 * kf + 2.0 * vf) + c * c / 2.0 + 3.0 * kf * vf);
        2.0 * proj as f64 + conv as f64 + core
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::ParamStore;
    use crate::testing::{assert_close, check_block_grads, check_sublayer, rand_tensor};
    use candle_core::{Device, Var};

    fn build(cfg: &GatedDeltaNetConfig, d: usize, store: &mut ParamStore, dtype: DType) -> GatedDeltaNet {
        let dims = BlockDims { d_model: d, max_seq_len: 64, n_layers: 2, layer_idx: 0, init_std: 0.3, out_std: 0.3 };
        let mut pb = ParamBuilder::new(store, 7, dtype, &Device::Cpu);
        GatedDeltaNet::new(cfg, &dims, &mut pb).unwrap()
    }

    fn cfg(chunk_size: usize) -> GatedDeltaNetConfig {
        GatedDeltaNetConfig { num_heads: 2, head_dim: Some(4), expand_v: 1.5, chunk_size, ..Default::default() }
    }

    /// The fused sublayer ([`crate::ops::gdn_sublayer`]) == the composed block with its pre-norm
    /// and residual, forward and every gradient, f64 (plus finite differences) and f32, with and
    /// without negative eigenvalues; T = 37 spans several checkpoint segments of the scan. Without
    /// the gate, the convs or the fused kernel the composed path runs.
    #[test]
    fn fused_sublayer_matches_composed() {
        // f32: the A_log and dt_bias gradients are sums of B·T·H signed terms that the two forms
        // accumulate in different orders (chunk partials vs candle's reductions); measured up to
        // 1.03e-5 relative (every other value ≤ 3e-6). f64 is the tight check.
        for neg in [false, true] {
            for (dt, tol) in [(DType::F64, 1e-10), (DType::F32, 3e-5)] {
                let mut store = ParamStore::default();
                let l = build(&GatedDeltaNetConfig { allow_neg_eigval: neg, ..cfg(8) }, 12, &mut store, dt);
                check_sublayer(&l, &store, &[2, 37, 12], tol);
            }
        }
        for c in [GatedDeltaNetConfig { use_gate: false, ..cfg(8) }, GatedDeltaNetConfig { use_short_conv: false, ..cfg(8) }, GatedDeltaNetConfig { fused_kernel: false, ..cfg(8) }] {
            let l = build(&c, 12, &mut ParamStore::default(), DType::F64);
            let x = rand_tensor(&[1, 5, 12], 1.0, 1);
            assert!(l.forward_residual(&x, &Tensor::ones(12, DType::F64, &Device::Cpu).unwrap(), 1e-6, &mut ForwardCtx::default()).is_none());
        }
    }

    /// Parallel form (fused kernel, and the composed chunked form) == token-by-token decode (conv
    /// buffers + gdr_step), f64, for the option combinations; T = 13 crosses chunk boundaries of 4.
    #[test]
    fn parallel_matches_step_b2_t13_h2() {
        let combos = [(true, true, false, true), (false, true, true, true), (true, false, false, true), (true, true, false, false)];
        for (use_gate, use_short_conv, allow_neg_eigval, fused_kernel) in combos {
            let c = GatedDeltaNetConfig { use_gate, use_short_conv, allow_neg_eigval, fused_kernel, ..cfg(4) };
            let mut store = ParamStore::default();
            let l = build(&c, 12, &mut store, DType::F64);
            let x = rand_tensor(&[2, 13, 12], 1.0, 3);
            let par = l.forward(&x, &mut ForwardCtx::default()).unwrap();
            let mut st = GdnState::default();
            let steps: Vec<Tensor> = (0..13).map(|i| l.step(&x.narrow(1, i, 1).unwrap().squeeze(1).unwrap(), &mut st).unwrap()).collect();
            assert_close(&format!("gdn parallel vs step {c:?}"), &par, &Tensor::stack(&steps, 1).unwrap(), 1e-10);
        }
    }

    /// Finite-difference check of the whole layer w.r.t. its input and every parameter, through
    /// the fused kernel and (last config) the composed chunked form.
    #[test]
    fn gradients_match_finite_differences() {
        for c in [cfg(2), GatedDeltaNetConfig { use_gate: false, allow_neg_eigval: true, ..cfg(3) }, GatedDeltaNetConfig { fused_kernel: false, ..cfg(3) }] {
            let mut store = ParamStore::default();
            let l = build(&c, 8, &mut store, DType::F64);
            check_block_grads(&l, &store, &[2, 5, 8]);
        }
    }

    /// Every parameter receives a non-zero gradient; decay flags as documented.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let mut store = ParamStore::default();
        let l = build(&cfg(4), 8, &mut store, DType::F32);
        let x = Var::from_tensor(&rand_tensor(&[2, 9, 8], 1.0, 5).to_dtype(DType::F32).unwrap()).unwrap();
        let w = rand_tensor(&[2, 9, 8], 1.0, 6).to_dtype(DType::F32).unwrap();
        let y = l.forward(x.as_tensor(), &mut ForwardCtx::default()).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(store.params.len(), 13);
        for (name, p) in &store.params {
            let g = grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
            let m = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(m > 0.0 && m.is_finite(), "{name}: max|grad| = {m}");
            let want_decay = ["wq", "wk", "wv", "wa", "wb", "wg", "wo"].contains(&name.as_str());
            assert_eq!(p.decay, want_decay, "{name}: decay flag");
        }
    }

    /// Init: A = exp(A_log) ∈ (0, 16], softplus(dt_bias) ∈ [1e-3, 0.1]; defaults resolve for d = 128.
    #[test]
    fn init_ranges_and_defaults() {
        let mut store = ParamStore::default();
        let l = build(&GatedDeltaNetConfig { num_heads: 64, head_dim: Some(2), ..Default::default() }, 8, &mut store, DType::F64);
        for a in crate::testing::to_vec(&l.a_log.exp().unwrap()) {
            assert!(a > 0.0 && a <= 16.0, "A = {a}");
        }
        for dt in crate::testing::to_vec(&softplus(&l.dt_bias).unwrap()) {
            assert!((1e-3 - 1e-12..=0.1 + 1e-12).contains(&dt), "dt = {dt}");
        }
        let d = GatedDeltaNetConfig::default();
        assert!(d.check(128).is_ok());
        assert_eq!((d.key_dim(128), d.value_dim(128)), (24, 48));
        assert_eq!(d.check(10).unwrap_err().0, "num_heads");
        assert_eq!(GatedDeltaNetConfig { head_dim: Some(3), expand_v: 0.5, ..d }.check(128).unwrap_err().0, "expand_v");
    }
}
