//! Scaling law with learning-rate annealing (Tissue, Wang, Qiu, Su, Chen, Zhou, Gui 2024,
//! arXiv:2408.11029): the loss at step s is
//! `L(s) = L0 + A·S1^(−α) − C·S2`, with the forward area S1 = Σ_{i≤s} η_i and the annealing area
//! S2 = Σ_{i≤s} m_i, m_i = λ·m_{i−1} + (η_{i−1} − η_i), λ = 0.999 by default.
//!
//! As in the authors' fitting script: warmup steps count as the peak learning rate in S1 and S2
//! (here: every step before the schedule first reaches its maximum uses the maximum), residuals
//! are in log space, Huber δ summed over logged steps of all curves fitted jointly, L-BFGS from a
//! small grid of starts with all parameters ≥ 0 (L0, A, C are exp-parameterised; α is free).
//!
//! Input: loss curves, rows `run, step, lr, loss` (e.g. every run's metrics.csv concatenated; the
//! lr column must be the rate used at that step). The schedule between logged steps is linearly
//! interpolated to every integer step, so sparse logging still gives S1/S2 per step.
//! [`predict`] evaluates the fitted law on another schedule (e.g. WSD from a cosine fit);
//! `holdout` runs are not fitted but predicted and scored (`extra.holdout`).

use super::super::bootstrap::bootstrap;
use super::super::error::FitError;
use super::super::huber::{huber, huber_grad};
use super::super::lbfgs::{minimize, LbfgsResult};
use super::super::points::Points;
use super::super::{jnum, FitOptions, FitResult};
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;

pub const NEEDED: &[&str] = &["step", "lr", "loss"];
const LAW: &str = "annealing";
/// Reported parameters, the paper's symbols.
pub const PARAM_NAMES: [&str; 4] = ["L0", "A", "alpha", "C"];

/// L(s) = L0 + A·S1^(−α) − C·S2.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Annealing {
    pub l0: f64,
    pub a: f64,
    pub alpha: f64,
    pub c: f64,
}

impl Annealing {
    pub fn loss(&self, s1: f64, s2: f64) -> f64 {
        self.l0 + self.a * s1.powf(-self.alpha) - self.c * s2
    }
    fn from_internal(p: &[f64]) -> Self {
        Annealing { l0: p[0].exp(), a: p[1].exp(), alpha: p[2], c: p[3].exp() }
    }
    fn to_vec(self) -> Vec<f64> {
        vec![self.l0, self.a, self.alpha, self.c]
    }
}

/// S1 and S2 at the requested `steps` of a schedule logged as (`sched_steps`, `sched_lr`)
/// (any order; linearly interpolated to every integer step 1..=max step).
pub fn areas(sched_steps: &[f64], sched_lr: &[f64], steps: &[f64], lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let mut pts: Vec<(f64, f64)> = sched_steps.iter().copied().zip(sched_lr.iter().copied()).filter(|(s, l)| s.is_finite() && l.is_finite()).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    if pts.is_empty() {
        return (vec![f64::NAN; steps.len()], vec![f64::NAN; steps.len()]);
    }
    let last = steps.iter().cloned().fold(0.0f64, f64::max).max(pts.last().unwrap().0).ceil().max(1.0) as usize;
    let mut eta = vec![0.0; last + 1];
    let mut k = 0;
    for (i, e) in eta.iter_mut().enumerate() {
        let s = i as f64;
        while k + 1 < pts.len() && pts[k + 1].0 <= s {
            k += 1;
        }
        *e = if s <= pts[0].0 {
            pts[0].1
        } else if k + 1 >= pts.len() {
            pts[k].1
        } else {
            let (s0, l0) = pts[k];
            let (s1, l1) = pts[k + 1];
            l0 + (l1 - l0) * (s - s0) / (s1 - s0)
        };
    }
    let max = eta.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if let Some(first_max) = eta.iter().position(|&e| e >= max) {
        eta[..first_max].iter_mut().for_each(|e| *e = max);
    }
    let (mut s1c, mut s2c) = (vec![0.0; last + 1], vec![0.0; last + 1]);
    let (mut s1, mut s2, mut m) = (0.0, 0.0, 0.0);
    for i in 1..=last {
        m = lambda * m + (eta[i - 1] - eta[i]);
        s1 += eta[i];
        s2 += m;
        s1c[i] = s1;
        s2c[i] = s2;
    }
    let at = |v: &[f64], s: f64| if s.is_finite() && s >= 0.0 { v[(s.round() as usize).min(last)] } else { f64::NAN };
    (steps.iter().map(|&s| at(&s1c, s)).collect(), steps.iter().map(|&s| at(&s2c, s)).collect())
}

