//! Training spec (`train:` section): optimizer, schedule, batch, budget, evaluation, checkpoints.

use serde::{Deserialize, Serialize};

/// `train:` — how a model is trained. Sizes in sequences of `seq_len` tokens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Seeds the initialization and the data stream.
    #[serde(default)]
    pub seed: u64,
    /// Tokens per training sequence (the model sees `seq_len` inputs, predicts `seq_len` targets).
    pub seq_len: usize,
    /// Global batch, in sequences per optimizer step (batch tokens = batch_size · seq_len).
    pub batch_size: usize,
    /// Sequences per forward/backward pass; the global batch is accumulated over
    /// batch_size / micro_batch_size micro-batches. Defaults to batch_size.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Optimizer steps. Exactly one of `steps` or `tokens` must be given.
    #[serde(default)]
    pub steps: Option<usize>,
    /// Training tokens; steps = ceil(tokens / (batch_size · seq_len)).
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub optimizer: AdamWSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
    /// Global-norm gradient clipping threshold; 0 disables.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// Evaluate on the held-out stream every this many steps (and always at the end); 0 = end only.
    #[serde(default = "default_eval_every")]
    pub eval_every: usize,
    /// Validation sequences per evaluation (a fixed set: the same sequences every time).
    #[serde(default = "default_eval_sequences")]
    pub eval_sequences: usize,
    /// Write a checkpoint every this many steps (and always at the end); 0 = end only.
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Record a metrics row every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// The run is `diverged` when the training loss is non-finite, or exceeds
    /// `divergence_factor` × the first step's loss.
    #[serde(default = "default_divergence_factor")]
    pub divergence_factor: f64,
    /// Arithmetic precision of training: `f32` (default) or `bf16` mixed precision (bf16
    /// activations and matmuls, f32 master weights, optimizer state, gates/decays, norm
    /// statistics, softmax and loss; [`crate::model::params`]). Written to `config.yaml` only
    /// when not `f32`, so configs (and sweep trial keys) from before the option are unchanged.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// `train.precision`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
    /// The activation/matmul dtype for master weights of dtype `master`: bf16 under `bf16`
    /// (whatever the master dtype), else the master dtype itself.
    pub fn compute_dtype(&self, master: candle_core::DType) -> candle_core::DType {
        match self {
            Precision::F32 => master,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision `{s}`; known: f32, bf16")),
        }
    }
}

/// AdamW with decoupled weight decay (Loshchilov & Hutter 2019), PyTorch's update form.
/// Weight decay applies to matrices and embeddings only, never to norm gains, biases or other
/// 1-D parameters (or parameters a block marks as exempt, e.g. decay rates).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdamWSpec {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
}

/// Learning-rate schedule: linear warmup from 0, then the chosen shape.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    #[serde(default = "default_sched_kind")]
    pub kind: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Final LR as a fraction of the peak (cosine end value, WSD cooldown end value).
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// WSD: fraction of all steps spent in the cooldown (Hägele et al. 2024 use 0.1–0.2).
    #[serde(default = "default_cooldown_fraction")]
    pub cooldown_fraction: f64,
    /// WSD cooldown shape: `linear` or `sqrt` (1 − sqrt, Hägele et al. 2024).
    #[serde(default = "default_cooldown")]
    pub cooldown: Cooldown,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Cosine,
    Wsd,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Cooldown {
    Linear,
    Sqrt,
}

impl Default for AdamWSpec {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: default_wd(),
        }
    }
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            kind: default_sched_kind(),
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            cooldown_fraction: default_cooldown_fraction(),
            cooldown: default_cooldown(),
        }
    }
}

impl TrainSpec {
    pub fn micro_batch(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size)
    }
    /// Micro-batches per optimizer step.
    pub fn accumulation(&self) -> usize {
        self.batch_size / self.micro_batch()
    }
    /// Tokens consumed per optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        (self.batch_size * self.seq_len) as u64
    }
    /// Total optimizer steps (validated: exactly one of steps/tokens is set).
    pub fn total_steps(&self) -> usize {
        match (self.steps, self.tokens) {
            (Some(s), _) => s,
            (None, Some(t)) => t.div_ceil(self.tokens_per_step()) as usize,
            (None, None) => 0,
        }
    }
}

fn default_clip() -> f64 {
    1.0
}
fn default_eval_every() -> usize {
    0
}
fn default_eval_sequences() -> usize {
    64
}
fn default_log_every() -> usize {
    1
}
fn default_divergence_factor() -> f64 {
    3.0
}
fn default_lr() -> f64 {
    1e-3
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_wd() -> f64 {
    0.1
}
fn default_sched_kind() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn default_cooldown_fraction() -> f64 {
    0.2
}
fn default_cooldown() -> Cooldown {
    Cooldown::Linear
}
