//! Step Law hyper-parameter scaling (Li et al. 2025, "Predictable Scale: Part I — Optimal
//! Hyperparameter Scaling Law in Large Language Model Pretraining", arXiv:2503.04715; repo
//! step-law/steplaw, `code/fit_tool.py`):
//! η_opt(N, D) = c·N^α·D^β and B_opt(D) = d·D^γ (B in tokens, N non-embedding parameters,
//! D tokens); published 1.79·N^−0.713·D^0.307 and 0.58·D^0.571.
//!
//! Procedure (as in `fit_tool.py`): rows are grouped into (N, D) cells; in each cell keep every
//! run whose loss is within the near-optimal band |loss/min − 1| < 0.25% (the DeepSeek LLM
//! criterion, arXiv:2401.02954); regress log lr on [log N, log D] and log batch_tokens on
//! [log D] by OLS over all kept runs; bootstrap by resampling kept runs (rows are their own runs
//! unless a `run` column groups them). The paper's final law is the **mean of the bootstrap
//! coefficients**, reported in `extra.bootstrap.mean_law`; `params` hold the plain OLS estimate.
//!
//! In addition each cell gets an interpolated optimum: a quadratic surface in (log lr, log B)
//! fitted to the cell's runs within 1% of its best loss (or its 15 best), whose vertex is used if
//! the surface is convex there and the vertex lies inside the sampled range — else the grid
//! argmin. A second OLS through these per-cell optima is in `extra.optimum_fit`.

use super::super::bootstrap::bootstrap;
use super::super::csv::Table;
use super::super::error::FitError;
use super::super::ols::ols;
use super::super::points::Points;
use super::super::{jnum, FitOptions, FitResult};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

const LAW: &str = "steplaw";

/// Names of the five regression coefficients (the columns of the released bootstrap file).
pub const COEF_NAMES: [&str; 5] = ["lr_intercept", "lr_coefN", "lr_coefD", "bs_intercept", "bs_coefD"];

/// Step Law coefficients on natural logs: ln η = i_η + α ln N + β ln D; ln B = i_B + γ ln D.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLaw {
    pub lr_intercept: f64,
    pub lr_coef_n: f64,
    pub lr_coef_d: f64,
    pub bs_intercept: f64,
    pub bs_coef_d: f64,
}

impl StepLaw {
    /// The published law, 1.79·N^−0.713·D^0.307 and 0.58·D^0.571.
    pub fn published() -> Self {
        StepLaw { lr_intercept: 1.79f64.ln(), lr_coef_n: -0.713, lr_coef_d: 0.307, bs_intercept: 0.58f64.ln(), bs_coef_d: 0.571 }
    }
    pub fn from_slice(c: &[f64]) -> Self {
        StepLaw { lr_intercept: c[0], lr_coef_n: c[1], lr_coef_d: c[2], bs_intercept: c[3], bs_coef_d: c[4] }
    }
    pub fn to_vec(&self) -> Vec<f64> {
        vec![self.lr_intercept, self.lr_coef_n, self.lr_coef_d, self.bs_intercept, self.bs_coef_d]
    }
    /// Optimal peak learning rate at N non-embedding parameters and D tokens.
    pub fn lr(&self, n: f64, d: f64) -> f64 {
        (self.lr_intercept + self.lr_coef_n * n.ln() + self.lr_coef_d * d.ln()).exp()
    }
    /// Optimal batch size in tokens at D tokens.
    pub fn batch_tokens(&self, d: f64) -> f64 {
        (self.bs_intercept + self.bs_coef_d * d.ln()).exp()
    }
    /// Column means of a bootstrap-coefficient table with the [`COEF_NAMES`] columns (e.g. the
    /// released `1004_fitted_lr_bs_scaling_model_parameters.csv`), with the row count.
    pub fn mean_of_file(path: &Path) -> Result<(StepLaw, usize), FitError> {
        let t = Table::read(path)?;
        let mut means = Vec::new();
        for name in COEF_NAMES {
            let v = t.numeric_column(name)?.ok_or_else(|| FitError::MissingColumn {
                path: path.to_path_buf(),
                column: name.into(),
                law: LAW.into(),
                present: t.header_list(),
            })?;
            let fin: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
            if fin.is_empty() {
                return Err(FitError::Degenerate { law: LAW.into(), reason: format!("{}: column `{name}` has no finite value", path.display()) });
            }
            means.push(fin.iter().sum::<f64>() / fin.len() as f64);
        }
        Ok((StepLaw::from_slice(&means), t.records.len()))
    }
}

