//! A sweep's `analysis:` section: which laws to fit to its results, which plots to draw, where
//! to predict, and the report that collects them (documented with examples in `analysis/`).
//!
//! ```yaml
//! analysis:
//!   title: Quickstart scaling          # optional report title
//!   fits:
//!     - law: chinchilla                # one of fit::KNOWN_LAWS
//!       name: compute_optimal          # optional: output subfolder (default: the law)
//!       where: {arch: attention}       # optional: keep rows whose column equals the value
//!       best_per: [N]                  # optional: then only the lowest-loss row per N (best lr)
//!       options: {drop_highest: 0, bootstrap: {resamples: 200}}   # fit::FitOptions keys
//!       plots: [frontier, residuals]   # optional: default = the law's standard plots
//!       predict_at: [1.0e21]           # optional: compute budgets (FLOPs) for predictions
//! ```
//! A plain list is shorthand for `{fits: [...]}`.
//!
//! [`check_analysis`] validates a section (errors are located: `file:line: key.path: message`);
//! [`run_analysis`] runs it on a sweep's `results.csv` into an output folder: per fit
//! `<out>/<name>/fit.json` and its plots (SVG + PNG), and `<out>/report.md` and a self-contained
//! `<out>/report.html`. A fit that fails is reported (in the report and the returned error)
//! without stopping the others.

use super::csv::Table;
use super::select;
use super::input::{completed_rows, Input};
use super::{fit_table, write_json_atomic, FitOptions, FitResult, KNOWN_LAWS};
use crate::config::{join_path, YamlDoc};
use crate::error::{Error, Result};
use crate::plot;
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The whole `analysis:` section.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    /// Report title (default: "Scaling-law analysis").
    #[serde(default)]
    pub title: Option<String>,
    /// The fits, in report order.
    pub fits: Vec<FitSpec>,
}

/// One fit of the section.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FitSpec {
    /// Law name (one of [`KNOWN_LAWS`]).
    pub law: String,
    /// Output subfolder and report heading (default: the law name, made unique).
    #[serde(default)]
    pub name: Option<String>,
    /// Row filters: keep rows whose column equals the value (numbers compare numerically).
    #[serde(default, rename = "where")]
    pub filter: BTreeMap<String, Value>,
    /// After `where`: keep only the lowest-loss row (the law's `y` for `power`) of each group
    /// of rows sharing these columns, e.g. `[N]` = the best learning rate per model size.
    #[serde(default)]
    pub best_per: Vec<String>,
    /// Fit options (keys of [`FitOptions`]).
    #[serde(default)]
    pub options: FitOptions,
    /// Plots to draw (default: the law's standard set, see [`plot::default_plots`]).
    #[serde(default)]
    pub plots: Option<Vec<String>>,
    /// Compute budgets (FLOPs) for predictions; overrides `options.budgets`.
    #[serde(default)]
    pub predict_at: Option<Vec<f64>>,
}

impl FitSpec {
    /// The fit options with `predict_at` applied.
    pub fn effective_options(&self) -> FitOptions {
        let mut o = self.options.clone();
        if let Some(p) = &self.predict_at {
            o.budgets = p.clone();
        }
        o
    }
}

/// Parses and validates an `analysis:` value found at `key_path` of `doc`.
pub fn parse_analysis(doc: &YamlDoc, key_path: &str, value: &Value) -> Result<AnalysisSpec> {
    let spec: AnalysisSpec = match value {
        Value::Sequence(_) => AnalysisSpec { title: None, fits: doc.deserialize_at(value, key_path)? },
        _ => doc.deserialize_at(value, key_path)?,
    };
    let base = |i: usize| if value.is_sequence() { format!("[{i}]") } else { format!("fits[{i}]") };
    if spec.fits.is_empty() {
        return Err(doc.error(key_path, "no fits: list at least one `{law: ...}`"));
    }
    let mut names = Vec::new();
    for (i, f) in spec.fits.iter().enumerate() {
        let at = |k: &str| join_path(key_path, &join_path(&base(i), k));
        if !KNOWN_LAWS.contains(&f.law.as_str()) {
            return Err(doc.error(&at("law"), format!("unknown law `{}`; known laws: {}", f.law, KNOWN_LAWS.join(", "))));
        }
        if let Some(ps) = &f.plots {
            for (j, p) in ps.iter().enumerate() {
                if !plot::KNOWN_PLOTS.contains(&p.as_str()) {
                    return Err(doc.error(&at(&format!("plots[{j}]")), format!("unknown plot `{p}`; known plots: {}", plot::KNOWN_PLOTS.join(", "))));
                }
            }
        }
        if let Some(b) = &f.predict_at {
            if b.iter().any(|c| !(*c > 0.0 && c.is_finite())) {
                return Err(doc.error(&at("predict_at"), "compute budgets must be positive and finite (FLOPs)"));
            }
        }
        f.effective_options().check().map_err(|e| doc.error(&at("options"), e.to_string()))?;
        for (k, v) in &f.filter {
            if !(v.is_string() || v.is_number() || v.is_bool()) {
                return Err(doc.error(&at(&format!("where.{k}")), "a filter value must be a string, number or boolean"));
            }
        }
        let name = output_name(f, i, &spec.fits);
        if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c))) {
            return Err(doc.error(&at("name"), format!("`{name}` contains `{bad}`; use letters, digits, `-`, `_`, `.` (it names a folder)")));
        }
        if names.contains(&name) {
            return Err(doc.error(&at("name"), format!("two fits are named `{name}`; give each a distinct `name`")));
        }
        names.push(name);
    }
    Ok(spec)
}

