//! The sweep's view of its Optuna study (`runs/<sweep>/study.journal`, study name = sweep name,
//! direction minimize, objective = final validation loss): which planned trials are finished,
//! running, or claimable, and the ops that claim and record them.
//!
//! Every journal trial carries user attrs `slot` (its place in the sweep, see
//! [`super::expand::Point::slot`]), `trial_key` (`<config hash>-s<seed>`, the run folder),
//! `config_hash`, `seed`, `run_dir`, `attempt`, the accounting (`params_non_embedding`,
//! `params_total`, `params_active`, `flops_per_token`), the plan (`steps_planned`,
//! `tokens_planned`, `compute_planned`), `git_revision`, `device`, the claimer's `host`,
//! `pid` and `pid_start`; and when it ends `status` (completed, diverged, pruned, failed,
//! stale), `tokens`, `compute`, `wall_time_s`, `val_loss`, …
//!
//! A planned slot is **done** when one of its trials is COMPLETE or PRUNED, or FAIL with status
//! `diverged` (a result, never retried), or when it has failed more than `max_retries` times
//! (stale re-queues do not count). A RUNNING trial is **alive** while its claimer lives: on
//! the same host, while the claiming process (pid and start time) exists; elsewhere, while its
//! heartbeat file (`<run_dir>/heartbeat`, touched every `heartbeat_s`) is younger than
//! `stale_after_s`. A stale RUNNING trial is marked FAIL (status `stale`) by the next claimer
//! and its slot claimed again; the new trial resumes from the run folder's checkpoint.

use super::journal::{Distribution, Op, Replay, TrialRecord, TrialState};
use super::plan::Trial;
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Status user attr values.
pub const COMPLETED: &str = "completed";
pub const DIVERGED: &str = "diverged";
pub const PRUNED: &str = "pruned";
pub const FAILED: &str = "failed";
pub const STALE: &str = "stale";

/// What the claimer needs to know about processes and time.
pub struct Liveness<'a> {
    pub host: &'a str,
    /// `runs/<sweep>` as this process sees it (heartbeats are `<root>/<trial_key>/heartbeat`).
    pub root: &'a Path,
    pub now_unix: f64,
    pub stale_after_s: f64,
}

pub fn attr_str<'a>(t: &'a TrialRecord, k: &str) -> Option<&'a str> {
    t.user_attrs.get(k).and_then(Value::as_str)
}
pub fn attr_f64(t: &TrialRecord, k: &str) -> Option<f64> {
    t.user_attrs.get(k).and_then(Value::as_f64)
}

/// Where a slot stands.
#[derive(Clone, Debug, PartialEq)]
pub enum SlotState {
    /// Finished: the deciding trial (COMPLETE, PRUNED, diverged, or the last failure).
    Done(u64),
    /// A live RUNNING trial.
    Running(u64),
    /// Claimable; `stale` lists RUNNING trials to mark FAIL first; `attempt` counts trials so far.
    Open { stale: Vec<u64>, attempt: usize },
}