/// Reads a Step Law run table: needs `N`, `D`, `lr`, `batch_tokens`, `loss` (map headers with
/// [`super::super::ColumnMap::steplaw`] for the released files). Non-finite losses are kept here
/// (NaN) so [`fit`] can tell a cell with no finite loss from a partly failed one.
pub fn read(input: &Path, opts: &FitOptions) -> Result<Points, FitError> {
    let pts = Points::read(input, &["N", "D", "lr", "batch_tokens"], &["loss", "run"], &opts.columns, LAW)?;
    if !pts.columns.contains_key("loss") {
        let t = Table::read(input)?;
        let header = opts.columns.alias.get("loss").cloned().unwrap_or_else(|| "loss".into());
        return Err(FitError::MissingColumn { path: input.to_path_buf(), column: header, law: LAW.into(), present: t.header_list() });
    }
    Ok(pts)
}

/// One (N, D) cell's optimum.
#[derive(Clone, Debug)]
pub struct Cell {
    pub n: f64,
    pub d: f64,
    pub runs: usize,
    pub best_loss: f64,
    pub best_lr: f64,
    pub best_bs: f64,
    /// Row indices (into the points) inside the near-optimal band.
    pub band: Vec<usize>,
    pub interp_lr: f64,
    pub interp_bs: f64,
    pub interp_loss: f64,
    pub interp_method: &'static str,
}

/// Groups rows into (N, D) cells (sorted by N then D); errors on a cell without a finite loss.
pub fn cells(points: &Points, band: f64) -> Result<Vec<Cell>, FitError> {
    let (n, d, lr, bs, loss) = (points.col("N"), points.col("D"), points.col("lr"), points.col("batch_tokens"), points.col("loss"));
    let mut groups: BTreeMap<(u64, u64), Vec<usize>> = BTreeMap::new();
    for i in 0..points.len() {
        groups.entry((n[i].to_bits(), d[i].to_bits())).or_default().push(i);
    }
    let mut order: Vec<_> = groups.into_iter().collect();
    order.sort_by(|a, b| f64::from_bits(a.0 .0).total_cmp(&f64::from_bits(b.0 .0)).then(f64::from_bits(a.0 .1).total_cmp(&f64::from_bits(b.0 .1))));
    let mut out = Vec::new();
    for ((nb, db), rows) in order {
        let (cn, cd) = (f64::from_bits(nb), f64::from_bits(db));
        let fin: Vec<usize> = rows.iter().copied().filter(|&i| loss[i].is_finite() && loss[i] > 0.0).collect();
        let Some(&best) = fin.iter().min_by(|&&a, &&b| loss[a].total_cmp(&loss[b])) else {
            return Err(FitError::Degenerate { law: LAW.into(), reason: format!("cell N={cn:e}, D={cd:e} ({} runs) has no finite positive loss", rows.len()) });
        };
        let min = loss[best];
        let band_rows: Vec<usize> = fin.iter().copied().filter(|&i| (loss[i] / min - 1.0).abs() < band).collect();
        let (ilr, ibs, iloss, method) = interpolate(&fin, lr, bs, loss).unwrap_or((lr[best], bs[best], min, "grid argmin"));
        out.push(Cell { n: cn, d: cd, runs: rows.len(), best_loss: min, best_lr: lr[best], best_bs: bs[best], band: band_rows, interp_lr: ilr, interp_bs: ibs, interp_loss: iloss, interp_method: method });
    }
    Ok(out)
}

fn distinct(v: impl Iterator<Item = f64>) -> usize {
    let mut s: Vec<f64> = v.collect();
    s.sort_by(f64::total_cmp);
    s.dedup();
    s.len()
}

