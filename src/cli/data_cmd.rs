//! `mixscale data ...`: preparing token shards from text (`src/data/prepare.rs`).

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use mixscale::data::prepare::{prepare, DocSplit, InputFormat, PrepareOptions};
use mixscale::data::tokenizer::TokenizerChoice;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Tokenize text / JSONL files into llm.c shards (train_*.bin, val_*.bin) + dataset.json.
    Prepare(PrepareArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Auto,
    Text,
    Jsonl,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SplitArg {
    File,
    Paragraph,
    Line,
}

#[derive(Args)]
pub struct PrepareArgs {
    /// Input files (text or JSONL); `*` and `?` allowed in the last path component.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// Output folder (created; written atomically).
    #[arg(long)]
    out: PathBuf,
    /// gpt2 | cl100k_base | o200k_base (compiled in), PATH/tokenizer.json (Hugging Face), or
    /// bpe:V (train a byte-level BPE of V ids on the training split; saved as OUT/tokenizer.json).
    #[arg(long, default_value = "gpt2")]
    tokenizer: String,
    /// End-of-text token of a tokenizer.json (default: the first of <|endoftext|>, </s>, ... it has).
    #[arg(long)]
    eot_token: Option<String>,
    /// auto: .jsonl / .ndjson files are JSONL, others text.
    #[arg(long, value_enum, default_value = "auto")]
    input_format: FormatArg,
    /// JSONL field holding the document text.
    #[arg(long, default_value = "text")]
    jsonl_field: String,
    /// How a text file is cut into documents.
    #[arg(long, value_enum, default_value = "file")]
    doc_split: SplitArg,
    /// Fraction of documents (by a hash of their text) that go to the validation split.
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Seeds the document split hash.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Maximum tokens per shard file.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: u64,
    /// Replace an existing output folder.
    #[arg(long)]
    overwrite: bool,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(cmd: DataCmd) -> Result<i32> {
    match cmd {
        DataCmd::Prepare(a) => {
            let opts = PrepareOptions {
                inputs: a.inputs,
                out: a.out.clone(),
                tokenizer: TokenizerChoice::parse(&a.tokenizer)?,
                eot_token: a.eot_token,
                input_format: match a.input_format {
                    FormatArg::Auto => InputFormat::Auto,
                    FormatArg::Text => InputFormat::Text,
                    FormatArg::Jsonl => InputFormat::Jsonl,
                },
                jsonl_field: a.jsonl_field,
                doc_split: match a.doc_split {
                    SplitArg::File => DocSplit::File,
                    SplitArg::Paragraph => DocSplit::Paragraph,
                    SplitArg::Line => DocSplit::Line,
                },
                val_fraction: a.val_fraction,
                seed: a.seed,
                shard_tokens: a.shard_tokens,
                overwrite: a.overwrite,
                progress: !a.quiet,
            };
            let m = prepare(&opts)?;
            println!("wrote {} ({} {}, vocab {}, eot {})", a.out.display(), m.tokenizer.kind, m.tokenizer.name, m.vocab_size, m.eot_id);
            for (name, s) in [("train", &m.train), ("val", &m.val)] {
                println!(
                    "  {name}: {} documents, {} bytes, {} tokens ({}), {} shard(s)",
                    s.documents,
                    s.bytes,
                    s.tokens,
                    s.bytes_per_token().map(|b| format!("{b:.3} bytes/token")).unwrap_or_else(|| "-".into()),
                    s.shards.len()
                );
            }
            println!(
                "use: data: {{kind: tokens, train: \"{0}/train_*.bin\", val: \"{0}/val_*.bin\", format: llmc, vocab_size: {1}}}",
                a.out.display(),
                m.vocab_size
            );
            Ok(0)
        }
    }
}
