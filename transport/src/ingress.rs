//! The HTTP/3 ingress gateway: where outside clients (browsers, `curl --http3`) meet the mesh.
//!
//! Outside clients are not mesh members: they get an ordinary TLS certificate (ALPN `h3`, no client
//! authentication) on a UDP listener of its own, and speak HTTP/3 (the `h3` crate). Each request is
//! routed by host and path prefix ([`Routes::route`], pure) to a mesh service and then travels exactly
//! as an application's request through an outbound listener does ([`crate::l7::outbound::request`]):
//! its own QUIC stream to a chosen endpoint, deadline, retries, hop-by-hop rules, and the destination's
//! authorization policy, applied to this proxy's own SPIFFE identity (the caller the destination
//! sees). Bodies stream both ways without being gathered: the request body is read from the h3 stream
//! as the mesh stream takes it, the response body written to the client as it comes.
//!
//! What a client can make the gateway hold is bounded: connections at once (handshakes included;
//! past a quarter of the cap, unproven addresses get a stateless Retry first), streams per connection (the QUIC limit), the header section size (431 beyond it), the time to
//! finish a handshake and to send a request head, the receive windows, and an idle timeout. A client
//! that goes away mid-request cancels the mesh request (its stream is stopped; the destination drops
//! the request to its app); a malformed request gets h3's stream or connection error, and the gateway
//! serves on.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use quinn::{IdleTimeout, VarInt};
use tracing::Instrument;

use crate::{
    config::{ConfigError, IngressConfig, IngressRoute, QuicConfig},
    identity::pem,
    l7::{io::BoxError, outbound::request},
    proxy::{
        Drain,
        outbound::{Service, Shared},
    },
    quic,
};

/// ALPN of HTTP/3.
const ALPN_H3: &[u8] = b"h3";
/// Unidirectional streams a client may open: control and the two QPACK streams, with room for
/// extensions it may announce.
const UNI_STREAMS: u32 = 8;
/// Per-request receive window: what a client may send ahead of the mesh stream taking it.
const STREAM_WINDOW: u32 = 1 << 20;
/// Per-connection receive window; with `max_connections` it bounds buffered request bodies.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Connection attempts quinn holds for the accept loop.
const MAX_INCOMING: usize = 256;

// ---------------------------------------------------------------------------------------------------
// Routing (pure)

/// The routing table: for each host, its path prefixes, longest first.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    hosts: HashMap<String, Vec<(String, usize)>>,
}

impl Routes {
    /// Builds the table; `target(i)` is what route `i` leads to.
    pub fn new(routes: &[IngressRoute]) -> Self {
        let mut hosts: HashMap<String, Vec<(String, usize)>> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            let prefix = r.path_prefix.trim_end_matches('/').to_owned();
            hosts
                .entry(r.host.to_ascii_lowercase())
                .or_default()
                .push((prefix, i));
        }
        for v in hosts.values_mut() {
            v.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        }
        Self { hosts }
    }

    /// The route for a request to `authority` (host, optionally with a port) and `path` (query
    /// allowed): the host matched exactly (case-insensitively), then the longest path prefix that
    /// matches whole segments. `None`: no route (404).
    pub fn route(&self, authority: &str, path: &str) -> Option<usize> {
        let host = host_of(authority).to_ascii_lowercase();
        let path = path.split(['?', '#']).next().unwrap_or("");
        self.hosts
            .get(&host)?
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|(_, i)| *i)
    }
}

/// `authority` without its port (`[::1]:443` → `[::1]`, `a.example:8443` → `a.example`).
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Whether `prefix` (without a trailing `/`; empty for `/`) covers `path` on segment boundaries.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.is_empty() || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------------
// Metrics

/// Labels of an ingress answer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// HTTP status sent to the client.
    pub status_code: u16,
}

/// Labels of an ingress failure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// What went wrong.
    pub reason: &'static str,
}

/// The gateway's own counters; requests it forwards are counted by the L7 metrics too.
#[derive(Debug, Clone, Default)]
pub struct IngressMetrics {
    /// Requests answered, by status (404 for unrouted ones included).
    pub requests: Family<StatusLabels, Counter>,
    /// Client connections open now (handshakes included).
    pub connections: Gauge,
    /// Connections and requests that failed, by reason.
    pub errors: Family<ErrorLabels, Counter>,
}

