//! Searched parameters: W&B's distribution names, random sampling and Optuna-style TPE.
//!
//! Distributions (W&B sweep-config names, <https://docs.wandb.ai/guides/sweeps/sweep-config-keys>):
//! `constant` (`value`), `categorical` (`values`), `int_uniform`, `uniform`, `q_uniform` (`q`),
//! `log_uniform_values`, `q_log_uniform_values`, `log_uniform` (`min`/`max` are natural logs,
//! as in W&B). Without `distribution`, `values` means categorical and integer `min`/`max`
//! int_uniform, otherwise uniform. The normal family is not supported (TPE and Optuna's journal
//! need bounded spaces).
//!
//! **Random**: search trial `i` draws its parameters, in declaration order, from
//! `Rng::new(mix(seed, i))` — the same points in every grid cell, so cells compare paired.
//!
//! **TPE** (Bergstra et al. 2011; Optuna's `TPESampler` defaults, univariate): the first
//! `n_startup_trials` trials are the random ones above. Later, the finished trials of the same
//! grid cell are sorted by objective (diverged ones last) and split into the best
//! `n_below = min(ceil(0.1·n), 25)` (Optuna's `default_gamma`) and the rest. Per parameter, each
//! group gives a Parzen estimator in the internal space (log space for log distributions): one
//! truncated Gaussian per observation with σ = the larger gap to its sorted neighbours (the
//! bounds count as neighbours; Optuna's `consider_endpoints=False` rule for the outermost ones),
//! clipped to [(high−low)/min(100, 1+n), high−low] (Optuna's "magic clip"), plus a prior
//! Gaussian at the centre with σ = high−low and weight 1. Categorical estimators are
//! `(count + 1/K) / (n + 1)`. `n_ei_candidates` points are drawn from l(x) (the best group) and
//! the one maximising log l(x) − log g(x) is taken. Quantized and integer parameters are
//! rounded after sampling (the density is evaluated at the rounded point, where Optuna
//! integrates over the cell — a simplification).

use crate::data::rng::{mix, Rng};
use serde::Deserialize;
use serde_json::json;
use serde_yaml_ng::Value;

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SearchMethod {
    Random,
    Tpe,
}

/// One searched parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamSpec {
    Constant(Value),
    Categorical(Vec<Value>),
    IntUniform { min: i64, max: i64 },
    Uniform { min: f64, max: f64 },
    QUniform { min: f64, max: f64, q: f64 },
    LogUniformValues { min: f64, max: f64 },
    QLogUniformValues { min: f64, max: f64, q: f64 },
    /// W&B `log_uniform`: `exp(U(min, max))`.
    LogUniform { min: f64, max: f64 },
}

const NAMES: &[&str] = &["constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values", "log_uniform"];

fn num(m: &serde_yaml_ng::Mapping, k: &str) -> Result<Option<f64>, String> {
    match m.get(k) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("`{k}` must be a number")),
    }
}

impl ParamSpec {
    /// Parses `{distribution: ..., min, max, q, values, value}`.
    pub fn parse(v: &Value) -> Result<Self, String> {
        let m = match v {
            Value::Mapping(m) => m,
            Value::Sequence(s) => return Self::categorical(s.clone()),
            _ => return Err("expected a mapping such as {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}".into()),
        };
        for k in m.keys() {
            let k = k.as_str().unwrap_or("");
            if !["distribution", "min", "max", "q", "values", "value"].contains(&k) {
                return Err(format!("unknown field `{k}`; expected distribution, min, max, q, values or value"));
            }
        }
        let dist = match m.get("distribution") {
            Some(d) => d.as_str().ok_or("`distribution` must be a name")?.to_string(),
            None if m.contains_key("values") => "categorical".into(),
            None if m.contains_key("value") => "constant".into(),
            None if m.get("min").is_some_and(|v| v.is_i64()) && m.get("max").is_some_and(|v| v.is_i64()) => "int_uniform".into(),
            None => "uniform".into(),
        };
        let (min, max, q) = (num(m, "min")?, num(m, "max")?, num(m, "q")?);
        let bounds = || -> Result<(f64, f64), String> {
            match (min, max) {
                (Some(a), Some(b)) if a < b => Ok((a, b)),
                (Some(a), Some(b)) => Err(format!("need min < max; got min {a}, max {b}")),
                _ => Err(format!("`{dist}` needs `min` and `max`")),
            }
        };
        let qv = || -> Result<f64, String> {
            match q {
                Some(q) if q > 0.0 => Ok(q),
                Some(q) => Err(format!("`q` must be > 0; got {q}")),
                None => Err(format!("`{dist}` needs `q`")),
            }
        };
        Ok(match dist.as_str() {
            "constant" => ParamSpec::Constant(m.get("value").cloned().ok_or("`constant` needs `value`")?),
            "categorical" => match m.get("values") {
                Some(Value::Sequence(s)) => return Self::categorical(s.clone()),
                _ => return Err("`categorical` needs a list `values`".into()),
            },
            "int_uniform" => {
                let (a, b) = bounds()?;
                if a.fract() != 0.0 || b.fract() != 0.0 {
                    return Err("`int_uniform` needs integer min and max".into());
                }
                ParamSpec::IntUniform { min: a as i64, max: b as i64 }
            }
            "uniform" => {
                let (min, max) = bounds()?;
                ParamSpec::Uniform { min, max }
            }
            "q_uniform" => {
                let (min, max) = bounds()?;
                ParamSpec::QUniform { min, max, q: qv()? }
            }
            "log_uniform_values" | "q_log_uniform_values" => {
                let (min, max) = bounds()?;
                if min <= 0.0 {
                    return Err(format!("`{dist}` needs min > 0"));
                }
                if dist == "log_uniform_values" {
                    ParamSpec::LogUniformValues { min, max }
                } else {
                    ParamSpec::QLogUniformValues { min, max, q: qv()? }
                }
            }
            "log_uniform" => {
                let (min, max) = bounds()?;
                ParamSpec::LogUniform { min, max }
            }
            other => return Err(format!("unknown distribution `{other}`; known: {}", NAMES.join(", "))),
        })
    }

