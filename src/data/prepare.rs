//! `mixscale data prepare`: text files and JSONL → llm.c token shards + `dataset.json`.
//!
//! * **Documents.** A `.jsonl`/`.ndjson` file (or any file with `--input-format jsonl`) gives one
//!   document per non-blank line: the string field `jsonl_field` (default `text`) of the JSON
//!   object. A text file gives one document per file (`--doc-split file`, default), per
//!   paragraph (`paragraph`: runs of non-blank lines; blank lines separate) or per non-blank line
//!   (`line`). Text must be UTF-8. Empty documents are skipped.
//! * **Splits.** A document goes to validation when `mix(seed, fnv1a64(text)) / 2^64 <
//!   val_fraction`: deterministic, independent of input order, and identical documents always
//!   land in the same split.
//! * **Tokens.** Each document is written as `<|endoftext|>` followed by its tokens (llm.c's
//!   `dev/data/fineweb.py` convention: the EOT token *precedes* every document). Shards are
//!   llm.c files (`shards::write_llmc` layout) of at most `shard_tokens` tokens, uint16 when
//!   the vocabulary has ≤ 65536 ids, else uint32, named `train_000000.bin`, `val_000000.bin`, ...
//!   (documents run on across shard boundaries, as in llm.c). A trained BPE
//!   (`--tokenizer bpe:V`) is trained on the training split only and saved as `tokenizer.json`.
//! * **Nothing half-written.** Everything is written into a sibling staging folder
//!   `OUT.partial-<pid>` (every file fsynced), which is renamed to `OUT` at the end; on an error
//!   the staging folder is removed, and a staging folder left by a killed run is removed by the
//!   next `prepare` into the same `OUT`. `OUT` is never partly written.

use super::manifest::{Manifest, ShardInfo, SplitInfo, TokenizerInfo, MANIFEST};
use super::rng::mix;
use super::shards::{expand, LLMC_HEADER_BYTES, LLMC_MAGIC_U16, LLMC_MAGIC_U32, LLMC_VERSION_U16, LLMC_VERSION_U32};
use super::tokenizer::{train_bpe, Tokenizer, TokenizerChoice};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// How input files are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// By extension: `.jsonl`/`.ndjson` are JSONL, everything else text.
    Auto,
    Text,
    Jsonl,
}

/// How a text file is cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocSplit {
    File,
    Paragraph,
    Line,
}

impl DocSplit {
    pub fn name(self) -> &'static str {
        match self {
            DocSplit::File => "file",
            DocSplit::Paragraph => "paragraph",
            DocSplit::Line => "line",
        }
    }
}

/// Options of [`prepare`].
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Input files; `*`/`?` in the last path component.
    pub inputs: Vec<String>,
    pub out: PathBuf,
    pub tokenizer: TokenizerChoice,
    /// End-of-text token of a `tokenizer.json` (default: the first known one it has).
    pub eot_token: Option<String>,
    pub input_format: InputFormat,
    pub jsonl_field: String,
    pub doc_split: DocSplit,
    pub val_fraction: f64,
    pub seed: u64,
    pub shard_tokens: u64,
    /// Replace an existing `out`.
    pub overwrite: bool,
    /// Draw a progress bar on stderr (only on a terminal).
    pub progress: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            inputs: vec![],
            out: PathBuf::from("data"),
            tokenizer: TokenizerChoice::Tiktoken("gpt2".into()),
            eot_token: None,
            input_format: InputFormat::Auto,
            jsonl_field: "text".into(),
            doc_split: DocSplit::File,
            val_fraction: 0.01,
            seed: 0,
            shard_tokens: 100_000_000,
            overwrite: false,
            progress: false,
        }
    }
}

/// Bytes of text per parallel tokenization batch.
const BATCH_BYTES: usize = 4 << 20;

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Whether a document goes to the validation split (see the module docs).
pub fn is_val(text: &str, seed: u64, val_fraction: f64) -> bool {
    let u = (mix(seed, fnv1a64(text.as_bytes())) >> 11) as f64 / (1u64 << 53) as f64;
    u < val_fraction
}

