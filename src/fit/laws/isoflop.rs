//! Chinchilla Approach 2, IsoFLOP profiles (Hoffmann et al. 2022, arXiv:2203.15556, §3.2):
//! at each compute budget C the model size is varied (D follows from C), a **parabola in log N**
//! is fitted to the loss, and its vertex is the budget's optimum N_opt(C); then
//! N_opt = k_N·C^a and D_opt = k_D·C^b are fitted by least squares in log–log space.
//!
//! Following Porian et al. 2024 (arXiv:2406.19146, repo formll/resolving-scaling-law-discrepancies,
//! `analysis.py`), a budget whose optimum is not bracketed is dropped and recorded: the lowest loss
//! at the smallest or largest N of the profile (optimum on the grid edge), a non-convex profile,
//! or a vertex outside the sampled N range. Budgets are clusters of C values
//! ([`crate::fit::groups::by_budget`], relative tolerance `budget_tol`).
//!
//! D_opt: if the points carry `D`, the profile's ln D is regressed on ln N (exact for any
//! FLOPs-per-token count that is a power of N; close otherwise) and evaluated at the vertex;
//! without `D`, D_opt = C/(6·N_opt).
//!
//! Unweighted power-law fits (Porian weight by 1/σ² of seed noise, which needs repeated seeds).
//! CIs: by-run bootstrap that redoes the whole procedure (profiles, vertices, power laws).

use super::super::bootstrap::bootstrap;
use super::super::error::FitError;
use super::super::groups::{by_budget, distinct};
use super::super::ols::ols;
use super::super::points::Points;
use super::super::{jnum, FitOptions, FitResult};
use serde_json::json;
use std::collections::BTreeMap;

/// Columns the law needs (`C` may be derived as 6ND).
pub const NEEDED: &[&str] = &["N", "C", "loss"];
const LAW: &str = "isoflop";

/// One IsoFLOP profile and its optimum (if it has one).
#[derive(Clone, Debug)]
pub struct Profile {
    pub c: f64,
    pub rows: Vec<usize>,
    /// loss = p0 + p1·u + p2·u², u = ln N − u0.
    pub parabola: Option<[f64; 3]>,
    pub u0: f64,
    pub n_opt: Option<f64>,
    pub d_opt: Option<f64>,
    pub loss_opt: Option<f64>,
    /// Why the profile has no optimum (None when it has one).
    pub dropped: Option<String>,
}

/// The fitted power laws N_opt = k_N·C^a, D_opt = k_D·C^b.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Isoflop {
    pub a: f64,
    pub k_n: f64,
    pub b: f64,
    pub k_d: f64,
}

impl Isoflop {
    pub fn n_opt(&self, c: f64) -> f64 {
        self.k_n * c.powf(self.a)
    }
    pub fn d_opt(&self, c: f64) -> f64 {
        self.k_d * c.powf(self.b)
    }
}

/// The profiles of these points (budgets clustered with `tol`).
pub fn profiles(points: &Points, tol: f64) -> Vec<Profile> {
    let (n, c, loss) = (points.col("N"), points.col("C"), points.col("loss"));
    let d = points.columns.get("D").map(Vec::as_slice);
    by_budget(c, tol).into_iter().map(|b| profile(n, d, loss, b.c, b.rows)).collect()
}

