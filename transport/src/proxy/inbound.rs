//! The inbound QUIC endpoint: accepts tunnels from peer proxies and forwards each stream to the local app.
//!
//! The peer's identity comes from its verified certificate, never from the header. Each stream must
//! send a well-formed header within the header timeout; a garbage, truncated or oversized header resets
//! only that stream with `PROTOCOL_ERROR`. The app connection is made within the smaller of our connect
//! timeout and the one the header carries; only once it is up do we answer OK, so the source proxy knows
//! that a refusal delivered nothing and may retry elsewhere. The header's deadline bounds the whole
//! tunneled connection here as well: expiry resets the stream with `DEADLINE_EXCEEDED`. Each stream goes
//! to the application address of the service port its header names ([`route`]); a service or port this
//! proxy does not serve gets `NO_ROUTE`, never a default.
//!
//! What a peer may make us hold is bounded by the decisions of [`super::admission`]: connection
//! attempts are accepted, retried (QUIC Retry) or turned away by the number of handshakes in progress;
//! a handshake has `limits.handshake_timeout`; a verified connection gets streams as it uses them; a
//! connection with its share of streams waiting for a header is not accepted from until one is done,
//! and beyond the global cap a new stream is reset.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use quinn::{Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tokio::{net::TcpStream, time::Instant};
use tracing::Instrument;

use super::{
    Drain,
    admission::{
        Admission, Count, CountGuard, FIRST_GRANT, StreamAdmission, admit, admit_stream,
        stream_grant,
    },
    lane::Lane,
    pool::peer_identity,
    splice::{ConnLog, EdgeTraffic, carry},
};
use crate::{
    clip::clip,
    config::InboundConfig,
    identity::{Credentials, SpiffeId},
    l7::inbound::AppClients,
    metrics::{DecisionLabels, Direction, Metrics, PeerMetrics, ReasonLabels},
    ratelimit::{Limiters, RateVerdict, decide},
    state::{Admission as Verdict, Request, ServiceRef, StateHandle, denying_policy},
    tunnel::{self, FrameError, Protocol, StatusCode, StreamHeader, code},
};

/// The bound inbound endpoint.
pub struct Inbound {
    endpoint: Endpoint,
    cfg: Arc<InboundConfig>,
    metrics: Metrics,
    creds: Credentials,
    state: StateHandle,
    clients: AppClients,
    limiters: Arc<Limiters>,
    max_streams: u32,
    /// Node gateway mode: the workloads, one of which each connection is made to.
    gateway: Option<crate::gateway::Gateway>,
}

impl Inbound {
    /// Wraps an endpoint that has a server config; `creds` name our namespace, `state` decides which
    /// streams are admitted. A peer may open `max_streams` concurrent streams once it has authenticated
    /// (fewer before, see `quic.rs`).
    pub fn new(
        endpoint: Endpoint,
        cfg: InboundConfig,
        metrics: Metrics,
        creds: Credentials,
        state: StateHandle,
        max_streams: u32,
    ) -> Self {
        Self {
            endpoint,
            clients: AppClients::new(cfg.connect_timeout),
            limiters: Arc::new(Limiters::default()),
            cfg: Arc::new(cfg),
            metrics,
            creds,
            state,
            max_streams,
            gateway: None,
        }
    }

