//! Outbound listeners: the application connects here in plain TCP; we tunnel to the service's proxies.
//!
//! A tunneled connection first goes through a connect phase: pick an endpoint, get the pooled QUIC
//! connection, open a stream, send the header and wait for the acceptor's status. No application byte is
//! read from the client before the status says OK, so a failure anywhere in that phase is safe to retry:
//! nothing reached the destination app. Failovers after a failed handshake are free (the destination
//! never saw them); retries that reached a peer spend the retry budget. The connect phase is bounded by
//! the connect timeout and the total deadline; after it, the bytes flow until both sides end, the
//! deadline expires (stream reset with `DEADLINE_EXCEEDED`, app connection reset), or the proxy drains.
//!
//! Secure naming: before a stream is opened, the peer certificate's SPIFFE ID must be one of the
//! identities allowed to serve the service ([`crate::state::Upstream::servers`]); a peer that is in the mesh but not
//! allowed gets nothing (not even a header), is counted as `wrong_server_identity`, and its endpoint is
//! avoided like one that is down.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use quinn::{RecvStream, SendStream};
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tracing::Instrument;

use super::{
    Drain,
    balance::EndpointHealth,
    pool::{DialError, PeerConn, Pool},
    splice::{ConnLog, EdgeTraffic, carry},
};
use crate::{
    clip::clip,
    config::OutboundConfig,
    identity::{Credentials, ServerNames, naming::split_service},
    metrics::{Direction, Metrics, ReasonLabels},
    model::PortProtocol,
    retry::RetryBudget,
    state::{ServiceRef, StateHandle},
    tunnel::{self, StatusCode, StreamHeader, StreamStatus, code},
};

/// Why the connect phase of a tunneled connection failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No QUIC connection to the chosen peer.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The stream failed before the acceptor answered (connection lost, stream reset).
    #[error("stream failed before the acceptor answered: {0}")]
    Stream(String),
    /// The peer is in the mesh but not allowed to serve the service (secure naming).
    #[error("peer {peer} at {addr} is not allowed to serve the service (allowed: {allowed})")]
    WrongServer {
        /// Endpoint address.
        addr: SocketAddr,
        /// The identity it presented.
        peer: String,
        /// The identities allowed.
        allowed: String,
    },
    /// The acceptor answered with an error status.
    #[error("peer {peer} refused: {code:?}: {}", clip(message))]
    Refused {
        /// Acceptor identity.
        peer: String,
        /// Its status.
        code: StatusCode,
        /// Its message.
        message: String,
        /// With `RateLimited`: when to try again, milliseconds.
        retry_after_ms: u32,
    },
    /// A retry was warranted but the retry budget is spent.
    #[error("retry budget exhausted after: {0}")]
    BudgetExhausted(Box<OpenError>),
    /// The service has no endpoint (controller mode, before the controller named any).
    #[error("no endpoint known for the service")]
    NoEndpoints,
    /// Every attempt failed.
    #[error("{attempts} attempts failed, last: {last}")]
    Exhausted {
        /// How many were made.
        attempts: u32,
        /// The last failure.
        last: Box<OpenError>,
    },
    /// The connect timeout or the deadline expired first.
    #[error("not connected within {0:?}")]
    Timeout(Duration),
    /// The pooled connection was dead: the peer reset it statelessly (it restarted) or sent nothing at
    /// all while the stream waited for its answer. The connection is closed so the pool redials.
    #[error("connection to {0} was dead: {1}")]
    DeadConnection(SocketAddr, &'static str),
}

impl OpenError {
    /// The failure behind retries that ran out (attempts or budget).
    pub fn last(&self) -> &OpenError {
        match self {
            Self::Exhausted { last, .. } | Self::BudgetExhausted(last) => last.last(),
            e => e,
        }
    }

