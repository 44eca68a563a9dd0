//! `runs/<sweep>/results.csv`: one row per finished trial, the input of the fit/plot layer.
//!
//! Columns: `run` (trial key `<hash>-s<seed>`), `arch` (the layer pattern, `+`-joined),
//! `seed`, `status` (completed, diverged, pruned, failed), `N` (non-embedding parameters),
//! `N_total`, `D` (tokens trained), `C` (FLOPs = flops_per_token · D), `loss` (final
//! validation loss; empty unless completed), `lr` (peak), `batch_tokens`, `S` (MoE sparsity
//! 1 − active/total experts when the model has experts, else 0), `step` (steps trained), then
//! `hash`, `slot`, `params_active`, `flops_per_token`, `last_val_loss` (last intermediate value,
//! also for pruned/diverged trials), `val_accuracy`, `wall_time_s`, and one column per swept key.

use super::journal::{Journal, TrialRecord};
use super::plan::Plan;
use super::study::{self, attr_f64, attr_str, Liveness, SlotState};
use crate::config::RunSpec;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub const HEADER: &[&str] = &[
    "run", "arch", "seed", "status", "N", "N_total", "D", "C", "loss", "lr", "batch_tokens", "S", "step", "hash", "slot", "params_active",
    "flops_per_token", "last_val_loss", "val_accuracy", "wall_time_s",
];

/// MoE sparsity of a model spec: 1 − top_k / experts for the first mapping that names both
/// (`num_experts`/`n_experts`/`experts` and `top_k`/`experts_per_token`), else 0.
pub fn sparsity(model: &Value) -> f64 {
    match model {
        Value::Object(m) => {
            let e = ["num_experts", "n_experts", "experts"].iter().find_map(|k| m.get(*k).and_then(Value::as_f64));
            let k = ["top_k", "experts_per_token", "num_experts_per_tok"].iter().find_map(|k| m.get(*k).and_then(Value::as_f64));
            if let (Some(e), Some(k)) = (e, k) {
                if e > 0.0 {
                    return 1.0 - k / e;
                }
            }
            m.values().map(sparsity).find(|s| *s != 0.0).unwrap_or(0.0)
        }
        Value::Array(a) => a.iter().map(sparsity).find(|s| *s != 0.0).unwrap_or(0.0),
        _ => 0.0,
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn num(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite()).map(|v| format!("{v}")).unwrap_or_default()
}

/// The row of a finished trial.
fn row(t: &TrialRecord, swept: &[String], root: &Path) -> Vec<String> {
    let run_dir = root.join(attr_str(t, "trial_key").unwrap_or(""));
    let spec: Option<RunSpec> = std::fs::read_to_string(run_dir.join("trial.yaml")).ok().and_then(|s| serde_yaml_ng::from_str(&s).ok());
    let status = attr_str(t, "status").unwrap_or("");
    let loss = if status == study::COMPLETED { t.values.as_ref().and_then(|v| v.first().copied()) } else { None };
    let fpt = attr_f64(t, "flops_per_token");
    let tokens = attr_f64(t, "tokens");
    let (arch, lr, bt, s) = match &spec {
        Some(sp) => (
            sp.model.layer_pattern.join("+"),
            Some(sp.train.optimizer.lr),
            Some(sp.train.tokens_per_step() as f64),
            sparsity(&serde_json::to_value(&sp.model).unwrap_or(Value::Null)),
        ),
        None => (String::new(), None, None, 0.0),
    };
    let mut r = vec![
        attr_str(t, "trial_key").unwrap_or("").to_string(),
        arch,
        attr_f64(t, "seed").map(|s| format!("{s}")).unwrap_or_default(),
        status.to_string(),
        num(attr_f64(t, "params_non_embedding")),
        num(attr_f64(t, "params_total")),
        num(tokens),
        num(attr_f64(t, "compute").or_else(|| fpt.zip(tokens).map(|(f, d)| f * d))),
        num(loss),
        num(lr),
        num(bt),
        format!("{s}"),
        num(attr_f64(t, "steps")),
        attr_str(t, "config_hash").unwrap_or("").to_string(),
        attr_str(t, "slot").unwrap_or("").to_string(),
        num(attr_f64(t, "params_active")),
        num(fpt),
        num(t.intermediate.values().last().copied()),
        num(attr_f64(t, "val_accuracy")),
        num(attr_f64(t, "wall_time_s")),
    ];
    for k in swept {
        r.push(t.params.get(k).map(|(v, _)| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }).unwrap_or_default());
    }
    r.iter().map(|f| csv_field(f)).collect()
}

/// Writes `dir/results.csv` (atomically) from the journal; returns its path.
pub fn write(journal: &Journal, study_id: u64, plan: &Plan, max_retries: usize, dir: &Path) -> Result<PathBuf> {
    let r = journal.replay()?;
    let host = super::proc::hostname();
    let live = Liveness { host: &host, root: dir, now_unix: super::worker::now_unix(), stale_after_s: f64::INFINITY };
    let states = study::slot_states(r.trials_of(study_id), max_retries, &live);
    let swept: Vec<String> = plan.varying().into_iter().filter(|k| plan.trials.iter().any(|t| t.params.iter().any(|p| &p.name == k))).collect();
    let mut text = HEADER.join(",");
    for k in &swept {
        text.push(',');
        text.push_str(&csv_field(k));
    }
    text.push('\n');
    for p in &plan.points {
        if let Some(SlotState::Done(id)) = states.get(&p.slot()) {
            if let Some(t) = r.trial(*id) {
                text.push_str(&row(t, &swept, dir).join(","));
                text.push('\n');
            }
        }
    }
    let path = dir.join("results.csv");
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}