    /// Node gateway mode: each connection is served as the workload whose certificate it got
    /// ([`crate::gateway::serving`]), with that workload's services, ports and namespace.
    pub fn with_gateway(mut self, gateway: crate::gateway::Gateway) -> Self {
        self.gateway = Some(gateway);
        self
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts connections until the drain begins.
    pub async fn run(self, drain: Drain) {
        let m = &self.metrics.endpoint;
        let handshakes = Arc::new(Count::in_gauge(m.handshakes_in_progress.clone()));
        let header_waits = Arc::new(Count::in_gauge(m.header_waits.clone()));
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => i,
                _ = drain.stop_accepting.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            let decision = admit(
                handshakes.get(),
                incoming.remote_address_validated(),
                incoming.may_retry(),
                &self.cfg.limits,
            );
            m.admissions
                .get_or_create(&DecisionLabels {
                    decision: decision.label(),
                })
                .inc();
            match decision {
                Admission::Accept => {}
                Admission::Retry => {
                    // Stateless: the client's next Initial carries a token proving its address.
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().ignore();
                    }
                    continue;
                }
                Admission::Refuse => {
                    incoming.refuse();
                    continue;
                }
                Admission::Ignore => {
                    incoming.ignore();
                    continue;
                }
            }
            let conn = Conn {
                cfg: self.cfg.clone(),
                metrics: self.metrics.clone(),
                creds: self.creds.clone(),
                state: self.state.clone(),
                clients: self.clients.clone(),
                limiters: self.limiters.clone(),
                header_waits: header_waits.clone(),
                gateway: self.gateway.clone(),
            };
            let span = tracing::debug_span!("inbound", remote = %incoming.remote_address());
            let handshake = handshakes.enter();
            drain.tracker.spawn(
                conn.serve(incoming, handshake, self.max_streams, drain.clone())
                    .instrument(span),
            );
        }
        // New connections are refused from now on; established ones finish their streams.
        self.endpoint.set_server_config(None);
    }
}

/// Where a stream goes: the application address serving the header's service and port, or why
/// nothing here does.
fn route(cfg: &InboundConfig, h: &StreamHeader) -> Result<SocketAddr, &'static str> {
    if !cfg.services.is_empty() && !cfg.services.contains(&h.service) {
        return Err("service not served here");
    }
    cfg.app_for(h.port).ok_or("port not served here")
}

/// A stream waiting for its header: counted on its connection and overall until [`HeaderWait::done`].
struct HeaderWait {
    _here: CountGuard,
    _all: CountGuard,
    grant: Arc<Grant>,
}

impl HeaderWait {
    /// Ends the wait; a stream whose header arrived counts as in use (for the connection's stream
    /// grant) while the returned guard lives.
    fn done(self, header_ok: bool) -> Option<CountGuard> {
        header_ok.then(|| self.grant.in_use())
    }
}

/// The stream limit of one verified connection, raised with use ([`stream_grant`]).
struct Grant {
    conn: quinn::Connection,
    granted: std::sync::atomic::AtomicU32,
    max: u32,
    tunnels: Arc<Count>,
}

impl Grant {
    fn new(conn: quinn::Connection, max: u32) -> Self {
        let first = FIRST_GRANT.min(max);
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(first));
        Self {
            conn,
            granted: first.into(),
            max,
            tunnels: Arc::default(),
        }
    }

    /// Counts a stream in use until the guard drops, raising the limit if half of it is in use.
    fn in_use(&self) -> CountGuard {
        let guard = self.tunnels.enter();
        let granted = self.granted.load(std::sync::atomic::Ordering::Acquire);
        if let Some(n) = stream_grant(self.tunnels.get(), granted, self.max) {
            self.granted.store(n, std::sync::atomic::Ordering::Release);
            self.conn.set_max_concurrent_bi_streams(VarInt::from_u32(n));
        }
        guard
    }
}

#[derive(Clone)]
struct Conn {
    cfg: Arc<InboundConfig>,
    metrics: Metrics,
    creds: Credentials,
    state: StateHandle,
    /// Pooled connections to the local apps, for HTTP and gRPC streams.
    clients: AppClients,
    /// Rate limit schedules.
    limiters: Arc<Limiters>,
    /// Streams waiting for their header, over all connections.
    header_waits: Arc<Count>,
    /// Node gateway mode: `cfg` and `creds` become the workload's once the handshake shows which.
    gateway: Option<crate::gateway::Gateway>,
}

