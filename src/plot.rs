//! Latency percentile plots as SVG: one curve per stage, percentile on a "nines" axis (0, 90,
//! 99, 99.9, ...) so the tail gets as much room as the body, latency on a log axis.

use std::fmt::Write;

use hdrhistogram::Histogram;

/// One curve: a label and its histogram, whose values are clock ticks at `hz`.
pub struct Curve<'a> {
    pub label: &'a str,
    pub histogram: &'a Histogram<u64>,
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];
/// Percentiles sampled along each curve.
const PERCENTILES: [f64; 21] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 98.0, 99.0, 99.5, 99.8, 99.9, 99.95, 99.98, 99.99,
    99.995, 99.998, 99.999, 99.9995, 99.9998, 99.9999,
];

/// The "nines" of a percentile: 90 -> 1, 99 -> 2, 99.9 -> 3.
fn nines(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).max(1e-9).log10()
}

fn label_ns(ns: f64) -> String {
    match ns {
        ns if ns >= 1e9 => format!("{:.0}s", ns / 1e9),
        ns if ns >= 1e6 => format!("{:.0}ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.0}us", ns / 1e3),
        ns => format!("{ns:.0}ns"),
    }
}

/// The SVG document.
pub fn percentile_svg(title: &str, curves: &[Curve], hz: u64) -> String {
    let to_ns = 1e9 / hz as f64;
    // Each curve ends at the percentile its sample count can still resolve.
    let series: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .filter(|curve| !curve.histogram.is_empty())
        .map(|curve| {
            let resolvable = 100.0 * (1.0 - 1.0 / curve.histogram.len() as f64);
            let points = PERCENTILES
                .iter()
                .filter(|&&p| p <= resolvable)
                .map(|&p| {
                    (
                        nines(p),
                        curve.histogram.value_at_percentile(p) as f64 * to_ns,
                    )
                })
                .collect();
            (curve.label, points)
        })
        .collect();
    let x_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        .ceil();
    let positive = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .filter(|&ns| ns > 0.0);
    let (low, high) = positive.fold((f64::MAX, 1.0f64), |(low, high), ns| {
        (low.min(ns), high.max(ns))
    });
    let y_min = 10f64.powf(low.min(high).log10().floor()).max(1.0);
    let y_max = 10f64.powf(high.log10().ceil()).max(y_min * 10.0);
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let x = |n: f64| LEFT + n / x_max * plot_width;
    let y = |ns: f64| {
        TOP + plot_height
            - (ns.max(y_min).log10() - y_min.log10()) / (y_max.log10() - y_min.log10())
                * plot_height
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
        LEFT + plot_width / 2.0,
        escape(title)
    );
    // Vertical grid: 0, 90, 99, 99.9 ... percentiles.
    for nine in 0..=x_max as usize {
        let label = match nine {
            0 => "0".to_string(),
            n => format!("{}", 100.0 - 100.0 / 10f64.powi(n as i32)),
        };
        let px = x(nine as f64);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            TOP + plot_height
        );
        let _ = writeln!(
            svg,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + plot_height + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_width / 2.0,
        HEIGHT - 14.0
    );
    // Horizontal grid: decades of latency.
    let mut decade = y_min;
    while decade <= y_max * 1.001 {
        let py = y(decade);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/>"##,
            LEFT + plot_width
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            py + 4.0,
            label_ns(decade)
        );
        decade *= 10.0;
    }
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">latency</text>"#,
        TOP + plot_height / 2.0,
        TOP + plot_height / 2.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_width:.1}" height="{plot_height:.1}" fill="none" stroke="#888"/>"##
    );
    for (index, (label, points)) in series.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let coordinates: Vec<String> = points
            .iter()
            .map(|&(n, ns)| format!("{:.1},{:.1}", x(n), y(ns)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            coordinates.join(" "),
            escape(label)
        );
        let legend_y = TOP + 10.0 + 20.0 * index as f64;
        let legend_x = LEFT + plot_width + 16.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{legend_x:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{color}" stroke-width="3"/>"#,
            legend_x + 22.0
        );
        let p50 = points
            .iter()
            .find(|p| p.0 >= nines(50.0))
            .map(|p| p.1)
            .unwrap_or(0.0);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{} (p50 {})</text>"#,
            legend_x + 28.0,
            legend_y + 4.0,
            escape(label),
            label_ns(p50)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
