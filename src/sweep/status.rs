//! `mixscale sweep status`: every planned trial with its state, objective, tokens and wall
//! time (from the journal), and the best trial.

use super::journal::{Journal, TrialState};
use super::plan::{table, Plan};
use super::spec::SweepSpec;
use super::study::{self, attr_f64, attr_str, Liveness, SlotState};
use crate::error::Result;
use std::path::Path;

/// The status text of a sweep whose journal is at `journal_path` (the plan gives the rows).
pub fn render(sweep: &SweepSpec, plan: &Plan, journal_path: &Path) -> Result<String> {
    let keys = plan.varying();
    let mut out = String::new();
    let replay = if journal_path.exists() { Some(Journal::open(journal_path)?.replay()?) } else { None };
    let study_id = replay.as_ref().and_then(|r| r.study_id(&sweep.name));
    let host = super::proc::hostname();
    let root = journal_path.parent().unwrap_or(Path::new("."));
    let live = Liveness { host: &host, root, now_unix: super::worker::now_unix(), stale_after_s: sweep.stale_after_s };
    let states = match (&replay, study_id) {
        (Some(r), Some(id)) => study::slot_states(r.trials_of(id), sweep.max_retries, &live),
        _ => Default::default(),
    };
    let mut header = vec!["#".to_string(), "trial".into(), "state".into(), "loss".into(), "tokens".into(), "wall".into(), "tries".into()];
    header.extend(keys.iter().cloned());
    let mut rows = vec![header];
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut best: Option<(f64, String, u64)> = None;
    for (i, (p, planned)) in plan.points.iter().zip(&plan.trials).enumerate() {
        let slot = p.slot();
        let tries = match (&replay, study_id) {
            (Some(r), Some(id)) => r.trials_of(id).filter(|t| attr_str(t, "slot") == Some(slot.as_str())).count(),
            _ => 0,
        };
        let rec = match states.get(&slot) {
            Some(SlotState::Done(id)) | Some(SlotState::Running(id)) => replay.as_ref().and_then(|r| r.trial(*id)),
            _ => None,
        };
        let state = match (states.get(&slot), rec) {
            (Some(SlotState::Running(_)), Some(t)) => {
                let step = t.intermediate.keys().last().map(|s| format!(" @{s}")).unwrap_or_default();
                format!("running{step}")
            }
            (Some(SlotState::Done(_)), Some(t)) => attr_str(t, "status").unwrap_or(t.state.name()).to_string(),
            (Some(SlotState::Open { stale, .. }), _) if !stale.is_empty() => "stale".into(),
            (Some(SlotState::Open { .. }), _) if tries > 0 => "retry".into(),
            _ => "pending".into(),
        };
        *counts.entry(state.split(' ').next().unwrap_or("").to_string()).or_default() += 1;
        let key = rec.and_then(|t| attr_str(t, "trial_key")).map(str::to_string).unwrap_or_else(|| if planned.pending { format!("(tpe {slot})") } else { planned.key.clone() });
        let value = rec.filter(|t| t.state == TrialState::Complete).and_then(|t| t.values.as_ref()).and_then(|v| v.first().copied());
        if let (Some(v), Some(t)) = (value, rec) {
            if best.as_ref().is_none_or(|b| v < b.0) {
                best = Some((v, key.clone(), t.number));
            }
        }
        let tokens = rec.and_then(|t| attr_f64(t, "tokens")).map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
        let wall = rec.and_then(|t| attr_f64(t, "wall_time_s")).map(|x| format!("{x:.1}s")).unwrap_or_else(|| "-".into());
        let mut r = vec![i.to_string(), key, state, value.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()), tokens, wall, tries.to_string()];
        r.extend(keys.iter().map(|k| match rec.and_then(|t| t.params.get(k)) {
            Some((v, _)) => match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            None => super::plan::value_of(planned, k),
        }));
        rows.push(r);
    }
    out.push_str(&format!("sweep {} — journal {}\n", sweep.name, journal_path.display()));
    out.push_str(&table(&rows));
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    out.push_str(&format!("{} trials: {}\n", plan.points.len(), summary.join(", ")));
    match best {
        Some((v, key, number)) => out.push_str(&format!("best: {key} (optuna trial {number}) val_loss {v:.4}\n")),
        None => out.push_str("best: none yet\n"),
    }
    Ok(out)
}
