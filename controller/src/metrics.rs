//! The controller's own `/metrics` (Prometheus text format): the mesh's golden metrics as the
//! proxies' reports give them, and the controller's counters about itself.
//!
//! A Prometheus that scrapes only the controller gets every service's and edge's req/s, success
//! rate, latency quantiles, TCP connections and mTLS share over the last minute (the 1 m window of
//! [`crate::stats`]; longer ranges are Prometheus's job), without scraping every proxy; plus what
//! the operator of the controller needs: reports accepted and refused by reason, the edges held
//! against their bound and the bytes they take, connected proxies and open taps.
//!
//! Rendering is a pure function of a [`Scrape`] (unit-tested); `server.rs` only serves it. Served
//! without a token, like the proxies' `/metrics`: bind it where only the scraper reaches
//! (`--metrics-addr`, off by default).

use std::{collections::BTreeMap, fmt::Write};

use crate::stats::{Figures, REFUSAL_REASONS};

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything one scrape shows.
#[derive(Debug, Default)]
pub struct Scrape<'a> {
    /// Window the figures cover, seconds.
    pub window_seconds: u32,
    /// Per service.
    pub services: &'a [Figures],
    /// Per edge.
    pub edges: &'a [Figures],
    /// Reports accepted.
    pub reports_accepted: u64,
    /// Reports and edges refused, by reason.
    pub reports_refused: Option<&'a BTreeMap<&'static str, u64>>,
    /// Edges held, and their bound.
    pub edges_held: usize,
    /// Bound on edges.
    pub edges_max: usize,
    /// Estimated bytes the statistics take.
    pub stats_bytes: usize,
    /// Proxies with a Watch stream open.
    pub proxies_connected: usize,
    /// Operators' taps open.
    pub tap_subscribers: usize,
}

/// A label value escaped for the text format (backslash, double quote, newline).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One family over figures: `value` of each row, labelled by `labels` of the row.
fn family(
    out: &mut String,
    name: &str,
    help: &str,
    rows: &[Figures],
    labels: &dyn Fn(&Figures) -> String,
    value: &dyn Fn(&Figures) -> f64,
) {
    header(out, name, "gauge", help);
    for f in rows {
        let _ = writeln!(out, "{name}{{{}}} {}", labels(f), value(f));
    }
}

/// Families for services (`edge` false) or edges.
fn golden(out: &mut String, scope: &str, rows: &[Figures], edge: bool, window: u32) {
    let labels = move |f: &Figures| {
        let mut l = format!(
            "service=\"{}\",direction=\"{}\"",
            escape(&f.service),
            f.side.as_str()
        );
        if edge {
            let _ = write!(l, ",source=\"{}\"", escape(&f.source));
        }
        l
    };
    let p = format!("quicmesh_controller_{scope}");
    family(
        out,
        &format!("{p}_requests"),
        &format!("Requests finished in the last {window} s"),
        rows,
        &labels,
        &|f| f.agg.requests as f64,
    );
    family(
        out,
        &format!("{p}_requests_per_second"),
        &format!("Requests per second over the last {window} s"),
        rows,
        &labels,
        &|f| f.rps,
    );
    family(
        out,
        &format!("{p}_success_rate"),
        "Share of finished requests that succeeded (0 without requests)",
        rows,
        &labels,
        &|f| f.success_rate(),
    );
    let name = format!("{p}_latency_seconds");
    header(
        out,
        &name,
        "gauge",
        "Request latency quantiles, head to head, as the counting proxy measured it",
    );
    for f in rows.iter().filter(|f| f.agg.requests > 0) {
        for q in ["0.5", "0.95", "0.99"] {
            let qv: f64 = q.parse().unwrap_or(0.5);
            let _ = writeln!(
                out,
                "{name}{{{},quantile=\"{q}\"}} {}",
                labels(f),
                f.quantile_ms(qv) / 1000.0
            );
        }
    }
    family(
        out,
        &format!("{p}_tcp_connections_open"),
        "Opaque TCP connections open now",
        rows,
        &labels,
        &|f| f.tcp_open as f64,
    );
    family(
        out,
        &format!("{p}_mtls_share"),
        "Share of requests and connections that crossed an mTLS hop between proxies",
        rows,
        &labels,
        &|f| f.mtls_share(),
    );
}