/// Predicted losses of the law at `steps` under the schedule (`sched_steps`, `sched_lr`).
pub fn predict(law: &Annealing, sched_steps: &[f64], sched_lr: &[f64], steps: &[f64], lambda: f64) -> Vec<f64> {
    let (s1, s2) = areas(sched_steps, sched_lr, steps, lambda);
    s1.iter().zip(&s2).map(|(a, b)| law.loss(*a, *b)).collect()
}

/// Per-row S1, S2 of the points (each run's own schedule).
fn row_areas(points: &Points, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let (step, lr) = (points.col("step"), points.col("lr"));
    let mut s1 = vec![f64::NAN; points.len()];
    let mut s2 = vec![f64::NAN; points.len()];
    for g in points.run_groups() {
        let st: Vec<f64> = g.iter().map(|&i| step[i]).collect();
        let l: Vec<f64> = g.iter().map(|&i| lr[i]).collect();
        let (a, b) = areas(&st, &l, &st, lambda);
        for (k, &i) in g.iter().enumerate() {
            s1[i] = a[k];
            s2[i] = b[k];
        }
    }
    (s1, s2)
}

struct Objective {
    s1: Vec<f64>,
    s2: Vec<f64>,
    ln_y: Vec<f64>,
    delta: f64,
}

impl Objective {
    /// Σ Huber / (δ n) at internal params [ln L0, ln A, α, ln C], with gradient.
    fn eval(&self, p: &[f64], g: &mut [f64]) -> f64 {
        let law = Annealing::from_internal(p);
        g.iter_mut().for_each(|v| *v = 0.0);
        let mut f = 0.0;
        for i in 0..self.ln_y.len() {
            let t = law.a * self.s1[i].powf(-law.alpha);
            let pred = law.l0 + t - law.c * self.s2[i];
            if !(pred > 0.0) {
                return f64::NAN;
            }
            let r = pred.ln() - self.ln_y[i];
            f += huber(r, self.delta);
            let w = huber_grad(r, self.delta) / pred;
            g[0] += w * law.l0;
            g[1] += w * t;
            g[2] -= w * t * self.s1[i].ln();
            g[3] -= w * law.c * self.s2[i];
        }
        let sc = 1.0 / (self.delta * self.ln_y.len() as f64);
        g.iter_mut().for_each(|v| *v *= sc);
        f * sc
    }
    fn huber_sum(&self, p: &[f64]) -> f64 {
        let mut g = vec![0.0; 4];
        self.eval(p, &mut g) * self.delta * self.ln_y.len() as f64
    }
}

/// Data-driven starts `[ln L0, ln A, α, ln C]`.
fn starts(obj: &Objective) -> Vec<Vec<f64>> {
    let n = obj.ln_y.len();
    let min_y = obj.ln_y.iter().cloned().fold(f64::INFINITY, f64::min).exp();
    let i0 = (0..n).min_by(|&a, &b| obj.s1[a].total_cmp(&obj.s1[b])).unwrap_or(0);
    let (y0, s10) = (obj.ln_y[i0].exp(), obj.s1[i0]);
    let s2max = obj.s2.iter().cloned().fold(0.0f64, f64::max).max(1e-12);
    let mut out = Vec::new();
    for fl in [0.5, 0.8, 0.95] {
        for alpha in [0.2, 0.5, 1.0] {
            for fc in [0.01, 0.1] {
                let l0 = fl * min_y;
                let a = ((y0 - l0).max(1e-3 * y0)) * s10.powf(alpha);
                out.push(vec![l0.ln(), a.ln(), alpha, (fc * min_y / s2max).ln()]);
            }
        }
    }
    out
}

fn fit_curves(obj: &Objective, starts: &[Vec<f64>], opts: &FitOptions) -> Option<LbfgsResult> {
    let lb = opts.lbfgs();
    starts
        .par_iter()
        .map(|p0| minimize(|q, g| obj.eval(q, g), p0, &lb))
        .filter(|r| r.f.is_finite())
        .min_by(|a, b| a.f.total_cmp(&b.f))
}

fn objective_of(points: &Points, s1: &[f64], s2: &[f64], idx: &[usize], delta: f64) -> Objective {
    let y = points.col("loss");
    Objective { s1: idx.iter().map(|&i| s1[i]).collect(), s2: idx.iter().map(|&i| s2[i]).collect(), ln_y: idx.iter().map(|&i| y[i].ln()).collect(), delta }
}