    /// Counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Dial(d) => d.reason(),
            Self::Stream(_) => "stream_failed",
            Self::WrongServer { .. } => "wrong_server_identity",
            Self::Refused { code, .. } => match code {
                StatusCode::ConnectFailed => "app_connect_failed",
                StatusCode::NoRoute => "no_route",
                StatusCode::Forbidden => "forbidden",
                StatusCode::Unavailable => "unavailable",
                StatusCode::DeadlineExceeded => "deadline_exceeded",
                StatusCode::RateLimited => "rate_limited",
                StatusCode::Ok => "ok",
            },
            Self::BudgetExhausted(_) => "retry_budget_exhausted",
            Self::Exhausted { last, .. } => last.reason(),
            Self::Timeout(_) => "connect_timeout",
            Self::NoEndpoints => "no_endpoints",
            Self::DeadConnection(..) => "dead_connection",
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// Try the next endpoint without spending budget: the destination never saw the attempt.
    Failover,
    /// Try again, spending one budget token.
    Budgeted,
    /// Give up.
    Never,
}

fn classify(e: &OpenError) -> Retry {
    match e {
        // Nothing reached the app: as free as a failed handshake.
        OpenError::Dial(_) | OpenError::WrongServer { .. } | OpenError::DeadConnection(..) => {
            Retry::Failover
        }
        OpenError::Stream(_) => Retry::Budgeted,
        // A rate-limited endpoint holds only its share of the service's limit: another may have room.
        OpenError::Refused {
            code:
                StatusCode::ConnectFailed
                | StatusCode::Unavailable
                | StatusCode::NoRoute
                | StatusCode::RateLimited,
            ..
        } => Retry::Budgeted,
        _ => Retry::Never,
    }
}

/// What every outbound listener of a proxy shares.
#[derive(Clone)]
pub struct Shared {
    /// The mesh state: endpoints and servers of each service.
    pub state: StateHandle,
    /// Our credentials (our namespace).
    pub creds: Credentials,
    /// QUIC connections to peers.
    pub pool: Arc<Pool>,
    /// Endpoints that failed recently.
    pub health: Arc<EndpointHealth>,
    /// Retries allowed.
    pub budget: Arc<Mutex<RetryBudget>>,
    /// Metrics.
    pub metrics: Metrics,
}

/// One bound outbound listener.
pub struct Outbound {
    listener: TcpListener,
    tunnels: Tunnels,
    metrics: Metrics,
}

/// The tunnel side of a listener: the proxy's own, or in node gateway mode one per workload (its
/// identity, namespace and pool), chosen by the app connection's source address.
#[derive(Clone)]
pub(crate) enum Tunnels {
    /// A sidecar: every connection is its workload's.
    One(Arc<Service>),
    /// A gateway: `services[i]` is workload `i`'s.
    Workloads {
        gateway: crate::gateway::Gateway,
        services: Arc<[Arc<Service>]>,
    },
}

impl Tunnels {
    /// The tunnel for an app connection from `client`; None when no workload has that source.
    pub(crate) fn pick(&self, client: std::net::IpAddr) -> Option<&Arc<Service>> {
        match self {
            Self::One(s) => Some(s),
            Self::Workloads { gateway, services } => services.get(gateway.attribute(client)?),
        }
    }

    fn first(&self) -> Option<&Arc<Service>> {
        match self {
            Self::One(s) => Some(s),
            Self::Workloads { services, .. } => services.first(),
        }
    }

    /// Hands `tcp` (from `client`) to its workload's tunnel, or refuses it with a reset, counted
    /// `unknown_workload`: a connection the gateway cannot attribute gets no identity.
    pub(crate) fn handle(
        &self,
        tcp: TcpStream,
        client: SocketAddr,
        drain: &Drain,
        metrics: &Metrics,
        span: impl FnOnce(&Service) -> tracing::Span,
    ) {
        match self.pick(client.ip()) {
            Some(svc) => {
                let span = span(svc);
                drain
                    .tracker
                    .spawn(svc.clone().handle(tcp, drain.clone()).instrument(span));
            }
            None => {
                tracing::warn!(%client, "connection from an address of no workload; refused");
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                drop(tcp);
                metrics
                    .failures
                    .get_or_create(&ReasonLabels {
                        direction: Direction::Outbound,
                        reason: "unknown_workload",
                    })
                    .inc();
            }
        }
    }
}

