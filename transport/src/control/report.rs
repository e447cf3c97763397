//! Traffic reports: every `report_interval` the proxy sends the controller what each edge (caller
//! identity -> destination service, one direction) carried since the last summary, so `quicmesh ctl
//! stat` needs no Prometheus.
//!
//! The data plane only adds to atomic counters ([`crate::metrics::EdgeTable`]); this task reads them,
//! sends the differences and never holds a lock the data plane waits on for longer than a copy of the
//! table's handles. A summary that cannot be sent is kept in a queue of [`QUEUE`] summaries, oldest
//! dropped first (counted), and sent later with its age so the controller files it where it belongs.
//! A summary larger than one call allows is split into several calls of at most [`MAX_EDGES_PER_CALL`]
//! edges and [`MAX_CALL_BYTES`]. Each summary also carries the path figures of every live QUIC
//! connection to another proxy (RTT, congestion window, packets sent and lost in the interval: what
//! `ctl stat --peers` shows), at most [`MAX_PEERS`] of them, the busiest first. The building blocks
//! ([`Totals`], [`summary`], [`peers`], [`split`], [`Queue`]) are pure and unit-tested.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use prost::Message;
use quicmesh_proto::controller as pb;
use tokio_util::sync::CancellationToken;

use super::Controller;
use crate::{
    clip::clip,
    metrics::{
        ConnReading, ConnectionTable, Direction, EdgeCounters, EdgeKey, EdgeTable, IdentityMetrics,
        LatencyBuckets,
    },
};

/// Summaries kept while the controller is unreachable.
pub const QUEUE: usize = 4;
/// Most edges in one `Report` call (the controller refuses more).
pub const MAX_EDGES_PER_CALL: usize = 512;
/// Most bytes of one `Report` call, below the controller's 64 KiB request limit.
pub const MAX_CALL_BYTES: usize = 48 * 1024;
/// Most peer connections in one summary (the controller refuses more).
pub const MAX_PEERS: usize = 256;

/// An edge's counters read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    /// Requests, successes, failures by class, mTLS requests.
    pub requests: u64,
    /// Successes.
    pub successes: u64,
    /// Timeout, unavailable, server, grpc.
    pub failures: [u64; 4],
    /// Requests over mTLS.
    pub mtls: u64,
    /// Latency histogram.
    pub latency: Vec<u64>,
    /// TCP opened, closed, failed, bytes to and from the destination.
    pub tcp: [u64; 5],
}

impl Default for Totals {
    fn default() -> Self {
        Self {
            requests: 0,
            successes: 0,
            failures: [0; 4],
            mtls: 0,
            latency: vec![0; LatencyBuckets::COUNT],
            tcp: [0; 5],
        }
    }
}

impl Totals {
    /// Reads `c`.
    pub fn read(c: &EdgeCounters) -> Self {
        let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Self {
            requests: r(&c.requests),
            successes: r(&c.successes),
            failures: std::array::from_fn(|i| r(&c.failures[i])),
            mtls: r(&c.mtls),
            latency: c.latency.iter().map(r).collect(),
            tcp: [
                r(&c.tcp_opened),
                r(&c.tcp_closed),
                r(&c.tcp_failed),
                r(&c.bytes_to),
                r(&c.bytes_from),
            ],
        }
    }

    /// What was added since `prev` (counters only grow; a smaller reading counts as no change).
    pub fn since(&self, prev: &Self) -> Self {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Self {
            requests: d(self.requests, prev.requests),
            successes: d(self.successes, prev.successes),
            failures: std::array::from_fn(|i| d(self.failures[i], prev.failures[i])),
            mtls: d(self.mtls, prev.mtls),
            latency: self
                .latency
                .iter()
                .zip(prev.latency.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| d(*a, *b))
                .collect(),
            tcp: std::array::from_fn(|i| d(self.tcp[i], prev.tcp[i])),
        }
    }
}

