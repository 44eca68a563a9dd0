//! DeepSeek LLM hyper-parameter scaling in compute (DeepSeek-AI 2024, arXiv:2401.02954, §3.1):
//! η_opt(C) = η_c·C^η_exp and B_opt(C) = B_c·C^B_exp (B in tokens, C in FLOPs); published
//! 0.3118·C^−0.1250 and 0.2920·C^0.3271.
//!
//! Procedure: runs are grouped into compute budgets ([`crate::fit::groups::by_budget`]); in each
//! budget every run whose loss is within the near-optimal band |loss/min − 1| < `band` (0.25%,
//! as DeepSeek and Step Law) is kept; ln lr and ln batch_tokens are regressed on ln C by OLS
//! over all kept runs (the paper fits through the near-optimal region rather than the argmin).
//! Each budget also gets an interpolated optimum (the quadratic surface in (ln lr, ln B) of
//! [`super::steplaw`]), and a second OLS through those optima is in `extra.optimum_fit`.
//! CIs: bootstrap resampling the kept runs (by `run` id).

use super::super::bootstrap::bootstrap;
use super::super::error::FitError;
use super::super::groups::{by_budget, distinct};
use super::super::ols::ols;
use super::super::points::Points;
use super::super::{jnum, FitOptions, FitResult};
use super::isoflop::sample_rows;
use super::steplaw::interpolate;
use serde_json::json;
use std::collections::BTreeMap;

/// Columns the law needs (`C` may be derived as 6ND).
pub const NEEDED: &[&str] = &["C", "lr", "batch_tokens", "loss"];
const LAW: &str = "deepseek";
/// Reported parameters: η_opt = eta_c·C^eta_exp, B_opt = B_c·C^B_exp.
pub const PARAM_NAMES: [&str; 4] = ["eta_c", "eta_exp", "B_c", "B_exp"];

/// The two power laws in compute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeepSeek {
    pub eta_c: f64,
    pub eta_exp: f64,
    pub b_c: f64,
    pub b_exp: f64,
}

impl DeepSeek {
    /// The published law (arXiv:2401.02954, eq. 1).
    pub fn published() -> Self {
        DeepSeek { eta_c: 0.3118, eta_exp: -0.1250, b_c: 0.2920, b_exp: 0.3271 }
    }
    pub fn lr(&self, c: f64) -> f64 {
        self.eta_c * c.powf(self.eta_exp)
    }
    pub fn batch_tokens(&self, c: f64) -> f64 {
        self.b_c * c.powf(self.b_exp)
    }
    fn to_vec(self) -> Vec<f64> {
        vec![self.eta_c, self.eta_exp, self.b_c, self.b_exp]
    }
}

/// One budget's optimum.
#[derive(Clone, Debug)]
pub struct BudgetCell {
    pub c: f64,
    pub rows: Vec<usize>,
    pub best: usize,
    pub band: Vec<usize>,
    pub interp_lr: f64,
    pub interp_bs: f64,
    pub interp_loss: f64,
    pub interp_method: &'static str,
}

/// Budget cells of these points.
pub fn cells(points: &Points, tol: f64, band: f64) -> Vec<BudgetCell> {
    let (c, lr, bs, loss) = (points.col("C"), points.col("lr"), points.col("batch_tokens"), points.col("loss"));
    by_budget(c, tol)
        .into_iter()
        .map(|b| {
            let best = *b.rows.iter().min_by(|&&x, &&y| loss[x].total_cmp(&loss[y])).unwrap();
            let min = loss[best];
            let band_rows: Vec<usize> = b.rows.iter().copied().filter(|&i| (loss[i] / min - 1.0).abs() < band).collect();
            let (il, ib, iloss, m) = interpolate(&b.rows, lr, bs, loss).unwrap_or((lr[best], bs[best], min, "grid argmin"));
            BudgetCell { c: b.c, rows: b.rows, best, band: band_rows, interp_lr: il, interp_bs: ib, interp_loss: iloss, interp_method: m }
        })
        .collect()
}

/// OLS of ln lr and ln B on ln C; `None` if C does not vary. Returns the law and the RSS.
pub fn regress(c: &[f64], lr: &[f64], bs: &[f64]) -> Option<(DeepSeek, f64)> {
    let ln = |v: &[f64]| v.iter().map(|x| x.ln()).collect::<Vec<f64>>();
    let (lc, ll, lb) = (ln(c), ln(lr), ln(bs));
    let a = ols(&[&lc], &ll)?;
    let b = ols(&[&lc], &lb)?;
    let rss = (0..lc.len()).map(|i| (ll[i] - a[0] - a[1] * lc[i]).powi(2) + (lb[i] - b[0] - b[1] * lc[i]).powi(2)).sum();
    Some((DeepSeek { eta_c: a[0].exp(), eta_exp: a[1], b_c: b[0].exp(), b_exp: b[1] }, rss))
}