impl IngressMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("quicmesh");
        r.register(
            "ingress_requests",
            "HTTP/3 ingress requests answered, by status code",
            m.requests.clone(),
        );
        r.register(
            "ingress_connections",
            "HTTP/3 ingress client connections open now",
            m.connections.clone(),
        );
        r.register(
            "ingress_errors",
            "HTTP/3 ingress connections and requests that failed, by reason",
            m.errors.clone(),
        );
        m
    }

    fn answered(&self, status: StatusCode) {
        self.requests
            .get_or_create(&StatusLabels {
                status_code: status.as_u16(),
            })
            .inc();
    }

    fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ErrorLabels { reason }).inc();
    }
}

// ---------------------------------------------------------------------------------------------------
// The listener

/// The bound gateway.
pub struct Ingress {
    endpoint: quinn::Endpoint,
    shared: Arc<Gateway>,
}

/// What every connection of the gateway reads.
struct Gateway {
    routes: Routes,
    /// The mesh side of route `i`.
    targets: Vec<Arc<Service>>,
    max_connections: usize,
    open: AtomicUsize,
    max_header_size: u64,
    header_timeout: Duration,
    metrics: IngressMetrics,
}

/// One open client connection, counted until dropped.
struct ConnSlot(Arc<Gateway>);

impl ConnSlot {
    /// A slot, unless `max_connections` are open.
    fn take(g: &Arc<Gateway>) -> Option<Self> {
        let taken = g
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < g.max_connections).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| {
            g.metrics.connections.inc();
            Self(g.clone())
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections.dec();
    }
}

/// The QUIC server configuration for outside clients: TLS 1.3 with the configured certificate, ALPN
/// `h3`, no client authentication; small windows and the per-connection stream cap.
fn server_config(cfg: &IngressConfig, file: &Path) -> Result<quinn::ServerConfig, ConfigError> {
    let read = |key: &str, p: &Path| {
        std::fs::read(p)
            .map_err(|e| ConfigError::new(file, key, format!("cannot read {}: {e}", p.display())))
    };
    let certs = pem::certs(&read("ingress.cert", &cfg.cert)?)
        .map_err(|e| ConfigError::new(file, "ingress.cert", e))?;
    let key = pem::private_key(&read("ingress.key", &cfg.key)?)
        .map_err(|e| ConfigError::new(file, "ingress.key", e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(quic::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConfigError::new(file, "ingress", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ConfigError::new(file, "ingress.key", format!("with ingress.cert: {e}")))?;
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ConfigError::new(file, "ingress", e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let quic_cfg = QuicConfig::default();
    let mut t = quic::transport_config(&quic_cfg);
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_streams_per_connection))
        .max_concurrent_uni_streams(VarInt::from_u32(UNI_STREAMS))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        // Outside clients keep their own connections alive if they want to.
        .keep_alive_interval(None);
    let idle = IdleTimeout::try_from(cfg.idle_timeout)
        .map_err(|e| ConfigError::new(file, "ingress.idle_timeout", e))?;
    t.max_idle_timeout(Some(idle));
    server
        .transport_config(Arc::new(t))
        .max_incoming(MAX_INCOMING)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(4 << 20);
    Ok(server)
}

impl Ingress {
    /// Reads the certificate, binds the UDP listener, and prepares the mesh side of every route.
    pub fn bind(
        cfg: &IngressConfig,
        file: &Path,
        quic_cfg: &QuicConfig,
        shared: &Shared,
        metrics: IngressMetrics,
    ) -> Result<Self, ConfigError> {
        let server = server_config(cfg, file)?;
        let endpoint = quic::endpoint(cfg.listen, quic_cfg, Some(server), None)
            .map_err(|e| ConfigError::new(file, "ingress.listen", e))?;
        // Routes to the same service and port share its tunnel side (balancer state, budgets).
        let mut by_target: HashMap<(String, u16), Arc<Service>> = HashMap::new();
        let targets = cfg
            .routes
            .iter()
            .map(|r| {
                by_target
                    .entry((r.service.clone(), r.port))
                    .or_insert_with(|| Service::new(cfg.target(r), shared.clone()))
                    .clone()
            })
            .collect();
        Ok(Self {
            endpoint,
            shared: Arc::new(Gateway {
                routes: Routes::new(&cfg.routes),
                targets,
                max_connections: cfg.max_connections,
                open: AtomicUsize::new(0),
                max_header_size: cfg.max_header_size,
                header_timeout: cfg.header_timeout,
                metrics,
            }),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The endpoint, closed by the proxy at the end of its drain.
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Accepts client connections until the drain begins.
    pub async fn run(self, drain: Drain) {
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => i,
                _ = drain.stop_accepting.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            // Past a quarter of the cap, a client must first prove its address (stateless Retry),
            // so spoofed Initials cannot hold the slots for the handshake timeout.
            if !incoming.remote_address_validated()
                && incoming.may_retry()
                && self.shared.open.load(Ordering::Acquire) >= self.shared.max_connections / 4
            {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            let Some(slot) = ConnSlot::take(&self.shared) else {
                self.shared.metrics.error("connections_over_limit");
                incoming.refuse();
                continue;
            };
            let span = tracing::debug_span!("ingress", client = %incoming.remote_address());
            drain
                .tracker
                .spawn(connection(incoming, slot, drain.clone()).instrument(span));
        }
        // New connections are refused from now on; open ones finish their requests.
        self.endpoint.set_server_config(None);
    }
}

/// Serves one client connection: its handshake, then its requests, each in a task of its own.
async fn connection(incoming: quinn::Incoming, slot: ConnSlot, drain: Drain) {
    let g = slot.0.clone();
    let conn = match tokio::time::timeout(g.header_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "ingress handshake failed");
            g.metrics.error("handshake_failed");
            return;
        }
        Err(_) => {
            g.metrics.error("handshake_timeout");
            return;
        }
    };
    let mut h3 = match h3::server::builder()
        .max_field_section_size(g.max_header_size)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await
    {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "HTTP/3 connection setup failed");
            g.metrics.error("h3_setup_failed");
            return;
        }
    };
    let requests = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = h3.accept() => a,
            _ = drain.stop_accepting.cancelled() => {
                // GOAWAY: the client sends its next requests elsewhere; those in flight finish.
                let _ = tokio::time::timeout(g.header_timeout, h3.shutdown(0)).await;
                break;
            }
        };
        match accepted {
            Ok(Some(resolver)) => {
                requests.spawn(exchange(
                    resolver,
                    g.clone(),
                    conn.clone(),
                    drain.abort.clone(),
                ));
            }
            Ok(None) => break,
            Err(e) => {
                // The client closed, timed out, or broke the protocol (h3 has sent the error code).
                if !e.is_h3_no_error() {
                    tracing::debug!(error = %e, "HTTP/3 connection ended");
                }
                break;
            }
        }
    }
    requests.close();
    tokio::select! {
        _ = requests.wait() => {}
        _ = drain.abort.cancelled() => {}
    }
    // Held until here: the h3 connection answers the client's control stream while requests run.
    drop(h3);
    drop(slot);
}

