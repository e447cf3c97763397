//! W3C Trace Context (`traceparent`) across the mesh and a span per proxy hop, exported with OTLP.
//!
//! Why: a request crossing the mesh keeps one trace id from the first app to the last, and each
//! proxy hop that records a span puts its own span id in `traceparent` as the child of the span
//! that sent it, so the apps' tracers and the hops' spans form one tree in the tracing backend.
//!
//! Off (no `[tracing]`, the default) a proxy never touches the header: it costs one load per
//! request. Rewriting the parent id without exporting the span would leave the apps' spans pointing
//! at a parent no backend ever receives. On, a hop records a span when the request carries a
//! sampled `traceparent`; a request with none (or an invalid one) starts a trace at the caller's
//! proxy with probability `sample_percent` (the destination's proxy only continues traces). An
//! unsampled context passes untouched, `tracestate` always does.
//!
//! Spans go to a bounded queue (`try_send`: a slow or absent collector drops spans, counted, and
//! never delays a request); one task batches them to the collector's OTLP/gRPC `TraceService`.
//!
//! Pure: [`parse`] and [`decide`] decide from what arrived, [`format`] writes the header;
//! [`Tracer::hop`] applies them to a header map with random ids.

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::metrics::Direction;

/// The header.
pub const TRACEPARENT: &str = "traceparent";

/// The parts of a valid version-00 `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent<'a> {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: &'a str,
    /// 16 lowercase hex digits, not all zero.
    pub span_id: &'a str,
    /// 2 hex digits.
    pub flags: &'a str,
}

fn lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `value` as a `traceparent` (version 00, or a later version's first four fields as the
/// spec asks); `None` when it is not one. The fields sit at fixed offsets (`vv-` 32 `-` 16 `-` 2).
pub fn parse(value: &str) -> Option<Parent<'_>> {
    let b = value.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = value.get(..2)?;
    if !lower_hex(version) || version == "ff" {
        return None;
    }
    // Version 00 has exactly four fields; a later one may add fields after a dash.
    if b.len() > 55 && (version == "00" || b[55] != b'-') {
        return None;
    }
    let (trace_id, span_id, flags) = (value.get(3..35)?, value.get(36..52)?, value.get(53..55)?);
    (lower_hex(trace_id)
        && lower_hex(span_id)
        && lower_hex(flags)
        && trace_id.bytes().any(|b| b != b'0')
        && span_id.bytes().any(|b| b != b'0'))
    .then_some(Parent {
        trace_id,
        span_id,
        flags,
    })
}

/// Appends `bytes` as lowercase hex (a table, not the formatter: this runs twice per request).
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// The version-00 `traceparent` of a span.
pub fn format(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> String {
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, trace_id);
    out.push('-');
    push_hex(&mut out, span_id);
    out.push('-');
    push_hex(&mut out, &[flags]);
    out
}

/// The header's name, for lookups without parsing it per request.
const NAME: HeaderName = HeaderName::from_static(TRACEPARENT);

impl Parent<'_> {
    /// Whether the caller records this trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(self.flags, 16).is_ok_and(|f| f & 1 == 1)
    }
}

/// What a hop does with the trace context that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Record no span and leave the header as it came.
    Pass,
    /// Record a span as the child of this sampled parent.
    Child(Parent<'a>),
    /// Start a sampled trace here.
    Start,
}

/// The decision for `parent` (the parsed incoming header); `start` is asked (a random draw) only
/// when there is no valid context, and only a caller's proxy passes one that can say yes.
pub fn decide<'a>(parent: Option<Parent<'a>>, start: impl FnOnce() -> bool) -> Decision<'a> {
    match parent {
        Some(p) if p.sampled() => Decision::Child(p),
        Some(_) => Decision::Pass,
        None if start() => Decision::Start,
        None => Decision::Pass,
    }
}

