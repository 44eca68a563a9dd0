//! Loss vs compute per architecture (ablations): one colour per value of the `arch` column,
//! with each architecture's lower envelope (best loss at or below each compute). Drawn from every
//! row of the input (`PlotContext::all_rows`), not only the rows one fit selected.

use super::chart::{self, Series, Style, XySpec};
use super::common::{color, log_range, not_applicable};
use super::{Figure, PlotContext, PlotError};
use crate::fit::csv::Table;
use crate::render_figure;
use std::path::Path;

/// Distinct non-empty values of the table's `arch` column, in first-appearance order.
pub fn architectures(table: &Table) -> Vec<String> {
    let Some(j) = table.column("arch") else { return vec![] };
    let mut v: Vec<String> = Vec::new();
    for (_, f) in &table.records {
        let a = f[j].trim();
        if !a.is_empty() && !v.iter().any(|x| x == a) {
            v.push(a.to_string());
        }
    }
    v
}

pub fn plot(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let t = ctx.all_rows;
    let archs = architectures(t);
    let ja = t.column("arch").ok_or_else(|| not_applicable("arch", "the input has no `arch` column"))?;
    let num = |name: &str| t.numeric_column(name).ok().flatten();
    let loss = num("loss").ok_or_else(|| not_applicable("arch", "no `loss` column"))?;
    let c = match (num("C"), num("N"), num("D")) {
        (Some(c), _, _) => c,
        (None, Some(n), Some(d)) => n.iter().zip(&d).map(|(n, d)| 6.0 * n * d).collect(),
        _ => return Err(not_applicable("arch", "needs `C` or `N` and `D`")),
    };
    let mut series = Vec::new();
    let mut all = Vec::new();
    for (k, a) in archs.iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = (0..t.records.len())
            .filter(|&i| t.records[i].1[ja].trim() == a && c[i] > 0.0 && loss[i] > 0.0 && loss[i].is_finite())
            .map(|i| (c[i], loss[i]))
            .collect();
        pts.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut env = Vec::new();
        let mut best = f64::INFINITY;
        for &(x, y) in &pts {
            if y < best {
                best = y;
                env.push((x, y));
            }
        }
        all.extend(pts.iter().copied());
        series.push(Series::new(Some(a.clone()), color(k), Style::Points(4), pts));
        series.push(Series::new(None, color(k), Style::Line(2), env));
    }
    let (xlo, xhi) = log_range(all.iter().map(|p| p.0), 1.3).ok_or_else(|| not_applicable("arch", "no finite points"))?;
    let (ylo, yhi) = log_range(all.iter().map(|p| p.1), 1.03).unwrap_or((1.0, 10.0));
    let mut spec = XySpec::new("Loss vs compute per architecture (lines: lower envelope)", "training compute C (FLOPs)", "loss (nats/token)", (xlo, xhi), (ylo, yhi));
    spec.x_log = true;
    spec.y_log = true;
    spec.series = series;
    Ok(vec![render_figure!(dir, "arch", "arch", "Loss vs compute per architecture", (1000, 680), |root| chart::draw(root, &spec))])
}