type H3Stream<S> = h3::server::RequestStream<S, Bytes>;

/// One request: read its head, route it, pass it through the mesh, stream the answer back.
async fn exchange(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    g: Arc<Gateway>,
    conn: quinn::Connection,
    abort: tokio_util::sync::CancellationToken,
) {
    let resolved = tokio::time::timeout(g.header_timeout, resolver.resolve_request()).await;
    let (req, stream) = match resolved {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            // Malformed (h3 reset the stream with H3_MESSAGE_ERROR), too large (h3 answered 431), or
            // the client gave up on it.
            tracing::debug!(error = %e, "HTTP/3 request refused");
            if matches!(e, h3::error::StreamError::HeaderTooBig { .. }) {
                g.metrics
                    .answered(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            } else {
                g.metrics.error("malformed_request");
            }
            return;
        }
        Err(_) => {
            g.metrics.error("header_timeout");
            return;
        }
    };
    let (mut send, recv) = stream.split();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let Some(route) = g.routes.route(&authority, req.uri().path()) else {
        tracing::debug!(%authority, path = req.uri().path(), "no ingress route");
        let mut head = Response::new(());
        *head.status_mut() = StatusCode::NOT_FOUND;
        if let Err(e) = send_whole(&mut send, head, Bytes::from_static(b"no route\n")).await {
            tracing::debug!(error = %e, "404 not delivered");
        }
        g.metrics.answered(StatusCode::NOT_FOUND);
        return;
    };
    let svc = g.targets[route].clone();
    let req = req.map(|()| H3Body {
        recv,
        trailers: false,
        done: false,
    });
    let resp = tokio::select! {
        r = request(svc, req, false) => r,
        e = conn.closed() => {
            // Dropping the mesh request stops its stream: the destination drops it to its app.
            tracing::debug!(error = %e, "client gone before the response");
            g.metrics.error("client_gone");
            return;
        }
        _ = abort.cancelled() => {
            send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
            return;
        }
    };
    let status = resp.status();
    g.metrics.answered(status);
    let (parts, mut body) = resp.into_parts();
    let relay = async {
        send.send_response(Response::from_parts(parts, ())).await?;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                // The mesh side broke mid-body: the client sees the response cut, not ended.
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Ok(());
            };
            match frame.into_data() {
                Ok(d) => send.send_data(d).await?,
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        send.send_trailers(t).await?;
                    }
                }
            }
        }
        send.finish().await
    };
    let relayed = tokio::select! {
        r = relay => r,
        _ = abort.cancelled() => {
            send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
            return;
        }
    };
    if let Err(e) = relayed {
        // The client went away or stopped the stream; dropping the body stops the mesh stream.
        tracing::debug!(error = %e, "response not delivered");
        g.metrics.error("client_gone");
    }
}

