//! Output: JSON files under the results directory, aligned plain-text tables, and latency-percentile
//! plots written as SVG by hand (no plotting dependency; the plot is a few polylines on a log axis).

use std::{
    fmt::{self, Write as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

/// A scenario that ran, or was skipped with the reason (not root, a tool missing).
#[derive(Debug)]
pub enum Outcome<R> {
    /// Why nothing ran.
    Skipped(String),
    /// The report.
    Done(Box<R>),
}

/// Writes `value` as pretty JSON to `dir/name`, creating `dir`.
pub fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create results directory {}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// A plain-text table with right-aligned columns after the first.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders as Markdown (for the README).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "| {} |", self.headers.join(" | "));
        let _ = writeln!(
            s,
            "|{}",
            self.headers
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut width = vec![0; cols];
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        for (n, r) in std::iter::once(&self.headers).chain(&self.rows).enumerate() {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i == 0 {
                    let _ = write!(line, "{c:<w$}", w = width[i]);
                } else {
                    let _ = write!(line, "  {c:>w$}", w = width[i]);
                }
            }
            writeln!(f, "{}", line.trim_end())?;
            if n == 0 {
                writeln!(
                    f,
                    "{}",
                    "-".repeat(width.iter().sum::<usize>() + 2 * cols.saturating_sub(1))
                )?;
            }
        }
        Ok(())
    }
}

/// Formats a number of milliseconds compactly.
pub fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2}s", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.3}ms")
    }
}

/// Formats a ratio (`x` over the baseline).
pub fn ratio(x: f64, base: f64) -> String {
    if base > 0.0 && x.is_finite() {
        format!("{:.2}x", x / base)
    } else {
        "-".into()
    }
}

/// One line of a percentile plot: its name and `(percentile, ms)` points.
pub type Series = (String, Vec<(f64, f64)>);

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn x_of(percentile: f64) -> f64 {
    // log10(1 / (1 - p)): 0 at p0, 1 at p90, 2 at p99, ... 5 at p99.999
    let tail = (1.0 - percentile / 100.0).max(1e-5);
    -tail.log10()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders a latency-by-percentile plot: one line per series of `(percentile, ms)` points; log-scaled
/// latency axis, percentile axis stretched towards the tail like HdrHistogram's own plots.
pub fn percentile_svg(title: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 440.0);
    let (left, right, top, bottom) = (70.0, 170.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let values = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .filter(|v| *v > 0.0);
    let (mut lo, mut hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        (lo, hi) = (0.01, 1.0);
    }
    let lo_dec = lo.log10().floor();
    let hi_dec = hi.log10().ceil().max(lo_dec + 1.0);
    let ymap = |v: f64| {
        let v = v.max(10f64.powf(lo_dec));
        top + ph - (v.log10() - lo_dec) / (hi_dec - lo_dec) * ph
    };
    let xmap = |p: f64| left + x_of(p) / 5.0 * pw;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    for (i, label) in ["p0", "p90", "p99", "p99.9", "p99.99", "p99.999"]
        .iter()
        .enumerate()
    {
        let x = left + i as f64 / 5.0 * pw;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            top + ph,
            top + ph + 18.0
        );
    }
    let mut d = lo_dec;
    while d <= hi_dec {
        let y = ymap(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            ms(10f64.powf(d))
        );
        d += 1.0;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">latency (log)</text>"#,
        left + pw / 2.0,
        h - 10.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = pts
            .iter()
            .map(|(p, v)| format!("{:.1},{:.1}", xmap(*p), ymap(*v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = top + 14.0 + 20.0 * i as f64;
        let lx = left + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(["target", "p50"]);
        t.row(["direct", "0.1ms"]);
        t.row(["quicmesh", "10.25ms"]);
        let out = t.to_string();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].ends_with("  0.1ms"), "{out}");
        assert_eq!(lines[2].len(), lines[3].len(), "{out}");
        assert!(t.markdown().contains("| quicmesh | 10.25ms |"));
    }

    #[test]
    fn svg_has_one_line_per_series_and_escapes_names() {
        let s = percentile_svg(
            "a <b>",
            &[
                ("direct".into(), vec![(0.0, 0.1), (99.0, 1.0)]),
                ("x&y".into(), vec![(0.0, 0.2), (99.9, 20.0)]),
            ],
        );
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("a &lt;b&gt;") && s.contains("x&amp;y"));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn formats() {
        assert_eq!(ms(0.0712), "0.071ms");
        assert_eq!(ms(1500.0), "1.50s");
        assert_eq!(ratio(3.0, 2.0), "1.50x");
        assert_eq!(ratio(3.0, 0.0), "-");
    }
}
