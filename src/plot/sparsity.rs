//! Loss vs MoE sparsity S = 1 − K/E at fixed compute (Abnar et al. 2025, Fig. 1/3): one colour
//! per compute budget, the law's predictions at the same (N, D, S) joined by a line.

use super::chart::{self, Series, Style, XySpec};
use super::common::{color, fmt_num, lin_range, log_range, not_applicable};
use super::frontier::compute_of;
use super::{Figure, PlotContext, PlotError};
use crate::fit::groups::by_budget;
use crate::fit::laws::moe_sparsity::MoeLaw;
use crate::render_figure;
use std::path::Path;

pub fn plot(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let p = ctx.points;
    if !p.columns.contains_key("S") || !p.columns.contains_key("loss") {
        return Err(not_applicable("sparsity", "needs columns `S` and `loss`"));
    }
    let (s, loss) = (p.col("S"), p.col("loss"));
    let c = compute_of(ctx);
    let r = ctx.result;
    let law = (ctx.law == "moe_sparsity").then(|| {
        let v: Vec<f64> = ["a", "b", "c", "d", "e"].iter().map(|k| r.params[*k].ln()).chain(["alpha", "beta", "lambda", "delta", "gamma"].iter().map(|k| r.params[*k])).collect();
        MoeLaw::from_log(&v)
    });
    let mut series = Vec::new();
    let mut ys: Vec<f64> = loss.to_vec();
    let budgets = by_budget(&c, ctx.options.budget_tol);
    let many = budgets.len() > 10;
    for (k, b) in budgets.iter().enumerate() {
        let col = color(k);
        let label = (!many).then(|| format!("C = {} FLOPs", fmt_num(b.c)));
        series.push(Series::new(label, col, Style::Points(5), b.rows.iter().map(|&i| (s[i], loss[i])).collect()));
        if let Some(l) = &law {
            let mut pred: Vec<(f64, f64)> = b.rows.iter().map(|&i| (s[i], l.loss(p.col("N")[i], p.col("D")[i], s[i]))).collect();
            pred.sort_by(|a, b| a.0.total_cmp(&b.0));
            ys.extend(pred.iter().map(|q| q.1));
            series.push(Series::new(None, col, Style::Line(2), pred));
        }
    }
    let (xlo, xhi) = lin_range(s.iter().copied(), 0.05).ok_or_else(|| not_applicable("sparsity", "no finite S"))?;
    let (ylo, yhi) = log_range(ys, 1.03).unwrap_or((1.0, 10.0));
    let title = if law.is_some() { "Loss vs sparsity at fixed compute (lines: fitted law)" } else { "Loss vs sparsity at fixed compute" };
    let mut spec = XySpec::new(title, "MoE sparsity S = 1 - K/E", "loss (nats/token)", (xlo.max(-0.05), xhi.min(1.0)), (ylo, yhi));
    spec.y_log = true;
    spec.series = series;
    Ok(vec![render_figure!(dir, "sparsity", "sparsity", "Loss vs sparsity at fixed compute", (1000, 680), |root| chart::draw(root, &spec))])
}
