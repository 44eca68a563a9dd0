//! The journal's operations, one JSON object per line, with the op codes and fields of optuna
//! 5.0's `JournalStorage` (`optuna/storages/journal/_storage.py`, `JournalOperation`), encoded
//! byte for byte as Python's `json.dumps(log, separators=(",", ":"))` writes them.

use super::dist::{Distribution, ParsedDist};
use super::pyjson::{self, Obj, Style};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// optuna's `TrialState` (the integer in the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TrialState {
    Running = 0,
    Complete = 1,
    Pruned = 2,
    Fail = 3,
    Waiting = 4,
}

impl TrialState {
    pub fn from_code(c: i64) -> Option<Self> {
        Some(match c {
            0 => TrialState::Running,
            1 => TrialState::Complete,
            2 => TrialState::Pruned,
            3 => TrialState::Fail,
            4 => TrialState::Waiting,
            _ => return None,
        })
    }
    /// Complete, pruned or failed: no op changes such a trial any more.
    pub fn is_finished(self) -> bool {
        matches!(self, TrialState::Complete | TrialState::Pruned | TrialState::Fail)
    }
    /// optuna's name: `RUNNING`, `COMPLETE`, `PRUNED`, `FAIL`, `WAITING`.
    pub fn name(self) -> &'static str {
        match self {
            TrialState::Running => "RUNNING",
            TrialState::Complete => "COMPLETE",
            TrialState::Pruned => "PRUNED",
            TrialState::Fail => "FAIL",
            TrialState::Waiting => "WAITING",
        }
    }
}

/// optuna's `StudyDirection` (the integer in the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    NotSet = 0,
    Minimize = 1,
    Maximize = 2,
}

impl Direction {
    pub fn from_code(c: i64) -> Option<Self> {
        Some(match c {
            0 => Direction::NotSet,
            1 => Direction::Minimize,
            2 => Direction::Maximize,
            _ => return None,
        })
    }
}

/// One journal operation. Ids are those replay assigns (see [`super::Replay`]). Params are
/// stored as optuna stores them: the *internal* float (`Distribution::to_internal`; the index of
/// a categorical choice) and the distribution. Datetimes are ISO-8601 strings; `None` where the
/// op needs one means "now" when it is written.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Code 0. A name that already exists is ignored by replay.
    CreateStudy { study_name: String, directions: Vec<Direction> },
    /// Code 1. The study disappears; its trials keep their ids.
    DeleteStudy { study_id: u64 },
    /// Code 2 (one key per op, as optuna asserts).
    SetStudyUserAttr { study_id: u64, key: String, value: Value },
    /// Code 3.
    SetStudySystemAttr { study_id: u64, key: String, value: Value },
    /// Code 4. With only `study_id` and `datetime_start` set (and `state: None`) this is the
    /// plain op `create_new_trial` writes (a RUNNING trial). Anything else is written in the
    /// template form (`state` defaults to RUNNING): `enqueue_trial` uses it with
    /// `state: Some(Waiting)` and `system_attrs["fixed_params"]`.
    CreateTrial {
        study_id: u64,
        datetime_start: Option<String>,
        state: Option<TrialState>,
        values: Option<Vec<f64>>,
        datetime_complete: Option<String>,
        /// name → (internal value, distribution).
        params: BTreeMap<String, (f64, Distribution)>,
        user_attrs: BTreeMap<String, Value>,
        system_attrs: BTreeMap<String, Value>,
        intermediate_values: BTreeMap<u64, f64>,
    },
    /// Code 5.
    SetTrialParam { trial_id: u64, param_name: String, value_internal: f64, distribution: Distribution },
    /// Code 6. `values` stays unchanged when `None`. `datetime` is written as `datetime_start`
    /// for RUNNING, as `datetime_complete` for a finished state, not at all for WAITING.
    SetTrialStateValues { trial_id: u64, state: TrialState, values: Option<Vec<f64>>, datetime: Option<String> },
    /// Code 7.
    SetTrialIntermediateValue { trial_id: u64, step: u64, value: f64 },
    /// Code 8.
    SetTrialUserAttr { trial_id: u64, key: String, value: Value },
    /// Code 9.
    SetTrialSystemAttr { trial_id: u64, key: String, value: Value },
    /// Code 10, written only by Rustuna; optuna 5.0 (and this replay) skip it.
    DiscardTrials { trial_ids: Vec<u64> },
}