/// Quadratic-surface optimum in (ln lr, ln bs) over the cell's near-best runs.
pub(crate) fn interpolate(rows: &[usize], lr: &[f64], bs: &[f64], loss: &[f64]) -> Option<(f64, f64, f64, &'static str)> {
    let min = rows.iter().map(|&i| loss[i]).fold(f64::INFINITY, f64::min);
    let mut sel: Vec<usize> = rows.iter().copied().filter(|&i| loss[i] <= min * 1.01).collect();
    let enough = |s: &[usize]| s.len() >= 10 && distinct(s.iter().map(|&i| lr[i])) >= 3 && distinct(s.iter().map(|&i| bs[i])) >= 3;
    if !enough(&sel) {
        sel = rows.to_vec();
        sel.sort_by(|&a, &b| loss[a].total_cmp(&loss[b]));
        sel.truncate(15);
        if !enough(&sel) {
            return None;
        }
    }
    let u0 = sel.iter().map(|&i| lr[i].ln()).sum::<f64>() / sel.len() as f64;
    let v0 = sel.iter().map(|&i| bs[i].ln()).sum::<f64>() / sel.len() as f64;
    let u: Vec<f64> = sel.iter().map(|&i| lr[i].ln() - u0).collect();
    let v: Vec<f64> = sel.iter().map(|&i| bs[i].ln() - v0).collect();
    let uu: Vec<f64> = u.iter().map(|x| x * x).collect();
    let uv: Vec<f64> = u.iter().zip(&v).map(|(x, y)| x * y).collect();
    let vv: Vec<f64> = v.iter().map(|x| x * x).collect();
    let y: Vec<f64> = sel.iter().map(|&i| loss[i]).collect();
    let c = ols(&[&u, &v, &uu, &uv, &vv], &y)?;
    let (h11, h12, h22) = (2.0 * c[3], c[4], 2.0 * c[5]);
    let det = h11 * h22 - h12 * h12;
    if !(h11 > 0.0 && det > 0.0) {
        return None;
    }
    let us = (-c[1] * h22 + c[2] * h12) / det;
    let vs = (-c[2] * h11 + c[1] * h12) / det;
    let inside = |x: f64, s: &[f64]| x >= s.iter().cloned().fold(f64::INFINITY, f64::min) && x <= s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !(inside(us, &u) && inside(vs, &v)) {
        return None;
    }
    let l = c[0] + c[1] * us + c[2] * vs + c[3] * us * us + c[4] * us * vs + c[5] * vs * vs;
    Some(((us + u0).exp(), (vs + v0).exp(), l, "quadratic vertex"))
}

/// OLS of the two laws on rows `idx`; `None` if rank-deficient. Returns the 5 coefficients and
/// the two residual sums of squares.
pub fn regress(n: &[f64], d: &[f64], lr: &[f64], bs: &[f64]) -> Option<(StepLaw, f64, f64)> {
    let ln = |v: &[f64]| v.iter().map(|x| x.ln()).collect::<Vec<f64>>();
    let (ln_n, ln_d, ln_lr, ln_bs) = (ln(n), ln(d), ln(lr), ln(bs));
    let a = ols(&[&ln_n, &ln_d], &ln_lr)?;
    let b = ols(&[&ln_d], &ln_bs)?;
    let rss_lr: f64 = (0..n.len()).map(|i| (ln_lr[i] - a[0] - a[1] * ln_n[i] - a[2] * ln_d[i]).powi(2)).sum();
    let rss_bs: f64 = (0..n.len()).map(|i| (ln_bs[i] - b[0] - b[1] * ln_d[i]).powi(2)).sum();
    Some((StepLaw::from_slice(&[a[0], a[1], a[2], b[0], b[1]]), rss_lr, rss_bs))
}

fn reported(l: &StepLaw) -> Vec<f64> {
    vec![l.lr_intercept.exp(), l.lr_coef_n, l.lr_coef_d, l.bs_intercept.exp(), l.bs_coef_d]
}
const PARAM_NAMES: [&str; 5] = ["lr_c", "lr_alpha", "lr_beta", "bs_c", "bs_gamma"];