fn stat_names(budgets: &[f64]) -> Vec<String> {
    let mut v: Vec<String> = PARAM_NAMES.iter().map(|s| s.to_string()).collect();
    for c in budgets {
        v.push(format!("lr_opt@{c:e}"));
        v.push(format!("batch_tokens_opt@{c:e}"));
    }
    v
}

fn stats(l: &DeepSeek, budgets: &[f64]) -> Vec<f64> {
    let mut v = l.to_vec();
    for &c in budgets {
        v.extend([l.lr(c), l.batch_tokens(c)]);
    }
    v
}

/// Fits the DeepSeek laws.
pub fn fit(mut points: Points, opts: &FitOptions) -> Result<FitResult, FitError> {
    points.exclude_non_positive(&["C", "lr", "batch_tokens", "loss"]);
    let cells = cells(&points, opts.budget_tol, opts.band);
    let band: Vec<usize> = cells.iter().flat_map(|c| c.band.iter().copied()).collect();
    let kept = points.select(&band);
    if cells.len() < 2 || distinct(kept.col("C"), &(0..kept.len()).collect::<Vec<_>>()) < 2 {
        return Err(FitError::TooFewPoints {
            law: LAW.into(),
            n: kept.len(),
            need: 2,
            detail: format!(" (near-optimal runs; they come from {} compute budget(s), need >= 2 budgets)", cells.len()),
        });
    }
    let (law, rss) = regress(kept.col("C"), kept.col("lr"), kept.col("batch_tokens"))
        .ok_or_else(|| FitError::Degenerate { law: LAW.into(), reason: "compute does not vary among the near-optimal runs".into() })?;
    let names = stat_names(&opts.budgets);
    let params: BTreeMap<String, f64> = PARAM_NAMES.iter().map(|s| s.to_string()).zip(law.to_vec()).collect();
    let mut ci = BTreeMap::new();
    let mut boot = serde_json::Value::Null;
    if opts.bootstrap.resamples > 0 {
        let s = bootstrap(&kept.run_groups(), &names, &opts.bootstrap, |idx| {
            let sub = kept.select(idx);
            let (l, _) = regress(sub.col("C"), sub.col("lr"), sub.col("batch_tokens"))?;
            Some(stats(&l, &opts.budgets))
        });
        ci = s.ci.clone();
        boot = json!({"resamples": s.resamples, "failed": s.failed, "seed": s.seed, "level": s.level, "unit": "near-optimal runs",
                      "mean": s.mean, "sd": s.sd, "samples": sample_rows(&s.samples, 4)});
    }
    let f = |g: fn(&BudgetCell) -> f64| cells.iter().map(g).collect::<Vec<f64>>();
    let opt_fit = match regress(&f(|c| c.c), &f(|c| c.interp_lr), &f(|c| c.interp_bs)) {
        Some((l, _)) => json!({"eta_c": l.eta_c, "eta_exp": l.eta_exp, "B_c": l.b_c, "B_exp": l.b_exp}),
        None => serde_json::Value::Null,
    };
    let (lr, bs, loss) = (points.col("lr"), points.col("batch_tokens"), points.col("loss"));
    let cells_json: Vec<_> = cells
        .iter()
        .map(|c| json!({"C": c.c, "runs": c.rows.len(), "band_runs": c.band.len(), "best_loss": loss[c.best],
            "best_lr": lr[c.best], "best_batch_tokens": bs[c.best], "interp_lr": jnum(c.interp_lr),
            "interp_batch_tokens": jnum(c.interp_bs), "interp_loss": jnum(c.interp_loss), "interp_method": c.interp_method}))
        .collect();
    let predictions: Vec<_> = opts.budgets.iter().map(|&c| json!({"C": c, "lr": jnum(law.lr(c)), "batch_tokens": jnum(law.batch_tokens(c))})).collect();
    let extra = json!({
        "form": "lr = eta_c * C^eta_exp; batch_tokens = B_c * C^B_exp (OLS in log space on near-optimal runs per compute budget)",
        "band": opts.band, "budget_tol": opts.budget_tol, "rss": rss,
        "cells": cells_json, "optimum_fit": opt_fit, "predictions": predictions,
        "bootstrap": boot, "notes": points.notes,
    });
    Ok(FitResult { law: LAW.into(), params, ci, objective: rss, grad_norm: 0.0, converged: true, exclusions: points.exclusions.clone(), n_points: kept.len(), extra })
}
