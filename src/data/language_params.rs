//! Knobs of the built-in synthetic language ([`super::language::Language`]).

/// Parameters of a [`super::language::Language`]. All knobs have defaults (see [`Default`]).
#[derive(Clone, Debug)]
pub struct LanguageParams {
    /// Total number of token ids (at least 64).
    pub vocab_size: usize,
    /// Seed of the language itself (class map, permutations); not of the streams.
    pub language_seed: u64,
    /// Number of bracket types (1..=32); there are `n_bracket_types + 1` topics.
    pub n_bracket_types: usize,
    /// Maximum bracket nesting depth (0 disables brackets).
    pub max_depth: usize,
    /// Number of `NAME` tokens (0..=1024), i.e. definitions per document at most.
    pub n_names: usize,
    /// Number of words in a definition (and in a reference's copy), at least 1.
    pub def_len: usize,
    /// Number of word classes (1..=64).
    pub n_classes: usize,
    /// Zipf exponent of the class distribution given the context.
    pub class_zipf: f64,
    /// Zipf exponent of the word distribution inside a class.
    pub word_zipf: f64,
    /// Mixture weights of the class distribution's three context levels: (previous class),
    /// (previous two classes), (previous two classes, topic). Renormalised; must not all be 0.
    pub class_ctx_weights: [f64; 3],
    /// Mixture weight of the topic-specific (vs topic-independent) word ranking in a class.
    pub word_topic_weight: f64,
    /// Relative weight of emitting a word at a free position (must be > 0).
    pub p_word: f64,
    /// Relative weight of opening a bracket.
    pub p_open: f64,
    /// Relative weight of closing the innermost bracket.
    pub p_close: f64,
    /// Relative weight of a definition.
    pub p_define: f64,
    /// Relative weight of a reference.
    pub p_ref: f64,
    /// Relative weight of ending the document.
    pub p_eod: f64,
    /// Minimum number of tokens in a document before `EOD` is allowed.
    pub min_doc_len: usize,
}

impl Default for LanguageParams {
    fn default() -> Self {
        LanguageParams {
            vocab_size: 512,
            language_seed: 0,
            n_bracket_types: 4,
            max_depth: 3,
            n_names: 16,
            def_len: 6,
            n_classes: 16,
            class_zipf: 2.0,
            word_zipf: 1.1,
            class_ctx_weights: [0.5, 0.25, 0.25],
            word_topic_weight: 0.5,
            p_word: 0.80,
            p_open: 0.05,
            p_close: 0.07,
            p_define: 0.02,
            p_ref: 0.03,
            p_eod: 0.01,
            min_doc_len: 32,
        }
    }
}
