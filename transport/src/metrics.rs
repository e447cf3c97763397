//! Proxy metrics in Prometheus text format.
//!
//! Label sets are small and fixed: direction, peer identity, and a reason drawn from a closed list, so the
//! series count grows with the number of peers, never with traffic. Hot-path counters are resolved once
//! per QUIC connection ([`PeerMetrics`]) and then only incremented, so a stream pays no map lookup.
//! QUIC path figures (RTT, loss) are read from the live connections at scrape time.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Which side of a tunnel a proxy is on.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// This proxy accepted the QUIC connection (it fronts the destination app).
    Inbound,
    /// This proxy dialled the QUIC connection (it fronts the source app).
    Outbound,
}

impl EncodeLabelValue for Direction {
    fn encode(
        &self,
        e: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        e.write_str(match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        })
    }
}

/// Labels of a peer verification refusal.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Side that refused.
    pub direction: Direction,
    /// Why, e.g. `unknown_ca`, `expired`, `wrong_trust_domain`.
    pub reason: &'static str,
}

/// Labels of a policy denial.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// Destination service (`name.namespace`).
    pub service: String,
    /// Which policy denied: `authorization`, `rate_limit`, `revocation`.
    pub policy: &'static str,
    /// `enforce` (refused) or `audit` (would have been refused, let through).
    pub mode: &'static str,
}

/// Labels keyed by peer identity.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// Side of the tunnel.
    pub direction: Direction,
    /// Peer SPIFFE ID.
    pub peer: String,
}

/// Labels of closed tunneled connections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    /// Side of the tunnel.
    pub direction: Direction,
    /// Peer SPIFFE ID.
    pub peer: String,
    /// `ok`, or the failure, e.g. `connect_failed`, `deadline_exceeded`, `reset`.
    pub outcome: &'static str,
}

/// Labels of byte counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// Side of the tunnel.
    pub direction: Direction,
    /// Peer SPIFFE ID.
    pub peer: String,
    /// `to_peer` (read from the local app) or `from_peer` (written to the local app).
    pub flow: &'static str,
}

/// Labels that only carry a direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// Side of the tunnel.
    pub direction: Direction,
}

/// Labels with a direction and a reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Side of the tunnel.
    pub direction: Direction,
    /// Closed list of reasons.
    pub reason: &'static str,
}

/// Labels of a finished HTTP request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Side of the tunnel.
    pub direction: Direction,
    /// The other proxy's identity (the caller inbound, the server outbound; empty if none answered).
    pub peer: String,
    /// Destination service, `name.namespace`.
    pub service: String,
    /// HTTP status code the caller got.
    pub status_code: u16,
    /// gRPC status, for gRPC requests that carried one (empty otherwise).
    pub grpc_status: Option<u32>,
}

/// Labels of the request latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// Side of the tunnel.
    pub direction: Direction,
    /// Destination service, `name.namespace`.
    pub service: String,
    /// `success` (below 500 and gRPC OK or none) or `failure`.
    pub classification: &'static str,
}

/// Golden metrics of HTTP and gRPC requests.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    /// Requests finished, by peer, service and status.
    pub total: Family<RequestLabels, Counter>,
    /// Time from the request head to the response head, seconds.
    pub duration: Family<LatencyLabels, Histogram>,
    /// Requests in flight.
    pub in_flight: Family<DirectionLabels, Gauge>,
    /// Endpoints ejected after failures in a row.
    pub ejections: Counter,
    /// The two gauges of `in_flight` (inbound, outbound), found once rather than per request.
    in_flight_by_direction: [Gauge; 2],
}

impl RequestMetrics {
    /// The in-flight gauge of one direction.
    pub fn in_flight(&self, direction: Direction) -> Gauge {
        self.in_flight_by_direction[match direction {
            Direction::Inbound => 0,
            Direction::Outbound => 1,
        }]
        .clone()
    }
}

