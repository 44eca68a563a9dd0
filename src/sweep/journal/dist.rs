//! Optuna's parameter distributions as the journal stores them: a JSON *string*
//! (`distribution_to_json`) beside an internal float (`to_internal_repr`; a categorical stores
//! the index of the choice). Parsing follows `json_to_distribution` of optuna 5.0
//! (`optuna/distributions.py`), including the pre-3.0 class names and the abbreviated
//! `{"type": ...}` form, and the same validation and `high` adjustment as the constructors.

use super::pyjson::{self, Obj, Style};
use serde_json::Value;

/// A search-space distribution (optuna's `FloatDistribution`, `IntDistribution`,
/// `CategoricalDistribution`).
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    Float { low: f64, high: f64, log: bool, step: Option<f64> },
    Int { low: i64, high: i64, log: bool, step: i64 },
    Categorical { choices: Vec<Value> },
}

/// A parsed distribution and the optuna class name it was written with (the pre-3.0 names
/// `UniformDistribution`, `IntUniformDistribution`, … map onto Float/Int but are different
/// classes for optuna's compatibility check).
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedDist {
    pub dist: Distribution,
    pub class: String,
}

impl Distribution {
    /// Optuna's class name.
    pub fn class(&self) -> &'static str {
        match self {
            Distribution::Float { .. } => "FloatDistribution",
            Distribution::Int { .. } => "IntDistribution",
            Distribution::Categorical { .. } => "CategoricalDistribution",
        }
    }

    /// Validates as optuna's constructors do and adjusts `high` down to the last multiple of
    /// `step` above `low` (`_adjust_discrete_uniform_high` / `_adjust_int_uniform_high`).
    pub fn normalized(&self) -> Result<Distribution, String> {
        match self {
            Distribution::Float { low, high, log, step } => {
                let (low, high) = (*low, *high);
                if *log && step.is_some() {
                    return Err("FloatDistribution: `step` is not supported when `log` is true".into());
                }
                if !(low <= high) {
                    return Err(format!("FloatDistribution: `low <= high` must hold, got low={low}, high={high}"));
                }
                if *log && low <= 0.0 {
                    return Err(format!("FloatDistribution: `low > 0` must hold for log=True, got low={low}"));
                }
                let high = match step {
                    Some(s) if !(*s > 0.0) => return Err(format!("FloatDistribution: `step > 0` must hold, got step={s}")),
                    Some(s) => adjust_float_high(low, high, *s),
                    None => high,
                };
                Ok(Distribution::Float { low, high, log: *log, step: *step })
            }
            Distribution::Int { low, high, log, step } => {
                if *log && *step != 1 {
                    return Err("IntDistribution: `step` must be 1 when `log` is true".into());
                }
                if low > high {
                    return Err(format!("IntDistribution: `low <= high` must hold, got low={low}, high={high}"));
                }
                if *log && *low < 1 {
                    return Err(format!("IntDistribution: `low >= 1` must hold for log=True, got low={low}"));
                }
                if *step <= 0 {
                    return Err(format!("IntDistribution: `step > 0` must hold, got step={step}"));
                }
                let high = low + (high - low) / step * step;
                Ok(Distribution::Int { low: *low, high, log: *log, step: *step })
            }
            Distribution::Categorical { choices } => {
                if choices.is_empty() {
                    return Err("CategoricalDistribution: `choices` must contain one or more elements".into());
                }
                Ok(self.clone())
            }
        }
    }

    /// `distribution_to_json`: `json.dumps({"name": ..., "attributes": dist.__dict__})` with the
    /// attribute order of the constructors (the exact bytes Python writes).
    pub fn to_json(&self) -> String {
        let mut attrs = Obj::new(Style::Default);
        match self {
            Distribution::Float { low, high, log, step } => {
                match step {
                    Some(s) => attrs.float("step", *s),
                    None => attrs.raw("step", "null"),
                };
                attrs.float("low", *low).float("high", *high).bool("log", *log);
            }
            Distribution::Int { low, high, log, step } => {
                attrs.bool("log", *log).int("step", *step).int("low", *low).int("high", *high);
            }
            Distribution::Categorical { choices } => {
                attrs.value("choices", &Value::Array(choices.clone()));
            }
        }
        Obj::new(Style::Default).str("name", self.class()).raw("attributes", &attrs.finish()).finish()
    }

    /// `json_to_distribution`.
    pub fn parse(json: &str) -> Result<ParsedDist, String> {
        let v = pyjson::parse(json).map_err(|e| format!("distribution {json}: {e}"))?;
        parse_value(&v).map_err(|e| format!("distribution {json}: {e}"))
    }

    /// `to_internal_repr`: the float the journal stores for an external value (a categorical
    /// stores the index of the first choice equal to it, Python `==`).
    pub fn to_internal(&self, external: &Value) -> Result<f64, String> {
        match self {
            Distribution::Float { log, .. } | Distribution::Int { log, .. } => {
                let x = match external {
                    Value::Bool(b) => f64::from(u8::from(*b)),
                    v => pyjson::f64_of(v).ok_or_else(|| format!("'{external}' is not a valid type; a number is expected"))?,
                };
                if x.is_nan() || (*log && x <= 0.0) {
                    return Err(format!("`{external}` is an invalid value for {}", self.class()));
                }
                Ok(x)
            }
            Distribution::Categorical { choices } => choices
                .iter()
                .position(|c| pyjson::py_eq(c, external))
                .map(|i| i as f64)
                .ok_or_else(|| format!("'{external}' not in {}", Value::Array(choices.clone()))),
        }
    }

    /// `to_external_repr`: the value a trial shows (Int truncates, Categorical indexes the
    /// choices, negative indices counting from the end as Python's do).
    pub fn to_external(&self, internal: f64) -> Result<Value, String> {
        match self {
            Distribution::Float { .. } => Ok(pyjson::float_value(internal)),
            Distribution::Int { .. } => {
                if !internal.is_finite() {
                    return Err(format!("int({internal}) of an IntDistribution value"));
                }
                Ok(Value::from(internal.trunc() as i64))
            }
            Distribution::Categorical { choices } => {
                if !internal.is_finite() {
                    return Err(format!("categorical index {internal} is not a number"));
                }
                let mut i = internal.trunc() as i64;
                if i < 0 {
                    i += choices.len() as i64;
                }
                usize::try_from(i)
                    .ok()
                    .and_then(|i| choices.get(i))
                    .cloned()
                    .ok_or_else(|| format!("categorical index {internal} out of range for {} choices", choices.len()))
            }
        }
    }
}

