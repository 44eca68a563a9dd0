//! What a run writes besides checkpoints: `metrics.csv` (one row per logged step) and
//! `summary.json` (written once, when the run ends as completed or diverged — a folder without
//! it is a run that has not finished).

use crate::error::{Error, Result};
use crate::model::count::Accounting;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS_HEADER: &str = "step,tokens,lr,train_loss,val_loss,grad_norm,tokens_per_s";
/// Extra last column of tasks that score only some positions (MQAR): accuracy on the scored
/// validation positions. Other sources keep the header above unchanged.
pub const ACCURACY_COLUMN: &str = "val_accuracy";
/// Extra last column of token data whose bytes per token is known (`dataset.json`):
/// validation bits per byte, `val_loss / ln 2 / bytes_per_token` (see `data::manifest`).
pub const BPB_COLUMN: &str = "val_bpb";

/// One metrics row; `val_loss` (and `val_accuracy`) are empty when no evaluation happened at
/// that step.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRow {
    pub step: usize,
    pub tokens: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub val_accuracy: Option<f64>,
}

impl MetricsRow {
    /// The row; with `accuracy` the `val_accuracy` column is appended.
    pub fn to_csv(&self, accuracy: bool) -> String {
        let val = self.val_loss.map(|v| format!("{v:.6}")).unwrap_or_default();
        let mut row = format!(
            "{},{},{:.6e},{:.6},{},{:.6},{:.1}",
            self.step, self.tokens, self.lr, self.train_loss, val, self.grad_norm, self.tokens_per_s
        );
        if accuracy {
            row.push(',');
            row.push_str(&self.val_accuracy.map(|a| format!("{a:.6}")).unwrap_or_default());
        }
        row
    }
}

/// Appends rows to `metrics.csv`, flushing each row, and the same numbers as scalars to a
/// TensorBoard event file in `tb/` (see `train::tensorboard`).
pub struct MetricsWriter {
    path: PathBuf,
    file: fs::File,
    accuracy: bool,
    /// Validation bytes per token: with it, rows end with the [`BPB_COLUMN`].
    bytes_per_token: Option<f64>,
    /// Names of the extra columns (MoE / MTP statistics).
    extra: Vec<String>,
    tb: super::tensorboard::EventWriter,
}

impl MetricsWriter {
    /// Opens `run_dir/metrics.csv`. With `keep_until = Some(step)` (resume), rows after `step`
    /// are dropped first (they belong to work after the checkpoint, which will be redone).
    /// With `accuracy` the header and rows end with the [`ACCURACY_COLUMN`].
    pub fn open(run_dir: &Path, keep_until: Option<usize>, accuracy: bool) -> Result<Self> {
        Self::open_full(run_dir, keep_until, accuracy, None, &[])
    }

    /// [`Self::open`]; with `bytes_per_token` rows also end with the [`BPB_COLUMN`].
    pub fn open_with_bpb(run_dir: &Path, keep_until: Option<usize>, accuracy: bool, bytes_per_token: Option<f64>) -> Result<Self> {
        Self::open_full(run_dir, keep_until, accuracy, bytes_per_token, &[])
    }

    /// [`Self::open`] with `extra` columns appended after the others (MoE and MTP statistics,
    /// `model::objective`), written by [`Self::write_with`].
    pub fn open_with(run_dir: &Path, keep_until: Option<usize>, accuracy: bool, extra: &[String]) -> Result<Self> {
        Self::open_full(run_dir, keep_until, accuracy, None, extra)
    }

