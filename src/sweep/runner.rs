//! `mixscale sweep run` and `mixscale sweep worker`: plan, open the study, run slots, finish.
//!
//! Both are the same loop; `run` uses the sweep's `devices × trials_per_device` slots and, when
//! every trial is done, writes `results.csv` and runs the `analysis:` section; `worker` runs
//! one slot on the device given on its command line (or the sweep's first) and is meant to be
//! started many times, on many machines sharing `runs/<sweep>/` (e.g. by a Slurm job array).
//! Re-running either after any interruption continues the sweep: finished trials are skipped,
//! interrupted ones resume from their checkpoints.

use super::journal::Journal;
use super::plan::{Plan, Planner};
use super::pool::{run_slots, Events};
use super::spec::SweepSpec;
use super::study::{self, Liveness, SlotState};
use super::worker::{now_unix, Ctx};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Parent of the sweep folder (`runs`).
    pub runs_dir: PathBuf,
    /// Devices for this process (default: the sweep's).
    pub devices: Option<Vec<String>>,
    /// Slots per device (default: the sweep's `trials_per_device`).
    pub per_device: Option<usize>,
    /// Stop after this many trials (workers).
    pub max_trials: Option<usize>,
    pub quiet: bool,
    /// Write results.csv (and run the analysis) when everything is done.
    pub finalize: bool,
    /// Run the sweep's `analysis:` section after results.csv.
    pub analysis: bool,
    /// The `mixscale` binary for trials (default: this executable).
    pub exe: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    pub ran: usize,
    pub total: usize,
    /// Slots done (any outcome).
    pub done: usize,
    pub results_csv: Option<PathBuf>,
    /// The analysis folder, or why the analysis failed (its report is still written).
    pub analysis: Option<std::result::Result<PathBuf, String>>,
}

/// `runs/<sweep>` and its journal path.
pub fn sweep_dir(runs_dir: &Path, sweep: &SweepSpec) -> PathBuf {
    runs_dir.join(&sweep.name)
}
pub fn journal_path(runs_dir: &Path, sweep: &SweepSpec) -> PathBuf {
    sweep_dir(runs_dir, sweep).join("study.journal")
}

/// Counts done slots of the plan in the journal.
pub fn count_done(journal: &Journal, study_id: u64, plan: &Plan, sweep: &SweepSpec, runs_dir: &Path) -> Result<usize> {
    let r = journal.replay()?;
    let host = super::proc::hostname();
    let root = sweep_dir(runs_dir, sweep);
    let live = Liveness { host: &host, root: &root, now_unix: now_unix(), stale_after_s: sweep.stale_after_s };
    let states = study::slot_states(r.trials_of(study_id), sweep.max_retries, &live);
    Ok(plan.points.iter().filter(|p| matches!(states.get(&p.slot()), Some(SlotState::Done(_)))).count())
}

/// Runs (or continues) a sweep.
pub fn run(sweep: &SweepSpec, opts: &RunOptions) -> Result<RunReport> {
    let plan = Plan::build(sweep)?;
    let root = sweep_dir(&opts.runs_dir, sweep);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    // Provenance: the sweep file as run (the journal's study attrs name it too).
    let copy = root.join("sweep.yaml");
    crate::fsutil::write_atomic(&copy, sweep.doc.text().as_bytes()).map_err(|e| Error::io(&copy, e))?;
    let journal = Journal::open(&journal_path(&opts.runs_dir, sweep))?;
    let study_id = study::ensure_study(&journal, &sweep.name, &sweep.doc.file.display().to_string())?;
    let devices = opts.devices.clone().unwrap_or_else(|| sweep.devices.clone());
    let per_device = opts.per_device.unwrap_or(sweep.trials_per_device).max(1);
    let cpu_slots = devices.iter().filter(|d| *d == "cpu").count() * per_device;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let total = plan.points.len();
    let done = count_done(&journal, study_id, &plan, sweep, &opts.runs_dir)?;
    let pid = std::process::id();
    let exe = match &opts.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().map_err(|e| Error::Other(format!("cannot find the mixscale binary: {e}")))?,
    };
    let ctx = Ctx {
        sweep,
        plan: &plan,
        planner: Mutex::new(Planner::new(sweep)?),
        journal,
        study_id,
        root: root.clone(),
        host: super::proc::hostname(),
        pid,
        pid_start: super::proc::process_start(pid).unwrap_or_else(|| "alive".into()),
        git_revision: crate::train::record::git_revision(),
        exe,
        cpu_threads: (cores / cpu_slots.max(1)).max(1),
        events: Events::new(total, done, devices.len() * per_device, opts.quiet),
    };
    if !opts.quiet {
        ctx.events.note(format!(
            "sweep {}: {total} trials, {done} done; {} slot(s) on {}; journal {}",
            sweep.name,
            devices.len() * per_device,
            devices.join(", "),
            ctx.journal.path().display()
        ));
    }
    let ran = run_slots(&ctx, &devices, per_device, opts.max_trials)?;
    let done = count_done(&ctx.journal, study_id, &plan, sweep, &opts.runs_dir)?;
    let (mut results_csv, mut analysis) = (None, None);
    if opts.finalize && done == total {
        let p = super::results::write(&ctx.journal, study_id, &plan, sweep.max_retries, &root)?;
        if let (Some(a), true) = (&sweep.analysis, opts.analysis) {
            let out = root.join("analysis");
            analysis = Some(super::analysis_hook::run(sweep, a, &p, &out).map(|_| out).map_err(|e| e.to_string()));
        }
        results_csv = Some(p);
    }
    Ok(RunReport { ran, total, done, results_csv, analysis })
}
