//! Feed-forward networks: SwiGLU (Shazeer 2020, arXiv:2002.05202) and squared ReLU
//! (So et al. 2021 "Primer", arXiv:2109.08668). Bias-free, weights `[in, out]`.

use crate::config::model::FfnKind;
use crate::model::params::ParamBuilder;
use candle_core::{Result, Tensor};

pub struct Ffn {
    kind: FfnKind,
    w_gate: Option<Tensor>,
    w_up: Tensor,
    w_down: Tensor,
    d: usize,
    hidden: usize,
}

impl Ffn {
    /// `std` for gate/up, `out_std` for the residual output (down) projection.
    pub fn new(kind: FfnKind, d: usize, hidden: usize, std: f64, out_std: f64, pb: &mut ParamBuilder) -> Result<Self> {
        let w_gate = match kind {
            FfnKind::Swiglu => Some(pb.normal("w_gate", &[d, hidden], std)?),
            FfnKind::Relu2 => None,
        };
        let w_up = pb.normal("w_up", &[d, hidden], std)?;
        let w_down = pb.normal("w_down", &[hidden, d], out_std)?;
        Ok(Self { kind, w_gate, w_up, w_down, d, hidden })
    }

    /// x `[B, T, d]` → `[B, T, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let x2 = x.reshape((b * t, d))?;
        let up = x2.matmul(&self.w_up)?;
        let h = match (&self.kind, &self.w_gate) {
            (FfnKind::Swiglu, Some(g)) => (x2.matmul(g)?.silu()? * up)?,
            _ => up.relu()?.sqr()?,
        };
        h.matmul(&self.w_down)?.reshape((b, t, d))
    }

    /// Forward FLOPs per token (2 per multiply-add).
    pub fn flops_per_token(&self) -> f64 {
        let mats = if self.w_gate.is_some() { 3 } else { 2 };
        2.0 * (mats * self.d * self.hidden) as f64
    }
}
