//! The PyTorch side of `mixscale bench`: the job file handed to `bench/torch_lm.py`, running it,
//! reading its JSON line, and the parameter-table comparison that decides whether the two
//! models are the same architecture (same parameter names, shapes and weight-decay flags).
//!
//! The job holds mixscale's *resolved* model config (the JSON of [`ModelSpec`] after `--set`
//! overrides, every block option filled in), the AdamW settings, the grad clip, batch, sequence
//! length, warmup and timed steps, threads, seed, and the path of a file with the very batches
//! mixscale trains on (u32 little-endian; per step inputs `[B,T]`, targets `[B,T]` and the loss
//! mask `[B,T]`, all ones when the data have none).

use crate::config::model::ModelSpec;
use crate::config::RunSpec;
use crate::model::LanguageModel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Parameter name → (shape, weight-decayed), mixscale's names.
pub type ParamTable = BTreeMap<String, (Vec<usize>, bool)>;

/// The parameter table of a mixscale model (buffers excluded).
pub fn param_table(model: &LanguageModel) -> ParamTable {
    use crate::model::params::ParamKind;
    model
        .params
        .params
        .iter()
        .filter(|(_, p)| p.kind != ParamKind::Buffer)
        .map(|(k, p)| (k.clone(), (p.var.dims().to_vec(), p.decay)))
        .collect()
}

/// Why two parameter tables differ (None when they are equal): at most a few names listed.
pub fn compare_params(mixscale: &ParamTable, torch: &ParamTable) -> Option<String> {
    let mut diffs = Vec::new();
    for (k, v) in mixscale {
        match torch.get(k) {
            None => diffs.push(format!("{k} missing in torch")),
            Some(t) if t.0 != v.0 => diffs.push(format!("{k} shape {:?} vs torch {:?}", v.0, t.0)),
            Some(t) if t.1 != v.1 => diffs.push(format!("{k} decay {} vs torch {}", v.1, t.1)),
            _ => {}
        }
    }
    diffs.extend(torch.keys().filter(|k| !mixscale.contains_key(*k)).map(|k| format!("{k} only in torch")));
    if diffs.is_empty() {
        return None;
    }
    let n = diffs.len();
    diffs.truncate(4);
    Some(format!("{n} parameter difference(s): {}{}", diffs.join("; "), if n > 4 { "; ..." } else { "" }))
}

/// The job file `torch_lm.py --model-json` reads.
#[derive(Clone, Debug, Serialize)]
pub struct TorchJob {
    pub model: ModelSpec,
    pub optimizer: crate::config::train::AdamWSpec,
    pub grad_clip: f64,
    pub batch: usize,
    pub seq_len: usize,
    pub warmup: usize,
    pub steps: usize,
    pub threads: usize,
    pub seed: u64,
    pub tokens_file: Option<PathBuf>,
    /// Start from these weights (safetensors written by mixscale) instead of a fresh init.
    pub init_weights: Option<PathBuf>,
}

impl TorchJob {
    pub fn new(spec: &RunSpec, batch: usize, seq_len: usize, warmup: usize, steps: usize, threads: usize, tokens_file: Option<PathBuf>) -> Self {
        Self {
            model: spec.model.clone(),
            optimizer: spec.train.optimizer.clone(),
            grad_clip: spec.train.grad_clip,
            batch,
            seq_len,
            warmup,
            steps,
            threads,
            seed: spec.train.seed,
            tokens_file,
            init_weights: None,
        }
    }
}

/// What `torch_lm.py` reports (one JSON line).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TorchRun {
    #[serde(default)]
    pub torch_version: String,
    #[serde(default)]
    pub tokens_per_s: f64,
    #[serde(default)]
    pub step_ms: f64,
    pub params_total: usize,
    pub param_table: ParamTable,
    #[serde(default)]
    pub peak_rss_kb: Option<u64>,
    #[serde(default)]
    pub losses: Vec<f64>,
    #[serde(default)]
    pub grad_norms: Vec<f64>,
}

/// A path that exists, or a bare program name found on PATH (e.g. `python3`).
pub fn python_exists(p: &Path) -> bool {
    if p.components().count() > 1 || p.exists() {
        return p.exists();
    }
    std::env::var_os("PATH").map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file())).unwrap_or(false)
}

/// Runs `torch_lm.py` (in `bench_dir`) on the jobs (written under `work`), one JSON line each;
/// `params_only` builds the models without training. Errors are one-line messages.
pub fn run_torch(python: &Path, bench_dir: &Path, work: &Path, jobs: &[TorchJob], params_only: bool) -> Result<Vec<TorchRun>, String> {
    let mut cmd = torch_command(python, bench_dir, work, jobs, params_only)?;
    let out = cmd.output().map_err(|e| format!("could not run {}: {e}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("PyTorch reference failed: {}", err.lines().last().unwrap_or("(no message)")));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let runs: Vec<TorchRun> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).map_err(|e| format!("unreadable PyTorch output ({e}): {}", l.chars().take(200).collect::<String>())))
        .collect::<Result<_, _>>()?;
    if runs.len() != jobs.len() {
        return Err(format!("PyTorch reference printed {} results for {} jobs", runs.len(), jobs.len()));
    }
    Ok(runs)
}

/// The `torch_lm.py` command for the jobs (their files written under `work`), with the thread
/// count of the first job in OpenMP's and MKL's variables.
pub fn torch_command(python: &Path, bench_dir: &Path, work: &Path, jobs: &[TorchJob], params_only: bool) -> Result<std::process::Command, String> {
    if !python_exists(python) {
        return Err(format!("{} not found; run bench/setup_torch.sh to compare with PyTorch", python.display()));
    }
    let script = bench_dir.join("torch_lm.py");
    if !script.is_file() {
        return Err(format!("{} not found", script.display()));
    }
    let mut cmd = std::process::Command::new(python);
    cmd.arg(&script);
    for (i, job) in jobs.iter().enumerate() {
        let path = work.join(format!("torch_job_{i}.json"));
        let text = serde_json::to_string(job).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        cmd.arg("--model-json").arg(path);
    }
    if params_only {
        cmd.arg("--params-only");
    }
    if let Some(t) = jobs.first().map(|j| j.threads.to_string()) {
        cmd.env("OMP_NUM_THREADS", &t).env("MKL_NUM_THREADS", &t);
    }
    Ok(cmd)
}