/// Fits the annealing law on the curves (all runs not in `opts.holdout`).
pub fn fit(mut points: Points, opts: &FitOptions) -> Result<FitResult, FitError> {
    if !(opts.lambda > 0.0 && opts.lambda < 1.0) {
        return Err(FitError::Option(format!("lambda must be in (0, 1), got {}", opts.lambda)));
    }
    points.exclude_non_positive(&["loss"]);
    points.exclude_where("negative learning rate or step", |p, i| p.col("lr")[i] < 0.0 || p.col("step")[i] < 0.0);
    let (s1_all, s2_all) = row_areas(&points, opts.lambda);
    let holdout: Vec<usize> = (0..points.len()).filter(|&i| opts.holdout.contains(&points.runs[i])).collect();
    let train: Vec<usize> = (0..points.len()).filter(|&i| !opts.holdout.contains(&points.runs[i]) && s1_all[i] > 0.0).collect();
    let mut exclusions = points.exclusions.clone();
    let n_zero = (0..points.len()).filter(|&i| !(s1_all[i] > 0.0)).count();
    if n_zero > 0 {
        exclusions.push(format!("{n_zero} rows with forward area S1 = 0 (step 0 or zero learning rate); not fitted"));
    }
    for h in &opts.holdout {
        if !points.runs.contains(h) {
            return Err(FitError::Option(format!("holdout run `{h}` is not in the data (runs: {})", points.run_groups().iter().map(|g| points.runs[g[0]].clone()).collect::<Vec<_>>().join(", "))));
        }
    }
    if train.len() < 5 {
        return Err(FitError::TooFewPoints { law: LAW.into(), n: train.len(), need: 5, detail: " (logged steps with S1 > 0, excluding holdout runs)".into() });
    }
    let obj = objective_of(&points, &s1_all, &s2_all, &train, opts.delta);
    let st = starts(&obj);
    let best = fit_curves(&obj, &st, opts).ok_or_else(|| FitError::Degenerate { law: LAW.into(), reason: "no start reached a finite objective".into() })?;
    let law = Annealing::from_internal(&best.x);
    let params: BTreeMap<String, f64> = PARAM_NAMES.iter().map(|s| s.to_string()).zip(law.to_vec()).collect();
    let sub = points.select(&train);
    let mut ci = BTreeMap::new();
    let mut boot = serde_json::Value::Null;
    if opts.bootstrap.resamples > 0 {
        let names: Vec<String> = PARAM_NAMES.iter().map(|s| s.to_string()).collect();
        let (s1t, s2t): (Vec<f64>, Vec<f64>) = (train.iter().map(|&i| s1_all[i]).collect(), train.iter().map(|&i| s2_all[i]).collect());
        let lb = opts.lbfgs();
        let s = bootstrap(&sub.run_groups(), &names, &opts.bootstrap, |idx| {
            let o = objective_of(&sub, &s1t, &s2t, idx, opts.delta);
            let r = minimize(|q, g| o.eval(q, g), &best.x, &lb);
            r.f.is_finite().then(|| Annealing::from_internal(&r.x).to_vec())
        });
        ci = s.ci.clone();
        boot = json!({"resamples": s.resamples, "failed": s.failed, "seed": s.seed, "level": s.level, "unit": "runs (curves)",
                      "n_runs": sub.run_groups().len(), "mean": s.mean, "sd": s.sd});
    }
    // Held-out curves: predicted from their own schedules.
    let y = points.col("loss");
    let mut ho = Vec::new();
    for run in &opts.holdout {
        let rows: Vec<usize> = holdout.iter().copied().filter(|&i| &points.runs[i] == run && s1_all[i] > 0.0).collect();
        let rel: Vec<f64> = rows.iter().map(|&i| (law.loss(s1_all[i], s2_all[i]) / y[i] - 1.0).abs()).collect();
        let mean = rel.iter().sum::<f64>() / rel.len().max(1) as f64;
        let max = rel.iter().cloned().fold(0.0, f64::max);
        ho.push(json!({"run": run, "points": rows.len(), "mean_abs_rel_error": jnum(mean), "max_abs_rel_error": jnum(max)}));
    }
    let extra = json!({
        "form": "L(s) = L0 + A*S1^(-alpha) - C*S2; S1 = sum of lr, S2 = sum of m_i, m_i = lambda*m_(i-1) + (lr_(i-1) - lr_i); log-space Huber(delta) summed",
        "lambda": opts.lambda, "delta": opts.delta,
        "optimizer": {"method": "L-BFGS (m=10), strong-Wolfe line search", "stop": best.stop, "iterations": best.iterations,
                       "n_starts": st.len(), "grad_norm_definition": "inf-norm of grad of sum(Huber)/(delta*n) w.r.t. [ln L0, ln A, alpha, ln C]"},
        "fitted_runs": sub.run_groups().iter().map(|g| sub.runs[g[0]].clone()).collect::<Vec<_>>(),
        "holdout": ho,
        "bootstrap": boot,
        "notes": points.notes,
    });
    Ok(FitResult {
        law: LAW.into(),
        params,
        ci,
        objective: obj.huber_sum(&best.x),
        grad_norm: best.grad_norm,
        converged: best.converged,
        exclusions,
        n_points: train.len(),
        extra,
    })
}
