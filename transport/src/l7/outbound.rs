//! The source side of HTTP and gRPC: the application's connection is terminated here (HTTP/1.1 with
//! keep-alive and chunked bodies, HTTP/2 by prior knowledge), and each request travels as its own QUIC
//! stream to an endpoint chosen per request.
//!
//! The request head rides with the stream header; the body follows as it arrives, recorded up to
//! [`MAX_REPLAY_BODY`] so that a retry can replay it; the response comes back on the same stream. The
//! retry rule, the deadline and the answer for each failure are pure functions ([`super::policy`]).
//! Any identity header an application sends is removed: only the destination's proxy sets it, from
//! the verified certificate.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::{rt::TokioIo, server::conn::auto};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    frame::{self, BodyFrame, HttpHead, MAX_HEAD},
    headers::{self, grpc_status, is_grpc, strip_hop_by_hop},
    io::{self, BoxError, ReadError},
    policy::{
        self, Failure, MAX_REPLAY_BODY, Outcome, RetryRule, failure_status, parse_grpc_timeout,
        request_timeout,
    },
};
use crate::{
    metrics::{Direction, LatencyLabels, ReasonLabels, RequestClass, RequestLabels},
    proxy::{
        Drain,
        outbound::{OpenError, Service, Start},
    },
    tunnel::{self, Protocol, StatusCode, code},
};

pub(crate) type RespBody = BoxBody<Bytes, BoxError>;

/// Longest wait for the rest of a small request body before deciding on a retry.
const BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Longest wait for the application's answer to an upgrade request.
const UPGRADE_ANSWER: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves one application connection until it closes or the proxy drains.
pub(crate) async fn serve(svc: Arc<Service>, tcp: TcpStream, grpc: bool, drain: Drain) {
    let _ = tcp.set_nodelay(true);
    let s = svc.clone();
    let abort = drain.abort.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let s = s.clone();
        let abort = abort.clone();
        async move {
            Ok::<_, Infallible>(if wants_upgrade(&req) {
                upgrade(s, req, abort).await
            } else {
                request(s, req, grpc).await
            })
        }
    });
    let mut b = auto::Builder::new(super::BoxedSpawn);
    // Heads beyond the limit get 431; malformed requests get 400 and a closed connection (hyper).
    b.http1().max_buf_size(MAX_HEAD).keep_alive(true);
    b.http2()
        .max_header_list_size(u32::try_from(MAX_HEAD).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024);
    let conn = b.serve_connection_with_upgrades(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "application connection ended");
            }
        }
        _ = drain.stop_accepting.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = drain.abort.cancelled() => {}
            }
        }
    }
}

/// What the application is told when no stream could be opened.
fn open_failure(e: &OpenError, deadline: Option<Instant>) -> Failure {
    match e.last() {
        OpenError::Refused {
            code: StatusCode::Forbidden,
            ..
        } => Failure::Forbidden,
        OpenError::Refused {
            code: StatusCode::NoRoute,
            ..
        } => Failure::NoRoute,
        OpenError::Refused {
            code: StatusCode::RateLimited,
            retry_after_ms,
            ..
        } => Failure::RateLimited {
            retry_after_s: retry_after_ms.div_ceil(1000).max(1),
        },
        // Whatever failed last, a request whose deadline passed meanwhile ran out of time.
        _ if deadline.is_some_and(|d| Instant::now() >= d) => Failure::Deadline,
        _ => Failure::Unavailable,
    }
}

/// A request that asks to leave HTTP: an HTTP/1.1 `Upgrade` (WebSocket and the like) or `CONNECT`.
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        || (req.version() == Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE))
}

