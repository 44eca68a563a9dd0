//! Hyper-parameter laws: optimal learning rate and batch size with the fitted power laws and
//! bootstrap percentile bands. Step Law: η_opt vs N (one line per D) and B_opt vs D; DeepSeek:
//! η_opt vs C and B_opt vs C. Grey dots are the near-optimal runs the laws are fitted to,
//! coloured dots the per-cell interpolated optima.

use super::chart::{self, Fmt, Series, Style, XySpec};
use super::common::{band, color, fmt_count, geomspace, level, log_range, not_applicable, stored_samples, PlotDraw};
use super::{Figure, PlotContext, PlotError};
use crate::fit::laws::{deepseek, steplaw};
use crate::render_figure;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const GREY: RGBColor = RGBColor(150, 150, 150);
const DARK: RGBColor = RGBColor(20, 20, 20);

fn cells_xy(result: &crate::fit::FitResult, x: &str, y: &str) -> Vec<(f64, f64, f64)> {
    result.extra["cells"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| Some((c[x].as_f64()?, c[y].as_f64()?, c["D"].as_f64().unwrap_or(f64::NAN)))).collect())
        .unwrap_or_default()
}

pub fn plot(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let (left, right) = match ctx.law {
        "steplaw" => steplaw_specs(ctx)?,
        "deepseek" => deepseek_specs(ctx)?,
        other => return Err(not_applicable("hparams", format!("law `{other}` is not a hyper-parameter law (steplaw, deepseek)"))),
    };
    let fig = render_figure!(dir, "hparams", "hparams", "Optimal learning rate and batch size", (1500, 640), |root: &DrawingArea<_, Shift>| -> PlotDraw {
        let (a, b) = root.split_horizontally(750);
        chart::draw(&a, &left)?;
        chart::draw(&b, &right)
    });
    Ok(vec![fig])
}

fn steplaw_specs(ctx: &PlotContext) -> Result<(XySpec, XySpec), PlotError> {
    let (p, r) = (ctx.points, ctx.result);
    let law = |k: &str| r.params.get(k).copied().unwrap_or(f64::NAN);
    let (lc, la, lb, bc, bg) = (law("lr_c"), law("lr_alpha"), law("lr_beta"), law("bs_c"), law("bs_gamma"));
    let cells = steplaw::cells(p, ctx.options.band).map_err(|e| not_applicable("hparams", e.to_string()))?;
    let band_rows: Vec<usize> = cells.iter().flat_map(|c| c.band.iter().copied()).collect();
    let (n, d, lr, bs) = (p.col("N"), p.col("D"), p.col("lr"), p.col("batch_tokens"));
    let mut ds: Vec<f64> = cells.iter().map(|c| c.d).collect();
    ds.sort_by(f64::total_cmp);
    ds.dedup();
    let (nlo, nhi) = log_range(n.iter().copied(), 1.3).ok_or_else(|| not_applicable("hparams", "no N"))?;
    let ns = geomspace(nlo, nhi, 60);
    let samples = stored_samples(r);
    let lvl = level(r);
    let d_med = ds[ds.len() / 2];
    let mut left = Vec::new();
    if let Some(b) = band(&samples, &ns, lvl, |s, x| s[0] * x.powf(s[1]) * d_med.powf(s[2])) {
        left.push(Series::band(Some(format!("{:.0}% bootstrap band (D = {})", lvl * 100.0, fmt_count(d_med))), color(0), b));
    }
    left.push(Series::new(Some("near-optimal runs".into()), GREY, Style::Points(3), band_rows.iter().map(|&i| (n[i], lr[i])).collect()));
    let show: Vec<f64> = if ds.len() <= 6 { ds.clone() } else { vec![ds[0], d_med, ds[ds.len() - 1]] };
    for (k, &dv) in show.iter().enumerate() {
        let c = color(k + 1);
        let line: Vec<(f64, f64)> = ns.iter().map(|&x| (x, lc * x.powf(la) * dv.powf(lb))).collect();
        left.push(Series::new(Some(format!("fit at D = {}", fmt_count(dv))), c, Style::Line(2), line));
        let opt: Vec<(f64, f64)> = cells.iter().filter(|cl| cl.d == dv).map(|cl| (cl.n, cl.interp_lr)).collect();
        left.push(Series::new(None, c, Style::Points(6), opt));
    }
    let ys: Vec<f64> = band_rows.iter().map(|&i| lr[i]).chain(cells.iter().map(|c| c.interp_lr)).collect();
    let mut ls = XySpec::new(
        &format!("eta_opt = {:.3}·N^{:.3}·D^{:.3}", lc, la, lb),
        "non-embedding parameters N",
        "optimal peak learning rate",
        (nlo, nhi),
        log_range(ys, 1.5).unwrap_or((1e-4, 1e-2)),
    );
    ls.x_log = true;
    ls.y_log = true;
    ls.x_fmt = Fmt::Count;
    ls.series = left;
    let (dlo, dhi) = log_range(d.iter().copied(), 1.3).unwrap_or((1e9, 1e11));
    let dgrid = geomspace(dlo, dhi, 60);
    let mut right = Vec::new();
    if let Some(b) = band(&samples, &dgrid, lvl, |s, x| s[3] * x.powf(s[4])) {
        right.push(Series::band(Some(format!("{:.0}% bootstrap band", lvl * 100.0)), color(0), b));
    }
    right.push(Series::new(Some("near-optimal runs".into()), GREY, Style::Points(3), band_rows.iter().map(|&i| (d[i], bs[i])).collect()));
    right.push(Series::new(Some("cell optimum (interpolated)".into()), color(1), Style::Points(6), cells.iter().map(|c| (c.d, c.interp_bs)).collect()));
    right.push(Series::new(Some("fit".into()), DARK, Style::Line(2), dgrid.iter().map(|&x| (x, bc * x.powf(bg))).collect()));
    let ys: Vec<f64> = band_rows.iter().map(|&i| bs[i]).chain(cells.iter().map(|c| c.interp_bs)).collect();
    let mut rs = XySpec::new(&format!("B_opt = {:.3}·D^{:.3}", bc, bg), "training tokens D", "optimal batch size (tokens)", (dlo, dhi), log_range(ys, 1.5).unwrap_or((1e5, 1e7)));
    rs.x_log = true;
    rs.y_log = true;
    rs.x_fmt = Fmt::Count;
    rs.y_fmt = Fmt::Count;
    rs.legend_upper_right = false;
    rs.series = right;
    Ok((ls, rs))
}