/// The proto form of one edge's delta; the histogram is cut to its non-zero span.
pub fn edge_pb(key: &EdgeKey, d: &Totals) -> pb::EdgeSummary {
    let first = d.latency.iter().position(|c| *c > 0);
    let last = d.latency.iter().rposition(|c| *c > 0);
    let (offset, counts) = match (first, last) {
        (Some(f), Some(l)) => (f, d.latency[f..=l].to_vec()),
        _ => (0, Vec::new()),
    };
    pb::EdgeSummary {
        direction: direction_pb(key.direction),
        source: key.source.clone(),
        service: key.service.clone(),
        requests: d.requests,
        successes: d.successes,
        failures_timeout: d.failures[0],
        failures_unavailable: d.failures[1],
        failures_server: d.failures[2],
        failures_grpc: d.failures[3],
        mtls_requests: d.mtls,
        latency_offset: u32::try_from(offset).unwrap_or(0),
        latency_counts: counts,
        tcp_opened: d.tcp[0],
        tcp_closed: d.tcp[1],
        tcp_closed_failed: d.tcp[2],
        bytes_to_destination: d.tcp[3],
        bytes_from_destination: d.tcp[4],
    }
}

fn direction_pb(d: Direction) -> i32 {
    let d = match d {
        Direction::Inbound => pb::EdgeDirection::Inbound,
        Direction::Outbound => pb::EdgeDirection::Outbound,
    };
    d as i32
}

/// The peer connections of the interval that ends now: each connection's packets sent and lost since
/// its reading in `last` (all of them for a new one), which becomes the current reading; connections
/// gone since are forgotten. At most [`MAX_PEERS`], the most packets sent first.
pub fn peers(now: &[ConnReading], last: &mut HashMap<u64, (u64, u64)>) -> Vec<pb::PeerSummary> {
    let mut out: Vec<pb::PeerSummary> = now
        .iter()
        .map(|c| {
            let (sent, lost) = last.get(&c.id).copied().unwrap_or((0, 0));
            pb::PeerSummary {
                direction: direction_pb(c.direction),
                peer: c.peer.clone(),
                address: c.remote.to_string(),
                rtt_us: u32::try_from(c.rtt.as_micros()).unwrap_or(u32::MAX),
                cwnd_bytes: c.cwnd,
                sent_packets: c.sent.saturating_sub(sent),
                lost_packets: c.lost.saturating_sub(lost),
            }
        })
        .collect();
    last.clear();
    last.extend(now.iter().map(|c| (c.id, (c.sent, c.lost))));
    out.sort_by_key(|p| std::cmp::Reverse(p.sent_packets));
    out.truncate(MAX_PEERS);
    out
}

/// One interval's summary, waiting to be sent.
#[derive(Debug, Clone)]
pub struct Summary {
    /// When the interval ended.
    pub ended: Instant,
    /// How long it lasted.
    pub interval: Duration,
    /// Every edge the proxy knows (idle ones too: the controller learns the interval was quiet).
    pub edges: Vec<pb::EdgeSummary>,
    /// The live connections to other proxies.
    pub peers: Vec<pb::PeerSummary>,
}

/// Builds the summary of the interval that ends now: the deltas of every edge against `last`, which
/// becomes the current reading.
pub fn summary(
    table: &[(EdgeKey, Arc<EdgeCounters>)],
    last: &mut HashMap<EdgeKey, Totals>,
    ended: Instant,
    interval: Duration,
) -> Summary {
    let mut edges = Vec::with_capacity(table.len());
    for (k, c) in table {
        let now = Totals::read(c);
        let d = match last.get(k) {
            Some(prev) => now.since(prev),
            None => now.clone(),
        };
        edges.push(edge_pb(k, &d));
        last.insert(k.clone(), now);
    }
    Summary {
        ended,
        interval,
        edges,
        peers: Vec::new(),
    }
}