/// Whether a RUNNING trial's claimer is still alive.
pub fn is_alive(t: &TrialRecord, live: &Liveness) -> bool {
    let same_host = attr_str(t, "host") == Some(live.host);
    if same_host {
        if let (Some(pid), Some(start)) = (attr_f64(t, "pid"), attr_str(t, "pid_start")) {
            return super::proc::process_start(pid as u32).as_deref() == Some(start);
        }
    }
    let hb = attr_str(t, "trial_key").and_then(|k| std::fs::metadata(live.root.join(k).join("heartbeat")).ok()).and_then(|m| m.modified().ok());
    let last = match hb {
        Some(m) => m.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        None => t.datetime_start.as_deref().and_then(parse_iso_unix).unwrap_or(0.0),
    };
    live.now_unix - last < live.stale_after_s
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.ffffff][+00:00]` (UTC assumed).
pub fn parse_iso_unix(s: &str) -> Option<f64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.trim_end_matches('Z');
    let time = time.split(['+']).next()?;
    let mut t = time.split(':');
    let (hh, mm) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// The state of every slot, from the study's trials.
pub fn slot_states<'r>(trials: impl Iterator<Item = &'r TrialRecord>, max_retries: usize, live: &Liveness) -> BTreeMap<String, SlotState> {
    let mut by_slot: BTreeMap<String, Vec<&TrialRecord>> = BTreeMap::new();
    for t in trials {
        if let Some(s) = attr_str(t, "slot") {
            by_slot.entry(s.to_string()).or_default().push(t);
        }
    }
    by_slot
        .into_iter()
        .map(|(slot, ts)| {
            let st = slot_state(&ts, max_retries, live);
            (slot, st)
        })
        .collect()
}

fn slot_state(ts: &[&TrialRecord], max_retries: usize, live: &Liveness) -> SlotState {
    if let Some(t) = ts.iter().find(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned)) {
        return SlotState::Done(t.trial_id);
    }
    if let Some(t) = ts.iter().find(|t| t.state == TrialState::Fail && attr_str(t, "status") == Some(DIVERGED)) {
        return SlotState::Done(t.trial_id);
    }
    let failures: Vec<&&TrialRecord> = ts.iter().filter(|t| t.state == TrialState::Fail && attr_str(t, "status") != Some(STALE)).collect();
    if failures.len() > max_retries {
        return SlotState::Done(failures.last().expect("non-empty").trial_id);
    }
    let mut stale = Vec::new();
    for t in ts.iter().filter(|t| t.state == TrialState::Running) {
        if is_alive(t, live) {
            return SlotState::Running(t.trial_id);
        }
        stale.push(t.trial_id);
    }
    SlotState::Open { stale, attempt: ts.len() }
}

/// Ops that mark a stale RUNNING trial FAIL.
pub fn stale_ops(trial_id: u64) -> Vec<Op> {
    vec![
        Op::SetTrialUserAttr { trial_id, key: "status".into(), value: json!(STALE) },
        Op::set_state(trial_id, TrialState::Fail, None),
    ]
}

/// Converts a distribution JSON (optuna's `distribution_to_json` form) to the journal's type.
pub fn distribution(json: &Value) -> Result<Distribution> {
    Distribution::parse(&json.to_string()).map(|p| p.dist).map_err(|e| Error::Other(format!("distribution {json}: {e}")))
}

/// Who claims and where it runs.
pub struct Claimer<'a> {
    pub host: &'a str,
    pub pid: u32,
    pub pid_start: &'a str,
    pub device: &'a str,
    pub git_revision: &'a str,
}

/// The CREATE_TRIAL op that claims `trial` (RUNNING now, params, user attrs).
pub fn claim_op(study_id: u64, trial: &Trial, run_dir: &Path, attempt: usize, search: Option<&[f64]>, who: &Claimer) -> Result<Op> {
    let mut params = BTreeMap::new();
    for p in &trial.params {
        params.insert(p.name.clone(), (p.internal, distribution(&p.dist)?));
    }
    let a = &trial.accounting;
    let mut u: BTreeMap<String, Value> = BTreeMap::new();
    u.insert("slot".into(), json!(trial.slot));
    u.insert("trial_key".into(), json!(trial.key));
    u.insert("config_hash".into(), json!(trial.hash));
    u.insert("seed".into(), json!(trial.seed));
    u.insert("run_dir".into(), json!(run_dir.display().to_string()));
    u.insert("attempt".into(), json!(attempt + 1));
    u.insert("params_non_embedding".into(), json!(a.params_non_embedding));
    u.insert("params_total".into(), json!(a.params_total));
    u.insert("params_active".into(), json!(a.params_active));
    u.insert("flops_per_token".into(), json!(a.flops_per_token));
    u.insert("steps_planned".into(), json!(trial.steps()));
    u.insert("tokens_planned".into(), json!(trial.tokens()));
    u.insert("compute_planned".into(), json!(trial.compute()));
    u.insert("git_revision".into(), json!(who.git_revision));
    u.insert("device".into(), json!(who.device));
    u.insert("host".into(), json!(who.host));
    u.insert("pid".into(), json!(who.pid));
    u.insert("pid_start".into(), json!(who.pid_start));
    if let Some(x) = search {
        u.insert("search_internal".into(), json!(x));
    }
    Ok(Op::CreateTrial {
        study_id,
        datetime_start: Some(super::journal::now_iso()),
        state: Some(TrialState::Running),
        values: None,
        datetime_complete: None,
        params,
        user_attrs: u,
        system_attrs: BTreeMap::new(),
        intermediate_values: BTreeMap::new(),
    })
}

/// The study id of `name`, creating the study (minimize) with its attrs when absent.
pub fn ensure_study(journal: &super::journal::Journal, name: &str, sweep_file: &str) -> Result<u64> {
    journal.transact(|r: &Replay| {
        if let Some(id) = r.study_id(name) {
            return Ok((Vec::new(), id));
        }
        let id = r.next_study_id();
        let ops = vec![
            Op::CreateStudy { study_name: name.to_string(), directions: vec![super::journal::Direction::Minimize] },
            Op::SetStudyUserAttr { study_id: id, key: "sweep_file".into(), value: json!(sweep_file) },
            Op::SetStudyUserAttr { study_id: id, key: "objective".into(), value: json!("final validation loss (nats/token)") },
            Op::SetStudySystemAttr { study_id: id, key: "harness".into(), value: json!(format!("mixscale {}", env!("CARGO_PKG_VERSION"))) },
        ];
        Ok((ops, id))
    })
}