/// An upgrade leaves request-by-request handling: it travels on one opaque stream, like a TCP
/// connection, with the request written as HTTP/1.1 to the destination's application. If the
/// application switches protocols (101, or 2xx to a `CONNECT`), the application's connection and
/// the stream are joined byte for byte until either side closes or the proxy's drain ends; any other
/// answer is passed back as a response. Opaque streams are admitted without a method or path, so a
/// policy that allows only some paths refuses upgrades (403).
async fn upgrade(
    svc: Arc<Service>,
    mut req: Request<Incoming>,
    abort: CancellationToken,
) -> Response<RespBody> {
    req.headers_mut().remove(headers::CLIENT_ID);
    let service = svc.target().to_string();
    let request_id = tunnel::new_request_id();
    let rid = tunnel::request_id_hex(&request_id);
    let started = Instant::now();
    let deadline = svc.cfg.deadline.map(|d| started + d);
    let connect_by = deadline.map_or(started + svc.cfg.connect_timeout, |d| {
        d.min(started + svc.cfg.connect_timeout)
    });
    let opened = tokio::time::timeout_at(
        connect_by,
        svc.open(&request_id, connect_by, deadline, &Start::default()),
    )
    .await
    .unwrap_or_else(|_| Err(OpenError::Timeout(connect_by - started)));
    let (send, recv, pc) = match opened {
        Ok(o) => (o.send, o.recv, o.pc),
        Err(e) => {
            tracing::info!(request_id = %rid, error = %e, "upgrade not delivered");
            let f = open_failure(&e, deadline);
            let (status, _) = failure_status(f);
            count(&svc, "", &service, status.as_u16(), None, None);
            return failure_response(f, false, &e.to_string());
        }
    };
    let peer = pc.peer.to_string();
    let bad_gateway = |svc: &Service, e: &dyn std::fmt::Display| {
        tracing::info!(request_id = %rid, %peer, error = %e, "upgrade failed");
        count(svc, &peer, &service, 502, None, None);
        failure_response(Failure::BadGateway, false, "upgrade failed")
    };
    let stream = TokioIo::new(tokio::io::join(recv, send));
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(stream).await {
        Ok(x) => x,
        Err(e) => return bad_gateway(&svc, &e),
    };
    tokio::spawn(conn.with_upgrades());
    let app_side = hyper::upgrade::on(&mut req);
    let connect = req.method() == http::Method::CONNECT;
    // An HTTP/2 `CONNECT` from the app reaches the destination's app as HTTP/1.1.
    *req.version_mut() = Version::HTTP_11;
    let answer = tokio::time::timeout_at(
        deadline.map_or(started + UPGRADE_ANSWER, |d| {
            d.min(started + UPGRADE_ANSWER)
        }),
        sender.send_request(req),
    )
    .await;
    let mut resp = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return bad_gateway(&svc, &e),
        Err(_) => return bad_gateway(&svc, &"no answer in time"),
    };
    count(&svc, &peer, &service, resp.status().as_u16(), None, None);
    let switched = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
        || (connect && resp.status().is_success());
    if switched {
        let mesh_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(a), Ok(b)) = tokio::join!(app_side, mesh_side) else {
                return;
            };
            let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                _ = abort.cancelled() => {}
                _ = sleep_until_opt(deadline) => {}
            }
        });
    }
    resp.map(|b| b.map_err(BoxError::from).boxed())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What the caller gets when the mesh could not get it a response.
fn failure_response(f: Failure, grpc: bool, detail: &str) -> Response<RespBody> {
    let (status, grpc_code) = failure_status(f);
    let mut r = if grpc {
        // Trailers-only: the status travels in the head.
        let mut r = Response::new(empty());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        r.headers_mut()
            .insert(headers::GRPC_STATUS, HeaderValue::from(grpc_code));
        if let Ok(v) =
            HeaderValue::from_str(&detail.replace(|c: char| !c.is_ascii_graphic() && c != ' ', ""))
        {
            r.headers_mut().insert(headers::GRPC_MESSAGE, v);
        }
        r
    } else {
        let mut r = Response::new(
            Full::new(Bytes::from(format!("{detail}\n")))
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = status;
        r
    };
    r.headers_mut()
        .insert(headers::MESH_ERROR, HeaderValue::from_static("mesh"));
    if let Failure::RateLimited { retry_after_s } = f {
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    }
    r
}

fn empty() -> RespBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// The request body as far as it went by: kept for a replay while it stays within the limit.
#[derive(Debug, Default)]
struct Recording {
    parts: Vec<BodyFrame>,
    size: usize,
    complete: bool,
    overflowed: bool,
}

impl Recording {
    fn replayable(&self) -> bool {
        self.complete && !self.overflowed
    }

    fn add(&mut self, part: BodyFrame) {
        if self.overflowed {
            return;
        }
        if let BodyFrame::Data(d) = &part {
            self.size += d.len();
        }
        if self.size > MAX_REPLAY_BODY {
            self.overflowed = true;
            self.parts = Vec::new();
        } else {
            self.parts.push(part);
        }
    }
}

/// The rest of the application's body on the first try, recorded as it passes.
struct TryBody<B> {
    body: B,
    rec: Arc<Mutex<Recording>>,
}

impl<B> Body for TryBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let mut r = this.rec.lock().unwrap_or_else(|p| p.into_inner());
        match &polled {
            Poll::Ready(None) => r.complete = true,
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    r.add(BodyFrame::Data(d.clone()));
                } else if let Some(t) = f.trailers_ref() {
                    r.add(BodyFrame::Trailers(t.clone()));
                }
            }
            _ => {}
        }
        polled.map(|o| o.map(|r| r.map_err(Into::into)))
    }
}