impl Default for RequestMetrics {
    fn default() -> Self {
        let in_flight = Family::<DirectionLabels, Gauge>::default();
        Self {
            total: Family::default(),
            // 100 µs to ~13 s.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            }),
            in_flight_by_direction: [Direction::Inbound, Direction::Outbound].map(|direction| {
                in_flight
                    .get_or_create(&DirectionLabels { direction })
                    .clone()
            }),
            in_flight,
            ejections: Counter::default(),
        }
    }
}

/// Every proxy metric.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Tunneled connections opened, by peer identity.
    pub opened: Family<PeerLabels, Counter>,
    /// Tunneled connections closed, by peer identity and outcome.
    pub closed: Family<ClosedLabels, Counter>,
    /// Application bytes carried, by peer identity and flow.
    pub bytes: Family<BytesLabels, Counter>,
    /// Tunneled connections open now.
    pub active: Family<DirectionLabels, Gauge>,
    /// Connect-phase retries, by reason.
    pub retries: Family<ReasonLabels, Counter>,
    /// Retries not made because the budget was spent.
    pub retries_denied: Counter,
    /// Tunneled connections that failed before reaching the destination, by reason (after retries).
    pub failures: Family<ReasonLabels, Counter>,
    /// QUIC handshakes that failed, by reason.
    pub handshake_failures: Family<ReasonLabels, Counter>,
    /// Peer certificates refused, by reason.
    pub refusals: Family<RefusalLabels, Counter>,
    /// Malformed stream headers from peers, by reason.
    pub protocol_errors: Family<ReasonLabels, Counter>,
    /// Streams and requests a policy refused (or would have, in audit mode).
    pub denials: Family<DenialLabels, Counter>,
    /// Live QUIC connections, read at scrape time.
    pub connections: Arc<ConnectionTable>,
    /// QUIC handshakes completed with a verified peer.
    pub handshakes: Family<DirectionLabels, Counter>,
    /// Distinct peer certificates (by serial) seen in handshakes: grows with every peer rotation.
    pub peer_certs_seen: Family<DirectionLabels, Counter>,
    seen_serials: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Pooled connections replaced because our own certificate was renewed since their handshake.
    pub rotated_connections: Counter,
    /// Certificate and controller state (controller mode).
    pub identity: IdentityMetrics,
    /// HTTP and gRPC requests.
    pub requests: RequestMetrics,
    /// What peers cost the endpoints: admissions, handshakes and header waits, dead connections.
    pub endpoint: EndpointMetrics,
    /// Traffic per edge, for the reports to the controller (controller mode).
    pub edges: Arc<EdgeTable>,
    /// Live request samples for `ctl tap` (controller mode).
    pub tap: Arc<Tap>,
    /// The access log (`[access_log]`; off unless configured).
    pub access_log: Arc<crate::access_log::AccessLog>,
    /// Spans per hop exported with OTLP (`[tracing]`; off unless configured).
    pub tracer: Arc<crate::trace::Tracer>,
}

/// Labels of an admission decision.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `accept`, `retry`, `refuse` or `ignore`.
    pub decision: &'static str,
}

/// The bounds on what peers cost (`proxy/admission.rs`) and dead pooled connections.
#[derive(Debug, Clone, Default)]
pub struct EndpointMetrics {
    /// New inbound connection attempts, by decision.
    pub admissions: Family<DecisionLabels, Counter>,
    /// Inbound handshakes in progress.
    pub handshakes_in_progress: Gauge,
    /// Inbound streams waiting for their header, over all connections.
    pub header_waits: Gauge,
    /// Inbound streams reset because every connection together was at the header-wait cap.
    pub streams_refused: Counter,
    /// Pooled outbound connections closed because the peer was gone (stateless reset, or no packet at
    /// all while a stream waited for its answer).
    pub dead_connections: Counter,
}

impl EndpointMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "inbound_admissions",
            "New inbound QUIC connection attempts, by decision (accept, retry, refuse, ignore)",
            self.admissions.clone(),
        );
        r.register(
            "inbound_handshakes_in_progress",
            "Inbound QUIC handshakes in progress",
            self.handshakes_in_progress.clone(),
        );
        r.register(
            "inbound_header_waits",
            "Inbound streams waiting for their header",
            self.header_waits.clone(),
        );
        r.register(
            "inbound_streams_refused",
            "Inbound streams reset because the header-wait cap was reached",
            self.streams_refused.clone(),
        );
        r.register(
            "pool_dead_connections",
            "Pooled connections closed because the peer was gone",
            self.dead_connections.clone(),
        );
    }
}

