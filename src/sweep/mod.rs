//! Sweeps: the study record (an Optuna-compatible journal) and what runs trials into it.

pub mod journal;
