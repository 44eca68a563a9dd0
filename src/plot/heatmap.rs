//! Learning rate × batch size heatmaps, one panel per (N, D) cell (Step Law) or compute budget
//! (DeepSeek): colour = loss above the cell's best, on a log-like scale; the grid optimum is
//! marked with a cross, near-optimal runs (within the band) are outlined in red, the
//! interpolated optimum (quadratic surface) is a white circle; runs without a finite loss
//! (diverged) are grey.

use super::common::{fmt_count, fmt_num, font, not_applicable, sequential, PlotDraw};
use super::{Figure, PlotContext, PlotError};
use crate::fit::laws::{deepseek, steplaw};
use crate::render_figure;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One panel.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub rows: Vec<usize>,
    pub band: Vec<usize>,
    pub interp: Option<(f64, f64)>,
}

/// Panels of the context's law (Step Law cells or DeepSeek budgets).
pub fn panels(ctx: &PlotContext) -> Result<Vec<Panel>, PlotError> {
    let p = ctx.points;
    for c in ["lr", "batch_tokens", "loss"] {
        if !p.columns.contains_key(c) {
            return Err(not_applicable("heatmap", format!("needs column `{c}`")));
        }
    }
    let band = ctx.options.band;
    if ctx.law == "deepseek" || !(p.columns.contains_key("N") && p.columns.contains_key("D")) {
        if !p.columns.contains_key("C") {
            return Err(not_applicable("heatmap", "needs `N` and `D`, or `C`"));
        }
        let fin: Vec<usize> = (0..p.len()).filter(|&i| p.col("loss")[i].is_finite() && p.col("C")[i] > 0.0).collect();
        let sub = p.select(&fin);
        return Ok(deepseek::cells(&sub, ctx.options.budget_tol, band)
            .into_iter()
            .map(|c| Panel {
                title: format!("C = {} FLOPs", fmt_num(c.c)),
                rows: c.rows.iter().map(|&i| fin[i]).collect(),
                band: c.band.iter().map(|&i| fin[i]).collect(),
                interp: (c.interp_method != "grid argmin").then_some((c.interp_lr, c.interp_bs)),
            })
            .collect());
    }
    let (n, d) = (p.col("N"), p.col("D"));
    let cells = steplaw::cells(p, band).map_err(|e| not_applicable("heatmap", e.to_string()))?;
    Ok(cells
        .into_iter()
        .map(|c| Panel {
            title: format!("N = {}, D = {}", fmt_count(c.n), fmt_count(c.d)),
            rows: (0..p.len()).filter(|&i| n[i] == c.n && d[i] == c.d).collect(),
            band: c.band.clone(),
            interp: (c.interp_method != "grid argmin").then_some((c.interp_lr, c.interp_bs)),
        })
        .collect())
}

/// Colour scale position of a relative excess loss (0 → 0, 10% → 1, log-like).
fn scale(excess: f64) -> f64 {
    ((1.0 + excess.max(0.0) / 1e-3).ln() / (1.0f64 + 0.1 / 1e-3).ln()).min(1.0)
}

pub fn plot(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let panels = panels(ctx)?;
    if panels.is_empty() {
        return Err(not_applicable("heatmap", "no cells"));
    }
    let ncols = panels.len().min(4) as u32;
    let nrows = panels.len().div_ceil(4) as u32;
    let (pw, ph) = (420u32, 360u32);
    let (w, h) = (ncols * pw + 120, nrows * ph + 50);
    let title = format!("Loss landscape over learning rate x batch size ({} cells)", panels.len());
    let fig = render_figure!(dir, "heatmap", "heatmap", &title, (w, h), |root: &DrawingArea<_, Shift>| -> PlotDraw {
        let (main, bar) = root.split_horizontally(w - 120);
        let (head, body) = main.split_vertically(50);
        head.draw(&Text::new(title.clone(), (16, 14), font(22.0)))?;
        let areas = body.split_evenly((nrows as usize, ncols as usize));
        for (a, pnl) in areas.iter().zip(&panels) {
            panel(a, ctx, pnl)?;
        }
        colorbar(&bar)
    });
    Ok(vec![fig])
}

fn distinct_sorted(v: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut s: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s.dedup();
    s
}

/// Cell edges of sorted distinct values on a log axis: geometric midpoints, the outer edges
/// mirrored (a single value gets a factor-√2 cell).
fn edges(vals: &[f64]) -> Vec<(f64, f64)> {
    let n = vals.len();
    (0..n)
        .map(|k| {
            let lo = if k > 0 { (vals[k - 1] * vals[k]).sqrt() } else if n > 1 { vals[0] * (vals[0] / vals[1]).sqrt() } else { vals[0] / 2f64.sqrt() };
            let hi = if k + 1 < n { (vals[k] * vals[k + 1]).sqrt() } else if n > 1 { vals[n - 1] * (vals[n - 1] / vals[n - 2]).sqrt() } else { vals[0] * 2f64.sqrt() };
            (lo, hi)
        })
        .collect()
}

