//! Tokenizers for `mixscale data prepare` (research notes: `shared/reference/data.md` §2).
//!
//! * `gpt2` (= `r50k_base`), `cl100k_base`, `o200k_base`: OpenAI's BPE encodings through the
//!   `tiktoken-rs` crate, whose rank files are compiled into the binary (no download). Text is
//!   encoded with `encode_ordinary`, as llm.c's `fineweb.py` does: a literal `<|endoftext|>` in
//!   the text is ordinary text, never the special token.
//! * a local `tokenizer.json`: Hugging Face `tokenizers` (no hub access; the crate is built
//!   without its `http` feature, with the pure-Rust `fancy-regex` backend instead of the `onig`
//!   C library). Its truncation and padding settings are switched off and no special tokens
//!   are added (`add_special_tokens = false`). Unlike tiktoken's `encode_ordinary`, `tokenizers`
//!   always matches added tokens in the text, so a document containing the literal end-of-text
//!   string gets the end-of-text id there (this also holds for `bpe:V` below).
//! * `bpe:V`: a byte-level BPE of at most `V` ids trained on the training documents with the
//!   `tokenizers` BPE trainer (GPT-2's pre-tokenizer regex and byte alphabet, no prefix space,
//!   `<|endoftext|>` as id 0), saved as `tokenizer.json` beside the shards; encoding then goes
//!   through that file, so it is exactly what any `tokenizers` user gets from it.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

/// The end-of-text token (GPT-2, cl100k, o200k and the trained BPE).
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// Names of the compiled-in encodings.
pub const TIKTOKEN_NAMES: &[&str] = &["gpt2", "r50k_base", "cl100k_base", "o200k_base"];
/// End-of-text candidates looked up in a `tokenizer.json` when `--eot-token` is not given.
pub const EOT_CANDIDATES: &[&str] = &[ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]"];

/// Which tokenizer `data prepare` uses (parsed from `--tokenizer`).
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerChoice {
    /// A compiled-in tiktoken encoding (`gpt2`, `r50k_base`, `cl100k_base`, `o200k_base`).
    Tiktoken(String),
    /// A local `tokenizer.json`.
    File(PathBuf),
    /// Train a byte-level BPE with this many ids (special token included).
    TrainBpe(usize),
}

impl TokenizerChoice {
    /// `gpt2` | `cl100k_base` | `o200k_base` | `bpe:V` | a path to a `tokenizer.json`.
    pub fn parse(s: &str) -> Result<Self> {
        if TIKTOKEN_NAMES.contains(&s) {
            return Ok(Self::Tiktoken(s.to_string()));
        }
        if let Some(v) = s.strip_prefix("bpe:") {
            let v: usize = v.parse().map_err(|_| Error::Input(format!("--tokenizer {s}: `bpe:V` needs a whole number V")))?;
            if v < 257 {
                return Err(Error::Input(format!("--tokenizer {s}: a byte-level BPE needs V ≥ 257 (256 bytes + <|endoftext|>)")));
            }
            return Ok(Self::TrainBpe(v));
        }
        let p = Path::new(s);
        if p.is_file() || s.ends_with(".json") {
            return Ok(Self::File(p.to_path_buf()));
        }
        Err(Error::UnknownName {
            kind: "tokenizer",
            name: s.to_string(),
            known: TIKTOKEN_NAMES.iter().map(|n| n.to_string()).chain(["bpe:V".into(), "PATH/tokenizer.json".into()]).collect(),
        })
    }
}

enum Kind {
    Tiktoken(&'static tiktoken_rs::CoreBPE),
    Hf(Box<tokenizers::Tokenizer>),
}

/// A loaded tokenizer: encode, decode, vocabulary size and end-of-text id.
pub struct Tokenizer {
    kind: Kind,
    name: String,
    vocab_size: usize,
    eot: u32,
}

impl Tokenizer {
    /// A compiled-in encoding by name (`gpt2` is `r50k_base`).
    pub fn tiktoken(name: &str) -> Result<Self> {
        let (bpe, vocab, eot) = match name {
            "gpt2" | "r50k_base" => (tiktoken_rs::r50k_base_singleton(), 50_257, 50_256),
            "cl100k_base" => (tiktoken_rs::cl100k_base_singleton(), 100_277, 100_257),
            "o200k_base" => (tiktoken_rs::o200k_base_singleton(), 200_019, 199_999),
            _ => {
                return Err(Error::UnknownName { kind: "tiktoken encoding", name: name.into(), known: TIKTOKEN_NAMES.iter().map(|s| s.to_string()).collect() })
            }
        };
        Ok(Self { kind: Kind::Tiktoken(bpe), name: name.to_string(), vocab_size: vocab, eot })
    }

    /// A `tokenizer.json`; the end-of-text token is `eot_token` or the first of
    /// [`EOT_CANDIDATES`] the vocabulary has.
    pub fn from_file(path: &Path, eot_token: Option<&str>) -> Result<Self> {
        let mut tok = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Input(format!("{}: cannot load tokenizer: {e}", path.display())))?;
        tok.with_truncation(None).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        tok.with_padding(None);
        let eot = match eot_token {
            Some(t) => tok.token_to_id(t).ok_or_else(|| Error::Input(format!("{}: no token `{t}` (--eot-token)", path.display())))?,
            None => EOT_CANDIDATES.iter().find_map(|t| tok.token_to_id(t)).ok_or_else(|| {
                Error::Input(format!("{}: none of the end-of-text tokens {} is in the vocabulary; name one with --eot-token", path.display(), EOT_CANDIDATES.join(", ")))
            })?,
        };
        let vocab_size = tok.get_vocab(true).values().max().map(|&m| m as usize + 1).unwrap_or(0);
        Ok(Self { kind: Kind::Hf(Box::new(tok)), name: path.display().to_string(), vocab_size, eot })
    }

    /// Loads what `choice` names (`TrainBpe` is trained separately, see [`train_bpe`]).
    pub fn load(choice: &TokenizerChoice, eot_token: Option<&str>) -> Result<Self> {
        match choice {
            TokenizerChoice::Tiktoken(n) => Self::tiktoken(n),
            TokenizerChoice::File(p) => Self::from_file(p, eot_token),
            TokenizerChoice::TrainBpe(_) => Err(Error::Other("a BPE tokenizer must be trained before it is loaded".into())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One more than the largest id the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    /// The ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Tiktoken(b) => Ok(b.encode_ordinary(text)),
            Kind::Hf(t) => Ok(t.encode(text, false).map_err(|e| Error::Other(format!("tokenizer {}: {e}", self.name)))?.get_ids().to_vec()),
        }
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.kind {
            Kind::Tiktoken(b) => b.decode(ids).map_err(|e| Error::Input(format!("tokenizer {}: {e}", self.name))),
            Kind::Hf(t) => t.decode(ids, false).map_err(|e| Error::Input(format!("tokenizer {}: {e}", self.name))),
        }
    }
}

/// Trains a byte-level BPE with at most `vocab_size` ids on `docs` and saves it as a
/// `tokenizer.json` at `path` (see the module docs for the pipeline).
pub fn train_bpe<I, S>(docs: I, vocab_size: usize, path: &Path) -> Result<()>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(ENDOFTEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_post_processor(None)
        .with_decoder(Some(byte_level.into()))
        .build()
        .map_err(|e| Error::Other(format!("building the BPE tokenizer: {e}")))?;
    tok.train(&mut trainer, docs).map_err(|e| Error::Other(format!("training the BPE tokenizer: {e}")))?;
    tok.save(path, true).map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}