impl Op {
    /// A plain CREATE_TRIAL (a RUNNING trial starting now), as `create_new_trial` writes.
    pub fn create_trial(study_id: u64) -> Op {
        Op::CreateTrial {
            study_id,
            datetime_start: Some(pyjson::now_iso()),
            state: None,
            values: None,
            datetime_complete: None,
            params: BTreeMap::new(),
            user_attrs: BTreeMap::new(),
            system_attrs: BTreeMap::new(),
            intermediate_values: BTreeMap::new(),
        }
    }

    /// SET_TRIAL_PARAM from the value a trial shows (`external`), converted as optuna's
    /// `to_internal_repr`; the distribution is validated and normalized as optuna's constructor.
    pub fn set_param(trial_id: u64, name: &str, external: &Value, distribution: &Distribution) -> Result<Op, String> {
        let distribution = distribution.normalized()?;
        let value_internal = distribution.to_internal(external).map_err(|e| format!("param `{name}`: {e}"))?;
        Ok(Op::SetTrialParam { trial_id, param_name: name.to_string(), value_internal, distribution })
    }

    /// SET_TRIAL_STATE_VALUES stamped now.
    pub fn set_state(trial_id: u64, state: TrialState, values: Option<Vec<f64>>) -> Op {
        Op::SetTrialStateValues { trial_id, state, values, datetime: None }
    }

    pub fn code(&self) -> i64 {
        match self {
            Op::CreateStudy { .. } => 0,
            Op::DeleteStudy { .. } => 1,
            Op::SetStudyUserAttr { .. } => 2,
            Op::SetStudySystemAttr { .. } => 3,
            Op::CreateTrial { .. } => 4,
            Op::SetTrialParam { .. } => 5,
            Op::SetTrialStateValues { .. } => 6,
            Op::SetTrialIntermediateValue { .. } => 7,
            Op::SetTrialUserAttr { .. } => 8,
            Op::SetTrialSystemAttr { .. } => 9,
            Op::DiscardTrials { .. } => 10,
        }
    }