/// `check_distribution_compatibility`: same class, same `log`, equal choices.
pub fn compatible(old: &ParsedDist, new: &ParsedDist) -> bool {
    if old.class != new.class {
        return false;
    }
    match (&old.dist, &new.dist) {
        (Distribution::Float { log: a, .. }, Distribution::Float { log: b, .. }) => a == b,
        (Distribution::Int { log: a, .. }, Distribution::Int { log: b, .. }) => a == b,
        (Distribution::Categorical { choices: a }, Distribution::Categorical { choices: b }) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| pyjson::py_eq(x, y))
        }
        _ => false,
    }
}

fn parse_value(v: &Value) -> Result<ParsedDist, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    if let Some(name) = obj.get("name") {
        let name = name.as_str().ok_or("`name` is not a string")?;
        let attrs = obj.get("attributes").and_then(Value::as_object).ok_or("missing `attributes` object")?;
        let known: &[&str] = match name {
            "FloatDistribution" => &["low", "high", "log", "step"],
            "UniformDistribution" | "LogUniformDistribution" => &["low", "high"],
            "DiscreteUniformDistribution" => &["low", "high", "q"],
            "IntDistribution" => &["low", "high", "log", "step"],
            "IntUniformDistribution" | "IntLogUniformDistribution" => &["low", "high", "step"],
            "CategoricalDistribution" => &["choices"],
            _ => return Err(format!("unknown distribution class `{name}`")),
        };
        if let Some(k) = attrs.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("{name} has no attribute `{k}`"));
        }
        let f = |k: &str| attrs.get(k).and_then(pyjson::f64_of).ok_or(format!("{name}: missing or non-numeric `{k}`"));
        let opt_f = |k: &str| match attrs.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => pyjson::f64_of(x).map(Some).ok_or(format!("{name}: `{k}` is not a number")),
        };
        let log = |default: bool| match attrs.get("log") {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(x) => Err(format!("{name}: `log` is not a boolean: {x}")),
        };
        let int = |x: f64| -> Result<i64, String> {
            if x.is_finite() { Ok(x.trunc() as i64) } else { Err(format!("{name}: {x} is not an integer")) }
        };
        let dist = match name {
            "FloatDistribution" => Distribution::Float { low: f("low")?, high: f("high")?, log: log(false)?, step: opt_f("step")? },
            "UniformDistribution" => Distribution::Float { low: f("low")?, high: f("high")?, log: false, step: None },
            "LogUniformDistribution" => Distribution::Float { low: f("low")?, high: f("high")?, log: true, step: None },
            "DiscreteUniformDistribution" => Distribution::Float { low: f("low")?, high: f("high")?, log: false, step: Some(f("q")?) },
            "CategoricalDistribution" => {
                let c = attrs.get("choices").and_then(Value::as_array).ok_or("CategoricalDistribution: missing `choices` list")?;
                Distribution::Categorical { choices: c.iter().cloned().map(pyjson::clean).collect() }
            }
            _ => Distribution::Int {
                low: int(f("low")?)?,
                high: int(f("high")?)?,
                log: name == "IntLogUniformDistribution" || log(false)?,
                step: opt_f("step")?.map(int).transpose()?.unwrap_or(1),
            },
        };
        Ok(ParsedDist { dist: dist.normalized()?, class: name.to_string() })
    } else {
        let ty = obj.get("type").and_then(Value::as_str).ok_or("neither `name` nor `type`")?;
        let f = |k: &str| obj.get(k).and_then(pyjson::f64_of).ok_or(format!("missing or non-numeric `{k}`"));
        let step = match obj.get("step") {
            None | Some(Value::Null) => None,
            Some(x) => Some(pyjson::f64_of(x).ok_or("`step` is not a number")?),
        };
        let log = obj.get("log").and_then(Value::as_bool).unwrap_or(false);
        let dist = match ty {
            "categorical" => Distribution::Categorical {
                choices: obj.get("choices").and_then(Value::as_array).ok_or("missing `choices` list")?.iter().cloned().map(pyjson::clean).collect(),
            },
            "float" => Distribution::Float { low: f("low")?, high: f("high")?, log, step },
            "int" => Distribution::Int { low: f("low")? as i64, high: f("high")? as i64, log, step: step.map(|s| s as i64).unwrap_or(1) },
            _ => return Err(format!("unknown distribution type `{ty}`")),
        };
        let dist = dist.normalized()?;
        Ok(ParsedDist { class: dist.class().to_string(), dist })
    }
}

