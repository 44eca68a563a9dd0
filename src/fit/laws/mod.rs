//! The laws and their shared multi-start machinery for log-space Huber (LSE) fits.

pub mod annealing;
pub mod chinchilla;
pub mod deepseek;
pub mod isoflop;
pub mod moe_sparsity;
pub mod power;
pub mod steplaw;

use super::huber::LseModel;
use super::lbfgs::{minimize, LbfgsOptions, LbfgsResult, StopReason};
use rayon::prelude::*;

/// Best of a multi-start L-BFGS run on an [`LseModel`].
#[derive(Clone, Debug)]
pub struct MultiStart {
    /// Paper parameters (intercepts on raw logs) of the best start.
    pub params: Vec<f64>,
    /// Σ Huber at the best start (the paper's objective).
    pub objective: f64,
    /// ‖∇‖_∞ of the optimiser's objective (Σ Huber/(δn), centred parameters) at the best point.
    pub grad_norm: f64,
    /// ‖∇ Σ Huber‖_∞ with respect to the paper parameters.
    pub paper_grad_norm: f64,
    pub converged: bool,
    pub stop: StopReason,
    pub iterations: usize,
    pub evaluations: usize,
    /// Index of the winning start in the start list.
    pub best_start: usize,
    pub n_starts: usize,
    /// Starts that reported convergence.
    pub n_converged: usize,
    /// Starts whose objective is within 1e-9·(1+|best|) of the best (agreement of the optimum).
    pub n_at_best: usize,
}

/// Runs L-BFGS from every start (paper parameterisation) in parallel and keeps the lowest
/// objective; ties go to the lower start index, so the result does not depend on scheduling.
pub fn multi_start(model: &LseModel, starts: &[Vec<f64>], opts: &LbfgsOptions) -> Option<MultiStart> {
    let runs: Vec<(usize, LbfgsResult)> = starts
        .par_iter()
        .enumerate()
        .map(|(i, p0)| {
            let q0 = model.to_internal(p0);
            (i, minimize(|q, g| model.scaled_objective(q, g), &q0, opts))
        })
        .collect();
    let scale = model.delta * model.n_points().max(1) as f64;
    let finite = runs.iter().filter(|(_, r)| r.f.is_finite() && r.x.iter().all(|v| v.is_finite()));
    let (best_i, best) = finite.min_by(|a, b| a.1.f.total_cmp(&b.1.f).then(a.0.cmp(&b.0)))?;
    let n_converged = runs.iter().filter(|(_, r)| r.converged).count();
    let n_at_best = runs.iter().filter(|(_, r)| r.f.is_finite() && (r.f - best.f).abs() * scale <= 1e-9 * (1.0 + best.f * scale)).count();
    let params = model.to_paper(&best.x);
    Some(MultiStart {
        paper_grad_norm: model.paper_grad_norm(&params),
        objective: model.huber_sum(&best.x, None),
        params,
        grad_norm: best.grad_norm,
        converged: best.converged,
        stop: best.stop,
        iterations: best.iterations,
        evaluations: best.evaluations,
        best_start: *best_i,
        n_starts: starts.len(),
        n_converged,
        n_at_best,
    })
}

/// Cartesian product of value lists, in order (last list varies fastest).
pub fn cartesian(lists: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mut out = vec![vec![]];
    for l in lists {
        out = out.into_iter().flat_map(|p| l.iter().map(move |v| {
            let mut q = p.clone();
            q.push(*v);
            q
        })).collect();
    }
    out
}

/// `lo, lo+step, …` up to `hi` inclusive.
pub fn range(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let n = ((hi - lo) / step + 1e-9).floor() as usize;
    (0..=n).map(|i| lo + step * i as f64).collect()
}

impl MultiStart {
    /// The [`super::FitResult`] of a Huber law fitted by multi-start L-BFGS on `points`.
    pub fn into_result(
        &self,
        law: &str,
        params: std::collections::BTreeMap<String, f64>,
        ci: std::collections::BTreeMap<String, [f64; 2]>,
        points: &super::Points,
        extra: serde_json::Value,
    ) -> super::FitResult {
        super::FitResult {
            law: law.into(),
            params,
            ci,
            objective: self.objective,
            grad_norm: self.grad_norm,
            converged: self.converged,
            exclusions: points.exclusions.clone(),
            n_points: points.len(),
            extra,
        }
    }
}

/// By-run bootstrap of an LSE law: each resample of `points` is refitted with one L-BFGS run
/// from `start` (paper parameters; the full-data estimate) and summarised through `stats`.
/// Returns the summary and the number of refits that did not report convergence (kept, as
/// Besiroglu et al. 2024 do).
pub fn bootstrap_refit(
    points: &super::Points,
    start: &[f64],
    names: &[String],
    opts: &super::FitOptions,
    model: impl Fn(&super::Points) -> LseModel + Sync,
    stats: impl Fn(&[f64]) -> Vec<f64> + Sync,
) -> (super::bootstrap::BootstrapSummary, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let not_conv = AtomicUsize::new(0);
    let lb = opts.lbfgs();
    let s = super::bootstrap::bootstrap(&points.run_groups(), names, &opts.bootstrap, |idx| {
        let m = model(&points.select(idx));
        let r = minimize(|q, g| m.scaled_objective(q, g), &m.to_internal(start), &lb);
        if !r.f.is_finite() {
            return None;
        }
        if !r.converged {
            not_conv.fetch_add(1, Ordering::Relaxed);
        }
        Some(stats(&m.to_paper(&r.x)))
    });
    (s, not_conv.into_inner())
}