fn profile(n: &[f64], d: Option<&[f64]>, loss: &[f64], c: f64, rows: Vec<usize>) -> Profile {
    let mut p = Profile { c, rows, parabola: None, u0: 0.0, n_opt: None, d_opt: None, loss_opt: None, dropped: None };
    let k = distinct(n, &p.rows);
    if k < 3 {
        p.dropped = Some(format!("{k} distinct model sizes (a parabola needs >= 3)"));
        return p;
    }
    let (nmin, nmax) = p.rows.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &i| (a.min(n[i]), b.max(n[i])));
    let best = *p.rows.iter().min_by(|&&a, &&b| loss[a].total_cmp(&loss[b])).unwrap();
    let u: Vec<f64> = p.rows.iter().map(|&i| n[i].ln()).collect();
    p.u0 = u.iter().sum::<f64>() / u.len() as f64;
    let uc: Vec<f64> = u.iter().map(|x| x - p.u0).collect();
    let uu: Vec<f64> = uc.iter().map(|x| x * x).collect();
    let y: Vec<f64> = p.rows.iter().map(|&i| loss[i]).collect();
    if let Some(q) = ols(&[&uc, &uu], &y) {
        p.parabola = Some([q[0], q[1], q[2]]);
    }
    if n[best] == nmin || n[best] == nmax {
        let which = if n[best] == nmin { "smallest" } else { "largest" };
        p.dropped = Some(format!("lowest loss at the {which} model size N={:.3e} (optimum on the grid edge)", n[best]));
        return p;
    }
    let Some([q0, q1, q2]) = p.parabola else {
        p.dropped = Some("parabola fit failed (degenerate sizes)".into());
        return p;
    };
    if !(q2 > 0.0) {
        p.dropped = Some("profile is not convex in log N".into());
        return p;
    }
    let us = -q1 / (2.0 * q2);
    let (umin, umax) = (nmin.ln() - p.u0, nmax.ln() - p.u0);
    if !(us >= umin && us <= umax) {
        p.dropped = Some("parabola vertex outside the sampled N range".into());
        return p;
    }
    let n_opt = (us + p.u0).exp();
    p.n_opt = Some(n_opt);
    p.loss_opt = Some(q0 + q1 * us + q2 * us * us);
    p.d_opt = Some(match d {
        Some(d) => {
            let ld: Vec<f64> = p.rows.iter().map(|&i| d[i].ln()).collect();
            match ols(&[&uc], &ld) {
                Some(r) => (r[0] + r[1] * us).exp(),
                None => c / (6.0 * n_opt),
            }
        }
        None => c / (6.0 * n_opt),
    });
    p
}

/// Log–log least squares through the profiles' optima; `None` with fewer than 2 optima at
/// distinct budgets. Returns the law and the residual sum of squares (ln N, ln D).
pub fn power_laws(profiles: &[Profile]) -> Option<(Isoflop, f64)> {
    let ok: Vec<&Profile> = profiles.iter().filter(|p| p.n_opt.is_some()).collect();
    let lc: Vec<f64> = ok.iter().map(|p| p.c.ln()).collect();
    let ln: Vec<f64> = ok.iter().map(|p| p.n_opt.unwrap().ln()).collect();
    let ld: Vec<f64> = ok.iter().map(|p| p.d_opt.unwrap().ln()).collect();
    let rn = ols(&[&lc], &ln)?;
    let rd = ols(&[&lc], &ld)?;
    let rss: f64 = (0..lc.len()).map(|i| (ln[i] - rn[0] - rn[1] * lc[i]).powi(2) + (ld[i] - rd[0] - rd[1] * lc[i]).powi(2)).sum();
    Some((Isoflop { a: rn[1], k_n: rn[0].exp(), b: rd[1], k_d: rd[0].exp() }, rss))
}

fn stat_names(budgets: &[f64]) -> Vec<String> {
    let mut v: Vec<String> = ["a", "b", "N_coef", "D_coef"].iter().map(|s| s.to_string()).collect();
    for c in budgets {
        v.push(format!("N_opt@{c:e}"));
        v.push(format!("D_opt@{c:e}"));
        v.push(format!("D/N@{c:e}"));
    }
    v
}

fn stats(l: &Isoflop, budgets: &[f64]) -> Vec<f64> {
    let mut v = vec![l.a, l.b, l.k_n, l.k_d];
    for &c in budgets {
        v.extend([l.n_opt(c), l.d_opt(c), l.d_opt(c) / l.n_opt(c)]);
    }
    v
}

