//! Library error type. The CLI edge (`main.rs`) wraps these in `anyhow` and maps them to exit
//! codes (see `Error::exit_code`).

use std::path::PathBuf;

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration problem located in a file: `file:line: key.path: message`.
    #[error("{}", render_config_error(file, *line, key_path, message))]
    Config {
        file: PathBuf,
        line: Option<usize>,
        key_path: String,
        message: String,
    },
    /// A name that is not registered; lists the known ones.
    #[error("unknown {kind} `{name}`; known: {}", known.join(", "))]
    UnknownName {
        kind: &'static str,
        name: String,
        known: Vec<String>,
    },
    /// Bad input that is not a config file (CLI values, tensor files).
    #[error("{0}")]
    Input(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A study-record journal problem (`file[:line]: message`; see `sweep::journal`).
    #[error("{}", render_journal_error(path, *line, message))]
    Journal {
        path: PathBuf,
        line: Option<u64>,
        message: String,
    },
    /// A tensor computation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Other(String),
}

fn render_config_error(file: &std::path::Path, line: Option<usize>, key: &str, msg: &str) -> String {
    let loc = match line {
        Some(l) => format!("{}:{}", file.display(), l),
        None => file.display().to_string(),
    };
    if key.is_empty() {
        format!("{loc}: {msg}")
    } else {
        format!("{loc}: {key}: {msg}")
    }
}

fn render_journal_error(file: &std::path::Path, line: Option<u64>, msg: &str) -> String {
    match line {
        Some(l) => format!("{}:{l}: {msg}", file.display()),
        None => format!("{}: {msg}", file.display()),
    }
}

impl Error {
    /// Exit code used by the CLI for this error (documented in the README):
    /// 2 = bad input (config, CLI values, files), 1 = anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config { .. } | Error::UnknownName { .. } | Error::Input(_) => 2,
            _ => 1,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
