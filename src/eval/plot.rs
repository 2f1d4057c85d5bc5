//! Small self-contained SVG charts for evaluation results: lines with error bars
//! (reward vs α), stacked in panels for scores on different scales, and a scatter with
//! its Pareto front (two objectives).

use std::fmt::Write;

const W: f64 = 560.0;
const H: f64 = 380.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;

/// A series of (x, y, ±error) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64, f64)>,
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn around(
        xs: impl Iterator<Item = f64> + Clone,
        ys: impl Iterator<Item = f64> + Clone,
    ) -> Self {
        let (mut x0, mut x1) = bounds(xs);
        let (mut y0, mut y1) = bounds(ys);
        // Pad so points never sit on the axes; a flat range gets a unit span.
        let pad = |lo: &mut f64, hi: &mut f64| {
            let span = if *hi > *lo { *hi - *lo } else { 1.0 };
            *lo -= 0.08 * span;
            *hi += 0.08 * span;
        };
        pad(&mut x0, &mut x1);
        pad(&mut y0, &mut y1);
        Self { x0, x1, y0, y1 }
    }

    fn x(&self, v: f64) -> f64 {
        LEFT + (v - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)
    }

    fn y(&self, v: f64) -> f64 {
        H - BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (H - TOP - BOTTOM)
    }

    /// Axes, ticks and labels.
    fn axes(&self, svg: &mut String, title: &str, x_label: &str, y_label: &str) {
        let _ = write!(
            svg,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
            W / 2.0,
            escape(title)
        );
        let _ = write!(
            svg,
            r#"<line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="black"/>"#,
            b = H - BOTTOM,
            r = W - RIGHT
        );
        for i in 0..=4 {
            let f = i as f64 / 4.0;
            let xv = self.x0 + f * (self.x1 - self.x0);
            let yv = self.y0 + f * (self.y1 - self.y0);
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                self.x(xv),
                H - BOTTOM + 16.0,
                tick(xv)
            );
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"#,
                LEFT - 6.0,
                self.y(yv) + 4.0,
                tick(yv)
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            H - 14.0,
            escape(x_label)
        );
        let _ = write!(
            svg,
            r#"<text x="16" y="{}" text-anchor="middle" font-size="13" transform="rotate(-90 16 {})">{}</text>"#,
            (TOP + H - BOTTOM) / 2.0,
            (TOP + H - BOTTOM) / 2.0,
            escape(y_label)
        );
    }
}

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// Lines with 95% error bars, e.g. mean reward against α, one series per objective.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let frame = Frame::around(
        all().map(|p| p.0),
        all().flat_map(|p| [p.1 - finite_or_zero(p.2), p.1 + finite_or_zero(p.2)]),
    );
    let mut svg = header();
    frame.axes(&mut svg, title, x_label, y_label);
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", frame.x(p.0), frame.y(p.1)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for &(x, y, e) in &s.points {
            let e = finite_or_zero(e);
            let _ = write!(
                svg,
                r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="{colour}"/><circle cx="{cx:.1}" cy="{:.1}" r="3.5" fill="{colour}"/>"#,
                frame.y(y - e),
                frame.y(y + e),
                frame.y(y),
                cx = frame.x(x)
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="12" fill="{colour}">{}</text>"#,
            LEFT + 10.0,
            TOP + 14.0 + 16.0 * i as f64,
            escape(&s.label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// One [`line_chart`] per panel, stacked top to bottom, each with its own y axis: for
/// scores on different scales (a length in tokens beside a sentiment sum). A panel is
/// its y label and its series; `title` heads the first.
pub fn line_panels(title: &str, x_label: &str, panels: &[(String, Vec<Series>)]) -> String {
    let height = H * panels.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif">"#
    );
    for (i, (y_label, series)) in panels.iter().enumerate() {
        let chart = line_chart(if i == 0 { title } else { "" }, x_label, y_label, series);
        // Each panel is a nested <svg>, placed by its y.
        svg.push_str(&chart.replacen("<svg ", &format!(r#"<svg y="{}" "#, H * i as f64), 1));
    }
    svg.push_str("</svg>\n");
    svg
}

/// All points, with the Pareto front connected; the front's points and the first
/// point (the reference setting) are labelled, the others only drawn, so a crowded
/// dominated corner stays legible.
pub fn pareto_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[((f64, f64), String)],
    front: &[(f64, f64)],
) -> String {
    let frame = Frame::around(points.iter().map(|p| p.0 .0), points.iter().map(|p| p.0 .1));
    let mut svg = header();
    frame.axes(&mut svg, title, x_label, y_label);
    let path: Vec<String> = front
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", frame.x(x), frame.y(y)))
        .collect();
    let _ = write!(
        svg,
        r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
        COLOURS[1],
        path.join(" ")
    );
    for (i, ((x, y), label)) in points.iter().enumerate() {
        let on_front = front.contains(&(*x, *y));
        let _ = write!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}"/>"#,
            frame.x(*x),
            frame.y(*y),
            if on_front { COLOURS[1] } else { COLOURS[0] },
        );
        if on_front || i == 0 {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                frame.x(*x) + 6.0,
                frame.y(*y) - 4.0,
                escape(label)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn header() -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#
    )
}

fn bounds(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

fn finite_or_zero(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg() {
        let s = line_chart(
            "reward vs α",
            "α",
            "score",
            &[Series {
                label: "positive <vader>".into(),
                points: vec![(0.0, 0.1, 0.02), (1.0, 0.4, f64::NAN), (2.0, 0.6, 0.05)],
            }],
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("&lt;vader&gt;"));
        assert_eq!(s.matches("<circle").count(), 3);
        let p = pareto_chart(
            "front",
            "a",
            "b",
            &[((0.0, 1.0), "x".into()), ((1.0, 0.0), "y".into())],
            &[(0.0, 1.0), (1.0, 0.0)],
        );
        assert_eq!(p.matches("<circle").count(), 2);
        // The dominated point is drawn, not labelled; the reference (first) is labelled.
        let p = pareto_chart(
            "front",
            "a",
            "b",
            &[
                ((0.0, 0.0), "ref".into()),
                ((1.0, 1.0), "best".into()),
                ((0.5, 0.2), "dominated".into()),
            ],
            &[(1.0, 1.0)],
        );
        assert_eq!(p.matches("<circle").count(), 3);
        assert!(p.contains(">ref<") && p.contains(">best<") && !p.contains("dominated"));
        let panels = line_panels(
            "reward vs α",
            "α",
            &[("length".into(), vec![]), ("sentiment".into(), vec![])],
        );
        assert_eq!(panels.matches("<svg").count(), 3);
        assert!(panels.contains(r#"<svg y="380" "#) && panels.trim_end().ends_with("</svg>"));
    }
}
