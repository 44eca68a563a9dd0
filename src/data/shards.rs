//! Token files, memory-mapped (research notes: `shared/reference/data.md` §3).
//!
//! # Formats ([`TokenFormat`])
//! * `llmc` — llm.c / modded-nanogpt shards (karpathy/llm.c `dev/data/data_common.py`,
//!   `write_datafile`): a header of 256 little-endian int32 (1024 bytes) holding the magic, the
//!   version and the token count, then exactly that many tokens. Magic 20240520 with version 1
//!   means uint16 tokens (GPT-2; modded-nanogpt's `fineweb_{train,val}_%06d.bin`), magic
//!   20240801 with version 7 means uint32 tokens (Llama 3). As modded-nanogpt's loader asserts,
//!   the file must hold exactly `count` tokens after the header.
//! * `u16` / `u32` — headerless little-endian arrays (nanoGPT `prepare.py`'s `train.bin`, OLMo
//!   `MemMapDataset`); the dtype cannot be detected, so the user gives it.
//! * `megatron` — Megatron-LM indexed datasets (`PREFIX.bin` + `PREFIX.idx`, read-only; see
//!   [`super::megatron`]): the pattern names the `.bin` files (or the `.idx`, or the prefix), the
//!   dtype comes from the index, and the `.bin` is read as one stream of tokens.
//!
//! # Windows
//! A window is `seq_len + 1` consecutive tokens of one file (windows never cross files): the
//! first `seq_len` are inputs and the last `seq_len` targets.
//! * Training window `i` of stream `seed` is uniform over *every* window start of every file
//!   (overlapping, sampled with replacement, as nanoGPT's `get_batch` does with
//!   `torch.randint(len(data) - block_size)`): the start is
//!   `Rng::new(mix(mix(seed, TRAIN_TAG), i)).below(total_starts)`, mapped to (file, offset)
//!   through the cumulative start counts of the files in sorted-path order. It depends only on
//!   (seed, i, the files' lengths), so the run's data position stays one integer.
//! * Validation window `j` is the `j`-th consecutive window with stride `seq_len` (each token
//!   is a target at most once, as llm.c's sequential loader reads), through the files in
//!   sorted-path order: the same for every run.
//!
//! # Checks
//! At open: the path matches files, each file's header (magic, version, exact length) or its
//! length (a whole number of tokens), the corpus is not empty and holds at least one window.
//! A file shorter than one window contributes no window (as every file's last tokens short of
//! a window contribute none: windows never cross files); `describe` counts such files. Token ids ≥ `vocab_size` are checked when a window is read (scanning multi-GB
//! corpora at open would cost minutes); the error names the file and the token's position.
//! The files must not change while mapped.

use super::rng::{mix, Rng};
use crate::config::data::TokenFormat;
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Size of the llm.c header: 256 int32.
pub const LLMC_HEADER_BYTES: usize = 1024;
/// llm.c magic of uint16 shards (GPT-2 tokenizer), used with [`LLMC_VERSION_U16`].
pub const LLMC_MAGIC_U16: i32 = 20240520;
pub const LLMC_VERSION_U16: i32 = 1;
/// llm.c magic of uint32 shards (Llama 3 tokenizer), used with [`LLMC_VERSION_U32`].
pub const LLMC_MAGIC_U32: i32 = 20240801;
pub const LLMC_VERSION_U32: i32 = 7;

const TRAIN_TAG: u64 = 0x544f_4b45_4e53_0001;

/// One memory-mapped token file.
pub struct Shard {
    path: PathBuf,
    map: Option<Mmap>,
    /// Byte offset of the first token.
    start: usize,
    /// Bytes per token (1, 2, 4 or 8).
    width: usize,
    /// Signed element type (Megatron int8/16/32/64): negative ids are errors when read.
    signed: bool,
    /// Number of tokens.
    len: usize,
}

fn input(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {msg}", path.display()))
}

