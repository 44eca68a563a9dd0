//! Errors of the fitting engine. Every degenerate input maps to one of these; the engine never
//! panics on user data.

use std::path::PathBuf;

/// An error from reading points, fitting a law or writing `fit.json`.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The input file could not be read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The output could not be written.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// A CSV file has no header line.
    #[error("{path}: empty file (no header line)")]
    Empty { path: PathBuf },
    /// A row has a different number of fields from the header.
    #[error("{path}:{line}: expected {expected} fields (as in the header), found {found}")]
    Ragged { path: PathBuf, line: usize, expected: usize, found: usize },
    /// A field that should be a number is not one (`NaN`/`inf` parse; they exclude the row instead).
    #[error("{path}:{line}: column `{column}`: cannot parse {value:?} as a number")]
    Parse { path: PathBuf, line: usize, column: String, value: String },
    /// A field has an unterminated quote.
    #[error("{path}:{line}: unterminated quoted field")]
    Quote { path: PathBuf, line: usize },
    /// A column a law needs is absent.
    #[error("{path}: missing column `{column}` needed by law `{law}` (columns present: {present})")]
    MissingColumn { path: PathBuf, column: String, law: String, present: String },
    /// The law name is not known.
    #[error("unknown law `{name}`; known laws: {known}")]
    UnknownLaw { name: String, known: String },
    /// Not enough usable points (after exclusions) to identify the law's parameters.
    #[error("law `{law}`: {n} usable points, need at least {need}{detail}")]
    TooFewPoints { law: String, n: usize, need: usize, detail: String },
    /// Input that cannot be fitted, with the reason.
    #[error("law `{law}`: {reason}")]
    Degenerate { law: String, reason: String },
    /// An input that is not a readable points table (e.g. a sweep file without results yet).
    #[error("{0}")]
    Input(String),
    /// An option value is invalid.
    #[error("invalid option: {0}")]
    Option(String),
    /// Serialising the result failed.
    #[error("serialising fit result: {0}")]
    Json(#[from] serde_json::Error),
}