pub(crate) struct Service {
    pub(crate) cfg: OutboundConfig,
    /// The service name sent in stream headers (`cfg.service` without its namespace).
    name: String,
    /// Where the service's endpoints and servers come from.
    pub(crate) state: StateHandle,
    /// Our identity, whose namespace is the service's when `cfg.service` names none.
    creds: Credentials,
    /// The destination service, resolved once our namespace is known.
    resolved: std::sync::OnceLock<ServiceRef>,
    pool: Arc<Pool>,
    pub(crate) health: Arc<EndpointHealth>,
    pub(crate) budget: Arc<Mutex<RetryBudget>>,
    /// The budget of a retry policy that sets its own `budget_percent`, with that percentage.
    policy_budget: Mutex<Option<(u32, RetryBudget)>>,
    pub(crate) metrics: Metrics,
    next: AtomicUsize,
}

/// What a stream starts with after its header: the protocol named in the header, and for HTTP the
/// request head (and what of the body is here), sent at once so the request costs no extra round trip.
#[derive(Debug, Clone, Default)]
pub(crate) struct Start {
    pub(crate) protocol: tunnel::Protocol,
    pub(crate) head: Option<bytes::Bytes>,
    /// Nothing follows: FIN goes with the opening.
    pub(crate) finish: bool,
}

impl Outbound {
    /// Binds the listener; fails at once if the port is taken. Each tunneled connection reads the
    /// service's upstream from `state` as it is then.
    pub async fn bind(cfg: OutboundConfig, shared: Shared) -> std::io::Result<Self> {
        let listener = TcpListener::bind(cfg.listen).await?;
        Ok(Self {
            listener,
            metrics: shared.metrics.clone(),
            tunnels: Tunnels::One(Service::new(cfg, shared)),
        })
    }

