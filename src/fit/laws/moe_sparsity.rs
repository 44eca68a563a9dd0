//! MoE sparsity law of Abnar, Shah, Busbridge, Mohamed El Amine Ali, Susskind, Thilak 2025,
//! "Parameters vs FLOPs: Scaling Laws for Optimal Sparsity for Mixture-of-Experts Language
//! Models" (arXiv:2501.12370, eq. 6):
//! `L(N, D, S) = a/N^α + b/D^β + c/(1−S)^λ + d/((1−S)^δ·N^γ) + e`,
//! N = **total** parameters, D = tokens, S = 1 − K/E (fraction of inactive experts).
//! Published (Table 3): α=0.5962, β=0.3954, λ=−0.1666, δ=0.1603, γ=0.1595, a=16612.5,
//! b=5455.67, c=0.4598, d=17.26, e=0.94.
//!
//! Fitted as Chinchilla Approach 3 (the paper's recipe): log-space LSE of the five terms,
//! Huber δ summed, multi-start L-BFGS, by-run bootstrap. Parameter/start vectors are
//! `[ln a, ln b, ln c, ln d, ln e, α, β, λ, δ, γ]`; the features are ln N, ln D and ln(1−S).
//!
//! Optimal sparsity and size vs compute: with C = 6·N_active·D (Abnar et al.) and the
//! approximation N_active = (1−S)·N (all parameters are expert parameters — documented, as the
//! law itself does not separate shared parameters), for each budget the loss is minimised over
//! S on a fine grid within the sampled sparsity range and over N (golden section in ln N within
//! [N_min/100, N_max·1000] of the data); `extra.optimum` records S*, N*, N_active*, D* and
//! whether the optimum sits on a search boundary.

use super::super::error::FitError;
use super::super::huber::{LseModel, Term};
use super::super::points::Points;
use super::super::{jnum, FitOptions, FitResult, StartGrid};
use super::chinchilla::optimizer_json;
use super::bootstrap_refit;
use super::{cartesian, multi_start};
use serde_json::json;
use std::collections::BTreeMap;

pub const NEEDED: &[&str] = &["N", "D", "S", "loss"];
const LAW: &str = "moe_sparsity";
/// Reported parameter names in the paper's symbols.
pub const PARAM_NAMES: [&str; 10] = ["a", "b", "c", "d", "e", "alpha", "beta", "lambda", "delta", "gamma"];

/// The law's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeLaw {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub d: f64,
    pub e: f64,
    pub alpha: f64,
    pub beta: f64,
    pub lambda: f64,
    pub delta: f64,
    pub gamma: f64,
}

/// Compute-optimal configuration at one budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeOptimum {
    pub c: f64,
    pub s: f64,
    pub n: f64,
    pub n_active: f64,
    pub d: f64,
    pub loss: f64,
    pub on_boundary: bool,
}

