//! Data spec (`data:` section): the built-in synthetic language, token files (llm.c shards or
//! raw uint16/uint32 arrays) and the Zoology MQAR task. Readers and generators live in
//! `src/data/`.

use serde::{Deserialize, Serialize};

/// `data:` — where training and validation tokens come from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSpec {
    /// The built-in synthetic language (`src/data/language.rs`): generated on the fly, with the
    /// exact probability of every token known, so the entropy floor is printed beside the loss.
    SyntheticLanguage {
        /// Vocabulary of the language (≤ model.vocab_size).
        #[serde(default = "default_vocab")]
        vocab_size: usize,
        /// Seeds the language itself (its grammar); the stream seed is `train.seed`.
        #[serde(default)]
        language_seed: u64,
    },
    /// Pre-tokenized files (`src/data/shards.rs`), memory-mapped. Training windows are drawn
    /// uniformly from every window of `seq_len + 1` tokens of the `train` files; validation is
    /// the first `eval_sequences` consecutive windows of the `val` files.
    Tokens {
        /// Path of the training files; `*` and `?` allowed in the last component
        /// (e.g. `data/fineweb_train_*.bin`). Relative paths are relative to the working directory.
        train: String,
        /// Path of the validation files (same rules).
        val: String,
        /// File format.
        format: TokenFormat,
        /// Every token id must be below this (≤ model.vocab_size); checked on every window read.
        vocab_size: usize,
    },
    /// Zoology's multi-query associative recall (`src/data/mqar.rs`), generated on the fly.
    /// `setting` names a standard configuration (`mqar::SETTINGS`); explicit fields override it.
    /// Defaults are Zoology's: vocab 8192, 8 pairs, power_a 0.01, random non-queries.
    Mqar {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        setting: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vocab_size: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        num_kv_pairs: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        power_a: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        random_non_queries: Option<bool>,
    },
    /// A task of the MAD suite (`src/data/mad.rs`), generated on the fly: `task` is one of
    /// in_context_recall, noisy_in_context_recall, fuzzy_in_context_recall, selective_copying,
    /// compression, memorization; unset fields take the task's MAD baseline. `seq_len` is MAD's
    /// generator length; `train.seq_len` must equal the tokens per example it yields.
    Mad {
        task: crate::data::mad::MadTask,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vocab_size: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq_len: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        multi_query: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        noise_vocab_size: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        frac_noise: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        k_motif_size: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        v_motif_size: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        num_tokens_to_copy: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        num_train_examples: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        num_test_examples: Option<usize>,
    },
}

impl DataSpec {
    /// The MAD task's options as [`crate::data::mad::MadOptions`] (None for other kinds).
    pub fn mad_options(&self) -> Option<(crate::data::mad::MadTask, crate::data::mad::MadOptions)> {
        match self {
            DataSpec::Mad {
                task,
                vocab_size,
                seq_len,
                multi_query,
                noise_vocab_size,
                frac_noise,
                k_motif_size,
                v_motif_size,
                num_tokens_to_copy,
                num_train_examples,
                num_test_examples,
            } => Some((
                *task,
                crate::data::mad::MadOptions {
                    vocab_size: *vocab_size,
                    seq_len: *seq_len,
                    multi_query: *multi_query,
                    noise_vocab_size: *noise_vocab_size,
                    frac_noise: *frac_noise,
                    k_motif_size: *k_motif_size,
                    v_motif_size: *v_motif_size,
                    num_tokens_to_copy: *num_tokens_to_copy,
                    num_train_examples: *num_train_examples,
                    num_test_examples: *num_test_examples,
                },
            )),
            _ => None,
        }
    }
}

/// Layout of a token file.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenFormat {
    /// llm.c / modded-nanogpt shard: 256 × int32 header (magic, version, token count), then
    /// uint16 tokens (magic 20240520, version 1) or uint32 tokens (magic 20240801, version 7).
    Llmc,
    /// Headerless little-endian uint16 array (nanoGPT `train.bin`).
    U16,
    /// Headerless little-endian uint32 array.
    U32,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec::SyntheticLanguage { vocab_size: default_vocab(), language_seed: 0 }
    }
}

fn default_vocab() -> usize {
    512
}
