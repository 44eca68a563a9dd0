//! One x–y chart builder shared by the plot kinds: linear or log axes, points, lines, dashed
//! lines, shaded bands and markers, a legend, labelled axes.

use super::common::{fmt_count, fmt_num, font, PlotDraw};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    Points(u32),
    Hollow(u32),
    Line(u32),
    Dashed(u32),
    /// Shaded band between `lo` and `hi` of [`Series::band`].
    Band,
    /// Large cross (optima, predictions).
    Cross(u32),
}

/// A series of the chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: Option<String>,
    pub color: RGBColor,
    pub style: Style,
    pub data: Vec<(f64, f64)>,
    /// (x, lo, hi) for [`Style::Band`].
    pub band: Vec<(f64, f64, f64)>,
}

impl Series {
    pub fn new(label: Option<String>, color: RGBColor, style: Style, data: Vec<(f64, f64)>) -> Self {
        let data = data.into_iter().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        Series { label, color, style, data, band: vec![] }
    }
    pub fn band(label: Option<String>, color: RGBColor, band: Vec<(f64, f64, f64)>) -> Self {
        let band = band.into_iter().filter(|(x, a, b)| x.is_finite() && a.is_finite() && b.is_finite()).collect();
        Series { label, color, style: Style::Band, data: vec![], band }
    }
}

/// Number format of an axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fmt {
    Num,
    /// Counts with K/M/B/T suffixes (parameters, tokens).
    Count,
}

/// A chart description.
#[derive(Clone, Debug)]
pub struct XySpec {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x: (f64, f64),
    pub y: (f64, f64),
    pub x_log: bool,
    pub y_log: bool,
    pub x_fmt: Fmt,
    pub y_fmt: Fmt,
    pub series: Vec<Series>,
    /// Legend position: true = upper right, false = lower left.
    pub legend_upper_right: bool,
}

impl XySpec {
    pub fn new(title: &str, x_label: &str, y_label: &str, x: (f64, f64), y: (f64, f64)) -> Self {
        XySpec {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x,
            y,
            x_log: false,
            y_log: false,
            x_fmt: Fmt::Num,
            y_fmt: Fmt::Num,
            series: vec![],
            legend_upper_right: true,
        }
    }
}

fn format(f: Fmt, v: f64) -> String {
    match f {
        Fmt::Num => fmt_num(v),
        Fmt::Count => fmt_count(v),
    }
}

/// Draws `spec` into `area`.
pub fn draw<DB>(area: &DrawingArea<DB, Shift>, spec: &XySpec) -> PlotDraw
where
    DB: DrawingBackend,
    DB::ErrorType: 'static + Send + Sync,
{
    // Log axes over less than a decade get few or no "nice" ticks: draw those linearly.
    let xl = spec.x_log && spec.x.1 / spec.x.0 >= 10.0;
    let yl = spec.y_log && spec.y.1 / spec.y.0 >= 10.0;
    // Log axes get labels at 1-2-5 (or 1-3, or decades) × 10^k, so a span of one or two decades
    // is labelled more than once (plotters' own log key points are decades only).
    let xlog = || (spec.x.0..spec.x.1).log_scale().with_key_points(log_ticks(spec.x.0, spec.x.1));
    let ylog = || (spec.y.0..spec.y.1).log_scale().with_key_points(log_ticks(spec.y.0, spec.y.1));
    match (xl, yl) {
        (false, false) => inner(area, spec, spec.x.0..spec.x.1, spec.y.0..spec.y.1),
        (true, false) => inner(area, spec, xlog(), spec.y.0..spec.y.1),
        (false, true) => inner(area, spec, spec.x.0..spec.x.1, ylog()),
        (true, true) => inner(area, spec, xlog(), ylog()),
    }
}

/// Tick positions for a log axis over `[lo, hi]` (`0 < lo < hi`): m·10^k inside the range with
/// m ∈ {1, 2, 5} up to 3 decades, {1, 3} up to 6, decades beyond (every other decade past 12),
/// so an axis carries roughly 4–12 labels.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo && hi.is_finite()) {
        return vec![];
    }
    let decades = (hi / lo).log10();
    let (mults, step): (&[f64], i32) = if decades <= 3.0 {
        (&[1.0, 2.0, 5.0], 1)
    } else if decades <= 6.0 {
        (&[1.0, 3.0], 1)
    } else if decades <= 12.0 {
        (&[1.0], 1)
    } else {
        (&[1.0], 2)
    };
    let (k0, k1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let mut v = Vec::new();
    for k in k0..=k1 {
        if step > 1 && k.rem_euclid(step) != 0 {
            continue;
        }
        for m in mults {
            let t = m * 10f64.powi(k);
            // Tolerate round-off at the ends (ranges often start exactly at a tick).
            if t >= lo * (1.0 - 1e-9) && t <= hi * (1.0 + 1e-9) {
                v.push(t);
            }
        }
    }
    v
}

