//! A table of measured points read from a plain CSV with named columns.
//!
//! Canonical columns ([`CANONICAL`]): `N` (parameters), `D` (tokens), `C` (training FLOPs),
//! `loss`, `lr`, `batch_tokens`, `S` (MoE sparsity or steps, law-specific), `run` (a string
//! grouping rows of one training run, for clustered bootstrap), `step`. Other columns are
//! ignored unless a law asks for them by name (e.g. the power law's `x`/`y`). A [`ColumnMap`]
//! maps canonical names to differently named headers (e.g. `N` ← `Model Size`) and can scale a
//! column (e.g. `batch_tokens` ← `bs` × 2048).
//!
//! Derivations (recorded in [`Points::notes`]): if `D` is needed and absent but `C` and `N`
//! are present, `D = C / (6 N)` (Kaplan et al. 2020, arXiv:2001.08361; Hoffmann et al. 2022,
//! arXiv:2203.15556); if `C` is needed and absent, `C = 6 N D`.
//!
//! Rows whose needed values are NaN, ±inf or empty are excluded and recorded in
//! [`Points::exclusions`] with their line number; malformed numbers are errors naming the file,
//! line and column.

use super::csv::Table;
use super::error::FitError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Canonical column names understood by the laws.
pub const CANONICAL: &[&str] = &["N", "D", "C", "loss", "lr", "batch_tokens", "S", "run", "step"];

/// Maps canonical column names to CSV headers and optional multiplicative scales.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ColumnMap {
    /// canonical (or law-requested) name → header in the file.
    pub alias: BTreeMap<String, String>,
    /// canonical name → factor applied after reading (e.g. sequences → tokens).
    pub scale: BTreeMap<String, f64>,
}

impl ColumnMap {
    /// Adds `canonical ← header`.
    pub fn with(mut self, canonical: &str, header: &str) -> Self {
        self.alias.insert(canonical.to_string(), header.to_string());
        self
    }
    /// Multiplies column `canonical` by `factor` after reading.
    pub fn scaled(mut self, canonical: &str, factor: f64) -> Self {
        self.scale.insert(canonical.to_string(), factor);
        self
    }
    /// Epoch's digitised Chinchilla table (`Model Size`, `Training FLOP`, `loss`;
    /// Besiroglu et al. 2024, arXiv:2404.10102). `D` is then derived as C/(6N).
    pub fn chinchilla_svg() -> Self {
        ColumnMap::default().with("N", "Model Size").with("C", "Training FLOP")
    }
    /// Step Law's released run tables (Li et al. 2025, arXiv:2503.04715): the EMA
    /// `smooth loss` is the fitted loss and `bs` counts sequences of 2048 tokens.
    pub fn steplaw() -> Self {
        ColumnMap::default().with("loss", "smooth loss").with("batch_tokens", "bs").scaled("batch_tokens", 2048.0)
    }
    pub fn header_for<'a>(&'a self, name: &'a str) -> &'a str {
        self.alias.get(name).map(String::as_str).unwrap_or(name)
    }
}

/// Points after reading and exclusions. All numeric vectors have length [`Points::len`].
#[derive(Clone, Debug, Default)]
pub struct Points {
    /// Where the points came from (for messages).
    pub source: PathBuf,
    /// column name → values. Needed columns are finite; optional ones may hold NaN.
    pub columns: BTreeMap<String, Vec<f64>>,
    /// Run id of each row (the `run` column, or `line:<n>` when absent/empty: its own run).
    pub runs: Vec<String>,
    /// Source line of each row (0 for synthetic points).
    pub lines: Vec<usize>,
    /// Human-readable record of every excluded row or rule.
    pub exclusions: Vec<String>,
    /// Derivations and other remarks.
    pub notes: Vec<String>,
}

impl Points {
    /// Reads `path`, requiring `needed` columns (after mapping/derivation) and reading `optional`
    /// ones when present. `law` is named in errors.
    pub fn read(
        path: &Path,
        needed: &[&str],
        optional: &[&str],
        map: &ColumnMap,
        law: &str,
    ) -> Result<Points, FitError> {
        let table = Table::read(path)?;
        Points::from_table(&table, needed, optional, map, law)
    }