    /// The line (without `\n`) with the fields in the order optuna writes them.
    pub fn encode(&self, worker_id: &str) -> Result<String, String> {
        let mut o = Obj::new(Style::Compact);
        o.int("op_code", self.code()).str("worker_id", worker_id);
        let attr = |key: &str, value: &Value| {
            let mut a = Obj::new(Style::Compact);
            a.value(key, value);
            a.finish()
        };
        match self {
            Op::CreateStudy { study_name, directions } => {
                let d: Vec<String> = directions.iter().map(|d| (*d as i64).to_string()).collect();
                o.str("study_name", study_name).raw("directions", &format!("[{}]", d.join(",")));
            }
            Op::DeleteStudy { study_id } => {
                o.int("study_id", *study_id as i64);
            }
            Op::SetStudyUserAttr { study_id, key, value } => {
                o.int("study_id", *study_id as i64).raw("user_attr", &attr(key, value));
            }
            Op::SetStudySystemAttr { study_id, key, value } => {
                o.int("study_id", *study_id as i64).raw("system_attr", &attr(key, value));
            }
            Op::CreateTrial { study_id, datetime_start, state, values, datetime_complete, params, user_attrs, system_attrs, intermediate_values } => {
                o.int("study_id", *study_id as i64).opt_str("datetime_start", datetime_start.as_deref());
                let template = state.is_some()
                    || values.is_some()
                    || datetime_complete.is_some()
                    || !params.is_empty()
                    || !user_attrs.is_empty()
                    || !system_attrs.is_empty()
                    || !intermediate_values.is_empty();
                if template {
                    o.int("state", state.unwrap_or(TrialState::Running) as i64);
                    // optuna: one objective → "value", several → "values".
                    match values.as_deref() {
                        Some(v) if v.len() > 1 => o.raw("value", "null").floats("values", Some(v)),
                        Some([v]) => o.float("value", *v).raw("values", "null"),
                        _ => o.raw("value", "null").raw("values", "null"),
                    };
                    if let Some(dc) = datetime_complete {
                        o.str("datetime_complete", dc);
                    }
                    let mut dists = Obj::new(Style::Compact);
                    let mut internal = Obj::new(Style::Compact);
                    for (name, (x, d)) in params {
                        let d = d.normalized().map_err(|e| format!("param `{name}`: {e}"))?;
                        d.to_external(*x).map_err(|e| format!("param `{name}`: {e}"))?;
                        dists.str(name, &d.to_json());
                        internal.raw(name, &internal_repr(*x, &d));
                    }
                    o.raw("distributions", &dists.finish()).raw("params", &internal.finish());
                    o.value("user_attrs", &Value::Object(user_attrs.clone().into_iter().collect()));
                    o.value("system_attrs", &Value::Object(system_attrs.clone().into_iter().collect()));
                    let mut iv = Obj::new(Style::Compact);
                    for (step, v) in intermediate_values {
                        iv.float(&step.to_string(), *v);
                    }
                    o.raw("intermediate_values", &iv.finish());
                }
            }
            Op::SetTrialParam { trial_id, param_name, value_internal, distribution } => {
                let d = distribution.normalized().map_err(|e| format!("param `{param_name}`: {e}"))?;
                d.to_external(*value_internal).map_err(|e| format!("param `{param_name}`: {e}"))?;
                o.int("trial_id", *trial_id as i64)
                    .str("param_name", param_name)
                    .raw("param_value_internal", &internal_repr(*value_internal, &d))
                    .str("distribution", &d.to_json());
            }
            Op::SetTrialStateValues { trial_id, state, values, datetime } => {
                o.int("trial_id", *trial_id as i64).int("state", *state as i64).floats("values", values.as_deref());
                let now = || datetime.clone().unwrap_or_else(pyjson::now_iso);
                if *state == TrialState::Running {
                    o.str("datetime_start", &now());
                } else if state.is_finished() {
                    o.str("datetime_complete", &now());
                }
            }
            Op::SetTrialIntermediateValue { trial_id, step, value } => {
                o.int("trial_id", *trial_id as i64).int("step", *step as i64).float("intermediate_value", *value);
            }
            Op::SetTrialUserAttr { trial_id, key, value } => {
                o.int("trial_id", *trial_id as i64).raw("user_attr", &attr(key, value));
            }
            Op::SetTrialSystemAttr { trial_id, key, value } => {
                o.int("trial_id", *trial_id as i64).raw("system_attr", &attr(key, value));
            }
            Op::DiscardTrials { trial_ids } => {
                o.value("trial_ids", &Value::from(trial_ids.clone()));
            }
        }
        Ok(o.finish())
    }
}

/// The internal value as optuna writes it: `to_internal_repr` returns the choice's index (a
/// Python int) for a categorical and a float otherwise.
fn internal_repr(x: f64, d: &Distribution) -> String {
    match d {
        Distribution::Categorical { .. } if x.fract() == 0.0 && x.abs() < 9e15 => format!("{}", x as i64),
        _ => pyjson::float_repr(x),
    }
}

/// A decoded line: the op (with its distributions' optuna class names, which the replay's
/// compatibility check compares) and the writer's id.
pub struct Decoded {
    pub worker_id: String,
    pub op: Op,
    /// For CreateTrial/SetTrialParam: param name → class name as written.
    pub classes: BTreeMap<String, String>,
}

fn field<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a Value, String> {
    m.get(k).ok_or_else(|| format!("missing field `{k}`"))
}

