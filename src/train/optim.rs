//! AdamW (Loshchilov & Hutter 2019, decoupled weight decay) in PyTorch's exact update form:
//! `θ ← θ(1 − lr·wd)` (decayed params only), `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
//! `θ ← θ − (lr / (1−β1^t)) · m / (sqrt(v)/sqrt(1−β2^t) + ε)`.
//! State (m, v, t) is saved with checkpoints so a resumed run continues bit-exactly.
//!
//! CPU f32/f64 parameters are updated in place by the fused kernels of [`fused`] (three
//! streaming passes, gradient clipping folded in); other devices and dtypes use the composed
//! form [`AdamW::step_composed`], the reference the fused form is tested against bit for bit.

pub mod fused;

use crate::config::train::AdamWSpec;
use crate::model::params::ParamStore;
use candle_core::{Result, Tensor};
use std::collections::{BTreeMap, HashMap};

pub struct AdamW {
    pub spec: AdamWSpec,
    /// Steps taken (t in the bias corrections).
    pub t: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(spec: &AdamWSpec, params: &ParamStore) -> Result<Self> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (k, p) in &params.params {
            m.insert(k.clone(), p.var.as_tensor().zeros_like()?);
            v.insert(k.clone(), p.var.as_tensor().zeros_like()?);
        }
        Ok(Self { spec: spec.clone(), t: 0, m, v })
    }

    /// One update with gradients `grads` (by parameter name) at learning rate `lr`.
    pub fn step(&mut self, params: &ParamStore, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step_clipped(params, grads, lr, None)
    }

    /// [`Self::step`] with every gradient first scaled by `clip` (the global-norm clipping
    /// coefficient of [`clip_coef`]), as `g * clip` would.
    pub fn step_clipped(&mut self, params: &ParamStore, grads: &BTreeMap<String, Tensor>, lr: f64, clip: Option<f64>) -> Result<()> {
        self.t += 1;
        let s = self.spec.clone();
        let bc1 = 1.0 - s.beta1.powi(self.t as i32);
        let bc2 = 1.0 - s.beta2.powi(self.t as i32);
        let step_size = lr / bc1;
        for (k, p) in &params.params {
            let Some(g) = grads.get(k) else { continue };
            let theta = p.var.as_tensor();
            if !fused::fusable(theta, g) {
                let g = match clip {
                    Some(c) => (g * c)?,
                    None => g.clone(),
                };
                self.update_composed(k, p, &g, lr, step_size, bc2)?;
                continue;
            }
            let g = g.contiguous()?;
            let (m, v) = (&self.m[k], &self.v[k]);
            m.inplace_op2(&g, &fused::Moment { beta: s.beta1, squared: false, coef: clip })?;
            v.inplace_op2(&g, &fused::Moment { beta: s.beta2, squared: true, coef: clip })?;
            let decay = (p.decay && s.weight_decay > 0.0).then_some(1.0 - lr * s.weight_decay);
            theta.inplace_op3(m, v, &fused::Theta { decay, inv_sqrt_bc2: 1.0 / bc2.sqrt(), eps: s.eps, step_size })?;
        }
        Ok(())
    }

    /// The composed form of [`Self::step`] (candle tensor ops, any device and dtype).
    pub fn step_composed(&mut self, params: &ParamStore, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        let s = self.spec.clone();
        let bc1 = 1.0 - s.beta1.powi(self.t as i32);
        let bc2 = 1.0 - s.beta2.powi(self.t as i32);
        let step_size = lr / bc1;
        for (k, p) in &params.params {
            let Some(g) = grads.get(k) else { continue };
            self.update_composed(k, p, g, lr, step_size, bc2)?;
        }
        Ok(())
    }

    fn update_composed(&mut self, k: &str, p: &crate::model::params::Param, g: &Tensor, lr: f64, step_size: f64, bc2: f64) -> Result<()> {
        let s = &self.spec;
        // Everything here is detached from the autograd graph: a state tensor that kept
        // its op history would chain every step's gradients together (a memory leak).
        let g = g.detach();
        let m = (self.m[k].affine(s.beta1, 0.0)? + g.affine(1.0 - s.beta1, 0.0)?)?.detach();
        let v = (self.v[k].affine(s.beta2, 0.0)? + g.sqr()?.affine(1.0 - s.beta2, 0.0)?)?.detach();
        let mut theta = p.var.as_tensor().detach();
        if p.decay && s.weight_decay > 0.0 {
            theta = theta.affine(1.0 - lr * s.weight_decay, 0.0)?;
        }
        let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), s.eps)?;
        let upd = (m.div(&denom)?).affine(step_size, 0.0)?;
        p.var.set(&(theta - upd)?)?;
        self.m.insert(k.to_string(), m);
        self.v.insert(k.to_string(), v);
        Ok(())
    }

    /// True when no state tensor holds autograd history (see `step`).
    pub fn state_is_detached(&self) -> bool {
        self.m.values().chain(self.v.values()).all(|t| !t.track_op())
    }

    /// Optimizer state as named tensors (`m.<param>`, `v.<param>`).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.clone());
        }
        out
    }

    /// Restores state saved by [`Self::state_tensors`].
    pub fn load_state(&mut self, t: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (prefix, map) in [("m", &mut self.m), ("v", &mut self.v)] {
            for (k, slot) in map.iter_mut() {
                let name = format!("{prefix}.{k}");
                let saved = tensors.get(&name).ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks `{name}`")))?;
                if saved.dims() != slot.dims() {
                    candle_core::bail!("optimizer state `{name}` has shape {:?}, expected {:?}", saved.dims(), slot.dims());
                }
                *slot = saved.to_dtype(slot.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// The global-norm clipping coefficient of PyTorch's `clip_grad_norm_`: `max/(norm + 1e-6)`
/// when that is below 1 (and `max > 0`), else None (no clipping).
pub fn clip_coef(norm: f64, max: f64) -> Option<f64> {
    let coef = max / (norm + 1e-6);
    (max > 0.0 && coef < 1.0).then_some(coef)
}

#[cfg(test)]
mod fused_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::ParamBuilder;
    use candle_core::{DType, Device};

    /// Two steps on hand-checkable numbers, against the formula evaluated in f64.
    #[test]
    fn matches_pytorch_formula() {
        let mut store = ParamStore::default();
        let mut pb = ParamBuilder::new(&mut store, 0, DType::F64, &Device::Cpu);
        pb.values("w", &[2, 1], vec![1.0, -2.0], true).unwrap();
        pb.values("g", &[2], vec![0.5, 0.5], false).unwrap();
        let spec = AdamWSpec { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.5 };
        let mut opt = AdamW::new(&spec, &store).unwrap();
        let grads: BTreeMap<String, Tensor> = [
            ("w".to_string(), Tensor::new(&[[0.3], [-0.1]], &Device::Cpu).unwrap()),
            ("g".to_string(), Tensor::new(&[0.2, 0.0], &Device::Cpu).unwrap()),
        ]
        .into_iter()
        .collect();
        opt.step(&store, &grads, 0.1).unwrap();
        opt.step(&store, &grads, 0.05).unwrap();
        // Reference in plain f64.
        let reference = |theta0: f64, g: f64, decay: bool| {
            let (mut th, mut m, mut v) = (theta0, 0.0, 0.0);
            for (t, lr) in [(1, 0.1), (2, 0.05)] {
                if decay {
                    th *= 1.0 - lr * 0.5;
                }
                m = 0.9 * m + 0.1 * g;
                v = 0.99 * v + 0.01 * g * g;
                let bc1 = 1.0 - 0.9f64.powi(t);
                let bc2 = 1.0 - 0.99f64.powi(t);
                th -= lr / bc1 * m / (v.sqrt() / bc2.sqrt() + 1e-8);
            }
            th
        };
        let w: Vec<f64> = store.params["w"].var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f64> = store.params["g"].var.as_tensor().to_vec1().unwrap();
        assert!((w[0] - reference(1.0, 0.3, true)).abs() < 1e-12);
        assert!((w[1] - reference(-2.0, -0.1, true)).abs() < 1e-12);
        assert!((g[0] - reference(0.5, 0.2, false)).abs() < 1e-12);
        assert!((g[1] - 0.5).abs() < 1e-12, "zero gradient, no decay: unchanged");
    }
}
