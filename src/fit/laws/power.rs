//! Power law with offset, y = E + A·x^(−α), for any positive metric `y` against any positive
//! column `x` (e.g. loss vs compute, Kaplan et al. 2020, arXiv:2001.08361, with the irreducible
//! term of Hoffmann et al. 2022, arXiv:2203.15556).
//!
//! Same machinery as Chinchilla Approach 3: log-space `LSE(a − α log x, e)` against log y,
//! Huber δ summed, multi-start L-BFGS, by-run bootstrap. Parameter/start vectors are
//! `[a, e, α]` = `[ln A, ln E, α]`. Default grid: a ∈ {0, 5, …, 25}, e ∈ {−1, −0.5, …, 1.5},
//! α ∈ {0.05, 0.1, 0.25, 0.5, 1, 1.5, 2} (252 starts; small exponents are common for this form).

use super::super::bootstrap::bootstrap;
use super::super::error::FitError;
use super::super::huber::{LseModel, Term};
use super::super::lbfgs::minimize;
use super::super::points::Points;
use super::super::{jnum, FitOptions, FitResult, StartGrid};
use super::chinchilla::optimizer_json;
use super::{cartesian, multi_start, range};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

const LAW: &str = "power";

/// y = E + A·x^(−α).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PowerLaw {
    pub e: f64,
    pub a: f64,
    pub alpha: f64,
}

impl PowerLaw {
    /// From `[ln A, ln E, α]`.
    pub fn from_log(p: &[f64]) -> Self {
        PowerLaw { a: p[0].exp(), e: p[1].exp(), alpha: p[2] }
    }
    pub fn eval(&self, x: f64) -> f64 {
        self.e + self.a * x.powf(-self.alpha)
    }
}

/// The default start grid, `[ln A, ln E, α]`.
pub fn default_grid() -> Vec<Vec<f64>> {
    cartesian(&[range(0.0, 25.0, 5.0), range(-1.0, 1.5, 0.5), vec![0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0]])
}

/// The log-space model of `y` against `x` on these points.
pub fn model(points: &Points, x: &str, y: &str, delta: f64) -> LseModel {
    let ln = |c: &str| points.col(c).iter().map(|v| v.ln()).collect::<Vec<f64>>();
    LseModel::new(vec![Term::new(0, Some((2, 0))), Term::new(1, None)], vec![ln(x)], ln(y), delta)
}

/// Fits y = E + A·x^(−α) with `opts.x`/`opts.y` as columns.
pub fn fit(mut points: Points, opts: &FitOptions) -> Result<FitResult, FitError> {
    let (x, y) = (opts.x.as_str(), opts.y.as_str());
    points.exclude_non_positive(&[x, y]);
    points.drop_highest(y, opts.drop_highest);
    let mut xs: Vec<f64> = points.col(x).to_vec();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    if points.len() < 4 {
        return Err(FitError::TooFewPoints { law: LAW.into(), n: points.len(), need: 4, detail: " (3 parameters)".into() });
    }
    if xs.len() < 3 {
        return Err(FitError::Degenerate { law: LAW.into(), reason: format!("`{x}` takes {} distinct values; need 3 to identify E, A, alpha", xs.len()) });
    }
    let mut starts = match &opts.grid {
        StartGrid::Default => default_grid(),
        StartGrid::None => vec![],
        StartGrid::Custom(g) => g.clone(),
    };
    starts.extend(opts.extra_starts.iter().cloned());
    if starts.is_empty() || starts.iter().any(|s| s.len() != 3 || s.iter().any(|v| !v.is_finite())) {
        return Err(FitError::Option("power-law starts must be non-empty lists of 3 finite values [lnA, lnE, alpha]".into()));
    }
    let m = model(&points, x, y, opts.delta);
    let lb = opts.lbfgs();
    let best = multi_start(&m, &starts, &lb)
        .ok_or_else(|| FitError::Degenerate { law: LAW.into(), reason: "no start reached a finite objective".into() })?;
    let p = PowerLaw::from_log(&best.params);
    let names: Vec<String> = ["E", "A", "alpha"].iter().map(|s| s.to_string()).collect();
    let params: BTreeMap<String, f64> = names.iter().cloned().zip([p.e, p.a, p.alpha]).collect();
    let mut ci = BTreeMap::new();
    let mut boot_json = serde_json::Value::Null;
    if opts.bootstrap.resamples > 0 {
        let not_conv = AtomicUsize::new(0);
        let s = bootstrap(&points.run_groups(), &names, &opts.bootstrap, |idx| {
            let sub = points.select(idx);
            let mm = model(&sub, x, y, opts.delta);
            let r = minimize(|q, g| mm.scaled_objective(q, g), &mm.to_internal(&best.params), &lb);
            if !r.converged {
                not_conv.fetch_add(1, Ordering::Relaxed);
            }
            let q = PowerLaw::from_log(&mm.to_paper(&r.x));
            r.f.is_finite().then_some(vec![q.e, q.a, q.alpha])
        });
        ci = s.ci.clone();
        boot_json = json!({"resamples": s.resamples, "failed": s.failed, "not_converged": not_conv.into_inner(),
            "seed": s.seed, "level": s.level, "unit": "runs", "mean": s.mean, "sd": s.sd});
    }
    let extra = json!({
        "form": format!("{y} = E + A*{x}^(-alpha); log-space LSE, Huber(delta) summed"),
        "x": x, "y": y, "delta": opts.delta,
        "log_params": {"lnA": jnum(best.params[0]), "lnE": jnum(best.params[1])},
        "optimizer": optimizer_json(&best),
        "bootstrap": boot_json,
        "notes": points.notes,
    });
    Ok(best.into_result(LAW, params, ci, &points, extra))
}
