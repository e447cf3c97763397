//! Traffic statistics: the proxies' reports (`ProxyApi.Report`) summed per edge over sliding windows
//! of 1 minute, 10 minutes and 1 hour, for `quicmesh ctl stat` (`Admin.GetStats`).
//!
//! Each edge (direction, caller identity, destination service) keeps three rings of time slots: 12 of
//! 5 s, 10 of 1 min and 12 of 5 min. A report is added to the slot of the moment its interval ended
//! (its arrival minus the age the proxy states, so a summary held back during an outage lands where it
//! belongs) in each ring; a window is the sum of its ring's slots, so it slides in steps of one slot.
//! Rates divide by the time the window actually covers for that edge: from its first report's interval
//! start (or the window's start) to its latest report, since proxies report every edge they know each
//! interval, quiet or not; when no report came for [`STALE_MS`] the window runs to now instead.
//!
//! Memory is bounded: at most [`MAX_EDGES`] edges, at most [`MAX_EDGES_PER_REPORTER`] of them created
//! by one identity (one proxy cannot fill the table), edges with no traffic in the last hour are
//! dropped, and a slot's histogram spans at most the fixed bucket count. The worst case is
//! [`MAX_EDGES`] × 34 slots × (170 × 8 + ~120) bytes ≈ 104 MB (measured by the flood test: RSS grew
//! 107 MB; [`WORST_CASE_BYTES`]); a mesh's real edges use a small part of it. Everything here is pure over a caller-given clock (milliseconds on any monotonic scale) and
//! unit-tested with fake time; `api/` only applies it.

use std::collections::{BTreeMap, HashMap};

use quicmesh_proto::controller as pb;
use quicmesh_transport::{identity::SpiffeId, metrics::LatencyBuckets};

/// Most edges held.
pub const MAX_EDGES: usize = 2048;
/// What [`MAX_EDGES`] edges take at worst ([`Stats::approx_bytes`]: every slot of every ring holding
/// every latency bucket), with room for long names; measured by the flood test.
pub const WORST_CASE_BYTES: usize = 120_000_000;
/// Most edges one reporting identity may create.
pub const MAX_EDGES_PER_REPORTER: usize = 512;
/// Most edges in one report (a proxy splits larger summaries).
pub const MAX_REPORT_EDGES: usize = 512;
/// A report for an interval longer than this, or older, is refused.
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Without a report for this long, an edge's window runs to now.
pub const STALE_MS: u64 = 15_000;
/// The service name proxies count edges past their own bound under.
pub const OVERFLOW: &str = quicmesh_transport::metrics::EdgeTable::OVERFLOW;

/// A window `ctl stat` can ask for: its length and the ring that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Length, seconds.
    pub seconds: u32,
    slot_ms: u64,
    slots: u64,
}

/// The windows, shortest first.
pub const WINDOWS: [Window; 3] = [
    Window {
        seconds: 60,
        slot_ms: 5_000,
        slots: 12,
    },
    Window {
        seconds: 600,
        slot_ms: 60_000,
        slots: 10,
    },
    Window {
        seconds: 3600,
        slot_ms: 300_000,
        slots: 12,
    },
];

impl Window {
    /// The window of `seconds` (0: one minute), or `None` if there is none of that length.
    pub fn of(seconds: u32) -> Option<Self> {
        let s = if seconds == 0 { 60 } else { seconds };
        WINDOWS.iter().copied().find(|w| w.seconds == s)
    }

    /// When the window ending now started, ms.
    pub(crate) fn start(&self, now_ms: u64) -> u64 {
        (now_ms / self.slot_ms + 1).saturating_sub(self.slots) * self.slot_ms
    }
}

/// Which side counted an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// The destination's proxy.
    Inbound,
    /// The caller's proxy.
    Outbound,
}

impl Side {
    /// `inbound` or `outbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// An edge: who called which service, as counted by which side.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeId {
    /// Destination service, `name.namespace`.
    pub service: String,
    /// Caller identity.
    pub source: String,
    /// Side that counted.
    pub side: Side,
}

/// A histogram on [`LatencyBuckets`], holding only the span from its first to its last non-empty
/// bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hist {
    offset: usize,
    counts: Vec<u64>,
}

