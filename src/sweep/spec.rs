//! Sweep definition files (`sweeps/*.yaml`): parsing and checking.
//!
//! Schema (`../shared/reference/sweeps-storage-tracking.md` §3: W&B's parameter vocabulary,
//! Hydra-style dotted keys, named zip groups, MAD-style `ablate`):
//! ```yaml
//! name: quickstart                   # runs/<name>/
//! base: ../architectures/attention.yaml  # relative to this file
//! set: {train.steps: 100}            # dotted overrides of the base
//! grid:                              # Cartesian product over entries
//!   train.optimizer.lr: [1.0e-3, 3.0e-3]        # a list is shorthand for {values: [...]}
//!   size:                                        # a named zip group: entries advance together
//!     zip: {model.d_model: [32, 64], model.n_layers: [2, 4]}
//! ablate: {train.schedule.kind: [constant]}     # one factor at a time, around the base
//! search: {method: tpe, n_trials: 8, parameters: {train.optimizer.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}}}
//! derived: {train.tokens: 20 * params}          # expressions (src/sweep/expr.rs), in order
//! seeds: [0, 1]
//! early_terminate: {type: asha, min_iter: 50, eta: 3}
//! devices: [cpu]                     # or [cuda:0, cuda:1]
//! trials_per_device: 1
//! max_retries: 2
//! analysis: {...}                    # passed to the fit/plot layer
//! ```
//! Trial set = grid × (base ∪ ablate variants) × search trials × seeds.
//!
//! Keys are config paths (`model.…`, `train.…`, `data.…`) or sweep variables `vars.<name>`:
//! variables are not part of the config; they are recorded as trial params and usable in
//! `derived:` expressions (e.g. an IsoFLOP budget `vars.budget` with
//! `train.tokens: vars.budget / flops_per_token`).

use super::early_stop::EarlyTerminate;
use super::search::{ParamSpec, SearchMethod};
use super::expr::{self, Expr};
use crate::config::YamlDoc;
use crate::error::Result;
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};
use std::path::{Path, PathBuf};

/// One grid entry: a single key, or a named zip group of keys advancing together.
#[derive(Clone, Debug)]
pub struct Axis {
    /// The key itself, or the zip group's name.
    pub name: String,
    /// Keys set by this axis (one unless zipped).
    pub keys: Vec<String>,
    /// `rows[i][k]` is the value of `keys[k]` at position `i` of the axis.
    pub rows: Vec<Vec<Value>>,
}

/// `search:` — a searched subspace, run in every grid cell.
#[derive(Clone, Debug)]
pub struct SearchSpec {
    pub method: SearchMethod,
    pub n_trials: usize,
    pub seed: u64,
    /// TPE: random trials before the model is used (Optuna's `n_startup_trials`, default 10).
    pub n_startup_trials: usize,
    /// TPE: candidates drawn from l(x) per parameter (Optuna's `n_ei_candidates`, default 24).
    pub n_ei_candidates: usize,
    pub parameters: Vec<(String, ParamSpec)>,
}

/// A derived value: `key: expression`.
#[derive(Clone, Debug)]
pub struct Derived {
    pub key: String,
    pub source: String,
    pub expr: Expr,
}