fn uint(m: &Map<String, Value>, k: &str) -> Result<u64, String> {
    field(m, k)?.as_u64().ok_or_else(|| format!("`{k}` is not a non-negative integer"))
}

fn float(v: &Value, what: &str) -> Result<f64, String> {
    pyjson::f64_of(v).ok_or_else(|| format!("`{what}` is not a number: {v}"))
}

fn floats(v: &Value, what: &str) -> Result<Option<Vec<f64>>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Array(a) => a.iter().map(|x| float(x, what)).collect::<Result<Vec<_>, _>>().map(Some),
        _ => Err(format!("`{what}` is not a list or null")),
    }
}

fn opt_str(v: Option<&Value>, k: &str) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(x) => Err(format!("`{k}` is not a string: {x}")),
    }
}

fn attrs(m: &Map<String, Value>, k: &str) -> Result<BTreeMap<String, Value>, String> {
    match m.get(k) {
        None => Ok(BTreeMap::new()),
        Some(Value::Object(o)) => Ok(o.iter().map(|(k, v)| (k.clone(), pyjson::clean(v.clone()))).collect()),
        Some(x) => Err(format!("`{k}` is not an object: {x}")),
    }
}

/// A one-key attribute (optuna asserts `len(attr) == 1`).
fn one_attr(m: &Map<String, Value>, k: &str) -> Result<(String, Value), String> {
    let a = attrs(m, k)?;
    if !m.contains_key(k) || a.len() != 1 {
        return Err(format!("`{k}` must have exactly one key (optuna asserts this)"));
    }
    Ok(a.into_iter().next().expect("one"))
}

fn state(v: &Value) -> Result<TrialState, String> {
    v.as_i64().and_then(TrialState::from_code).ok_or_else(|| format!("invalid trial state {v}"))
}

fn datetime(m: &Map<String, Value>, k: &str) -> Result<String, String> {
    opt_str(Some(field(m, k)?), k)?.ok_or_else(|| format!("`{k}` is null"))
}

/// Parses one line as optuna's replay reads it (a field optuna indexes with `log[...]` is
/// required; one it reads with `log.get` is optional).
pub fn decode(line: &str) -> Result<Decoded, String> {
    decode_value(&pyjson::parse(line)?)
}