impl Hist {
    /// Adds `counts` of buckets `offset..` (bucket indexes past the last are refused beforehand).
    pub fn add(&mut self, offset: usize, counts: &[u64]) {
        if counts.is_empty() {
            return;
        }
        let end = (offset + counts.len()).min(LatencyBuckets::COUNT);
        if self.counts.is_empty() {
            self.offset = offset;
            self.counts = vec![0; end - offset];
        }
        let lo = self.offset.min(offset);
        let hi = (self.offset + self.counts.len()).max(end);
        if lo < self.offset || hi > self.offset + self.counts.len() {
            let mut grown = vec![0; hi - lo];
            grown[self.offset - lo..self.offset - lo + self.counts.len()]
                .copy_from_slice(&self.counts);
            self.offset = lo;
            self.counts = grown;
        }
        for (i, c) in counts.iter().take(end - offset).enumerate() {
            self.counts[offset - self.offset + i] += c;
        }
    }

    /// Quantile `q`, seconds.
    pub fn quantile(&self, q: f64) -> f64 {
        let mut dense = vec![0; self.offset];
        dense.extend_from_slice(&self.counts);
        LatencyBuckets::quantile(&dense, q)
    }
}

/// What an edge carried over some time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agg {
    /// Requests finished.
    pub requests: u64,
    /// Of them successful.
    pub successes: u64,
    /// Failures: timeout, unavailable, server, grpc.
    pub failures: [u64; 4],
    /// Requests over mTLS.
    pub mtls: u64,
    /// TCP connections opened, closed, closed failed.
    pub tcp: [u64; 3],
    /// Bytes both ways.
    pub bytes: u64,
    /// Latency.
    pub latency: Hist,
}

impl Agg {
    fn merge(&mut self, o: &Agg) {
        self.requests += o.requests;
        self.successes += o.successes;
        for i in 0..4 {
            self.failures[i] += o.failures[i];
        }
        self.mtls += o.mtls;
        for i in 0..3 {
            self.tcp[i] += o.tcp[i];
        }
        self.bytes += o.bytes;
        self.latency.add(o.latency.offset, &o.latency.counts);
    }

    fn is_empty(&self) -> bool {
        self.requests == 0 && self.tcp == [0; 3] && self.bytes == 0
    }
}

/// One validated edge of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeInput {
    /// The edge.
    pub id: EdgeId,
    /// What it carried in the interval.
    pub agg: Agg,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// More edges than one report may carry.
    #[error("a report carries at most {MAX_REPORT_EDGES} edges, this one {0}")]
    TooManyEdges(usize),
    /// A field is malformed.
    #[error("edges[{0}]: {1}")]
    Malformed(usize, String),
    /// The reporter may not report this edge.
    #[error("edges[{0}]: {1}")]
    NotAllowed(usize, String),
    /// Interval or age out of range.
    #[error("{0}")]
    Stale(String),
    /// More peer connections than one report may carry.
    #[error("a report carries at most {max} peers, this one {0}", max = crate::links::MAX_REPORT_PEERS)]
    TooManyPeers(usize),
    /// A peer connection is malformed.
    #[error("peers[{0}]: {1}")]
    MalformedPeer(usize, String),
}

/// Every reason a report or edge is counted as refused under (`Refusal::reason`, the API's own
/// checks, and `edges_full`), so `/metrics` shows each from the start.
pub const REFUSAL_REASONS: [&str; 9] = [
    "unauthenticated",
    "not_connected",
    "too_many_edges",
    "malformed",
    "not_allowed",
    "stale",
    "edges_full",
    "too_many_peers",
    "peers_full",
];

impl Refusal {
    /// The label it is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooManyEdges(_) => "too_many_edges",
            Self::TooManyPeers(_) => "too_many_peers",
            Self::Malformed(..) | Self::MalformedPeer(..) => "malformed",
            Self::NotAllowed(..) => "not_allowed",
            Self::Stale(_) => "stale",
        }
    }
}

