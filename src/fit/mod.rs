//! Scaling-law fitting engine.
//!
//! * [`points`]: CSV points with named columns, exclusions recorded ([`csv`] underneath).
//! * [`lbfgs`]: L-BFGS with a strong-Wolfe line search and an honest `converged` flag.
//! * [`huber`]: Huber loss and the log-space LSE objective (Hoffmann et al. 2022,
//!   arXiv:2203.15556; Besiroglu et al. 2024, arXiv:2404.10102).
//! * [`laws::chinchilla`]: L = E + A/N^α + B/D^β, Approach 3 with the 4,500-start grid.
//! * [`laws::power`]: y = E + A·x^−α for any metric against any column.
//! * [`laws::steplaw`]: Step Law hyper-parameter laws (Li et al. 2025, arXiv:2503.04715).
//! * [`laws::isoflop`]: Chinchilla Approach 2, IsoFLOP parabolas then power laws in C.
//! * [`laws::deepseek`]: η_opt(C), B_opt(C) (DeepSeek LLM 2024, arXiv:2401.02954).
//! * [`laws::moe_sparsity`]: L(N, D, S) of Abnar et al. 2025 (arXiv:2501.12370).
//! * [`laws::annealing`]: L(s) = L0 + A·S1^−α − C·S2 (Tissue et al. 2024, arXiv:2408.11029).
//! * [`bootstrap`]: by-run bootstrap with percentile CIs, seeded ([`crate::data::rng`]).
//! * [`input`]: CSV or sweep-file input; [`analysis`]: a sweep's `analysis:` section.
//!
//! Entry points: [`run_fit`], which writes `fit.json` (a serialised [`FitResult`]) atomically,
//! and [`fit_table`] for an already loaded table.

// NaN-safe comparisons (`!(x > 0.0)`) are deliberate throughout.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod analysis;
pub mod bootstrap;
pub mod csv;
pub mod error;
pub mod groups;
pub mod huber;
pub mod input;
pub mod laws;
pub mod lbfgs;
pub mod ols;
pub mod points;
pub mod select;

pub use bootstrap::BootstrapOptions;
pub use error::FitError;
pub use points::{ColumnMap, Points};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Names accepted by [`run_fit`].
pub const KNOWN_LAWS: &[&str] = &["chinchilla", "isoflop", "steplaw", "deepseek", "moe_sparsity", "annealing", "power"];

/// Result of a fit, serialised to `fit.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FitResult {
    /// Law name (one of [`KNOWN_LAWS`]).
    pub law: String,
    /// Point estimates under the papers' symbols (e.g. `E`, `A`, `B`, `alpha`, `beta`).
    pub params: BTreeMap<String, f64>,
    /// Bootstrap percentile intervals (empty without a bootstrap).
    pub ci: BTreeMap<String, [f64; 2]>,
    /// The paper's objective at the estimate (Σ Huber for the Huber laws, residual sum of
    /// squares for the Step Law regressions).
    pub objective: f64,
    /// Gradient norm in the optimiser's parameterisation (see each law; 0 for closed-form OLS).
    pub grad_norm: f64,
    /// True only if the optimiser met its gradient tolerance with a last step that made progress
    /// (see [`lbfgs`]); true for closed-form least squares.
    pub converged: bool,
    /// Every excluded row and exclusion rule, in order.
    pub exclusions: Vec<String>,
    /// Points used in the fit (after exclusions).
    pub n_points: usize,
    /// Law-specific details (allocations, per-cell optima, optimiser diagnostics, bootstrap).
    pub extra: serde_json::Value,
}

/// Which starting points the Huber laws use. In YAML: `default`, `none`, or a list of starts
/// (each a list of numbers in the law's paper parameterisation).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", try_from = "GridRepr")]
pub enum StartGrid {
    /// The law's default grid (Chinchilla: the 4,500-start Hoffmann/Epoch grid).
    #[default]
    Default,
    /// No grid: only [`FitOptions::extra_starts`].
    None,
    /// These starts, in the law's paper parameterisation (see each law).
    Custom(Vec<Vec<f64>>),
}

