//! Small SVG charts rendered on the server for the dashboard: lines or bars
//! (stacked or side by side) over one category per round, on a linear or
//! logarithmic y axis. No script and no external assets: the page is
//! readable as served, and hovering a point shows its value through SVG's
//! own `<title>` tooltips.

use std::fmt::Write;

/// Escapes text for HTML and SVG element content and quoted attribute
/// values (the dashboard uses it for its pages too).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 34.0;
/// At most this many x labels; the others are skipped evenly.
const MAX_X_LABELS: usize = 12;

/// How a chart draws its series.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    Lines,
    /// Bars of each category on top of each other (counts that add up).
    StackedBars,
    /// Bars of each category side by side (quantities to compare).
    GroupedBars,
}

/// One named series: a value (or a gap) per category.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    /// A CSS colour.
    pub color: &'static str,
    pub values: Vec<Option<f64>>,
}

/// A chart over categories (rounds) on the x axis.
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    pub style: Style,
    /// A log10 y axis (for quantities that differ by orders of magnitude).
    pub log_y: bool,
    /// Formats a y value for ticks and tooltips.
    pub format: fn(f64) -> String,
}

/// A round number on an axis: 1, 2, 5 × 10^k at or above `x`.
fn nice_step(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let power = 10f64.powf(x.log10().floor());
    let fraction = x / power;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

/// The y range and tick values.
struct Axis {
    low: f64,
    high: f64,
    ticks: Vec<f64>,
    log: bool,
}

impl Axis {
    fn linear(min: f64, max: f64, from_zero: bool) -> Axis {
        let (mut low, mut high) = if from_zero {
            (min.min(0.0), max.max(0.0))
        } else {
            (min, max)
        };
        if (high - low).abs() < 1e-12 {
            high += 1.0;
            if !from_zero {
                low -= 1.0;
            }
        }
        let step = nice_step((high - low) / 4.0);
        low = (low / step).floor() * step;
        high = (high / step).ceil() * step;
        let ticks = (0..=((high - low) / step).round() as usize)
            .map(|i| low + step * i as f64)
            .collect();
        Axis {
            low,
            high,
            ticks,
            log: false,
        }
    }

    fn log(min: f64, max: f64) -> Axis {
        let low = min.max(1e-300).log10().floor();
        let high = max.max(1e-300).log10().ceil().max(low + 1.0);
        // Every decade when few, else every other one.
        let stride = if high - low > 8.0 { 2.0 } else { 1.0 };
        let mut ticks = Vec::new();
        let mut t = low;
        while t <= high + 1e-9 {
            ticks.push(10f64.powf(t));
            t += stride;
        }
        Axis {
            low,
            high,
            ticks,
            log: true,
        }
    }

    /// The value's height as a fraction of the plot, 0 at the bottom.
    fn fraction(&self, v: f64) -> f64 {
        let v = if self.log { v.max(1e-300).log10() } else { v };
        ((v - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
    }
}

impl Chart {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" xmlns="http://www.w3.org/2000/svg"><title>{}</title>"#,
            escape(&self.title)
        );
        let _ = write!(
            out,
            r#"<text x="{LEFT}" y="16" class="chart-title">{}</text>"#,
            escape(&self.title)
        );
        self.legend(&mut out);
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let n = self.categories.len();
        let Some(axis) = self.axis() else {
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" class="chart-empty" text-anchor="middle">no data yet</text></svg>"#,
                LEFT + plot_w / 2.0,
                TOP + plot_h / 2.0
            );
            return out;
        };
        let y_of = |v: f64| TOP + plot_h * (1.0 - axis.fraction(v));
        // Grid and y ticks.
        for &t in &axis.ticks {
            let y = y_of(t);
            let _ = write!(
                out,
                r#"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                escape(&(self.format)(t))
            );
        }
        // X labels, thinned to at most MAX_X_LABELS.
        let band = plot_w / n.max(1) as f64;
        let x_of = |i: usize| LEFT + band * (i as f64 + 0.5);
        let every = n.div_ceil(MAX_X_LABELS).max(1);
        for (i, label) in self.categories.iter().enumerate() {
            // The last category gets a label too, unless one stands close by.
            let last = i + 1 == n && (i % every) * 2 >= every;
            if i % every == 0 || last {
                let _ = write!(
                    out,
                    r#"<text x="{:.1}" y="{}" class="tick" text-anchor="middle">{}</text>"#,
                    x_of(i),
                    HEIGHT - BOTTOM + 15.0,
                    escape(label)
                );
            }
        }
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" class="axis-label" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 4.0,
            escape(&self.x_label)
        );
        let _ = write!(
            out,
            r#"<line x1="{LEFT}" x2="{}" y1="{:.1}" y2="{:.1}" class="axis"/>"#,
            WIDTH - RIGHT,
            TOP + plot_h,
            TOP + plot_h
        );
        match self.style {
            Style::Lines => self.lines(&mut out, x_of, y_of),
            Style::StackedBars | Style::GroupedBars => {
                self.bars(&mut out, band, x_of, y_of, y_of(axis.bottom()))
            }
        }
        out.push_str("</svg>");
        out
    }

    fn legend(&self, out: &mut String) {
        // Right-aligned: lay out from the right edge leftwards.
        let mut x = WIDTH - RIGHT;
        for s in self.series.iter().rev() {
            let text_w = 6.5 * s.name.chars().count() as f64;
            x -= text_w + 18.0;
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="7" width="10" height="10" fill="{}"/><text x="{:.1}" y="16" class="legend">{}</text>"#,
                s.color,
                x + 14.0,
                escape(&s.name)
            );
        }
    }

    /// Every finite value the chart plots (bar stacks as their sums).
    fn extent(&self) -> Option<(f64, f64)> {
        let mut values: Vec<f64> = Vec::new();
        if self.style == Style::StackedBars {
            for i in 0..self.categories.len() {
                let sum: f64 = self
                    .series
                    .iter()
                    .filter_map(|s| s.values.get(i).copied().flatten())
                    .filter(|v| v.is_finite())
                    .sum();
                values.push(sum);
            }
        } else {
            values.extend(
                self.series
                    .iter()
                    .flat_map(|s| s.values.iter().copied().flatten()),
            );
        }
        values.retain(|v| v.is_finite() && (!self.log_y || *v > 0.0));
        let min = values.iter().copied().reduce(f64::min)?;
        let max = values.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }

    fn axis(&self) -> Option<Axis> {
        if self.categories.is_empty() {
            return None;
        }
        let (min, max) = self.extent()?;
        Some(if self.log_y {
            Axis::log(min, max)
        } else {
            Axis::linear(min, max, self.style != Style::Lines)
        })
    }

    fn lines(&self, out: &mut String, x_of: impl Fn(usize) -> f64, y_of: impl Fn(f64) -> f64) {
        for s in &self.series {
            // A gap (None) breaks the line into separate runs.
            let mut path = String::new();
            let mut pen_down = false;
            for (i, v) in s.values.iter().enumerate() {
                match v.filter(|v| v.is_finite()) {
                    Some(v) => {
                        let _ = write!(
                            path,
                            "{}{:.1},{:.1} ",
                            if pen_down { "L" } else { "M" },
                            x_of(i),
                            y_of(v)
                        );
                        pen_down = true;
                    }
                    None => pen_down = false,
                }
            }
            if !path.is_empty() {
                let _ = write!(
                    out,
                    r#"<path d="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                    path.trim_end(),
                    s.color
                );
            }
            for (i, v) in s.values.iter().enumerate() {
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    let _ = write!(
                        out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"><title>{} {}: {}</title></circle>"#,
                        x_of(i),
                        y_of(v),
                        s.color,
                        escape(&s.name),
                        escape(self.categories.get(i).map_or("", |c| c.as_str())),
                        escape(&(self.format)(v))
                    );
                }
            }
        }
    }

    fn bars(
        &self,
        out: &mut String,
        band: f64,
        x_of: impl Fn(usize) -> f64,
        y_of: impl Fn(f64) -> f64,
        baseline: f64,
    ) {
        let groups = self.series.len().max(1) as f64;
        let bar_w = (band * 0.7).max(1.0);
        for i in 0..self.categories.len() {
            let mut stacked = 0.0;
            for (k, s) in self.series.iter().enumerate() {
                let Some(v) = s.values.get(i).copied().flatten().filter(|v| v.is_finite()) else {
                    continue;
                };
                let (x, w, top, bottom) = match self.style {
                    Style::StackedBars => {
                        let bottom = y_of(stacked);
                        stacked += v;
                        (x_of(i) - bar_w / 2.0, bar_w, y_of(stacked), bottom)
                    }
                    _ => {
                        let w = bar_w / groups;
                        (x_of(i) - bar_w / 2.0 + w * k as f64, w, y_of(v), baseline)
                    }
                };
                if bottom - top <= 0.0 {
                    continue;
                }
                let _ = write!(
                    out,
                    r#"<rect x="{x:.1}" y="{top:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{} {}: {}</title></rect>"#,
                    bottom - top,
                    s.color,
                    escape(&s.name),
                    escape(self.categories.get(i).map_or("", |c| c.as_str())),
                    escape(&(self.format)(v))
                );
            }
        }
    }
}