    /// As [`Points::read`] on an already parsed table.
    pub fn from_table(
        table: &Table,
        needed: &[&str],
        optional: &[&str],
        map: &ColumnMap,
        law: &str,
    ) -> Result<Points, FitError> {
        let n_rows = table.records.len();
        let mut columns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut notes = Vec::new();
        let read = |name: &str| -> Result<Option<Vec<f64>>, FitError> {
            let mut v = table.numeric_column(map.header_for(name))?;
            if let (Some(v), Some(f)) = (v.as_mut(), map.scale.get(name)) {
                v.iter_mut().for_each(|x| *x *= f);
            }
            Ok(v)
        };
        let missing = |name: &str| FitError::MissingColumn {
            path: table.path.clone(),
            column: if map.header_for(name) == name {
                name.to_string()
            } else {
                format!("{name}` (mapped to `{}", map.header_for(name))
            },
            law: law.to_string(),
            present: table.header_list(),
        };
        for &name in needed.iter().filter(|n| **n != "run") {
            if let Some(v) = read(name)? {
                columns.insert(name.to_string(), v);
            }
        }
        // Derive D or C from the other two when needed and absent.
        for &name in needed {
            if columns.contains_key(name) || name == "run" {
                continue;
            }
            let derived = match name {
                "D" => match (read("C")?, columns.get("N").cloned().or(read("N")?)) {
                    (Some(c), Some(n)) => {
                        notes.push("D derived as C/(6N)".to_string());
                        Some(c.iter().zip(&n).map(|(c, n)| c / (6.0 * n)).collect())
                    }
                    _ => None,
                },
                "C" => match (columns.get("N").cloned().or(read("N")?), columns.get("D").cloned().or(read("D")?)) {
                    (Some(n), Some(d)) => {
                        notes.push("C derived as 6ND".to_string());
                        Some(n.iter().zip(&d).map(|(n, d)| 6.0 * n * d).collect())
                    }
                    _ => None,
                },
                _ => None,
            };
            match derived {
                Some(v) => {
                    columns.insert(name.to_string(), v);
                }
                None => return Err(missing(name)),
            }
        }
        // Exclude rows whose needed values are not finite.
        let mut keep = vec![true; n_rows];
        let mut exclusions = Vec::new();
        for (r, keep_r) in keep.iter_mut().enumerate() {
            let bad: Vec<String> = columns
                .iter()
                .filter(|(_, v)| !v[r].is_finite())
                .map(|(k, v)| format!("`{k}` = {}", v[r]))
                .collect();
            if !bad.is_empty() {
                *keep_r = false;
                exclusions.push(format!(
                    "{}:{}: non-finite or missing value ({}); row excluded",
                    table.path.display(),
                    table.records[r].0,
                    bad.join(", ")
                ));
            }
        }
        for &name in optional {
            if !columns.contains_key(name) && name != "run" {
                if let Some(v) = read(name)? {
                    columns.insert(name.to_string(), v);
                }
            }
        }
        let run_col = table.column(map.header_for("run"));
        let runs_all: Vec<String> = table
            .records
            .iter()
            .map(|(line, f)| match run_col.map(|j| f[j].trim()) {
                Some(s) if !s.is_empty() => s.to_string(),
                _ => format!("line:{line}"),
            })
            .collect();
        let idx: Vec<usize> = (0..n_rows).filter(|&r| keep[r]).collect();
        let full = Points {
            source: table.path.clone(),
            columns,
            runs: runs_all,
            lines: table.records.iter().map(|(l, _)| *l).collect(),
            exclusions,
            notes,
        };
        Ok(full.select(&idx))
    }