/// [`decode`] of an already parsed line.
pub fn decode_value(v: &Value) -> Result<Decoded, String> {
    let m = v.as_object().ok_or("not a JSON object")?;
    let code = field(m, "op_code")?.as_i64().ok_or("`op_code` is not an integer")?;
    let worker_id = match m.get("worker_id") {
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
        None => return Err("missing field `worker_id`".into()),
    };
    let mut classes = BTreeMap::new();
    let op = match code {
        0 => {
            let name = field(m, "study_name")?.as_str().ok_or("`study_name` is not a string")?.to_string();
            let dirs = field(m, "directions")?.as_array().ok_or("`directions` is not a list")?;
            let directions = dirs
                .iter()
                .map(|d| d.as_i64().and_then(Direction::from_code).ok_or_else(|| format!("invalid direction {d}")))
                .collect::<Result<_, _>>()?;
            Op::CreateStudy { study_name: name, directions }
        }
        1 => Op::DeleteStudy { study_id: uint(m, "study_id")? },
        2 | 3 => {
            let k = if code == 2 { "user_attr" } else { "system_attr" };
            let (key, value) = one_attr(m, k)?;
            let study_id = uint(m, "study_id")?;
            if code == 2 { Op::SetStudyUserAttr { study_id, key, value } } else { Op::SetStudySystemAttr { study_id, key, value } }
        }
        4 => {
            let study_id = uint(m, "study_id")?;
            let datetime_start = opt_str(Some(field(m, "datetime_start")?), "datetime_start")?;
            let mut dists: BTreeMap<String, ParsedDist> = BTreeMap::new();
            if let Some(d) = m.get("distributions") {
                for (k, s) in d.as_object().ok_or("`distributions` is not an object")? {
                    let s = s.as_str().ok_or_else(|| format!("distribution of `{k}` is not a string"))?;
                    dists.insert(k.clone(), Distribution::parse(s)?);
                }
            }
            let mut params = BTreeMap::new();
            if let Some(p) = m.get("params") {
                for (k, x) in p.as_object().ok_or("`params` is not an object")? {
                    let d = dists.get(k).ok_or_else(|| format!("param `{k}` has no distribution"))?;
                    let x = float(x, k)?;
                    d.dist.to_external(x).map_err(|e| format!("param `{k}`: {e}"))?;
                    classes.insert(k.clone(), d.class.clone());
                    params.insert(k.clone(), (x, d.dist.clone()));
                }
            }
            let value = match m.get("value") {
                None | Some(Value::Null) => None,
                Some(x) => Some(float(x, "value")?),
            };
            let values = match m.get("values") {
                None => None,
                Some(x) => floats(x, "values")?,
            };
            let values = match (value, values) {
                (Some(_), Some(_)) => return Err("both `value` and `values` are set (optuna: specify only one)".into()),
                (Some(v), None) => Some(vec![v]),
                (None, v) => v,
            };
            let mut intermediate_values = BTreeMap::new();
            if let Some(iv) = m.get("intermediate_values") {
                for (k, x) in iv.as_object().ok_or("`intermediate_values` is not an object")? {
                    let step: u64 = k.trim().parse().map_err(|_| format!("intermediate step `{k}` is not a non-negative integer"))?;
                    intermediate_values.insert(step, float(x, "intermediate_values")?);
                }
            }
            let state = match m.get("state") {
                None => None,
                Some(s) => Some(state(s)?),
            };
            let datetime_complete = match m.get("datetime_complete") {
                None => None,
                Some(_) => Some(datetime(m, "datetime_complete")?),
            };
            Op::CreateTrial {
                study_id,
                datetime_start,
                state,
                values,
                datetime_complete,
                params,
                user_attrs: attrs(m, "user_attrs")?,
                system_attrs: attrs(m, "system_attrs")?,
                intermediate_values,
            }
        }
        5 => {
            let name = field(m, "param_name")?.as_str().ok_or("`param_name` is not a string")?.to_string();
            let d = Distribution::parse(field(m, "distribution")?.as_str().ok_or("`distribution` is not a string")?)?;
            let x = float(field(m, "param_value_internal")?, "param_value_internal")?;
            d.dist.to_external(x).map_err(|e| format!("param `{name}`: {e}"))?;
            classes.insert(name.clone(), d.class);
            Op::SetTrialParam { trial_id: uint(m, "trial_id")?, param_name: name, value_internal: x, distribution: d.dist }
        }
        6 => {
            let st = state(field(m, "state")?)?;
            let dt = match st {
                TrialState::Running => Some(datetime(m, "datetime_start")?),
                s if s.is_finished() => Some(datetime(m, "datetime_complete")?),
                _ => None,
            };
            Op::SetTrialStateValues { trial_id: uint(m, "trial_id")?, state: st, values: floats(field(m, "values")?, "values")?, datetime: dt }
        }
        7 => {
            let step = field(m, "step")?.as_u64().ok_or("`step` is not a non-negative integer")?;
            Op::SetTrialIntermediateValue { trial_id: uint(m, "trial_id")?, step, value: float(field(m, "intermediate_value")?, "intermediate_value")? }
        }
        8 | 9 => {
            let k = if code == 8 { "user_attr" } else { "system_attr" };
            let (key, value) = one_attr(m, k)?;
            let trial_id = uint(m, "trial_id")?;
            if code == 8 { Op::SetTrialUserAttr { trial_id, key, value } } else { Op::SetTrialSystemAttr { trial_id, key, value } }
        }
        10 => Op::DiscardTrials {
            trial_ids: match m.get("trial_ids") {
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
                _ => Vec::new(),
            },
        },
        c => return Err(format!("unknown op_code {c} (optuna 5.0 knows 0..=10)")),
    };
    Ok(Decoded { worker_id, op, classes })
}
