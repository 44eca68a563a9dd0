//! Sweeps: YAML definitions expanded into trials, run on a device pool or by cooperating
//! workers, recorded in an Optuna-compatible journal (`runs/<sweep>/study.journal`).
//!
//! Flow: [`spec`] (the sweep file) → [`expand`] (grid × ablate × search × seeds) → [`plan`]
//! (resolved configs, identity [`hash`], accounting) → execution ([`runner`], [`pool`],
//! [`worker`]: claim in the [`journal`], run a child `mixscale train`, record; [`study`] holds
//! the claim/retry/stale rules) → [`status`], [`results`] (results.csv) → the fit/plot layer.

pub mod analysis_hook;
pub mod early_stop;
pub mod expand;
pub mod expr;
pub mod hash;
pub mod journal;
pub mod plan;
pub mod pool;
pub mod proc;
pub mod results;
pub mod runner;
pub mod search;
pub mod slurm;
pub mod spec;
pub mod status;
pub mod study;
pub mod worker;