/// Validates an `analysis:` value (located errors, nothing run).
pub fn check_analysis(doc: &YamlDoc, key_path: &str, value: &Value) -> Result<()> {
    parse_analysis(doc, key_path, value).map(|_| ())
}

/// Output folder name of fit `i`: its `name`, else the law (suffixed with the index when the
/// law appears more than once).
fn output_name(f: &FitSpec, i: usize, all: &[FitSpec]) -> String {
    match &f.name {
        Some(n) => n.clone(),
        None if all.iter().filter(|g| g.law == f.law && g.name.is_none()).count() > 1 => format!("{}_{i}", f.law),
        None => f.law.clone(),
    }
}

/// Runs the section on `results_csv` (the sweep runner's table; rows whose `status` is not
/// `completed` are excluded and recorded) into `out_dir`. Run folders next to `results_csv`
/// with a `metrics.csv` feed the loss-curve plot.
pub fn run_analysis(doc: &YamlDoc, key_path: &str, value: &Value, results_csv: &Path, out_dir: &Path) -> Result<()> {
    let spec = parse_analysis(doc, key_path, value)?;
    let table = Table::read(results_csv).map_err(|e| Error::Input(e.to_string()))?;
    let (table, exclusions) = completed_rows(&table);
    let run_dirs = super::input::run_dirs_under(&[results_csv.parent().unwrap_or(Path::new(".")).to_path_buf()]);
    let input = Input { table, exclusions, run_dirs, sweep: None };
    let outcomes = run_spec(&spec, &input, out_dir, false)?;
    failures(&outcomes, out_dir)
}

/// `Err` naming every failed fit (the report is already written), else `Ok`.
pub fn failures(outcomes: &[FitOutcome], out_dir: &Path) -> Result<()> {
    let failed: Vec<String> = outcomes.iter().filter_map(|o| o.result.as_ref().err().map(|e| format!("{}: {e}", o.name))).collect();
    if failed.is_empty() {
        return Ok(());
    }
    Err(Error::Input(format!(
        "analysis: {} of {} fits failed (report written to {}): {}",
        failed.len(),
        outcomes.len(),
        out_dir.join("report.md").display(),
        failed.join("; ")
    )))
}

/// One fit's outcome, for the report.
#[derive(Debug)]
pub struct FitOutcome {
    pub name: String,
    pub spec: FitSpec,
    /// Folder holding fit.json and the plots.
    pub dir: PathBuf,
    pub result: std::result::Result<FitResult, String>,
    pub figures: Vec<plot::Figure>,
    /// Plot failures (the fit itself succeeded; plots that do not apply to the data, e.g.
    /// `arch` without an `arch` column, land here too).
    pub plot_errors: Vec<String>,
    /// RMS and max |log residual| for the laws that predict each point.
    pub residual_summary: Option<String>,
}

