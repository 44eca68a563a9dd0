//! `mixscale bench`: training throughput (tokens/s, model FLOP/s) of one architecture at a
//! given batch and sequence length, and — when `bench/.venv` holds PyTorch — the same model in
//! PyTorch eager (`bench/torch_lm.py`) timed in the same run, with the ratio.

use super::{compute_grads, global_norm, optim::AdamW};
use crate::config::RunSpec;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::model::count::Accounting;
use crate::model::LanguageModel;
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub warmup: usize,
    pub threads: usize,
    /// Python with torch; skipped when it does not exist.
    pub torch_python: std::path::PathBuf,
    pub device: Device,
    /// Also time the phases of each step (forward, backward, grad norm, clipped optimizer step).
    pub profile: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub tokens_per_s: f64,
    pub step_ms: f64,
    pub model_flops_per_s: f64,
    pub params_total: usize,
    pub torch_tokens_per_s: Option<f64>,
    pub torch_note: String,
    /// Mean milliseconds per timed step of each phase (with `profile`), in step order.
    pub phases: Vec<(String, f64)>,
}

pub fn bench(spec: &RunSpec, o: &BenchOptions) -> Result<BenchReport> {
    let dev = o.device.clone();
    let model = LanguageModel::new(&spec.model, o.seq_len, spec.train.seed, DType::F32, &dev)?;
    let acc = Accounting::of(&model, o.seq_len);
    let data = DataSource::new(&spec.data, spec.train.seed, o.seq_len)?;
    let mut opt = AdamW::new(&spec.train.optimizer, &model.params)?;
    let batches: Vec<_> = (0..o.warmup + o.steps).map(|i| data.train_batch((i * o.batch) as u64, o.batch, &dev)).collect::<Result<_>>()?;
    let mut elapsed = 0.0;
    let mut phases: Vec<(String, f64)> = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let t0 = Instant::now();
        let mut marks: Vec<(&str, Instant)> = Vec::new();
        let grads = if o.profile && !matches!(model.mtp, Some(crate::model::mtp::Mtp::Gloeckle { .. })) {
            // The same computation as `compute_grads` (one micro-batch), split at the phases.
            crate::model::objective::begin_step(&model);
            let terms = crate::model::mtp::loss_terms(&model, &b.inputs, &b.targets, b.mask.as_ref())?;
            let total = terms.total()?;
            total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            marks.push(("forward", Instant::now()));
            let g = total.backward()?;
            let mut grads = std::collections::BTreeMap::new();
            crate::model::mtp::collect_grads(&model, &g, &mut grads)?;
            drop(g);
            marks.push(("backward", Instant::now()));
            grads
        } else {
            let (_loss, grads) = compute_grads(&model, 1, |_| Ok(crate::data::Batch { inputs: b.inputs.clone(), targets: b.targets.clone(), true_nlp: None, mask: b.mask.clone() }))?;
            marks.push(("forward+backward", Instant::now()));
            grads
        };
        let n = global_norm(&grads)?;
        marks.push(("grad norm", Instant::now()));
        opt.step_clipped(&model.params, &grads, spec.train.optimizer.lr, super::optim::clip_coef(n, spec.train.grad_clip))?;
        o.device.synchronize()?;
        marks.push(("optimizer", Instant::now()));
        drop(grads);
        marks.push(("free", Instant::now()));
        if i >= o.warmup {
            elapsed += t0.elapsed().as_secs_f64();
            let mut prev = t0;
            for (k, (name, t)) in marks.iter().enumerate() {
                let ms = 1000.0 * (*t - prev).as_secs_f64() / o.steps as f64;
                match phases.get_mut(k) {
                    Some(p) => p.1 += ms,
                    None => phases.push((name.to_string(), ms)),
                }
                prev = *t;
            }
        }
    }
    if !o.profile {
        phases.clear();
    }
    let tokens = (o.steps * o.batch * o.seq_len) as f64;
    let tps = tokens / elapsed;
    let (torch_tokens_per_s, torch_note) = run_torch(spec, o, acc.params_total);
    Ok(BenchReport {
        tokens_per_s: tps,
        step_ms: 1000.0 * elapsed / o.steps as f64,
        model_flops_per_s: tps * acc.flops_per_token,
        params_total: acc.params_total,
        torch_tokens_per_s,
        torch_note,
        phases,
    })
}

