//! The training objective of one micro-batch and the per-step statistics beside the loss.
//!
//! The backpropagated loss is the main next-token cross-entropy + the MTP terms + the MoE
//! balancing losses; the *reported* `train_loss` (and `val_loss`) is the main head's
//! cross-entropy only — the trial's objective. The extra terms are reported in their own
//! metrics columns ([`StepStats::columns`]):
//!
//! - `moe_aux_loss`, `moe_z_loss`: the balancing loss terms as added to the loss (coefficients
//!   included), summed over MoE layers, mean over the step's micro-batches.
//! - `moe_load_cv`: coefficient of variation (population std / mean) of the routed-slot counts per
//!   expert over the step (selection before capacity drops), averaged over MoE layers; 0 = balanced.
//! - `moe_maxvio`: MaxVio (Wang et al. arXiv:2408.15664), (max load − mean load)/mean load per
//!   layer, averaged over MoE layers.
//! - `moe_load_min`: smallest load/mean load of any expert of any layer (0 = a dead expert).
//! - `moe_drop_rate`: fraction of routed slots dropped by the capacity limit, all layers.
//! - `mtp_head<i>_loss` / `mtp_depth<k>_loss`: each extra head's mean cross-entropy, mean over
//!   micro-batches (empty when no micro-batch had a scored position for it).

use super::moe::RouteStats;
use super::mtp::{self, Mtp};
use super::LanguageModel;
use crate::data::Batch;
use candle_core::{DType, Result, Tensor};
use std::collections::BTreeMap;

/// One micro-batch's contribution.
pub struct MicroOut {
    /// Main head's mean cross-entropy.
    pub main: f64,
    /// Extra heads' losses.
    pub extra: Vec<Option<f64>>,
    /// MoE routing statistics, per MoE layer in forward order.
    pub routes: Vec<RouteStats>,
}

/// Adds `scale ×` the gradients of the training loss of batch `b` to `grads`.
pub fn micro_grads(model: &LanguageModel, b: &Batch, scale: f64, grads: &mut BTreeMap<String, Tensor>) -> Result<MicroOut> {
    let mask = b.mask.as_ref();
    if let Some(Mtp::Gloeckle { heads }) = &model.mtp {
        if !heads.is_empty() {
            let (main, extra, aux) = mtp::gloeckle_grads(model, &b.inputs, &b.targets, mask, scale, grads)?;
            return Ok(MicroOut { main, extra, routes: aux.routes });
        }
    }
    let terms = mtp::loss_terms(model, &b.inputs, &b.targets, mask)?;
    let g = (terms.total()? * scale)?.backward()?;
    mtp::collect_grads(model, &g, grads)?;
    let value = |t: &Tensor| t.to_dtype(DType::F64)?.to_scalar::<f64>();
    let extra = terms.extra.iter().map(|e| e.as_ref().map(value).transpose()).collect::<Result<_>>()?;
    Ok(MicroOut { main: value(&terms.main)?, extra, routes: terms.aux.routes })
}

/// Statistics of one optimizer step, accumulated over its micro-batches.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    micro: usize,
    extra_sum: Vec<f64>,
    extra_n: Vec<usize>,
    /// Selection counts per MoE layer and expert, summed over micro-batches.
    pub selected: Vec<Vec<f64>>,
    dropped: usize,
    slots: usize,
    aux: f64,
    z: f64,
}

impl StepStats {
    /// Names of the extra metrics columns of `model` (none for a dense next-token model).
    pub fn columns(model: &LanguageModel) -> Vec<String> {
        let mut c = Vec::new();
        if all_moe(model).next().is_some() {
            c.extend(["moe_aux_loss", "moe_z_loss", "moe_load_cv", "moe_maxvio", "moe_load_min", "moe_drop_rate"].map(String::from));
        }
        if let Some(m) = &model.mtp {
            c.extend(m.loss_names());
        }
        c
    }

    pub fn add(&mut self, m: &MicroOut) {
        self.micro += 1;
        if self.extra_sum.len() < m.extra.len() {
            self.extra_sum.resize(m.extra.len(), 0.0);
            self.extra_n.resize(m.extra.len(), 0);
        }
        for (i, e) in m.extra.iter().enumerate() {
            if let Some(v) = e {
                self.extra_sum[i] += v;
                self.extra_n[i] += 1;
            }
        }
        if self.selected.len() < m.routes.len() {
            self.selected.resize(m.routes.len(), Vec::new());
        }
        for (acc, r) in self.selected.iter_mut().zip(&m.routes) {
            if acc.is_empty() {
                *acc = vec![0.0; r.selected.len()];
            }
            acc.iter_mut().zip(&r.selected).for_each(|(a, s)| *a += s);
            self.dropped += r.dropped;
            self.slots += r.slots;
            self.aux += r.aux_loss;
            self.z += r.z_loss;
        }
    }

    /// Values for [`Self::columns`] (same order; None = empty cell).
    pub fn values(&self, model: &LanguageModel) -> Vec<Option<f64>> {
        let mut v = Vec::new();
        if all_moe(model).next().is_some() {
            let micro = self.micro.max(1) as f64;
            let (mut cv, mut vio, mut min) = (0.0, 0.0, f64::INFINITY);
            for counts in &self.selected {
                let (c, x, m) = load_stats(counts);
                cv += c;
                vio += x;
                min = min.min(m);
            }
            let layers = self.selected.len().max(1) as f64;
            let some = !self.selected.is_empty();
            v.push(Some(self.aux / micro));
            v.push(Some(self.z / micro));
            v.push(some.then_some(cv / layers));
            v.push(some.then_some(vio / layers));
            v.push(some.then_some(min));
            v.push((self.slots > 0).then(|| self.dropped as f64 / self.slots as f64));
        }
        if let Some(m) = &model.mtp {
            for i in 0..m.extra() {
                let n = self.extra_n.get(i).copied().unwrap_or(0);
                v.push((n > 0).then(|| self.extra_sum[i] / n as f64));
            }
        }
        v
    }
}

/// (coefficient of variation, MaxVio, min/mean) of per-expert loads.
pub fn load_stats(counts: &[f64]) -> (f64, f64, f64) {
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<f64>() / n;
    if mean <= 0.0 {
        return (0.0, 0.0, 1.0);
    }
    let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n;
    let max = counts.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let min = counts.iter().cloned().fold(f64::INFINITY, f64::min);
    (var.sqrt() / mean, (max - mean) / mean, min / mean)
}

/// Every MoE layer of the model in forward order: main layers, then MTP blocks.
pub fn all_moe(model: &LanguageModel) -> impl Iterator<Item = &super::moe::Moe> {
    let mtp_layers = model.mtp.as_ref().map(|m| m.layers()).unwrap_or_default();
    model.layers.iter().chain(mtp_layers).filter_map(|l| l.ffn.as_moe())
}

/// Resets per-step state (global-batch balance counts) before a step's first micro-batch.
pub fn begin_step(model: &LanguageModel) {
    all_moe(model).for_each(|m| m.begin_step());
}

/// After the optimizer step: the auxiliary-loss-free bias updates from the step's loads.
pub fn after_step(model: &LanguageModel, stats: &StepStats) -> Result<()> {
    for (m, counts) in all_moe(model).zip(&stats.selected) {
        m.update_bias(counts)?;
    }
    Ok(())
}
