//! Token sources: the built-in synthetic language ([`language`]), token files ([`shards`]:
//! llm.c shards and raw uint16/uint32 arrays) and Zoology's MQAR task ([`mqar`]).
//!
//! A source serves sequence `i` of the training or validation stream as a pure function of
//! `(seed, i)`, so the data position of a run is one integer (the next training sequence index):
//! resuming needs no sampler state beyond it. The validation stream does not depend on the
//! run's seed: every run evaluates on the same sequences.
//!
//! Tasks that score only some positions (MQAR) attach a mask to the batch; the training loss
//! and evaluation then average over the scored positions only (see `train::batch_loss`).

pub mod language;
pub mod mad;
pub mod language_params;
pub mod mqar;
pub mod rng;
pub mod zipf;
pub mod shards;

use crate::config::data::DataSpec;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use language::{Language, LanguageParams, Split};
use mqar::{Mqar, MqarParams};
use shards::TokenFiles;

/// Seed of the validation stream (fixed for every run).
pub const VAL_SEED: u64 = 0;

/// A batch of `B` sequences: inputs and next-token targets `[B, T]` (u32), the true −ln p of
/// every target under the generator when the source knows it, and for tasks that score only
/// some positions a `[B, T]` u8 mask (1 = scored). Without a mask every position counts.
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub true_nlp: Option<Vec<f64>>,
    pub mask: Option<Tensor>,
}

enum Source {
    Language(Language),
    Tokens { train: TokenFiles, val: TokenFiles, vocab: usize },
    Mqar(Mqar),
    Mad(mad::Mad),
}

pub struct DataSource {
    src: Source,
    seed: u64,
    seq_len: usize,
}

impl DataSource {
    pub fn new(spec: &DataSpec, seed: u64, seq_len: usize) -> Result<Self> {
        let src = match spec {
            DataSpec::SyntheticLanguage { vocab_size, language_seed } => {
                let p = LanguageParams { vocab_size: *vocab_size, language_seed: *language_seed, ..Default::default() };
                Source::Language(Language::new(&p).map_err(|e| Error::Input(format!("data: {e}")))?)
            }
            DataSpec::Tokens { train, val, format, vocab_size } => {
                let w = seq_len + 1;
                let train = TokenFiles::open(train, "data.train", *format, *vocab_size, w)?;
                let val = TokenFiles::open(val, "data.val", *format, *vocab_size, w)?;
                Source::Tokens { train, val, vocab: *vocab_size }
            }
            DataSpec::Mqar { setting, vocab_size, num_kv_pairs, power_a, random_non_queries } => {
                let p = MqarParams::resolve(setting.as_deref(), *vocab_size, *num_kv_pairs, *power_a, *random_non_queries, seq_len)
                    .map_err(|(k, m)| Error::Input(format!("{k}: {m}")))?;
                Source::Mqar(Mqar::new(&p).map_err(|(k, m)| Error::Input(format!("{k}: {m}")))?)
            }
            DataSpec::Mad { .. } => {
                let (task, o) = spec.mad_options().expect("a MAD spec");
                let p = mad::MadParams::resolve(task, &o).map_err(|(k, m)| Error::Input(format!("data.{k}: {m}")))?;
                mad::trainable(task).map_err(|m| Error::Input(format!("data.task: {m}")))?;
                if p.out_len() != seq_len {
                    return Err(Error::Input(format!(
                        "train.seq_len: MAD {task:?} with data.seq_len {} yields {} tokens per example; set train.seq_len: {}",
                        p.seq_len,
                        p.out_len(),
                        p.out_len()
                    )));
                }
                Source::Mad(mad::Mad::new(&p).map_err(|(k, m)| Error::Input(format!("data.{k}: {m}")))?)
            }
        };
        Ok(Self { src, seed, seq_len })
    }

    pub fn vocab_size(&self) -> usize {
        match &self.src {
            Source::Language(l) => l.vocab_size(),
            Source::Tokens { vocab, .. } => *vocab,
            Source::Mqar(m) => m.params().vocab_size,
            Source::Mad(m) => m.params().vocab_size,
        }
    }

    /// Whether batches carry a mask (only some positions are scored).
    pub fn is_masked(&self) -> bool {
        matches!(self.src, Source::Mqar(_) | Source::Mad(_))
    }

    /// Whether the task reports macro-averaged accuracy (MAD's metric) beside the pooled one.
    pub fn macro_accuracy(&self) -> bool {
        matches!(self.src, Source::Mad(_))
    }

    pub fn describe(&self) -> String {
        match &self.src {
            Source::Language(l) => l.describe(),
            Source::Tokens { train, val, .. } => format!(
                "token files: {} train file(s), {} tokens; {} val file(s), {} tokens ({} windows)",
                train.shards().len(),
                train.tokens(),
                val.shards().len(),
                val.tokens(),
                val.val_windows()
            ),
            Source::Mqar(m) => m.describe(),
            Source::Mad(m) => m.describe(),
        }
    }

    /// Checks that validation sequences `0..n` exist (token files hold finitely many).
    pub fn check_val(&self, n: usize) -> Result<()> {
        if let (Source::Tokens { val, .. }, Some(last)) = (&self.src, n.checked_sub(1)) {
            val.val_position(last as u64)?;
        }
        Ok(())
    }

    /// Mean true −ln p of the targets of validation sequences `0..n`: the entropy floor of the
    /// fixed validation set (None when the source does not know true probabilities).
    pub fn val_floor(&self, n: usize) -> Option<f64> {
        match &self.src {
            Source::Language(l) => Some(l.mean_nlp(Split::Val, VAL_SEED, n as u64, self.seq_len + 1)),
            _ => None,
        }
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
        let (mut nlp, mut mask) = (None, None);
        match &self.src {
            Source::Language(lang) => {
                let mut p_all = Vec::with_capacity(n * t);
                for i in 0..n as u64 {
                    let (toks, p) = lang.sequence(split, seed, start + i, t + 1);
                    inputs.extend_from_slice(&toks[..t]);
                    targets.extend_from_slice(&toks[1..]);
                    p_all.extend_from_slice(&p[1..]);
                }
                nlp = Some(p_all);
            }
            Source::Tokens { train, val, .. } => {
                let mut w = Vec::with_capacity(t + 1);
                for i in 0..n as u64 {
                    w.clear();
                    match split {
                        Split::Train => train.read(train.train_position(seed, start + i), &mut w)?,
                        Split::Val => val.read(val.val_position(start + i)?, &mut w)?,
                    }
                    inputs.extend_from_slice(&w[..t]);
                    targets.extend_from_slice(&w[1..]);
                }
            }
            Source::Mqar(_) | Source::Mad(_) => {
                let mut m_all = Vec::with_capacity(n * t);
                for i in 0..n as u64 {
                    let ex = match &self.src {
                        Source::Mqar(m) => m.example(split, seed, start + i),
                        Source::Mad(m) => m.example(split, seed, start + i),
                        _ => unreachable!("matched above"),
                    };
                    inputs.extend_from_slice(&ex.inputs);
                    targets.extend_from_slice(&ex.targets);
                    m_all.extend(ex.scored.iter().map(|&s| s as u8));
                }
                mask = Some(Tensor::from_vec(m_all, (n, t), dev)?);
            }
        }
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (n, t), dev)?,
            targets: Tensor::from_vec(targets, (n, t), dev)?,
            true_nlp: nlp,
            mask,
        })
    }
}