/// A checked sweep file.
#[derive(Clone, Debug)]
pub struct SweepSpec {
    /// The sweep file (for located errors and the `analysis:` section).
    pub doc: YamlDoc,
    pub name: String,
    /// The base architecture file (resolved against the sweep file's folder).
    pub base: PathBuf,
    pub set: Vec<(String, Value)>,
    pub grid: Vec<Axis>,
    pub ablate: Vec<(String, Vec<Value>)>,
    pub search: Option<SearchSpec>,
    pub derived: Vec<Derived>,
    /// Seeds axis; `None` keeps the base's `train.seed`.
    pub seeds: Option<Vec<u64>>,
    pub early_terminate: Option<EarlyTerminate>,
    pub devices: Vec<String>,
    pub trials_per_device: usize,
    pub max_retries: usize,
    /// Seconds between heartbeats of a running trial.
    pub heartbeat_s: f64,
    /// A RUNNING trial whose heartbeat is older than this is re-queued (other hosts; on the
    /// same host a dead runner process is detected at once).
    pub stale_after_s: f64,
    pub analysis: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    base: String,
    #[serde(default)]
    set: Mapping,
    #[serde(default)]
    grid: Mapping,
    #[serde(default)]
    ablate: Mapping,
    #[serde(default)]
    search: Option<Value>,
    #[serde(default)]
    derived: Mapping,
    #[serde(default)]
    seeds: Option<Vec<u64>>,
    #[serde(default)]
    early_terminate: Option<EarlyTerminate>,
    #[serde(default = "default_devices")]
    devices: Vec<String>,
    #[serde(default = "one")]
    trials_per_device: usize,
    #[serde(default = "two")]
    max_retries: usize,
    #[serde(default = "default_heartbeat")]
    heartbeat_s: f64,
    #[serde(default = "default_stale")]
    stale_after_s: f64,
    #[serde(default)]
    analysis: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSearch {
    method: SearchMethod,
    n_trials: usize,
    #[serde(default)]
    seed: u64,
    #[serde(default = "ten")]
    n_startup_trials: usize,
    #[serde(default = "twenty_four")]
    n_ei_candidates: usize,
    parameters: Mapping,
}

fn default_devices() -> Vec<String> {
    vec!["cpu".into()]
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn ten() -> usize {
    10
}
fn twenty_four() -> usize {
    24
}
fn default_heartbeat() -> f64 {
    5.0
}
fn default_stale() -> f64 {
    120.0
}

/// A mapping key as a string (YAML allows other scalars as keys; we do not).
fn key_str(doc: &YamlDoc, section: &str, k: &Value) -> Result<String> {
    match k {
        Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
        other => Err(doc.error_keys(&[section], format!("keys must be dotted config paths (strings); got {other:?}"))),
    }
}

/// The values list of an axis entry: a list, or `{values: [...]}`.
fn values_of(doc: &YamlDoc, path: &[&str], v: &Value) -> Result<Vec<Value>> {
    let list = match v {
        Value::Sequence(s) => s.clone(),
        Value::Mapping(m) if m.len() == 1 && m.contains_key("values") => match &m["values"] {
            Value::Sequence(s) => s.clone(),
            _ => return Err(doc.error_keys(path, "`values` must be a list")),
        },
        _ => return Err(doc.error_keys(path, "expected a list of values, `{values: [...]}` or a zip group `{zip: {key: [...], ...}}`")),
    };
    if list.is_empty() {
        return Err(doc.error_keys(path, "the list of values is empty"));
    }
    Ok(list)
}

fn check_key(doc: &YamlDoc, path: &[&str], key: &str) -> Result<()> {
    let ok_root = ["model", "train", "data"].iter().any(|r| key == *r || key.starts_with(&format!("{r}.")));
    let var = key.strip_prefix("vars.").is_some_and(|v| !v.is_empty() && !v.contains('.'));
    if !ok_root && !var {
        return Err(doc.error_keys(
            path,
            format!("`{key}` is not a config key path (it must start with model., train. or data.; sweep variables are vars.<name>)"),
        ));
    }
    Ok(())
}

impl SweepSpec {
    /// Reads and checks a sweep file (the base architecture is only located here; trials are
    /// resolved by [`super::plan`]).
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_doc(YamlDoc::load(path)?)
    }

    pub fn from_doc(doc: YamlDoc) -> Result<Self> {
        let raw: Raw = doc.deserialize()?;
        if raw.name.is_empty() || !raw.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || raw.name.starts_with('.') {
            return Err(doc.error_keys(&["name"], "must be non-empty and use only letters, digits, `-`, `_` and `.` (it names the folder runs/<name>)"));
        }
        let dir = doc.file.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = dir.join(&raw.base);
        if !base.is_file() {
            return Err(doc.error_keys(&["base"], format!("architecture file {} not found (paths are relative to the sweep file)", base.display())));
        }
        let mut set = Vec::new();
        for (k, v) in &raw.set {
            let key = key_str(&doc, "set", k)?;
            check_key(&doc, &["set", &key], &key)?;
            set.push((key, v.clone()));
        }
        let mut grid = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        for (k, v) in &raw.grid {
            let name = key_str(&doc, "grid", k)?;
            let zip = match v {
                Value::Mapping(m) if m.contains_key("zip") => Some(m),
                _ => None,
            };
            let axis = if let Some(m) = zip {
                if m.len() != 1 {
                    return Err(doc.error_keys(&["grid", &name], "a zip group has only the `zip:` key"));
                }
                let Value::Mapping(z) = &m["zip"] else {
                    return Err(doc.error_keys(&["grid", &name, "zip"], "expected a mapping of keys to equally long lists"));
                };
                let mut keys = Vec::new();
                let mut cols = Vec::new();
                for (zk, zv) in z {
                    let key = key_str(&doc, "grid", zk)?;
                    check_key(&doc, &["grid", &name, "zip", &key], &key)?;
                    cols.push(values_of(&doc, &["grid", &name, "zip", &key], zv)?);
                    keys.push(key);
                }
                if keys.is_empty() {
                    return Err(doc.error_keys(&["grid", &name, "zip"], "a zip group needs at least one key"));
                }
                let n = cols[0].len();
                for (key, c) in keys.iter().zip(&cols) {
                    if c.len() != n {
                        return Err(doc.error_keys(
                            &["grid", &name, "zip", key],
                            format!("zip lists must be equally long: `{}` has {n} values, `{key}` has {}", keys[0], c.len()),
                        ));
                    }
                }
                let rows = (0..n).map(|i| cols.iter().map(|c| c[i].clone()).collect()).collect();
                Axis { name: name.clone(), keys, rows }
            } else {
                check_key(&doc, &["grid", &name], &name)?;
                let vals = values_of(&doc, &["grid", &name], v)?;
                Axis { name: name.clone(), keys: vec![name.clone()], rows: vals.into_iter().map(|v| vec![v]).collect() }
            };
            for key in &axis.keys {
                if seen.contains(key) {
                    return Err(doc.error_keys(&["grid", &name], format!("`{key}` appears in two grid axes")));
                }
                seen.push(key.clone());
            }
            grid.push(axis);
        }
        let mut ablate = Vec::new();
        for (k, v) in &raw.ablate {
            let key = key_str(&doc, "ablate", k)?;
            check_key(&doc, &["ablate", &key], &key)?;
            if seen.contains(&key) {
                return Err(doc.error_keys(&["ablate", &key], "this key is also a grid axis; ablate keys vary one at a time around the base"));
            }
            ablate.push((key.clone(), values_of(&doc, &["ablate", &key], v)?));
        }
        let search = match &raw.search {
            None => None,
            Some(v) => {
                let rs: RawSearch = doc.deserialize_at(v, "search")?;
                if rs.n_trials == 0 {
                    return Err(doc.error_keys(&["search", "n_trials"], "must be at least 1"));
                }
                let mut parameters = Vec::new();
                for (k, pv) in &rs.parameters {
                    let key = key_str(&doc, "search", k)?;
                    let path = ["search", "parameters", key.as_str()];
                    check_key(&doc, &path, &key)?;
                    if seen.contains(&key) || ablate.iter().any(|(a, _)| *a == key) {
                        return Err(doc.error_keys(&path, "this key is also a grid or ablate axis"));
                    }
                    let p = ParamSpec::parse(pv).map_err(|m| doc.error_keys(&path, m))?;
                    parameters.push((key, p));
                }
                if parameters.is_empty() {
                    return Err(doc.error_keys(&["search", "parameters"], "name at least one parameter"));
                }
                Some(SearchSpec {
                    method: rs.method,
                    n_trials: rs.n_trials,
                    seed: rs.seed,
                    n_startup_trials: rs.n_startup_trials,
                    n_ei_candidates: rs.n_ei_candidates.max(1),
                    parameters,
                })
            }
        };
        let mut derived = Vec::new();
        for (k, v) in &raw.derived {
            let key = key_str(&doc, "derived", k)?;
            check_key(&doc, &["derived", &key], &key)?;
            let source = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err(doc.error_keys(&["derived", &key], "expected an expression, e.g. `20 * params`")),
            };
            let e = expr::parse(&source).map_err(|m| doc.error_keys(&["derived", &key], format!("`{source}`: {m}")))?;
            derived.push(Derived { key, source, expr: e });
        }
        if let Some(s) = &raw.seeds {
            if s.is_empty() {
                return Err(doc.error_keys(&["seeds"], "list at least one seed (or leave `seeds` out)"));
            }
            let mut u = s.clone();
            u.sort();
            u.dedup();
            if u.len() != s.len() {
                return Err(doc.error_keys(&["seeds"], "seeds repeat"));
            }
        }
        if let Some(et) = &raw.early_terminate {
            et.check().map_err(|m| doc.error_keys(&["early_terminate"], m))?;
        }
        if raw.devices.is_empty() {
            return Err(doc.error_keys(&["devices"], "list at least one device (cpu, cuda:0, ...)"));
        }
        for (i, d) in raw.devices.iter().enumerate() {
            let ok = d == "cpu" || d == "cuda" || d.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
            if !ok {
                return Err(doc.error_keys(&["devices", &format!("[{i}]")], format!("`{d}`: expected cpu, cuda or cuda:N")));
            }
        }
        if let Some(a) = &raw.analysis {
            super::analysis_hook::check_value(&doc, a)?;
        }
        if raw.trials_per_device == 0 {
            return Err(doc.error_keys(&["trials_per_device"], "must be at least 1"));
        }
        if !(raw.heartbeat_s > 0.0) || !(raw.stale_after_s > raw.heartbeat_s) {
            return Err(doc.error_keys(&["stale_after_s"], "need heartbeat_s > 0 and stale_after_s > heartbeat_s"));
        }
        Ok(SweepSpec {
            name: raw.name,
            base,
            set,
            grid,
            ablate,
            search,
            derived,
            seeds: raw.seeds,
            early_terminate: raw.early_terminate,
            devices: raw.devices,
            trials_per_device: raw.trials_per_device,
            max_retries: raw.max_retries,
            heartbeat_s: raw.heartbeat_s,
            stale_after_s: raw.stale_after_s,
            analysis: raw.analysis,
            doc,
        })
    }

    /// `file:line key.path` of an entry, for "set by" origins in trial errors.
    pub fn origin(&self, keys: &[&str]) -> String {
        let path = keys.join(".");
        match line_of(&self.doc, keys) {
            Some(l) => format!("{}:{l} {path}", self.doc.file.display()),
            None => format!("{} {path}", self.doc.file.display()),
        }
    }
}

/// Line of literal keys `keys` in the sweep file.
pub fn line_of(doc: &YamlDoc, keys: &[&str]) -> Option<usize> {
    match doc.error_keys(keys, "") {
        crate::error::Error::Config { line, .. } => line,
        _ => None,
    }
}
