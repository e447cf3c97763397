//! The destination side of HTTP and gRPC: a request read from a tunnel stream is forwarded to the local
//! application over a pooled hyper client (HTTP/1.1 keep-alive, or one multiplexed HTTP/2 connection for
//! HTTP/2 and gRPC), with the verified caller identity in [`CLIENT_ID`].
//!
//! Admission sees the method and path. The stream status answers as soon as the request is admitted and
//! routed (so the caller sends the body while the application works); a response head with
//! `mesh_error = CONNECT_FAILED` says the application could not be reached and never saw the request
//! (the caller may retry elsewhere). When the caller gives up (it stops the stream, or the deadline passes) the request to
//! the application is dropped, so the application sees it cancelled.

use std::{net::SocketAddr, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Version};
use quinn::{RecvStream, SendStream};
use tokio::time::Instant;

pub use super::app::AppClients;
use super::{
    frame::{self, HttpHead, MAX_HEAD},
    headers::{CLIENT_ID, grpc_status, strip_hop_by_hop},
    io::{self, ReadError, StreamBody},
};
use crate::{
    clip::clip,
    identity::SpiffeId,
    metrics::{
        Direction, LatencyLabels, Metrics, ReasonLabels, RequestClass, RequestLabels, TapSample,
    },
    ratelimit::{Limiters, RateVerdict, decide},
    state::{Admission, Request as Facts, ServiceRef, StateHandle, denying_policy},
    tunnel::{self, Protocol, StatusCode, StreamHeader, code},
};

/// What the inbound side needs to serve one HTTP stream.
pub struct Ctx<'a> {
    /// Metrics.
    pub metrics: &'a Metrics,
    /// The mesh state (admission).
    pub state: &'a StateHandle,
    /// App clients.
    pub clients: &'a AppClients,
    /// Rate limit schedules.
    pub limiters: &'a Limiters,
    /// How long the request head may take to arrive.
    pub header_timeout: Duration,
}

fn refuse_count(m: &Metrics, reason: &'static str) {
    m.failures
        .get_or_create(&ReasonLabels {
            direction: Direction::Inbound,
            reason,
        })
        .inc();
}

fn protocol_error(
    m: &Metrics,
    send: &mut SendStream,
    recv: &mut RecvStream,
    why: &dyn std::fmt::Display,
) {
    tracing::warn!(error = %why, "bad request frame");
    m.protocol_errors
        .get_or_create(&ReasonLabels {
            direction: Direction::Inbound,
            reason: "bad_request_frame",
        })
        .inc();
    tunnel::reset(send, recv, code::PROTOCOL_ERROR);
}

