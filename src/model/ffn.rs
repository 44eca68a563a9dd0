//! Feed-forward networks: SwiGLU (Shazeer 2020, arXiv:2002.05202), squared ReLU
//! (So et al. 2021 "Primer", arXiv:2109.08668) and RWKV-7's channel-mix (BlinkDL/RWKV-LM
//! `RWKV_CMix_x070`: `k = ReLU((x + (shift(x) − x) ⊙ μ_k) W_up)²; y = k W_down`).
//! Bias-free, weights `[in, out]`.

use crate::ops::linear::linear;
use crate::config::model::FfnKind;
use crate::model::params::ParamBuilder;
use candle_core::{Result, Tensor};

pub struct Ffn {
    kind: FfnKind,
    w_gate: Option<Tensor>,
    /// RWKV-7 channel-mix token-shift mix μ_k `[d]` (rwkv7_cmix only).
    shift_mix: Option<Tensor>,
    w_up: Tensor,
    w_down: Tensor,
    d: usize,
    hidden: usize,
}

impl Ffn {
    /// `std` for gate/up, `out_std` for the residual output (down) projection.
    pub fn new(kind: FfnKind, d: usize, hidden: usize, std: f64, out_std: f64, pb: &mut ParamBuilder) -> Result<Self> {
        Self::new_at(kind, d, hidden, std, out_std, (0, 1), pb)
    }

    /// As [`Self::new`] for layer `layer.0` of `layer.1` (the rwkv7_cmix init depends on depth:
    /// μ_k = 1 − (i/d)^{(1 − ℓ/L)⁴}, W_up ~ U(±0.5/√d), W_down = 0, as BlinkDL; the model's
    /// `std`/`out_std` do not apply to it; μ_k is not weight-decayed).
    pub fn new_at(kind: FfnKind, d: usize, hidden: usize, std: f64, out_std: f64, layer: (usize, usize), pb: &mut ParamBuilder) -> Result<Self> {
        if kind == FfnKind::Rwkv7Cmix {
            let r1 = 1.0 - layer.0 as f64 / layer.1.max(1) as f64;
            let mu = (0..d).map(|i| 1.0 - (i as f64 / d as f64).powf(r1.powi(4))).collect();
            let shift_mix = Some(pb.values("x_k", &[d], mu, false)?);
            let mut rng = pb.rng_for("w_up");
            let up = crate::blocks::rwkv7::uniform(&mut rng, d * hidden, 0.5 / (d as f64).sqrt());
            let w_up = pb.values("w_up", &[d, hidden], up, true)?;
            let w_down = pb.values("w_down", &[hidden, d], vec![0.0; hidden * d], true)?;
            return Ok(Self { kind, w_gate: None, shift_mix, w_up, w_down, d, hidden });
        }
        let w_gate = match kind {
            FfnKind::Swiglu => Some(pb.normal("w_gate", &[d, hidden], std)?),
            _ => None,
        };
        let w_up = pb.normal("w_up", &[d, hidden], std)?;
        let w_down = pb.normal("w_down", &[hidden, d], out_std)?;
        Ok(Self { kind, w_gate, shift_mix: None, w_up, w_down, d, hidden })
    }

    /// x `[B, T, d]` → `[B, T, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let xin = match &self.shift_mix {
            Some(mu) => crate::ops::channel::mix_channels(x, &(crate::blocks::rwkv7::token_shift(x, None)? - x)?, mu)?,
            None => x.clone(),
        };
        // One autograd node per projection (see ops::linear).
        let up = linear(&xin, &self.w_up, (b * t, self.hidden))?;
        let h = match (&self.kind, &self.w_gate) {
            (FfnKind::Swiglu, Some(g)) => crate::ops::swiglu::swiglu(&linear(&xin, g, (b * t, self.hidden))?, &up)?,
            _ => up.relu()?.sqr()?,
        };
        linear(&h, &self.w_down, (b, t, d))
    }

    /// The pre-norm sublayer `x + self(RMSNorm(x; g))`. A SwiGLU feed-forward on CPU (f32/f64)
    /// runs as one fused autograd node ([`crate::ops::ffn_fused`]), the rest composed.
    pub fn forward_residual(&self, x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
        if let (FfnKind::Swiglu, Some(wg)) = (&self.kind, &self.w_gate) {
            if crate::ops::cpu_fusable(&[x, g, wg, &self.w_up, &self.w_down]) {
                return crate::ops::ffn_fused::swiglu_ffn_residual(x, g, wg, &self.w_up, &self.w_down, eps);
            }
        }
        x + self.forward(&crate::ops::norm::rms_norm(x, g, eps)?)?
    }

    /// Forward FLOPs per token (2 per multiply-add).
    pub fn flops_per_token(&self) -> f64 {
        let mats = if self.w_gate.is_some() { 3 } else { 2 };
        2.0 * (mats * self.d * self.hidden) as f64
    }
}