impl MoeLaw {
    /// Abnar et al. 2025, Table 3.
    pub fn published() -> Self {
        MoeLaw { a: 16612.5, b: 5455.67, c: 0.4598, d: 17.26, e: 0.94, alpha: 0.5962, beta: 0.3954, lambda: -0.1666, delta: 0.1603, gamma: 0.1595 }
    }
    /// From `[ln a, ln b, ln c, ln d, ln e, α, β, λ, δ, γ]`.
    pub fn from_log(p: &[f64]) -> Self {
        MoeLaw { a: p[0].exp(), b: p[1].exp(), c: p[2].exp(), d: p[3].exp(), e: p[4].exp(), alpha: p[5], beta: p[6], lambda: p[7], delta: p[8], gamma: p[9] }
    }
    pub fn to_log(&self) -> Vec<f64> {
        vec![self.a.ln(), self.b.ln(), self.c.ln(), self.d.ln(), self.e.ln(), self.alpha, self.beta, self.lambda, self.delta, self.gamma]
    }
    fn to_vec(self) -> Vec<f64> {
        vec![self.a, self.b, self.c, self.d, self.e, self.alpha, self.beta, self.lambda, self.delta, self.gamma]
    }
    /// L(N, D, S).
    pub fn loss(&self, n: f64, d: f64, s: f64) -> f64 {
        let q = 1.0 - s;
        self.a / n.powf(self.alpha) + self.b / d.powf(self.beta) + self.c / q.powf(self.lambda) + self.d / (q.powf(self.delta) * n.powf(self.gamma)) + self.e
    }
    /// Loss-minimising (S, N) at compute C = 6·(1−S)·N·D, S in [s_lo, s_hi], ln N in [ln_lo, ln_hi].
    pub fn optimum(&self, c: f64, s_range: (f64, f64), ln_n_range: (f64, f64)) -> MoeOptimum {
        let mut best = MoeOptimum { c, s: f64::NAN, n: f64::NAN, n_active: f64::NAN, d: f64::NAN, loss: f64::INFINITY, on_boundary: false };
        let steps = 200;
        for k in 0..=steps {
            let s = s_range.0 + (s_range.1 - s_range.0) * k as f64 / steps as f64;
            let f = |ln_n: f64| {
                let n = ln_n.exp();
                self.loss(n, c / (6.0 * (1.0 - s) * n), s)
            };
            let ln_n = golden(f, ln_n_range.0, ln_n_range.1);
            let l = f(ln_n);
            if l < best.loss {
                let n = ln_n.exp();
                let near = |x: f64, y: f64| (x - y).abs() < 1e-3;
                best = MoeOptimum {
                    c,
                    s,
                    n,
                    n_active: (1.0 - s) * n,
                    d: c / (6.0 * (1.0 - s) * n),
                    loss: l,
                    on_boundary: near(ln_n, ln_n_range.0) || near(ln_n, ln_n_range.1) || (s_range.1 > s_range.0 && (k == 0 || k == steps)),
                };
            }
        }
        best
    }
}