    /// Builds points from in-memory columns (e.g. synthetic data). `runs` defaults to one run per
    /// row. Rows with any non-finite value are excluded and recorded.
    pub fn from_columns(columns: BTreeMap<String, Vec<f64>>, runs: Option<Vec<String>>) -> Result<Points, FitError> {
        let n = columns.values().next().map(Vec::len).unwrap_or(0);
        if columns.values().any(|v| v.len() != n) || runs.as_ref().is_some_and(|r| r.len() != n) {
            return Err(FitError::Option("columns of unequal length".into()));
        }
        let runs = runs.unwrap_or_else(|| (0..n).map(|i| format!("row:{i}")).collect());
        let mut exclusions = Vec::new();
        let idx: Vec<usize> = (0..n)
            .filter(|&r| {
                let ok = columns.values().all(|v| v[r].is_finite());
                if !ok {
                    exclusions.push(format!("row {r}: non-finite value; row excluded"));
                }
                ok
            })
            .collect();
        let full = Points {
            source: PathBuf::from("<memory>"),
            columns,
            runs,
            lines: vec![0; n],
            exclusions,
            notes: vec![],
        };
        Ok(full.select(&idx))
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.runs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Values of column `name` (empty slice if absent — laws check presence on reading).
    pub fn col(&self, name: &str) -> &[f64] {
        self.columns.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The rows `idx` (in that order, repeats allowed), keeping exclusions and notes.
    pub fn select(&self, idx: &[usize]) -> Points {
        Points {
            source: self.source.clone(),
            columns: self.columns.iter().map(|(k, v)| (k.clone(), idx.iter().map(|&i| v[i]).collect())).collect(),
            runs: idx.iter().map(|&i| self.runs[i].clone()).collect(),
            lines: idx.iter().map(|&i| self.lines[i]).collect(),
            exclusions: self.exclusions.clone(),
            notes: self.notes.clone(),
        }
    }

    /// Row indices grouped by run, groups in first-appearance order.
    pub fn run_groups(&self) -> Vec<Vec<usize>> {
        let mut order: Vec<&str> = Vec::new();
        let mut map: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, r) in self.runs.iter().enumerate() {
            map.entry(r.as_str()).or_insert_with(|| {
                order.push(r.as_str());
                Vec::new()
            });
            map.get_mut(r.as_str()).unwrap().push(i);
        }
        order.into_iter().map(|r| map.remove(r).unwrap_or_default()).collect()
    }

    fn describe(&self, i: usize) -> String {
        if self.lines[i] > 0 {
            format!("{}:{}", self.source.display(), self.lines[i])
        } else {
            format!("row {i}")
        }
    }

    /// Drops rows where `pred(row)` is true, recording `reason` for each.
    pub fn exclude_where(&mut self, reason: &str, pred: impl Fn(&Points, usize) -> bool) {
        let mut keep = Vec::new();
        let mut ex = Vec::new();
        for i in 0..self.len() {
            if pred(self, i) {
                ex.push(format!("{}: {reason}; row excluded", self.describe(i)));
            } else {
                keep.push(i);
            }
        }
        if !ex.is_empty() {
            let mut s = self.select(&keep);
            s.exclusions.extend(ex);
            *self = s;
        }
    }

    /// Drops rows with a non-positive value in any of `cols` (log-space laws need logs).
    pub fn exclude_non_positive(&mut self, cols: &[&str]) {
        for &c in cols {
            if self.columns.contains_key(c) {
                self.exclude_where(&format!("`{c}` <= 0 (log-space law needs positive values)"), |p, i| p.col(c)[i] <= 0.0);
            }
        }
    }

    /// Drops the `k` rows with the highest values of `col` (Besiroglu et al. 2024 drop the 5
    /// highest losses of the Chinchilla data: `keep loss < 5th-largest loss`). Ties at the
    /// threshold are all dropped, as in Epoch's `<` filter.
    pub fn drop_highest(&mut self, col: &str, k: usize) {
        if k == 0 || self.is_empty() {
            return;
        }
        let mut v: Vec<f64> = self.col(col).to_vec();
        v.sort_by(|a, b| b.total_cmp(a));
        let thr = v[(k - 1).min(v.len() - 1)];
        self.exclude_where(&format!("`{col}` among the {k} highest (>= {thr})"), |p, i| p.col(col)[i] >= thr);
    }
}
