//! Log residuals ln(L̂) − ln(L) of the parametric laws against compute (or the power law's x),
//! with the ±δ Huber band: systematic curvature here means the law misses the data.

use super::chart::{self, Series, Style, XySpec};
use super::common::{color, lin_range, log_range, not_applicable};
use super::frontier::{axis_label, compute_of};
use super::{Figure, PlotContext, PlotError};
use crate::fit::laws::chinchilla::Chinchilla;
use crate::fit::laws::moe_sparsity::MoeLaw;
use crate::fit::laws::power::PowerLaw;
use crate::render_figure;
use plotters::prelude::RGBColor;
use std::path::Path;

/// (x, ln pred − ln obs) per point, and the x-axis name, for the laws that predict each point.
pub fn residuals(ctx: &PlotContext) -> Option<(Vec<(f64, f64)>, String)> {
    let (p, r) = (ctx.points, ctx.result);
    let prm = |k: &str| r.params.get(k).copied().unwrap_or(f64::NAN);
    let loss = p.col("loss");
    let (xs, pred, xname): (Vec<f64>, Vec<f64>, String) = match ctx.law {
        "chinchilla" => {
            let law = Chinchilla { e: prm("E"), a: prm("A"), b: prm("B"), alpha: prm("alpha"), beta: prm("beta") };
            (compute_of(ctx), p.col("N").iter().zip(p.col("D")).map(|(n, d)| law.loss(*n, *d)).collect(), "C".into())
        }
        "moe_sparsity" => {
            let v: Vec<f64> = ["a", "b", "c", "d", "e"].iter().map(|k| prm(k).ln()).chain(["alpha", "beta", "lambda", "delta", "gamma"].iter().map(|k| prm(k))).collect();
            let law = MoeLaw::from_log(&v);
            let pred = (0..p.len()).map(|i| law.loss(p.col("N")[i], p.col("D")[i], p.col("S")[i])).collect();
            (compute_of(ctx), pred, "C".into())
        }
        "power" => {
            let law = PowerLaw { e: prm("E"), a: prm("A"), alpha: prm("alpha") };
            let x = p.col(&ctx.options.x).to_vec();
            let y = p.col(&ctx.options.y);
            let pred: Vec<f64> = x.iter().map(|v| law.eval(*v)).collect();
            let res = x.iter().zip(pred.iter().zip(y)).map(|(x, (a, b))| (*x, a.ln() - b.ln())).collect();
            return Some((res, ctx.options.x.clone()));
        }
        _ => return None,
    };
    Some((xs.iter().zip(pred.iter().zip(loss)).map(|(x, (a, b))| (*x, a.ln() - b.ln())).collect(), xname))
}

pub fn plot(ctx: &PlotContext, dir: &Path) -> Result<Vec<Figure>, PlotError> {
    let (res, xname) = residuals(ctx).ok_or_else(|| not_applicable("residuals", format!("law `{}` has no per-point prediction", ctx.law)))?;
    let res: Vec<(f64, f64)> = res.into_iter().filter(|(x, y)| x.is_finite() && *x > 0.0 && y.is_finite()).collect();
    let (xlo, xhi) = log_range(res.iter().map(|p| p.0), 1.3).ok_or_else(|| not_applicable("residuals", "no finite residual"))?;
    let d = ctx.options.delta;
    let (ylo, yhi) = lin_range(res.iter().map(|p| p.1).chain([-d, d]), 0.08).unwrap_or((-0.1, 0.1));
    let mut spec = XySpec::new("Residuals of the fit (log space)", &axis_label(&xname), "ln(predicted) - ln(observed)", (xlo, xhi), (ylo, yhi));
    spec.x_log = true;
    spec.series = vec![
        Series::band(Some(format!("Huber quadratic zone |r| <= delta = {d}")), RGBColor(120, 120, 120), vec![(xlo, -d, d), (xhi, -d, d)]),
        Series::new(None, RGBColor(60, 60, 60), Style::Line(1), vec![(xlo, 0.0), (xhi, 0.0)]),
        Series::new(Some("data points (all rows read, incl. excluded ones)".into()), color(0), Style::Points(4), res),
    ];
    Ok(vec![render_figure!(dir, "residuals", "residuals", "Residuals in log space", (1000, 600), |root| chart::draw(root, &spec))])
}

/// "RMS r, max |r| over n points" of the log residuals, for the report.
pub fn summary(ctx: &PlotContext) -> Option<String> {
    let (res, _) = residuals(ctx)?;
    let r: Vec<f64> = res.into_iter().map(|p| p.1).filter(|v| v.is_finite()).collect();
    if r.is_empty() {
        return None;
    }
    let rms = (r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64).sqrt();
    let max = r.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    Some(format!("log-space RMS {rms:.4}, max |ln(pred/obs)| {max:.4} over {} points read (including excluded rows)", r.len()))
}
