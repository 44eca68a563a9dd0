//! Expansion: grid × (base ∪ ablate variants) × search trials × seeds → points.
//!
//! Order: grid cells in row-major order (the last grid entry varies fastest), then the base
//! variant and the ablate variants (one key changed at a time, in file order), then search
//! trials, then seeds. A point holds the assignments that define it; [`super::plan`] resolves
//! it against the base into a full config.

use super::search::{axis_dist, categorical_json, random_point, SearchMethod};
use super::spec::SweepSpec;
use serde_yaml_ng::Value;

/// One assignment of a point, with the Optuna parameter it is recorded as.
#[derive(Clone, Debug)]
pub struct Assign {
    pub key: String,
    pub value: Value,
    /// `file:line key.path` in the sweep file.
    pub origin: String,
    /// Optuna distribution JSON and internal value.
    pub dist: serde_json::Value,
    pub internal: f64,
}

/// The search part of a point.
#[derive(Clone, Debug, PartialEq)]
pub enum SearchSlot {
    /// No `search:` section.
    None,
    /// Search trial `index` with known internal coordinates (random search, TPE start-up).
    Fixed { index: usize, internal: Vec<f64> },
    /// TPE trial `index`, sampled when it is claimed (it depends on finished trials).
    Pending { index: usize },
}

/// One point of the sweep before resolution.
#[derive(Clone, Debug)]
pub struct Point {
    /// Grid cell × variant, numbered in expansion order (TPE learns within a cell).
    pub cell: usize,
    pub assigns: Vec<Assign>,
    pub search: SearchSlot,
    /// From the `seeds` axis (`None`: the base's `train.seed`).
    pub seed: Option<u64>,
}

impl Point {
    /// A stable name of the point's place in the sweep (used for TPE trials, whose config is
    /// only known once sampled): `c<cell>-t<search index>-s<seed>`.
    pub fn slot(&self) -> String {
        let t = match &self.search {
            SearchSlot::None => String::new(),
            SearchSlot::Fixed { index, .. } | SearchSlot::Pending { index } => format!("-t{index}"),
        };
        format!("c{}{t}-s{}", self.cell, self.seed.map(|s| s.to_string()).unwrap_or_else(|| "base".into()))
    }
}

/// Expands a sweep into its points.
pub fn expand(s: &SweepSpec) -> Vec<Point> {
    // Grid cells.
    let mut cells: Vec<Vec<Assign>> = vec![Vec::new()];
    for axis in &s.grid {
        let mut next = Vec::with_capacity(cells.len() * axis.rows.len());
        for cell in &cells {
            for row in &axis.rows {
                let mut c = cell.clone();
                for (k, (key, v)) in axis.keys.iter().zip(row).enumerate() {
                    let column: Vec<Value> = axis.rows.iter().map(|r| r[k].clone()).collect();
                    let origin = if axis.keys.len() == 1 { s.origin(&["grid", key]) } else { s.origin(&["grid", &axis.name, "zip", key]) };
                    let (dist, internal) = axis_dist(&dedup(&column), v);
                    c.push(Assign { key: key.clone(), value: v.clone(), origin, dist, internal });
                }
                next.push(c);
            }
        }
        cells = next;
    }
    // Variants: base plus one per ablate value.
    let mut variants: Vec<Vec<Assign>> = vec![Vec::new()];
    if !s.ablate.is_empty() {
        let mut labels: Vec<Value> = vec![Value::from("base")];
        for (k, vals) in &s.ablate {
            for v in vals {
                labels.push(Value::from(format!("{k}={}", super::plan::show(v))));
            }
        }
        let label_dist = categorical_json(&labels);
        variants[0].push(Assign { key: "ablate".into(), value: labels[0].clone(), origin: s.origin(&["ablate"]), dist: label_dist.clone(), internal: 0.0 });
        let mut li = 1;
        for (k, vals) in &s.ablate {
            for v in vals {
                let (dist, internal) = axis_dist(&dedup(vals), v);
                variants.push(vec![
                    Assign { key: "ablate".into(), value: labels[li].clone(), origin: s.origin(&["ablate"]), dist: label_dist.clone(), internal: li as f64 },
                    Assign { key: k.clone(), value: v.clone(), origin: s.origin(&["ablate", k]), dist, internal },
                ]);
                li += 1;
            }
        }
    }
    // Search trials.
    let slots: Vec<SearchSlot> = match &s.search {
        None => vec![SearchSlot::None],
        Some(sp) => (0..sp.n_trials)
            .map(|i| match sp.method {
                SearchMethod::Tpe if i >= sp.n_startup_trials => SearchSlot::Pending { index: i },
                _ => SearchSlot::Fixed { index: i, internal: random_point(&sp.parameters, sp.seed, i) },
            })
            .collect(),
    };
    let seeds: Vec<Option<u64>> = match &s.seeds {
        None => vec![None],
        Some(v) => v.iter().map(|&x| Some(x)).collect(),
    };
    let mut out = Vec::new();
    let mut cell_id = 0;
    for cell in &cells {
        for variant in &variants {
            for slot in &slots {
                for &seed in &seeds {
                    let mut assigns = cell.clone();
                    assigns.extend(variant.iter().cloned());
                    out.push(Point { cell: cell_id, assigns, search: slot.clone(), seed });
                }
            }
            cell_id += 1;
        }
    }
    out
}

/// Values without repeats, in first-seen order (Optuna rejects repeated categorical choices).
fn dedup(v: &[Value]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for x in v {
        if !out.contains(x) {
            out.push(x.clone());
        }
    }
    out
}
