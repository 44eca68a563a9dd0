//! Data spec (`data:` section). For now the built-in synthetic language; file formats and
//! synthetic tasks come with the data issue.

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
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec::SyntheticLanguage { vocab_size: default_vocab(), language_seed: 0 }
    }
}

fn default_vocab() -> usize {
    512
}