/// Checks a report from `reporter` and turns it into edges. `serves(service, reporter)` says whether
/// the reporter may serve a service (`name.namespace`; false for services that do not exist): inbound
/// edges are only accepted for services the reporter serves, outbound ones only for existing services
/// (`exists`) and always with the reporter as their source.
pub fn validate(
    reporter: &SpiffeId,
    req: &pb::ReportRequest,
    exists: impl Fn(&str) -> bool,
    serves: impl Fn(&str) -> bool,
) -> Result<Vec<EdgeInput>, Refusal> {
    if req.edges.len() > MAX_REPORT_EDGES {
        return Err(Refusal::TooManyEdges(req.edges.len()));
    }
    if u64::from(req.interval_ms) > MAX_INTERVAL_MS || u64::from(req.age_ms) > MAX_INTERVAL_MS {
        return Err(Refusal::Stale(format!(
            "interval_ms {} and age_ms {} must be at most {MAX_INTERVAL_MS}",
            req.interval_ms, req.age_ms
        )));
    }
    let mut out = Vec::with_capacity(req.edges.len());
    for (i, e) in req.edges.iter().enumerate() {
        let bad = |m: String| Refusal::Malformed(i, m);
        let overflow = e.service == OVERFLOW;
        if !overflow {
            check_service(&e.service).map_err(bad)?;
        }
        let side = match pb::EdgeDirection::try_from(e.direction) {
            Ok(pb::EdgeDirection::Inbound) => Side::Inbound,
            Ok(pb::EdgeDirection::Outbound) => Side::Outbound,
            _ => {
                return Err(bad(format!(
                    "direction {} is not inbound or outbound",
                    e.direction
                )));
            }
        };
        let source = match side {
            Side::Outbound if e.source.is_empty() => reporter.to_string(),
            Side::Outbound => {
                return Err(bad(
                    "source: outbound edges are the reporter's own; leave it empty".into(),
                ));
            }
            Side::Inbound if overflow && e.source.is_empty() => String::new(),
            Side::Inbound => e
                .source
                .parse::<SpiffeId>()
                .map_err(|err| {
                    bad(format!(
                        "source {:?}: {err}",
                        crate::error::Capped(&e.source)
                    ))
                })?
                .to_string(),
        };
        if !overflow {
            let allowed = match side {
                Side::Inbound => serves(&e.service),
                Side::Outbound => exists(&e.service),
            };
            if !allowed {
                return Err(Refusal::NotAllowed(
                    i,
                    match side {
                        Side::Inbound => format!("{reporter} does not serve {}", e.service),
                        Side::Outbound => format!("no service {}", e.service),
                    },
                ));
            }
        }
        let failures = [
            e.failures_timeout,
            e.failures_unavailable,
            e.failures_server,
            e.failures_grpc,
        ];
        let classified = failures
            .iter()
            .try_fold(e.successes, |a, b| a.checked_add(*b));
        if classified != Some(e.requests) || e.mtls_requests > e.requests {
            return Err(bad(
                "successes and failures must add up to requests, mtls_requests at most requests"
                    .into(),
            ));
        }
        let offset = e.latency_offset as usize;
        if offset + e.latency_counts.len() > LatencyBuckets::COUNT {
            return Err(bad(format!(
                "latency buckets end past {}",
                LatencyBuckets::COUNT
            )));
        }
        if e.tcp_closed_failed > e.tcp_closed {
            return Err(bad("tcp_closed_failed exceeds tcp_closed".into()));
        }
        let mut latency = Hist::default();
        latency.add(offset, &e.latency_counts);
        out.push(EdgeInput {
            id: EdgeId {
                service: e.service.clone(),
                source,
                side,
            },
            agg: Agg {
                requests: e.requests,
                successes: e.successes,
                failures,
                mtls: e.mtls_requests,
                tcp: [e.tcp_opened, e.tcp_closed, e.tcp_closed_failed],
                bytes: e
                    .bytes_to_destination
                    .saturating_add(e.bytes_from_destination),
                latency,
            },
        });
    }
    Ok(out)
}

/// `name.namespace`, each a DNS label.
fn check_service(s: &str) -> Result<(), String> {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match s.split_once('.') {
        Some((n, ns)) if label(n) && label(ns) => Ok(()),
        _ => Err(format!(
            "service {:?} is not name.namespace",
            crate::error::Capped(s)
        )),
    }
}

/// What a ring's slot sums.
pub(crate) trait Slot: Clone + Default {
    /// Adds `o`.
    fn merge(&mut self, o: &Self);
}

impl Slot for Agg {
    fn merge(&mut self, o: &Self) {
        Agg::merge(self, o);
    }
}

/// One window's slots, each the sum of what was added at moments in it.
#[derive(Debug, Clone)]
pub(crate) struct Ring<T> {
    slots: Vec<Option<(u64, T)>>,
}

impl<T: Slot> Ring<T> {
    pub(crate) fn new(w: &Window) -> Self {
        Self {
            slots: vec![None; w.slots as usize],
        }
    }

    pub(crate) fn add(&mut self, w: &Window, at_ms: u64, a: &T) {
        let n = at_ms / w.slot_ms;
        let i = (n % w.slots) as usize;
        match &mut self.slots[i] {
            Some((k, agg)) if *k == n => agg.merge(a),
            Some((k, _)) if *k > n => {} // older than the ring holds
            slot => *slot = Some((n, a.clone())),
        }
    }

