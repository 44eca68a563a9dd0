//! `mixscale sweep …` subcommands (see src/sweep/).

use anyhow::Result;
use clap::Subcommand;
use mixscale::sweep::{plan::Plan, runner, slurm, spec::SweepSpec, status};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum SweepCmd {
    /// Print the expanded trials (varying values, parameters, tokens, compute) without running.
    Plan { sweep: PathBuf },
    /// Run (or continue) the sweep on its devices; results.csv and analysis when done.
    Run {
        sweep: PathBuf,
        /// Folder holding runs/<sweep name>/.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Devices instead of the sweep's `devices` (repeatable): cpu, cuda:0, …
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Trials per device instead of the sweep's `trials_per_device`.
        #[arg(long)]
        trials_per_device: Option<usize>,
        /// No progress output.
        #[arg(long)]
        quiet: bool,
    },
    /// Claim and run trials from the shared journal until none is left (start many).
    Worker {
        sweep: PathBuf,
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Device(s) of this worker (repeatable; default: the sweep's first device).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Concurrent trials per device.
        #[arg(long, default_value_t = 1)]
        slots: usize,
        /// Stop after this many trials.
        #[arg(long)]
        max_trials: Option<usize>,
        #[arg(long)]
        quiet: bool,
    },
    /// Table of trials (state, objective, tokens, wall time) and the best.
    Status {
        sweep: PathBuf,
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
    },
    /// Write an sbatch job-array script whose tasks run `mixscale sweep worker`.
    Slurm {
        sweep: PathBuf,
        /// Array tasks (= workers).
        #[arg(long)]
        array: usize,
        /// At most this many tasks at once (`%K`).
        #[arg(long)]
        max_parallel: Option<usize>,
        #[arg(long, default_value_t = 1)]
        gpus_per_task: usize,
        #[arg(long, default_value_t = 8)]
        cpus_per_task: usize,
        #[arg(long)]
        mem: Option<String>,
        #[arg(long, default_value = "24:00:00")]
        time: String,
        #[arg(long)]
        partition: Option<String>,
        #[arg(long)]
        account: Option<String>,
        /// The mixscale binary as the cluster sees it.
        #[arg(long, default_value = "mixscale")]
        binary: String,
        #[arg(long, default_value = "runs")]
        runs_dir: String,
        /// Script path (default runs/<sweep>/slurm.sbatch).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(cmd: SweepCmd) -> Result<i32> {
    match cmd {
        SweepCmd::Plan { sweep } => {
            let s = SweepSpec::load(&sweep)?;
            let plan = Plan::build(&s)?;
            print!("{}", plan.render(&s));
            Ok(0)
        }
        SweepCmd::Run { sweep, runs_dir, devices, trials_per_device, quiet } => {
            let s = SweepSpec::load(&sweep)?;
            let opts = runner::RunOptions {
                runs_dir: runs_dir.clone(),
                devices: (!devices.is_empty()).then_some(devices),
                per_device: trials_per_device,
                max_trials: None,
                quiet,
                finalize: true,
                analysis: true,
                exe: None,
            };
            let r = runner::run(&s, &opts)?;
            finish(&s, &runs_dir, &r, quiet)
        }
        SweepCmd::Worker { sweep, runs_dir, devices, slots, max_trials, quiet } => {
            let s = SweepSpec::load(&sweep)?;
            let devices = if devices.is_empty() { vec![s.devices[0].clone()] } else { devices };
            let opts = runner::RunOptions {
                runs_dir: runs_dir.clone(),
                devices: Some(devices),
                per_device: Some(slots),
                max_trials,
                quiet,
                finalize: true,
                analysis: false,
                exe: None,
            };
            let r = runner::run(&s, &opts)?;
            if !quiet {
                eprintln!("worker: ran {} trial(s); sweep {}/{} done", r.ran, r.done, r.total);
            }
            Ok(0)
        }
        SweepCmd::Status { sweep, runs_dir } => {
            let s = SweepSpec::load(&sweep)?;
            let plan = Plan::build(&s)?;
            print!("{}", status::render(&s, &plan, &runner::journal_path(&runs_dir, &s))?);
            Ok(0)
        }
        SweepCmd::Slurm { sweep, array, max_parallel, gpus_per_task, cpus_per_task, mem, time, partition, account, binary, runs_dir, out } => {
            let s = SweepSpec::load(&sweep)?;
            let o = slurm::SlurmOptions { array, max_parallel, gpus_per_task, cpus_per_task, mem, time, partition, account, binary, runs_dir: runs_dir.clone() };
            let text = slurm::script(&s.name, &sweep, &o);
            let out = out.unwrap_or_else(|| PathBuf::from(&runs_dir).join(&s.name).join("slurm.sbatch"));
            if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&out, text)?;
            println!("wrote {} ({array} workers); submit with: sbatch {}", out.display(), out.display());
            Ok(0)
        }
    }
}

fn finish(s: &SweepSpec, runs_dir: &std::path::Path, r: &runner::RunReport, quiet: bool) -> Result<i32> {
    if !quiet {
        let plan = Plan::build(s)?;
        print!("{}", status::render(s, &plan, &runner::journal_path(runs_dir, s))?);
        if let Some(p) = &r.results_csv {
            println!("results: {}", p.display());
        }
    }
    match &r.analysis {
        Some(Ok(dir)) => {
            if !quiet {
                println!("analysis: {} (report.md, report.html, fits and plots)", dir.display());
            }
        }
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return Ok(4);
        }
        None => {}
    }
    Ok(if r.done == r.total { 0 } else { 1 })
}