/// Labels with a result.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// The proxy's own certificate and its link to the controller.
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    /// Expiry of the certificate presented now, Unix seconds (0 before the first).
    pub cert_expiry: Gauge,
    /// Certificates obtained from the controller (bootstrap and renewals), by result.
    pub certify: Family<ResultLabels, Counter>,
    /// 1 while a Watch stream to the controller is up.
    pub controller_connected: Gauge,
    /// Version of the last snapshot applied.
    pub snapshot_version: Gauge,
    /// Snapshots applied.
    pub snapshots: Counter,
    /// Watch streams lost or not established (each followed by a backoff and a new attempt).
    pub watch_failures: Counter,
    /// Endpoint registrations the controller refused (e.g. an identity not allowed to serve the service).
    pub registrations_refused: Counter,
    /// Traffic summaries the controller accepted.
    pub reports: Counter,
    /// Attempts to send the waiting summaries that failed (they stay queued).
    pub reports_failed: Counter,
    /// Summaries dropped unsent because newer ones filled the queue.
    pub reports_dropped: Counter,
}

/// Most serials remembered for [`Metrics::peer_certs_seen`]; the set is cleared beyond it.
const MAX_SERIALS: usize = 16_384;

impl Metrics {
    /// Counts a denial of `policy` for `service`; `audit` when it was let through.
    pub fn deny(&self, service: &impl std::fmt::Display, policy: &'static str, audit: bool) {
        self.denials
            .get_or_create(&DenialLabels {
                service: service.to_string(),
                policy,
                mode: if audit { "audit" } else { "enforce" },
            })
            .inc();
    }

    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            bytes: Family::default(),
            active: Family::default(),
            retries: Family::default(),
            retries_denied: Counter::default(),
            failures: Family::default(),
            handshake_failures: Family::default(),
            refusals: Family::default(),
            protocol_errors: Family::default(),
            denials: Family::default(),
            connections: Arc::default(),
            handshakes: Family::default(),
            peer_certs_seen: Family::default(),
            seen_serials: Arc::default(),
            rotated_connections: Counter::default(),
            identity: IdentityMetrics::default(),
            requests: RequestMetrics::default(),
            endpoint: EndpointMetrics::default(),
            edges: Arc::default(),
            tap: Arc::default(),
            access_log: Arc::default(),
            tracer: Arc::default(),
        };
        let r = registry.sub_registry_with_prefix("quicmesh");
        r.register(
            "tunnel_opened",
            "Tunneled connections opened",
            m.opened.clone(),
        );
        r.register(
            "tunnel_closed",
            "Tunneled connections closed, by outcome",
            m.closed.clone(),
        );
        r.register(
            "tunnel_bytes",
            "Application bytes carried through tunnels",
            m.bytes.clone(),
        );
        r.register(
            "tunnel_active",
            "Tunneled connections open now",
            m.active.clone(),
        );
        r.register(
            "retries",
            "Connect-phase retries of tunneled connections",
            m.retries.clone(),
        );
        r.register(
            "retries_budget_exhausted",
            "Retries not made because the retry budget was spent",
            m.retries_denied.clone(),
        );
        r.register(
            "tunnel_failures",
            "Tunneled connections that never reached the destination app",
            m.failures.clone(),
        );
        r.register(
            "quic_handshake_failures",
            "QUIC handshakes that failed",
            m.handshake_failures.clone(),
        );
        r.register(
            "peer_refusals",
            "Peer certificates refused (authentication/authorization failures)",
            m.refusals.clone(),
        );
        r.register(
            "policy_denials",
            "Streams and requests refused by a policy, or let through by one in audit mode",
            m.denials.clone(),
        );
        r.register(
            "protocol_errors",
            "Malformed tunnel stream headers received",
            m.protocol_errors.clone(),
        );
        r.register_collector(Box::new(m.connections.clone()));
        r.register(
            "requests",
            "HTTP and gRPC requests finished, by peer, destination service and status",
            m.requests.total.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request head to response head",
            m.requests.duration.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected from load balancing after failed requests in a row",
            m.requests.ejections.clone(),
        );
        r.register(
            "requests_in_flight",
            "HTTP and gRPC requests in flight",
            m.requests.in_flight.clone(),
        );
        r.register(
            "peer_handshakes",
            "QUIC handshakes completed with a verified peer",
            m.handshakes.clone(),
        );
        r.register(
            "peer_certificates_seen",
            "Distinct peer certificates (by serial) presented in handshakes",
            m.peer_certs_seen.clone(),
        );
        r.register(
            "pool_rotated_connections",
            "Pooled connections replaced after our certificate was renewed",
            m.rotated_connections.clone(),
        );
        let id = &m.identity;
        r.register(
            "identity_cert_expiry_seconds",
            "Expiry of the certificate this proxy presents, Unix seconds",
            id.cert_expiry.clone(),
        );
        r.register(
            "identity_certify",
            "Certificates requested from the controller (bootstrap and renewals), by result",
            id.certify.clone(),
        );
        r.register(
            "controller_connected",
            "1 while the Watch stream to the controller is up",
            id.controller_connected.clone(),
        );
        r.register(
            "controller_snapshot_version",
            "Version of the last configuration snapshot applied",
            id.snapshot_version.clone(),
        );
        r.register(
            "controller_snapshots",
            "Configuration snapshots applied",
            id.snapshots.clone(),
        );
        r.register(
            "controller_watch_failures",
            "Watch streams to the controller lost or not established",
            id.watch_failures.clone(),
        );
        r.register(
            "controller_registrations_refused",
            "Inbound endpoint registrations the controller refused",
            id.registrations_refused.clone(),
        );
        r.register(
            "controller_reports",
            "Traffic summaries the controller accepted",
            id.reports.clone(),
        );
        r.register(
            "controller_reports_failed",
            "Attempts to send traffic summaries that failed (the summaries stay queued)",
            id.reports_failed.clone(),
        );
        r.register(
            "controller_reports_dropped",
            "Traffic summaries dropped unsent because the queue was full",
            id.reports_dropped.clone(),
        );
        r.register(
            "tap_active",
            "1 while the controller has this proxy sample requests for a live tap",
            m.tap.active.clone(),
        );
        r.register(
            "tap_samples",
            "Request samples sent to a live tap",
            m.tap.sent.clone(),
        );
        r.register(
            "tap_samples_skipped",
            "Request samples not sent (rate bound or full queue)",
            m.tap.skipped.clone(),
        );
        r.register(
            "access_log_lines",
            "Access log lines queued for writing",
            m.access_log.lines.clone(),
        );
        r.register(
            "access_log_dropped",
            "Access log lines dropped (the writer fell behind or failed)",
            m.access_log.dropped.clone(),
        );
        r.register(
            "trace_spans_exported",
            "Spans the OTLP collector accepted",
            m.tracer.exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Spans dropped (full queue or failed export)",
            m.tracer.dropped.clone(),
        );
        m.endpoint.register(r);
        m
    }

    /// Counts a completed handshake and, if its certificate is new to us, the peer certificate.
    pub fn observe_handshake(&self, direction: Direction, conn: &quinn::Connection) {
        let labels = DirectionLabels { direction };
        self.handshakes.get_or_create(&labels).inc();
        let serial = conn
            .peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|certs| {
                let der = certs.first()?;
                crate::identity::inspect::CertInfo::from_der(der).ok()
            })
            .map(|i| i.serial_hex);
        let Some(serial) = serial else { return };
        let new = {
            let mut seen = self.seen_serials.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() >= MAX_SERIALS {
                seen.clear();
            }
            seen.insert(serial)
        };
        if new {
            self.peer_certs_seen.get_or_create(&labels).inc();
        }
    }

    /// Resolves the per-peer counters once for a new QUIC connection.
    pub fn peer(&self, direction: Direction, peer: &str) -> PeerMetrics {
        let b = |flow| {
            self.bytes
                .get_or_create(&BytesLabels {
                    direction,
                    peer: peer.to_owned(),
                    flow,
                })
                .clone()
        };
        let closed = |outcome| {
            self.closed
                .get_or_create(&ClosedLabels {
                    direction,
                    peer: peer.to_owned(),
                    outcome,
                })
                .clone()
        };
        PeerMetrics {
            opened: self
                .opened
                .get_or_create(&PeerLabels {
                    direction,
                    peer: peer.to_owned(),
                })
                .clone(),
            closed_ok: closed("ok"),
            closed_error: closed("error"),
            closed_deadline: closed("deadline_exceeded"),
            to_peer: b("to_peer"),
            from_peer: b("from_peer"),
            active: self
                .active
                .get_or_create(&DirectionLabels { direction })
                .clone(),
        }
    }
}