/// Golden-section minimum of a unimodal `f` on [lo, hi].
fn golden(f: impl Fn(f64) -> f64, mut lo: f64, mut hi: f64) -> f64 {
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (hi - r * (hi - lo), lo + r * (hi - lo));
    let (mut f1, mut f2) = (f(x1), f(x2));
    for _ in 0..100 {
        if f1 <= f2 {
            hi = x2;
            x2 = x1;
            f2 = f1;
            x1 = hi - r * (hi - lo);
            f1 = f(x1);
        } else {
            lo = x1;
            x1 = x2;
            f1 = f2;
            x2 = lo + r * (hi - lo);
            f2 = f(x2);
        }
        if hi - lo < 1e-9 {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Default start grid `[ln a, ln b, ln c, ln d, ln e, α, β, λ, δ, γ]` (576 starts, a reduced
/// version of the paper's: log a, log b ∈ {0, 5, 10}; α, β ∈ {0.25, 0.5}; λ ∈ {−0.5, 0.5};
/// δ ∈ {0, 0.5}; γ ∈ {0.1, 0.5}; log c = −1, log d ∈ {0, 3}, log e = 0).
pub fn default_grid() -> Vec<Vec<f64>> {
    let ab = vec![0.0, 5.0, 10.0];
    cartesian(&[ab.clone(), ab, vec![-1.0], vec![0.0, 3.0], vec![0.0], vec![0.25, 0.5], vec![0.25, 0.5], vec![-0.5, 0.5], vec![0.0, 0.5], vec![0.1, 0.5]])
}

/// The log-space model on these points.
pub fn model(points: &Points, delta: f64) -> LseModel {
    let ln = |c: &str| points.col(c).iter().map(|v| v.ln()).collect::<Vec<f64>>();
    let ln_q: Vec<f64> = points.col("S").iter().map(|s| (1.0 - s).ln()).collect();
    let terms = vec![
        Term::new(0, Some((5, 0))),
        Term::new(1, Some((6, 1))),
        Term::new(2, Some((7, 2))),
        Term { intercept: 3, slopes: vec![(8, 2), (9, 0)] },
        Term::new(4, None),
    ];
    LseModel::new(terms, vec![ln("N"), ln("D"), ln_q], ln("loss"), delta)
}

fn stat_names(budgets: &[f64]) -> Vec<String> {
    let mut v: Vec<String> = PARAM_NAMES.iter().map(|s| s.to_string()).collect();
    for c in budgets {
        for k in ["S_opt", "N_opt", "N_active_opt", "D_opt"] {
            v.push(format!("{k}@{c:e}"));
        }
    }
    v
}

struct Ranges {
    s: (f64, f64),
    ln_n: (f64, f64),
}

fn stats(l: &MoeLaw, budgets: &[f64], r: &Ranges) -> Vec<f64> {
    let mut v = l.to_vec();
    for &c in budgets {
        let o = l.optimum(c, r.s, r.ln_n);
        v.extend([o.s, o.n, o.n_active, o.d]);
    }
    v
}

/// Fits the MoE sparsity law.
pub fn fit(mut points: Points, opts: &FitOptions) -> Result<FitResult, FitError> {
    points.exclude_non_positive(&["N", "D", "loss"]);
    points.exclude_where("sparsity S outside [0, 1)", |p, i| !(p.col("S")[i] >= 0.0 && p.col("S")[i] < 1.0));
    if points.len() < 11 {
        return Err(FitError::TooFewPoints { law: LAW.into(), n: points.len(), need: 11, detail: " (10 parameters)".into() });
    }
    let all: Vec<usize> = (0..points.len()).collect();
    for (c, what) in [("N", "model sizes"), ("D", "token counts"), ("S", "sparsities")] {
        let k = super::super::groups::distinct(points.col(c), &all);
        if k < 3 {
            return Err(FitError::Degenerate { law: LAW.into(), reason: format!("{k} distinct {what}; need >= 3 (the law has terms in N, D, S and N×S)") });
        }
    }
    let mut starts = match &opts.grid {
        StartGrid::Default => default_grid(),
        StartGrid::None => vec![],
        StartGrid::Custom(g) => g.clone(),
    };
    starts.extend(opts.extra_starts.iter().cloned());
    if starts.is_empty() || starts.iter().any(|p| p.len() != 10 || p.iter().any(|v| !v.is_finite())) {
        return Err(FitError::Option("moe_sparsity starts need 10 finite values [ln a, ln b, ln c, ln d, ln e, alpha, beta, lambda, delta, gamma]".into()));
    }
    let m = model(&points, opts.delta);
    let best = multi_start(&m, &starts, &opts.lbfgs()).ok_or_else(|| FitError::Degenerate { law: LAW.into(), reason: "no start reached a finite objective".into() })?;
    let law = MoeLaw::from_log(&best.params);
    let fold = |c: &str| points.col(c).iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (nlo, nhi) = fold("N");
    let ranges = Ranges { s: fold("S"), ln_n: ((nlo / 100.0).ln(), (nhi * 1000.0).ln()) };
    let names = stat_names(&opts.budgets);
    let params: BTreeMap<String, f64> = PARAM_NAMES.iter().map(|s| s.to_string()).zip(law.to_vec()).collect();
    let mut ci = BTreeMap::new();
    let mut boot = serde_json::Value::Null;
    if opts.bootstrap.resamples > 0 {
        let (s, not_conv) = bootstrap_refit(&points, &best.params, &names, opts, |sub| model(sub, opts.delta), |p| stats(&MoeLaw::from_log(p), &opts.budgets, &ranges));
        ci = s.ci.clone();
        boot = json!({"resamples": s.resamples, "failed": s.failed, "not_converged": not_conv, "seed": s.seed, "level": s.level,
                      "unit": "runs", "mean": s.mean, "sd": s.sd});
    }
    let optimum: Vec<_> = opts
        .budgets
        .iter()
        .map(|&c| {
            let o = law.optimum(c, ranges.s, ranges.ln_n);
            json!({"C": c, "S_opt": jnum(o.s), "N_opt": jnum(o.n), "N_active_opt": jnum(o.n_active), "D_opt": jnum(o.d), "loss": jnum(o.loss), "on_search_boundary": o.on_boundary})
        })
        .collect();
    let extra = json!({
        "form": "L = a/N^alpha + b/D^beta + c/(1-S)^lambda + d/((1-S)^delta N^gamma) + e; log-space LSE, Huber(delta) summed",
        "delta": opts.delta,
        "optimum": optimum,
        "optimum_assumptions": "C = 6 N_active D, N_active = (1-S) N; S searched within the data's sparsity range",
        "optimizer": optimizer_json(&best),
        "bootstrap": boot,
        "notes": points.notes,
    });
    Ok(best.into_result(LAW, params, ci, &points, extra))
}