/// YAML form of [`StartGrid`].
#[derive(Deserialize)]
#[serde(untagged)]
enum GridRepr {
    Name(String),
    Starts(Vec<Vec<f64>>),
}

impl TryFrom<GridRepr> for StartGrid {
    type Error = String;
    fn try_from(g: GridRepr) -> Result<Self, String> {
        match g {
            GridRepr::Name(n) if n == "default" => Ok(StartGrid::Default),
            GridRepr::Name(n) if n == "none" => Ok(StartGrid::None),
            GridRepr::Name(n) => Err(format!("unknown grid `{n}`; expected `default`, `none` or a list of starts")),
            GridRepr::Starts(v) => Ok(StartGrid::Custom(v)),
        }
    }
}

/// Options of [`run_fit`]. Fields a law does not use are ignored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FitOptions {
    /// Column renames/scales (e.g. [`ColumnMap::chinchilla_svg`], [`ColumnMap::steplaw`]).
    pub columns: ColumnMap,
    /// Huber δ on log residuals (Hoffmann et al. 2022: 1e-3).
    pub delta: f64,
    /// Drop the k rows with the highest target value (Besiroglu et al. 2024: k = 5 losses).
    pub drop_highest: usize,
    /// Start grid of the Huber laws.
    pub grid: StartGrid,
    /// Extra starts appended to the grid (paper parameterisation of the law).
    pub extra_starts: Vec<Vec<f64>>,
    /// L-BFGS iteration limit per start.
    pub max_iter: usize,
    /// L-BFGS gradient tolerance on ‖∇(Σ Huber/(δ n))‖_∞ in centred log parameters.
    pub gtol: f64,
    /// L-BFGS relative objective-change stop (never counts as convergence); 0 disables.
    pub ftol: f64,
    pub bootstrap: BootstrapOptions,
    /// Compute budgets (FLOPs) at which the Chinchilla allocation is reported.
    pub budgets: Vec<f64>,
    /// Power law: the regressor column and the target column.
    pub x: String,
    pub y: String,
    /// Step Law / DeepSeek near-optimal band: keep runs with |loss/min − 1| < band (Li et al.
    /// and DeepSeek: 0.0025).
    pub band: f64,
    /// Compute budgets are clusters of C within this relative tolerance (IsoFLOP, DeepSeek).
    pub budget_tol: f64,
    /// Annealing law: momentum λ of the annealing area S2 (Tissue et al.: 0.999).
    pub lambda: f64,
    /// Annealing law: runs (curves) left out of the fit and predicted instead.
    pub holdout: Vec<String>,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            columns: ColumnMap::default(),
            delta: 1e-3,
            drop_highest: 0,
            grid: StartGrid::Default,
            extra_starts: vec![],
            max_iter: 2000,
            gtol: 1e-8,
            ftol: 0.0,
            bootstrap: BootstrapOptions::default(),
            budgets: vec![5.76e23],
            x: "C".into(),
            y: "loss".into(),
            band: 0.0025,
            budget_tol: 0.05,
            lambda: 0.999,
            holdout: vec![],
        }
    }
}

impl FitOptions {
    /// The L-BFGS options implied by these fit options.
    pub fn lbfgs(&self) -> lbfgs::LbfgsOptions {
        lbfgs::LbfgsOptions { max_iter: self.max_iter, gtol: self.gtol, ftol: self.ftol, ..Default::default() }
    }
    pub(crate) fn check(&self) -> Result<(), FitError> {
        if !(self.delta > 0.0 && self.delta.is_finite()) {
            return Err(FitError::Option(format!("delta must be positive and finite, got {}", self.delta)));
        }
        if !(self.gtol >= 0.0) || !(self.ftol >= 0.0) {
            return Err(FitError::Option("gtol and ftol must be >= 0".into()));
        }
        if !(self.bootstrap.level > 0.0 && self.bootstrap.level < 1.0) {
            return Err(FitError::Option(format!("bootstrap level must be in (0,1), got {}", self.bootstrap.level)));
        }
        if !(self.band > 0.0 && self.band.is_finite()) {
            return Err(FitError::Option(format!("band must be positive, got {}", self.band)));
        }
        if !(self.budget_tol >= 0.0 && self.budget_tol.is_finite()) {
            return Err(FitError::Option(format!("budget_tol must be >= 0, got {}", self.budget_tol)));
        }
        if self.budgets.iter().any(|c| !(*c > 0.0 && c.is_finite())) {
            return Err(FitError::Option("budgets must be positive and finite".into()));
        }
        Ok(())
    }
}

