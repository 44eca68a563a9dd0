//! `report.md` and a self-contained `report.html` (PNGs inlined as base64) for one analysis:
//! predictions at the target budgets (optimal N, D, learning rate, batch), then per fit the
//! law, fit diagnostics, parameters ± bootstrap CI, residual summary, plots and exclusions.

use crate::fit::analysis::FitOutcome;
use crate::fit::FitResult;
use crate::plot::common::{fmt_count, fmt_num};
use std::fmt::Write as _;
use std::path::Path;

/// A report element, rendered to Markdown and HTML.
#[derive(Clone, Debug)]
pub enum Block {
    Heading(u8, String),
    Para(String),
    Table(Vec<String>, Vec<Vec<String>>),
    List(Vec<String>),
    /// Title, PNG path, SVG path, relative link base (folder of the report).
    Image(String, std::path::PathBuf, std::path::PathBuf),
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for ch in data.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        for k in 0..4 {
            if k <= ch.len() {
                out.push(T[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn rel(path: &Path, base: &Path) -> String {
    path.strip_prefix(base).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

/// Renders blocks as Markdown (image links relative to `base`).
pub fn to_markdown(blocks: &[Block], base: &Path) -> String {
    let mut s = String::new();
    for b in blocks {
        match b {
            Block::Heading(l, t) => {
                let _ = writeln!(s, "{} {t}\n", "#".repeat(*l as usize));
            }
            Block::Para(t) => {
                let _ = writeln!(s, "{t}\n");
            }
            Block::List(items) => {
                for i in items {
                    let _ = writeln!(s, "- {}", i.replace('\n', " "));
                }
                s.push('\n');
            }
            Block::Table(h, rows) => {
                let _ = writeln!(s, "| {} |", h.join(" | "));
                let _ = writeln!(s, "|{}|", h.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
                for r in rows {
                    let _ = writeln!(s, "| {} |", r.iter().map(|c| c.replace('|', "\\|")).collect::<Vec<_>>().join(" | "));
                }
                s.push('\n');
            }
            Block::Image(t, png, svg) => {
                let _ = writeln!(s, "![{t}]({})\n\n({t}: [SVG]({}))\n", rel(png, base), rel(svg, base));
            }
        }
    }
    s
}

/// Renders blocks as a self-contained HTML page (PNG data inlined).
pub fn to_html(title: &str, blocks: &[Block], base: &Path) -> std::io::Result<String> {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}\
         table{{border-collapse:collapse;margin:0.5em 0 1em}}td,th{{border:1px solid #bbb;padding:3px 8px;text-align:left}}th{{background:#eee}}\
         img{{max-width:100%;border:1px solid #ddd}}code{{background:#f4f4f4}}</style></head><body>\n",
        esc(title)
    );
    for b in blocks {
        match b {
            Block::Heading(l, t) => {
                let _ = writeln!(s, "<h{l}>{}</h{l}>", esc(t));
            }
            Block::Para(t) => {
                let _ = writeln!(s, "<p>{}</p>", esc(t));
            }
            Block::List(items) => {
                s.push_str("<ul>\n");
                for i in items {
                    let _ = writeln!(s, "<li>{}</li>", esc(i));
                }
                s.push_str("</ul>\n");
            }
            Block::Table(h, rows) => {
                s.push_str("<table><tr>");
                for c in h {
                    let _ = write!(s, "<th>{}</th>", esc(c));
                }
                s.push_str("</tr>\n");
                for r in rows {
                    s.push_str("<tr>");
                    for c in r {
                        let _ = write!(s, "<td>{}</td>", esc(c));
                    }
                    s.push_str("</tr>\n");
                }
                s.push_str("</table>\n");
            }
            Block::Image(t, png, svg) => {
                let data = std::fs::read(png)?;
                let _ = writeln!(
                    s,
                    "<figure><img alt=\"{}\" src=\"data:image/png;base64,{}\"><figcaption>{} (<a href=\"{}\">SVG</a>)</figcaption></figure>",
                    esc(t),
                    base64(&data),
                    esc(t),
                    esc(&rel(svg, base))
                );
            }
        }
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

fn ci_cell(r: &FitResult, k: &str) -> String {
    r.ci.get(k).map(|[a, b]| format!("[{}, {}]", fmt_num(*a), fmt_num(*b))).unwrap_or_else(|| "-".into())
}

/// Budgets mentioned by any fit (its `budgets` option).
fn budgets(outcomes: &[FitOutcome]) -> Vec<f64> {
    let mut v: Vec<f64> = outcomes.iter().flat_map(|o| o.spec.effective_options().budgets).collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

fn at(r: &FitResult, list: &str, c: f64, key: &str) -> Option<f64> {
    r.extra[list].as_array()?.iter().find(|e| e["C"].as_f64() == Some(c))?[key].as_f64()
}

/// The "predictions" table: per budget, N_opt/D_opt from the compute-optimal fits, learning rate
/// and batch from DeepSeek (in C) or Step Law (at that N_opt, D_opt).
fn predictions(outcomes: &[FitOutcome]) -> Vec<Vec<String>> {
    let ok: Vec<(&FitOutcome, &FitResult)> = outcomes.iter().filter_map(|o| o.result.as_ref().ok().map(|r| (o, r))).collect();
    let mut rows = Vec::new();
    for c in budgets(outcomes) {
        for (o, r) in &ok {
            let ci = |k: &str| ci_cell(r, &format!("{k}@{c:e}"));
            match r.law.as_str() {
                "chinchilla" | "isoflop" => {
                    let (n, d) = (at(r, "allocation", c, "N_opt"), at(r, "allocation", c, "D_opt"));
                    if let (Some(n), Some(d)) = (n, d) {
                        rows.push(vec![fmt_num(c), o.name.clone(), "N_opt".into(), fmt_count(n), ci("N_opt")]);
                        rows.push(vec![fmt_num(c), o.name.clone(), "D_opt (tokens)".into(), fmt_count(d), ci("D_opt")]);
                        rows.push(vec![fmt_num(c), o.name.clone(), "D/N".into(), fmt_num(d / n), ci("D/N")]);
                        if let Some(l) = at(r, "allocation", c, "loss") {
                            rows.push(vec![fmt_num(c), o.name.clone(), "loss at optimum".into(), fmt_num(l), "-".into()]);
                        }
                        for (o2, r2) in ok.iter().filter(|(_, r2)| r2.law == "steplaw") {
                            let p = |k: &str| r2.params.get(k).copied().unwrap_or(f64::NAN);
                            let lr = p("lr_c") * n.powf(p("lr_alpha")) * d.powf(p("lr_beta"));
                            let bs = p("bs_c") * d.powf(p("bs_gamma"));
                            rows.push(vec![fmt_num(c), format!("{} at {}'s N_opt, D_opt", o2.name, o.name), "learning rate".into(), fmt_num(lr), "-".into()]);
                            rows.push(vec![fmt_num(c), format!("{} at {}'s N_opt, D_opt", o2.name, o.name), "batch (tokens)".into(), fmt_count(bs), "-".into()]);
                        }
                    }
                }
                "deepseek" => {
                    if let (Some(lr), Some(bs)) = (at(r, "predictions", c, "lr"), at(r, "predictions", c, "batch_tokens")) {
                        rows.push(vec![fmt_num(c), o.name.clone(), "learning rate".into(), fmt_num(lr), ci("lr_opt")]);
                        rows.push(vec![fmt_num(c), o.name.clone(), "batch (tokens)".into(), fmt_count(bs), ci("batch_tokens_opt")]);
                    }
                }
                "moe_sparsity" => {
                    for (k, lbl) in [("S_opt", "optimal sparsity S"), ("N_opt", "total params N"), ("N_active_opt", "active params"), ("D_opt", "tokens D")] {
                        if let Some(v) = at(r, "optimum", c, k) {
                            rows.push(vec![fmt_num(c), o.name.clone(), lbl.into(), if k == "S_opt" { fmt_num(v) } else { fmt_count(v) }, ci(k)]);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    rows
}

/// Builds the report blocks.
pub fn blocks(title: &str, source: &Path, outcomes: &[FitOutcome]) -> Vec<Block> {
    let mut b = vec![Block::Heading(1, title.to_string()), Block::Para(format!("Input: {}. Generated by mixscale {}.", source.display(), env!("CARGO_PKG_VERSION")))];
    let preds = predictions(outcomes);
    if !preds.is_empty() {
        b.push(Block::Heading(2, "Predictions at target budgets".into()));
        b.push(Block::Table(["C (FLOPs)", "from fit", "quantity", "value", "bootstrap CI"].iter().map(|s| s.to_string()).collect(), preds));
    }
    for o in outcomes {
        b.push(Block::Heading(2, format!("{} (law `{}`)", o.name, o.spec.law)));
        let r = match &o.result {
            Ok(r) => r,
            Err(e) => {
                b.push(Block::Para(format!("Fit failed: {e}")));
                continue;
            }
        };
        if let Some(f) = r.extra["form"].as_str() {
            b.push(Block::Para(format!("Form: {f}")));
        }
        b.push(Block::Para(format!(
            "Points used: {}. Objective: {:.6e}. Gradient norm: {:.3e}. Converged: {}. Output: {}.",
            r.n_points,
            r.objective,
            r.grad_norm,
            if r.converged { "yes" } else { "NO (do not trust these numbers)" },
            o.dir.join("fit.json").display()
        )));
        let rows: Vec<Vec<String>> = r.params.iter().map(|(k, v)| vec![k.clone(), fmt_num(*v), ci_cell(r, k)]).collect();
        let lvl = r.extra["bootstrap"]["level"].as_f64().map(|l| format!("{:.0}% bootstrap CI", l * 100.0)).unwrap_or_else(|| "CI (no bootstrap)".into());
        b.push(Block::Table(vec!["parameter".into(), "estimate".into(), lvl], rows));
        if let Some(res) = &o.residual_summary {
            b.push(Block::Para(format!("Residuals: {res}")));
        }
        if let Some(h) = r.extra["holdout"].as_array().filter(|h| !h.is_empty()) {
            let rows = h.iter().map(|e| vec![e["run"].as_str().unwrap_or("").to_string(), fmt_num(e["mean_abs_rel_error"].as_f64().unwrap_or(f64::NAN)), fmt_num(e["max_abs_rel_error"].as_f64().unwrap_or(f64::NAN))]).collect();
            b.push(Block::Para("Held-out schedules predicted by the fitted law:".into()));
            b.push(Block::Table(vec!["run".into(), "mean |rel. error|".into(), "max |rel. error|".into()], rows));
        }
        for f in &o.figures {
            b.push(Block::Image(f.title.clone(), f.png.clone(), f.svg.clone()));
        }
        if !o.plot_errors.is_empty() {
            b.push(Block::Para("Plots not drawn:".into()));
            b.push(Block::List(o.plot_errors.clone()));
        }
        if r.exclusions.is_empty() {
            b.push(Block::Para("Exclusions: none.".into()));
        } else {
            b.push(Block::Para(format!("Exclusions ({}):", r.exclusions.len())));
            let mut ex: Vec<String> = r.exclusions.iter().take(40).cloned().collect();
            if r.exclusions.len() > 40 {
                ex.push(format!("... and {} more (all in fit.json)", r.exclusions.len() - 40));
            }
            b.push(Block::List(ex));
        }
    }
    b
}

/// Writes `out_dir/report.md` and `out_dir/report.html`.
pub fn write_report(title: &str, source: &Path, outcomes: &[FitOutcome], out_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let b = blocks(title, source, outcomes);
    crate::fsutil::write_atomic(&out_dir.join("report.md"), to_markdown(&b, out_dir).as_bytes())?;
    crate::fsutil::write_atomic(&out_dir.join("report.html"), to_html(title, &b, out_dir)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::base64;
    #[test]
    fn base64_rfc4648_vectors() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