/// Runs `bench/torch_lm.py` with the same model and batch, when possible.
fn run_torch(spec: &RunSpec, o: &BenchOptions, params: usize) -> (Option<f64>, String) {
    let m = &spec.model;
    if !o.device.is_cpu() {
        return (None, "the PyTorch reference runs on the CPU only".into());
    }
    if m.layer_pattern.iter().any(|b| b != "attention") {
        return (None, "no PyTorch reference for this architecture yet".into());
    }
    if !python_exists(&o.torch_python) {
        return (None, format!("{} not found; run bench/setup_torch.sh to compare with PyTorch", o.torch_python.display()));
    }
    let a: crate::blocks::attention::AttentionConfig = match crate::blocks::parse(&m.blocks["attention"]) {
        Ok(a) => a,
        Err(e) => return (None, e.to_string()),
    };
    let ffn = match m.ffn.kind {
        crate::config::model::FfnKind::Swiglu => "swiglu",
        crate::config::model::FfnKind::Relu2 => "relu2",
        crate::config::model::FfnKind::Rwkv7Cmix => return (None, "no PyTorch reference for the rwkv7_cmix FFN".into()),
    };
    let mut cmd = std::process::Command::new(&o.torch_python);
    cmd.arg(Path::new("bench").join("torch_lm.py"));
    let args: Vec<String> = vec![
        "--vocab".into(), m.vocab_size.to_string(),
        "--d-model".into(), m.d_model.to_string(),
        "--n-layers".into(), m.n_layers.to_string(),
        "--n-heads".into(), a.num_heads.to_string(),
        "--n-kv-heads".into(), a.kv_heads().to_string(),
        "--head-dim".into(), a.head_dim(m.d_model).to_string(),
        "--ffn-hidden".into(), m.ffn.hidden(m.d_model).to_string(),
        "--ffn".into(), ffn.into(),
        "--rope-theta".into(), a.rope_theta.to_string(),
        "--seq-len".into(), o.seq_len.to_string(),
        "--batch".into(), o.batch.to_string(),
        "--warmup".into(), o.warmup.to_string(),
        "--steps".into(), o.steps.to_string(),
        "--threads".into(), o.threads.to_string(),
        "--lr".into(), spec.train.optimizer.lr.to_string(),
    ];
    cmd.args(&args);
    if a.qk_norm {
        cmd.arg("--qk-norm");
    }
    if !m.tied_embeddings {
        cmd.arg("--untied");
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => return (None, format!("could not run PyTorch reference: {e}")),
    };
    if !out.status.success() {
        return (None, format!("PyTorch reference failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(v) => {
            let tps = v["tokens_per_s"].as_f64();
            let tp = v["params_total"].as_u64().unwrap_or(0) as usize;
            let note = if tp != params { format!("parameter counts differ: torch {tp} vs mixscale {params}") } else { format!("torch {}", v["torch_version"].as_str().unwrap_or("?")) };
            (tps, note)
        }
        Err(e) => (None, format!("unreadable PyTorch output ({e}): {line}")),
    }
}

/// A path that exists, or a bare program name found on PATH (e.g. `python3`).
fn python_exists(p: &Path) -> bool {
    if p.components().count() > 1 || p.exists() {
        return p.exists();
    }
    std::env::var_os("PATH").map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file())).unwrap_or(false)
}

impl BenchReport {
    pub fn check(&self) -> Result<()> {
        if !self.tokens_per_s.is_finite() {
            return Err(Error::Other("benchmark produced no timing".into()));
        }
        Ok(())
    }
}