/// Builds the request for the application from the head a peer sent: HTTP/1.1 in origin form with a
/// `Host` (the caller's, else the application's address), HTTP/2 with the absolute URI its
/// pseudo-headers come from.
fn app_request(
    head: &HttpHead,
    app: &http::uri::Authority,
    version: Version,
    peer: &SpiffeId,
    body: StreamBody,
) -> Result<Request<StreamBody>, String> {
    let method =
        Method::from_bytes(head.method.as_bytes()).map_err(|_| "invalid method".to_owned())?;
    if !head.path.starts_with('/') {
        return Err("path must start with '/'".into());
    }
    let path = http::uri::PathAndQuery::try_from(head.path.as_str())
        .map_err(|_| "invalid path".to_owned())?;
    let mut headers =
        frame::header_map(&head.headers, "request head").map_err(|e| e.to_string())?;
    strip_hop_by_hop(&mut headers);
    // Replaces any copy the caller sent.
    let id = HeaderValue::from_str(peer.as_str()).map_err(|_| "identity".to_owned())?;
    headers.insert(CLIENT_ID, id);
    let uri = if version == Version::HTTP_2 {
        headers.remove(http::header::HOST);
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(app.clone());
        uri.path_and_query = Some(path);
        http::Uri::from_parts(uri).map_err(|_| "invalid path".to_owned())?
    } else {
        if !headers.contains_key(http::header::HOST) {
            let host = HeaderValue::from_str(&head.authority)
                .ok()
                .filter(|_| !head.authority.is_empty())
                .map_or_else(|| HeaderValue::from_str(app.as_str()), Ok)
                .map_err(|_| "invalid authority".to_owned())?;
            headers.insert(http::header::HOST, host);
        }
        http::Uri::from(path)
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Serves one HTTP stream whose header was read and routed to `app`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    ctx: Ctx<'_>,
    mut send: SendStream,
    mut recv: RecvStream,
    header: &StreamHeader,
    peer: &SpiffeId,
    target: &ServiceRef,
    app: SocketAddr,
    deadline: Option<Instant>,
) {
    let started = Instant::now();
    let rid = tunnel::request_id_hex(&header.request_id);
    let head_by = deadline.map_or(started + ctx.header_timeout, |d| {
        d.min(started + ctx.header_timeout)
    });
    let head = match io::read_head(&mut recv, Some(head_by)).await {
        Ok(h) => h,
        Err(e @ (ReadError::Stream(_) | ReadError::Reset(_))) => {
            tracing::debug!(request_id = %rid, error = %e, "stream failed before the request head");
            return;
        }
        Err(e) => {
            protocol_error(ctx.metrics, &mut send, &mut recv, &e);
            return;
        }
    };
    let (verdict, rate) = decide(
        &ctx.state.load(),
        ctx.limiters,
        &Facts {
            peer,
            service: target,
            port: u16::try_from(header.port).unwrap_or(0),
            method: Some(&head.method),
            path: Some(&head.path),
        },
        std::time::Instant::now(),
    );
    match verdict {
        Admission::Admit { audit: None } => {}
        Admission::Admit {
            audit: Some(reason),
        } => {
            tracing::info!(request_id = %rid, %peer, service = %target, method = %clip(&head.method), path = %clip(&head.path), reason, "audit: the policy would refuse this request");
            ctx.metrics.deny(target, denying_policy(reason), true);
        }
        Admission::Refuse { code, reason } => {
            tracing::info!(request_id = %rid, %peer, service = %target, method = %clip(&head.method), path = %clip(&head.path), reason, "request refused");
            ctx.metrics.deny(target, denying_policy(reason), false);
            refuse_count(ctx.metrics, reason);
            let _ = tunnel::write_status(&mut send, code, reason).await;
            let _ = send.finish();
            return;
        }
    }
    if let RateVerdict::Limited { retry_after } = rate {
        tracing::debug!(request_id = %rid, %peer, service = %target, "request rate limited");
        crate::proxy::inbound::refuse_limited(ctx.metrics, &mut send, target, retry_after).await;
        return;
    }
    let version = if header.protocol == Protocol::Http1 as i32 {
        Version::HTTP_11
    } else {
        Version::HTTP_2
    };
    let mut body = io::StreamBody::new(recv, deadline, |end| {
        if let Err(e) = end.result {
            tracing::debug!(error = %e, "request body cut short");
        }
    });
    // A request that came whole: its body is here (an empty one ends at once), and the caller waits
    // for nothing, so the status may wait for the response head and go out in the same write, for up
    // to half the time the caller gives it to arrive.
    let defer_status = head.end_stream && header.connect_timeout_ms > 0;
    if head.end_stream {
        body.settle();
    }
    let mut req = match app_request(&head, &ctx.clients.authority(app), version, peer, body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(request_id = %rid, error = %e, "bad request head");
            ctx.metrics
                .protocol_errors
                .get_or_create(&ReasonLabels {
                    direction: Direction::Inbound,
                    reason: "bad_request_frame",
                })
                .inc();
            let _ = send.reset(code::PROTOCOL_ERROR);
            return;
        }
    };
    // A traced request's span covers the exchange with the app until the response is sent.
    let mut span = ctx
        .metrics
        .tracer
        .hop(req.headers_mut(), Direction::Inbound);
    if let Some(s) = span.as_mut() {
        s.fields.method.clone_from(&head.method);
        s.fields.path = super::clip_path(&head.path);
        s.fields.service = target.to_string();
        s.fields.peer = peer.to_string();
        s.fields.request_id = rid.to_string();
    }
    let gauge = ctx.metrics.requests.in_flight(Direction::Inbound);
    let _in_flight = io::InFlight::enter(gauge);
    let mut status_sent = false;
    if !defer_status {
        // Admitted and routed: the caller may send the body. Whether the app answers comes in the head.
        if tunnel::write_status(&mut send, StatusCode::Ok, "")
            .await
            .is_err()
        {
            return;
        }
        status_sent = true;
    }
    let sent = ctx.clients.send(app, version == Version::HTTP_2, req);
    tokio::pin!(sent);
    let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
    let status_by = if defer_status {
        (started + Duration::from_millis(u64::from(header.connect_timeout_ms) / 2)).min(until)
    } else {
        until
    };
    let timer = tokio::time::sleep_until(status_by);
    tokio::pin!(timer);
    let resp = loop {
        tokio::select! {
            r = &mut sent => break Some(r),
            _ = &mut timer => {
                if status_sent {
                    break None;
                }
                if tunnel::write_status(&mut send, StatusCode::Ok, "").await.is_err() {
                    return;
                }
                status_sent = true;
                timer.as_mut().reset(until);
            }
            _ = send.stopped() => {
                // The caller gave up: dropping the request cancels it at the application.
                tracing::info!(request_id = %rid, "caller cancelled the request");
                refuse_count(ctx.metrics, "cancelled");
                return;
            }
        }
    };
    // The request body's own copy of the deadline may end the request a moment before the timer here.
    let expired = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
    // What goes ahead of the response head: the status, unless it went out already.
    let mut out = BytesMut::new();
    if !status_sent {
        out.extend_from_slice(&tunnel::status_frame(StatusCode::Ok, ""));
    }
    let resp = match resp {
        None => {
            tracing::info!(request_id = %rid, %app, "deadline exceeded");
            refuse_count(ctx.metrics, "deadline_exceeded");
            let _ = send.reset(code::DEADLINE_EXCEEDED);
            return;
        }
        Some(Err(e)) if e.is_connect() => {
            tracing::info!(request_id = %rid, %app, error = %e, "app refused connection");
            refuse_count(ctx.metrics, "app_connect_failed");
            let head = HttpHead {
                mesh_error: StatusCode::ConnectFailed as u32,
                ..Default::default()
            };
            out.extend_from_slice(&frame::encode_head(&head));
            let _ = send.write_chunk(out.freeze()).await;
            let _ = send.finish();
            return;
        }
        Some(Err(_)) if expired(deadline) => {
            tracing::info!(request_id = %rid, %app, "deadline exceeded");
            refuse_count(ctx.metrics, "deadline_exceeded");
            let _ = send.reset(code::DEADLINE_EXCEEDED);
            return;
        }
        Some(Err(e)) => {
            tracing::info!(request_id = %rid, %app, error = %e, "app request failed");
            refuse_count(ctx.metrics, "app_error");
            abandon(&mut send, out, code::CONNECTION_RESET).await;
            return;
        }
        Some(Ok(r)) => r,
    };
    let (parts, mut body) = resp.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let status = parts.status.as_u16();
    let grpc = grpc_status(&headers);
    if let Some(s) = span.as_mut() {
        s.fields.status = Some(status);
        s.fields.grpc_status = grpc;
    }
    // What of the body is here already goes in the same write as the head; a small response is one
    // write, FIN included.
    let mut ready = Vec::new();
    let complete = match io::take_ready(&mut body, &mut ready, READY_LIMIT) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(request_id = %rid, error = %e, "response body not delivered");
            abandon(&mut send, out, code::CANCELLED).await;
            return;
        }
    };
    let mut trailer_grpc = ready.iter().find_map(|f| match f {
        frame::BodyFrame::Trailers(t) => grpc_status(t),
        frame::BodyFrame::Data(_) => None,
    });
    // The request line, kept only while a live tap wants this service or the access log is on.
    let tapped = ctx.metrics.tap.wants(target);
    let request_line = (tapped || ctx.metrics.access_log.is_on()).then(|| {
        let trace = head
            .headers
            .iter()
            .find(|h| {
                h.name
                    .eq_ignore_ascii_case(crate::trace::TRACEPARENT.as_bytes())
            })
            .and_then(|h| std::str::from_utf8(&h.value).ok())
            .map(str::to_owned);
        (head.method.clone(), super::clip_path(&head.path), trace)
    });
    let head = HttpHead {
        status: u32::from(status),
        end_stream: complete,
        ..Default::default()
    };
    let encoded = frame::encode_head_with(&head, &headers);
    if encoded.len() > MAX_HEAD {
        refuse_count(ctx.metrics, "response_head_too_large");
        abandon(&mut send, out, code::PROTOCOL_ERROR).await;
        return;
    }
    out.extend_from_slice(&encoded);
    let out = io::with_frames(&out, &ready);
    if send.write_chunk(out).await.is_err() {
        return;
    }
    let service = target.to_string();
    let took = started.elapsed().as_secs_f64();
    ctx.metrics
        .requests
        .duration
        .get_or_create(&LatencyLabels {
            direction: Direction::Inbound,
            service: service.clone(),
            classification: if status < 500 && grpc.is_none_or(|g| g == 0) {
                "success"
            } else {
                "failure"
            },
        })
        .observe(took);
    let edge = ctx
        .metrics
        .edges
        .edge(Direction::Inbound, peer.as_str(), &service);
    edge.latency(took);
    if complete {
        let _ = send.finish();
    } else {
        // The status and head went out at control priority; the body at the common one.
        let _ = send.set_priority(0);
        let body = TrailerSpy {
            inner: body,
            grpc: &mut trailer_grpc,
        };
        if let Err(e) = io::write_body(&mut send, body, deadline).await {
            tracing::debug!(request_id = %rid, error = %e, "response body not delivered");
        }
    }
    ctx.metrics
        .requests
        .total
        .get_or_create(&RequestLabels {
            direction: Direction::Inbound,
            peer: peer.to_string(),
            service,
            status_code: status,
            grpc_status: grpc.or(trailer_grpc),
        })
        .inc();
    edge.request(RequestClass::of(status, grpc.or(trailer_grpc)), true);
    if let Some((method, path, trace)) = request_line {
        let service = target.to_string();
        ctx.metrics.access_log.record(&crate::access_log::Entry {
            kind: "http",
            direction: Direction::Inbound,
            peer: peer.as_str(),
            service: &service,
            method: Some(&method),
            path: Some(&path),
            status: Some(status),
            grpc_status: grpc.or(trailer_grpc),
            duration: std::time::Duration::from_secs_f64(took),
            bytes: None,
            ok: None,
            request_id: &rid.to_string(),
            traceparent: trace.as_deref(),
        });
        if tapped {
            ctx.metrics.tap.offer(TapSample {
                service,
                method,
                path,
                status,
                grpc: grpc.or(trailer_grpc),
                latency: std::time::Duration::from_secs_f64(took),
                source: peer.to_string(),
                request_id: rid.to_string(),
            });
        }
    }
}

/// Most response body bytes sent in the same write as the head.
const READY_LIMIT: usize = 64 * 1024;

/// Ends a stream whose request was admitted when no response head can follow: reset with `code`, or,
/// while the status is still held back (`ahead` holds it), the status and FIN, which the caller reads
/// as a stream that broke after the request reached the app (never as a refusal it may retry).
async fn abandon(send: &mut SendStream, ahead: BytesMut, code: quinn::VarInt) {
    if ahead.is_empty() {
        let _ = send.reset(code);
    } else {
        let _ = send.write_chunk(ahead.freeze()).await;
        let _ = send.finish();
    }
}

/// Notes the `grpc-status` of trailers passing through.
struct TrailerSpy<'a, B> {
    inner: B,
    grpc: &'a mut Option<u32>,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for TrailerSpy<'_, B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(f))) = &polled
            && let Some(t) = f.trailers_ref()
        {
            *this.grpc = grpc_status(t);
        }
        polled
    }
}
