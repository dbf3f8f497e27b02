//! A small SVG writer for the latency plot: one panel per latency workload,
//! latency (µs) against percentile on a log scale of "nines", one curve per
//! mode (the way latency distributions are usually shown: the tail gets as
//! much room as the median).

use std::fmt::Write as _;

use crate::stats::percentile;

/// One curve: a label, a colour and the sorted samples (ns).
pub struct Curve<'a> {
    /// Legend label.
    pub label: &'a str,
    /// SVG colour.
    pub color: &'a str,
    /// Sorted latency samples, ns.
    pub sorted_ns: &'a [u32],
}

/// One panel.
pub struct Panel<'a> {
    /// Panel title.
    pub title: &'a str,
    /// Its curves.
    pub curves: Vec<Curve<'a>>,
}

/// Highest "nines" shown: 4 = the 99.99th percentile.
const MAX_NINES: f64 = 4.0;
const PANEL_W: f64 = 520.0;
const PANEL_H: f64 = 360.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// The percentile (0-100) at `nines` on the x axis.
fn pct_at(nines: f64) -> f64 {
    (1.0 - 10f64.powf(-nines)) * 100.0
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The y range in µs: whole decades around every curve's samples from
/// the fastest to the 99.99th percentile.
fn y_range(panel: &Panel<'_>) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi: f64 = 0.0;
    for c in panel.curves.iter().filter(|c| !c.sorted_ns.is_empty()) {
        lo = lo.min(c.sorted_ns[0] as f64 / 1e3);
        hi = hi.max(percentile(c.sorted_ns, pct_at(MAX_NINES)) as f64 / 1e3);
    }
    if !lo.is_finite() || hi <= 0.0 {
        return (1.0, 10.0);
    }
    let lo = 10f64.powf(lo.max(1e-3).log10().floor());
    let hi = 10f64.powf(hi.max(lo * 1.001).log10().ceil());
    (lo, hi)
}

/// Ticks at 1, 2 and 5 times each power of ten within `lo..=hi`.
fn y_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = lo;
    while decade <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v <= hi * 1.0001 {
                ticks.push(v);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// Renders `panels` side by side as an SVG document.
pub fn latency_svg(title: &str, panels: &[Panel<'_>]) -> String {
    let width = PANEL_W * panels.len().max(1) as f64;
    let height = PANEL_H + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        esc(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut s, panel, i as f64 * PANEL_W, 30.0);
    }
    s.push_str("</svg>\n");
    s
}

fn draw_panel(s: &mut String, panel: &Panel<'_>, ox: f64, oy: f64) {
    let (x0, x1) = (ox + LEFT, ox + PANEL_W - RIGHT);
    let (y0, y1) = (oy + PANEL_H - BOTTOM, oy + TOP);
    // y axis: logarithmic, whole decades from below the fastest sample
    // to above the slowest shown (the 99.99th percentile), so the body of
    // the distribution and its tail are both readable.
    let (lo, hi) = y_range(panel);
    let xp = |nines: f64| x0 + (x1 - x0) * nines / MAX_NINES;
    let yp = |us: f64| {
        let f = (us.clamp(lo, hi).log10() - lo.log10()) / (hi.log10() - lo.log10());
        y0 - (y0 - y1) * f
    };

    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
        (x0 + x1) / 2.0,
        oy + 22.0,
        esc(panel.title)
    );
    // Grid and axes.
    for v in y_ticks(lo, hi) {
        let y = yp(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 5.0,
            y + 4.0,
            trim_float(v)
        );
    }
    for (nines, label) in [
        (0.0, "0"),
        (std::f64::consts::LOG10_2, "50"),
        (1.0, "90"),
        (2.0, "99"),
        (3.0, "99.9"),
        (4.0, "99.99"),
    ] {
        let x = xp(nines);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            y0 + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        x1 - x0,
        y0 - y1
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        (x0 + x1) / 2.0,
        y0 + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">latency (µs, log scale)</text>"#,
        ox + 16.0,
        (y0 + y1) / 2.0
    );
    // Curves.
    const POINTS: usize = 400;
    for (ci, c) in panel.curves.iter().enumerate() {
        if c.sorted_ns.is_empty() {
            continue;
        }
        let mut pts = String::new();
        for k in 0..=POINTS {
            let nines = MAX_NINES * k as f64 / POINTS as f64;
            let us = percentile(c.sorted_ns, pct_at(nines)) as f64 / 1e3;
            let _ = write!(pts, "{:.1},{:.1} ", xp(nines), yp(us));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            c.color,
            pts.trim_end()
        );
        let ly = y1 + 16.0 + 16.0 * ci as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{} p50 {:.1} µs · p99 {:.1} µs</text>"#,
            x0 + 8.0,
            x0 + 28.0,
            c.color,
            x0 + 34.0,
            ly + 4.0,
            esc(c.label),
            percentile(c.sorted_ns, 50.0) as f64 / 1e3,
            percentile(c.sorted_ns, 99.0) as f64 / 1e3,
        );
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axis() {
        assert_eq!(
            y_ticks(1.0, 100.0),
            [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        let a: Vec<u32> = vec![12_000, 15_000, 900_000];
        let p = Panel {
            title: "",
            curves: vec![Curve {
                label: "x",
                color: "#000",
                sorted_ns: &a,
            }],
        };
        assert_eq!(y_range(&p), (10.0, 1000.0));
        assert!((pct_at(2.0) - 99.0).abs() < 1e-9);
    }

    #[test]
    fn renders_a_well_formed_document() {
        let a: Vec<u32> = (1..=10_000).map(|v| v * 10).collect();
        let svg = latency_svg(
            "t & t",
            &[Panel {
                title: "p",
                curves: vec![
                    Curve {
                        label: "weir",
                        color: "#1f77b4",
                        sorted_ns: &a,
                    },
                    Curve {
                        label: "empty",
                        color: "#000",
                        sorted_ns: &[],
                    },
                ],
            }],
        );
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &amp; t"));
        assert_eq!(svg.matches("<polyline").count(), 1);
    }
}