    fn categorical(values: Vec<Value>) -> Result<Self, String> {
        if values.is_empty() {
            return Err("`values` is empty".into());
        }
        Ok(ParamSpec::Categorical(values))
    }

    /// The internal space: `(low, high, log, step)` for numbers, `Err(k)` for `k` categories.
    /// Log distributions live in ln-space; `step` (quantization or 1 for integers) in value space.
    fn space(&self) -> Result<(f64, f64, bool, Option<f64>), usize> {
        match self {
            ParamSpec::Constant(_) => Err(1),
            ParamSpec::Categorical(v) => Err(v.len()),
            ParamSpec::IntUniform { min, max } => Ok((*min as f64, *max as f64, false, Some(1.0))),
            ParamSpec::Uniform { min, max } => Ok((*min, *max, false, None)),
            ParamSpec::QUniform { min, max, q } => Ok((*min, *max, false, Some(*q))),
            ParamSpec::LogUniformValues { min, max } => Ok((min.ln(), max.ln(), true, None)),
            ParamSpec::QLogUniformValues { min, max, q } => Ok((min.ln(), max.ln(), true, Some(*q))),
            ParamSpec::LogUniform { min, max } => Ok((*min, *max, true, None)),
        }
    }

    /// Turns an internal coordinate (category index, or a point of the internal space) into
    /// the config value, applying quantization (W&B: `round(x / q) · q`).
    pub fn value(&self, internal: f64) -> Value {
        match self {
            ParamSpec::Constant(v) => v.clone(),
            ParamSpec::Categorical(v) => v[(internal.round().max(0.0) as usize).min(v.len() - 1)].clone(),
            ParamSpec::IntUniform { min, max } => Value::from((internal.round() as i64).clamp(*min, *max)),
            _ => {
                let (_, _, log, step) = self.space().expect("numeric");
                let mut x = if log { internal.exp() } else { internal };
                if let Some(q) = step {
                    x = (x / q).round() * q;
                    // Strip float noise such as 0.30000000000000004 from q multiples.
                    x = format!("{:.12e}", x).parse().unwrap_or(x);
                }
                Value::from(x)
            }
        }
    }

    /// The internal coordinate of a value produced by [`Self::value`].
    pub fn internal(&self, v: &Value) -> Option<f64> {
        match self {
            ParamSpec::Constant(_) => Some(0.0),
            ParamSpec::Categorical(vals) => vals.iter().position(|x| x == v).map(|i| i as f64),
            _ => {
                let x = v.as_f64()?;
                let (_, _, log, _) = self.space().ok()?;
                Some(if log { x.max(f64::MIN_POSITIVE).ln() } else { x })
            }
        }
    }

    /// A uniform draw in the internal space.
    pub fn sample_internal(&self, rng: &mut Rng) -> f64 {
        match self.space() {
            Err(k) => rng.below(k as u64) as f64,
            Ok((lo, hi, _, _)) => match self {
                ParamSpec::IntUniform { min, max } => (*min + rng.below((max - min + 1) as u64) as i64) as f64,
                _ => lo + rng.next_f64() * (hi - lo),
            },
        }
    }

