//! One worker slot: claim the next trial from the shared journal, run it as a child
//! `mixscale train` process, report its validation curve, record how it ended.
//!
//! Claim = one [`Journal::transact`]: under the journal's lock, replay, pick the first planned
//! slot that is not done and not running (marking stale RUNNING trials FAIL), append its
//! CREATE_TRIAL (RUNNING, params, user attrs). Two workers can therefore never claim the same
//! slot, on one machine or many sharing the file. TPE trials are sampled inside the same
//! transaction from the finished trials of their grid cell.
//!
//! The child runs `mixscale train <run_dir>/trial.yaml --out <run_dir> --resume --quiet
//! --device D` with its output in `<run_dir>/train.log`; it dies with the worker thread that
//! started it (`PR_SET_PDEATHSIG`), and `--resume` continues from the folder's last checkpoint
//! (bit-exact) when an earlier attempt was interrupted. Exit code 3 = diverged (a result).

use super::early_stop::Peer;
use super::journal::{Journal, Op, TrialState};
use super::plan::{Plan, Planner, Trial};
use super::search::tpe_point;
use super::spec::SweepSpec;
use super::study::{self, attr_str, Claimer, Liveness, SlotState};
use crate::data::rng::{mix, Rng};
use crate::error::{Error, Result};
use crate::train::record::{Status, Summary};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Everything the slots of one process share.
pub struct Ctx<'a> {
    pub sweep: &'a SweepSpec,
    pub plan: &'a Plan,
    pub planner: Mutex<Planner<'a>>,
    pub journal: Journal,
    pub study_id: u64,
    /// `runs/<sweep>`.
    pub root: PathBuf,
    pub host: String,
    pub pid: u32,
    pub pid_start: String,
    pub git_revision: String,
    /// The `mixscale` binary that runs trials.
    pub exe: PathBuf,
    /// Threads per CPU trial (`RAYON_NUM_THREADS`), from cores / CPU slots.
    pub cpu_threads: usize,
    pub events: super::pool::Events,
}

/// A claimed trial.
pub struct Claimed {
    pub trial_id: u64,
    /// Earlier trials of the same slot (retries).
    pub attempt: usize,
    pub trial: Trial,
    pub run_dir: PathBuf,
}

/// The outcome of a claim attempt.
pub enum Claim {
    Trial(Box<Claimed>),
    /// Nothing claimable now, but trials are running elsewhere (they may finish or go stale).
    Wait,
    /// Every slot is done.
    AllDone,
}

/// How a trial ended (for progress lines).
pub struct Ended {
    pub status: &'static str,
    pub value: Option<f64>,
    /// The slot is done (not a failure that will be retried).
    pub last: bool,
}

pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl<'a> Ctx<'a> {
    fn liveness(&self) -> Liveness<'_> {
        Liveness { host: &self.host, root: &self.root, now_unix: now_unix(), stale_after_s: self.sweep.stale_after_s }
    }

    /// Claims the next trial for `device`.
    pub fn claim(&self, device: &str) -> Result<Claim> {
        self.journal.transact(|r| {
            let live = self.liveness();
            let states = study::slot_states(r.trials_of(self.study_id), self.sweep.max_retries, &live);
            let busy_keys: Vec<String> = r
                .trials_of(self.study_id)
                .filter(|t| t.state == TrialState::Running && study::is_alive(t, &live))
                .filter_map(|t| attr_str(t, "trial_key").map(str::to_string))
                .collect();
            let mut waiting = false;
            for (i, point) in self.plan.points.iter().enumerate() {
                let slot = point.slot();
                let (stale, attempt) = match states.get(&slot) {
                    Some(SlotState::Done(_)) => continue,
                    Some(SlotState::Running(_)) => {
                        waiting = true;
                        continue;
                    }
                    Some(SlotState::Open { stale, attempt }) => (stale.clone(), *attempt),
                    None => (Vec::new(), 0),
                };
                let planned = &self.plan.trials[i];
                let (trial, search) = if planned.pending {
                    let x = self.tpe_sample(r, point)?;
                    let t = self.planner.lock().unwrap_or_else(|p| p.into_inner()).resolve(point, Some(&x))?;
                    (t, Some(x))
                } else {
                    let x = match &point.search {
                        super::expand::SearchSlot::Fixed { internal, .. } => Some(internal.clone()),
                        _ => None,
                    };
                    (planned.clone(), x)
                };
                if busy_keys.contains(&trial.key) {
                    waiting = true; // the same config and seed is running in another slot
                    continue;
                }
                let run_dir = self.root.join(&trial.key);
                let who = Claimer { host: &self.host, pid: self.pid, pid_start: &self.pid_start, device, git_revision: &self.git_revision };
                let mut ops: Vec<Op> = stale.iter().flat_map(|&id| study::stale_ops(id)).collect();
                ops.push(study::claim_op(self.study_id, &trial, &run_dir, attempt, search.as_deref(), &who)?);
                let trial_id = r.next_trial_id();
                return Ok((ops, Claim::Trial(Box::new(Claimed { trial_id, attempt, trial, run_dir }))));
            }
            Ok((Vec::new(), if waiting { Claim::Wait } else { Claim::AllDone }))
        })
    }

    /// A TPE point for a pending slot: the replicate's values when another seed of the same
    /// search trial was sampled already, else a fresh TPE draw from the cell's finished trials.
    fn tpe_sample(&self, r: &super::journal::Replay, point: &super::expand::Point) -> Result<Vec<f64>> {
        let sp = self.sweep.search.as_ref().expect("search");
        let super::expand::SearchSlot::Pending { index } = point.search else { unreachable!("pending") };
        let cell_prefix = format!("c{}-", point.cell);
        let trial_prefix = format!("c{}-t{index}-", point.cell);
        let internal = |t: &super::journal::TrialRecord| -> Option<Vec<f64>> {
            t.user_attrs.get("search_internal")?.as_array()?.iter().map(|x| x.as_f64()).collect()
        };
        for t in r.trials_of(self.study_id) {
            if attr_str(t, "slot").is_some_and(|s| s.starts_with(&trial_prefix)) {
                if let Some(x) = internal(t) {
                    return Ok(x);
                }
            }
        }
        let mut obs = Vec::new();
        for t in r.trials_of(self.study_id) {
            if !attr_str(t, "slot").is_some_and(|s| s.starts_with(&cell_prefix)) {
                continue;
            }
            let value = match (t.state, attr_str(t, "status")) {
                (TrialState::Complete, _) => t.values.as_ref().and_then(|v| v.first().copied()),
                (TrialState::Fail, Some(study::DIVERGED)) => Some(f64::INFINITY),
                _ => None,
            };
            if let (Some(v), Some(x)) = (value, internal(t)) {
                obs.push((x.into_iter().map(Some).collect(), v));
            }
        }
        let mut rng = Rng::new(mix(mix(sp.seed, point.cell as u64), index as u64));
        Ok(tpe_point(&sp.parameters, &obs, &mut rng, sp.n_ei_candidates))
    }

    /// Runs a claimed trial to its end and records it.
    pub fn run_trial(&self, c: &Claimed, device: &str, slot: usize) -> Result<Ended> {
        let t = &c.trial;
        let dir = &c.run_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg = dir.join("trial.yaml");
        let text = format!(
            "# mixscale sweep {} trial {} ({}); resolved config\n{}",
            self.sweep.name,
            t.key,
            t.slot,
            serde_yaml_ng::to_string(&t.spec).expect("spec serializes")
        );
        crate::fsutil::write_atomic(&cfg, text.as_bytes()).map_err(|e| Error::io(&cfg, e))?;
        let hb = dir.join("heartbeat");
        let beat = || {
            let _ = std::fs::write(&hb, format!("{} {} {}\n", self.host, self.pid, now_unix()));
        };
        beat();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("train.log")).map_err(|e| Error::io(dir, e))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("train").arg(&cfg).arg("--out").arg(dir).arg("--resume").arg("--quiet");
        match device.strip_prefix("cuda:") {
            Some(n) => {
                cmd.env("CUDA_VISIBLE_DEVICES", n).args(["--device", "cuda:0"]);
            }
            None => {
                cmd.args(["--device", device]);
                if device == "cpu" {
                    cmd.env("RAYON_NUM_THREADS", self.cpu_threads.to_string());
                }
            }
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone().map_err(|e| Error::io(dir, e))?).stderr(log);
        super::proc::die_with_parent(&mut cmd);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| Error::io(&self.exe, e))?;
        self.events.started(slot, t, device);
        let mut reported = 0usize; // last reported step
        let mut curve: Vec<(usize, f64)> = Vec::new();
        let mut last_beat = Instant::now();
        let mut pruned = false;
        let status = loop {
            let exited = child.try_wait().map_err(|e| Error::io(&self.exe, e))?;
            let (rows, step, train_loss) = read_metrics(&dir.join("metrics.csv"));
            let new: Vec<(usize, f64)> = rows.into_iter().filter(|r| r.0 > reported).collect();
            if !new.is_empty() {
                reported = new.last().expect("non-empty").0;
                curve.extend(new.iter().copied());
                let ops = new.iter().map(|&(s, v)| Op::SetTrialIntermediateValue { trial_id: c.trial_id, step: s as u64, value: v }).collect();
                self.journal.append(ops)?;
                // Decide at every new point (a poll may bring several, e.g. a rung in between).
                let n = curve.len();
                let prune = exited.is_none() && self.sweep.early_terminate.is_some() && {
                    let mut any = false;
                    for k in (n - new.len() + 1)..=n {
                        if self.should_prune(c, &curve[..k])? {
                            any = true;
                            break;
                        }
                    }
                    any
                };
                if prune {
                    super::proc::terminate(&mut child, Duration::from_secs(5));
                    pruned = true;
                    break None;
                }
            }
            self.events.progress(slot, step, t.steps(), train_loss, curve.last().map(|c| c.1));
            if let Some(s) = exited {
                break Some(s);
            }
            if last_beat.elapsed().as_secs_f64() >= self.sweep.heartbeat_s {
                beat();
                last_beat = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let wall = started.elapsed().as_secs_f64();
        let summary: Option<Summary> = std::fs::read_to_string(dir.join("summary.json")).ok().and_then(|s| serde_json::from_str(&s).ok());
        let id = c.trial_id;
        let mut ops = vec![Op::SetTrialUserAttr { trial_id: id, key: "wall_time_s".into(), value: json!(wall) }];
        let attr = |ops: &mut Vec<Op>, k: &str, v: serde_json::Value| ops.push(Op::SetTrialUserAttr { trial_id: id, key: k.into(), value: v });
        let (state, values, status_name, value) = if pruned {
            let last = curve.last().map(|c| c.1);
            (TrialState::Pruned, last.map(|v| vec![v]), study::PRUNED, last)
        } else {
            let code = status.and_then(|s| s.code());
            match (&summary, code) {
                (Some(s), Some(0) | Some(3)) => {
                    attr(&mut ops, "tokens", json!(s.tokens));
                    attr(&mut ops, "compute", json!(s.compute));
                    attr(&mut ops, "steps", json!(s.steps));
                    attr(&mut ops, "train_wall_time_s", json!(s.wall_time_s));
                    if let Some(a) = s.val_accuracy {
                        attr(&mut ops, "val_accuracy", json!(a));
                    }
                    if let Some(r) = &s.reason {
                        attr(&mut ops, "reason", json!(r));
                    }
                    match (s.status, s.val_loss) {
                        (Status::Completed, Some(v)) if v.is_finite() => (TrialState::Complete, Some(vec![v]), study::COMPLETED, Some(v)),
                        _ => (TrialState::Fail, None, study::DIVERGED, None),
                    }
                }
                _ => {
                    let how = match (code, status) {
                        (Some(c), _) => format!("exit code {c}"),
                        (None, Some(s)) => format!("killed ({s})"),
                        _ => "unknown".into(),
                    };
                    attr(&mut ops, "reason", json!(format!("{how}; {}", log_tail(&dir.join("train.log")))));
                    (TrialState::Fail, None, study::FAILED, None)
                }
            }
        };
        ops.push(Op::SetTrialUserAttr { trial_id: id, key: "status".into(), value: json!(status_name) });
        ops.push(Op::set_state(id, state, values));
        self.journal.append(ops)?;
        let _ = std::fs::remove_file(&hb);
        let last = status_name != study::FAILED || c.attempt >= self.sweep.max_retries;
        Ok(Ended { status: status_name, value, last })
    }

    fn should_prune(&self, c: &Claimed, curve: &[(usize, f64)]) -> Result<bool> {
        let Some(et) = &self.sweep.early_terminate else { return Ok(false) };
        let r = self.journal.replay()?;
        let curves: Vec<(Vec<(usize, f64)>, bool, u64)> = r
            .trials_of(self.study_id)
            .filter(|t| t.trial_id != c.trial_id && attr_str(t, "trial_key") != Some(c.trial.key.as_str()))
            .map(|t| {
                let cv = t.intermediate.iter().map(|(s, v)| (*s as usize, *v)).collect();
                let key = attr_str(t, "config_hash").map(super::hash::hash_u64).unwrap_or(0);
                (cv, t.state == TrialState::Complete, key)
            })
            .collect();
        let peers: Vec<Peer> = curves.iter().map(|(cv, complete, key)| Peer { curve: cv, complete: *complete, bracket_key: *key }).collect();
        Ok(et.should_prune(super::hash::hash_u64(&c.trial.hash), curve, &peers))
    }
}

