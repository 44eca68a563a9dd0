//! Loss curves. For the annealing law (Tissue et al. 2024): each run's logged losses (dots) and
//! the fitted law evaluated on that run's own schedule (lines); held-out runs are predicted
//! (dashed). Otherwise: per-trial training curves from run folders' `metrics.csv` (train loss
//! lines, validation loss dots) against tokens.

use super::chart::{self, Fmt, Series, Style, XySpec};
use super::common::{color, log_range, not_applicable};
use super::{Figure, PlotContext, PlotError};
use crate::fit::csv::Table;
use crate::fit::laws::annealing::{predict, Annealing};
use crate::render_figure;
use std::path::Path;

pub fn plot(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    if ctx.law == "annealing" {
        return annealing(ctx, dir);
    }
    if ctx.run_dirs.is_empty() {
        return Err(not_applicable("curves", "no run folders with a metrics.csv"));
    }
    let mut series = Vec::new();
    let (mut xs, mut ys) = (vec![], vec![]);
    let many = ctx.run_dirs.len() > 10;
    for (k, d) in ctx.run_dirs.iter().enumerate() {
        let Ok(t) = Table::read(&d.join("metrics.csv")) else { continue };
        let col = |n: &str| t.numeric_column(n).ok().flatten().unwrap_or_default();
        let (tok, tl, vl) = (col("tokens"), col("train_loss"), col("val_loss"));
        let name = d.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let train: Vec<(f64, f64)> = tok.iter().zip(&tl).filter(|(x, y)| **x > 0.0 && y.is_finite()).map(|(x, y)| (*x, *y)).collect();
        let val: Vec<(f64, f64)> = tok.iter().zip(&vl).filter(|(x, y)| **x > 0.0 && y.is_finite()).map(|(x, y)| (*x, *y)).collect();
        xs.extend(train.iter().map(|p| p.0));
        ys.extend(train.iter().chain(&val).map(|p| p.1));
        series.push(Series::new((!many).then(|| name.clone()), color(k), Style::Line(2), train));
        series.push(Series::new(None, color(k), Style::Points(3), val));
    }
    let (xlo, xhi) = log_range(xs, 1.1).ok_or_else(|| not_applicable("curves", "no logged steps with tokens > 0"))?;
    let (ylo, yhi) = log_range(ys, 1.05).unwrap_or((1.0, 10.0));
    let mut spec = XySpec::new("Training curves (lines: train loss, dots: validation loss)", "tokens seen", "loss (nats/token)", (xlo, xhi), (ylo, yhi));
    spec.x_log = true;
    spec.y_log = true;
    spec.x_fmt = Fmt::Count;
    spec.series = series;
    Ok(vec![render_figure!(dir, "curves", "curves", "Per-trial loss curves", (1000, 680), |root| chart::draw(root, &spec))])
}

fn annealing(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let (p, r) = (ctx.points, ctx.result);
    let law = Annealing { l0: r.params["L0"], a: r.params["A"], alpha: r.params["alpha"], c: r.params["C"] };
    let (step, lr, loss) = (p.col("step"), p.col("lr"), p.col("loss"));
    let mut series = Vec::new();
    let (mut xs, mut ys) = (vec![], vec![]);
    for (k, g) in p.run_groups().iter().enumerate() {
        let run = &p.runs[g[0]];
        let st: Vec<f64> = g.iter().map(|&i| step[i]).collect();
        let l: Vec<f64> = g.iter().map(|&i| lr[i]).collect();
        let obs: Vec<(f64, f64)> = g.iter().filter(|&&i| step[i] > 0.0).map(|&i| (step[i], loss[i])).collect();
        let mut grid = st.clone();
        grid.sort_by(f64::total_cmp);
        let pred: Vec<(f64, f64)> = grid.iter().copied().zip(predict(&law, &st, &l, &grid, ctx.options.lambda)).filter(|(s, y)| *s > 0.0 && y.is_finite()).collect();
        xs.extend(obs.iter().map(|p| p.0));
        ys.extend(obs.iter().chain(&pred).map(|p| p.1));
        let held = ctx.options.holdout.contains(run);
        series.push(Series::new(Some(format!("{run}{}", if held { " (held out)" } else { "" })), color(k), Style::Points(3), obs));
        series.push(Series::new(
            Some(format!("{run}: {}", if held { "predicted" } else { "fitted" })),
            color(k),
            if held { Style::Dashed(3) } else { Style::Line(2) },
            pred,
        ));
    }
    let (xlo, xhi) = log_range(xs, 1.05).ok_or_else(|| not_applicable("curves", "no steps > 0"))?;
    let (ylo, yhi) = log_range(ys, 1.03).unwrap_or((1.0, 10.0));
    let mut spec = XySpec::new("Annealing law L0 + A·S1^-alpha - C·S2 on each schedule", "step", "loss (nats/token)", (xlo, xhi), (ylo, yhi));
    spec.x_log = true;
    spec.y_log = true;
    spec.series = series;
    Ok(vec![render_figure!(dir, "curves", "curves", "Loss curves with the annealing law", (1000, 680), |root| chart::draw(root, &spec))])
}