/// Fits the IsoFLOP law.
pub fn fit(mut points: Points, opts: &FitOptions) -> Result<FitResult, FitError> {
    points.exclude_non_positive(&["N", "C", "loss", "D"]);
    if points.len() < 6 {
        return Err(FitError::TooFewPoints { law: LAW.into(), n: points.len(), need: 6, detail: " (>= 2 budgets of >= 3 sizes)".into() });
    }
    let profs = profiles(&points, opts.budget_tol);
    let mut exclusions = points.exclusions.clone();
    for p in profs.iter().filter(|p| p.dropped.is_some()) {
        exclusions.push(format!("budget C={:.3e} ({} runs): {}; profile excluded", p.c, p.rows.len(), p.dropped.as_ref().unwrap()));
    }
    let n_ok = profs.iter().filter(|p| p.n_opt.is_some()).count();
    let (law, rss) = power_laws(&profs).ok_or_else(|| FitError::Degenerate {
        law: LAW.into(),
        reason: format!(
            "{n_ok} of {} budgets have a bracketed optimum; need >= 2 (widen the model-size grid around the optimum){}",
            profs.len(),
            if exclusions.is_empty() { String::new() } else { format!(": {}", exclusions.join("; ")) }
        ),
    })?;
    let names = stat_names(&opts.budgets);
    let point = stats(&law, &opts.budgets);
    let params: BTreeMap<String, f64> = names.iter().take(4).cloned().zip(point.iter().copied()).collect();
    let mut ci = BTreeMap::new();
    let mut boot = serde_json::Value::Null;
    if opts.bootstrap.resamples > 0 {
        let tol = opts.budget_tol;
        let s = bootstrap(&points.run_groups(), &names, &opts.bootstrap, |idx| {
            let sub = points.select(idx);
            let (l, _) = power_laws(&profiles(&sub, tol))?;
            Some(stats(&l, &opts.budgets))
        });
        ci = s.ci.clone();
        boot = json!({"resamples": s.resamples, "failed": s.failed, "seed": s.seed, "level": s.level, "unit": "runs",
                      "mean": s.mean, "sd": s.sd, "samples": sample_rows(&s.samples, 4)});
    }
    let prof_json: Vec<_> = profs
        .iter()
        .map(|p| {
            json!({"C": p.c, "runs": p.rows.len(), "N_opt": p.n_opt.map(jnum), "D_opt": p.d_opt.map(jnum),
                   "loss_opt": p.loss_opt.map(jnum), "parabola_in_lnN_minus_u0": p.parabola.map(|q| q.map(jnum)), "u0": p.u0,
                   "dropped": p.dropped})
        })
        .collect();
    let allocation: Vec<_> = opts
        .budgets
        .iter()
        .map(|&c| json!({"C": c, "N_opt": jnum(law.n_opt(c)), "D_opt": jnum(law.d_opt(c)), "tokens_per_param": jnum(law.d_opt(c) / law.n_opt(c))}))
        .collect();
    let extra = json!({
        "form": "per budget: loss = p0 + p1 u + p2 u^2, u = ln N - u0, N_opt at the vertex; N_opt = N_coef * C^a, D_opt = D_coef * C^b (OLS in log-log)",
        "budget_tol": opts.budget_tol,
        "profiles": prof_json,
        "allocation": allocation,
        "bootstrap": boot,
        "notes": points.notes,
    });
    Ok(FitResult {
        law: LAW.into(),
        params,
        ci,
        objective: rss,
        grad_norm: 0.0,
        converged: true,
        exclusions,
        n_points: points.len(),
        extra,
    })
}

/// The first `k` statistics of up to 200 bootstrap samples (for CI bands in plots).
pub(crate) fn sample_rows(samples: &[Vec<f64>], k: usize) -> Vec<Vec<f64>> {
    samples.iter().take(200).map(|s| s.iter().take(k).copied().collect()).collect()
}