/// Sends the rest of the first try's body, or resets the stream when the try is abandoned.
async fn write_task<B>(
    mut send: quinn::SendStream,
    body: TryBody<B>,
    deadline: Option<Instant>,
    cancel: CancellationToken,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    tokio::select! {
        r = io::write_body(&mut send, body, deadline) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "request body not delivered");
            }
        }
        _ = cancel.cancelled() => {
            let _ = send.reset(code::CANCELLED);
        }
    }
}

/// The request head as it travels and its header fields, taken out of `parts`: hop-by-hop headers
/// removed, authority from the URI or `Host`.
fn request_head(parts: &mut http::request::Parts) -> (HttpHead, HeaderMap) {
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let head = HttpHead {
        method: parts.method.to_string(),
        scheme: parts.uri.scheme_str().unwrap_or("http").to_owned(),
        authority,
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.to_string()),
        status: 0,
        mesh_error: 0,
        headers: Vec::new(),
        end_stream: false,
    };
    (head, headers)
}

/// The request line of a request, kept for the caller's access log only while the log is on.
struct Logged {
    method: http::Method,
    path: String,
    traceparent: Option<String>,
    rid: String,
}

impl Logged {
    fn of(
        svc: &Service,
        parts: &http::request::Parts,
        rid: impl std::fmt::Display,
    ) -> Option<Self> {
        svc.metrics.access_log.is_on().then(|| Self {
            method: parts.method.clone(),
            path: crate::l7::clip_path(parts.uri.path_and_query().map_or("/", |p| p.as_str())),
            traceparent: parts
                .headers
                .get(crate::trace::TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            rid: rid.to_string(),
        })
    }
}

/// Observes a request's latency (request head to response head, or to the answer the mesh gave
/// itself) in `quicmesh_request_duration_seconds` and its edge; returns it.
fn observe_latency(
    svc: &Service,
    service: &str,
    status: u16,
    grpc: Option<u32>,
    started: Instant,
) -> Duration {
    let took = started.elapsed();
    svc.metrics
        .requests
        .duration
        .get_or_create(&LatencyLabels {
            direction: Direction::Outbound,
            service: service.to_owned(),
            classification: classification(status, grpc),
        })
        .observe(took.as_secs_f64());
    svc.metrics
        .edges
        .edge(Direction::Outbound, "", service)
        .latency(took.as_secs_f64());
    took
}

/// Counts a finished request, and writes its access log line (`log`: its request line and latency).
fn count(
    svc: &Service,
    peer: &str,
    service: &str,
    status: u16,
    grpc: Option<u32>,
    log: Option<(&Logged, Duration)>,
) {
    svc.metrics
        .requests
        .total
        .get_or_create(&RequestLabels {
            direction: Direction::Outbound,
            peer: peer.to_owned(),
            service: service.to_owned(),
            status_code: status,
            grpc_status: grpc,
        })
        .inc();
    svc.metrics
        .edges
        .edge(Direction::Outbound, "", service)
        .request(RequestClass::of(status, grpc), !peer.is_empty());
    if let Some((l, took)) = log {
        svc.metrics.access_log.record(&crate::access_log::Entry {
            kind: "http",
            direction: Direction::Outbound,
            peer,
            service,
            method: Some(l.method.as_str()),
            path: Some(&l.path),
            status: Some(status),
            grpc_status: grpc,
            duration: took,
            bytes: None,
            ok: None,
            request_id: &l.rid,
            traceparent: l.traceparent.as_deref(),
        });
    }
}

/// A request the mesh answered itself (no response from a destination): its latency is observed like
/// an answered one's, so a failure counts in `quicmesh_request_duration_seconds` and the edges' p99s.
fn count_failed(
    svc: &Service,
    peer: &str,
    service: &str,
    status: u16,
    grpc: Option<u32>,
    started: Instant,
    log: Option<&Logged>,
) {
    let took = observe_latency(svc, service, status, grpc, started);
    count(svc, peer, service, status, grpc, log.map(|l| (l, took)));
}

fn classification(status: u16, grpc: Option<u32>) -> &'static str {
    if status < 500 && grpc.is_none_or(|g| g == 0) {
        "success"
    } else {
        "failure"
    }
}