/// Counters of one peer, cheap to clone (each is an `Arc`).
#[derive(Debug, Clone)]
pub struct PeerMetrics {
    /// Tunneled connections opened.
    pub opened: Counter,
    /// Closed after a clean end both ways.
    pub closed_ok: Counter,
    /// Closed on an error or reset.
    pub closed_error: Counter,
    /// Closed because the deadline expired.
    pub closed_deadline: Counter,
    /// Bytes read from the local app and sent to the peer.
    pub to_peer: Counter,
    /// Bytes received from the peer and written to the local app.
    pub from_peer: Counter,
    /// Open tunneled connections (shared by every peer of a direction).
    pub active: Gauge,
}

/// One live QUIC connection's path figures at one moment (what traffic reports carry per peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnReading {
    /// The [`ConnectionTable`]'s id for the connection (stable while it lives).
    pub id: u64,
    /// Who dialed: outbound = this proxy.
    pub direction: Direction,
    /// The other proxy's SPIFFE ID.
    pub peer: String,
    /// Its UDP address.
    pub remote: SocketAddr,
    /// Smoothed RTT.
    pub rtt: std::time::Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Packets sent and declared lost since the connection opened.
    pub sent: u64,
    /// Lost.
    pub lost: u64,
}

/// The live QUIC connections, so a scrape can read their RTT and loss. Registered under the
/// `quicmesh_` prefix, so its own names carry none.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (Direction, String, quinn::Connection)>>,
}

