//! Megatron-LM indexed datasets, read-only (research notes: `shared/reference/data.md` §3.3;
//! format of NVIDIA/Megatron-LM `megatron/core/datasets/indexed_dataset.py`, also used by
//! GPT-NeoX and Pythia).
//!
//! A dataset is a pair `PREFIX.bin` + `PREFIX.idx`. The `.bin` holds the token arrays of every
//! sequence back to back, no header. The `.idx`, all little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 9 | magic `b"MMIDIDX\x00\x00"` |
//! | u64 | version = 1 |
//! | u8 | dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16 |
//! | u64 | sequence count `S` |
//! | u64 | document count `D` (length of the document index: documents + 1) |
//! | int32\[S\] | sequence lengths (tokens) |
//! | int64\[S\] | sequence pointers (byte offsets into `.bin`) |
//! | int64\[D\] | document index (sequence boundaries: starts at 0, ends at `S`) |
//! | int8\[S\] | sequence modes (optional; multimodal datasets only) |
//!
//! Megatron's builder writes the sequences contiguously (pointer `i` = bytes of sequences
//! `0..i`), which is what [`MegatronIndex::open`] checks; mixscale then reads the `.bin` as one
//! token stream, as Megatron's `GPTDataset` does when it concatenates documents into samples
//! (documents are separated by the EOD token the preprocessing appended, if it did).

use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Magic bytes at the start of every `.idx`.
pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// Bytes of the fixed header: magic, version, dtype code, sequence and document counts.
pub const HEADER_BYTES: usize = 9 + 8 + 1 + 8 + 8;

/// A token element type of a Megatron `.bin` (the integer dtype codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U8,
    I8,
    I16,
    I32,
    I64,
    U16,
}

impl Dtype {
    /// The dtype of Megatron code `code`; float codes (6, 7) and unknown codes are errors.
    pub fn from_code(code: u8) -> std::result::Result<Self, String> {
        Ok(match code {
            1 => Dtype::U8,
            2 => Dtype::I8,
            3 => Dtype::I16,
            4 => Dtype::I32,
            5 => Dtype::I64,
            8 => Dtype::U16,
            6 | 7 => return Err(format!("dtype code {code} is a float type ({}); token ids must be integers", if code == 6 { "float64" } else { "float32" })),
            _ => return Err(format!("unknown dtype code {code} (Megatron codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)")),
        })
    }

    pub fn code(self) -> u8 {
        match self {
            Dtype::U8 => 1,
            Dtype::I8 => 2,
            Dtype::I16 => 3,
            Dtype::I32 => 4,
            Dtype::I64 => 5,
            Dtype::U16 => 8,
        }
    }

    /// Bytes per element.
    pub fn width(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }

    pub fn signed(self) -> bool {
        matches!(self, Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64)
    }
}

/// The parsed `.idx` of a Megatron dataset.
#[derive(Clone, Debug)]
pub struct MegatronIndex {
    pub dtype: Dtype,
    pub sequence_lengths: Vec<i32>,
    pub sequence_pointers: Vec<i64>,
    pub document_indices: Vec<i64>,
    /// Total tokens of all sequences.
    pub tokens: u64,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {msg}", path.display()))
}

/// The `.bin` and `.idx` paths of the dataset `path` names: `PREFIX`, `PREFIX.bin` or `PREFIX.idx`.
pub fn pair(path: &Path) -> (PathBuf, PathBuf) {
    let s = path.to_string_lossy();
    let prefix = s.strip_suffix(".bin").or_else(|| s.strip_suffix(".idx")).unwrap_or(&s);
    (PathBuf::from(format!("{prefix}.bin")), PathBuf::from(format!("{prefix}.idx")))
}

impl MegatronIndex {
    /// Reads and checks `idx` against the size of its `.bin` (`bin_bytes`); errors name `idx`.
    pub fn open(idx: &Path, bin_bytes: u64) -> Result<Self> {
        let file = File::open(idx).map_err(|e| Error::io(idx, e))?;
        let len = file.metadata().map_err(|e| Error::io(idx, e))?.len() as usize;
        if len < HEADER_BYTES {
            return Err(bad(idx, format!("{len} bytes, shorter than the {HEADER_BYTES}-byte Megatron index header")));
        }
        // SAFETY: read-only mapping of a file that must not change while read (module docs of shards.rs).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(idx, e))?;
        Self::parse(idx, &map, bin_bytes)
    }