/// Reads `input` (a CSV of points or a sweep file, see [`input`]), fits `law`, writes
/// `out_dir/fit.json` (temp file + rename) and returns the result. `out_dir` is created if
/// missing.
pub fn run_fit(input: &Path, law: &str, out_dir: &Path, opts: &FitOptions) -> Result<FitResult, FitError> {
    opts.check()?;
    let inp = input::load(input)?;
    let (_, result) = fit_table(&inp.table, &inp.exclusions, law, opts)?;
    write_json_atomic(&out_dir.join("fit.json"), &result)?;
    Ok(result)
}

/// The columns `law` reads from a table: (needed, optional).
pub fn law_columns<'a>(law: &str, opts: &'a FitOptions) -> Result<(Vec<&'a str>, Vec<&'a str>), FitError> {
    let v = |s: &[&'a str]| s.to_vec();
    Ok(match law {
        "chinchilla" => (v(laws::chinchilla::NEEDED), v(&["run", "C"])),
        "isoflop" => (v(laws::isoflop::NEEDED), v(&["run", "D"])),
        "steplaw" => (v(&["N", "D", "lr", "batch_tokens"]), v(&["loss", "run", "C"])),
        "deepseek" => (v(laws::deepseek::NEEDED), v(&["run", "N", "D"])),
        "moe_sparsity" => (v(laws::moe_sparsity::NEEDED), v(&["run", "C"])),
        "annealing" => (v(laws::annealing::NEEDED), v(&["run"])),
        "power" => (vec![opts.x.as_str(), opts.y.as_str()], v(&["run"])),
        other => return Err(FitError::UnknownLaw { name: other.to_string(), known: KNOWN_LAWS.join(", ") }),
    })
}

/// Fits `law` to an already loaded table; `pre_exclusions` (e.g. non-completed sweep trials) are
/// recorded first. Returns the points as read (before the law's own exclusions, for plots) and
/// the result.
pub fn fit_table(table: &csv::Table, pre_exclusions: &[String], law: &str, opts: &FitOptions) -> Result<(Points, FitResult), FitError> {
    opts.check()?;
    let (needed, optional) = law_columns(law, opts)?;
    let mut pts = Points::from_table(table, &needed, &optional, &opts.columns, law)?;
    if law == "steplaw" && !pts.columns.contains_key("loss") {
        let header = opts.columns.alias.get("loss").cloned().unwrap_or_else(|| "loss".into());
        return Err(FitError::MissingColumn { path: table.path.clone(), column: header, law: law.into(), present: table.header_list() });
    }
    let mut ex = pre_exclusions.to_vec();
    ex.append(&mut pts.exclusions);
    pts.exclusions = ex;
    let p = pts.clone();
    let result = match law {
        "chinchilla" => laws::chinchilla::fit(p, opts)?,
        "isoflop" => laws::isoflop::fit(p, opts)?,
        "steplaw" => laws::steplaw::fit(p, opts)?,
        "deepseek" => laws::deepseek::fit(p, opts)?,
        "moe_sparsity" => laws::moe_sparsity::fit(p, opts)?,
        "annealing" => laws::annealing::fit(p, opts)?,
        "power" => laws::power::fit(p, opts)?,
        other => return Err(FitError::UnknownLaw { name: other.to_string(), known: KNOWN_LAWS.join(", ") }),
    };
    Ok((pts, result))
}

/// Writes `value` as pretty JSON to `path` atomically ([`crate::fsutil::write_atomic`]), so
/// readers never see a partial file.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), FitError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let werr = |source| FitError::Write { path: path.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(werr)?;
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    crate::fsutil::write_atomic(path, text.as_bytes()).map_err(werr)
}

/// NaN/inf-safe JSON number (JSON has no NaN: non-finite values become `null`).
pub(crate) fn jnum(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
}