impl ConnectionTable {
    /// Tracks `conn` until it closes.
    pub fn track(self: &Arc<Self>, direction: Direction, peer: String, conn: quinn::Connection) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (direction, peer, conn.clone()));
        let table = self.clone();
        tokio::spawn(async move {
            conn.closed().await;
            table.lock().remove(&id);
        });
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (Direction, String, quinn::Connection)>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every live connection's path figures now, keyed by the table's id for it.
    pub fn readings(&self) -> Vec<ConnReading> {
        self.lock()
            .iter()
            .map(|(id, (d, p, c))| {
                let s = c.stats().path;
                ConnReading {
                    id: *id,
                    direction: *d,
                    peer: p.clone(),
                    remote: c.remote_address(),
                    rtt: s.rtt,
                    cwnd: s.cwnd,
                    sent: s.sent_packets,
                    lost: s.lost_packets,
                }
            })
            .collect()
    }

    fn snapshot(&self) -> Vec<(Direction, String, SocketAddr, quinn::Connection)> {
        self.lock()
            .values()
            .map(|(d, p, c)| (*d, p.clone(), c.remote_address(), c.clone()))
            .collect()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    direction: Direction,
    peer: String,
    remote: String,
}

impl Collector for ConnectionTable {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let conns = self.snapshot();
        let labels: Vec<_> = conns
            .iter()
            .map(|(d, p, a, c)| {
                (
                    ConnLabels {
                        direction: *d,
                        peer: p.clone(),
                        remote: a.to_string(),
                    },
                    c.stats(),
                )
            })
            .collect();
        let e = encoder.encode_descriptor(
            "quic_connections",
            "Live QUIC connections between proxies",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(conns.len() as i64).encode(e)?;
        let mut e = encoder.encode_descriptor(
            "quic_rtt_seconds",
            "Smoothed round-trip time of each QUIC connection",
            None,
            MetricType::Gauge,
        )?;
        for (l, s) in &labels {
            ConstGauge::new(s.path.rtt.as_secs_f64()).encode(e.encode_family(l)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "quic_lost_packets",
            "Packets declared lost on each QUIC connection",
            None,
            MetricType::Counter,
        )?;
        for (l, s) in &labels {
            ConstCounter::new(s.path.lost_packets).encode(e.encode_family(l)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "quic_congestion_window_bytes",
            "Congestion window of each QUIC connection",
            None,
            MetricType::Gauge,
        )?;
        for (l, s) in &labels {
            ConstGauge::new(s.path.cwnd as i64).encode(e.encode_family(l)?)?;
        }
        Ok(())
    }
}

/// The fixed, mergeable latency buckets of traffic reports: bucket 0 holds latencies below
/// [`LatencyBuckets::FIRST`], bucket `i` those in `[FIRST·2^((i-1)/8), FIRST·2^(i/8))`, the last one
/// everything above. Eight buckets per doubling keep a quantile read at a bucket's geometric middle
/// within ±4.5% of the truth; summing the counts of two histograms merges them exactly.
pub struct LatencyBuckets;

impl LatencyBuckets {
    /// Upper bound of bucket 0, seconds (50 µs).
    pub const FIRST: f64 = 50e-6;
    /// Buckets per doubling.
    pub const PER_DOUBLING: f64 = 8.0;
    /// Number of buckets: up to 50 µs · 2^21 ≈ 105 s, then one open bucket.
    pub const COUNT: usize = 170;

    /// The bucket of a latency in seconds.
    pub fn index(secs: f64) -> usize {
        if secs.is_nan() || secs < Self::FIRST {
            // Below the first bound, zero or NaN.
            return 0;
        }
        let i = ((secs / Self::FIRST).log2() * Self::PER_DOUBLING).floor() + 1.0;
        if i >= (Self::COUNT - 1) as f64 {
            Self::COUNT - 1
        } else {
            i as usize
        }
    }

    /// The lower and upper bounds of bucket `i`, seconds (the last bucket's upper bound is its lower
    /// bound doubled: a reading there is at least that slow).
    pub fn bounds(i: usize) -> (f64, f64) {
        let at = |k: usize| Self::FIRST * 2f64.powf(k as f64 / Self::PER_DOUBLING);
        match i {
            0 => (0.0, Self::FIRST),
            i if i >= Self::COUNT - 1 => (at(Self::COUNT - 2), at(Self::COUNT - 2) * 2.0),
            i => (at(i - 1), at(i)),
        }
    }

    /// Quantile `q` (0..=1) of a histogram of these buckets, seconds: the geometric middle of the
    /// bucket holding it (0 for an empty histogram).
    pub fn quantile(counts: &[u64], q: f64) -> f64 {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        // The rank of the quantile, 1-based: p99 of 100 readings is the 99th.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = Self::bounds(i);
                return if lo == 0.0 {
                    hi / 2.0
                } else {
                    (lo * hi).sqrt()
                };
            }
        }
        Self::bounds(counts.len().saturating_sub(1)).1
    }
}