/// Validation points `(step, val_loss)` of a metrics.csv (complete lines only), the last
/// step and training loss.
pub fn read_metrics(path: &Path) -> (Vec<(usize, f64)>, usize, Option<f64>) {
    let Ok(text) = std::fs::read_to_string(path) else { return (Vec::new(), 0, None) };
    let mut lines = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
    let Some(header) = lines.next() else { return (Vec::new(), 0, None) };
    let cols: Vec<&str> = header.trim().split(',').collect();
    let idx = |n: &str| cols.iter().position(|c| *c == n);
    let (Some(si), Some(vi), ti) = (idx("step"), idx("val_loss"), idx("train_loss")) else { return (Vec::new(), 0, None) };
    let mut out = Vec::new();
    let (mut step, mut train) = (0, None);
    for l in lines {
        let f: Vec<&str> = l.trim().split(',').collect();
        let Some(s) = f.get(si).and_then(|x| x.parse::<usize>().ok()) else { continue };
        step = s;
        train = ti.and_then(|i| f.get(i)).and_then(|x| x.parse::<f64>().ok());
        if let Some(v) = f.get(vi).filter(|x| !x.is_empty()).and_then(|x| x.parse::<f64>().ok()) {
            out.push((s, v));
        }
    }
    (out, step, train)
}

/// The last non-empty line of a log (for failure reasons), shortened.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
    line.chars().take(300).collect()
}