/// Cuts `text` into documents per `split` (non-empty ones only).
pub fn split_docs(text: &str, split: DocSplit, out: &mut dyn FnMut(&str) -> Result<()>) -> Result<()> {
    let blank = |l: &str| l.trim().is_empty();
    match split {
        DocSplit::File => {
            if !text.is_empty() {
                out(text)?;
            }
        }
        DocSplit::Line => {
            for l in text.lines().filter(|l| !blank(l)) {
                out(l)?;
            }
        }
        DocSplit::Paragraph => {
            // A paragraph is the exact text from its first non-blank line to the end of its last
            // one (line breaks inside kept, the final one dropped).
            let mut start: Option<usize> = None;
            let mut end = 0;
            let mut at = 0;
            for line in text.split_inclusive('\n') {
                let content = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(line);
                if blank(content) {
                    if let Some(s) = start.take() {
                        out(&text[s..end])?;
                    }
                } else {
                    start.get_or_insert(at);
                    end = at + content.len();
                }
                at += line.len();
            }
            if let Some(s) = start {
                out(&text[s..end])?;
            }
        }
    }
    Ok(())
}

fn is_jsonl(path: &Path, f: InputFormat) -> bool {
    match f {
        InputFormat::Jsonl => true,
        InputFormat::Text => false,
        InputFormat::Auto => matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "ndjson")),
    }
}

/// Calls `f` with every document of `path`, and the input bytes consumed so far in the file.
pub fn read_docs(path: &Path, opts: &PrepareOptions, f: &mut dyn FnMut(String, u64) -> Result<()>) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    if is_jsonl(path, opts.input_format) {
        let mut r = BufReader::new(file);
        let (mut line, mut no, mut consumed) = (Vec::new(), 0usize, 0u64);
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                return Ok(());
            }
            no += 1;
            consumed += n as u64;
            let s = std::str::from_utf8(&line).map_err(|e| Error::Input(format!("{}:{no}: not valid UTF-8: {e}", path.display())))?;
            if s.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(s).map_err(|e| Error::Input(format!("{}:{no}: not a JSON object: {e}", path.display())))?;
            let field = &opts.jsonl_field;
            let text = match v.get(field) {
                Some(serde_json::Value::String(t)) => t,
                Some(other) => {
                    return Err(Error::Input(format!("{}:{no}: field `{field}` is not a string but {}", path.display(), json_kind(other))))
                }
                None => return Err(Error::Input(format!("{}:{no}: no field `{field}` (choose it with --jsonl-field)", path.display()))),
            };
            if !text.is_empty() {
                f(text.clone(), consumed)?;
            }
        }
    } else {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let total = bytes.len() as u64;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::Input(format!("{}: not valid UTF-8 text (at byte {}); convert it first", path.display(), e.utf8_error().valid_up_to()))
        })?;
        split_docs(&text, opts.doc_split, &mut |d| f(d.to_string(), total))
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Writes one split's shards.
struct SplitWriter {
    dir: PathBuf,
    name: &'static str,
    wide: bool,
    cap: u64,
    cur: Option<(BufWriter<File>, PathBuf, u64)>,
    info: SplitInfo,
}

impl SplitWriter {
    fn new(dir: &Path, name: &'static str, wide: bool, cap: u64) -> Self {
        Self { dir: dir.to_path_buf(), name, wide, cap, cur: None, info: SplitInfo::default() }
    }