fn inner<DB, XR, YR>(area: &DrawingArea<DB, Shift>, spec: &XySpec, xr: XR, yr: YR) -> PlotDraw
where
    DB: DrawingBackend,
    DB::ErrorType: 'static + Send + Sync,
    XR: AsRangedCoord<Value = f64>,
    YR: AsRangedCoord<Value = f64>,
    XR::CoordDescType: ValueFormatter<f64>,
    YR::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&spec.title, font(22.0))
        .margin(12)
        .x_label_area_size(52)
        .y_label_area_size(78)
        .build_cartesian_2d(xr, yr)?;
    let (xf, yf) = (spec.x_fmt, spec.y_fmt);
    chart
        .configure_mesh()
        .x_desc(spec.x_label.as_str())
        .y_desc(spec.y_label.as_str())
        .axis_desc_style(font(17.0))
        .label_style(font(14.0))
        .x_label_formatter(&|v| format(xf, *v))
        .y_label_formatter(&|v| format(yf, *v))
        .x_labels(8)
        .y_labels(8)
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;
    let mut any_label = false;
    for s in &spec.series {
        let c = s.color;
        let anno = match s.style {
            Style::Band => {
                if s.band.len() < 2 {
                    continue;
                }
                let mut poly: Vec<(f64, f64)> = s.band.iter().map(|(x, _, hi)| (*x, *hi)).collect();
                poly.extend(s.band.iter().rev().map(|(x, lo, _)| (*x, *lo)));
                chart.draw_series(std::iter::once(Polygon::new(poly, c.mix(0.18).filled())))?
            }
            Style::Points(r) => chart.draw_series(s.data.iter().map(|p| Circle::new(*p, r, c.mix(0.85).filled())))?,
            Style::Hollow(r) => chart.draw_series(s.data.iter().map(|p| Circle::new(*p, r, c.stroke_width(1))))?,
            Style::Line(w) => chart.draw_series(LineSeries::new(s.data.iter().copied(), c.stroke_width(w)))?,
            Style::Dashed(w) => chart.draw_series(DashedLineSeries::new(s.data.iter().copied(), 8, 5, c.stroke_width(w).into()))?,
            Style::Cross(r) => chart.draw_series(s.data.iter().map(|p| Cross::new(*p, r as i32, c.stroke_width(3))))?,
        };
        if let Some(l) = &s.label {
            any_label = true;
            let style = s.style;
            anno.label(l.as_str()).legend(move |(x, y)| -> DynElement<'static, DB, (i32, i32)> {
                match style {
                    Style::Points(_) => Circle::new((x + 8, y), 5, c.filled()).into_dyn(),
                    Style::Hollow(_) => Circle::new((x + 8, y), 5, c.stroke_width(1)).into_dyn(),
                    Style::Cross(_) => Cross::new((x + 8, y), 6, c.stroke_width(3)).into_dyn(),
                    Style::Band => Rectangle::new([(x, y - 5), (x + 16, y + 5)], c.mix(0.25).filled()).into_dyn(),
                    _ => PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)).into_dyn(),
                }
            });
        }
    }
    if any_label {
        chart
            .configure_series_labels()
            .position(if spec.legend_upper_right { SeriesLabelPosition::UpperRight } else { SeriesLabelPosition::LowerLeft })
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font(font(14.0))
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::log_ticks;

    #[test]
    fn log_ticks_label_short_and_long_ranges() {
        // 1.5 decades (the quickstart's compute axis): 1-2-5 ticks, more than one label.
        let t = log_ticks(3.0e10, 9.0e11);
        assert_eq!(t, vec![5.0e10, 1.0e11, 2.0e11, 5.0e11]);
        // 5 decades: 1-3 ticks, first and last inside the range.
        let t = log_ticks(1.0e17, 1.0e22);
        assert_eq!(t.len(), 11);
        assert_eq!((t[0], t[t.len() - 1]), (1.0e17, 1.0e22));
        // 20 decades: every other decade, still a handful.
        let t = log_ticks(1.0, 1.0e20);
        assert_eq!(t.len(), 11);
        assert!(log_ticks(2.0, 1.0).is_empty() && log_ticks(0.0, 1.0).is_empty());
    }
}