impl Axis {
    /// The value at the bottom of the plot.
    fn bottom(&self) -> f64 {
        if self.log {
            10f64.powf(self.low)
        } else {
            self.low
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(style: Style, log_y: bool, values: Vec<Option<f64>>) -> Chart {
        Chart {
            title: "t <b>".into(),
            x_label: "round".into(),
            categories: (0..values.len()).map(|i| i.to_string()).collect(),
            series: vec![Series {
                name: "s&".into(),
                color: "#123",
                values,
            }],
            style,
            log_y,
            format: |v| format!("{v}"),
        }
    }

    #[test]
    fn charts_render_every_style_escaped_and_survive_odd_data() {
        for style in [Style::Lines, Style::StackedBars, Style::GroupedBars] {
            for log_y in [false, true] {
                let svg = chart(
                    style,
                    log_y,
                    vec![Some(1.0), None, Some(1e6), Some(f64::NAN)],
                )
                .render();
                assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
                assert!(
                    svg.contains("t &lt;b&gt;") && svg.contains("s&amp;"),
                    "{svg}"
                );
                assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
                let empty = chart(style, log_y, vec![]).render();
                assert!(empty.contains("no data yet"));
                let flat = chart(style, log_y, vec![Some(0.0), Some(0.0)]).render();
                assert!(!flat.contains("NaN"), "{flat}");
            }
        }
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(7.0), 10.0);
        let axis = Axis::linear(2.2, 4.9, false);
        assert_eq!((axis.low, axis.high), (2.0, 5.0));
        let log = Axis::log(3e3, 2e9);
        assert_eq!((log.low, log.high), (3.0, 10.0));
    }
}
