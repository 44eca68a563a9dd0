//! `mixscale sweep slurm`: an sbatch job-array script whose tasks run `mixscale sweep worker`.
//!
//! Every array task is one worker: it claims trials from the shared journal
//! (`runs/<sweep>/study.journal` on a file system all nodes see, e.g. NFS — Optuna's lock
//! protocol works there) until none is left, so the array size is the parallelism, not the
//! number of trials. Slurm sets `CUDA_VISIBLE_DEVICES` for the task's GPUs, so the worker uses
//! `cuda:0`. A task that dies leaves a RUNNING trial whose heartbeat stops; another worker
//! re-queues it after `stale_after_s` and resumes it from its checkpoint.

use std::path::Path;

/// Options of the generated script.
#[derive(Clone, Debug)]
pub struct SlurmOptions {
    pub array: usize,
    /// Concurrent tasks (`--array=0-N%K`); `None` = no limit.
    pub max_parallel: Option<usize>,
    pub gpus_per_task: usize,
    pub cpus_per_task: usize,
    pub mem: Option<String>,
    pub time: String,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// The mixscale binary on the cluster.
    pub binary: String,
    pub runs_dir: String,
}

/// The script text for the sweep file at `sweep_file` named `name`.
pub fn script(name: &str, sweep_file: &Path, o: &SlurmOptions) -> String {
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(&format!("# mixscale sweep workers for `{name}` ({}).\n", sweep_file.display()));
    s.push_str("# Submit with: sbatch <this file>. Each array task is one worker claiming trials from the\n");
    s.push_str(&format!("# shared journal {}/{name}/study.journal until the sweep is done.\n", o.runs_dir));
    s.push_str(&format!("#SBATCH --job-name=mixscale-{name}\n"));
    let limit = o.max_parallel.map(|k| format!("%{k}")).unwrap_or_default();
    s.push_str(&format!("#SBATCH --array=0-{}{limit}\n", o.array.max(1) - 1));
    s.push_str("#SBATCH --ntasks=1\n");
    s.push_str(&format!("#SBATCH --cpus-per-task={}\n", o.cpus_per_task.max(1)));
    if o.gpus_per_task > 0 {
        s.push_str(&format!("#SBATCH --gpus-per-task={}\n", o.gpus_per_task));
    }
    if let Some(m) = &o.mem {
        s.push_str(&format!("#SBATCH --mem={m}\n"));
    }
    s.push_str(&format!("#SBATCH --time={}\n", o.time));
    if let Some(p) = &o.partition {
        s.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    if let Some(a) = &o.account {
        s.push_str(&format!("#SBATCH --account={a}\n"));
    }
    s.push_str(&format!("#SBATCH --output={}/{name}/slurm-%A_%a.out\n\n", o.runs_dir));
    s.push_str("set -euo pipefail\n");
    s.push_str(&format!("mkdir -p {}/{name}\n", o.runs_dir));
    s.push_str(&format!("export RAYON_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{}}}\n", o.cpus_per_task.max(1)));
    let device = if o.gpus_per_task > 0 {
        (0..o.gpus_per_task).map(|i| format!("--device cuda:{i}")).collect::<Vec<_>>().join(" ")
    } else {
        "--device cpu".into()
    };
    s.push_str(&format!(
        "srun {} sweep worker {} --runs-dir {} {device}\n",
        o.binary,
        sweep_file.display(),
        o.runs_dir
    ));
    s
}