    fn push(&mut self, mut toks: &[u32]) -> Result<()> {
        while !toks.is_empty() {
            if self.cur.as_ref().is_some_and(|c| c.2 == self.cap) {
                self.close()?;
            }
            if self.cur.is_none() {
                let file = format!("{}_{:06}.bin", self.name, self.info.shards.len());
                let path = self.dir.join(&file);
                let mut w = BufWriter::with_capacity(1 << 20, File::create(&path).map_err(|e| Error::io(&path, e))?);
                w.write_all(&[0u8; LLMC_HEADER_BYTES]).map_err(|e| Error::io(&path, e))?;
                self.info.shards.push(ShardInfo { file, tokens: 0 });
                self.cur = Some((w, path, 0));
            }
            let (w, path, n) = self.cur.as_mut().unwrap();
            let k = ((self.cap - *n) as usize).min(toks.len());
            let mut buf = Vec::with_capacity(k * 4);
            for &t in &toks[..k] {
                if self.wide {
                    buf.extend_from_slice(&t.to_le_bytes());
                } else {
                    buf.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
            w.write_all(&buf).map_err(|e| Error::io(&*path, e))?;
            *n += k as u64;
            toks = &toks[k..];
        }
        Ok(())
    }

    /// Writes the header of the open shard (its token count), fsyncs and closes it.
    fn close(&mut self) -> Result<()> {
        let Some((mut w, path, n)) = self.cur.take() else { return Ok(()) };
        let mut header = [0i32; 256];
        (header[0], header[1]) = if self.wide { (LLMC_MAGIC_U32, LLMC_VERSION_U32) } else { (LLMC_MAGIC_U16, LLMC_VERSION_U16) };
        header[2] = i32::try_from(n).expect("--shard-tokens < 2^31 is checked");
        let bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
        let io = |e| Error::io(&path, e);
        w.flush().map_err(io)?;
        let mut f = w.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        self.info.shards.last_mut().expect("open shard").tokens = n;
        Ok(())
    }
}

/// Removes the staging folder unless disarmed (on errors and panics).
struct Staging(Option<PathBuf>);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// Removes `OUT.partial-<pid>` folders of processes that no longer run (killed earlier runs).
fn remove_stale_staging(out: &Path) {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else { return };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let prefix = format!("{}.partial-", name.to_string_lossy());
    for e in fs::read_dir(parent).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn progress_bar(enabled: bool, total: u64, what: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} {bar:30} {bytes}/{total_bytes} | {msg} | ETA {eta}").expect("template").progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Runs `data prepare`; returns the manifest written to `opts.out/dataset.json`.
pub fn prepare(opts: &PrepareOptions) -> Result<Manifest> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Input(format!("--val-fraction {} must be in [0, 1)", opts.val_fraction)));
    }
    if opts.shard_tokens < 1 || opts.shard_tokens > i32::MAX as u64 {
        return Err(Error::Input(format!("--shard-tokens {} must be in 1..2^31 (llm.c headers hold an int32 count)", opts.shard_tokens)));
    }
    if opts.inputs.is_empty() {
        return Err(Error::Input("data prepare: no input files given".into()));
    }
    let mut files: Vec<PathBuf> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pat in &opts.inputs {
        for p in expand(pat, "input")? {
            if seen.insert(p.clone()) {
                files.push(p);
            }
        }
    }
    // Normalized (`data/x/` → `data/x`), so the staging folder is a sibling, not a child.
    let out: &PathBuf = &opts.out.components().collect();
    if out.as_os_str().is_empty() || out.file_name().is_none() {
        return Err(Error::Input(format!("--out {}: name a new folder", opts.out.display())));
    }
    if out.exists() && !opts.overwrite {
        return Err(Error::Input(format!("{} already exists; pass --overwrite to replace it", out.display())));
    }
    remove_stale_staging(out);
    let mut staging_name = out.as_os_str().to_owned();
    staging_name.push(format!(".partial-{}", std::process::id()));
    let staging_path = PathBuf::from(staging_name);
    if staging_path.exists() {
        fs::remove_dir_all(&staging_path).map_err(|e| Error::io(&staging_path, e))?;
    }
    fs::create_dir_all(&staging_path).map_err(|e| Error::io(&staging_path, e))?;
    let mut staging = Staging(Some(staging_path.clone()));
    let dir = staging_path.as_path();
    let total_bytes: u64 = files.iter().map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();

