//! Shared plotting helpers: font registration, SVG + PNG output, colours, number formats.

use super::{Figure, PlotError};
use plotters::style::{FontStyle, RGBColor};
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans, bundled (see `fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Font family name used by every plot.
pub const FAMILY: &str = "sans-serif";

/// Registers the bundled font for plotters' `ab_glyph` text backend (idempotent).
pub fn register_font() {
    REGISTER.call_once(|| {
        // The font is compiled in; failing to parse it would be a build defect.
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            eprintln!("warning: bundled DejaVu Sans could not be registered; PNG text will be missing");
        }
    });
}

/// Boxed error of drawing code (plotters' errors are generic over the backend).
pub type PlotDraw = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Draws the same figure into `<dir>/<stem>.svg` and `<dir>/<stem>.png`. `$draw` is an
/// expression taking a `DrawingArea` (it is expanded once per backend, so it may be a closure
/// used generically).
#[macro_export]
#[doc(hidden)]
macro_rules! render_figure {
    ($dir:expr, $stem:expr, $kind:expr, $title:expr, ($w:expr, $h:expr), $draw:expr) => {{
        use plotters::prelude::*;
        $crate::plot::common::register_font();
        let (w, h): (u32, u32) = ($w, $h);
        let svg = $dir.join(format!("{}.svg", $stem));
        let png = $dir.join(format!("{}.png", $stem));
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, (w, h)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| $crate::plot::PlotError::Draw(e.to_string()))?;
            let r: $crate::plot::common::PlotDraw = ($draw)(&root);
            r.map_err(|e| $crate::plot::PlotError::Draw(e.to_string()))?;
            root.present().map_err(|e| $crate::plot::PlotError::Draw(e.to_string()))?;
        }
        $crate::plot::common::write_file(&svg, text.as_bytes())?;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| $crate::plot::PlotError::Draw(e.to_string()))?;
            let r: $crate::plot::common::PlotDraw = ($draw)(&root);
            r.map_err(|e| $crate::plot::PlotError::Draw(e.to_string()))?;
            root.present().map_err(|e| $crate::plot::PlotError::Draw(e.to_string()))?;
        }
        $crate::plot::common::write_png(&png, &buf, w, h)?;
        $crate::plot::Figure { kind: $kind.to_string(), title: $title.to_string(), svg, png, size: (w, h) }
    }};
}
pub use render_figure;

/// Writes bytes atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), PlotError> {
    crate::fsutil::write_atomic(path, bytes).map_err(|source| PlotError::Io { path: path.to_path_buf(), source })
}

/// Encodes an RGB8 buffer as PNG and writes it.
pub fn write_png(path: &Path, rgb: &[u8], w: u32, h: u32) -> Result<(), PlotError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| PlotError::Draw(format!("png: {e}")))?;
        wr.write_image_data(rgb).map_err(|e| PlotError::Draw(format!("png: {e}")))?;
    }
    write_file(path, &out)
}

/// A colour-blind-friendly qualitative palette (Tableau 10).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The i-th palette colour (cycling).
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Viridis-like sequential colour for t in [0, 1] (5-stop linear interpolation).
pub fn sequential(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 1.0 };
    let x = t * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let m = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

/// Compact engineering format: 1.2e21, 3.5e8, 0.0012 → "1.2e-3".
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (0.01..1000.0).contains(&a) {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        let e = a.log10().floor() as i32;
        let m = v / 10f64.powi(e);
        if (m.abs() - 1.0).abs() < 1e-9 {
            format!("1e{e}")
        } else {
            format!("{m:.2}e{e}").replace(".00e", "e").replace("0e", "e")
        }
    }
}

/// Parameter counts and token counts: 125M, 1.3B, 20B, 1.4T.
pub fn fmt_count(v: f64) -> String {
    let a = v.abs();
    let (d, s) = if a >= 1e12 {
        (1e12, "T")
    } else if a >= 1e9 {
        (1e9, "B")
    } else if a >= 1e6 {
        (1e6, "M")
    } else if a >= 1e3 {
        (1e3, "K")
    } else {
        return fmt_num(v);
    };
    let x = v / d;
    if x >= 100.0 {
        format!("{x:.0}{s}")
    } else if x >= 10.0 {
        let t = format!("{x:.1}");
        format!("{}{s}", t.strip_suffix(".0").unwrap_or(&t))
    } else {
        let t = format!("{x:.2}");
        format!("{}{s}", t.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// A log-axis range covering the positive finite values with a margin (factor `pad`).
pub fn log_range(values: impl IntoIterator<Item = f64>, pad: f64) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        if v.is_finite() && v > 0.0 {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        return None;
    }
    if hi <= lo * 1.0001 {
        return Some((lo / 2.0, hi * 2.0));
    }
    Some((lo / pad, hi * pad))
}

/// A linear range covering the finite values with a relative margin.
pub fn lin_range(values: impl IntoIterator<Item = f64>, margin: f64) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        return None;
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1e-3) };
    Some((lo - margin * span, hi + margin * span))
}

/// `n` points geometrically spaced on [lo, hi].
pub fn geomspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..n).map(|i| (lo.ln() + (hi.ln() - lo.ln()) * i as f64 / (n - 1).max(1) as f64).exp()).collect()
}

/// Percentile band of `f(sample, x)` over bootstrap `samples` at each `x` (level e.g. 0.95).
pub fn band(samples: &[Vec<f64>], xs: &[f64], level: f64, f: impl Fn(&[f64], f64) -> f64) -> Option<Vec<(f64, f64, f64)>> {
    if samples.len() < 10 {
        return None;
    }
    let q = (1.0 - level) / 2.0;
    Some(
        xs.iter()
            .map(|&x| {
                let mut v: Vec<f64> = samples.iter().map(|s| f(s, x)).filter(|v| v.is_finite()).collect();
                v.sort_by(f64::total_cmp);
                (x, crate::fit::bootstrap::quantile_sorted(&v, q), crate::fit::bootstrap::quantile_sorted(&v, 1.0 - q))
            })
            .collect(),
    )
}

/// Bootstrap samples stored by a law in `extra.bootstrap.samples` (rows of numbers).
pub fn stored_samples(result: &crate::fit::FitResult) -> Vec<Vec<f64>> {
    result.extra["bootstrap"]["samples"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r.as_array().map(|r| r.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect())).collect())
        .unwrap_or_default()
}

/// Bootstrap level from the options.
pub fn level(result: &crate::fit::FitResult) -> f64 {
    result.extra["bootstrap"]["level"].as_f64().unwrap_or(0.95)
}

/// Text style helper: the bundled family at `size` px.
pub fn font(size: f64) -> plotters::style::FontDesc<'static> {
    use plotters::style::IntoFont;
    (FAMILY, size).into_font()
}

/// Figure for an error-free "nothing to draw" case.
pub fn not_applicable(kind: &str, why: impl Into<String>) -> PlotError {
    PlotError::NotApplicable(kind.into(), why.into())
}

/// Keeps figures sorted by file name (stable report order).
pub fn sorted(mut v: Vec<Figure>) -> Vec<Figure> {
    v.sort_by(|a, b| a.png.cmp(&b.png));
    v
}
