//! Plots of fitted scaling laws (plotters), each written as SVG and PNG, and the report.
//!
//! One file per plot kind ([`KNOWN_PLOTS`]): [`frontier`] (loss vs compute with the fitted
//! frontier; for the power law, y vs x with the fit), [`isoflop`] (IsoFLOP profiles with the
//! parabolas and optima), [`heatmap`] (learning rate × batch per (N, D) cell or compute budget,
//! optimum marked), [`hparams`] (η_opt vs N and B_opt vs D, or vs C, with fitted lines and
//! bootstrap bands), [`sparsity`] (loss vs MoE sparsity at fixed compute), [`arch`] (loss vs
//! compute per architecture), [`curves`] (per-trial loss curves from run folders, and the
//! annealing law's fitted/predicted curves), [`residuals`] (log residuals of the parametric
//! laws). [`report`] writes `report.md` and a self-contained `report.html`.
//!
//! PNG text is rendered with the bundled DejaVu Sans (`src/plot/fonts/`, Bitstream Vera
//! licence alongside) registered with plotters' `ab_glyph` backend at first use, so no system
//! font or fontconfig is needed. PNGs are drawn into an RGB buffer and encoded with `png`.

pub mod arch;
pub mod chart;
pub mod common;
pub mod curves;
pub mod frontier;
pub mod heatmap;
pub mod hparams;
pub mod isoflop;
pub mod report;
pub mod residuals;
pub mod sparsity;

use crate::fit::csv::Table;
use crate::fit::{FitOptions, FitResult, Points};
use std::path::{Path, PathBuf};

/// Plot kinds accepted in an analysis spec.
pub const KNOWN_PLOTS: &[&str] = &["frontier", "isoflop", "heatmap", "hparams", "sparsity", "arch", "curves", "residuals"];

/// A written figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// Plot kind.
    pub kind: String,
    pub title: String,
    pub svg: PathBuf,
    pub png: PathBuf,
    /// PNG size in pixels.
    pub size: (u32, u32),
}

/// Everything a plot may use.
pub struct PlotContext<'a> {
    pub law: &'a str,
    /// Points as read for the fit (before the law's own exclusions).
    pub points: &'a Points,
    pub result: &'a FitResult,
    /// The rows the fit used (after `where` and `best_per`; string columns such as `arch`).
    pub table: &'a Table,
    /// Every row of the input, before the fit's selection: the `arch` plot compares all
    /// architectures whatever rows one fit keeps.
    pub all_rows: &'a Table,
    /// Run folders with a `metrics.csv`.
    pub run_dirs: &'a [PathBuf],
    pub options: &'a FitOptions,
}

/// Error of a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{0}")]
    Draw(String),
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("plot `{0}` does not apply: {1}")]
    NotApplicable(String, String),
    #[error("unknown plot `{0}`; known plots: {1}")]
    Unknown(String, String),
}

/// The standard plots of a law (plus `arch` when the table has several architectures and
/// `curves` when run folders are known).
pub fn default_plots(law: &str, table: &Table, run_dirs: &[PathBuf]) -> Vec<String> {
    let mut v: Vec<&str> = match law {
        "chinchilla" => vec!["frontier", "residuals"],
        "isoflop" => vec!["isoflop", "frontier"],
        "steplaw" | "deepseek" => vec!["heatmap", "hparams"],
        "moe_sparsity" => vec!["sparsity", "residuals"],
        "annealing" => vec!["curves"],
        "power" => vec!["frontier", "residuals"],
        _ => vec![],
    };
    if arch::architectures(table).len() >= 2 && law != "annealing" {
        v.push("arch");
    }
    if !run_dirs.is_empty() && law != "annealing" {
        v.push("curves");
    }
    v.into_iter().map(String::from).collect()
}

/// Draws plot `kind` for the context into `dir` (SVG and PNG); some kinds write several figures.
pub fn draw(kind: &str, ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Io { path: dir.to_path_buf(), source })?;
    match kind {
        "frontier" => frontier::plot(ctx, dir),
        "isoflop" => isoflop::plot(ctx, dir),
        "heatmap" => heatmap::plot(ctx, dir),
        "hparams" => hparams::plot(ctx, dir),
        "sparsity" => sparsity::plot(ctx, dir),
        "arch" => arch::plot(ctx, dir),
        "curves" => curves::plot(ctx, dir),
        "residuals" => residuals::plot(ctx, dir),
        other => Err(PlotError::Unknown(other.into(), KNOWN_PLOTS.join(", "))),
    }
}