/// Splits `edges` into calls of at most `max_edges` edges and about `max_bytes` each (an edge is never
/// split; one larger than `max_bytes` goes alone).
pub fn split(
    edges: &[pb::EdgeSummary],
    max_edges: usize,
    max_bytes: usize,
) -> Vec<Vec<pb::EdgeSummary>> {
    let mut out: Vec<Vec<pb::EdgeSummary>> = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for e in edges {
        // Each repeated field costs its length, a tag and a length prefix.
        let len = e.encoded_len() + 4;
        if !cur.is_empty() && (cur.len() >= max_edges || bytes + len > max_bytes) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += len;
        cur.push(e.clone());
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

/// Summaries not yet sent, at most `cap`: a new one past it drops the oldest.
#[derive(Debug)]
pub struct Queue {
    items: VecDeque<Summary>,
    cap: usize,
}

impl Queue {
    /// An empty queue of at most `cap` summaries.
    pub fn new(cap: usize) -> Self {
        Self {
            items: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Adds `s`; returns how many old summaries were dropped for it.
    pub fn push(&mut self, s: Summary) -> usize {
        let mut dropped = 0;
        while self.items.len() >= self.cap {
            self.items.pop_front();
            dropped += 1;
        }
        self.items.push_back(s);
        dropped
    }

    /// The oldest summary.
    pub fn front(&self) -> Option<&Summary> {
        self.items.front()
    }

    /// Removes the oldest summary (it was sent).
    pub fn pop(&mut self) {
        self.items.pop_front();
    }

    /// Summaries waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Sends the summaries until `shutdown`.
#[derive(Debug)]
pub struct Reporter {
    /// The controller (the one in use, shared with the Watch follower).
    pub controller: Controller,
    /// The edges the data plane counts.
    pub edges: Arc<EdgeTable>,
    /// The live QUIC connections to other proxies.
    pub connections: Arc<ConnectionTable>,
    /// How often.
    pub interval: Duration,
    /// Where sent, failed and dropped summaries are counted.
    pub metrics: IdentityMetrics,
}

impl Reporter {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.controller.creds.wait_leaf() => {}
        }
        let mut last = HashMap::new();
        let mut last_peers = HashMap::new();
        // Counts from before the first report belong to no interval the controller can place.
        let _ = summary(&self.edges.all(), &mut last, Instant::now(), self.interval);
        let _ = peers(&self.connections.readings(), &mut last_peers);
        let mut queue = Queue::new(QUEUE);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut started = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let mut s = summary(&self.edges.all(), &mut last, now, now - started);
            s.peers = peers(&self.connections.readings(), &mut last_peers);
            started = now;
            let dropped = queue.push(s);
            if dropped > 0 {
                self.metrics.reports_dropped.inc_by(dropped as u64);
            }
            // Each call is bounded well inside the interval, so a slow controller delays only the
            // reports, never the next reading.
            let limit = self.interval.min(super::CALL_TIMEOUT);
            if let Err(e) = tokio::time::timeout(limit, self.send(&mut queue))
                .await
                .unwrap_or_else(|_| Err("timed out".into()))
            {
                self.controller.drop_shared().await;
                self.metrics.reports_failed.inc();
                tracing::debug!(error = %clip(&e), waiting = queue.len(), "traffic report not sent");
            }
        }
    }

    async fn send(&self, queue: &mut Queue) -> Result<(), String> {
        if queue.is_empty() {
            return Ok(());
        }
        let mut c = self.controller.shared_client().await?;
        while let Some(s) = queue.front() {
            let age = s.ended.elapsed();
            let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
            for (i, edges) in split(&s.edges, MAX_EDGES_PER_CALL, MAX_CALL_BYTES)
                .into_iter()
                .enumerate()
            {
                c.report(pb::ReportRequest {
                    interval_ms: ms(s.interval),
                    age_ms: ms(age),
                    edges,
                    peers: if i == 0 { s.peers.clone() } else { Vec::new() },
                })
                .await
                .map_err(|s| format!("Report: {:?}: {}", s.code(), s.message()))?;
            }
            queue.pop();
            self.metrics.reports.inc();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RequestClass;

    fn key(service: &str) -> EdgeKey {
        EdgeKey {
            direction: Direction::Inbound,
            source: "spiffe://td/ns/a/sa/client".into(),
            service: service.into(),
        }
    }

    #[test]
    fn a_summary_carries_what_changed_since_the_last_one() {
        let c = Arc::new(EdgeCounters::default());
        let table = vec![(key("web.shop"), c.clone())];
        let mut last = HashMap::new();
        let t0 = Instant::now();
        c.request(RequestClass::Success, true);
        c.latency(0.002);
        let s = summary(&table, &mut last, t0, Duration::from_secs(1));
        assert_eq!(s.edges[0].requests, 1);
        c.request(RequestClass::Unavailable, true);
        c.request(RequestClass::Success, false);
        c.latency(0.002);
        c.latency(0.004);
        c.tcp_open();
        c.tcp_close(false, 10, 20);
        let s = summary(&table, &mut last, t0, Duration::from_secs(1));
        let e = &s.edges[0];
        assert_eq!((e.requests, e.successes, e.failures_unavailable), (2, 1, 1));
        assert_eq!(e.mtls_requests, 1);
        assert_eq!(e.latency_counts.iter().sum::<u64>(), 2);
        assert_eq!(e.latency_offset as usize, LatencyBuckets::index(0.002));
        assert_eq!(
            e.latency_counts.len(),
            LatencyBuckets::index(0.004) - LatencyBuckets::index(0.002) + 1
        );
        assert_eq!(
            (
                e.tcp_opened,
                e.bytes_to_destination,
                e.bytes_from_destination
            ),
            (1, 10, 20)
        );
        // A quiet interval still names the edge, with nothing in it.
        let s = summary(&table, &mut last, t0, Duration::from_secs(1));
        assert_eq!(s.edges[0].requests, 0);
        assert!(s.edges[0].latency_counts.is_empty());
    }

    #[test]
    fn large_summaries_are_split_by_count_and_bytes() {
        let edges: Vec<_> = (0..1000)
            .map(|i| edge_pb(&key(&format!("svc-{i}.ns")), &Totals::default()))
            .collect();
        let calls = split(&edges, 300, usize::MAX);
        assert_eq!(
            calls.iter().map(Vec::len).collect::<Vec<_>>(),
            [300, 300, 300, 100]
        );
        let calls = split(&edges, MAX_EDGES_PER_CALL, 4096);
        assert!(calls.len() > 2);
        for c in &calls {
            let req = pb::ReportRequest {
                interval_ms: 1,
                age_ms: 1,
                edges: c.clone(),
                peers: Vec::new(),
            };
            assert!(req.encoded_len() <= 4096 + 64, "{}", req.encoded_len());
        }
        assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 1000);
        assert_eq!(
            split(&[], 10, 10).len(),
            1,
            "an empty summary is still sent"
        );
    }

    #[test]
    fn peers_carry_the_packets_of_the_interval_busiest_first() {
        let reading = |id, sent, lost| ConnReading {
            id,
            direction: Direction::Outbound,
            peer: format!("spiffe://td/ns/a/sa/p{id}"),
            remote: "127.0.0.1:4433".parse().expect("addr"),
            rtt: Duration::from_micros(1500),
            cwnd: 12_000,
            sent,
            lost,
        };
        let mut last = HashMap::new();
        let p = peers(&[reading(1, 100, 2)], &mut last);
        assert_eq!((p[0].sent_packets, p[0].lost_packets), (100, 2));
        assert_eq!((p[0].rtt_us, p[0].cwnd_bytes), (1500, 12_000));
        assert_eq!(p[0].address, "127.0.0.1:4433");
        let p = peers(&[reading(1, 150, 3), reading(2, 500, 0)], &mut last);
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.peer.as_str(), p.sent_packets, p.lost_packets))
            .collect();
        assert_eq!(
            got,
            [
                ("spiffe://td/ns/a/sa/p2", 500, 0),
                ("spiffe://td/ns/a/sa/p1", 50, 1)
            ]
        );
        // A closed connection is forgotten; a new one with a reused id would start from zero.
        assert!(peers(&[], &mut last).is_empty());
        assert!(last.is_empty());
        let many: Vec<_> = (0..MAX_PEERS as u64 + 10)
            .map(|i| reading(i, i, 0))
            .collect();
        let p = peers(&many, &mut last);
        assert_eq!(p.len(), MAX_PEERS);
        assert_eq!(p[0].sent_packets, MAX_PEERS as u64 + 9);
    }

    #[test]
    fn the_queue_drops_the_oldest_summaries() {
        let mut q = Queue::new(2);
        let s = |ms| Summary {
            ended: Instant::now(),
            interval: Duration::from_millis(ms),
            edges: Vec::new(),
            peers: Vec::new(),
        };
        assert_eq!(q.push(s(1)), 0);
        assert_eq!(q.push(s(2)), 0);
        assert_eq!(q.push(s(3)), 1);
        assert_eq!(q.len(), 2);
        assert_eq!(q.front().map(|s| s.interval.as_millis()), Some(2));
        q.pop();
        q.pop();
        assert!(q.is_empty());
    }

    #[test]
    fn the_edge_table_is_bounded() {
        let t = EdgeTable::default();
        for i in 0..crate::metrics::MAX_EDGES * 3 {
            t.edge(Direction::Inbound, "x", &format!("s{i}")).tcp_open();
        }
        let all = t.all();
        assert_eq!(all.len(), crate::metrics::MAX_EDGES + 1);
        let overflow = all
            .iter()
            .find(|(k, _)| k.service == EdgeTable::OVERFLOW)
            .map(|(_, c)| c.tcp_opened.load(Ordering::Relaxed));
        assert_eq!(overflow, Some((crate::metrics::MAX_EDGES * 2) as u64));
    }

    #[test]
    fn latency_buckets_read_quantiles_within_five_percent() {
        for secs in [0.00007, 0.0013, 0.021, 0.9, 12.0] {
            let mut h = vec![0u64; LatencyBuckets::COUNT];
            h[LatencyBuckets::index(secs)] += 1;
            let q = LatencyBuckets::quantile(&h, 0.99);
            assert!((q / secs - 1.0).abs() < 0.05, "{secs}: {q}");
        }
        let mut h = vec![0u64; LatencyBuckets::COUNT];
        for i in 1..=100 {
            h[LatencyBuckets::index(f64::from(i) / 1000.0)] += 1;
        }
        let p50 = LatencyBuckets::quantile(&h, 0.5);
        let p99 = LatencyBuckets::quantile(&h, 0.99);
        assert!((p50 / 0.050 - 1.0).abs() < 0.05, "{p50}");
        assert!((p99 / 0.099 - 1.0).abs() < 0.05, "{p99}");
        assert_eq!(LatencyBuckets::index(0.0), 0);
        assert_eq!(LatencyBuckets::index(f64::NAN), 0);
        assert_eq!(LatencyBuckets::index(1e9), LatencyBuckets::COUNT - 1);
        assert_eq!(LatencyBuckets::quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn requests_are_classified_like_the_golden_metrics() {
        use RequestClass::*;
        assert_eq!(RequestClass::of(200, None), Success);
        assert_eq!(RequestClass::of(404, None), Success);
        assert_eq!(RequestClass::of(200, Some(0)), Success);
        assert_eq!(RequestClass::of(200, Some(2)), Grpc);
        assert_eq!(RequestClass::of(200, Some(4)), Timeout);
        assert_eq!(RequestClass::of(504, None), Timeout);
        assert_eq!(RequestClass::of(503, None), Unavailable);
        assert_eq!(RequestClass::of(200, Some(14)), Unavailable);
        assert_eq!(RequestClass::of(500, None), Server);
    }
}