/// Failure class of a finished request, as traffic reports count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    /// Below 500, gRPC OK or none.
    Success,
    /// 504 or gRPC `DEADLINE_EXCEEDED`.
    Timeout,
    /// 502/503 or gRPC `UNAVAILABLE`.
    Unavailable,
    /// Any other 5xx.
    Server,
    /// Any other gRPC status.
    Grpc,
}

impl RequestClass {
    /// Classifies an HTTP status and an optional gRPC status.
    pub fn of(status: u16, grpc: Option<u32>) -> Self {
        match (status, grpc) {
            (504, _) | (_, Some(4)) => Self::Timeout,
            (502 | 503, _) | (_, Some(14)) => Self::Unavailable,
            (s, _) if s >= 500 => Self::Server,
            (_, Some(g)) if g != 0 => Self::Grpc,
            _ => Self::Success,
        }
    }
}

/// Running totals of one edge (source identity -> destination service, one direction), updated with
/// relaxed atomic adds; the report sender reads them and sends the differences.
#[derive(Debug)]
pub struct EdgeCounters {
    /// Requests finished.
    pub requests: AtomicU64,
    /// Of them, successes.
    pub successes: AtomicU64,
    /// Failures by class: timeout, unavailable, server, grpc.
    pub failures: [AtomicU64; 4],
    /// Requests that crossed a verified hop between proxies.
    pub mtls: AtomicU64,
    /// Latency histogram on [`LatencyBuckets`].
    pub latency: [AtomicU64; LatencyBuckets::COUNT],
    /// TCP connections opened.
    pub tcp_opened: AtomicU64,
    /// TCP connections closed.
    pub tcp_closed: AtomicU64,
    /// Of them, closed by a reset or deadline.
    pub tcp_failed: AtomicU64,
    /// Bytes towards the destination app.
    pub bytes_to: AtomicU64,
    /// Bytes from the destination app.
    pub bytes_from: AtomicU64,
}

