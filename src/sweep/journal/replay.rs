//! Replay of journal ops into studies and trials, as optuna 5.0's `JournalStorageReplayResult`
//! (`optuna/storages/journal/_storage.py`) does it:
//! - study ids count successful CREATE_STUDY ops (a duplicate name is ignored); a deleted study
//!   disappears but ids are never reused;
//! - trial ids count CREATE_TRIAL ops of existing studies across the whole file (trials of a
//!   deleted study keep theirs); `number` counts per study;
//! - ops on an unknown trial or study, or on a finished trial, are ignored; a RUNNING → RUNNING
//!   transition is ignored (the trial was claimed by someone else);
//! - a SET_TRIAL_PARAM whose distribution is incompatible with the one the study's first trial
//!   (in creation order) with that param has is ignored (optuna: "silently dropped").
//!
//! In *strict* mode (this writer's own ops, checked before they are written) every case in
//! which optuna raises for the issuing worker is an error instead of a skip.

use super::dist::{compatible, Distribution, ParsedDist};
use super::ops::{Decoded, Direction, Op, TrialState};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// One trial as replay leaves it.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialRecord {
    /// Global id (creation order across the file).
    pub trial_id: u64,
    /// Index within its study.
    pub number: u64,
    pub state: TrialState,
    /// name → (external value as the trial shows it, distribution).
    pub params: BTreeMap<String, (Value, Distribution)>,
    pub values: Option<Vec<f64>>,
    pub intermediate: BTreeMap<u64, f64>,
    pub user_attrs: BTreeMap<String, Value>,
    pub system_attrs: BTreeMap<String, Value>,
    /// ISO-8601 as written (optuna writes UTC with `+00:00`).
    pub datetime_start: Option<String>,
    pub datetime_complete: Option<String>,
}

/// One study with its trials in number order.
#[derive(Clone, Debug, PartialEq)]
pub struct StudyRecord {
    pub study_id: u64,
    pub name: String,
    pub directions: Vec<Direction>,
    pub trials: Vec<TrialRecord>,
    pub user_attrs: BTreeMap<String, Value>,
    pub system_attrs: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default)]
struct StudyState {
    name: String,
    directions: Vec<Direction>,
    user_attrs: BTreeMap<String, Value>,
    system_attrs: BTreeMap<String, Value>,
    trial_ids: Vec<u64>,
    /// param name → number of the first trial (creation order) that has it.
    first_with: HashMap<String, u64>,
    /// Deleted studies stay here (optuna keeps their trial lists) but are not shown.
    deleted: bool,
}

/// The replayed state of a journal. [`super::Journal::transact`] hands it to its closure.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    studies: BTreeMap<u64, StudyState>,
    trials: Vec<TrialRecord>,
    trial_study: Vec<u64>,
    /// Optuna class name of each (trial id, param) whose class is a pre-3.0 name.
    legacy_class: HashMap<(u64, String), String>,
    next_study_id: u64,
    ops: u64,
}

impl Replay {
    /// The live studies in id order, each with its trials.
    pub fn studies(&self) -> Vec<StudyRecord> {
        self.studies.iter().filter(|(_, s)| !s.deleted).map(|(id, _)| self.study(*id).expect("live")).collect()
    }

    /// A live study by id.
    pub fn study(&self, study_id: u64) -> Option<StudyRecord> {
        let s = self.studies.get(&study_id).filter(|s| !s.deleted)?;
        Some(StudyRecord {
            study_id,
            name: s.name.clone(),
            directions: s.directions.clone(),
            trials: s.trial_ids.iter().map(|t| self.trials[*t as usize].clone()).collect(),
            user_attrs: s.user_attrs.clone(),
            system_attrs: s.system_attrs.clone(),
        })
    }

    /// The id of the live study called `name`.
    pub fn study_id(&self, name: &str) -> Option<u64> {
        self.studies.iter().find(|(_, s)| !s.deleted && s.name == name).map(|(id, _)| *id)
    }

    /// A trial by global id (also trials of deleted studies).
    pub fn trial(&self, trial_id: u64) -> Option<&TrialRecord> {
        self.trials.get(trial_id as usize)
    }