/// One request through the mesh: from the application's request (hyper's body here, an HTTP/3
/// client's at the ingress) to the response to give it, with the deadline, retries and the answer
/// when the mesh fails.
pub(crate) async fn request<B>(
    svc: Arc<Service>,
    mut req: Request<B>,
    grpc_port: bool,
) -> Response<RespBody>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let span = svc
        .metrics
        .tracer
        .hop(req.headers_mut(), Direction::Outbound);
    let Some(mut span) = span else {
        return forward(svc, req, grpc_port, None).await;
    };
    span.fields.method = req.method().to_string();
    span.fields.path = crate::l7::clip_path(req.uri().path_and_query().map_or("/", |p| p.as_str()));
    let resp = forward(svc, req, grpc_port, Some(&mut span.fields)).await;
    // The span ends with the response head; a body streams on after it.
    span.fields.status = Some(resp.status().as_u16());
    span.fields.grpc_status = grpc_status(resp.headers());
    resp
}

/// Sends one request, with its retries; `note` (when the request is traced) learns the request id,
/// the destination's identity and the retries.
async fn forward<B>(
    svc: Arc<Service>,
    mut req: Request<B>,
    grpc_port: bool,
    mut note: Option<&mut crate::trace::SpanFields>,
) -> Response<RespBody>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let gauge = svc.metrics.requests.in_flight(Direction::Outbound);
    let in_flight = io::InFlight::enter(gauge);
    // No application may claim an identity: the destination's proxy sets this header.
    req.headers_mut().remove(headers::CLIENT_ID);
    let grpc = grpc_port || is_grpc(req.headers());
    let target = svc.target();
    let service = target.to_string();
    // One look at the mesh state per request: the policy and the endpoint count (ejection cap).
    let (timeouts, endpoints) = {
        let state = svc.state.load();
        let svc_state = state.service(&target);
        (
            svc_state.and_then(|s| s.policy.timeouts.clone()),
            svc_state.map_or(0, |s| s.upstream.endpoints.len()),
        )
    };
    let client_timeout = req
        .headers()
        .get(headers::GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let deadline = request_timeout(timeouts.as_ref(), client_timeout)
        .or(svc.cfg.deadline)
        .map(|t| started + t);
    let rule = RetryRule::from_policy(timeouts.as_ref());
    let protocol = if grpc {
        Protocol::Grpc
    } else if req.version() == Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let (mut parts, mut body) = req.into_parts();
    let request_id = tunnel::new_request_id();
    let rid = tunnel::request_id_hex(&request_id);
    let log = Logged::of(&svc, &parts, rid);
    let (mut req_head, req_headers) = request_head(&mut parts);
    if let Some(n) = note.as_mut() {
        n.service.clone_from(&service);
        n.request_id = rid.to_string();
    }
    let budget_percent = timeouts
        .as_ref()
        .and_then(|t| t.retry.as_ref())
        .map_or(0, |r| r.budget_percent);
    svc.budget_deposit(budget_percent, started.into_std());

    // What of the body is here already travels with the head; a small request that came whole is
    // one write, FIN included, and the destination may answer it in one write too.
    let mut ready = Vec::new();
    let complete = match io::take_ready(&mut body, &mut ready, MAX_REPLAY_BODY) {
        Ok(c) => c,
        Err(e) => {
            let e: BoxError = e.into();
            tracing::debug!(request_id = %rid, error = %e, "request body failed");
            count_failed(&svc, "", &service, 400, None, started, log.as_ref());
            let mut r = Response::new(empty());
            *r.status_mut() = http::StatusCode::BAD_REQUEST;
            return r;
        }
    };
    req_head.end_stream = complete;
    let mut rec = Recording::default();
    for f in &ready {
        rec.add(f.clone());
    }
    rec.complete = complete;
    let rec = Arc::new(Mutex::new(rec));
    let mut opening = io::with_frames(&frame::encode_head_with(&req_head, &req_headers), &ready);
    let mut first = (!complete).then_some(body);
    let mut retries = 0u32;
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            count_failed(
                &svc,
                "",
                &service,
                504,
                grpc.then_some(4),
                started,
                log.as_ref(),
            );
            return failure_response(Failure::Deadline, grpc, "deadline exceeded");
        }
        let try_deadline = match (deadline, rule.per_try_timeout.map(|t| now + t)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let connect_by = try_deadline.map_or(now + svc.cfg.connect_timeout, |d| {
            d.min(now + svc.cfg.connect_timeout)
        });
        let start = Start {
            protocol,
            head: Some(opening.clone()),
            finish: first.is_none(),
        };
        let opened = tokio::time::timeout_at(
            connect_by,
            svc.open(&request_id, connect_by, try_deadline, &start),
        )
        .await
        .unwrap_or_else(|_| Err(OpenError::Timeout(connect_by - now)));
        let (send, mut recv, pc, sent_at) = match opened {
            Ok(o) => (o.send, o.recv, o.pc, o.sent_at),
            Err(e) => {
                svc.metrics
                    .failures
                    .get_or_create(&ReasonLabels {
                        direction: Direction::Outbound,
                        reason: e.reason(),
                    })
                    .inc();
                tracing::info!(request_id = %rid, error = %e, "request not delivered");
                let f = open_failure(&e, deadline);
                let (status, g) = failure_status(f);
                count_failed(
                    &svc,
                    "",
                    &service,
                    status.as_u16(),
                    grpc.then_some(g),
                    started,
                    log.as_ref(),
                );
                return failure_response(f, grpc, &e.to_string());
            }
        };
        let peer = pc.peer.to_string();
        if let Some(n) = note.as_mut() {
            n.peer.clone_from(&peer);
            n.retries = retries;
        }
        let addr = pc.conn.remote_address();
        // Counted in flight to `addr` since its opening went out (`Service::open`).
        let cancel = CancellationToken::new();
        // The rest of a body that had not all come yet follows from a task; a body sent whole went
        // with the opening.
        let mut writer = first.take().map(|body| {
            let body = TryBody {
                body,
                rec: rec.clone(),
            };
            tokio::spawn(write_task(send, body, deadline, cancel.clone()))
        });
        // The head and its header fields, decoded once; malformed fields fail the try like a reset.
        let head = io::read_head(&mut recv, try_deadline).await.and_then(|h| {
            let fields = frame::header_map(&h.headers, "response head")?;
            Ok((h, fields))
        });
        let outcome = match &head {
            Ok((h, _)) if h.mesh_error != 0 => Outcome::NotSent,
            Ok((h, fields)) => Outcome::Response {
                status: u16::try_from(h.status).unwrap_or(0),
                grpc: grpc_status(fields),
            },
            Err(ReadError::Deadline) if try_deadline != deadline => Outcome::TryTimeout,
            // The far side's clock ran out a moment before ours: the same deadline.
            Err(ReadError::Deadline | ReadError::Reset(2)) => {
                svc.health.abandon(addr);
                cancel.cancel();
                let _ = recv.stop(code::DEADLINE_EXCEEDED);
                tracing::info!(request_id = %rid, %peer, "deadline exceeded");
                count_failed(
                    &svc,
                    &peer,
                    &service,
                    504,
                    grpc.then_some(4),
                    started,
                    log.as_ref(),
                );
                return failure_response(Failure::Deadline, grpc, "deadline exceeded");
            }
            Err(_) => Outcome::Reset,
        };
        // What this try teaches the balancer: latency to the answer, success or failure.
        let failed = match outcome {
            Outcome::Response { status, grpc } => {
                status >= 500 || grpc == Some(policy::grpc::UNAVAILABLE)
            }
            _ => true,
        };
        let latency = matches!(outcome, Outcome::Response { .. }).then(|| sent_at.elapsed());
        if svc
            .health
            .end(addr, latency, !failed, endpoints, Instant::now().into_std())
        {
            svc.metrics.requests.ejections.inc();
            tracing::warn!(%addr, %peer, service = %service, "endpoint ejected after failed requests in a row");
        }
        let mut replayable = rec.lock().unwrap_or_else(|p| p.into_inner()).replayable();
        if !replayable && rule.retry(&parts.method, outcome, retries, true).is_some() {
            // The answer came before the body was all sent (the app did not wait for it): a body still
            // within the replay limit is worth waiting for briefly, to be able to retry.
            let overflowed = rec.lock().unwrap_or_else(|p| p.into_inner()).overflowed;
            if let (false, Some(writer)) = (overflowed, writer.as_mut()) {
                let wait = try_deadline.map_or(BODY_WAIT, |d| {
                    d.saturating_duration_since(Instant::now()).min(BODY_WAIT)
                });
                let _ = tokio::time::timeout(wait, writer).await;
                replayable = rec.lock().unwrap_or_else(|p| p.into_inner()).replayable();
            }
        }
        if let Some(reason) = rule.retry(&parts.method, outcome, retries, replayable) {
            let funded = svc.budget_withdraw(budget_percent, Instant::now().into_std());
            if funded {
                cancel.cancel();
                let _ = recv.stop(code::CANCELLED);
                retries += 1;
                // A replay is the whole recorded body, sent with the head.
                req_head.end_stream = true;
                opening = io::with_frames(
                    &frame::encode_head_with(&req_head, &req_headers),
                    &rec.lock().unwrap_or_else(|p| p.into_inner()).parts,
                );
                svc.metrics
                    .retries
                    .get_or_create(&ReasonLabels {
                        direction: Direction::Outbound,
                        reason,
                    })
                    .inc();
                tracing::debug!(request_id = %rid, %peer, reason, retries, "retrying request");
                continue;
            }
            svc.metrics.retries_denied.inc();
        }
        let (head, mut headers) = match head {
            Ok((h, _)) if h.mesh_error != 0 => {
                cancel.cancel();
                tracing::info!(request_id = %rid, %peer, "the destination could not reach its application");
                svc.metrics
                    .failures
                    .get_or_create(&ReasonLabels {
                        direction: Direction::Outbound,
                        reason: "app_connect_failed",
                    })
                    .inc();
                count_failed(
                    &svc,
                    &peer,
                    &service,
                    503,
                    grpc.then_some(14),
                    started,
                    log.as_ref(),
                );
                return failure_response(Failure::Unavailable, grpc, "application unreachable");
            }
            Ok(x) => x,
            Err(e) => {
                cancel.cancel();
                let _ = recv.stop(match e {
                    ReadError::Frame(_) | ReadError::Truncated => code::PROTOCOL_ERROR,
                    _ => code::CANCELLED,
                });
                let f = if matches!(e, ReadError::Deadline) {
                    Failure::Deadline
                } else {
                    Failure::BadGateway
                };
                tracing::info!(request_id = %rid, %peer, error = %e, "no response");
                let (status, g) = failure_status(f);
                count_failed(
                    &svc,
                    &peer,
                    &service,
                    status.as_u16(),
                    grpc.then_some(g),
                    started,
                    log.as_ref(),
                );
                return failure_response(f, grpc, &e.to_string());
            }
        };
        strip_hop_by_hop(&mut headers);
        let status = u16::try_from(head.status)
            .ok()
            .and_then(|s| http::StatusCode::from_u16(s).ok())
            .unwrap_or(http::StatusCode::BAD_GATEWAY);
        let head_grpc = grpc_status(&headers);
        let took = observe_latency(&svc, &service, status.as_u16(), head_grpc, started);
        // Counted when the body ends: a streamed gRPC status arrives in the trailers.
        let done = {
            let svc = svc.clone();
            let code = status.as_u16();
            move |end: io::BodyEnd| {
                let g = head_grpc.or(end.grpc_status);
                if let Err(e) = &end.result {
                    tracing::debug!(error = %e, "response body cut short");
                }
                let g = if grpc { g } else { None };
                count(
                    &svc,
                    &peer,
                    &service,
                    code,
                    g,
                    log.as_ref().map(|l| (l, took)),
                );
                drop(in_flight);
                drop(cancel);
            }
        };
        let mut body = io::StreamBody::new(recv, deadline, done);
        if head.end_stream {
            body.settle();
        }
        let mut resp = Response::new(body.boxed());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        return resp;
    }
}