/// Fits the Step Law laws to the points of [`read`].
pub fn fit(mut points: Points, opts: &FitOptions) -> Result<FitResult, FitError> {
    points.exclude_non_positive(&["N", "D", "lr", "batch_tokens"]);
    if points.is_empty() {
        return Err(FitError::TooFewPoints { law: LAW.into(), n: 0, need: 4, detail: String::new() });
    }
    let cells = cells(&points, opts.band)?;
    // Record runs without a finite loss (cells that have some finite loss).
    let loss = points.col("loss").to_vec();
    points.exclude_where("non-finite or non-positive loss", |_, i| !(loss[i].is_finite() && loss[i] > 0.0));
    let cells = if points.len() == loss.len() { cells } else { self::cells(&points, opts.band)? };
    let band: Vec<usize> = cells.iter().flat_map(|c| c.band.iter().copied()).collect();
    let kept = points.select(&band);
    let (n, d, lr, bs) = (kept.col("N"), kept.col("D"), kept.col("lr"), kept.col("batch_tokens"));
    if kept.len() < 4 || cells.len() < 3 {
        return Err(FitError::TooFewPoints { law: LAW.into(), n: kept.len(), need: 4, detail: format!(" (near-optimal runs, from {} (N, D) cells; need >= 3 cells)", cells.len()) });
    }
    let (law, rss_lr, rss_bs) = regress(n, d, lr, bs).ok_or_else(|| FitError::Degenerate {
        law: LAW.into(),
        reason: "log N and log D of the near-optimal runs are collinear (need cells varying N and D independently)".into(),
    })?;
    let params: BTreeMap<String, f64> = PARAM_NAMES.iter().map(|s| s.to_string()).zip(reported(&law)).collect();

    let mut ci = BTreeMap::new();
    let mut boot_json = serde_json::Value::Null;
    if opts.bootstrap.resamples > 0 {
        let names: Vec<String> = PARAM_NAMES.iter().chain(COEF_NAMES.iter()).map(|s| s.to_string()).collect();
        let s = bootstrap(&kept.run_groups(), &names, &opts.bootstrap, |idx| {
            let sub = kept.select(idx);
            let (l, _, _) = regress(sub.col("N"), sub.col("D"), sub.col("lr"), sub.col("batch_tokens"))?;
            let mut v = reported(&l);
            v.extend(l.to_vec());
            Some(v)
        });
        ci = PARAM_NAMES.iter().filter_map(|k| s.ci.get(*k).map(|c| (k.to_string(), *c))).collect();
        let mean_law = StepLaw::from_slice(&COEF_NAMES.iter().map(|k| s.mean[*k]).collect::<Vec<_>>());
        boot_json = json!({
            "resamples": s.resamples, "failed": s.failed, "seed": s.seed, "level": s.level, "unit": "near-optimal runs",
            "mean": s.mean, "sd": s.sd, "ci": s.ci, "samples": super::isoflop::sample_rows(&s.samples, 5),
            "mean_law": {"lr_c": mean_law.lr_intercept.exp(), "lr_alpha": mean_law.lr_coef_n, "lr_beta": mean_law.lr_coef_d,
                          "bs_c": mean_law.bs_intercept.exp(), "bs_gamma": mean_law.bs_coef_d},
        });
    }
    let opt_fit = {
        let f = |g: fn(&Cell) -> f64| cells.iter().map(g).collect::<Vec<f64>>();
        match regress(&f(|c| c.n), &f(|c| c.d), &f(|c| c.interp_lr), &f(|c| c.interp_bs)) {
            Some((l, _, _)) => json!({"lr_c": l.lr_intercept.exp(), "lr_alpha": l.lr_coef_n, "lr_beta": l.lr_coef_d, "bs_c": l.bs_intercept.exp(), "bs_gamma": l.bs_coef_d}),
            None => serde_json::Value::Null,
        }
    };
    let cells_json: Vec<_> = cells.iter().map(|c| json!({
        "N": c.n, "D": c.d, "runs": c.runs, "band_runs": c.band.len(), "best_loss": c.best_loss,
        "best_lr": c.best_lr, "best_batch_tokens": c.best_bs,
        "interp_lr": jnum(c.interp_lr), "interp_batch_tokens": jnum(c.interp_bs), "interp_loss": jnum(c.interp_loss), "interp_method": c.interp_method,
    })).collect();
    let extra = json!({
        "form": "lr = lr_c * N^lr_alpha * D^lr_beta; batch_tokens = bs_c * D^bs_gamma (OLS in log space on near-optimal runs)",
        "band": opts.band,
        "coefficients": {"lr_intercept": law.lr_intercept, "lr_coefN": law.lr_coef_n, "lr_coefD": law.lr_coef_d, "bs_intercept": law.bs_intercept, "bs_coefD": law.bs_coef_d},
        "rss": {"log_lr": rss_lr, "log_batch_tokens": rss_bs},
        "cells": cells_json,
        "optimum_fit": opt_fit,
        "bootstrap": boot_json,
        "notes": points.notes,
    });
    Ok(FitResult {
        law: LAW.into(),
        params,
        ci,
        objective: rss_lr + rss_bs,
        grad_norm: 0.0,
        converged: true,
        exclusions: points.exclusions.clone(),
        n_points: kept.len(),
        extra,
    })
}
