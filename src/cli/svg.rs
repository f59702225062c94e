//! The benchmark ratios as an SVG bar chart: one horizontal bar per figure on a log scale,
//! a line at 1 (as fast as the baseline), green where the target is met, red where it is not,
//! grey where there is none.

use std::fmt::Write as _;

use svmirror::app::report::{Figure, fmt_ratio};

const LEFT: f64 = 330.0;
const WIDTH: f64 = 460.0;
const ROW: f64 = 26.0;
const TOP: f64 = 48.0;
/// The log10 span of the axis: 10^-4 to 10^1.
const LO: f64 = -4.0;
const HI: f64 = 1.0;

fn x_of(ratio: f64) -> f64 {
    let l = ratio.max(1e-9).log10().clamp(LO, HI);
    LEFT + (l - LO) / (HI - LO) * WIDTH
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart of `figures`' ratios.
pub(crate) fn chart(figures: &[Figure]) -> String {
    let height = TOP + ROW * figures.len() as f64 + 40.0;
    let total = LEFT + WIDTH + 90.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height}" viewBox="0 0 {total} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">svmirror bench: each figure against its baseline (ratio, log scale; above 1 the device is faster)</text>"#
    );
    let axis_y = TOP + ROW * figures.len() as f64;
    for p in (LO as i32)..=(HI as i32) {
        let x = x_of(10f64.powi(p));
        let label = if p >= 0 {
            format!("{}", 10i64.pow(p as u32))
        } else {
            format!("1e{p}")
        };
        let (stroke, w) = if p == 0 { ("#333", 1.5) } else { ("#ddd", 1.0) };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{axis_y}" stroke="{stroke}" stroke-width="{w}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{label}×</text>"##,
            axis_y + 16.0
        );
    }
    for (i, f) in figures.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let color = match f.met {
            Some(true) => "#3a9a4a",
            Some(false) => "#c8453c",
            None => "#7d8ea3",
        };
        let x0 = x_of(10f64.powf(LO));
        let x1 = x_of(f.ratio);
        let label = escape(&format!("{} · {}", f.backend, f.name));
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text><rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" fill="#333">{}</text>"##,
            LEFT - 8.0,
            y + 16.0,
            y + 5.0,
            (x1 - x0).max(1.0),
            ROW - 10.0,
            x1 + 5.0,
            y + 16.0,
            fmt_ratio(f.ratio)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_grow_with_the_ratio_and_labels_are_escaped() {
        let figs = vec![
            Figure::rate("sim", "a<b", 1.0, "B/s", "memcpy", 10.0),
            Figure::rate("sim", "c", 10.0, "B/s", "memcpy", 10.0),
        ];
        let svg = chart(&figs);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("a&lt;b"));
        assert!(x_of(0.1) < x_of(1.0));
        assert!((x_of(1e-4) - LEFT).abs() < 1e-9);
        assert!((x_of(1e3) - (LEFT + WIDTH)).abs() < 1e-9, "clamped");
    }
}
