//! The MAD synthetic token-manipulation suite (Poli et al. 2024, "Mechanistic Design and Scaling
//! of Hybrid Architectures"; generators `athms/mad-lab` `mad/data/instances.py`, task settings
//! `configs/tasks/*.yml`, defaults `mad/configs.py`; research notes
//! `shared/reference/data.md` §4b), generated on the fly from a seed.
//!
//! Each task is written from MAD's definition; the random stream is mixscale's own, so examples
//! match MAD's in distribution, not draw for draw. Conventions kept from MAD:
//! - **Recall tasks** (in-context, noisy, fuzzy) are trained as plain language modelling on every
//!   position (MAD returns `inputs[1:]` as training targets) and *tested* only on the probed
//!   values: with `multi_query` every value whose key was seen before, else only the final probe.
//! - **Selective copying** and **memorization** score the same positions in both splits.
//! - A finite training set of `num_train_examples` sequences, cycled (MAD's epochs), and a test
//!   set of `num_test_examples`.
//! - MAD's metric is torchmetrics' macro-averaged accuracy; mixscale records the pooled (micro)
//!   `val_accuracy` and, for MAD tasks, `val_accuracy_macro` (mean over target classes with
//!   support) in summary.json.
//!
//! Sequence lengths: the task's `seq_len` is MAD's generator argument. The recall tasks with
//! `multi_query` then yield `seq_len − 1` tokens per example (MAD drops the last input for the
//! shift) and the others `seq_len`; `train.seq_len` must equal that ([`MadParams::out_len`]).
//! **Compression** is generated (inputs = targets, MAD's definition) but needs MAD's
//! encoder-decoder backbone (`mad/model/auto_encoder.py`), which mixscale does not build: a run
//! asking for it is refused with that reason rather than trained as a (trivial) causal copy.

use super::language::Split;
use super::mqar::{distinct, Example};
use super::rng::{mix, Rng};
use serde::{Deserialize, Serialize};

/// The six MAD tasks.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MadTask {
    InContextRecall,
    NoisyInContextRecall,
    FuzzyInContextRecall,
    SelectiveCopying,
    Compression,
    Memorization,
}

/// Resolved task parameters (MAD's baseline for every field not given).
#[derive(Clone, Debug, PartialEq)]
pub struct MadParams {
    pub task: MadTask,
    pub vocab_size: usize,
    /// MAD's generator `seq_len`.
    pub seq_len: usize,
    pub multi_query: bool,
    /// Size of the noise vocabulary (the last ids below the special tokens).
    pub noise_vocab_size: usize,
    pub frac_noise: f64,
    pub k_motif_size: usize,
    pub v_motif_size: usize,
    pub num_tokens_to_copy: usize,
    pub num_train_examples: usize,
    pub num_test_examples: usize,
}

/// Optional overrides of a task's baseline, as the `data:` section gives them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MadOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_query: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_vocab_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frac_noise: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k_motif_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v_motif_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_tokens_to_copy: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_train_examples: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_test_examples: Option<usize>,
}