    /// Optuna's distribution JSON for the journal and the internal value Optuna stores
    /// (`param_value_internal`: the float, the integer, or the category index).
    pub fn optuna(&self, v: &Value) -> (serde_json::Value, f64) {
        match self {
            ParamSpec::Constant(c) => (categorical_json(std::slice::from_ref(c)), 0.0),
            ParamSpec::Categorical(vals) => (categorical_json(vals), self.internal(v).unwrap_or(0.0)),
            ParamSpec::IntUniform { min, max } => (
                json!({"name": "IntDistribution", "attributes": {"log": false, "step": 1, "low": min, "high": max}}),
                v.as_f64().unwrap_or(0.0),
            ),
            _ => {
                let (lo, hi, log, _) = self.space().expect("numeric");
                let (lo, hi) = if log { (lo.exp(), hi.exp()) } else { (lo, hi) };
                // Quantized values may round outside [min, max]; widen so Optuna accepts them.
                let x = v.as_f64().unwrap_or(lo);
                (json!({"name": "FloatDistribution", "attributes": {"step": null, "low": lo.min(x), "high": hi.max(x), "log": log}}), x)
            }
        }
    }
}

/// A YAML value as a JSON value (Optuna's categorical choices must be scalars: other values
/// become their compact JSON text).
pub fn choice_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => json!(b),
        Value::Number(n) if n.is_i64() => json!(n.as_i64()),
        Value::Number(n) if n.is_u64() => json!(n.as_u64()),
        Value::Number(n) => json!(n.as_f64()),
        Value::String(s) => json!(s),
        other => json!(serde_json::to_string(&yaml_to_json(other)).unwrap_or_default()),
    }
}

/// Converts YAML to JSON (tags dropped, non-string keys rendered as YAML text).
pub fn yaml_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Sequence(s) => serde_json::Value::Array(s.iter().map(yaml_to_json).collect()),
        Value::Mapping(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().map(str::to_string).unwrap_or_else(|| serde_yaml_ng::to_string(k).unwrap_or_default().trim().to_string()), yaml_to_json(v)))
                .collect(),
        ),
        Value::Tagged(t) => yaml_to_json(&t.value),
        other => choice_json(other),
    }
}

pub fn categorical_json(vals: &[Value]) -> serde_json::Value {
    json!({"name": "CategoricalDistribution", "attributes": {"choices": vals.iter().map(choice_json).collect::<Vec<_>>()}})
}

/// The Optuna distribution of a grid or ablate axis and the internal value of `v` on it:
/// numeric axes are `IntDistribution` (all integers) or `FloatDistribution` over [min, max],
/// so adding values to a grid later keeps the study's search space compatible; other axes are
/// categorical (changing their values needs a new sweep name — optuna drops params whose
/// categorical choices changed).
pub fn axis_dist(choices: &[Value], v: &Value) -> (serde_json::Value, f64) {
    let nums: Option<Vec<f64>> = choices.iter().map(|c| if c.is_number() { c.as_f64() } else { None }).collect();
    match nums {
        Some(xs) if !xs.is_empty() => {
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let x = v.as_f64().unwrap_or(lo);
            if choices.iter().all(|c| c.is_i64()) {
                (json!({"name": "IntDistribution", "attributes": {"log": false, "step": 1, "low": lo as i64, "high": hi as i64}}), x)
            } else {
                (json!({"name": "FloatDistribution", "attributes": {"step": null, "low": lo, "high": hi, "log": false}}), x)
            }
        }
        _ => (categorical_json(choices), choices.iter().position(|c| c == v).unwrap_or(0) as f64),
    }
}

/// Random search trial `index`: internal coordinates of every parameter.
pub fn random_point(params: &[(String, ParamSpec)], seed: u64, index: usize) -> Vec<f64> {
    let mut rng = Rng::new(mix(seed, index as u64));
    params.iter().map(|(_, p)| p.sample_internal(&mut rng)).collect()
}

/// Optuna's `default_gamma`: the size of the "good" group.
pub fn n_below(n: usize) -> usize {
    ((0.1 * n as f64).ceil() as usize).min(25).max(1)
}