    /// Parses the bytes of an `.idx` (`path` only names it in errors).
    pub fn parse(path: &Path, b: &[u8], bin_bytes: u64) -> Result<Self> {
        if b.len() < HEADER_BYTES {
            return Err(bad(path, format!("{} bytes, shorter than the {HEADER_BYTES}-byte Megatron index header", b.len())));
        }
        if &b[..9] != MAGIC {
            return Err(bad(path, format!("bad magic {:?}: not a Megatron index (expected \"MMIDIDX\\0\\0\")", String::from_utf8_lossy(&b[..9]))));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u64_at(9);
        if version != 1 {
            return Err(bad(path, format!("Megatron index version {version}; only version 1 is known")));
        }
        let dtype = Dtype::from_code(b[17]).map_err(|m| bad(path, m))?;
        let (s, d) = (u64_at(18), u64_at(26));
        let need = |n: u64, w: u64| n.checked_mul(w);
        let body = need(s, 4).zip(need(s, 8)).zip(need(d, 8)).and_then(|((a, c), e)| a.checked_add(c)?.checked_add(e));
        let have = (b.len() - HEADER_BYTES) as u64;
        let Some(body) = body.filter(|&n| n <= have) else {
            return Err(bad(path, format!("truncated: the header declares {s} sequences and {d} document index entries but only {have} bytes follow it")));
        };
        if have != body && have != body + s {
            return Err(bad(path, format!("{} bytes after the header; {s} sequences and {d} document index entries need {body} (or {} with sequence modes)", have, body + s)));
        }
        let (s, d) = (s as usize, d as usize);
        let mut o = HEADER_BYTES;
        let sequence_lengths: Vec<i32> = b[o..o + 4 * s].chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        o += 4 * s;
        let sequence_pointers: Vec<i64> = b[o..o + 8 * s].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        o += 8 * s;
        let document_indices: Vec<i64> = b[o..o + 8 * d].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        // Sequences must tile the .bin contiguously (as Megatron's builder writes them).
        let w = dtype.width() as i64;
        let mut at = 0i64;
        for (i, (&n, &p)) in sequence_lengths.iter().zip(&sequence_pointers).enumerate() {
            if n < 0 {
                return Err(bad(path, format!("sequence {i} has negative length {n}")));
            }
            if p != at {
                return Err(bad(path, format!("sequence {i} starts at byte {p} of the .bin, expected {at} (sequences must be contiguous)")));
            }
            at += n as i64 * w;
        }
        if at as u64 != bin_bytes {
            return Err(bad(path, format!("the index covers {at} bytes of the .bin but the .bin has {bin_bytes} bytes (truncated or mismatched pair)")));
        }
        if document_indices.first().is_some_and(|&x| x != 0)
            || document_indices.windows(2).any(|p| p[1] < p[0])
            || document_indices.last().is_some_and(|&x| x != s as i64)
        {
            return Err(bad(path, format!("document index must rise from 0 to the sequence count {s}")));
        }
        let tokens = sequence_lengths.iter().map(|&n| n as u64).sum();
        Ok(Self { dtype, sequence_lengths, sequence_pointers, document_indices, tokens })
    }

    /// Number of documents (`document_indices.len() - 1`).
    pub fn documents(&self) -> usize {
        self.document_indices.len().saturating_sub(1)
    }
}

/// Writes a Megatron dataset `PREFIX.bin` + `PREFIX.idx` with one document per sequence, in
/// `dtype` (for tests and conversions; mixscale's own output format is llm.c shards).
pub fn write(prefix: &Path, sequences: &[Vec<u32>], dtype: Dtype) -> Result<()> {
    let (bin, idx) = pair(prefix);
    let mut data = Vec::new();
    let (mut lengths, mut pointers) = (Vec::new(), Vec::new());
    for seq in sequences {
        pointers.push(data.len() as i64);
        lengths.push(seq.len() as i32);
        for &t in seq {
            match dtype {
                Dtype::U8 => data.push(t as u8),
                Dtype::I8 => data.push(t as i8 as u8),
                Dtype::I16 => data.extend_from_slice(&(t as i16).to_le_bytes()),
                Dtype::U16 => data.extend_from_slice(&(t as u16).to_le_bytes()),
                Dtype::I32 => data.extend_from_slice(&(t as i32).to_le_bytes()),
                Dtype::I64 => data.extend_from_slice(&(t as i64).to_le_bytes()),
            }
        }
    }
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&1u64.to_le_bytes());
    h.push(dtype.code());
    h.extend_from_slice(&(sequences.len() as u64).to_le_bytes());
    h.extend_from_slice(&(sequences.len() as u64 + 1).to_le_bytes());
    lengths.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes()));
    pointers.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes()));
    (0..=sequences.len() as i64).for_each(|x| h.extend_from_slice(&x.to_le_bytes()));
    crate::fsutil::write_atomic(&bin, &data).map_err(|e| Error::io(&bin, e))?;
    crate::fsutil::write_atomic(&idx, &h).map_err(|e| Error::io(&idx, e))
}