fn panel<DB>(area: &DrawingArea<DB, Shift>, ctx: &PlotContext, pnl: &Panel) -> PlotDraw
where
    DB: DrawingBackend,
    DB::ErrorType: 'static + Send + Sync,
{
    let p = ctx.points;
    let (lr, bs, loss) = (p.col("lr"), p.col("batch_tokens"), p.col("loss"));
    let lrs = distinct_sorted(pnl.rows.iter().map(|&i| lr[i]).filter(|v| *v > 0.0));
    let bss = distinct_sorted(pnl.rows.iter().map(|&i| bs[i]).filter(|v| *v > 0.0));
    if lrs.is_empty() || bss.is_empty() {
        return Ok(());
    }
    let (ex, ey) = (edges(&lrs), edges(&bss));
    let min = pnl.rows.iter().map(|&i| loss[i]).filter(|v| v.is_finite()).fold(f64::INFINITY, f64::min);
    let mut chart = ChartBuilder::on(area)
        .caption(&pnl.title, font(16.0))
        .margin(8)
        .x_label_area_size(44)
        .y_label_area_size(62)
        .build_cartesian_2d((ex[0].0..ex[ex.len() - 1].1).log_scale(), (ey[0].0..ey[ey.len() - 1].1).log_scale())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("peak learning rate")
        .y_desc("batch (tokens)")
        .axis_desc_style(font(13.0))
        .label_style(font(11.0))
        .x_labels(5)
        .y_labels(6)
        .x_label_formatter(&|v| fmt_num(*v))
        .y_label_formatter(&|v| fmt_count(*v))
        .draw()?;
    let cell = |i: usize| {
        let kx = lrs.iter().position(|x| *x == lr[i]).unwrap_or(0);
        let ky = bss.iter().position(|y| *y == bs[i]).unwrap_or(0);
        (ex[kx], ey[ky])
    };
    // Worst first, so where several runs share a (lr, batch) cell (e.g. several model sizes in
    // one compute budget) the best one is drawn on top.
    let mut order: Vec<usize> = pnl.rows.iter().copied().filter(|&i| lr[i] > 0.0 && bs[i] > 0.0).collect();
    order.sort_by(|&a, &b| loss[b].total_cmp(&loss[a]));
    chart.draw_series(order.iter().map(|&i| {
        let ((x0, x1), (y0, y1)) = cell(i);
        let c = if loss[i].is_finite() { sequential(scale(loss[i] / min - 1.0)) } else { RGBColor(200, 200, 200) };
        Rectangle::new([(x0, y0), (x1, y1)], c.filled())
    }))?;
    chart.draw_series(pnl.band.iter().map(|&i| {
        let ((x0, x1), (y0, y1)) = cell(i);
        let (sx, sy) = ((x1 / x0).powf(0.06), (y1 / y0).powf(0.06));
        Rectangle::new([(x0 * sx, y0 * sy), (x1 / sx, y1 / sy)], RGBColor(214, 39, 40).stroke_width(2))
    }))?;
    if let Some(&best) = order.iter().filter(|&&i| loss[i].is_finite()).min_by(|&&a, &&b| loss[a].total_cmp(&loss[b])) {
        chart.draw_series(std::iter::once(Cross::new((lr[best], bs[best]), 7, BLACK.stroke_width(3))))?;
    }
    if let Some((il, ib)) = pnl.interp {
        chart.draw_series([Circle::new((il, ib), 6, WHITE.filled()), Circle::new((il, ib), 6, BLACK.stroke_width(2))])?;
    }
    Ok(())
}

fn colorbar<DB>(area: &DrawingArea<DB, Shift>) -> PlotDraw
where
    DB: DrawingBackend,
    DB::ErrorType: 'static + Send + Sync,
{
    let (top, bottom) = (70i32, 330i32);
    let x0 = 14i32;
    for k in 0..=100 {
        let t = k as f64 / 100.0;
        let y = bottom - ((bottom - top) as f64 * t) as i32;
        area.draw(&Rectangle::new([(x0, y - 2), (x0 + 24, y + 1)], sequential(t).filled()))?;
    }
    area.draw(&Text::new("loss above", (4, 30), font(13.0)))?;
    area.draw(&Text::new("cell best", (4, 46), font(13.0)))?;
    for ex in [0.0, 0.0025, 0.01, 0.03, 0.1] {
        let y = bottom - ((bottom - top) as f64 * scale(ex)) as i32;
        area.draw(&PathElement::new(vec![(x0 + 24, y), (x0 + 30, y)], BLACK))?;
        area.draw(&Text::new(format!("{}%", ex * 100.0), (x0 + 33, y - 7), font(12.0)))?;
    }
    let y = bottom + 30;
    area.draw(&Cross::new((x0 + 8, y), 6, BLACK.stroke_width(3)))?;
    area.draw(&Text::new("grid best", (x0 + 20, y - 7), font(12.0)))?;
    area.draw(&Rectangle::new([(x0, y + 18), (x0 + 14, y + 32)], RGBColor(214, 39, 40).stroke_width(2)))?;
    area.draw(&Text::new("band", (x0 + 20, y + 18), font(12.0)))?;
    area.draw(&Circle::new((x0 + 8, y + 50), 6, BLACK.stroke_width(2)))?;
    area.draw(&Text::new("interp.", (x0 + 20, y + 43), font(12.0)))?;
    Ok(())
}