impl Default for EdgeCounters {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: Default::default(),
            mtls: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            tcp_opened: AtomicU64::new(0),
            tcp_closed: AtomicU64::new(0),
            tcp_failed: AtomicU64::new(0),
            bytes_to: AtomicU64::new(0),
            bytes_from: AtomicU64::new(0),
        }
    }
}

impl EdgeCounters {
    /// Counts a finished request: its class and whether it crossed mTLS.
    pub fn request(&self, class: RequestClass, mtls: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let slot = match class {
            RequestClass::Success => &self.successes,
            RequestClass::Timeout => &self.failures[0],
            RequestClass::Unavailable => &self.failures[1],
            RequestClass::Server => &self.failures[2],
            RequestClass::Grpc => &self.failures[3],
        };
        slot.fetch_add(1, Ordering::Relaxed);
        if mtls {
            self.mtls.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a request's latency (request head to response head), seconds.
    pub fn latency(&self, secs: f64) {
        self.latency[LatencyBuckets::index(secs)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an opened TCP connection.
    pub fn tcp_open(&self) {
        self.tcp_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a closed TCP connection and the bytes it carried.
    pub fn tcp_close(&self, failed: bool, to_destination: u64, from_destination: u64) {
        self.tcp_closed.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.tcp_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes_to.fetch_add(to_destination, Ordering::Relaxed);
        self.bytes_from
            .fetch_add(from_destination, Ordering::Relaxed);
    }
}

/// Identity of an edge in a proxy's table.
#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeKey {
    /// Side that counted it.
    pub direction: Direction,
    /// Caller identity (inbound; empty outbound, where it is this proxy).
    pub source: String,
    /// Destination service, `name.namespace`.
    pub service: String,
}

/// Most edges a proxy keeps apart; traffic of further edges is counted under [`EdgeTable::OVERFLOW`].
pub const MAX_EDGES: usize = 256;

/// The edges this proxy has seen, for the traffic reports. Bounded by [`MAX_EDGES`] (≈1.5 KB each):
/// a caller cycling through identities or services cannot grow it. Found per request on both proxies,
/// so the lookup borrows the names (service, then source, per direction) and allocates nothing.
#[derive(Debug, Default)]
pub struct EdgeTable {
    edges: Mutex<Edges>,
}

/// Per direction (inbound, outbound): service -> source -> counters.
#[derive(Debug, Default)]
struct Edges {
    by_direction: [HashMap<String, HashMap<String, Arc<EdgeCounters>>>; 2],
    len: usize,
}

fn slot(direction: Direction) -> usize {
    match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

impl EdgeTable {
    /// Service name under which edges past the bound are counted.
    pub const OVERFLOW: &'static str = "_overflow";

    /// The counters of an edge, created on first use.
    pub fn edge(&self, direction: Direction, source: &str, service: &str) -> Arc<EdgeCounters> {
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let edges = &mut *edges;
        let map = &mut edges.by_direction[slot(direction)];
        if let Some(e) = map.get(service).and_then(|m| m.get(source)) {
            return e.clone();
        }
        let (source, service) = if edges.len >= MAX_EDGES {
            ("", Self::OVERFLOW)
        } else {
            (source, service)
        };
        let counters = map
            .entry(service.to_owned())
            .or_default()
            .entry(source.to_owned())
            .or_insert_with(|| {
                edges.len += 1;
                Arc::default()
            });
        counters.clone()
    }

    /// Every edge and its counters.
    pub fn all(&self) -> Vec<(EdgeKey, Arc<EdgeCounters>)> {
        let edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(edges.len);
        for (direction, map) in [Direction::Inbound, Direction::Outbound]
            .into_iter()
            .zip(&edges.by_direction)
        {
            for (service, sources) in map {
                for (source, counters) in sources {
                    out.push((
                        EdgeKey {
                            direction,
                            source: source.clone(),
                            service: service.clone(),
                        },
                        counters.clone(),
                    ));
                }
            }
        }
        out
    }
}

/// One finished request offered to a live tap.
#[derive(Debug, Clone)]
pub struct TapSample {
    /// `name.namespace`.
    pub service: String,
    /// Request line: method and path (with query).
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Status code.
    pub status: u16,
    /// gRPC status, if any.
    pub grpc: Option<u32>,
    /// Request head to response head.
    pub latency: std::time::Duration,
    /// Caller identity.
    pub source: String,
    /// Request id, hex.
    pub request_id: String,
}

/// Live tap of the requests this proxy serves (`quicmesh ctl tap`): off unless the controller names
/// tapped services. Off, it costs the data plane one relaxed atomic load per request; on, a set lookup,
/// a rate check (at most `max_per_second`, the rest skipped) and a `try_send` that never waits.
#[derive(Debug, Default)]
pub struct Tap {
    on: std::sync::atomic::AtomicBool,
    inner: Mutex<TapInner>,
    /// 1 while some service is tapped.
    pub active: Gauge,
    /// Samples sent, and skipped (rate bound or full channel).
    pub sent: Counter,
    /// Samples skipped.
    pub skipped: Counter,
}

#[derive(Debug, Default)]
struct TapInner {
    services: std::collections::HashSet<String>,
    max_per_second: u32,
    window: Option<std::time::Instant>,
    in_window: u32,
    tx: Option<tokio::sync::mpsc::Sender<TapSample>>,
}

impl Tap {
    fn lock(&self) -> std::sync::MutexGuard<'_, TapInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taps `services` (empty: off), sending at most `max_per_second` samples to `tx`.
    pub fn set(
        &self,
        services: impl IntoIterator<Item = String>,
        max_per_second: u32,
        tx: Option<tokio::sync::mpsc::Sender<TapSample>>,
    ) {
        let mut i = self.lock();
        i.services = services.into_iter().collect();
        i.max_per_second = max_per_second;
        i.tx = tx;
        let on = !i.services.is_empty() && i.tx.is_some();
        self.on.store(on, Ordering::Relaxed);
        self.active.set(i64::from(on));
    }

    /// Whether requests for `service` are tapped now (cheap when nothing is).
    pub fn wants(&self, service: &impl std::fmt::Display) -> bool {
        self.on.load(Ordering::Relaxed) && self.lock().services.contains(&service.to_string())
    }

    /// Offers a sample; sent if the rate bound allows and the channel has room.
    pub fn offer(&self, s: TapSample) {
        let mut i = self.lock();
        let now = std::time::Instant::now();
        if i.window
            .is_none_or(|w| now.duration_since(w) >= std::time::Duration::from_secs(1))
        {
            i.window = Some(now);
            i.in_window = 0;
        }
        let sent = i.in_window < i.max_per_second
            && i.services.contains(&s.service)
            && i.tx.as_ref().is_some_and(|tx| tx.try_send(s).is_ok());
        if sent {
            i.in_window += 1;
            self.sent.inc();
        } else {
            self.skipped.inc();
        }
    }
}