    pub(crate) fn sum(&self, w: &Window, now_ms: u64) -> T {
        let now = now_ms / w.slot_ms;
        let mut out = T::default();
        for (n, a) in self.slots.iter().flatten() {
            if *n <= now && *n + w.slots > now {
                out.merge(a);
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
struct EdgeStats {
    rings: [Ring<Agg>; 3],
    first_ms: u64,
    last_ms: u64,
    /// Connections opened and closed since the edge appeared (open now = the difference).
    opened: u64,
    closed: u64,
    creator: String,
}

/// Golden metrics of a service or an edge over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// The service.
    pub service: String,
    /// Edges: caller identity (empty for services).
    pub source: String,
    /// Edges: side; services: the side the figures come from.
    pub side: Side,
    /// What the window holds.
    pub agg: Agg,
    /// Requests per second over the covered time.
    pub rps: f64,
    /// Time the window covers, seconds.
    pub covered_s: f64,
    /// TCP connections open now.
    pub tcp_open: i64,
}

impl Figures {
    /// Share of successes (0 without requests).
    pub fn success_rate(&self) -> f64 {
        ratio(self.agg.successes, self.agg.requests)
    }

    /// Share of requests and connections that crossed an mTLS hop between proxies.
    pub fn mtls_share(&self) -> f64 {
        // Tunneled connections always travel over mutually authenticated QUIC.
        ratio(
            self.agg.mtls + self.agg.tcp[0],
            self.agg.requests + self.agg.tcp[0],
        )
    }

    /// Latency quantile, milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.agg.latency.quantile(q) * 1000.0
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Every edge's windows, bounded.
#[derive(Debug)]
pub struct Stats {
    edges: HashMap<EdgeId, EdgeStats>,
    per_creator: HashMap<String, usize>,
    max_edges: usize,
    max_per_creator: usize,
    /// Reports accepted.
    pub accepted: u64,
    /// Reports and edges refused, by reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// The QUIC connections between proxies the reports carry.
    pub links: crate::links::Links,
    last_sweep_ms: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new(MAX_EDGES, MAX_EDGES_PER_REPORTER)
    }
}

impl Stats {
    /// Holding at most `max_edges`, at most `max_per_creator` created by one reporter.
    pub fn new(max_edges: usize, max_per_creator: usize) -> Self {
        Self {
            edges: HashMap::new(),
            per_creator: HashMap::new(),
            max_edges,
            max_per_creator,
            accepted: 0,
            refused: BTreeMap::new(),
            links: crate::links::Links::default(),
            last_sweep_ms: 0,
        }
    }

    /// Counts a refused report.
    pub fn refuse(&mut self, reason: &'static str) {
        *self.refused.entry(reason).or_default() += 1;
    }

    /// Edges held now.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// The bound on edges.
    pub fn max_edges(&self) -> usize {
        self.max_edges
    }

    /// Heap and inline bytes the edges take, estimated from their sizes and capacities (what
    /// `/metrics` shows as `quicmesh_controller_stats_bytes`; allocator overhead not included).
    pub fn approx_bytes(&self) -> usize {
        use std::mem::size_of;
        let slot = size_of::<Option<(u64, Agg)>>();
        let edges: usize = self
            .edges
            .iter()
            .map(|(id, st)| {
                let rings: usize = st
                    .rings
                    .iter()
                    .map(|r| {
                        r.slots.capacity() * slot
                            + r.slots
                                .iter()
                                .flatten()
                                .map(|(_, a)| a.latency.counts.capacity() * size_of::<u64>())
                                .sum::<usize>()
                    })
                    .sum();
                size_of::<(EdgeId, EdgeStats)>()
                    + id.service.capacity()
                    + id.source.capacity()
                    + st.creator.capacity()
                    + rings
            })
            .sum();
        let creators: usize = self
            .per_creator
            .keys()
            .map(|k| size_of::<(String, usize)>() + k.capacity())
            .sum();
        size_of::<Self>() + edges + creators
    }

    /// Adds a validated report of `reporter` whose interval of `interval_ms` ended at `end_ms`, at
    /// `now_ms`. Returns how many edges were taken; edges that would pass a bound are counted as
    /// refused (`edges_full`) and left out.
    pub fn record(
        &mut self,
        reporter: &str,
        edges: Vec<EdgeInput>,
        end_ms: u64,
        interval_ms: u64,
        now_ms: u64,
    ) -> usize {
        self.sweep(now_ms);
        self.accepted += 1;
        let mut taken = 0;
        for e in edges {
            let st = match self.edges.get_mut(&e.id) {
                Some(st) => st,
                // A quiet edge not held (dropped, or never busy) is not worth a place.
                None if e.agg.is_empty() => continue,
                None => {
                    let mine = self.per_creator.get(reporter).copied().unwrap_or(0);
                    if self.edges.len() >= self.max_edges || mine >= self.max_per_creator {
                        self.refuse("edges_full");
                        continue;
                    }
                    *self.per_creator.entry(reporter.to_owned()).or_default() += 1;
                    self.edges.entry(e.id.clone()).or_insert_with(|| EdgeStats {
                        rings: WINDOWS.map(|w| Ring::new(&w)),
                        first_ms: end_ms.saturating_sub(interval_ms),
                        last_ms: end_ms,
                        opened: 0,
                        closed: 0,
                        creator: reporter.to_owned(),
                    })
                }
            };
            for (ring, w) in st.rings.iter_mut().zip(WINDOWS.iter()) {
                ring.add(w, end_ms, &e.agg);
            }
            st.first_ms = st.first_ms.min(end_ms.saturating_sub(interval_ms));
            st.last_ms = st.last_ms.max(end_ms);
            st.opened += e.agg.tcp[0];
            st.closed += e.agg.tcp[1];
            taken += 1;
        }
        taken
    }

    /// Drops edges with nothing in the last hour and no open connection, at most every 10 s.
    fn sweep(&mut self, now_ms: u64) {
        if now_ms < self.last_sweep_ms + 10_000 {
            return;
        }
        self.last_sweep_ms = now_ms;
        let hour = WINDOWS[2];
        let per_creator = &mut self.per_creator;
        self.edges.retain(|_, st| {
            let keep = st.opened > st.closed || !st.rings[2].sum(&hour, now_ms).is_empty();
            if !keep && let Some(n) = per_creator.get_mut(&st.creator) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_creator.remove(&st.creator);
                }
            }
            keep
        });
    }

    /// Figures of every edge with traffic in `w` (or connections open), optionally of one service
    /// (`name.namespace`, or `name` in any namespace), sorted by service, source and side.
    pub fn edges(&self, w: Window, now_ms: u64, service: Option<&str>) -> Vec<Figures> {
        let ring = WINDOWS.iter().position(|x| *x == w).unwrap_or(0);
        let start = w.start(now_ms);
        let mut out: Vec<Figures> = self
            .edges
            .iter()
            .filter(|(id, _)| service.is_none_or(|s| matches_service(&id.service, s)))
            .filter_map(|(id, st)| {
                let agg = st.rings[ring].sum(&w, now_ms);
                let tcp_open = i64::try_from(st.opened.saturating_sub(st.closed)).unwrap_or(0);
                if agg.is_empty() && tcp_open == 0 {
                    return None;
                }
                let end = if now_ms.saturating_sub(st.last_ms) > STALE_MS {
                    now_ms
                } else {
                    st.last_ms
                };
                let covered_ms = end.saturating_sub(st.first_ms.max(start)).max(1);
                let covered_s = covered_ms as f64 / 1000.0;
                Some(Figures {
                    service: id.service.clone(),
                    source: id.source.clone(),
                    side: id.side,
                    rps: agg.requests as f64 / covered_s,
                    agg,
                    covered_s,
                    tcp_open,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.source, a.side).cmp(&(&b.service, &b.source, b.side)));
        out
    }

    /// Figures per service: the callers' side (outbound edges) when any reported, else the
    /// destination's side; rates are the sums of the edges' rates.
    pub fn services(&self, w: Window, now_ms: u64, service: Option<&str>) -> Vec<Figures> {
        let mut by: BTreeMap<&str, (Vec<&Figures>, Vec<&Figures>)> = BTreeMap::new();
        let edges = self.edges(w, now_ms, service);
        for f in &edges {
            let e = by.entry(f.service.as_str()).or_default();
            match f.side {
                Side::Outbound => e.0.push(f),
                Side::Inbound => e.1.push(f),
            }
        }
        by.into_iter()
            .map(|(svc, (out, inb))| {
                let (side, list) = if out.is_empty() {
                    (Side::Inbound, inb)
                } else {
                    (Side::Outbound, out)
                };
                let mut f = Figures {
                    service: svc.to_owned(),
                    source: String::new(),
                    side,
                    agg: Agg::default(),
                    rps: 0.0,
                    covered_s: 0.0,
                    tcp_open: 0,
                };
                for e in list {
                    f.agg.merge(&e.agg);
                    f.rps += e.rps;
                    f.covered_s = f.covered_s.max(e.covered_s);
                    f.tcp_open += e.tcp_open;
                }
                f
            })
            .collect()
    }
}

fn matches_service(service: &str, wanted: &str) -> bool {
    service == wanted || service.split_once('.').is_some_and(|(n, _)| n == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("spiffe id")
    }

    fn edge(
        dir: pb::EdgeDirection,
        source: &str,
        service: &str,
        ok: u64,
        failed: u64,
    ) -> pb::EdgeSummary {
        pb::EdgeSummary {
            direction: dir as i32,
            source: source.into(),
            service: service.into(),
            requests: ok + failed,
            successes: ok,
            failures_server: failed,
            mtls_requests: ok + failed,
            latency_offset: LatencyBuckets::index(0.010) as u32,
            latency_counts: vec![ok + failed],
            ..Default::default()
        }
    }

    fn report(edges: Vec<pb::EdgeSummary>) -> pb::ReportRequest {
        pb::ReportRequest {
            interval_ms: 1000,
            age_ms: 0,
            edges,
            peers: Vec::new(),
        }
    }

    /// Resident set size of this process, bytes (Linux; 0 elsewhere).
    fn rss_bytes() -> usize {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
            .map_or(0, |pages| pages * 4096)
    }

    /// The flood bound, measured: eight identities each report 512 edges with every latency bucket
    /// filled, at moments that fill every slot of every ring. Only the bound's edges are held and
    /// their bytes stay under the stated worst case. `cargo test -p quicmesh-controller --release
    /// --lib stats::tests::a_flood -- --nocapture` prints the figures.
    #[test]
    fn a_flood_of_reports_fills_the_table_only_to_its_bound() {
        let full = vec![1u64; LatencyBuckets::COUNT];
        let mut latency = Hist::default();
        latency.add(0, &full);
        let agg = Agg {
            requests: LatencyBuckets::COUNT as u64,
            successes: LatencyBuckets::COUNT as u64,
            mtls: LatencyBuckets::COUNT as u64,
            latency,
            ..Agg::default()
        };
        let hour = 3_600_000u64;
        let end = 10 * hour;
        let mut times: Vec<u64> = (0..12).map(|i| end - hour + 300_000 * i + 1).collect();
        times.extend((0..10).map(|i| end - 600_000 + 60_000 * i + 2));
        times.extend((0..12).map(|i| end - 60_000 + 5_000 * i + 3));
        times.sort_unstable();
        let rss0 = rss_bytes();
        let mut s = Stats::default();
        for t in times {
            for r in 0..8 {
                let who = format!("spiffe://td/ns/flood/sa/proxy-{r}");
                let edges = (0..MAX_EDGES_PER_REPORTER)
                    .map(|e| EdgeInput {
                        id: EdgeId {
                            service: format!("service-{e}.flood"),
                            source: who.clone(),
                            side: Side::Outbound,
                        },
                        agg: agg.clone(),
                    })
                    .collect();
                s.record(&who, edges, t, 5_000, t);
            }
        }
        let rss = rss_bytes().saturating_sub(rss0);
        let bytes = s.approx_bytes();
        println!(
            "flood: {} edges held of {} offered per report round, {:.1} MB estimated, RSS grew {:.1} MB, {} edges refused",
            s.len(),
            8 * MAX_EDGES_PER_REPORTER,
            bytes as f64 / 1e6,
            rss as f64 / 1e6,
            s.refused.get("edges_full").copied().unwrap_or(0)
        );
        assert_eq!(s.len(), MAX_EDGES);
        assert!(bytes <= WORST_CASE_BYTES, "{bytes} bytes");
        assert!(
            bytes >= WORST_CASE_BYTES / 2,
            "the case is the worst: {bytes} bytes"
        );
    }

    const W1: Window = WINDOWS[0];
    const W10: Window = WINDOWS[1];
    const CLIENT: &str = "spiffe://td/ns/shop/sa/client";
    const WEB: &str = "spiffe://td/ns/shop/sa/web";

    fn ok(r: &pb::ReportRequest, who: &str) -> Vec<EdgeInput> {
        validate(&id(who), r, |_| true, |_| true).expect("valid report")
    }

    #[test]
    fn rates_success_and_latency_over_the_covered_time() {
        let mut s = Stats::default();
        // 10 s of reports, one a second, 100 requests each of which 10 fail.
        for t in 1..=10u64 {
            let r = report(vec![edge(
                pb::EdgeDirection::Outbound,
                "",
                "web.shop",
                90,
                10,
            )]);
            s.record(
                CLIENT,
                ok(&r, CLIENT),
                100_000 + t * 1000,
                1000,
                100_000 + t * 1000,
            );
        }
        let w = W1;
        let now = 111_000;
        let f = &s.services(w, now, None)[0];
        assert_eq!((f.agg.requests, f.agg.successes), (1000, 900));
        assert!((f.rps - 100.0).abs() < 1.0, "{}", f.rps);
        assert!((f.success_rate() - 0.9).abs() < 1e-9);
        assert!((f.quantile_ms(0.99) / 10.0 - 1.0).abs() < 0.05);
        assert_eq!(f.side, Side::Outbound);
        assert_eq!(
            s.edges(w, now, None)[0].source,
            CLIENT,
            "outbound source is the reporter"
        );
        // A minute of silence later the 1-minute window is empty, the 10-minute one still holds it,
        // its rate diluted over the time since.
        let later = 200_000;
        assert!(s.services(w, later, None).is_empty());
        let f = &s.services(W10, later, None)[0];
        assert_eq!(f.agg.requests, 1000);
        assert!((f.rps - 10.0).abs() < 0.5, "{}", f.rps);
    }

    #[test]
    fn the_window_slides_slot_by_slot() {
        let mut s = Stats::default();
        let w = W1;
        for t in 0..120u64 {
            let r = report(vec![edge(
                pb::EdgeDirection::Outbound,
                "",
                "web.shop",
                10,
                0,
            )]);
            s.record(CLIENT, ok(&r, CLIENT), (t + 1) * 1000, 1000, (t + 1) * 1000);
        }
        let f = &s.services(w, 120_000, None)[0];
        // 55-60 s of a 10 req/s stream.
        assert!((550..=600).contains(&f.agg.requests), "{}", f.agg.requests);
        assert!((f.rps - 10.0).abs() < 0.3, "{}", f.rps);
    }

    #[test]
    fn a_late_summary_lands_where_its_interval_ended() {
        let mut s = Stats::default();
        let r = report(vec![edge(
            pb::EdgeDirection::Outbound,
            "",
            "web.shop",
            10,
            0,
        )]);
        // Arrives at 200 s, ended 130 s before: outside the last minute.
        s.record(CLIENT, ok(&r, CLIENT), 70_000, 1000, 200_000);
        assert!(s.services(W1, 200_000, None).is_empty());
        assert_eq!(s.services(W10, 200_000, None)[0].agg.requests, 10);
    }

    #[test]
    fn services_prefer_the_callers_side_and_sum_edges() {
        let mut s = Stats::default();
        let r = report(vec![edge(
            pb::EdgeDirection::Inbound,
            CLIENT,
            "web.shop",
            50,
            0,
        )]);
        s.record(WEB, ok(&r, WEB), 10_000, 1000, 10_000);
        let f = s.services(W1, 10_000, Some("web"));
        assert_eq!((f[0].side, f[0].agg.requests), (Side::Inbound, 50));
        let r = report(vec![edge(
            pb::EdgeDirection::Outbound,
            "",
            "web.shop",
            40,
            10,
        )]);
        s.record(CLIENT, ok(&r, CLIENT), 10_000, 1000, 10_000);
        let other = "spiffe://td/ns/shop/sa/other";
        let r = report(vec![edge(
            pb::EdgeDirection::Outbound,
            "",
            "web.shop",
            5,
            0,
        )]);
        s.record(other, ok(&r, other), 10_000, 1000, 10_000);
        let f = s.services(W1, 10_000, Some("web.shop"));
        assert_eq!((f[0].side, f[0].agg.requests), (Side::Outbound, 55));
        assert_eq!(s.edges(W1, 10_000, None).len(), 3);
        assert!(s.services(W1, 10_000, Some("api")).is_empty());
    }

    #[test]
    fn tcp_connections_open_and_mtls_share() {
        let mut s = Stats::default();
        let mut e = edge(pb::EdgeDirection::Inbound, CLIENT, "db.shop", 0, 0);
        e.latency_counts.clear();
        e.tcp_opened = 5;
        e.tcp_closed = 2;
        e.tcp_closed_failed = 1;
        e.bytes_to_destination = 100;
        let r = report(vec![e]);
        let db = "spiffe://td/ns/shop/sa/db";
        s.record(db, ok(&r, db), 1000, 1000, 1000);
        let f = &s.services(W1, 1000, None)[0];
        assert_eq!((f.tcp_open, f.agg.tcp[2], f.agg.bytes), (3, 1, 100));
        assert!((f.mtls_share() - 1.0).abs() < 1e-9);
        // Outbound requests that found no peer did not cross mTLS.
        let mut e = edge(pb::EdgeDirection::Outbound, "", "web.shop", 4, 0);
        e.mtls_requests = 3;
        s.record(CLIENT, ok(&report(vec![e]), CLIENT), 1000, 1000, 1000);
        let f = s.services(W1, 1000, Some("web.shop"));
        assert!((f[0].mtls_share() - 0.75).abs() < 1e-9);
    }

    #[test]
    fn malformed_and_foreign_reports_are_refused() {
        let me = id(WEB);
        let check = |e: pb::EdgeSummary| {
            validate(
                &me,
                &report(vec![e]),
                |s| s == "web.shop",
                |s| s == "web.shop",
            )
        };
        let good = edge(pb::EdgeDirection::Inbound, CLIENT, "web.shop", 1, 0);
        assert!(check(good.clone()).is_ok());
        let mut e = good.clone();
        e.requests = 5;
        assert_eq!(check(e).expect_err("refused").reason(), "malformed");
        let mut e = good.clone();
        e.direction = 0;
        assert_eq!(check(e).expect_err("refused").reason(), "malformed");
        let mut e = good.clone();
        e.source = "not-an-id".into();
        assert_eq!(check(e).expect_err("refused").reason(), "malformed");
        let mut e = good.clone();
        e.service = "Web/../x".into();
        assert_eq!(check(e).expect_err("refused").reason(), "malformed");
        let mut e = good.clone();
        e.latency_offset = LatencyBuckets::COUNT as u32;
        assert_eq!(check(e).expect_err("refused").reason(), "malformed");
        let mut e = good.clone();
        e.tcp_closed_failed = 1;
        assert_eq!(check(e).expect_err("refused").reason(), "malformed");
        // Inbound for a service the reporter does not serve; outbound naming another source.
        let e = edge(pb::EdgeDirection::Inbound, CLIENT, "pay.shop", 1, 0);
        assert_eq!(check(e).expect_err("refused").reason(), "not_allowed");
        let e = edge(pb::EdgeDirection::Outbound, CLIENT, "web.shop", 1, 0);
        assert_eq!(check(e).expect_err("refused").reason(), "malformed");
        let e = edge(pb::EdgeDirection::Outbound, "", "nope.shop", 1, 0);
        assert_eq!(check(e).expect_err("refused").reason(), "not_allowed");
        let many = report(vec![good.clone(); MAX_REPORT_EDGES + 1]);
        assert_eq!(
            validate(&me, &many, |_| true, |_| true)
                .expect_err("refused")
                .reason(),
            "too_many_edges"
        );
        let mut old = report(vec![good]);
        old.age_ms = u32::MAX;
        assert_eq!(
            validate(&me, &old, |_| true, |_| true)
                .expect_err("refused")
                .reason(),
            "stale"
        );
    }

    #[test]
    fn a_flood_of_edges_stays_within_the_bounds() {
        let mut s = Stats::new(100, 30);
        for r in 0..10 {
            let reporter = format!("spiffe://td/ns/shop/sa/r{r}");
            for i in 0..50 {
                let e = edge(
                    pb::EdgeDirection::Inbound,
                    &format!("spiffe://td/ns/x/sa/c{r}-{i}"),
                    "web.shop",
                    1,
                    0,
                );
                let inputs =
                    validate(&id(&reporter), &report(vec![e]), |_| true, |_| true).expect("valid");
                s.record(&reporter, inputs, 1000, 1000, 1000);
            }
        }
        assert_eq!(s.len(), 100, "the table bound");
        assert!(
            s.per_creator.values().all(|n| *n <= 30),
            "the per-reporter bound"
        );
        assert_eq!(s.refused.get("edges_full"), Some(&400));
        // An hour of silence frees them all.
        s.record("x", Vec::new(), 0, 0, 1000 + 3_700_000);
        assert!(s.is_empty());
        assert!(s.per_creator.is_empty());
    }

    #[test]
    fn histograms_merge_exactly() {
        let mut a = Hist::default();
        a.add(10, &[1, 2]);
        a.add(5, &[3]);
        a.add(20, &[4]);
        let mut dense = [0u64; 21];
        dense[5] = 3;
        dense[10] = 1;
        dense[11] = 2;
        dense[20] = 4;
        assert_eq!(a.offset, 5);
        assert_eq!(a.counts, dense[5..]);
        a.add(LatencyBuckets::COUNT - 1, &[1, 1, 1]);
        assert_eq!(a.offset + a.counts.len(), LatencyBuckets::COUNT);
    }
}

/// The statistics shared by the API services, with the clock they are kept on.
#[derive(Debug)]
pub struct StatsStore {
    stats: std::sync::Mutex<Stats>,
    epoch: std::time::Instant,
}

impl Default for StatsStore {
    fn default() -> Self {
        Self {
            stats: std::sync::Mutex::new(Stats::default()),
            epoch: std::time::Instant::now(),
        }
    }
}

impl StatsStore {
    /// Milliseconds since the store was made.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The statistics, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}
