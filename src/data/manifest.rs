//! `dataset.json`: what `mixscale data prepare` wrote, beside the shards. Training reads it for
//! the validation split's bytes per token, which turns the per-token loss into **bits per
//! byte** (comparable across tokenizers):
//!
//! `val_bpb = (val_loss_nats / ln 2) × val.tokens / val.bytes`
//!
//! where `val.bytes` is the total UTF-8 bytes of the validation documents' text (separators
//! not counted) and `val.tokens` the total tokens of the validation shards (each document's
//! tokens plus its one end-of-text token). The loss is a mean over the evaluated windows, so
//! this assumes their bytes per token is the split's; it is exact when the evaluation covers
//! the whole split.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the manifest.
pub const MANIFEST: &str = "dataset.json";

/// One shard file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    /// File name, relative to the manifest's folder.
    pub file: String,
    pub tokens: u64,
}

/// One split (train or val).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub documents: u64,
    /// UTF-8 bytes of the documents' text.
    pub bytes: u64,
    /// Tokens written, end-of-text tokens included.
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

impl SplitInfo {
    /// Bytes of text per token (None for an empty split).
    pub fn bytes_per_token(&self) -> Option<f64> {
        (self.tokens > 0 && self.bytes > 0).then(|| self.bytes as f64 / self.tokens as f64)
    }
}

/// The tokenizer a dataset was made with.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenizerInfo {
    /// `tiktoken`, `tokenizer_json` or `trained_bpe`.
    pub kind: String,
    /// Encoding name (`gpt2`, ...) or the tokenizer file as given.
    pub name: String,
    /// `tokenizer.json` to decode with, relative to the manifest's folder when it was trained
    /// here (`trained_bpe`), else as given; absent for compiled-in encodings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `dataset.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always `llmc` (`data.format: llmc`).
    pub format: String,
    /// `uint16` (vocab ≤ 65536) or `uint32`.
    pub dtype: String,
    pub tokenizer: TokenizerInfo,
    pub vocab_size: usize,
    pub eot_id: u32,
    /// Where the end-of-text token goes: before every document, as llm.c's `fineweb.py`.
    pub eot_placement: String,
    /// Maximum tokens per shard.
    pub shard_tokens: u64,
    pub val_fraction: f64,
    pub seed: u64,
    /// How input text became documents: `file`, `paragraph` or `line` (JSONL: one per line).
    pub doc_split: String,
    pub jsonl_field: String,
    /// The input files, in the order read.
    pub inputs: Vec<String>,
    pub train: SplitInfo,
    pub val: SplitInfo,
    pub mixscale_version: String,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: not a mixscale dataset manifest: {e}", path.display())))
    }
}

/// The validation bytes per token for a `tokens` data section: `explicit`
/// (`data.val_bytes_per_token`), else the manifest `manifest` (`data.manifest`; it must list
/// exactly `val_files`), else a `dataset.json` beside the first validation file when it lists
/// exactly `val_files` (otherwise None).
pub fn val_bytes_per_token(explicit: Option<f64>, manifest: Option<&str>, val_files: &[PathBuf]) -> Result<Option<f64>> {
    if let Some(b) = explicit {
        if !(b.is_finite() && b > 0.0) {
            return Err(Error::Input(format!("data.val_bytes_per_token: {b} must be a positive number")));
        }
        return Ok(Some(b));
    }
    let names: Vec<String> = val_files.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()).collect();
    let listed = |m: &Manifest| {
        let mut l: Vec<String> = m.val.shards.iter().map(|s| s.file.clone()).collect();
        l.sort();
        let mut n = names.clone();
        n.sort();
        l == n
    };
    if let Some(p) = manifest {
        let path = Path::new(p);
        let m = Manifest::load(path)?;
        if !listed(&m) {
            return Err(Error::Input(format!(
                "data.manifest: {} lists validation shards [{}] but data.val matches [{}]",
                path.display(),
                m.val.shards.iter().map(|s| s.file.as_str()).collect::<Vec<_>>().join(", "),
                names.join(", ")
            )));
        }
        return m.val.bytes_per_token().map(Some).ok_or_else(|| Error::Input(format!("data.manifest: {}: the validation split is empty", path.display())));
    }
    let Some(dir) = val_files.first().and_then(|f| f.parent()) else { return Ok(None) };
    let beside = if dir.as_os_str().is_empty() { PathBuf::from(MANIFEST) } else { dir.join(MANIFEST) };
    match Manifest::load(&beside) {
        Ok(m) if listed(&m) => Ok(m.val.bytes_per_token()),
        _ => Ok(None),
    }
}