impl Conn {
    async fn serve(
        mut self,
        incoming: Incoming,
        handshake: CountGuard,
        max_streams: u32,
        drain: Drain,
    ) {
        let timeout = self.cfg.limits.handshake_timeout;
        let accepted = match incoming.accept() {
            Ok(connecting) => tokio::time::timeout(timeout, connecting)
                .await
                .unwrap_or(Err(quinn::ConnectionError::TimedOut)),
            Err(e) => Err(e),
        };
        // Dropping an unfinished handshake (the timeout) closes its connection.
        drop(handshake);
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Certificate refusals were logged and counted by the verifier with their reason.
                tracing::info!(error = %e, "inbound handshake failed");
                self.metrics
                    .handshake_failures
                    .get_or_create(&ReasonLabels {
                        direction: Direction::Inbound,
                        reason: "handshake",
                    })
                    .inc();
                return;
            }
        };
        let Some(peer) = peer_identity(&conn).map(Arc::new) else {
            conn.close(code::PROTOCOL_ERROR, b"no peer identity");
            return;
        };
        if let Some(gw) = self.gateway.take() {
            let sni = crate::gateway::requested_name(&conn);
            let Some(w) = gw.serving(sni.as_deref()) else {
                // The certificate was chosen by the same rule; the mesh state changed meanwhile.
                conn.close(code::PROTOCOL_ERROR, b"no workload for this server name");
                return;
            };
            tracing::debug!(%peer, workload = %w.name, "inbound connection to a gateway workload");
            self.cfg = w.inbound.clone();
            self.creds = w.creds.clone();
        }
        tracing::debug!(%peer, "inbound connection");
        // Verified: the peer may open more streams now, and more again as it uses them (quinn keeps
        // state per allowed stream, so this waited for the handshake).
        let grant = Arc::new(Grant::new(conn.clone(), max_streams));
        self.metrics.observe_handshake(Direction::Inbound, &conn);
        self.metrics
            .connections
            .track(Direction::Inbound, peer.to_string(), conn.clone());
        let pm = self.metrics.peer(Direction::Inbound, peer.as_str());
        let lane = Arc::new(Lane::default());
        let waits_here = Arc::new(Count::default());
        let limits = &self.cfg.limits;
        loop {
            // This connection has its share of streams waiting for a header: take no more from it
            // until one is done; its next streams wait in quinn, under its stream limit.
            let hold =
                |here| admit_stream(here, self.header_waits.get(), limits) == StreamAdmission::Hold;
            let accepted = tokio::select! {
                s = async {
                    waits_here.wait_until(hold).await;
                    conn.accept_bi().await
                } => s,
                _ = drain.stop_accepting.cancelled() => break,
            };
            match accepted {
                Ok((mut send, mut recv)) => {
                    if admit_stream(waits_here.get(), self.header_waits.get(), limits)
                        == StreamAdmission::Refuse
                    {
                        self.metrics.endpoint.streams_refused.inc();
                        tunnel::reset(&mut send, &mut recv, code::REFUSED);
                        continue;
                    }
                    let waiting = HeaderWait {
                        _here: waits_here.enter(),
                        _all: self.header_waits.enter(),
                        grant: grant.clone(),
                    };
                    let this = self.clone();
                    let pm = pm.clone();
                    let lane = lane.clone();
                    let span = tracing::debug_span!("stream", id = %send.id());
                    // Boxed: moved once into its task instead of through every frame of the spawn.
                    drain.tracker.spawn(Box::pin(
                        this.read_then_serve(
                            send,
                            recv,
                            waiting,
                            peer.clone(),
                            pm,
                            lane,
                            drain.clone(),
                        )
                        .instrument(span),
                    ));
                }
                Err(e) => {
                    tracing::debug!(%peer, reason = %e, "connection ended");
                    return;
                }
            }
        }
    }

    /// Waits for the header in a small future and only then builds the larger one that serves the
    /// stream: thousands of streams may wait for a header at once.
    #[allow(clippy::too_many_arguments)]
    async fn read_then_serve(
        self,
        send: SendStream,
        mut recv: RecvStream,
        waiting: HeaderWait,
        peer: Arc<SpiffeId>,
        m: PeerMetrics,
        lane: Arc<Lane>,
        drain: Drain,
    ) {
        let header = tunnel::read_header(&mut recv, self.cfg.header_timeout).await;
        let in_use = waiting.done(header.is_ok());
        Box::pin(self.stream(send, recv, header, in_use, peer, m, lane, drain)).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream(
        self,
        mut send: SendStream,
        mut recv: RecvStream,
        header: Result<StreamHeader, FrameError>,
        _in_use: Option<CountGuard>,
        peer: Arc<SpiffeId>,
        m: PeerMetrics,
        lane: Arc<Lane>,
        drain: Drain,
    ) {
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                if e.is_protocol_violation() {
                    tracing::warn!(error = %e, "bad stream header");
                    self.metrics
                        .protocol_errors
                        .get_or_create(&ReasonLabels {
                            direction: Direction::Inbound,
                            reason: e.reason(),
                        })
                        .inc();
                    tunnel::reset(&mut send, &mut recv, code::PROTOCOL_ERROR);
                }
                return;
            }
        };
        let started = Instant::now();
        // The status goes out before bulk bytes queued on this connection (see `outbound::attempt`).
        let _ = send.set_priority(super::outbound::CONTROL_PRIORITY);
        let deadline =
            (header.deadline_ms > 0).then(|| started + Duration::from_millis(header.deadline_ms));
        let rid = tunnel::request_id_hex(&header.request_id);
        if drain.stop_accepting.is_cancelled() {
            let _ = tunnel::write_status(&mut send, StatusCode::Unavailable, "draining").await;
            let _ = send.finish();
            return;
        }
        // Revocations and policies that reached us after this connection's handshake apply to its
        // new streams.
        let target = ServiceRef {
            namespace: self
                .creds
                .namespace()
                .map(|ns| ns.to_string())
                .unwrap_or_default(),
            name: header.service.clone(),
        };
        let port = u16::try_from(header.port).unwrap_or(0);
        let http = header.protocol != Protocol::Tcp as i32;
        // HTTP streams are admitted and rate limited per request, with the method and path
        // (`l7::inbound`); a TCP connection is one unit of a rate limit.
        let (verdict, rate) = if http {
            (Verdict::Admit { audit: None }, RateVerdict::Allow)
        } else {
            decide(
                &self.state.load(),
                &self.limiters,
                &Request {
                    peer: &peer,
                    service: &target,
                    port,
                    method: None,
                    path: None,
                },
                std::time::Instant::now(),
            )
        };
        match verdict {
            Verdict::Admit { audit: None } => {}
            Verdict::Admit {
                audit: Some(reason),
            } => {
                tracing::info!(request_id = %rid, %peer, service = %target, reason, "audit: the policy would refuse this stream");
                self.metrics.deny(&target, denying_policy(reason), true);
            }
            Verdict::Refuse { code, reason } => {
                tracing::info!(request_id = %rid, %peer, service = %target, reason, "stream refused");
                self.metrics.deny(&target, denying_policy(reason), false);
                self.fail(&mut send, code, reason, reason).await;
                return;
            }
        }
        let app = match route(&self.cfg, &header) {
            Ok(app) => app,
            Err(why) => {
                tracing::info!(request_id = %rid, service = %clip(&header.service), port = header.port, %peer, why, "no route");
                self.metrics
                    .failures
                    .get_or_create(&ReasonLabels {
                        direction: Direction::Inbound,
                        reason: "no_route",
                    })
                    .inc();
                let _ = tunnel::write_status(&mut send, StatusCode::NoRoute, why).await;
                let _ = send.finish();
                return;
            }
        };
        if let RateVerdict::Limited { retry_after } = rate {
            tracing::debug!(request_id = %rid, %peer, service = %target, "stream rate limited");
            refuse_limited(&self.metrics, &mut send, &target, retry_after).await;
            return;
        }
        if http {
            let ctx = crate::l7::inbound::Ctx {
                metrics: &self.metrics,
                state: &self.state,
                clients: &self.clients,
                limiters: &self.limiters,
                header_timeout: self.cfg.header_timeout,
            };
            crate::l7::inbound::serve(ctx, send, recv, &header, &peer, &target, app, deadline)
                .await;
            return;
        }
        let mut connect_timeout = self.cfg.connect_timeout;
        if header.connect_timeout_ms > 0 {
            connect_timeout =
                connect_timeout.min(Duration::from_millis(u64::from(header.connect_timeout_ms)));
        }
        let connect_by = deadline.map_or(started + connect_timeout, |d| {
            d.min(started + connect_timeout)
        });
        let tcp = match tokio::time::timeout_at(connect_by, TcpStream::connect(app)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::info!(request_id = %rid, %app, error = %e, "app refused connection");
                self.fail(
                    &mut send,
                    StatusCode::ConnectFailed,
                    "app_connect_failed",
                    &format!("app {app}: {e}"),
                )
                .await;
                return;
            }
            Err(_) => {
                let (code, reason) = if deadline == Some(connect_by) {
                    (StatusCode::DeadlineExceeded, "deadline_exceeded")
                } else {
                    (StatusCode::ConnectFailed, "app_connect_failed")
                };
                tracing::info!(request_id = %rid, %app, "app did not accept in time");
                self.fail(&mut send, code, reason, "app did not accept in time")
                    .await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        if lane
            .control(tunnel::write_status(&mut send, StatusCode::Ok, ""))
            .await
            .is_err()
        {
            return;
        }
        let _ = send.set_priority(0);
        let edge = EdgeTraffic {
            counters: self.metrics.edges.edge(
                Direction::Inbound,
                peer.as_str(),
                &target.to_string(),
            ),
            at_destination: true,
            log: self.metrics.access_log.is_on().then(|| ConnLog {
                access: self.metrics.access_log.clone(),
                peer: peer.to_string(),
                service: target.to_string(),
                request_id: rid.to_string(),
            }),
        };
        if carry(tcp, (send, recv), &m, &edge, &lane, deadline, &drain.abort).await
            == Err(code::DEADLINE_EXCEEDED)
        {
            tracing::info!(request_id = %rid, "deadline exceeded");
        }
    }

    /// Answers a refusal and counts it under `reason`.
    async fn fail(&self, send: &mut SendStream, code: StatusCode, reason: &'static str, msg: &str) {
        self.metrics
            .failures
            .get_or_create(&ReasonLabels {
                direction: Direction::Inbound,
                reason,
            })
            .inc();
        let _ = tunnel::write_status(send, code, msg).await;
        let _ = send.finish();
    }
}

