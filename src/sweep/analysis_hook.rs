//! The sweep's `analysis:` section, handed to the fit/plot layer (`crate::fit::analysis`):
//! checked when the sweep is planned, run on `results.csv` when the sweep is done.
//!
//! The fit/plot layer's `check_analysis` / `run_analysis` are not in this build yet: the
//! section is accepted as is (any mapping) and nothing is run. Wiring them is these two calls.

use super::spec::SweepSpec;
use crate::error::Result;
use serde_yaml_ng::Value;
use std::path::Path;

/// Checks the `analysis:` section (at plan time).
pub fn check(sweep: &SweepSpec, value: &Value) -> Result<()> {
    if !value.is_mapping() {
        return Err(sweep.doc.error_keys(&["analysis"], "expected a mapping (see analysis/ for the keys)"));
    }
    Ok(())
}

/// Runs the analysis on `results_csv`, writing into `out_dir`. Returns whether anything ran.
pub fn run(_sweep: &SweepSpec, _value: &Value, _results_csv: &Path, _out_dir: &Path) -> Result<bool> {
    Ok(false)
}