    // The tokenizer: compiled in, a file, or trained here on the training split.
    let (tok, info) = match &opts.tokenizer {
        TokenizerChoice::Tiktoken(n) => (Tokenizer::tiktoken(n)?, TokenizerInfo { kind: "tiktoken".into(), name: n.clone(), path: None }),
        TokenizerChoice::File(p) => (
            Tokenizer::from_file(p, opts.eot_token.as_deref())?,
            TokenizerInfo { kind: "tokenizer_json".into(), name: p.display().to_string(), path: Some(p.display().to_string()) },
        ),
        TokenizerChoice::TrainBpe(v) => {
            let path = dir.join("tokenizer.json");
            train_on_files(&files, opts, *v, &path, total_bytes)?;
            let t = Tokenizer::from_file(&path, Some(super::tokenizer::ENDOFTEXT))?;
            (t, TokenizerInfo { kind: "trained_bpe".into(), name: format!("bpe:{v}"), path: Some("tokenizer.json".into()) })
        }
    };
    let wide = tok.vocab_size() > 65_536;
    let eot = tok.eot_id();
    let mut train = SplitWriter::new(dir, "train", wide, opts.shard_tokens);
    let mut val = SplitWriter::new(dir, "val", wide, opts.shard_tokens);
    let bar = progress_bar(opts.progress, total_bytes, "tokenizing");
    let mut done_bytes = 0u64;
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    let flush = |batch: &mut Vec<String>, train: &mut SplitWriter, val: &mut SplitWriter| -> Result<()> {
        let ids: Vec<Result<Vec<u32>>> = batch.par_iter().map(|d| tok.encode(d)).collect();
        for (doc, ids) in batch.drain(..).zip(ids) {
            let ids = ids?;
            let w = if is_val(&doc, opts.seed, opts.val_fraction) { &mut *val } else { &mut *train };
            w.push(&[eot])?;
            w.push(&ids)?;
            w.info.documents += 1;
            w.info.bytes += doc.len() as u64;
            w.info.tokens += ids.len() as u64 + 1;
        }
        Ok(())
    };
    for f in &files {
        read_docs(f, opts, &mut |doc, consumed| {
            batch_bytes += doc.len();
            batch.push(doc);
            if batch_bytes >= BATCH_BYTES {
                flush(&mut batch, &mut train, &mut val)?;
                batch_bytes = 0;
                bar.set_position(done_bytes + consumed);
                bar.set_message(format!("{} docs, {} tokens", train.info.documents + val.info.documents, train.info.tokens + val.info.tokens));
            }
            Ok(())
        })?;
        done_bytes += fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        bar.set_position(done_bytes);
    }
    flush(&mut batch, &mut train, &mut val)?;
    train.close()?;
    val.close()?;
    bar.finish_and_clear();
    let names = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    if train.info.documents == 0 {
        return Err(Error::Input(format!("empty corpus: no non-empty training document in {names}")));
    }
    if opts.val_fraction > 0.0 && val.info.documents == 0 {
        return Err(Error::Input(format!(
            "no document fell into the validation split ({} documents, --val-fraction {}); raise it or cut documents finer (--doc-split paragraph|line)",
            train.info.documents, opts.val_fraction
        )));
    }
    let manifest = Manifest {
        format: "llmc".into(),
        dtype: if wide { "uint32" } else { "uint16" }.into(),
        tokenizer: info,
        vocab_size: tok.vocab_size(),
        eot_id: eot,
        eot_placement: "before each document".into(),
        shard_tokens: opts.shard_tokens,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        doc_split: opts.doc_split.name().into(),
        jsonl_field: opts.jsonl_field.clone(),
        inputs: files.iter().map(|f| f.display().to_string()).collect(),
        train: train.info,
        val: val.info,
        mixscale_version: env!("CARGO_PKG_VERSION").into(),
    };
    let mpath = dir.join(MANIFEST);
    crate::fsutil::write_synced(&mpath, serde_json::to_string_pretty(&manifest).expect("manifest").as_bytes()).map_err(|e| Error::io(&mpath, e))?;
    crate::fsutil::sync_dir(dir);
    // Swap the finished folder in: OUT is either absent, the old one or the new one.
    let mut old = out.as_os_str().to_owned();
    old.push(format!(".old-{}", std::process::id()));
    let old = PathBuf::from(old);
    if out.exists() {
        fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
    }
    fs::rename(dir, out).map_err(|e| Error::io(out, e))?;
    staging.0 = None;
    if old.exists() {
        let _ = fs::remove_dir_all(&old);
    }
    crate::fsutil::sync_dir(out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
    Ok(manifest)
}

/// Trains the BPE of `--tokenizer bpe:V` on the training documents of `files` (read by a
/// producer thread, so memory stays bounded).
fn train_on_files(files: &[PathBuf], opts: &PrepareOptions, vocab: usize, path: &Path, total_bytes: u64) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(256);
    let bar = progress_bar(opts.progress, total_bytes, "training BPE");
    std::thread::scope(|s| {
        let producer = s.spawn(|| -> Result<()> {
            let tx = tx;
            let mut done = 0u64;
            for f in files {
                read_docs(f, opts, &mut |doc, consumed| {
                    bar.set_position(done + consumed);
                    if !is_val(&doc, opts.seed, opts.val_fraction) {
                        // A closed receiver means training failed; its error is reported below.
                        let _ = tx.send(doc);
                    }
                    Ok(())
                })?;
                done += fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            }
            Ok(())
        });
        let trained = train_bpe(rx.into_iter(), vocab, path);
        let read = producer.join().expect("document reader panicked");
        bar.finish_and_clear();
        read.and(trained)
    })
}
