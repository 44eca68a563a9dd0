//! What `mixscale fit` reads: a plain CSV of points, or a sweep file whose runner wrote
//! `runs/<sweep name>/results.csv`.
//!
//! * **CSV** (any other extension): named columns `N, D, C, loss, lr, batch_tokens, S, run, step`
//!   (see [`super::points`]); other columns are kept for the laws and plots that name them
//!   (e.g. `arch` for the per-architecture plot).
//! * **Sweep YAML** (`.yaml`/`.yml`): the sweep's `name:` (or the file stem) locates
//!   `runs/<name>/results.csv` (relative to the working directory, else to the sweep file's
//!   folder). That table is written by the sweep runner with columns
//!   `run,arch,seed,status,N,N_total,D,C,loss,lr,batch_tokens,S,step,...`. Rows whose `status`
//!   is not `completed` are dropped and recorded as exclusions (a diverged trial is data about
//!   the landscape, but not a point on the loss surface). Run folders `runs/<name>/<run>/` with a
//!   `metrics.csv` are listed for the per-trial loss-curve plot, and the sweep's `analysis:`
//!   section is returned for [`super::analysis::run_analysis`].
//! * **Study journal** (`.journal`): not read here yet — the journal module lives elsewhere;
//!   export its trials to CSV (or run the sweep) and fit that.

use super::csv::Table;
use super::error::FitError;
use crate::config::YamlDoc;
use std::path::{Path, PathBuf};

/// A loaded input table and what came with it.
#[derive(Clone, Debug)]
pub struct Input {
    /// The points table (for sweeps: completed rows only).
    pub table: Table,
    /// Rows dropped on loading (non-completed trials), with file:line and reason.
    pub exclusions: Vec<String>,
    /// Run folders holding a `metrics.csv` (per-trial loss curves), if any.
    pub run_dirs: Vec<PathBuf>,
    /// The sweep document and its `analysis:` value, for sweep inputs that have one.
    pub sweep: Option<(YamlDoc, Option<serde_yaml_ng::Value>)>,
}

/// Whether `path` names a sweep file (by extension).
pub fn is_sweep_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// Loads `path` (CSV or sweep YAML, see the module docs).
pub fn load(path: &Path) -> Result<Input, FitError> {
    if path.extension().and_then(|e| e.to_str()) == Some("journal") {
        return Err(FitError::Input(format!(
            "{}: reading a study journal directly is not supported yet; fit the sweep file (its runs/<name>/results.csv) or a CSV export",
            path.display()
        )));
    }
    if !is_sweep_file(path) {
        let table = Table::read(path)?;
        return Ok(Input { table, exclusions: vec![], run_dirs: vec![], sweep: None });
    }
    let doc = YamlDoc::load(path).map_err(|e| FitError::Input(e.to_string()))?;
    let name = doc
        .value
        .get("name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().to_string()))
        .unwrap_or_default();
    let rel = Path::new("runs").join(&name);
    let base = path.parent().filter(|p| !p.as_os_str().is_empty());
    let candidates: Vec<PathBuf> = std::iter::once(rel.clone()).chain(base.map(|b| b.join(&rel))).collect();
    let Some(dir) = candidates.iter().find(|d| d.join("results.csv").is_file()) else {
        return Err(FitError::Input(format!(
            "{}: sweep `{name}` has no results yet: {} not found (run the sweep first)",
            path.display(),
            rel.join("results.csv").display()
        )));
    };
    let (table, exclusions) = completed_rows(&Table::read(&dir.join("results.csv"))?);
    let mut run_dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.join("metrics.csv").is_file()).collect())
        .unwrap_or_default();
    run_dirs.sort();
    let analysis = doc.value.get("analysis").cloned();
    Ok(Input { table, exclusions, run_dirs, sweep: Some((doc, analysis)) })
}

/// Keeps the rows whose `status` is `completed` (all rows if there is no `status` column);
/// every other row is recorded as an exclusion naming its line, run and status.
pub fn completed_rows(table: &Table) -> (Table, Vec<String>) {
    let Some(js) = table.column("status") else { return (table.clone(), vec![]) };
    let jr = table.column("run");
    let mut kept = Vec::new();
    let mut ex = Vec::new();
    for (line, f) in &table.records {
        let status = f[js].trim();
        if status == "completed" {
            kept.push((*line, f.clone()));
        } else {
            let run = jr.map(|j| f[j].trim().to_string()).unwrap_or_default();
            let status = if status.is_empty() { "(empty)" } else { status };
            ex.push(format!("{}:{line}: run `{run}` has status `{status}`, not `completed`; row excluded", table.path.display()));
        }
    }
    (Table { path: table.path.clone(), header: table.header.clone(), records: kept }, ex)
}

/// Run folders under `dir` holding a `metrics.csv` (sorted), for the loss-curve plot.
pub fn run_dirs_under(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in dirs {
        if d.join("metrics.csv").is_file() {
            out.push(d.clone());
        } else if let Ok(rd) = std::fs::read_dir(d) {
            let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.join("metrics.csv").is_file()).collect();
            v.sort();
            out.extend(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn only_completed_rows_are_kept_and_others_recorded() {
        let t = Table::parse(Path::new("r.csv"), "run,status,N,loss\na,completed,1,2\nb,diverged,1,nan\nc,completed,2,1.5\nd,,3,1\n").unwrap();
        let (k, ex) = completed_rows(&t);
        assert_eq!(k.records.len(), 2);
        assert_eq!(ex.len(), 2);
        assert!(ex[0].contains("r.csv:3") && ex[0].contains("`b`") && ex[0].contains("diverged"), "{ex:?}");
        assert!(ex[1].contains("(empty)"));
    }
}
