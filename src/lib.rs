//! mixscale: a research harness for LLM token-mixer architectures and scaling laws, on candle.
//!
//! Data flow, one folder per stage:
//! `config` (YAML → specs) → `blocks` (token mixers, registry) → `model` (language model,
//! parameters, accounting) → `train` (loop, optimizer, schedule, checkpoints, records) → `sweep`
//! (sweep runner, study record: an Optuna journal) → `fit` (scaling laws) → `plot` (plots, report).
//! `data` provides token streams; `ops` the core ops with exact autograd.

pub mod blocks;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod fit;
pub mod fsutil;
pub mod model;
pub mod ops;
pub mod plot;
pub mod sweep;
pub mod train;

pub mod testing;

pub use error::{Error, Result};