    /// Columns: the base ones, then [`ACCURACY_COLUMN`] (with `accuracy`), [`BPB_COLUMN`] (with
    /// `bytes_per_token`), then `extra`.
    pub fn open_full(run_dir: &Path, keep_until: Option<usize>, accuracy: bool, bytes_per_token: Option<f64>, extra: &[String]) -> Result<Self> {
        let path = run_dir.join("metrics.csv");
        let mut header = if accuracy { format!("{METRICS_HEADER},{ACCURACY_COLUMN}") } else { METRICS_HEADER.to_string() };
        if bytes_per_token.is_some() {
            header.push(',');
            header.push_str(BPB_COLUMN);
        }
        extra.iter().for_each(|c| {
            header.push(',');
            header.push_str(c);
        });
        let mut text = format!("{header}\n");
        if let (Some(step), Ok(old)) = (keep_until, fs::read_to_string(&path)) {
            for line in old.lines().skip(1) {
                let s: Option<usize> = line.split(',').next().and_then(|x| x.parse().ok());
                if matches!(s, Some(s) if s <= step) {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        super::checkpoint::write_atomic(&path, text.as_bytes())?;
        let file = fs::OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let tb = super::tensorboard::EventWriter::for_run(run_dir, keep_until)?;
        Ok(Self { path, file, accuracy, bytes_per_token, extra: extra.to_vec(), tb })
    }

    pub fn write(&mut self, row: &MetricsRow) -> Result<()> {
        self.write_with(row, &[])
    }

    /// A row with values for the extra columns (None = empty cell).
    pub fn write_with(&mut self, row: &MetricsRow, extra: &[Option<f64>]) -> Result<()> {
        let mut line = row.to_csv(self.accuracy);
        let mut scalars = super::tensorboard::row_scalars(row, self.accuracy);
        if let Some(bpt) = self.bytes_per_token {
            line.push(',');
            line.push_str(&row.val_loss.map(|l| format!("{:.6}", bits_per_byte(l, bpt))).unwrap_or_default());
            if let Some(l) = row.val_loss {
                scalars.push((BPB_COLUMN.to_string(), bits_per_byte(l, bpt) as f32));
            }
        }
        for (name, v) in self.extra.iter().zip(extra) {
            line.push(',');
            line.push_str(&v.map(|v| format!("{v:.6}")).unwrap_or_default());
            if let Some(v) = v {
                scalars.push((name.clone(), *v as f32));
            }
        }
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))?;
        self.tb.scalars(row.step as i64, scalars)
    }
}

/// Bits per byte of a loss of `loss_nats` per token at `bytes_per_token`:
/// `loss_nats / ln 2 / bytes_per_token` (= bits/token × tokens/byte).
pub fn bits_per_byte(loss_nats: f64, bytes_per_token: f64) -> f64 {
    loss_nats / std::f64::consts::LN_2 / bytes_per_token
}

/// Final status of a run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Completed,
    Diverged,
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub status: Status,
    /// Why the run diverged (non-finite loss, blow-up), when it did.
    pub reason: Option<String>,
    pub steps: usize,
    pub steps_planned: usize,
    pub tokens: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub val_bits_per_token: Option<f64>,
    /// Validation bits per byte of text, when the data's bytes per token is known
    /// (`dataset.json` of `mixscale data prepare`, or `data.val_bytes_per_token`).
    #[serde(default)]
    pub val_bits_per_byte: Option<f64>,
    /// The validation bytes per token used for it.
    #[serde(default)]
    pub val_bytes_per_token: Option<f64>,
    /// Fraction of scored validation targets the model's argmax predicts (every target for
    /// unmasked sources; only the answer positions for MQAR). Absent in older summaries.
    #[serde(default)]
    pub val_accuracy: Option<f64>,
    /// MAD's metric: accuracy per target class (over classes present in the scored validation
    /// targets), averaged — torchmetrics' `MulticlassAccuracy(average="macro")`. MAD tasks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy_macro: Option<f64>,
    /// Mean true −ln p of the validation targets under the data generator (the loss floor).
    pub entropy_floor: Option<f64>,
    pub entropy_floor_bits: Option<f64>,
    #[serde(flatten)]
    pub accounting: Accounting,
    /// Training compute C = flops_per_token · tokens.
    pub compute: f64,
    pub seed: u64,
    pub wall_time_s: f64,
    pub git_revision: String,
    pub mixscale_version: String,
    pub config: String,
    /// `train.precision` of the run (`f32` in summaries from before the option).
    #[serde(default)]
    pub precision: crate::config::train::Precision,
    /// The last step's extra metrics columns (MoE load/balance statistics, MTP head losses), by
    /// column name; empty for dense next-token models.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub last_step_metrics: std::collections::BTreeMap<String, f64>,
}

/// `git rev-parse HEAD` of the current directory, with `-dirty` when the tree has changes.
pub fn git_revision() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "HEAD"]) {
        Some(rev) => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()).unwrap_or(false);
            if dirty { format!("{rev}-dirty") } else { rev }
        }
        None => "unknown".into(),
    }
}