/// A configuration error: (key under `data.`, message).
pub type ParamError = (&'static str, String);

/// The fixed seed of memorization's key → value map (MAD's `kv_map_seed`), shared by every
/// example, run and split.
pub const KV_MAP_SEED: u64 = 12345;

impl MadParams {
    /// MAD's baseline for `task` (data.md §4b), overridden by `o`, then checked.
    pub fn resolve(task: MadTask, o: &MadOptions) -> Result<Self, ParamError> {
        use MadTask::*;
        let (vocab, seq_len) = match task {
            InContextRecall | FuzzyInContextRecall => (16, 128),
            NoisyInContextRecall => (32, 128),
            SelectiveCopying => (16, 256),
            Compression => (16, 32),
            Memorization => (256, 32),
        };
        let noisy = task == NoisyInContextRecall;
        let n_train = if task == Memorization { 256 } else { 12_800 };
        let p = MadParams {
            task,
            vocab_size: o.vocab_size.unwrap_or(vocab),
            seq_len: o.seq_len.unwrap_or(seq_len),
            multi_query: o.multi_query.unwrap_or(true),
            noise_vocab_size: o.noise_vocab_size.unwrap_or(if noisy { 16 } else { 0 }),
            frac_noise: o.frac_noise.unwrap_or(if noisy { 0.2 } else { 0.0 }),
            k_motif_size: o.k_motif_size.unwrap_or(if task == FuzzyInContextRecall { 3 } else { 1 }),
            v_motif_size: o.v_motif_size.unwrap_or(if task == FuzzyInContextRecall { 3 } else { 1 }),
            num_tokens_to_copy: o.num_tokens_to_copy.unwrap_or(16),
            num_train_examples: o.num_train_examples.unwrap_or(n_train),
            num_test_examples: o.num_test_examples.unwrap_or(if task == Memorization { n_train } else { 1_280 }),
        };
        p.check()?;
        Ok(p)
    }

    /// Tokens per example (inputs and targets), which `train.seq_len` must equal.
    pub fn out_len(&self) -> usize {
        match self.task {
            MadTask::InContextRecall | MadTask::NoisyInContextRecall => self.seq_len - usize::from(self.multi_query),
            _ => self.seq_len,
        }
    }

    /// Ids below the special tokens (MAD's `non_special_vocab_size`), noise excluded.
    fn data_vocab(&self) -> usize {
        use MadTask::*;
        let special = match self.task {
            InContextRecall | NoisyInContextRecall => usize::from(!self.multi_query),
            FuzzyInContextRecall => 1 + usize::from(!self.multi_query),
            SelectiveCopying => 2,
            Compression | Memorization => 1,
        };
        self.vocab_size.saturating_sub(special + self.noise_vocab_size)
    }

    /// MAD's assertions, plus what keeps the generators well defined.
    pub fn check(&self) -> Result<(), ParamError> {
        use MadTask::*;
        if !(0.0..1.0).contains(&self.frac_noise) {
            return Err(("frac_noise", format!("must be in [0, 1); got {}", self.frac_noise)));
        }
        if self.frac_noise > 0.0 && self.noise_vocab_size == 0 {
            return Err(("noise_vocab_size", "must be > 0 when frac_noise > 0".into()));
        }
        if self.num_train_examples == 0 || self.num_test_examples == 0 {
            return Err(("num_train_examples", "train and test sets need at least one example".into()));
        }
        let dv = self.data_vocab();
        match self.task {
            InContextRecall | NoisyInContextRecall | FuzzyInContextRecall => {
                if dv < 2 {
                    return Err(("vocab_size", format!("leaves {dv} key/value ids after special and noise tokens; need ≥ 2")));
                }
                if self.seq_len % 2 != 0 || self.seq_len < 4 {
                    return Err(("seq_len", format!("must be even and ≥ 4 (MAD's kv motif); got {}", self.seq_len)));
                }
                if self.task == FuzzyInContextRecall {
                    let (k, v) = (self.k_motif_size, self.v_motif_size);
                    if k == 0 || v == 0 || k > dv / 2 || v > dv - dv / 2 {
                        return Err(("k_motif_size", format!("motif sizes must be in 1..=number of key/value ids ({}, {})", dv / 2, dv - dv / 2)));
                    }
                    if self.seq_len < 3 * (k + v) + 2 {
                        return Err(("seq_len", format!("must be ≥ 3·(k_motif_size + v_motif_size) + 2 = {}", 3 * (k + v) + 2)));
                    }
                }
            }
            SelectiveCopying => {
                if dv < 1 {
                    return Err(("vocab_size", "must be ≥ 3 (copy and blank tokens plus data)".into()));
                }
                if self.seq_len <= 2 * self.num_tokens_to_copy + 1 || self.num_tokens_to_copy == 0 {
                    return Err(("seq_len", format!("must be > 2·num_tokens_to_copy + 1 = {}", 2 * self.num_tokens_to_copy + 1)));
                }
            }
            Compression => {
                if dv < 1 || self.seq_len < 2 {
                    return Err(("vocab_size", "compression needs vocab_size ≥ 2 and seq_len ≥ 2".into()));
                }
            }
            Memorization => {
                if dv < 2 || self.seq_len % 2 != 0 {
                    return Err(("seq_len", "memorization needs an even seq_len and vocab_size ≥ 3".into()));
                }
            }
        }
        Ok(())
    }
}

/// The generator of one task.
pub struct Mad {
    p: MadParams,
    /// Memorization's fixed key → value map (`kv_map[k]`, keys `0..len`).
    kv_map: Vec<u32>,
}

impl Mad {
    pub fn new(p: &MadParams) -> Result<Self, ParamError> {
        p.check()?;
        let kv_map = if p.task == MadTask::Memorization {
            // MAD: shuffled key ids zipped with shuffled value ids (zip stops at the shorter).
            let dv = p.data_vocab() as u32;
            let mut rng = Rng::new(KV_MAP_SEED);
            let keys = distinct(&mut rng, 0, dv / 2, (dv / 2) as usize);
            let values = distinct(&mut rng, dv / 2, dv, (dv - dv / 2) as usize);
            let mut map = vec![u32::MAX; (dv / 2) as usize];
            for (k, v) in keys.iter().zip(&values) {
                map[*k as usize] = *v;
            }
            map
        } else {
            Vec::new()
        };
        Ok(Self { p: p.clone(), kv_map })
    }

    pub fn params(&self) -> &MadParams {
        &self.p
    }

    pub fn describe(&self) -> String {
        let p = &self.p;
        format!(
            "MAD {:?}: vocab {}, seq_len {} ({} tokens/example), multi_query {}, noise {}×{}, motifs {}/{}, copy {}, {} train / {} test examples",
            p.task, p.vocab_size, p.seq_len, p.out_len(), p.multi_query, p.noise_vocab_size, p.frac_noise, p.k_motif_size, p.v_motif_size,
            p.num_tokens_to_copy, p.num_train_examples, p.num_test_examples
        )
    }

    /// Example `index` of (`split`, `seed`): training examples cycle through a fixed set of
    /// `num_train_examples`; validation examples are test examples (`index` < num_test_examples).
    pub fn example(&self, split: Split, seed: u64, index: u64) -> Example {
        let (tag, i) = match split {
            Split::Train => (0x4d41_4400_0000_0001u64, index % self.p.num_train_examples as u64),
            Split::Val => (0x4d41_4400_0000_0002u64, index),
        };
        let mut rng = Rng::new(mix(mix(seed, tag), i));
        let train = split == Split::Train;
        let (inputs, targets) = match self.p.task {
            MadTask::InContextRecall | MadTask::NoisyInContextRecall => self.recall(&mut rng),
            MadTask::FuzzyInContextRecall => self.fuzzy_recall(&mut rng, train),
            MadTask::SelectiveCopying => return self.selective_copying(&mut rng),
            MadTask::Compression => return self.compression(&mut rng),
            MadTask::Memorization => return self.memorization(&mut rng),
        };
        // Recall tasks: (inputs[:-1], inputs[1:]) to train, (inputs[:-1], targets[1:]) to test.
        let n = inputs.len() - 1;
        let x: Vec<u32> = inputs[..n].to_vec();
        if train {
            Example { inputs: x, targets: inputs[1..].to_vec(), scored: vec![true; n] }
        } else {
            let t = &targets[1..];
            Example { inputs: x, targets: t.iter().map(|v| v.unwrap_or(0)).collect(), scored: t.iter().map(Option::is_some).collect() }
        }
    }
}

#[path = "mad_gen.rs"]
mod gen;
pub use gen::trainable;

#[cfg(test)]
#[path = "mad_tests.rs"]
mod tests;
