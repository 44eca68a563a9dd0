//! Resolution of points into trials (full configs with identity and accounting), and the
//! `mixscale sweep plan` table.
//!
//! A trial's config is the base architecture file, then the sweep's `set:`, then its grid,
//! ablate and search values, then `train.seed` from the seeds axis, then the `derived:`
//! expressions in file order. Setting one of `train.steps` / `train.tokens` clears the other
//! (a base with `steps: 400` can be swept over `train.tokens`). Expression names: the built-ins
//! `params` (non-embedding parameters, Kaplan's N), `params_total`, `params_embedding`,
//! `params_active`, `flops_per_token` (training FLOPs per token, src/model/count.rs),
//! `flops_per_token_6n`, sweep variables (`vars.budget`) and any numeric config key
//! (`train.batch_size`). Accounting is computed
//! by building the model once per distinct (model, seq_len) on the CPU.

use super::expand::{expand, Point, SearchSlot};
use super::hash::{config_hash, spec_json};
use super::search::random_point;
use super::spec::SweepSpec;
use crate::blocks;
use crate::config::model::ModelSpec;
use crate::config::{RunSpec, YamlDoc};
use crate::error::{Error, Result};
use crate::model::count::Accounting;
use crate::model::LanguageModel;
use serde_yaml_ng::Value;
use std::collections::HashMap;

/// Built-in expression names.
pub const BUILTINS: &[&str] = &["params", "params_total", "params_embedding", "params_active", "flops_per_token", "flops_per_token_6n"];

/// One Optuna parameter of a trial.
#[derive(Clone, Debug)]
pub struct TrialParam {
    pub name: String,
    pub dist: serde_json::Value,
    pub internal: f64,
    pub value: Value,
}

/// A resolved trial.
#[derive(Clone, Debug)]
pub struct Trial {
    /// `<hash>-s<seed>`: identity and run-folder name.
    pub key: String,
    pub hash: String,
    pub seed: u64,
    /// Place in the sweep (`c<cell>[-t<i>]-s<seed>`); identifies TPE trials before sampling.
    pub slot: String,
    pub cell: usize,
    pub spec: RunSpec,
    pub accounting: Accounting,
    pub params: Vec<TrialParam>,
    /// Values set by `derived:`, in order.
    pub derived: Vec<(String, Value)>,
    /// A TPE trial not sampled yet (the config shown is a random stand-in for estimates).
    pub pending: bool,
}

impl Trial {
    pub fn steps(&self) -> usize {
        self.spec.train.total_steps()
    }
    /// Planned training tokens D.
    pub fn tokens(&self) -> u64 {
        self.steps() as u64 * self.spec.train.tokens_per_step()
    }
    /// Planned compute C = flops_per_token · D.
    pub fn compute(&self) -> f64 {
        self.accounting.compute(self.tokens())
    }
}

/// Resolves points; caches accounting per model.
pub struct Planner<'a> {
    pub sweep: &'a SweepSpec,
    base: YamlDoc,
    cache: HashMap<String, Accounting>,
}

/// Sets `key`, clearing the other half of the training budget.
fn set(doc: &mut YamlDoc, key: &str, value: Value, origin: &str) -> Result<()> {
    let other = match key {
        "train.tokens" => Some("train.steps"),
        "train.steps" => Some("train.tokens"),
        _ => None,
    };
    if let Some(o) = other {
        if !value.is_null() {
            doc.set_value(o, Value::Null, origin)?;
        }
    }
    doc.set_value(key, value, origin)
}

/// A config value found at a dotted path.
fn lookup_path<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    let mut v = root;
    for k in path.split('.') {
        v = v.as_mapping()?.get(k)?;
    }
    Some(v)
}

/// A number as a YAML value: integral values become integers (so `train.tokens` and
/// `train.steps` deserialize), others floats.
pub fn number_value(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// Short display of a value for tables.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() => format!("{f}"),
            _ => n.to_string(),
        },
        Value::Null => "null".into(),
        other => serde_json::to_string(&super::search::yaml_to_json(other)).unwrap_or_default(),
    }
}

impl<'a> Planner<'a> {
    pub fn new(sweep: &'a SweepSpec) -> Result<Self> {
        let mut base = YamlDoc::load(&sweep.base)?;
        for (k, v) in &sweep.set {
            set(&mut base, k, v.clone(), &sweep.origin(&["set", k]))?;
        }
        Ok(Self { sweep, base, cache: HashMap::new() })
    }

