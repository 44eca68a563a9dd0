//! Token sources. For now the built-in synthetic language ([`language`]); file formats and the
//! synthetic ablation tasks come with the data issue.
//!
//! A source serves sequence `i` of the training or validation stream as a pure function of
//! `(seed, i)`, so the data position of a run is one integer (the next training sequence index):
//! resuming needs no sampler state beyond it. The validation stream does not depend on the
//! run's seed: every run evaluates on the same sequences.

pub mod language;
pub mod rng;

use crate::config::data::DataSpec;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use language::{Language, LanguageParams, Split};

/// Seed of the validation stream (fixed for every run).
pub const VAL_SEED: u64 = 0;

/// A batch of `B` sequences: inputs and next-token targets `[B, T]` (u32), and the true
/// −ln p of every target under the generator when the source knows it.
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub true_nlp: Option<Vec<f64>>,
}

pub struct DataSource {
    lang: Language,
    seed: u64,
    seq_len: usize,
}

impl DataSource {
    pub fn new(spec: &DataSpec, seed: u64, seq_len: usize) -> Result<Self> {
        match spec {
            DataSpec::SyntheticLanguage { vocab_size, language_seed } => {
                let p = LanguageParams { vocab_size: *vocab_size, language_seed: *language_seed, ..Default::default() };
                let lang = Language::new(&p).map_err(|e| Error::Input(format!("data: {e}")))?;
                Ok(Self { lang, seed, seq_len })
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.lang.vocab_size()
    }

    pub fn describe(&self) -> String {
        self.lang.describe()
    }

    /// Mean true −ln p of the targets of validation sequences `0..n`: the entropy floor of the
    /// fixed validation set (None when the source does not know true probabilities).
    pub fn val_floor(&self, n: usize) -> Option<f64> {
        Some(self.lang.mean_nlp(Split::Val, VAL_SEED, n as u64, self.seq_len + 1))
    }

    /// Training sequences `start..start+n`.
    pub fn train_batch(&self, start: u64, n: usize, dev: &Device) -> Result<Batch> {
        self.batch(Split::Train, self.seed, start, n, dev)
    }

    /// Validation sequences `start..start+n` (the same for every run).
    pub fn val_batch(&self, start: u64, n: usize, dev: &Device) -> Result<Batch> {
        self.batch(Split::Val, VAL_SEED, start, n, dev)
    }

    fn batch(&self, split: Split, seed: u64, start: u64, n: usize, dev: &Device) -> Result<Batch> {
        let t = self.seq_len;
        let mut inputs = Vec::with_capacity(n * t);
        let mut targets = Vec::with_capacity(n * t);
        let mut nlp = Vec::with_capacity(n * t);
        for i in 0..n as u64 {
            let (toks, p) = self.lang.sequence(split, seed, start + i, t + 1);
            inputs.extend_from_slice(&toks[..t]);
            targets.extend_from_slice(&toks[1..]);
            nlp.extend_from_slice(&p[1..]);
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (n, t), dev)?,
            targets: Tensor::from_vec(targets, (n, t), dev)?,
            true_nlp: Some(nlp),
        })
    }
}