fn deepseek_specs(ctx: &PlotContext) -> Result<(XySpec, XySpec), PlotError> {
    let (p, r) = (ctx.points, ctx.result);
    let law = |k: &str| r.params.get(k).copied().unwrap_or(f64::NAN);
    let (ec, ee, bc, be) = (law("eta_c"), law("eta_exp"), law("B_c"), law("B_exp"));
    let fin: Vec<usize> = (0..p.len()).filter(|&i| p.col("loss")[i].is_finite() && p.col("C")[i] > 0.0).collect();
    let sub = p.select(&fin);
    let cells = deepseek::cells(&sub, ctx.options.budget_tol, ctx.options.band);
    let band_rows: Vec<usize> = cells.iter().flat_map(|c| c.band.iter().copied()).collect();
    let (c, lr, bs) = (sub.col("C"), sub.col("lr"), sub.col("batch_tokens"));
    let (clo, chi) = log_range(c.iter().copied(), 1.5).ok_or_else(|| not_applicable("hparams", "no C"))?;
    let cs = geomspace(clo, chi, 60);
    let samples = stored_samples(r);
    let lvl = level(r);
    let opt = cells_xy(r, "C", "interp_lr");
    let optb = cells_xy(r, "C", "interp_batch_tokens");
    let mk = |title: String, ylab: &str, rows: Vec<(f64, f64)>, opt: &[(f64, f64, f64)], f: &dyn Fn(f64) -> f64, bnd: Option<Vec<(f64, f64, f64)>>, yfmt: Fmt| {
        let mut s = Vec::new();
        if let Some(b) = bnd {
            s.push(Series::band(Some(format!("{:.0}% bootstrap band", lvl * 100.0)), color(0), b));
        }
        let ys: Vec<f64> = rows.iter().map(|p| p.1).chain(opt.iter().map(|o| o.1)).collect();
        s.push(Series::new(Some("near-optimal runs".into()), GREY, Style::Points(3), rows));
        s.push(Series::new(Some("budget optimum (interpolated)".into()), color(1), Style::Points(6), opt.iter().map(|o| (o.0, o.1)).collect()));
        s.push(Series::new(Some("fit".into()), DARK, Style::Line(2), cs.iter().map(|&x| (x, f(x))).collect()));
        let mut spec = XySpec::new(&title, "training compute C (FLOPs)", ylab, (clo, chi), log_range(ys, 1.5).unwrap_or((1e-4, 1e-2)));
        spec.x_log = true;
        spec.y_log = true;
        spec.y_fmt = yfmt;
        spec.series = s;
        spec
    };
    let left = mk(
        format!("eta_opt = {:.4}·C^{:.4}", ec, ee),
        "optimal peak learning rate",
        band_rows.iter().map(|&i| (c[i], lr[i])).collect(),
        &opt,
        &|x| ec * x.powf(ee),
        band(&samples, &cs, lvl, |s, x| s[0] * x.powf(s[1])),
        Fmt::Num,
    );
    let mut right = mk(
        format!("B_opt = {:.4}·C^{:.4}", bc, be),
        "optimal batch size (tokens)",
        band_rows.iter().map(|&i| (c[i], bs[i])).collect(),
        &optb,
        &|x| bc * x.powf(be),
        band(&samples, &cs, lvl, |s, x| s[2] * x.powf(s[3])),
        Fmt::Count,
    );
    right.legend_upper_right = false;
    Ok((left, right))
}