/// `[tracing]` of the proxy configuration: spans per hop, exported with OTLP/gRPC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/gRPC address, `http://host:port` (e.g. a node-local OpenTelemetry
    /// collector on 4317).
    pub otlp_endpoint: String,
    /// Percent of requests without a sampled trace context for which the caller's proxy starts
    /// a trace (0 to 100; 1 by default).
    #[serde(default = "default_sample")]
    pub sample_percent: f64,
    /// Spans waiting for export; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_sample() -> f64 {
    1.0
}

fn default_queue() -> usize {
    8192
}

impl TracingConfig {
    /// Checks the values; the message names the key.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let uri: http::Uri = self
            .otlp_endpoint
            .parse()
            .map_err(|e| ("otlp_endpoint", format!("{:?}: {e}", self.otlp_endpoint)))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err((
                "otlp_endpoint",
                format!(
                    "{:?}: expected http://host:port (OTLP/gRPC without TLS, e.g. a node-local collector)",
                    self.otlp_endpoint
                ),
            ));
        }
        if !(0.0..=100.0).contains(&self.sample_percent) {
            return Err((
                "sample_percent",
                format!("{} is not within 0..=100", self.sample_percent),
            ));
        }
        if !(1..=1_000_000).contains(&self.queue) {
            return Err(("queue", format!("{} is not within 1..=1000000", self.queue)));
        }
        Ok(())
    }

    /// The draw (`u32`) below which a trace starts.
    fn threshold(&self) -> u64 {
        // The float is within 0..=100 (checked), so the product is within 0..=2^32.
        (self.sample_percent / 100.0 * 4_294_967_296.0) as u64
    }
}

#[derive(Debug)]
struct Exporter {
    tx: mpsc::Sender<Span>,
    threshold: u64,
}

/// The proxy's tracer: off (headers untouched) until [`Tracer::start`].
#[derive(Debug, Default)]
pub struct Tracer {
    exporter: OnceLock<Exporter>,
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans dropped: the queue was full or the export failed.
    pub dropped: Counter,
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The endpoint is not a URI tonic accepts.
    #[error("OTLP endpoint {0:?}: {1}")]
    Endpoint(String, String),
    /// Started twice.
    #[error("tracing is already started")]
    Started,
}

/// Most spans in one export request.
const BATCH: usize = 512;
/// Longest a span waits for its batch.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Deadline of one export request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

