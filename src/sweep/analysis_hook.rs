//! The sweep's `analysis:` section, handed to the fit/plot layer (`crate::fit::analysis`):
//! checked when the sweep is planned, run on `results.csv` into `runs/<sweep>/analysis/` when
//! every trial is done (fits, plots, report.md/html).

use super::spec::SweepSpec;
use crate::error::Result;
use serde_yaml_ng::Value;
use std::path::Path;

/// Checks the `analysis:` section of the sweep file `doc` (when the file is loaded); errors
/// are located in the sweep file.
pub fn check_value(doc: &crate::config::YamlDoc, value: &Value) -> Result<()> {
    crate::fit::analysis::check_analysis(doc, "analysis", value)
}

/// Runs the analysis on `results_csv`, writing into `out_dir`.
pub fn run(sweep: &SweepSpec, value: &Value, results_csv: &Path, out_dir: &Path) -> Result<()> {
    crate::fit::analysis::run_analysis(&sweep.doc, "analysis", value, results_csv, out_dir)
}