    fn accounting_of(&mut self, model: &ModelSpec, seq_len: usize) -> Result<Accounting> {
        let key = format!("{}|{seq_len}", serde_json::to_string(model).expect("model serializes"));
        if let Some(a) = self.cache.get(&key) {
            return Ok(a.clone());
        }
        let m = LanguageModel::new(model, seq_len, 0, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let a = Accounting::of(&m, seq_len);
        self.cache.insert(key, a.clone());
        Ok(a)
    }

    /// Accounting of the model described by `doc` so far (for expressions).
    fn accounting_doc(&mut self, doc: &YamlDoc) -> Result<Accounting> {
        let mut model: ModelSpec = doc.deserialize_at(&doc.value["model"], "model")?;
        blocks::resolve_blocks(doc, &mut model)?;
        let seq_len = lookup_path(&doc.value, "train.seq_len").and_then(Value::as_u64).unwrap_or(0) as usize;
        self.accounting_of(&model, seq_len.max(1))
    }

    /// Resolves a point; `search` gives the internal coordinates of its search parameters
    /// (required for pending TPE points).
    pub fn resolve(&mut self, point: &Point, search: Option<&[f64]>) -> Result<Trial> {
        let sw = self.sweep;
        let mut doc = self.base.clone();
        let mut params = Vec::new();
        let mut vars: HashMap<String, Value> = HashMap::new();
        for a in &point.assigns {
            if a.key.starts_with("vars.") {
                vars.insert(a.key.clone(), a.value.clone());
            } else if a.key != "ablate" {
                set(&mut doc, &a.key, a.value.clone(), &a.origin)?;
            }
            params.push(TrialParam { name: a.key.clone(), dist: a.dist.clone(), internal: a.internal, value: a.value.clone() });
        }
        let internal: Option<Vec<f64>> = match (&point.search, search) {
            (_, Some(x)) => Some(x.to_vec()),
            (SearchSlot::Fixed { internal, .. }, None) => Some(internal.clone()),
            (SearchSlot::Pending { index }, None) => {
                let sp = sw.search.as_ref().expect("search");
                Some(random_point(&sp.parameters, sp.seed, *index))
            }
            (SearchSlot::None, None) => None,
        };
        if let (Some(sp), Some(x)) = (&sw.search, &internal) {
            for ((key, p), &xi) in sp.parameters.iter().zip(x) {
                let v = p.value(xi);
                if key.starts_with("vars.") {
                    vars.insert(key.clone(), v.clone());
                } else {
                    set(&mut doc, key, v.clone(), &sw.origin(&["search", "parameters", key]))?;
                }
                let (dist, internal) = p.optuna(&v);
                params.push(TrialParam { name: key.clone(), dist, internal, value: v });
            }
        }
        if let Some(seed) = point.seed {
            doc.set_value("train.seed", Value::from(seed), &sw.origin(&["seeds"]))?;
            let seeds = sw.seeds.as_ref().expect("seeds");
            let choices: Vec<Value> = seeds.iter().map(|&s| Value::from(s)).collect();
            let idx = seeds.iter().position(|&s| s == seed).unwrap_or(0) as f64;
            params.push(TrialParam { name: "seed".into(), dist: super::search::categorical_json(&choices), internal: idx, value: Value::from(seed) });
        }
        let mut derived = Vec::new();
        for d in &sw.derived {
            let mut names = Vec::new();
            d.expr.names(&mut names);
            let acc = if names.iter().any(|n| BUILTINS.contains(&n.as_str())) {
                Some(self.accounting_doc(&doc).map_err(|e| sw.doc.error_keys(&["derived", &d.key], format!("cannot count the model's parameters: {e}")))?)
            } else {
                None
            };
            let value = d
                .expr
                .eval(&mut |n: &str| {
                    if let Some(a) = &acc {
                        match n {
                            "params" => return Ok(a.params_non_embedding as f64),
                            "params_total" => return Ok(a.params_total as f64),
                            "params_embedding" => return Ok(a.params_embedding as f64),
                            "params_active" => return Ok(a.params_active as f64),
                            "flops_per_token" => return Ok(a.flops_per_token),
                            "flops_per_token_6n" => return Ok(a.flops_per_token_6n),
                            _ => {}
                        }
                    }
                    if let Some(v) = vars.get(n) {
                        return v.as_f64().ok_or_else(|| format!("`{n}` is not a number (it is {})", show(v)));
                    }
                    match lookup_path(&doc.value, n) {
                        Some(v) => v.as_f64().ok_or_else(|| format!("`{n}` is not a number (it is {})", show(v))),
                        None => Err(format!("unknown name `{n}`: neither a built-in ({}) nor a config key", BUILTINS.join(", "))),
                    }
                })
                .map_err(|m| sw.doc.error_keys(&["derived", &d.key], format!("`{}`: {m}", d.source)))?;
            let v = number_value(value);
            if d.key.starts_with("vars.") {
                vars.insert(d.key.clone(), v.clone());
            } else {
                set(&mut doc, &d.key, v.clone(), &sw.origin(&["derived", &d.key]))?;
            }
            derived.push((d.key.clone(), v));
        }
        let checked = RunSpec::from_doc(&doc).and_then(|mut spec| blocks::resolve_blocks(&doc, &mut spec.model).map(|_| spec));
        let spec = checked.map_err(|e| match e {
            // Name the sweep values of this trial (errors on keys the sweep set already say so).
            Error::Config { file, line, key_path, message } if !message.contains("(set by ") => {
                let vals: Vec<String> = point.assigns.iter().filter(|a| a.key != "ablate").map(|a| format!("{}={} ({})", a.key, show(&a.value), a.origin)).collect();
                Error::Config { file, line, key_path, message: format!("{message} [sweep trial {}: {}]", point.slot(), vals.join(", ")) }
            }
            other => other,
        })?;
        let accounting = self.accounting_of(&spec.model, spec.train.seq_len)?;
        let hash = config_hash(&spec);
        let seed = spec.train.seed;
        Ok(Trial {
            key: format!("{hash}-s{seed}"),
            hash,
            seed,
            slot: point.slot(),
            cell: point.cell,
            spec,
            accounting,
            params,
            derived,
            pending: search.is_none() && matches!(point.search, SearchSlot::Pending { .. }),
        })
    }
}

/// The expanded sweep.
#[derive(Debug)]
pub struct Plan {
    pub points: Vec<Point>,
    /// One per point (pending TPE trials carry a random stand-in config).
    pub trials: Vec<Trial>,
}

impl Plan {
    /// Expands and resolves every point. Two points with the same identity are an error
    /// (they would share a run folder).
    pub fn build(sweep: &SweepSpec) -> Result<Plan> {
        let points = expand(sweep);
        let mut planner = Planner::new(sweep)?;
        let mut trials = Vec::with_capacity(points.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, p) in points.iter().enumerate() {
            let t = planner.resolve(p, None)?;
            if !t.pending {
                if let Some(j) = seen.insert(t.key.clone(), i) {
                    return Err(sweep.doc.error_keys(
                        &[],
                        format!("trials {j} and {i} resolve to the same config and seed ({}); remove the duplicate values", t.key),
                    ));
                }
            }
            trials.push(t);
        }
        Ok(Plan { points, trials })
    }