fn le_i32(b: &[u8], i: usize) -> i32 {
    i32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

impl Shard {
    /// Maps `path` and checks its header or length against `format`.
    pub fn open(path: &Path, format: TokenFormat) -> Result<Self> {
        let mut signed = false;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let bytes = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        // SAFETY: read-only mapping; the module documents that files must not change while mapped.
        let map = if bytes == 0 { None } else { Some(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?) };
        let data: &[u8] = map.as_deref().unwrap_or(&[]);
        let (start, width, len) = match format {
            TokenFormat::U16 | TokenFormat::U32 => {
                let width = if format == TokenFormat::U16 { 2 } else { 4 };
                if bytes % width != 0 {
                    return Err(input(path, format!("{bytes} bytes is not a whole number of {}-byte tokens (format {format:?})", width)));
                }
                (0, width, bytes / width)
            }
            TokenFormat::Llmc => {
                if bytes < LLMC_HEADER_BYTES {
                    return Err(input(path, format!("{bytes} bytes, shorter than the {LLMC_HEADER_BYTES}-byte llm.c header")));
                }
                let (magic, version, count) = (le_i32(data, 0), le_i32(data, 1), le_i32(data, 2));
                let (width, want_version) = match magic {
                    LLMC_MAGIC_U16 => (2, LLMC_VERSION_U16),
                    LLMC_MAGIC_U32 => (4, LLMC_VERSION_U32),
                    _ => {
                        return Err(input(
                            path,
                            format!("bad magic {magic}: not an llm.c token shard (expected {LLMC_MAGIC_U16} for uint16 or {LLMC_MAGIC_U32} for uint32 tokens)"),
                        ))
                    }
                };
                if version != want_version {
                    return Err(input(path, format!("llm.c magic {magic} needs version {want_version}; the header says version {version}")));
                }
                if count < 0 {
                    return Err(input(path, format!("negative token count {count} in the header")));
                }
                let count = count as usize;
                let have = bytes - LLMC_HEADER_BYTES;
                if have < count * width {
                    return Err(input(
                        path,
                        format!("truncated: the header promises {count} tokens ({} bytes) but only {have} bytes follow the header", count * width),
                    ));
                }
                if have > count * width {
                    return Err(input(path, format!("{} bytes after the {count} tokens the header promises", have - count * width)));
                }
                (LLMC_HEADER_BYTES, width, count)
            }
            TokenFormat::Megatron => {
                let (_, idx) = super::megatron::pair(path);
                let index = super::megatron::MegatronIndex::open(&idx, bytes as u64)?;
                signed = index.dtype.signed();
                (0, index.dtype.width(), index.tokens as usize)
            }
        };
        Ok(Self { path: path.to_path_buf(), map, start, width, signed, len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends tokens `at..at+n` to `out`, checking each id against `vocab`.
    pub fn read(&self, at: usize, n: usize, vocab: usize, out: &mut Vec<u32>) -> Result<()> {
        assert!(at + n <= self.len, "window {at}+{n} past the end of {}", self.path.display());
        let data = self.map.as_deref().unwrap_or(&[]);
        let bytes = &data[self.start + at * self.width..self.start + (at + n) * self.width];
        let first = out.len();
        match (self.width, self.signed) {
            (2, false) => out.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)),
            (4, false) => out.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            _ => return self.read_wide(bytes, at, vocab, out),
        }
        match out[first..].iter().position(|&t| t as usize >= vocab) {
            Some(k) => Err(self.too_big(out[first + k] as i64, at + k, vocab)),
            None => Ok(()),
        }
    }

    fn too_big(&self, id: i64, pos: usize, vocab: usize) -> Error {
        input(&self.path, format!("token id {id} at token position {pos} is {} data.vocab_size {vocab}", if id < 0 { "negative, not in 0 ..<" } else { "≥" }))
    }

    /// The element types only Megatron files use (uint8, signed ints): converted through i64.
    fn read_wide(&self, bytes: &[u8], at: usize, vocab: usize, out: &mut Vec<u32>) -> Result<()> {
        for (k, c) in bytes.chunks_exact(self.width).enumerate() {
            let v: i64 = match (self.width, self.signed) {
                (1, false) => c[0] as i64,
                (1, true) => c[0] as i8 as i64,
                (2, true) => i16::from_le_bytes([c[0], c[1]]) as i64,
                (4, true) => i32::from_le_bytes(c.try_into().unwrap()) as i64,
                _ => i64::from_le_bytes(c.try_into().unwrap()),
            };
            if v < 0 || v as u64 >= vocab as u64 {
                return Err(self.too_big(v, at + k, vocab));
            }
            out.push(v as u32);
        }
        Ok(())
    }
}

/// Writes `tokens` as an llm.c shard: uint16 (magic 20240520, version 1) when `wide` is false,
/// uint32 (magic 20240801, version 7) when true.
pub fn write_llmc(path: &Path, tokens: &[u32], wide: bool) -> Result<()> {
    let mut header = [0i32; 256];
    header[0] = if wide { LLMC_MAGIC_U32 } else { LLMC_MAGIC_U16 };
    header[1] = if wide { LLMC_VERSION_U32 } else { LLMC_VERSION_U16 };
    header[2] = i32::try_from(tokens.len()).map_err(|_| input(path, "more than 2^31 tokens in one shard"))?;
    let mut bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
    for &t in tokens {
        if wide {
            bytes.extend_from_slice(&t.to_le_bytes());
        } else {
            let t = u16::try_from(t).map_err(|_| input(path, format!("token {t} does not fit uint16")))?;
            bytes.extend_from_slice(&t.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Does `name` match `pat` (`*` any run of characters, `?` one character)?
pub fn wildcard_match(pat: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pat.chars().collect(), name.chars().collect());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// The files `pattern` names, sorted by path. Wildcards (`*`, `?`) only in the last component;
/// `key` (e.g. `data.train`) prefixes the errors.
pub fn expand(pattern: &str, key: &str) -> Result<Vec<PathBuf>> {
    let p = Path::new(pattern);
    let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let wild = |s: &str| s.contains('*') || s.contains('?');
    if wild(&dir.to_string_lossy()) {
        return Err(Error::Input(format!("{key}: `{pattern}`: wildcards are only supported in the last path component")));
    }
    if !wild(&name) {
        return if p.is_file() { Ok(vec![p.to_path_buf()]) } else { Err(Error::Input(format!("{key}: {pattern}: no such file"))) };
    }
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::Input(format!("{key}: `{pattern}`: cannot list {}: {e}", dir.display())))?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file() && wildcard_match(&name, &e.file_name().to_string_lossy()))
        .map(|e| if p.parent().map(|d| d.as_os_str().is_empty()).unwrap_or(true) { PathBuf::from(e.file_name()) } else { e.path() })
        .collect();
    if out.is_empty() {
        return Err(Error::Input(format!("{key}: `{pattern}` matches no file")));
    }
    out.sort();
    Ok(out)
}

/// A set of token files read as windows of `window` tokens (see the module docs).
pub struct TokenFiles {
    shards: Vec<Shard>,
    window: usize,
    vocab: usize,
    /// Cumulative number of training window starts: file k holds starts `cum_train[k]..cum_train[k+1]`.
    cum_train: Vec<u64>,
    /// Cumulative number of stride-`window - 1` validation windows.
    cum_val: Vec<u64>,
}

impl TokenFiles {
    /// Opens the files `pattern` matches (`key` names the config field in errors) for windows of
    /// `window` ≥ 2 tokens.
    pub fn open(pattern: &str, key: &str, format: TokenFormat, vocab: usize, window: usize) -> Result<Self> {
        Self::open_many(&[pattern], key, format, vocab, window)
    }

    /// [`TokenFiles::open`] for several patterns: their files in pattern order (each pattern's
    /// matches sorted), a file matched twice read once.
    pub fn open_many(patterns: &[&str], key: &str, format: TokenFormat, vocab: usize, window: usize) -> Result<Self> {
        assert!(window >= 2, "a window holds at least one input and one target");
        if patterns.is_empty() {
            return Err(Error::Input(format!("{key}: no file pattern given")));
        }
        let pattern = patterns.join("`, `");
        let mut paths: Vec<PathBuf> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in patterns {
            for f in expand(p, key)? {
                // A Megatron pattern may match both files of a pair (or only the .idx): read each .bin once.
                let f = if format == TokenFormat::Megatron { super::megatron::pair(&f).0 } else { f };
                if seen.insert(f.clone()) {
                    paths.push(f);
                }
            }
        }
        let shards = paths.iter().map(|p| Shard::open(p, format)).collect::<Result<Vec<_>>>()?;
        if shards.iter().all(|s| s.is_empty()) {
            return Err(Error::Input(format!("{key}: the {} file(s) matching `{pattern}` hold no tokens", shards.len())));
        }
        if shards.iter().all(|s| s.len() < window) {
            let longest = shards.iter().max_by_key(|s| s.len()).expect("expand returns at least one file");
            return Err(input(
                longest.path(),
                format!(
                    "{key}: no file matching `{pattern}` holds one window of train.seq_len + 1 = {window} tokens (the longest, this one, has {})",
                    longest.len()
                ),
            ));
        }
        let (mut cum_train, mut cum_val) = (vec![0u64], vec![0u64]);
        for s in &shards {
            cum_train.push(cum_train.last().unwrap() + (s.len() + 1).saturating_sub(window) as u64);
            cum_val.push(cum_val.last().unwrap() + (s.len().saturating_sub(1) / (window - 1)) as u64);
        }
        Ok(Self { shards, window, vocab, cum_train, cum_val })
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Number of files shorter than one window (they contribute no window).
    pub fn short_files(&self) -> usize {
        self.shards.iter().filter(|s| s.len() < self.window).count()
    }

    /// Total number of tokens.
    pub fn tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.len() as u64).sum()
    }

    /// Number of distinct validation windows.
    pub fn val_windows(&self) -> u64 {
        *self.cum_val.last().unwrap()
    }

    /// (file index, token offset) of training window `i` of stream `seed`.
    pub fn train_position(&self, seed: u64, i: u64) -> (usize, usize) {
        let total = *self.cum_train.last().unwrap();
        let r = Rng::new(mix(mix(seed, TRAIN_TAG), i)).below(total);
        locate(&self.cum_train, r, 1)
    }

    /// (file index, token offset) of validation window `j` (`j < val_windows()`).
    pub fn val_position(&self, j: u64) -> Result<(usize, usize)> {
        if j >= self.val_windows() {
            return Err(Error::Input(format!(
                "data.val: validation window {j} requested but the files hold only {} windows of {} tokens (lower train.eval_sequences)",
                self.val_windows(),
                self.window
            )));
        }
        Ok(locate(&self.cum_val, j, self.window - 1))
    }

    /// Appends the window of `window` tokens at (file, offset) to `out`.
    pub fn read(&self, (file, offset): (usize, usize), out: &mut Vec<u32>) -> Result<()> {
        self.shards[file].read(offset, self.window, self.vocab, out)
    }
}

/// The file holding global index `r` of cumulative counts `cum`, and the offset of that
/// index's window inside it (`stride` tokens per index).
fn locate(cum: &[u64], r: u64, stride: usize) -> (usize, usize) {
    let k = cum.partition_point(|&c| c <= r) - 1;
    (k, (r - cum[k]) as usize * stride)
}

#[cfg(test)]
#[path = "shards_tests.rs"]
mod tests;
