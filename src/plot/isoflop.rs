//! IsoFLOP profiles (Hoffmann et al. 2022, Fig. 3 left): loss vs model size at each compute
//! budget, the fitted parabola in log N and its vertex; budgets dropped by the fit (optimum on
//! the grid edge, non-convex) are drawn hollow without a parabola.

use super::chart::{self, Fmt, Series, Style, XySpec};
use super::common::{color, fmt_num, geomspace, log_range, not_applicable};
use super::{Figure, PlotContext, PlotError};
use crate::fit::laws::isoflop::profiles;
use crate::render_figure;
use std::path::Path;

pub fn plot(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let p = ctx.points;
    if !p.columns.contains_key("N") || !p.columns.contains_key("C") || !p.columns.contains_key("loss") {
        return Err(not_applicable("isoflop", "needs `N`, `C` (or `D`) and `loss`"));
    }
    let (n, loss) = (p.col("N"), p.col("loss"));
    let profs = profiles(p, ctx.options.budget_tol);
    let mut series = Vec::new();
    let mut ys: Vec<f64> = loss.to_vec();
    for (k, pr) in profs.iter().enumerate() {
        let c = color(k);
        let pts: Vec<(f64, f64)> = pr.rows.iter().map(|&i| (n[i], loss[i])).collect();
        let label = format!("C = {} FLOPs{}", fmt_num(pr.c), if pr.dropped.is_some() { " (dropped)" } else { "" });
        if pr.dropped.is_some() {
            series.push(Series::new(Some(label), c, Style::Hollow(5), pts));
            continue;
        }
        series.push(Series::new(Some(label), c, Style::Points(5), pts));
        if let (Some([q0, q1, q2]), Some((lo, hi))) = (pr.parabola, log_range(pr.rows.iter().map(|&i| n[i]), 1.0)) {
            let curve: Vec<(f64, f64)> = geomspace(lo, hi, 80)
                .into_iter()
                .map(|x| {
                    let u = x.ln() - pr.u0;
                    (x, q0 + q1 * u + q2 * u * u)
                })
                .collect();
            ys.extend(curve.iter().map(|p| p.1));
            series.push(Series::new(None, c, Style::Line(2), curve));
        }
        if let (Some(no), Some(lo)) = (pr.n_opt, pr.loss_opt) {
            series.push(Series::new(None, c, Style::Cross(9), vec![(no, lo)]));
        }
    }
    let (xlo, xhi) = log_range(n.iter().copied(), 1.25).ok_or_else(|| not_applicable("isoflop", "no positive N"))?;
    let (ylo, yhi) = log_range(ys, 1.03).unwrap_or((1.0, 10.0));
    let mut spec = XySpec::new("IsoFLOP profiles (x = parabola vertex)", "non-embedding parameters N", "loss (nats/token)", (xlo, xhi), (ylo, yhi));
    spec.x_log = true;
    spec.y_log = true;
    spec.x_fmt = Fmt::Count;
    spec.series = series;
    Ok(vec![render_figure!(dir, "isoflop", "isoflop", "IsoFLOP profiles", (1000, 680), |root| chart::draw(root, &spec))])
}