    /// Node gateway mode: binds one listener for every workload of `gateway`; `shared[i]` is
    /// workload `i`'s (its credentials and pool).
    pub async fn bind_gateway(
        cfg: OutboundConfig,
        gateway: crate::gateway::Gateway,
        shared: Vec<Shared>,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(cfg.listen).await?;
        Ok(Self {
            listener,
            metrics,
            tunnels: Tunnels::Workloads {
                gateway,
                services: shared
                    .into_iter()
                    .map(|s| Service::new(cfg.clone(), s))
                    .collect(),
            },
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The service this listener tunnels to.
    pub fn service(&self) -> &str {
        self.tunnels.first().map_or("", |s| &s.cfg.service)
    }

    /// The tunnel side of this listener, for connections accepted elsewhere (the capture listener).
    pub(crate) fn tunnel(&self) -> Tunnels {
        self.tunnels.clone()
    }

    /// Accepts until the drain begins. A spare file descriptor is held so that, when the process runs
    /// out of them, waiting clients are refused at once instead of hanging in the listen backlog.
    pub async fn run(self, drain: Drain) {
        let mut spare = std::fs::File::open("/dev/null").ok();
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = drain.stop_accepting.cancelled() => return,
            };
            match accepted {
                Ok((tcp, client)) => {
                    self.tunnels.handle(
                        tcp,
                        client,
                        &drain,
                        &self.metrics,
                        |svc| tracing::debug_span!("outbound", service = %svc.cfg.service, %client),
                    );
                }
                Err(e) if out_of_fds(&e) => {
                    // The connection waits in the backlog; the app would hang on it. Free the spare
                    // descriptor, take the connection and reset it at once, then hold a spare again.
                    drop(spare.take());
                    if let Ok((tcp, client)) = self.listener.accept().await {
                        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                        drop(tcp);
                        tracing::warn!(%client, "out of file descriptors; connection refused");
                        self.metrics
                            .failures
                            .get_or_create(&ReasonLabels {
                                direction: Direction::Outbound,
                                reason: "out_of_file_descriptors",
                            })
                            .inc();
                    }
                    spare = std::fs::File::open("/dev/null").ok();
                    if spare.is_none() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Whether an accept failed because the process or system ran out of file descriptors.
fn out_of_fds(e: &std::io::Error) -> bool {
    // EMFILE and ENFILE.
    matches!(e.raw_os_error(), Some(24 | 23))
}

impl Service {
    /// The tunnel side for `cfg.service` and `cfg.port`, without a listener of its own (the outbound
    /// listener's, or an ingress route's).
    pub(crate) fn new(cfg: OutboundConfig, shared: Shared) -> Arc<Self> {
        let Shared {
            state,
            creds,
            pool,
            health,
            budget,
            metrics,
        } = shared;
        Arc::new(Self {
            name: split_service(&cfg.service).0.to_owned(),
            cfg,
            state,
            creds,
            resolved: std::sync::OnceLock::new(),
            pool,
            health,
            budget,
            policy_budget: Mutex::new(None),
            metrics,
            next: AtomicUsize::new(rand::random::<u32>() as usize),
        })
    }

    /// Records a request in the retry budget that applies: the policy's own (`percent` > 0, its retries
    /// may add that share of load, at least 10 per second) or the proxy's.
    pub(crate) fn budget_deposit(&self, percent: u32, now: std::time::Instant) {
        self.with_budget(percent, now, |b| b.deposit(now));
    }

    /// Takes one retry from the budget that applies; false when it is spent.
    pub(crate) fn budget_withdraw(&self, percent: u32, now: std::time::Instant) -> bool {
        self.with_budget(percent, now, |b| b.try_withdraw(now))
    }

    fn with_budget<T>(
        &self,
        percent: u32,
        now: std::time::Instant,
        f: impl FnOnce(&mut RetryBudget) -> T,
    ) -> T {
        if percent == 0 {
            return f(&mut self.budget.lock().unwrap_or_else(|p| p.into_inner()));
        }
        let mut pb = self.policy_budget.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *pb {
            Some((p, b)) if *p == percent => f(b),
            slot => {
                let b = &mut slot
                    .insert((
                        percent,
                        RetryBudget::new(f64::from(percent) / 100.0, 10, now),
                    ))
                    .1;
                f(b)
            }
        }
    }

    /// The destination service, in our namespace unless the listener names one.
    pub(crate) fn target(&self) -> std::borrow::Cow<'_, ServiceRef> {
        if let Some(t) = self.resolved.get() {
            return std::borrow::Cow::Borrowed(t);
        }
        match self.creds.namespace() {
            Some(ns) => std::borrow::Cow::Borrowed(
                self.resolved
                    .get_or_init(|| ServiceRef::parse(&self.cfg.service, &ns)),
            ),
            // No certificate yet (controller mode before the first one): nothing is reachable anyway.
            None => std::borrow::Cow::Owned(ServiceRef::parse(&self.cfg.service, "")),
        }
    }

    pub(crate) async fn handle(self: Arc<Self>, tcp: TcpStream, drain: Drain) {
        // The port's declared protocol decides: HTTP and gRPC ports are served request by request,
        // everything else is an opaque tunnel.
        let protocol = self
            .state
            .load()
            .service(&self.target())
            .map_or(PortProtocol::Tcp, |s| s.protocol(self.cfg.port));
        if protocol != PortProtocol::Tcp {
            crate::l7::outbound::serve(self, tcp, protocol == PortProtocol::Grpc, drain).await;
            return;
        }
        let started = Instant::now();
        let deadline = self.cfg.deadline.map(|d| started + d);
        let connect_by = deadline.map_or(started + self.cfg.connect_timeout, |d| {
            d.min(started + self.cfg.connect_timeout)
        });
        let _ = tcp.set_nodelay(true);
        let request_id = tunnel::new_request_id();
        self.budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deposit(started.into_std());
        let opened = tokio::time::timeout_at(
            connect_by,
            self.open(&request_id, connect_by, deadline, &Start::default()),
        )
        .await
        .unwrap_or_else(|_| Err(OpenError::Timeout(connect_by - started)));
        let (send, recv, pc) = match opened {
            Ok(o) => (o.send, o.recv, o.pc),
            Err(e) => {
                tracing::warn!(request_id = %tunnel::request_id_hex(&request_id), error = %e, "tunnel not established");
                self.metrics
                    .failures
                    .get_or_create(&ReasonLabels {
                        direction: Direction::Outbound,
                        reason: e.reason(),
                    })
                    .inc();
                // Nothing was sent: a plain close tells the client the connection ended.
                drop(tcp);
                return;
            }
        };
        let edge = EdgeTraffic {
            counters: self
                .metrics
                .edges
                .edge(Direction::Outbound, "", &self.target().to_string()),
            at_destination: false,
            log: self.metrics.access_log.is_on().then(|| ConnLog {
                access: self.metrics.access_log.clone(),
                peer: pc.peer.to_string(),
                service: self.target().to_string(),
                request_id: tunnel::request_id_hex(&request_id).to_string(),
            }),
        };
        let _ = carry(
            tcp,
            (send, recv),
            &pc.metrics,
            &edge,
            &pc.lane,
            deadline,
            &drain.abort,
        )
        .await;
    }

    /// The connect phase with retries. The caller bounds it by `connect_by`.
    pub(crate) async fn open(
        &self,
        request_id: &[u8; 16],
        connect_by: Instant,
        deadline: Option<Instant>,
        first: &Start,
    ) -> Result<Opened, OpenError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let upstream = self.state.load().upstream(&self.target());
        let now = Instant::now().into_std();
        // A traffic split picks the version first, per connection or request.
        let candidates = upstream.candidates(rand::random());
        let order = if first.protocol == tunnel::Protocol::Tcp {
            self.health.attempt_order(candidates, start, now)
        } else {
            // Requests: the better of two random endpoints by latency and load.
            let draw = (
                rand::random::<u32>() as usize,
                rand::random::<u32>() as usize,
            );
            self.health.pick_order(candidates, draw, now, |a| {
                self.pool.rtt(a, upstream.servers.sni())
            })
        };
        if order.is_empty() {
            return Err(OpenError::NoEndpoints);
        }
        let mut attempts = 0u32;
        let mut idx = 0usize;
        loop {
            let addr = order[idx % order.len()];
            attempts += 1;
            let err = match self
                .attempt(
                    addr,
                    &upstream.servers,
                    request_id,
                    connect_by,
                    deadline,
                    first,
                )
                .await
            {
                Ok(x) => {
                    self.health.mark_up(addr);
                    return Ok(x);
                }
                Err(e) => e,
            };
            tracing::debug!(%addr, attempt = attempts, error = %err, "attempt failed");
            let decision = classify(&err);
            if decision == Retry::Failover {
                self.health.mark_down(addr, Instant::now().into_std());
            }
            if decision == Retry::Never {
                return Err(err);
            }
            if attempts >= self.cfg.max_attempts {
                return Err(OpenError::Exhausted {
                    attempts,
                    last: Box::new(err),
                });
            }
            if decision == Retry::Budgeted
                && !self
                    .budget
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .try_withdraw(Instant::now().into_std())
            {
                self.metrics.retries_denied.inc();
                return Err(OpenError::BudgetExhausted(Box::new(err)));
            }
            self.metrics
                .retries
                .get_or_create(&ReasonLabels {
                    direction: Direction::Outbound,
                    reason: err.reason(),
                })
                .inc();
            idx += 1;
        }
    }

    async fn attempt(
        &self,
        addr: SocketAddr,
        servers: &ServerNames,
        request_id: &[u8; 16],
        connect_by: Instant,
        deadline: Option<Instant>,
        first: &Start,
    ) -> Result<Opened, OpenError> {
        let now = Instant::now();
        let left = connect_by.saturating_duration_since(now);
        let pc = self
            .pool
            .get(addr, servers.sni(), self.cfg.handshake_timeout.min(left))
            .await?;
        if !servers.allows(&pc.peer) {
            return Err(self.wrong_server(addr, &pc, servers));
        }
        let stream_err = |e: &dyn std::fmt::Display| stream_failure(addr, &pc, e);
        let (mut send, mut recv) = pc.conn.open_bi().await.map_err(|e| stream_err(&e))?;
        // The header goes out before other streams' bulk bytes queued on this connection (and the
        // lane holds their writers back meanwhile); the stream drops to the common priority once open.
        let _ = send.set_priority(CONTROL_PRIORITY);
        let now = Instant::now();
        let header = StreamHeader {
            service: self.name.clone(),
            port: u32::from(self.cfg.port),
            protocol: first.protocol as i32,
            request_id: request_id.to_vec(),
            connect_timeout_ms: ms(connect_by.saturating_duration_since(now)).max(1) as u32,
            deadline_ms: deadline.map_or(0, |d| ms(d.saturating_duration_since(now)).max(1)),
            trace: None,
        };
        let mut opening = tunnel::encode_frame(&header);
        if let Some(head) = &first.head {
            opening.extend_from_slice(head);
        }
        pc.lane
            .control(send.write_all(&opening))
            .await
            .map_err(|e| stream_err(&e))?;
        if first.finish {
            let _ = send.finish();
        }
        let sent_at = Instant::now();
        // A request counts as in flight to this endpoint from here: a destination may hold its status
        // back until the app answers (a request sent whole).
        let in_flight = (first.protocol != tunnel::Protocol::Tcp)
            .then(|| InFlightTo::begin(self.health.clone(), addr));
        let status = self.await_status(addr, &pc, &mut recv, connect_by).await?;
        let code = StatusCode::try_from(status.code).unwrap_or(StatusCode::Unavailable);
        if code != StatusCode::Ok {
            tunnel::reset(&mut send, &mut recv, code::CANCELLED);
            return Err(OpenError::Refused {
                peer: pc.peer.to_string(),
                code,
                message: status.message,
                retry_after_ms: status.retry_after_ms,
            });
        }
        let _ = send.set_priority(0);
        if let Some(f) = in_flight {
            f.keep();
        }
        Ok(Opened {
            send,
            recv,
            pc,
            sent_at,
        })
    }
}

/// A stream that opened: its halves, its connection, and when its opening went out.
pub(crate) struct Opened {
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
    pub(crate) pc: PeerConn,
    pub(crate) sent_at: Instant,
}

/// A request counted in flight to an endpoint while its stream opens: abandoned (no verdict on the
/// endpoint) unless the stream opened and the request's handler takes over the count.
struct InFlightTo {
    health: Arc<EndpointHealth>,
    addr: SocketAddr,
    kept: bool,
}

impl InFlightTo {
    fn begin(health: Arc<EndpointHealth>, addr: SocketAddr) -> Self {
        health.begin(addr);
        Self {
            health,
            addr,
            kept: false,
        }
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for InFlightTo {
    fn drop(&mut self) {
        if !self.kept {
            self.health.abandon(self.addr);
        }
    }
}

/// Send priority of a stream while it carries its header or status, above bulk bytes (0).
pub(crate) const CONTROL_PRIORITY: i32 = 1;

impl Service {
    /// Counts and logs a peer that may not serve this service; the caller fails over.
    fn wrong_server(&self, addr: SocketAddr, pc: &PeerConn, servers: &ServerNames) -> OpenError {
        self.metrics
            .refusals
            .get_or_create(&crate::metrics::RefusalLabels {
                direction: Direction::Outbound,
                reason: "wrong_server_identity",
            })
            .inc();
        tracing::warn!(
            service = %self.cfg.service, %addr, peer = %pc.peer, allowed = %servers,
            "peer is not allowed to serve the service; endpoint avoided"
        );
        OpenError::WrongServer {
            addr,
            peer: pc.peer.to_string(),
            allowed: servers.to_string(),
        }
    }

    /// Reads the acceptor's status by `connect_by`. A peer that sends nothing at all within the
    /// handshake timeout, not even an acknowledgement of the header, is gone (typically killed, or
    /// restarted without our connection): the connection is closed so that the pool redials, and the
    /// attempt fails over. A peer that acknowledges but answers slowly (a slow app) is waited for.
    async fn await_status(
        &self,
        addr: SocketAddr,
        pc: &PeerConn,
        recv: &mut RecvStream,
        connect_by: Instant,
    ) -> Result<StreamStatus, OpenError> {
        let received = || pc.conn.stats().udp_rx.datagrams;
        let before = received();
        let read = tunnel::read_frame::<StreamStatus>(
            recv,
            connect_by.saturating_duration_since(Instant::now()),
        );
        tokio::pin!(read);
        let check_at = (Instant::now() + self.cfg.handshake_timeout).min(connect_by);
        let res = tokio::select! {
            r = &mut read => r,
            _ = tokio::time::sleep_until(check_at) => {
                if peer_gone(before, received()) {
                    self.pool.discard(pc);
                    return Err(OpenError::DeadConnection(addr, "no packet from the peer"));
                }
                read.await
            }
        };
        res.map_err(|e| stream_failure(addr, pc, &e))
    }
}

/// Whether a peer that was sent a stream header is gone: not one datagram came back meanwhile.
fn peer_gone(datagrams_before: u64, datagrams_now: u64) -> bool {
    datagrams_now == datagrams_before
}

/// A stream failure before the acceptor answered. If the connection died of a stateless reset, its peer
/// holds no state for it (it restarted): nothing reached the app, so it is a dead connection. So is one
/// we closed ourselves while this attempt held it: found dead by another stream (or the proxy drains).
fn stream_failure(addr: SocketAddr, pc: &PeerConn, e: &dyn std::fmt::Display) -> OpenError {
    match pc.conn.close_reason() {
        Some(quinn::ConnectionError::Reset) => OpenError::DeadConnection(addr, "stateless reset"),
        Some(quinn::ConnectionError::LocallyClosed) => {
            OpenError::DeadConnection(addr, "closed as dead")
        }
        _ => OpenError::Stream(e.to_string()),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_gone_only_if_nothing_came_back() {
        assert!(peer_gone(10, 10));
        assert!(!peer_gone(10, 11));
    }

    #[test]
    fn retry_classification() {
        let refused = |code| OpenError::Refused {
            peer: "p".into(),
            code,
            message: String::new(),
            retry_after_ms: 0,
        };
        let dial = OpenError::Dial(DialError::Timeout(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            Duration::from_secs(1),
        ));
        assert_eq!(classify(&dial), Retry::Failover);
        let impostor = OpenError::WrongServer {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            peer: "spiffe://td/ns/a/sa/evil".into(),
            allowed: "spiffe://td/ns/a/sa/web".into(),
        };
        assert_eq!(classify(&impostor), Retry::Failover);
        assert_eq!(impostor.reason(), "wrong_server_identity");
        let dead = OpenError::DeadConnection(SocketAddr::from(([127, 0, 0, 1], 1)), "reset");
        assert_eq!(classify(&dead), Retry::Failover);
        assert_eq!(dead.reason(), "dead_connection");
        assert_eq!(
            classify(&OpenError::Stream("reset".into())),
            Retry::Budgeted
        );
        assert_eq!(
            classify(&refused(StatusCode::ConnectFailed)),
            Retry::Budgeted
        );
        assert_eq!(classify(&refused(StatusCode::Forbidden)), Retry::Never);
        assert_eq!(classify(&refused(StatusCode::RateLimited)), Retry::Budgeted);
        let spent = OpenError::BudgetExhausted(Box::new(OpenError::Exhausted {
            attempts: 2,
            last: Box::new(refused(StatusCode::RateLimited)),
        }));
        assert_eq!(spent.last().reason(), "rate_limited");
        assert_eq!(
            classify(&refused(StatusCode::DeadlineExceeded)),
            Retry::Never
        );
        assert_eq!(classify(&OpenError::Timeout(Duration::ZERO)), Retry::Never);
    }
}
