use mixscale::blocks;
use candle_core::{DType, Device};
use mixscale::config::{RunSpec, YamlDoc};
use mixscale::train::TrainOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tiny attention model + training config (trains in well under a second per step).
pub const TINY: &str = "\
model:
  vocab_size: 64
  d_model: 16
  n_layers: 2
  layer_pattern: [attention]
  blocks:
    attention: {num_heads: 2}
  ffn: {kind: swiglu, hidden_size: 32}
train:
  seed: 3
  seq_len: 16
  batch_size: 4
  micro_batch_size: 2
  steps: 8
  optimizer: {lr: 0.01}
  schedule: {kind: cosine, warmup_steps: 2}
  eval_every: 4
  eval_sequences: 4
  checkpoint_every: 0
  log_every: 1
data:
  kind: synthetic_language
  vocab_size: 64
";

/// Parses YAML text (as if from `name`) with overrides into a resolved spec.
pub fn spec_from(text: &str, sets: &[&str]) -> mixscale::Result<RunSpec> {
    let mut doc = YamlDoc::from_text(Path::new("tiny.yaml"), text.to_string())?;
    for s in sets {
        doc.apply_override(s)?;
    }
    let mut spec = RunSpec::from_doc(&doc)?;
    blocks::resolve_blocks(&doc, &mut spec.model)?;
    Ok(spec)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs the `mixscale` binary; returns (exit code, stdout, stderr).
pub fn mixscale(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mixscale")).args(args).output().expect("run mixscale");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Training options for a quiet CPU f32 run into `out`.
pub fn opts(out: &Path) -> TrainOptions {
    TrainOptions {
        out: out.to_path_buf(),
        resume: false,
        overwrite: false,
        stop_at_step: None,
        progress: false,
        device: Device::Cpu,
        dtype: DType::F32,
        config_file: "tiny.yaml".into(),
    }
}