    /// The trials of a live study in number order (empty for an unknown study).
    pub fn trials_of(&self, study_id: u64) -> impl Iterator<Item = &TrialRecord> + '_ {
        self.studies.get(&study_id).filter(|s| !s.deleted).into_iter().flat_map(|s| s.trial_ids.iter().map(|t| &self.trials[*t as usize]))
    }

    /// The id the next CREATE_TRIAL of a live study gets; a batch's k-th such op gets
    /// `next_trial_id() + k`.
    pub fn next_trial_id(&self) -> u64 {
        self.trials.len() as u64
    }

    /// The id the next successful CREATE_STUDY gets.
    pub fn next_study_id(&self) -> u64 {
        self.next_study_id
    }

    /// How many ops (lines) have been replayed.
    pub fn ops_replayed(&self) -> u64 {
        self.ops
    }

    /// Whether optuna skips this (parsed but undecodable) line before reading the rest of it:
    /// an op on an unknown or deleted study, or on an unknown or finished trial. Then a
    /// malformed remainder does not matter, as in optuna; the op is counted.
    pub(crate) fn skip_unread(&mut self, v: &Value) -> bool {
        let live_study = |id: u64| self.studies.get(&id).is_some_and(|s| !s.deleted);
        let open_trial = |id: u64| self.trials.get(id as usize).is_some_and(|t| !t.state.is_finished());
        let skip = match v.get("op_code").and_then(Value::as_i64) {
            Some(1..=4) => v.get("study_id").and_then(Value::as_u64).is_some_and(|id| !live_study(id)),
            Some(5..=9) => v.get("trial_id").and_then(Value::as_u64).is_some_and(|id| !open_trial(id)),
            _ => false,
        };
        if skip {
            self.ops += 1;
        }
        skip
    }

    /// Applies one decoded op. `strict`: optuna's errors for the issuing worker become errors
    /// (the op must not be written); otherwise they are skips as for another worker's op.
    pub(crate) fn apply(&mut self, d: &Decoded, strict: bool) -> Result<(), String> {
        self.ops += 1;
        let skip = |msg: String| if strict { Err(msg) } else { Ok(()) };
        match &d.op {
            Op::CreateStudy { study_name, directions } => {
                if self.study_id(study_name).is_some() {
                    return skip(format!("a study named `{study_name}` already exists"));
                }
                let id = self.next_study_id;
                self.next_study_id += 1;
                self.studies.insert(id, StudyState { name: study_name.clone(), directions: directions.clone(), ..Default::default() });
            }
            Op::DeleteStudy { study_id } => {
                match self.studies.get_mut(study_id).filter(|s| !s.deleted) {
                    Some(s) => s.deleted = true,
                    None => return skip(format!("no study with id {study_id}")),
                }
            }
            Op::SetStudyUserAttr { study_id, key, value } | Op::SetStudySystemAttr { study_id, key, value } => {
                let Some(s) = self.studies.get_mut(study_id).filter(|s| !s.deleted) else {
                    return skip(format!("no study with id {study_id}"));
                };
                let map = if matches!(d.op, Op::SetStudyUserAttr { .. }) { &mut s.user_attrs } else { &mut s.system_attrs };
                map.insert(key.clone(), value.clone());
            }
            Op::CreateTrial { study_id, datetime_start, state, values, datetime_complete, params, user_attrs, system_attrs, intermediate_values } => {
                let trial_id = self.trials.len() as u64;
                let Some(s) = self.studies.get_mut(study_id).filter(|s| !s.deleted) else {
                    return skip(format!("no study with id {study_id}"));
                };
                let number = s.trial_ids.len() as u64;
                let mut shown = BTreeMap::new();
                for (name, (x, dist)) in params {
                    shown.insert(name.clone(), (dist.to_external(*x)?, dist.clone()));
                    s.first_with.entry(name.clone()).or_insert(number);
                    if let Some(c) = d.classes.get(name).filter(|c| c.as_str() != dist.class()) {
                        self.legacy_class.insert((trial_id, name.clone()), c.clone());
                    }
                }
                s.trial_ids.push(trial_id);
                self.trial_study.push(*study_id);
                self.trials.push(TrialRecord {
                    trial_id,
                    number,
                    state: state.unwrap_or(TrialState::Running),
                    params: shown,
                    values: values.clone(),
                    intermediate: intermediate_values.clone(),
                    user_attrs: user_attrs.clone(),
                    system_attrs: system_attrs.clone(),
                    datetime_start: datetime_start.clone(),
                    datetime_complete: datetime_complete.clone(),
                });
            }
            Op::DiscardTrials { .. } => {}
            op => {
                let trial_id = match op {
                    Op::SetTrialParam { trial_id, .. }
                    | Op::SetTrialStateValues { trial_id, .. }
                    | Op::SetTrialIntermediateValue { trial_id, .. }
                    | Op::SetTrialUserAttr { trial_id, .. }
                    | Op::SetTrialSystemAttr { trial_id, .. } => *trial_id,
                    _ => unreachable!("study ops handled above"),
                };
                let Some(t) = self.trials.get(trial_id as usize) else {
                    return skip(format!("no trial with id {trial_id}"));
                };
                if t.state.is_finished() {
                    return skip(format!("trial {trial_id} (number {}) has already finished and can not be updated", t.number));
                }
                return self.apply_trial_op(trial_id, d, strict);
            }
        }
        Ok(())
    }

    fn apply_trial_op(&mut self, trial_id: u64, d: &Decoded, strict: bool) -> Result<(), String> {
        let skip = |msg: String| if strict { Err(msg) } else { Ok(()) };
        match &d.op {
            Op::SetTrialParam { param_name, value_internal, distribution, .. } => {
                let study = self.trial_study[trial_id as usize];
                let class_of = |tid: u64, dist: &Distribution| {
                    self.legacy_class.get(&(tid, param_name.clone())).cloned().unwrap_or_else(|| dist.class().to_string())
                };
                let new = ParsedDist { dist: distribution.clone(), class: d.classes.get(param_name).cloned().unwrap_or_else(|| distribution.class().to_string()) };
                if let Some(s) = self.studies.get(&study) {
                    if let Some(first) = s.first_with.get(param_name) {
                        let tid = s.trial_ids[*first as usize];
                        let (_, old) = &self.trials[tid as usize].params[param_name];
                        let old = ParsedDist { dist: old.clone(), class: class_of(tid, old) };
                        if !compatible(&old, &new) {
                            return skip(format!(
                                "param `{param_name}`: {} is incompatible with {} of trial {tid} (optuna drops it)",
                                distribution.to_json(),
                                old.dist.to_json()
                            ));
                        }
                    }
                }
                let shown = distribution.to_external(*value_internal)?;
                let number = self.trials[trial_id as usize].number;
                if let Some(s) = self.studies.get_mut(&study) {
                    let e = s.first_with.entry(param_name.clone()).or_insert(number);
                    *e = (*e).min(number);
                }
                if new.class != distribution.class() {
                    self.legacy_class.insert((trial_id, param_name.clone()), new.class);
                } else {
                    self.legacy_class.remove(&(trial_id, param_name.clone()));
                }
                self.trials[trial_id as usize].params.insert(param_name.clone(), (shown, distribution.clone()));
            }
            Op::SetTrialStateValues { state, values, datetime, .. } => {
                let t = &mut self.trials[trial_id as usize];
                if *state == TrialState::Running && t.state == TrialState::Running {
                    return skip(format!("trial {trial_id} is already running (claimed by another worker)"));
                }
                if *state == TrialState::Running {
                    t.datetime_start = datetime.clone();
                }
                if state.is_finished() {
                    t.datetime_complete = datetime.clone();
                }
                t.state = *state;
                if values.is_some() {
                    t.values = values.clone();
                }
            }
            Op::SetTrialIntermediateValue { step, value, .. } => {
                self.trials[trial_id as usize].intermediate.insert(*step, *value);
            }
            Op::SetTrialUserAttr { key, value, .. } => {
                self.trials[trial_id as usize].user_attrs.insert(key.clone(), value.clone());
            }
            Op::SetTrialSystemAttr { key, value, .. } => {
                self.trials[trial_id as usize].system_attrs.insert(key.clone(), value.clone());
            }
            _ => unreachable!("trial ops only"),
        }
        Ok(())
    }
}