/// `_adjust_discrete_uniform_high`: Python does this in `decimal.Decimal(str(x))`; the shortest
/// decimal forms are exact here as scaled integers (f64 arithmetic when they do not fit).
fn adjust_float_high(low: f64, high: f64, step: f64) -> f64 {
    let dec = |x: f64| -> Option<(i128, i32)> {
        let s = format!("{x:e}");
        let (m, e) = s.split_once('e')?;
        let e: i32 = e.parse().ok()?;
        let frac = m.split_once('.').map(|(_, f)| f.len()).unwrap_or(0) as i32;
        Some((m.replace('.', "").parse().ok()?, e - frac))
    };
    let exact = (|| {
        let (l, h, s) = (dec(low)?, dec(high)?, dec(step)?);
        let e = l.1.min(h.1).min(s.1);
        let scale = |(m, x): (i128, i32)| m.checked_mul(10i128.checked_pow(u32::try_from(x - e).ok()?)?);
        let (l, h, s) = (scale(l)?, scale(h)?, scale(s)?);
        let r = h.checked_sub(l)?;
        if r % s == 0 {
            return Some(high);
        }
        let adjusted = (r / s).checked_mul(s)?.checked_add(l)?;
        format!("{adjusted}e{e}").parse::<f64>().ok()
    })();
    exact.unwrap_or_else(|| {
        let k = ((high - low) / step).floor();
        if k * step + low == high { high } else { k * step + low }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_byte_identical_to_python() {
        // Strings from the reference journal written by optuna 5.0.
        let f = Distribution::Float { low: 0.0001, high: 0.01, log: true, step: None };
        assert_eq!(f.to_json(), r#"{"name": "FloatDistribution", "attributes": {"step": null, "low": 0.0001, "high": 0.01, "log": true}}"#);
        let i = Distribution::Int { low: 128, high: 512, log: false, step: 128 };
        assert_eq!(i.to_json(), r#"{"name": "IntDistribution", "attributes": {"log": false, "step": 128, "low": 128, "high": 512}}"#);
        let c = Distribution::Categorical { choices: vec!["attn".into(), "mamba".into(), "hyena".into()] };
        assert_eq!(c.to_json(), r#"{"name": "CategoricalDistribution", "attributes": {"choices": ["attn", "mamba", "hyena"]}}"#);
        for d in [f, i, c] {
            assert_eq!(Distribution::parse(&d.to_json()).unwrap().dist, d);
        }
    }

    #[test]
    fn legacy_and_abbreviated_forms() {
        let p = Distribution::parse(r#"{"name": "LogUniformDistribution", "attributes": {"low": 1e-05, "high": 0.1}}"#).unwrap();
        assert_eq!(p.dist, Distribution::Float { low: 1e-5, high: 0.1, log: true, step: None });
        assert_eq!(p.class, "LogUniformDistribution");
        let q = Distribution::parse(r#"{"name": "FloatDistribution", "attributes": {"low": 1e-05, "high": 0.1, "log": true, "step": null}}"#).unwrap();
        assert!(!compatible(&p, &q), "optuna compares classes");
        let a = Distribution::parse(r#"{"type": "int", "low": 0, "high": 10, "step": 3}"#).unwrap();
        assert_eq!(a.dist, Distribution::Int { low: 0, high: 9, log: false, step: 3 });
        assert!(Distribution::parse(r#"{"name": "FloatDistribution", "attributes": {"low": 2.0, "high": 1.0}}"#).is_err());
        assert!(Distribution::parse(r#"{"name": "Beta", "attributes": {}}"#).is_err());
    }

    #[test]
    fn float_step_adjustment_is_decimal() {
        // Python: FloatDistribution(0.0, 1.0, step=0.3).high == 0.9; (0.1, 0.7, step=0.2) keeps 0.7
        // (binary float arithmetic would say 0.7 - 0.1 is not a multiple of 0.2).
        assert_eq!(adjust_float_high(0.0, 1.0, 0.3), 0.9);
        assert_eq!(adjust_float_high(0.1, 0.7, 0.2), 0.7);
        assert_eq!(adjust_float_high(1.0, 2.05, 0.1), 2.0);
    }

    #[test]
    fn internal_and_external() {
        let c = Distribution::Categorical { choices: vec!["a".into(), Value::from(1), Value::Null] };
        assert_eq!(c.to_internal(&Value::from(1.0)).unwrap(), 1.0);
        assert_eq!(c.to_internal(&Value::Null).unwrap(), 2.0);
        assert!(c.to_internal(&"b".into()).is_err());
        assert_eq!(c.to_external(-1.0).unwrap(), Value::Null);
        assert!(c.to_external(3.0).is_err());
        let i = Distribution::Int { low: 1, high: 9, log: true, step: 1 };
        assert_eq!(i.to_external(4.9).unwrap(), Value::from(4));
        assert!(i.to_internal(&Value::from(0)).is_err());
    }
}
