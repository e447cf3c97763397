//! `quicmesh ctl top`: the busiest request paths of a service, from its live tap.
//!
//! Like `linkerd viz top`: the tap's samples (`Admin.Tap`, rate-bounded at the proxies) are counted
//! per (caller identity, method, path) with their best, worst and last latency and success rate,
//! and the table is redrawn every refresh. Counts are of samples, so under a tap rate lower than
//! the traffic they rank paths rather than count every request (`ctl stat` has the exact totals).
//! Pure: the command in `ctl.rs` feeds it events and prints [`Top::rows`].

use std::collections::HashMap;

use quicmesh_proto::controller as pb;
use serde::Serialize;

/// Distinct paths counted; samples of further ones are counted under [`Top::OTHER`].
pub const MAX_PATHS: usize = 10_000;

/// One path's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopRow {
    /// Caller identity.
    pub source: String,
    /// Serving proxy's identity (the last seen).
    pub destination: String,
    /// Request method.
    pub method: String,
    /// Path (with query, as the tap caps it).
    pub path: String,
    /// Samples.
    pub count: u64,
    /// Of them successful (below 500, gRPC OK or none).
    pub successes: u64,
    /// Share of successes.
    pub success_rate: f64,
    /// Fastest, ms.
    pub best_ms: f64,
    /// Slowest, ms.
    pub worst_ms: f64,
    /// Latest, ms.
    pub last_ms: f64,
}

#[derive(Debug, Clone, Default)]
struct Acc {
    destination: String,
    count: u64,
    successes: u64,
    best_us: u64,
    worst_us: u64,
    last_us: u64,
}

/// Samples counted per path.
#[derive(Debug, Default)]
pub struct Top {
    paths: HashMap<(String, String, String), Acc>,
}

impl Top {
    /// The path samples past [`MAX_PATHS`] are counted under.
    pub const OTHER: &'static str = "(other paths)";

    /// Counts one sample.
    pub fn add(&mut self, e: &pb::TapEvent) {
        let mut key = (e.source.clone(), e.method.clone(), e.path.clone());
        if !self.paths.contains_key(&key) && self.paths.len() >= MAX_PATHS {
            key = (String::new(), String::new(), Self::OTHER.to_owned());
        }
        let a = self.paths.entry(key).or_insert_with(|| Acc {
            best_us: u64::MAX,
            ..Acc::default()
        });
        let ok = e.status < 500 && e.grpc_status_plus_one <= 1;
        a.destination.clone_from(&e.destination);
        a.count += 1;
        a.successes += u64::from(ok);
        a.best_us = a.best_us.min(e.latency_us);
        a.worst_us = a.worst_us.max(e.latency_us);
        a.last_us = e.latency_us;
    }

    /// The `n` busiest paths, most samples first (then by path).
    pub fn rows(&self, n: usize) -> Vec<TopRow> {
        let ms = |us: u64| us as f64 / 1000.0;
        let mut rows: Vec<TopRow> = self
            .paths
            .iter()
            .map(|((source, method, path), a)| TopRow {
                source: source.clone(),
                destination: a.destination.clone(),
                method: method.clone(),
                path: path.clone(),
                count: a.count,
                successes: a.successes,
                success_rate: a.successes as f64 / a.count.max(1) as f64,
                best_ms: ms(a.best_us),
                worst_ms: ms(a.worst_us),
                last_ms: ms(a.last_us),
            })
            .collect();
        rows.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| (&a.path, &a.method, &a.source).cmp(&(&b.path, &b.method, &b.source)))
        });
        rows.truncate(n);
        rows
    }

    /// Paths counted.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(path: &str, status: u32, latency_us: u64) -> pb::TapEvent {
        pb::TapEvent {
            service: "web.a".into(),
            method: "GET".into(),
            path: path.into(),
            status,
            latency_us,
            source: "spiffe://td/ns/a/sa/client".into(),
            destination: "spiffe://td/ns/a/sa/web".into(),
            ..Default::default()
        }
    }

    #[test]
    fn busiest_paths_first_with_latency_and_success() {
        let mut t = Top::default();
        for (i, us) in [3000, 1000, 2000].into_iter().enumerate() {
            t.add(&ev("/orders", if i == 2 { 500 } else { 200 }, us));
        }
        t.add(&ev("/health", 200, 100));
        let mut grpc = ev("/pkg.Svc/Call", 200, 50);
        grpc.grpc_status_plus_one = 15; // UNAVAILABLE
        t.add(&grpc);
        let rows = t.rows(10);
        assert_eq!(rows[0].path, "/orders");
        assert_eq!((rows[0].count, rows[0].successes), (3, 2));
        assert_eq!(
            (rows[0].best_ms, rows[0].worst_ms, rows[0].last_ms),
            (1.0, 3.0, 2.0)
        );
        assert_eq!(rows[1].path, "/health", "ties by path");
        assert_eq!(rows[2].successes, 0, "a gRPC error is a failure");
        assert_eq!(t.rows(1).len(), 1);
    }

    #[test]
    fn paths_are_bounded() {
        let mut t = Top::default();
        for i in 0..MAX_PATHS + 5 {
            t.add(&ev(&format!("/p{i}"), 200, 1));
        }
        assert_eq!(t.len(), MAX_PATHS + 1);
        assert_eq!(t.rows(1)[0].path, Top::OTHER);
        assert_eq!(t.rows(1)[0].count, 5);
    }
}