/// Runs `spec` on a loaded input and writes the report; a failed fit is recorded in its outcome
/// (see [`failures`]). With `flat`, a single fit writes into `out_dir` itself (the
/// `mixscale fit --law` layout); otherwise each fit gets `out_dir/<name>/`.
pub fn run_spec(spec: &AnalysisSpec, input: &Input, out_dir: &Path, flat: bool) -> Result<Vec<FitOutcome>> {
    let mut outcomes = Vec::new();
    for (i, f) in spec.fits.iter().enumerate() {
        let name = output_name(f, i, &spec.fits);
        let dir = if flat && spec.fits.len() == 1 { out_dir.to_path_buf() } else { out_dir.join(&name) };
        let opts = f.effective_options();
        let base = match curves_table(&f.law, &input.table, &input.run_dirs) {
            Some(t) => t,
            None => input.table.clone(),
        };
        let (table, mut ex) = filter_rows(&base, &f.filter);
        let (table, mut ex_best) = if f.best_per.is_empty() {
            (table, vec![])
        } else {
            let y = if f.law == "power" { opts.y.as_str() } else { "loss" };
            select::best_per(&table, &f.best_per, opts.columns.header_for(y))
        };
        ex.append(&mut ex_best);
        ex.splice(0..0, input.exclusions.iter().cloned());
        let mut outcome = FitOutcome { name, spec: f.clone(), dir: dir.clone(), result: Err(String::new()), figures: vec![], plot_errors: vec![], residual_summary: None };
        match fit_table(&table, &ex, &f.law, &opts) {
            Ok((points, result)) => {
                write_json_atomic(&dir.join("fit.json"), &result).map_err(|e| Error::Other(e.to_string()))?;
                let kinds = f.plots.clone().unwrap_or_else(|| plot::default_plots(&f.law, &base, &input.run_dirs));
                let ctx = plot::PlotContext { law: &f.law, points: &points, result: &result, table: &table, all_rows: &base, run_dirs: &input.run_dirs, options: &opts };
                outcome.residual_summary = plot::residuals::summary(&ctx);
                for k in &kinds {
                    match plot::draw(k, &ctx, &dir) {
                        Ok(mut figs) => outcome.figures.append(&mut figs),
                        Err(e) => outcome.plot_errors.push(format!("plot `{k}`: {e}")),
                    }
                }
                outcome.result = Ok(result);
            }
            Err(e) => outcome.result = Err(e.to_string()),
        }
        outcomes.push(outcome);
    }
    let title = spec.title.clone().unwrap_or_else(|| "Scaling-law analysis".into());
    plot::report::write_report(&title, &input.table.path, &outcomes, out_dir).map_err(|e| Error::Io { path: out_dir.to_path_buf(), source: e })?;
    Ok(outcomes)
}

/// Keeps rows matching every filter (string equality after trimming, or numeric equality when
/// both sides are numbers); the others are recorded as exclusions. A filter on a missing column
/// excludes everything (and says so).
pub fn filter_rows(table: &Table, filter: &BTreeMap<String, Value>) -> (Table, Vec<String>) {
    if filter.is_empty() {
        return (table.clone(), vec![]);
    }
    let mut ex = Vec::new();
    let mut cols = Vec::new();
    for (k, v) in filter {
        let want = match v {
            Value::String(s) => s.trim().to_string(),
            Value::Bool(b) => b.to_string(),
            other => serde_yaml_ng::to_string(other).unwrap_or_default().trim().to_string(),
        };
        match table.column(k) {
            Some(j) => cols.push((k.clone(), j, want)),
            None => {
                ex.push(format!("filter `where.{k}`: no column `{k}` in {} (columns: {}); all rows excluded", table.path.display(), table.header_list()));
                return (Table { records: vec![], ..table.clone() }, ex);
            }
        }
    }
    let matches = |field: &str, want: &str| {
        let f = field.trim();
        f == want || matches!((f.parse::<f64>(), want.parse::<f64>()), (Ok(a), Ok(b)) if a == b)
    };
    let mut kept = Vec::new();
    let mut n_out = 0;
    for (line, f) in &table.records {
        if cols.iter().all(|(_, j, w)| matches(&f[*j], w)) {
            kept.push((*line, f.clone()));
        } else {
            n_out += 1;
        }
    }
    if n_out > 0 {
        let desc: Vec<String> = cols.iter().map(|(k, _, w)| format!("{k} = {w}")).collect();
        ex.push(format!("{n_out} rows not matching `where: {}`; excluded", desc.join(", ")));
    }
    (Table { records: kept, ..table.clone() }, ex)
}

/// For the `annealing` law on a sweep (a results table without `step`): the trials' loss curves,
/// one row per logged step of each run folder's `metrics.csv` (`run, step, lr, loss` with the
/// train loss), or `None` when not applicable.
pub fn curves_table(law: &str, table: &Table, run_dirs: &[PathBuf]) -> Option<Table> {
    if law != "annealing" || table.column("step").is_some() || run_dirs.is_empty() {
        return None;
    }
    let mut records = Vec::new();
    for d in run_dirs {
        let Ok(t) = Table::read(&d.join("metrics.csv")) else { continue };
        let (Some(js), Some(jl), Some(jt)) = (t.column("step"), t.column("lr"), t.column("train_loss")) else { continue };
        let run = d.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        for (line, f) in &t.records {
            records.push((*line, vec![run.clone(), f[js].clone(), f[jl].clone(), f[jt].clone()]));
        }
    }
    let path = run_dirs[0].parent().unwrap_or(Path::new(".")).join("*/metrics.csv");
    Some(Table { path, header: ["run", "step", "lr", "loss"].iter().map(|s| s.to_string()).collect(), records })
}