/// The text exposition of `s`.
pub fn render(s: &Scrape<'_>) -> String {
    let mut out = String::with_capacity(1024 + 1024 * (s.services.len() + s.edges.len()));
    golden(&mut out, "service", s.services, false, s.window_seconds);
    golden(&mut out, "edge", s.edges, true, s.window_seconds);

    let name = "quicmesh_controller_reports_accepted_total";
    header(&mut out, name, "counter", "Traffic reports accepted");
    let _ = writeln!(out, "{name} {}", s.reports_accepted);
    let name = "quicmesh_controller_reports_refused_total";
    header(
        &mut out,
        name,
        "counter",
        "Traffic reports (or edges of them, edges_full) refused, by reason",
    );
    let empty = BTreeMap::new();
    let refused = s.reports_refused.unwrap_or(&empty);
    let mut reasons: BTreeMap<&str, u64> = REFUSAL_REASONS.iter().map(|r| (*r, 0)).collect();
    for (r, n) in refused {
        *reasons.entry(r).or_default() += n;
    }
    for (r, n) in reasons {
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {n}", escape(r));
    }
    for (name, help, v) in [
        (
            "quicmesh_controller_stats_edges",
            "Edges the statistics hold",
            s.edges_held,
        ),
        (
            "quicmesh_controller_stats_edges_max",
            "Most edges the statistics hold",
            s.edges_max,
        ),
        (
            "quicmesh_controller_stats_bytes",
            "Bytes the statistics take (estimated from sizes and capacities)",
            s.stats_bytes,
        ),
        (
            "quicmesh_controller_proxies_connected",
            "Proxies with a Watch stream open",
            s.proxies_connected,
        ),
        (
            "quicmesh_controller_tap_subscribers",
            "Operators' taps open",
            s.tap_subscribers,
        ),
    ] {
        header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Agg, Side};

    fn fig(service: &str, source: &str, requests: u64, successes: u64) -> Figures {
        Figures {
            service: service.into(),
            source: source.into(),
            side: Side::Outbound,
            agg: Agg {
                requests,
                successes,
                mtls: requests,
                ..Agg::default()
            },
            rps: requests as f64 / 10.0,
            covered_s: 10.0,
            tcp_open: 2,
        }
    }

    /// The value of the one sample whose series text is exactly `series`.
    fn sample(text: &str, series: &str) -> f64 {
        let hits: Vec<f64> = text
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(s, _)| *s == series)
            .map(|(_, v)| v.parse().expect("number"))
            .collect();
        assert_eq!(hits.len(), 1, "{series} in\n{text}");
        hits[0]
    }

    #[test]
    fn services_edges_and_own_counters_are_exposed() {
        let services = [fig("web.shop", "", 100, 90)];
        let edges = [fig("web.shop", "spiffe://td/ns/shop/sa/client", 100, 90)];
        let mut refused = BTreeMap::new();
        refused.insert("not_connected", 3);
        let text = render(&Scrape {
            window_seconds: 60,
            services: &services,
            edges: &edges,
            reports_accepted: 7,
            reports_refused: Some(&refused),
            edges_held: 1,
            edges_max: 2048,
            stats_bytes: 4096,
            proxies_connected: 5,
            tap_subscribers: 0,
        });
        let svc = r#"service="web.shop",direction="outbound""#;
        assert_eq!(
            sample(
                &text,
                &format!("quicmesh_controller_service_requests_per_second{{{svc}}}")
            ),
            10.0
        );
        assert_eq!(
            sample(
                &text,
                &format!("quicmesh_controller_service_success_rate{{{svc}}}")
            ),
            0.9
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "quicmesh_controller_edge_requests{{{svc},source=\"spiffe://td/ns/shop/sa/client\"}}"
                )
            ),
            100.0
        );
        assert_eq!(
            sample(
                &text,
                "quicmesh_controller_reports_refused_total{reason=\"not_connected\"}"
            ),
            3.0
        );
        assert_eq!(
            sample(
                &text,
                "quicmesh_controller_reports_refused_total{reason=\"malformed\"}"
            ),
            0.0,
            "every reason shows from the start"
        );
        assert_eq!(
            sample(&text, "quicmesh_controller_reports_accepted_total"),
            7.0
        );
        assert_eq!(sample(&text, "quicmesh_controller_proxies_connected"), 5.0);
        assert_eq!(sample(&text, "quicmesh_controller_stats_bytes"), 4096.0);
        // Every sample line belongs to a family declared before it.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().expect("name").to_owned());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().expect("name");
                assert!(declared.contains(name), "{l}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let services = [fig("we\"b.shop", "", 1, 1)];
        let text = render(&Scrape {
            services: &services,
            ..Scrape::default()
        });
        assert!(
            text.contains("service=\"we\\\"b.shop\""),
            "escaped label in\n{text}"
        );
    }

    #[test]
    fn quantiles_only_for_rows_with_requests() {
        let services = [fig("idle.shop", "", 0, 0)];
        let text = render(&Scrape {
            services: &services,
            ..Scrape::default()
        });
        assert!(!text.contains("quantile="), "{text}");
        assert!(
            text.contains("quicmesh_controller_service_tcp_connections_open{service=\"idle.shop\"")
        );
    }
}
