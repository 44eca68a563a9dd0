//! Loss vs training compute with the fitted compute-optimal frontier (Chinchilla Approach 3:
//! L(N_opt(C), D_opt(C)); Approach 2: the IsoFLOP optima), points coloured by model size; for
//! the power law, y vs x with the fitted curve y = E + A·x^(−α).

use super::chart::{self, Fmt, Series, Style, XySpec};
use super::common::{color, fmt_count, fmt_num, geomspace, log_range, not_applicable};
use super::{Figure, PlotContext, PlotError};
use crate::fit::laws::chinchilla::Chinchilla;
use crate::fit::laws::power::PowerLaw;
use crate::render_figure;
use plotters::prelude::RGBColor;
use std::collections::BTreeMap;
use std::path::Path;

/// Compute of each point: the `C` column, else 6ND.
pub fn compute_of(ctx: &PlotContext) -> Vec<f64> {
    let p = ctx.points;
    match p.columns.get("C") {
        Some(c) if c.iter().any(|v| v.is_finite()) => c.clone(),
        _ => p.col("N").iter().zip(p.col("D")).map(|(n, d)| 6.0 * n * d).collect(),
    }
}

/// Series of points grouped by model size (one colour per size, at most 10 labelled groups).
pub fn by_size(n: &[f64], x: &[f64], y: &[f64]) -> Vec<Series> {
    let mut groups: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for i in 0..x.len().min(y.len()) {
        let key = if i < n.len() && n[i].is_finite() { n[i].to_bits() } else { 0 };
        groups.entry(key).or_default().push((x[i], y[i]));
    }
    let many = groups.len() > 10;
    groups
        .into_iter()
        .enumerate()
        .map(|(k, (nb, pts))| {
            let nv = f64::from_bits(nb);
            let label = if many || nb == 0 { None } else { Some(format!("N = {}", fmt_count(nv))) };
            let c = if many { RGBColor(31, 119, 180) } else { color(k) };
            Series::new(label, c, Style::Points(4), pts)
        })
        .collect()
}

pub fn plot(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let r = ctx.result;
    if ctx.law == "power" {
        return power(ctx, dir);
    }
    let c = compute_of(ctx);
    let loss = ctx.points.col("loss");
    if loss.is_empty() || c.iter().all(|v| !v.is_finite()) {
        return Err(not_applicable("frontier", "needs `loss` and compute (`C`, or `N` and `D`)"));
    }
    let mut series = by_size(ctx.points.col("N"), &c, loss);
    let (mut xlo, mut xhi) = log_range(c.iter().copied(), 1.3).ok_or_else(|| not_applicable("frontier", "no positive compute"))?;
    let mut ys: Vec<f64> = loss.to_vec();
    let dark = RGBColor(20, 20, 20);
    match ctx.law {
        "chinchilla" => {
            let law = Chinchilla { e: r.params["E"], a: r.params["A"], b: r.params["B"], alpha: r.params["alpha"], beta: r.params["beta"] };
            let budgets: Vec<f64> = ctx.options.budgets.iter().copied().filter(|b| *b <= xhi * 1e4).collect();
            for b in &budgets {
                xhi = xhi.max(*b * 1.5);
            }
            let curve: Vec<(f64, f64)> = geomspace(xlo, xhi, 120).into_iter().map(|x| (x, law.allocation(x).loss)).collect();
            ys.extend(curve.iter().map(|p| p.1));
            series.push(Series::new(Some("fitted frontier L(N_opt(C), D_opt(C))".into()), dark, Style::Line(3), curve));
            let preds: Vec<(f64, f64)> = budgets.iter().map(|&b| (b, law.allocation(b).loss)).collect();
            if !preds.is_empty() {
                let lbl = preds.iter().map(|&(b, _)| {
                    let a = law.allocation(b);
                    format!("C={}: N={}, D={}", fmt_num(b), fmt_count(a.n_opt), fmt_count(a.d_opt))
                });
                series.push(Series::new(Some(format!("prediction {}", lbl.collect::<Vec<_>>().join("; "))), RGBColor(214, 39, 40), Style::Cross(8), preds));
            }
        }
        "isoflop" => {
            let opt: Vec<(f64, f64)> = r.extra["profiles"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| Some((p["C"].as_f64()?, p["loss_opt"].as_f64()?))).collect())
                .unwrap_or_default();
            series.push(Series::new(Some("IsoFLOP optima (parabola vertices)".into()), dark, Style::Line(2), opt.clone()));
            series.push(Series::new(None, dark, Style::Cross(7), opt));
        }
        _ => {}
    }
    xlo = xlo.min(xhi / 10.0);
    let (ylo, yhi) = log_range(ys, 1.04).unwrap_or((1.0, 10.0));
    let mut spec = XySpec::new(&format!("Loss vs compute ({})", ctx.law), "training compute C (FLOPs)", "loss (nats/token)", (xlo, xhi), (ylo, yhi));
    spec.x_log = true;
    spec.y_log = true;
    spec.series = series;
    let fig = render_figure!(dir, "frontier", "frontier", "Loss vs compute with the fitted frontier", (1000, 680), |root| chart::draw(root, &spec));
    Ok(vec![fig])
}

fn power(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let (xn, yn) = (ctx.options.x.as_str(), ctx.options.y.as_str());
    let (x, y) = (ctx.points.col(xn), ctx.points.col(yn));
    let r = ctx.result;
    let law = PowerLaw { e: r.params["E"], a: r.params["A"], alpha: r.params["alpha"] };
    let (xlo, xhi) = log_range(x.iter().copied(), 1.3).ok_or_else(|| not_applicable("frontier", format!("no positive `{xn}`")))?;
    let curve: Vec<(f64, f64)> = geomspace(xlo, xhi, 120).into_iter().map(|v| (v, law.eval(v))).collect();
    let mut ys: Vec<f64> = y.to_vec();
    ys.extend(curve.iter().map(|p| p.1));
    let (ylo, yhi) = log_range(ys, 1.05).unwrap_or((1.0, 10.0));
    let mut spec = XySpec::new(&format!("{yn} vs {xn}: power law with offset"), &axis_label(xn), &axis_label(yn), (xlo, xhi), (ylo, yhi));
    spec.x_log = true;
    spec.y_log = true;
    spec.x_fmt = if matches!(xn, "N" | "D" | "N_total" | "batch_tokens") { Fmt::Count } else { Fmt::Num };
    spec.series = vec![
        Series::new(Some("data".into()), color(0), Style::Points(4), x.iter().copied().zip(y.iter().copied()).collect()),
        Series::new(
            Some(format!("fit {yn} = {} + {}·{xn}^-{}", fmt_num(law.e), fmt_num(law.a), fmt_num(law.alpha))),
            RGBColor(20, 20, 20),
            Style::Line(3),
            curve,
        ),
    ];
    let fig = render_figure!(dir, "frontier", "frontier", &format!("{yn} vs {xn} with the fitted power law"), (1000, 680), |root| chart::draw(root, &spec));
    Ok(vec![fig])
}

/// Axis label with units for the canonical columns.
pub fn axis_label(col: &str) -> String {
    match col {
        "N" => "non-embedding parameters N".into(),
        "N_total" => "total parameters".into(),
        "D" => "training tokens D".into(),
        "C" => "training compute C (FLOPs)".into(),
        "loss" => "loss (nats/token)".into(),
        "lr" => "peak learning rate".into(),
        "batch_tokens" => "batch size (tokens)".into(),
        "S" => "MoE sparsity S = 1 - K/E".into(),
        "step" => "step".into(),
        other => other.into(),
    }
}