/// Refuses a rate-limited stream or request: counted, and answered with when to try again.
pub(crate) async fn refuse_limited(
    metrics: &Metrics,
    send: &mut SendStream,
    target: &ServiceRef,
    retry_after: std::time::Duration,
) {
    metrics.deny(target, "rate_limit", false);
    metrics
        .failures
        .get_or_create(&ReasonLabels {
            direction: Direction::Inbound,
            reason: "rate_limited",
        })
        .inc();
    let _ = tunnel::write_rate_limited(send, retry_after).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortMapping;

    fn cfg(app: Option<&str>, ports: &[(u16, &str)], services: &[&str]) -> InboundConfig {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        InboundConfig {
            listen: addr("127.0.0.1:0"),
            app: app.map(addr),
            ports: ports
                .iter()
                .map(|(port, a)| PortMapping {
                    port: *port,
                    app: addr(a),
                })
                .collect(),
            services: services.iter().map(|s| s.to_string()).collect(),
            version: String::new(),
            connect_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(1),
            limits: Default::default(),
        }
    }

    fn header(service: &str, port: u32) -> StreamHeader {
        StreamHeader {
            service: service.into(),
            port,
            ..Default::default()
        }
    }

    #[test]
    fn app_shorthand_serves_only_its_own_port() {
        let c = cfg(Some("127.0.0.1:8080"), &[], &["web"]);
        assert_eq!(route(&c, &header("web", 8080)), Ok(c.app.expect("app")));
        assert_eq!(route(&c, &header("web", 22)), Err("port not served here"));
        assert_eq!(
            route(&c, &header("db", 8080)),
            Err("service not served here")
        );
    }

    #[test]
    fn each_declared_port_maps_to_its_app_address() {
        let c = cfg(
            None,
            &[(80, "127.0.0.1:8080"), (9090, "127.0.0.1:9091")],
            &[],
        );
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(route(&c, &header("any", 80)), Ok(a("127.0.0.1:8080")));
        assert_eq!(route(&c, &header("any", 9090)), Ok(a("127.0.0.1:9091")));
        assert_eq!(route(&c, &header("any", 8080)), Err("port not served here"));
    }
}