/// Sends a complete small response.
async fn send_whole(
    send: &mut H3Stream<h3_quinn::SendStream<Bytes>>,
    head: Response<()>,
    body: Bytes,
) -> Result<(), h3::error::StreamError> {
    send.send_response(head).await?;
    if !body.is_empty() {
        send.send_data(body).await?;
    }
    send.finish().await
}

/// A request body read from the client's h3 stream as the mesh stream takes it: data, then trailers.
struct H3Body {
    recv: H3Stream<h3_quinn::RecvStream>,
    /// Data has ended; trailers are next.
    trailers: bool,
    done: bool,
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.trailers {
            match this.recv.poll_recv_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Some(mut b))) => {
                    let d = b.copy_to_bytes(b.remaining());
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(Ok(None)) => this.trailers = true,
                Poll::Ready(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
        let polled: Poll<Result<Option<HeaderMap>, _>> = this.recv.poll_recv_trailers(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                this.done = true;
                match r {
                    Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                    Ok(None) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e.into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &str, &str)]) -> Routes {
        let routes: Vec<IngressRoute> = routes
            .iter()
            .map(|(host, prefix, service)| IngressRoute {
                host: (*host).to_owned(),
                path_prefix: (*prefix).to_owned(),
                service: (*service).to_owned(),
                port: 80,
            })
            .collect();
        Routes::new(&routes)
    }

    #[test]
    fn the_longest_prefix_of_the_exact_host_wins() {
        let t = table(&[
            ("shop.example", "/", "web"),
            ("shop.example", "/api", "api"),
            ("shop.example", "/api/v2/", "api-v2"),
            ("admin.example", "/", "admin"),
        ]);
        assert_eq!(t.route("shop.example", "/"), Some(0));
        assert_eq!(t.route("shop.example", "/index.html"), Some(0));
        assert_eq!(t.route("shop.example", "/api"), Some(1));
        assert_eq!(t.route("shop.example", "/api/v1/cart"), Some(1));
        assert_eq!(t.route("shop.example", "/api/v2"), Some(2));
        assert_eq!(t.route("shop.example", "/api/v2/cart?x=/y"), Some(2));
        assert_eq!(t.route("admin.example", "/api"), Some(3));
    }

    #[test]
    fn prefixes_match_whole_segments_only() {
        let t = table(&[("a.example", "/api", "api")]);
        assert_eq!(t.route("a.example", "/apix"), None);
        assert_eq!(t.route("a.example", "/ap"), None);
        assert_eq!(t.route("a.example", "/api?q=1"), Some(0));
        assert_eq!(t.route("a.example", "/api/"), Some(0));
    }

    #[test]
    fn hosts_match_exactly_without_port_and_case() {
        let t = table(&[("shop.example", "/", "web"), ("[::1]", "/", "v6")]);
        assert_eq!(t.route("SHOP.example:8443", "/"), Some(0));
        assert_eq!(t.route("[::1]:443", "/x"), Some(1));
        assert_eq!(t.route("www.shop.example", "/"), None);
        assert_eq!(t.route("example", "/"), None);
        assert_eq!(t.route("", "/"), None);
    }

    #[test]
    fn a_host_whose_prefixes_all_miss_has_no_route() {
        let t = table(&[("a.example", "/only", "x")]);
        assert_eq!(t.route("a.example", "/other"), None);
        assert_eq!(t.route("a.example", ""), None);
    }
}