/// One TPE suggestion. `obs` are finished trials: internal coordinates per parameter (None
/// where absent) and the objective (lower is better; +inf for diverged). With fewer than two
/// observations this is a random draw.
pub fn tpe_point(params: &[(String, ParamSpec)], obs: &[(Vec<Option<f64>>, f64)], rng: &mut Rng, n_ei: usize) -> Vec<f64> {
    let mut sorted: Vec<&(Vec<Option<f64>>, f64)> = obs.iter().collect();
    sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
    if sorted.len() < 2 {
        return params.iter().map(|(_, p)| p.sample_internal(rng)).collect();
    }
    let nb = n_below(sorted.len());
    let (below, above) = sorted.split_at(nb);
    params
        .iter()
        .enumerate()
        .map(|(j, (_, p))| {
            let pick = |g: &[&(Vec<Option<f64>>, f64)]| g.iter().filter_map(|o| o.0.get(j).copied().flatten()).collect::<Vec<f64>>();
            let (lb, ab) = (pick(below), pick(above));
            match p.space() {
                Err(k) => {
                    let pl = categorical_pmf(&lb, k);
                    let pg = categorical_pmf(&ab, k);
                    let mut best = (f64::NEG_INFINITY, 0.0);
                    for _ in 0..n_ei {
                        let c = sample_pmf(&pl, rng);
                        let s = pl[c].ln() - pg[c].ln();
                        if s > best.0 {
                            best = (s, c as f64);
                        }
                    }
                    best.1
                }
                Ok((lo, hi, log, step)) => {
                    // Integers and quantized linear spaces widen by half a step (as Optuna does).
                    let half = if log { 0.0 } else { step.unwrap_or(0.0) / 2.0 };
                    let (lo, hi) = (lo - half, hi + half);
                    let l = Parzen::new(&lb, lo, hi);
                    let g = Parzen::new(&ab, lo, hi);
                    let mut best = (f64::NEG_INFINITY, lo);
                    for _ in 0..n_ei {
                        let x = snap(p, l.sample(rng));
                        let s = l.log_pdf(x) - g.log_pdf(x);
                        if s > best.0 {
                            best = (s, x);
                        }
                    }
                    best.1
                }
            }
        })
        .collect()
}

/// Rounds an internal coordinate to the parameter's grid (integers, quantization).
fn snap(p: &ParamSpec, x: f64) -> f64 {
    match p.internal(&p.value(x)) {
        Some(v) if v.is_finite() => v,
        _ => x,
    }
}

fn categorical_pmf(obs: &[f64], k: usize) -> Vec<f64> {
    let mut c = vec![1.0 / k as f64; k];
    for &o in obs {
        if let Some(x) = c.get_mut(o.round().max(0.0) as usize) {
            *x += 1.0;
        }
    }
    let s: f64 = c.iter().sum();
    c.iter().map(|x| x / s).collect()
}

fn sample_pmf(p: &[f64], rng: &mut Rng) -> usize {
    let mut u = rng.next_f64();
    for (i, &x) in p.iter().enumerate() {
        if u < x {
            return i;
        }
        u -= x;
    }
    p.len() - 1
}

/// Mixture of truncated Gaussians on [lo, hi] (observations plus the prior).
struct Parzen {
    mus: Vec<f64>,
    sigmas: Vec<f64>,
    weights: Vec<f64>,
    lo: f64,
    hi: f64,
}

impl Parzen {
    fn new(obs: &[f64], lo: f64, hi: f64) -> Self {
        let range = hi - lo;
        let n = obs.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| obs[a].total_cmp(&obs[b]));
        let mut with_ends = vec![lo];
        with_ends.extend(order.iter().map(|&i| obs[i]));
        with_ends.push(hi);
        let mut sorted_sigmas: Vec<f64> = (1..=n).map(|i| (with_ends[i] - with_ends[i - 1]).max(with_ends[i + 1] - with_ends[i])).collect();
        if with_ends.len() >= 4 {
            sorted_sigmas[0] = with_ends[2] - with_ends[1];
            let m = with_ends.len();
            sorted_sigmas[n - 1] = with_ends[m - 2] - with_ends[m - 3];
        }
        let min_sigma = range / (100.0f64).min(1.0 + n as f64);
        let mut sigmas = vec![0.0; n];
        for (k, &i) in order.iter().enumerate() {
            sigmas[i] = sorted_sigmas[k].clamp(min_sigma, range);
        }
        let mut mus = obs.to_vec();
        let mut weights = vec![1.0; n];
        mus.push((lo + hi) / 2.0);
        sigmas.push(range);
        weights.push(1.0);
        let s: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
        Self { mus, sigmas, weights, lo, hi }
    }

    fn sample(&self, rng: &mut Rng) -> f64 {
        let k = sample_pmf(&self.weights, rng);
        let (mu, s) = (self.mus[k], self.sigmas[k]);
        for _ in 0..100 {
            let x = mu + s * rng.normal();
            if x >= self.lo && x <= self.hi {
                return x;
            }
        }
        mu.clamp(self.lo, self.hi)
    }

    fn log_pdf(&self, x: f64) -> f64 {
        let mut p = 0.0;
        for ((&mu, &s), &w) in self.mus.iter().zip(&self.sigmas).zip(&self.weights) {
            let z = (phi((self.hi - mu) / s) - phi((self.lo - mu) / s)).max(1e-300);
            let u = (x - mu) / s;
            p += w * (-0.5 * u * u).exp() / (s * (2.0 * std::f64::consts::PI).sqrt() * z);
        }
        p.max(1e-300).ln()
    }
}