impl Tracer {
    /// Starts the export task to `cfg.otlp_endpoint` (connecting lazily: a collector that is not
    /// up yet costs dropped spans, not a failed start); `local` is this proxy's identity.
    pub fn start(&self, cfg: &TracingConfig, local: String) -> Result<(), TraceError> {
        let channel = tonic::transport::Endpoint::from_shared(cfg.otlp_endpoint.clone())
            .map_err(|e| TraceError::Endpoint(cfg.otlp_endpoint.clone(), e.to_string()))?
            .connect_timeout(crate::grpc::CONNECT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let (tx, rx) = mpsc::channel(cfg.queue);
        self.exporter
            .set(Exporter {
                tx,
                threshold: cfg.threshold(),
            })
            .map_err(|_| TraceError::Started)?;
        let client = TraceServiceClient::new(channel);
        tokio::spawn(export_loop(
            rx,
            client,
            resource(&local),
            self.exported.clone(),
            self.dropped.clone(),
        ));
        Ok(())
    }

    /// Whether spans are recorded (one load).
    pub fn is_on(&self) -> bool {
        self.exporter.get().is_some()
    }

    /// This hop's decision for the request whose fields are `headers`: when it records a span,
    /// `traceparent` becomes the span's own and the returned guard sends the span when dropped.
    pub fn hop(&self, headers: &mut HeaderMap, direction: Direction) -> Option<HopSpan> {
        let e = self.exporter.get()?;
        let parent = headers
            .get(NAME)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .and_then(parse);
        let decision = decide(parent, || {
            direction == Direction::Outbound && u64::from(rand::random::<u32>()) < e.threshold
        });
        let (trace_id, parent_id, flags) = match decision {
            Decision::Pass => return None,
            Decision::Child(p) => (
                unhex(p.trace_id)?,
                unhex(p.span_id),
                unhex::<1>(p.flags)?[0],
            ),
            Decision::Start => (nonzero(rand::random()), None, 1),
        };
        let span_id: [u8; 8] = nonzero(rand::random());
        if let Ok(v) = HeaderValue::from_str(&format(&trace_id, &span_id, flags)) {
            headers.insert(NAME, v);
        }
        Some(HopSpan {
            tx: e.tx.clone(),
            dropped: self.dropped.clone(),
            trace_id,
            span_id,
            parent_id,
            flags,
            direction,
            start: SystemTime::now(),
            fields: SpanFields::default(),
        })
    }
}

/// What a hop learns about its request, recorded as the span's attributes.
#[derive(Debug, Clone, Default)]
pub struct SpanFields {
    /// Request method.
    pub method: String,
    /// Path (clipped like the access log's).
    pub path: String,
    /// Destination service, `name.namespace`.
    pub service: String,
    /// The peer: the caller inbound, the destination's proxy outbound (its last try).
    pub peer: String,
    /// Request id, hex.
    pub request_id: String,
    /// Tries after the first (outbound).
    pub retries: u32,
    /// Status of the response head, when one came.
    pub status: Option<u16>,
    /// gRPC status, when the response head carried it.
    pub grpc_status: Option<u32>,
}

/// A span in progress: sent to the exporter when dropped, so every way out of a request ends it.
#[derive(Debug)]
pub struct HopSpan {
    tx: mpsc::Sender<Span>,
    dropped: Counter,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_id: Option<[u8; 8]>,
    flags: u8,
    direction: Direction,
    start: SystemTime,
    /// Filled in by the hop as it learns them.
    pub fields: SpanFields,
}

impl Drop for HopSpan {
    fn drop(&mut self) {
        let span = to_span(self, SystemTime::now());
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn attr(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// The OTLP span of `s`, ended at `end`. Attribute names follow OpenTelemetry's HTTP and RPC
/// conventions where one exists; the mesh's own are under `quicmesh.`.
fn to_span(s: &HopSpan, end: SystemTime) -> Span {
    let f = &s.fields;
    let (kind, peer_key) = match s.direction {
        Direction::Outbound => (SpanKind::Client, "quicmesh.destination_identity"),
        Direction::Inbound => (SpanKind::Server, "quicmesh.source_identity"),
    };
    let mut attributes = vec![
        attr("http.request.method", Value::StringValue(f.method.clone())),
        attr("url.path", Value::StringValue(f.path.clone())),
        attr("quicmesh.service", Value::StringValue(f.service.clone())),
        attr(
            "quicmesh.request_id",
            Value::StringValue(f.request_id.clone()),
        ),
    ];
    if !f.peer.is_empty() {
        attributes.push(attr(peer_key, Value::StringValue(f.peer.clone())));
    }
    if s.direction == Direction::Outbound {
        attributes.push(attr(
            "quicmesh.retries",
            Value::IntValue(i64::from(f.retries)),
        ));
    }
    if let Some(st) = f.status {
        attributes.push(attr(
            "http.response.status_code",
            Value::IntValue(i64::from(st)),
        ));
    }
    if let Some(g) = f.grpc_status {
        attributes.push(attr("rpc.grpc.status_code", Value::IntValue(i64::from(g))));
    }
    let failed = match (f.status, f.grpc_status) {
        (None, _) => Some("no response"),
        (Some(st), _) if st >= 500 => Some("server error"),
        (_, Some(g)) if g != 0 => Some("gRPC error"),
        _ => None,
    };
    let name = match s.direction {
        Direction::Outbound => format!("{} {} (outbound)", f.method, f.service),
        Direction::Inbound => format!("{} {} (inbound)", f.method, f.service),
    };
    Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(s.flags),
        name,
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(end),
        attributes,
        status: failed.map(|m| Status {
            message: m.to_owned(),
            code: StatusCode::Error as i32,
        }),
        ..Default::default()
    }
}

fn resource(local: &str) -> Resource {
    Resource {
        attributes: vec![
            attr("service.name", Value::StringValue("quicmesh-proxy".into())),
            attr("quicmesh.identity", Value::StringValue(local.to_owned())),
        ],
        ..Default::default()
    }
}

/// Batches spans (up to [`BATCH`], waiting at most [`BATCH_DELAY`]) into export requests.
async fn export_loop(
    mut rx: mpsc::Receiver<Span>,
    mut client: TraceServiceClient<tonic::transport::Channel>,
    resource: Resource,
    exported: Counter,
    dropped: Counter,
) {
    while let Some(first) = rx.recv().await {
        let mut spans = vec![first];
        let until = tokio::time::Instant::now() + BATCH_DELAY;
        while spans.len() < BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(s)) => spans.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = spans.len() as u64;
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "quicmesh".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        match client.export(req).await {
            Ok(_) => {
                exported.inc_by(n);
            }
            Err(e) => {
                tracing::debug!(error = %e, spans = n, "OTLP export failed");
                dropped.inc_by(n);
            }
        }
    }
}

/// `N` bytes from `2N` lowercase hex digits.
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = char::from(b[2 * i]).to_digit(16)?;
        let lo = char::from(b[2 * i + 1]).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// A random id with the all-zero value (invalid in `traceparent`) nudged to one.
fn nonzero<const N: usize>(mut id: [u8; N]) -> [u8; N] {
    if id == [0; N] {
        id[N - 1] = 1;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn on(percent: f64) -> (Tracer, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(16);
        let t = Tracer::default();
        let cfg = TracingConfig {
            otlp_endpoint: "http://127.0.0.1:4317".into(),
            sample_percent: percent,
            queue: 16,
        };
        t.exporter
            .set(Exporter {
                tx,
                threshold: cfg.threshold(),
            })
            .expect("once");
        (t, rx)
    }

    #[test]
    fn only_valid_contexts_parse() {
        let p = parse(VALID).expect("valid");
        assert_eq!(
            (p.trace_id, p.span_id, p.flags),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
        );
        assert!(p.sampled());
        assert!(
            !parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("v")
                .sampled()
        );
        // A later version: its first four fields count.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn sampled_parents_are_continued_unsampled_pass_and_only_callers_start() {
        let p = parse(VALID);
        assert_eq!(
            decide(p, || panic!("no draw with a parent")),
            Decision::Child(p.expect("p"))
        );
        let unsampled = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert_eq!(decide(unsampled, || true), Decision::Pass);
        assert_eq!(decide(None, || true), Decision::Start);
        assert_eq!(decide(None, || false), Decision::Pass);
    }

    #[test]
    fn off_leaves_the_header_alone() {
        let t = Tracer::default();
        let mut h = HeaderMap::new();
        assert!(t.hop(&mut h, Direction::Outbound).is_none());
        assert!(h.is_empty());
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(t.hop(&mut h, Direction::Inbound).is_none());
        assert_eq!(h.get(TRACEPARENT).expect("kept"), VALID);
    }

    #[test]
    fn a_hop_continues_the_trace_and_exports_its_span_as_the_child() {
        let (t, mut rx) = on(0.0);
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let mut span = t.hop(&mut h, Direction::Inbound).expect("sampled parent");
        span.fields.status = Some(200);
        span.fields.peer = "spiffe://td/ns/a/sa/b".into();
        drop(span);
        let sent = h
            .get(TRACEPARENT)
            .expect("set")
            .to_str()
            .expect("ascii")
            .to_owned();
        let p = parse(&sent).expect("valid");
        assert_eq!(p.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(p.span_id, "00f067aa0ba902b7");
        let s = rx.try_recv().expect("exported");
        assert_eq!(s.trace_id, unhex::<16>(p.trace_id).expect("hex").to_vec());
        assert_eq!(s.span_id, unhex::<8>(p.span_id).expect("hex").to_vec());
        assert_eq!(
            s.parent_span_id,
            unhex::<8>("00f067aa0ba902b7").expect("hex").to_vec()
        );
        assert_eq!(s.kind, SpanKind::Server as i32);
        assert!(s.status.is_none(), "a 200 is no error");
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
        assert!(
            s.attributes
                .iter()
                .any(|a| a.key == "quicmesh.source_identity")
        );
        // Unsampled passes untouched, and at 0% nothing starts.
        let mut h = HeaderMap::new();
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        h.insert(TRACEPARENT, HeaderValue::from_static(unsampled));
        assert!(t.hop(&mut h, Direction::Outbound).is_none());
        assert_eq!(h.get(TRACEPARENT).expect("kept"), unsampled);
        assert!(t.hop(&mut HeaderMap::new(), Direction::Outbound).is_none());
    }

    #[test]
    fn a_caller_starts_a_sampled_trace_and_a_destination_never_does() {
        let (t, mut rx) = on(100.0);
        assert!(t.hop(&mut HeaderMap::new(), Direction::Inbound).is_none());
        let mut h = HeaderMap::new();
        drop(t.hop(&mut h, Direction::Outbound).expect("started"));
        let p = parse(h.get(TRACEPARENT).expect("set").to_str().expect("ascii")).expect("valid");
        assert!(p.sampled());
        let s = rx.try_recv().expect("exported");
        assert!(s.parent_span_id.is_empty(), "a root span");
        assert_eq!(s.kind, SpanKind::Client as i32);
        assert_eq!(
            s.status.map(|st| st.code),
            Some(StatusCode::Error as i32),
            "no response recorded"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(1);
        let t = Tracer::default();
        t.exporter
            .set(Exporter {
                tx,
                threshold: 1 << 32,
            })
            .expect("once");
        for _ in 0..3 {
            drop(t.hop(&mut HeaderMap::new(), Direction::Outbound));
        }
        assert_eq!(t.dropped.get(), 2);
    }

    #[test]
    fn config_values_are_checked_by_key() {
        let c = |e: &str, p: f64, q: usize| TracingConfig {
            otlp_endpoint: e.into(),
            sample_percent: p,
            queue: q,
        };
        assert!(c("http://127.0.0.1:4317", 1.0, 10).check().is_ok());
        assert_eq!(
            c("https://c:4317", 1.0, 10).check().map_err(|e| e.0),
            Err("otlp_endpoint")
        );
        assert_eq!(
            c("nonsense", 1.0, 10).check().map_err(|e| e.0),
            Err("otlp_endpoint")
        );
        assert_eq!(
            c("http://c:4317", 101.0, 10).check().map_err(|e| e.0),
            Err("sample_percent")
        );
        assert_eq!(
            c("http://c:4317", f64::NAN, 10).check().map_err(|e| e.0),
            Err("sample_percent")
        );
        assert_eq!(
            c("http://c:4317", 1.0, 0).check().map_err(|e| e.0),
            Err("queue")
        );
        assert_eq!(c("http://c:4317", 100.0, 1).threshold(), 1 << 32);
    }

    #[test]
    fn ids_round_trip_through_hex() {
        assert_eq!(
            format(&[0xab; 16], &[1; 8], 1),
            "00-abababababababababababababababab-0101010101010101-01"
        );
        assert_eq!(unhex::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(unhex::<2>("0af"), None);
        assert_eq!(nonzero([0u8; 4]), [0, 0, 0, 1]);
    }
}