    /// Keys whose values differ between trials (params and derived values).
    pub fn varying(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for t in &self.trials {
            for k in t.params.iter().map(|p| &p.name).chain(t.derived.iter().map(|d| &d.0)) {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        keys.retain(|k| {
            let vals: std::collections::BTreeSet<String> = self.trials.iter().map(|t| value_of(t, k)).collect();
            vals.len() > 1
        });
        keys
    }

    /// The `mixscale sweep plan` text.
    pub fn render(&self, sweep: &SweepSpec) -> String {
        let keys = self.varying();
        let mut out = String::new();
        let n = self.trials.len();
        let pending = self.trials.iter().filter(|t| t.pending).count();
        let configs: std::collections::BTreeSet<&str> = self.trials.iter().map(|t| t.hash.as_str()).collect();
        out.push_str(&format!(
            "sweep {}: {n} trials ({} configs{}), base {}, runs/{}/\n",
            sweep.name,
            configs.len(),
            if pending > 0 { format!(", {pending} TPE trials sampled at run time") } else { String::new() },
            sweep.base.display(),
            sweep.name
        ));
        let mut header = vec!["#".to_string(), "trial".to_string()];
        header.extend(keys.iter().cloned());
        header.extend(["N".into(), "N_total".into(), "steps".into(), "D".into(), "C".into()]);
        let mut rows = vec![header];
        for (i, t) in self.trials.iter().enumerate() {
            let mut r = vec![i.to_string(), if t.pending { format!("(tpe {})", t.slot) } else { t.key.clone() }];
            r.extend(keys.iter().map(|k| if t.pending && self.is_search_key(sweep, k) { "?".into() } else { value_of(t, k) }));
            r.extend([
                t.accounting.params_non_embedding.to_string(),
                t.accounting.params_total.to_string(),
                t.steps().to_string(),
                t.tokens().to_string(),
                format!("{:.3e}", t.compute()),
            ]);
            rows.push(r);
        }
        out.push_str(&table(&rows));
        let c: f64 = self.trials.iter().map(Trial::compute).sum();
        let c6: f64 = self.trials.iter().map(|t| 6.0 * t.accounting.params_non_embedding as f64 * t.tokens() as f64).sum();
        let d: u64 = self.trials.iter().map(Trial::tokens).sum();
        out.push_str(&format!("total: {n} trials, {d} tokens, C = {c:.4e} FLOPs (flops_per_token·D; 6·N·D = {c6:.4e})\n"));
        out
    }

    fn is_search_key(&self, sweep: &SweepSpec, k: &str) -> bool {
        sweep.search.as_ref().is_some_and(|s| s.parameters.iter().any(|(p, _)| p == k)) || sweep.derived.iter().any(|d| d.key == k)
    }
}

/// The display value of key `k` in a trial ("" when the trial does not set it).
pub fn value_of(t: &Trial, k: &str) -> String {
    t.params
        .iter()
        .find(|p| p.name == k)
        .map(|p| show(&p.value))
        .or_else(|| t.derived.iter().find(|d| d.0 == k).map(|d| show(&d.1)))
        .unwrap_or_default()
}

/// Left-aligned text table.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(c, s)| format!("{s:<w$}", w = widths[c])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Canonical config JSON of a trial (recorded in the run folder as `trial.json`).
pub fn trial_config_json(t: &Trial) -> String {
    spec_json(&t.spec)
}