/// Standard normal CDF via erfc (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * (-z * z - 1.26551223
        + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
        .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(y: &str) -> Result<ParamSpec, String> {
        ParamSpec::parse(&serde_yaml_ng::from_str(y).unwrap())
    }

    #[test]
    fn parses_wandb_distributions() {
        assert_eq!(p("{distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}").unwrap(), ParamSpec::LogUniformValues { min: 1e-4, max: 1e-2 });
        assert_eq!(p("{min: 1, max: 8}").unwrap(), ParamSpec::IntUniform { min: 1, max: 8 });
        assert_eq!(p("{min: 0.1, max: 0.5}").unwrap(), ParamSpec::Uniform { min: 0.1, max: 0.5 });
        assert!(matches!(p("{values: [a, b]}").unwrap(), ParamSpec::Categorical(v) if v.len() == 2));
        assert!(p("{distribution: normal, mu: 0, sigma: 1}").unwrap_err().contains("unknown field `mu`"));
        assert!(p("{distribution: nope, min: 0, max: 1}").unwrap_err().contains("known: constant"));
        assert!(p("{distribution: q_uniform, min: 0, max: 1}").unwrap_err().contains("needs `q`"));
        assert!(p("{distribution: uniform, min: 2, max: 1}").unwrap_err().contains("min < max"));
        assert!(p("{distribution: log_uniform_values, min: 0, max: 1}").unwrap_err().contains("min > 0"));
    }

    #[test]
    fn random_points_are_reproducible_and_in_range() {
        let params = vec![
            ("a".to_string(), p("{distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}").unwrap()),
            ("b".to_string(), p("{distribution: q_uniform, min: 0, max: 100, q: 10}").unwrap()),
            ("c".to_string(), p("{distribution: int_uniform, min: 2, max: 4}").unwrap()),
        ];
        let mut seen_c = [false; 3];
        for i in 0..200 {
            let x = random_point(&params, 7, i);
            assert_eq!(x, random_point(&params, 7, i));
            let a = params[0].1.value(x[0]).as_f64().unwrap();
            assert!((1e-4..=1e-2).contains(&a), "{a}");
            let b = params[1].1.value(x[1]).as_f64().unwrap();
            assert!(b % 10.0 == 0.0 && (0.0..=100.0).contains(&b), "{b}");
            let c = params[2].1.value(x[2]).as_i64().unwrap();
            seen_c[(c - 2) as usize] = true;
        }
        assert!(seen_c.iter().all(|&s| s));
        assert_ne!(random_point(&params, 7, 0), random_point(&params, 8, 0));
    }

    #[test]
    fn tpe_concentrates_near_the_optimum() {
        // Objective (x - 3e-3)^2 in log space; TPE after 20 random trials should propose points
        // closer to the optimum than random ones on average.
        let params = vec![("lr".to_string(), p("{distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-1}").unwrap())];
        let f = |x: f64| (x - 3e-3f64.ln()).powi(2);
        let mut obs: Vec<(Vec<Option<f64>>, f64)> = (0..20).map(|i| random_point(&params, 1, i)).map(|x| (vec![Some(x[0])], f(x[0]))).collect();
        let mut rng = Rng::new(5);
        let mut tpe_err = 0.0;
        for _ in 0..30 {
            let x = tpe_point(&params, &obs, &mut rng, 24)[0];
            tpe_err += f(x);
            obs.push((vec![Some(x)], f(x)));
        }
        let rand_err: f64 = (100..130).map(|i| f(random_point(&params, 1, i)[0])).sum();
        assert!(tpe_err < 0.25 * rand_err, "tpe {tpe_err} random {rand_err}");
    }

    #[test]
    fn erfc_matches_known_values() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
        assert!((erfc(1.0) - 0.157_299_207_050_285_1).abs() < 1e-7);
        assert!((erfc(-1.0) - 1.842_700_792_949_715).abs() < 1e-7);
        assert!((phi(1.959_963_985) - 0.975).abs() < 1e-7);
    }
}
