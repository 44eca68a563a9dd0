//! Checkpoints, written atomically: files go to `ckpt-<step>.tmp/` (each fsynced), the folder is
//! renamed to `ckpt-<step>/`, then the pointer `checkpoint.json` is replaced by rename. A kill at
//! any moment leaves either the previous complete checkpoint or the new one. Older checkpoint
//! folders are removed after the pointer moves.
//!
//! Contents: `model.safetensors` (weights), `optimizer.safetensors` (AdamW m, v),
//! `state.json` ([`TrainState`]: step, tokens, data position, AdamW t, first loss).

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use crate::fsutil::sync_dir;
use std::path::Path;

/// Everything besides tensors needed to continue a run bit-exactly.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    pub tokens: u64,
    /// Next training sequence index (the data stream is a pure function of seed and index;
    /// there is no other sampler RNG state).
    pub data_position: u64,
    pub adam_t: u64,
    /// Loss of the first step (the divergence threshold is relative to it).
    pub first_loss: Option<f64>,
    pub seed: u64,
}

#[derive(Serialize, Deserialize)]
struct Pointer {
    step: usize,
    dir: String,
}

/// Writes a file and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsutil::write_synced(path, bytes).map_err(|e| Error::io(path, e))
}

/// Atomically replaces `path` with `bytes` (see [`crate::fsutil::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsutil::write_atomic(path, bytes).map_err(|e| Error::io(path, e))
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path)?;
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Saves a checkpoint of `state.step` under `run_dir`.
pub fn save(run_dir: &Path, state: &TrainState, weights: &HashMap<String, Tensor>, optim: &HashMap<String, Tensor>) -> Result<()> {
    let name = format!("ckpt-{:07}", state.step);
    let tmp = run_dir.join(format!("{name}.tmp"));
    let dst = run_dir.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_tensors(&tmp.join("model.safetensors"), weights)?;
    save_tensors(&tmp.join("optimizer.safetensors"), optim)?;
    write_synced(&tmp.join("state.json"), serde_json::to_string_pretty(state).expect("state serializes").as_bytes())?;
    sync_dir(&tmp);
    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
    }
    fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    sync_dir(run_dir);
    let ptr = Pointer { step: state.step, dir: name.clone() };
    write_atomic(&run_dir.join("checkpoint.json"), serde_json::to_string(&ptr).expect("ptr").as_bytes())?;
    // Remove older checkpoints and stale temp folders.
    if let Ok(rd) = fs::read_dir(run_dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("ckpt-") && n != name {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// A loaded checkpoint.
pub struct Loaded {
    pub state: TrainState,
    pub weights: HashMap<String, Tensor>,
    pub optim: HashMap<String, Tensor>,
}

/// True when `run_dir` holds a checkpoint pointer.
pub fn exists(run_dir: &Path) -> bool {
    run_dir.join("checkpoint.json").exists()
}

/// Loads the checkpoint `checkpoint.json` points to.
pub fn load(run_dir: &Path, dev: &Device) -> Result<Loaded> {
    let ptr_path = run_dir.join("checkpoint.json");
    let text = fs::read_to_string(&ptr_path).map_err(|e| Error::io(&ptr_path, e))?;
    let ptr: Pointer = serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", ptr_path.display())))?;
    let dir = run_dir.join(&ptr.dir);
    let sp = dir.join("state.json");
    let st = fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainState = serde_json::from_str(&st).map_err(|e| Error::Input(format!("{}: {e}", sp.display())))?;
    let load = |f: &str| {
        let p = dir.join(f);
        candle_core::safetensors::load(&p, dev).map_err(|e| Error::Input(format!("{}: {e}", p.display())))
    };
    Ok(Loaded { state, weights: load("model.safetensors")?, optim: load("optimizer.safetensors")? })
}
