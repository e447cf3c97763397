//! HTTP and gRPC through two proxies, with real servers and clients on both ends: hyper HTTP/1.1 and
//! HTTP/2 servers and clients, a tonic gRPC service. The port is declared `http` or `grpc` in the client
//! proxy's mesh file; the server proxy follows the protocol each stream names.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use quicmesh_proto::echo::{
    EchoMessage,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use rand::{Rng, RngCore, SeedableRng};
use tokio::net::TcpListener;

use crate::support::*;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// What the backend app saw.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) requests: AtomicU64,
    pub(crate) flaky: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// A hyper app speaking HTTP/1.1 and HTTP/2 (prior knowledge) on one port:
/// `/echo` answers the body back with `x-seen-client-id` (the identity header it got) and
/// `x-seen-method`; `/flaky` answers 503 to 30% of requests (random); `/slow` answers after 50 ms.
pub(crate) async fn http_app() -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = tcp.set_nodelay(true);
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(app(req, &s).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn app(req: Request<Incoming>, seen: &Seen) -> Response<Body> {
    seen.requests.fetch_add(1, Ordering::Relaxed);
    let id = req
        .headers()
        .get("x-quicmesh-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let mut resp = match path.as_str() {
        "/flaky" => {
            seen.flaky.fetch_add(1, Ordering::Relaxed);
            if rand::random::<f64>() < 0.3 {
                seen.failed.fetch_add(1, Ordering::Relaxed);
                let mut r = Response::new(Full::new(Bytes::from_static(b"busy")).boxed());
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return r;
            }
            Response::new(Full::new(Bytes::from_static(b"ok")).boxed())
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Response::new(Full::new(Bytes::from_static(b"slow")).boxed())
        }
        _ => Response::new(Full::new(body.unwrap_or_default()).boxed()),
    };
    resp.headers_mut()
        .insert("x-seen-client-id", id.parse().expect("header"));
    resp.headers_mut()
        .insert("x-seen-method", method.parse().expect("header"));
    resp
}

/// A server proxy (identity `echo`) for `app` on port 80, and a client proxy (identity `client`)
/// whose mesh file declares the port with `protocol` and the policies in `policies`.
pub(crate) async fn mesh_pair(
    app: SocketAddr,
    protocol: &str,
    policies: &str,
) -> (Pki, Running, Running) {
    let pki = Pki::new();
    pki.issue("server", "echo");
    let cfg = pki.config(
        "server",
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}]\n"
        ),
    );
    let server = start_proxy(&cfg).await;
    pki.issue("client", "client");
    std::fs::write(
        pki.path().join("mesh.yaml"),
        format!(
            r#"
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{ports: [{{port: 80, protocol: {protocol}}}]}}
---
kind: Endpoint
metadata: {{name: echo-0, namespace: default}}
spec: {{service: echo, address: "{}", spiffe_id: "spiffe://mesh.local/ns/default/sa/echo"}}
{policies}
"#,
            server.inbound()
        ),
    )
    .expect("mesh file");
    let cfg = pki.config_with(
        "client",
        "mesh = \"mesh.yaml\"",
        "",
        "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 80\n",
    );
    let client = start_proxy(&cfg).await;
    (pki, server, client)
}

fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c
}

pub(crate) fn h1_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(connector())
}

fn h2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector())
}

fn payload(seed: u64, max: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let len = rng.random_range(0..=max);
    let mut b = vec![0u8; len];
    rng.fill_bytes(&mut b);
    Bytes::from(b)
}

/// A body sent in chunks without a length (chunked transfer encoding on HTTP/1.1).
fn chunked(b: Bytes) -> Body {
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = b
        .chunks(7919)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    StreamBody::new(futures::stream::iter(chunks)).boxed()
}

async fn post(
    client: &Client<HttpConnector, Body>,
    target: SocketAddr,
    path: &str,
    body: Body,
) -> Response<Bytes> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{target}{path}"))
        .header(
            "x-quicmesh-client-id",
            "spiffe://mesh.local/ns/default/sa/forged",
        )
        .body(body)
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Response::from_parts(parts, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_and_chunked_bodies_arrive_byte_for_byte_with_the_verified_identity() {
    let _heavy = heavy().await;
    let (app_addr, seen) = http_app().await;
    let (_pki, server, client) = mesh_pair(app_addr, "http", "").await;
    let target = client.outbound(0);
    let c = h1_client();
    let tasks: Vec<_> = (0..8u64)
        .map(|worker| {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..125u64 {
                    let seed = worker * 1000 + i;
                    // A few large bodies (up to 10 MiB), most small; every other one chunked.
                    let max = if i % 50 == 0 { 10 << 20 } else { 16 << 10 };
                    let p = payload(seed, max);
                    let body = if i % 2 == 0 {
                        Full::new(p.clone()).boxed()
                    } else {
                        chunked(p.clone())
                    };
                    let r = post(&c, target, "/echo", body).await;
                    assert_eq!(r.status(), StatusCode::OK, "request {seed}");
                    assert_eq!(r.body().len(), p.len(), "request {seed}");
                    assert!(*r.body() == p, "request {seed}: body differs");
                    assert_eq!(
                        r.headers()["x-seen-client-id"],
                        "spiffe://mesh.local/ns/default/sa/client",
                        "the backend sees only the verified identity"
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1000);
    let labels = [
        "direction=\"outbound\"",
        "status_code=\"200\"",
        "service=\"echo.default\"",
    ];
    let m = settled(&client, "quicmesh_requests_total", &labels, 1000.0).await;
    assert_eq!(
        metric(&m, "quicmesh_requests_total", &labels),
        1000.0,
        "{m}"
    );
    assert!(
        m.contains("quicmesh_request_duration_seconds_bucket"),
        "{m}"
    );
    let labels = [
        "direction=\"inbound\"",
        "peer=\"spiffe://mesh.local/ns/default/sa/client\"",
    ];
    let s = settled(&server, "quicmesh_requests_total", &labels, 1000.0).await;
    assert_eq!(
        metric(&s, "quicmesh_requests_total", &labels),
        1000.0,
        "{s}"
    );
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_carries_a_hundred_concurrent_streams_on_one_app_connection() {
    let _heavy = heavy().await;
    let (app_addr, seen) = http_app().await;
    let (_pki, server, client) = mesh_pair(app_addr, "http", "").await;
    let target = client.outbound(0);
    let c = h2_client();
    for batch in 0..10u64 {
        let tasks: Vec<_> = (0..100u64)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    let p = payload(batch * 100 + i, 64 << 10);
                    let r = post(&c, target, "/echo", Full::new(p.clone()).boxed()).await;
                    assert_eq!(r.status(), StatusCode::OK);
                    assert_eq!(r.version(), http::Version::HTTP_2);
                    assert!(*r.body() == p, "body differs");
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("request");
        }
    }
    assert_eq!(seen.requests.load(Ordering::Relaxed), 1000);
    let labels = ["direction=\"outbound\"", "status_code=\"200\""];
    let m = settled(&client, "quicmesh_requests_total", &labels, 1000.0).await;
    assert_eq!(
        metric(&m, "quicmesh_requests_total", &labels),
        1000.0,
        "{m}"
    );
    client.shutdown().await;
    server.shutdown().await;
}

const RETRY_POLICY: &str = r#"---
kind: Policy
metadata: {name: retries, namespace: default}
spec:
  target_service: echo
  timeouts: {retry: {max_retries: 6, budget_percent: 100, retry_on: [5xx]}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_turns_30_percent_503s_into_successes_for_gets_and_leaves_posts_alone() {
    let _heavy = heavy().await;
    let (app_addr, seen) = http_app().await;
    let (_pki, server, client) = mesh_pair(app_addr, "http", RETRY_POLICY).await;
    let target = client.outbound(0);
    let c = h1_client();
    let ok = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (c, ok) = (c.clone(), ok.clone());
            tokio::spawn(async move {
                for _ in 0..500 {
                    let req = Request::get(format!("http://{target}/flaky"))
                        .body(Full::new(Bytes::new()).boxed())
                        .expect("request");
                    let r = c.request(req).await.expect("response");
                    if r.status() == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = r.into_body().collect().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
    let ok = ok.load(Ordering::Relaxed);
    let failed_at_app = seen.failed.load(Ordering::Relaxed);
    let m = client.metrics().await;
    assert!(ok >= 4995, "{ok} of 5000 GETs succeeded\n{m}");
    let retries = metric(&m, "quicmesh_retries_total", &["reason=\"5xx\""]);
    assert!(failed_at_app > 1000, "the app failed {failed_at_app} times");
    assert!(
        retries >= failed_at_app as f64 - 5.0 && retries <= failed_at_app as f64,
        "{retries} retries for {failed_at_app} failures\n{m}"
    );

    // POST is not idempotent and the policy does not opt it in: failures pass through.
    let before = seen.flaky.load(Ordering::Relaxed);
    let mut unavailable = 0;
    for _ in 0..300 {
        let r = post(
            &c,
            target,
            "/flaky",
            Full::new(Bytes::from_static(b"x")).boxed(),
        )
        .await;
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            unavailable += 1;
        }
    }
    assert_eq!(
        seen.flaky.load(Ordering::Relaxed) - before,
        300,
        "no POST was retried"
    );
    assert!(unavailable > 30, "{unavailable} of 300 POSTs saw the 503");
    let m2 = client.metrics().await;
    assert_eq!(
        metric(&m2, "quicmesh_retries_total", &["reason=\"5xx\""]),
        retries,
        "no retry for POST"
    );
    client.shutdown().await;
    server.shutdown().await;
}

/// The tonic Echo service; `cancelled` turns true when a request's handler is dropped unfinished.
#[derive(Default, Clone)]
pub(crate) struct EchoSvc {
    cancelled: Arc<AtomicBool>,
}

struct DropFlag(Arc<AtomicBool>, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

type Stream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<EchoMessage, tonic::Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl Echo for EchoSvc {
    async fn unary(
        &self,
        req: tonic::Request<EchoMessage>,
    ) -> Result<tonic::Response<EchoMessage>, tonic::Status> {
        let mut flag = DropFlag(self.cancelled.clone(), false);
        let m = req.into_inner();
        if m.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(m.delay_ms)).await;
        }
        flag.1 = true;
        if m.fail_with != 0 {
            return Err(tonic::Status::new(
                tonic::Code::from_i32(m.fail_with as i32),
                "asked to fail",
            ));
        }
        Ok(tonic::Response::new(m))
    }

    type ServerStreamStream = Stream;

    async fn server_stream(
        &self,
        req: tonic::Request<EchoMessage>,
    ) -> Result<tonic::Response<Stream>, tonic::Status> {
        let m = req.into_inner();
        let n = m.payload.first().copied().unwrap_or(1).max(1);
        let out: Vec<_> = (0..n).map(|_| Ok(m.clone())).collect();
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(out))))
    }

    async fn client_stream(
        &self,
        req: tonic::Request<tonic::Streaming<EchoMessage>>,
    ) -> Result<tonic::Response<EchoMessage>, tonic::Status> {
        let mut s = req.into_inner();
        let mut all = Vec::new();
        while let Some(m) = s.message().await? {
            all.extend_from_slice(&m.payload);
        }
        Ok(tonic::Response::new(EchoMessage {
            payload: all,
            ..Default::default()
        }))
    }

    type BidiStream = Stream;

    async fn bidi(
        &self,
        req: tonic::Request<tonic::Streaming<EchoMessage>>,
    ) -> Result<tonic::Response<Stream>, tonic::Status> {
        let mut s = req.into_inner();
        let out = async_stream_like(move |tx| async move {
            while let Ok(Some(m)) = s.message().await {
                if tx.send(Ok(m)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(out))
    }
}

/// A response stream fed by a task.
fn async_stream_like<F, Fut>(f: F) -> Stream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<EchoMessage, tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

pub(crate) async fn grpc_app() -> (SocketAddr, EchoSvc) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let svc = EchoSvc::default();
    let s = svc.clone();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(s))
            .serve_with_incoming(tokio_stream_from(l))
            .await;
    });
    (addr, svc)
}

fn tokio_stream_from(
    l: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

pub(crate) async fn grpc_client(target: SocketAddr) -> EchoClient<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect");
    EchoClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_every_streaming_kind_keep_messages_trailers_and_status() {
    let _heavy = heavy().await;
    let (app_addr, _svc) = grpc_app().await;
    let (_pki, server, client) = mesh_pair(app_addr, "grpc", "").await;
    let c = grpc_client(client.outbound(0)).await;
    let msg = |i: u64| EchoMessage {
        payload: payload(i, 4096).to_vec(),
        ..Default::default()
    };
    let tasks: Vec<_> = (0..1000u64)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let m = msg(i);
                let back = c.unary(m.clone()).await.expect("unary").into_inner();
                assert_eq!(back, m);
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("unary");
    }
    for i in 0..1000u64 {
        let mut c = c.clone();
        let mut m = msg(i);
        m.payload.insert(0, 3);
        let mut s = c
            .server_stream(m.clone())
            .await
            .expect("server stream")
            .into_inner();
        let mut n = 0;
        while let Some(x) = s.message().await.expect("message") {
            assert_eq!(x, m);
            n += 1;
        }
        assert_eq!(n, 3);
        let parts: Vec<EchoMessage> = (0..3).map(|j| msg(i * 10 + j)).collect();
        let want: Vec<u8> = parts.iter().flat_map(|p| p.payload.clone()).collect();
        let back = c
            .client_stream(futures::stream::iter(parts.clone()))
            .await
            .expect("client stream")
            .into_inner();
        assert_eq!(back.payload, want);
        let mut bidi = c
            .bidi(futures::stream::iter(parts.clone()))
            .await
            .expect("bidi")
            .into_inner();
        for p in &parts {
            assert_eq!(
                bidi.message().await.expect("bidi message").as_ref(),
                Some(p)
            );
        }
        assert_eq!(bidi.message().await.expect("end"), None);
    }
    // A status other than OK crosses in the trailers, code and message intact.
    let err = c
        .clone()
        .unary(EchoMessage {
            fail_with: tonic::Code::NotFound as u32,
            ..Default::default()
        })
        .await
        .expect_err("asked to fail");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "asked to fail");
    let m = settled(
        &client,
        "quicmesh_requests_total",
        &["direction=\"outbound\"", "grpc_status=\"0\""],
        4000.0,
    )
    .await;
    assert_eq!(
        metric(
            &m,
            "quicmesh_requests_total",
            &["direction=\"outbound\"", "grpc_status=\"0\""]
        ),
        4000.0,
        "{m}"
    );
    let failed = ["direction=\"outbound\"", "grpc_status=\"5\""];
    let m = settled(&client, "quicmesh_requests_total", &failed, 1.0).await;
    assert_eq!(metric(&m, "quicmesh_requests_total", &failed), 1.0, "{m}");
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_ends_the_call_in_time_and_cancels_it_at_the_backend() {
    let (app_addr, svc) = grpc_app().await;
    let (_pki, server, client) = mesh_pair(app_addr, "grpc", "").await;
    // A plain HTTP/2 client sends the call: tonic's client would end it itself at its own timeout.
    let msg = prost::Message::encode_to_vec(&EchoMessage {
        delay_ms: 2000,
        ..Default::default()
    });
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(msg.len()).expect("len").to_be_bytes());
    framed.extend_from_slice(&msg);
    let req = Request::post(format!(
        "http://{}/quicmesh.echo.v1.Echo/Unary",
        client.outbound(0)
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "200m")
    .body(Full::new(Bytes::from(framed)).boxed())
    .expect("request");
    let t0 = std::time::Instant::now();
    let resp = h2_client().request(req).await.expect("response");
    let took = t0.elapsed();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body");
    let status = parts
        .headers
        .get("grpc-status")
        .or_else(|| collected.trailers().and_then(|t| t.get("grpc-status")))
        .cloned();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(
        status.as_ref().and_then(|v| v.to_str().ok()),
        Some("4"),
        "DEADLINE_EXCEEDED expected: {parts:?}"
    );
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(300),
        "answered after {took:?}"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            svc.cancelled.load(Ordering::SeqCst)
        })
        .await,
        "the backend's handler was not cancelled"
    );
    // The caller's proxy answered it: counted as a failure with its latency too, as one answered
    // by the app would be.
    let m = client.metrics().await;
    assert_eq!(
        metric(
            &m,
            "quicmesh_request_duration_seconds_count",
            &["classification=\"failure\"", "direction=\"outbound\""]
        ),
        1.0,
        "{m}"
    );
    client.shutdown().await;
    server.shutdown().await;
}

/// The proxy's metrics once `name{labels}` has reached `want`, or after 5 s: request counters are
/// bumped when a response body ends, a moment after the client has read all of it.
async fn settled(p: &Running, name: &str, labels: &[&str], want: f64) -> String {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = p.metrics().await;
        if metric(&m, name, labels) >= want || tokio::time::Instant::now() >= until {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends raw bytes to `target` and returns what comes back until the server closes (bounded).
async fn raw_exchange(target: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(target)
        .await
        .expect("connect");
    let _ = s.write_all(bytes).await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
    String::from_utf8_lossy(&back).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_400_and_oversized_heads_get_431_and_the_proxy_serves_on() {
    let (app_addr, seen) = http_app().await;
    let (_pki, server, client) = mesh_pair(app_addr, "http", "").await;
    let target = client.outbound(0);
    let back = raw_exchange(target, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await;
    assert!(back.starts_with("HTTP/1.1 400"), "{back:?}");
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let back = raw_exchange(target, &big).await;
    assert!(back.starts_with("HTTP/1.1 431"), "{back:?}");
    assert_eq!(
        seen.requests.load(Ordering::Relaxed),
        0,
        "nothing reached the app"
    );
    // The listener lives on.
    let r = post(
        &h1_client(),
        target,
        "/echo",
        Full::new(Bytes::from_static(b"ok")).boxed(),
    )
    .await;
    assert_eq!(r.body().as_ref(), b"ok");
    client.shutdown().await;
    server.shutdown().await;
}

/// An app that answers every request with its `name`, after `delay`, or 503 while `failing`.
pub(crate) async fn named_app(
    name: &'static str,
    delay: Duration,
    failing: Arc<AtomicBool>,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = tcp.set_nodelay(true);
            let failing = failing.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let failing = failing.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        let mut r =
                            Response::new(Full::new(Bytes::from_static(name.as_bytes())).boxed());
                        if failing.load(Ordering::SeqCst) {
                            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Two server proxies (both identity `echo`) in front of `apps`, and a client proxy whose mesh file
/// lists both as endpoints of the `http` port.
async fn two_endpoints(apps: [SocketAddr; 2]) -> (Pki, Vec<Running>, Running) {
    let pki = Pki::new();
    let mut servers = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let name = format!("server{i}");
        pki.issue(&name, "echo");
        let cfg = pki.config(
            &name,
            &format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nports = [{{ port = 80, app = \"{app}\" }}]\n"
            ),
        );
        servers.push(start_proxy(&cfg).await);
    }
    pki.issue("client", "client");
    let mut mesh = "kind: Service\nmetadata: {name: echo, namespace: default}\nspec: {ports: [{port: 80, protocol: http}]}\n".to_owned();
    for (i, s) in servers.iter().enumerate() {
        mesh.push_str(&format!(
            "---\nkind: Endpoint\nmetadata: {{name: echo-{i}, namespace: default}}\nspec: {{service: echo, address: \"{}\", spiffe_id: \"spiffe://mesh.local/ns/default/sa/echo\"}}\n",
            s.inbound()
        ));
    }
    std::fs::write(pki.path().join("mesh.yaml"), mesh).expect("mesh");
    let cfg = pki.config_with(
        "client",
        "mesh = \"mesh.yaml\"",
        "",
        "[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"echo\"\nport = 80\n",
    );
    let client = start_proxy(&cfg).await;
    (pki, servers, client)
}

pub(crate) async fn get_body(
    c: &Client<HttpConnector, Body>,
    target: SocketAddr,
) -> (StatusCode, Bytes) {
    let req = Request::get(format!("http://{target}/"))
        .body(Full::new(Bytes::new()).boxed())
        .expect("request");
    let r = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = r.status();
    (
        status,
        r.into_body().collect().await.expect("body").to_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_faster_endpoint() {
    let ok = Arc::new(AtomicBool::new(false));
    let fast = named_app("fast", Duration::ZERO, ok.clone()).await;
    let slow = named_app("slow", Duration::from_millis(50), ok).await;
    let (_pki, servers, client) = two_endpoints([fast, slow]).await;
    let c = h1_client();
    let target = client.outbound(0);
    // Warm-up: both get measured.
    for _ in 0..20 {
        get_body(&c, target).await;
    }
    let mut to_fast = 0;
    for _ in 0..500 {
        let (status, body) = get_body(&c, target).await;
        assert_eq!(status, StatusCode::OK);
        if body.as_ref() == b"fast" {
            to_fast += 1;
        }
    }
    assert!(to_fast >= 450, "{to_fast} of 500 went to the fast endpoint");
    client.shutdown().await;
    for s in servers {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_503_is_ejected_then_readmitted_when_it_recovers() {
    let failing = Arc::new(AtomicBool::new(true));
    let good = named_app("good", Duration::ZERO, Arc::new(AtomicBool::new(false))).await;
    let bad = named_app("bad", Duration::ZERO, failing.clone()).await;
    let (_pki, servers, client) = two_endpoints([good, bad]).await;
    // POST: never retried without a policy, so each 503 reaches the caller and counts once.
    let c = h1_client();
    let target = client.outbound(0);
    // With two endpoints, power of two choices compares both every time: the failing one gets a request
    // only while its latency cost is below the good one's, or once its cost has faded. So requests go
    // in rounds until its fifth failure in a row has ejected it (bounded: 40 rounds of 50).
    let mut from_bad = 0;
    let mut m = String::new();
    for _ in 0..40 {
        for _ in 0..50 {
            let r = post(&c, target, "/", Full::new(Bytes::new()).boxed()).await;
            if r.body().as_ref() == b"bad" {
                from_bad += 1;
            }
        }
        m = client.metrics().await;
        if metric(&m, "quicmesh_endpoint_ejections_total", &[]) >= 1.0 {
            break;
        }
    }
    assert!(
        metric(&m, "quicmesh_endpoint_ejections_total", &[]) >= 1.0,
        "never ejected after {from_bad} failures reached the caller: {m}"
    );
    // Ejected after 5 failures in a row and kept out (2 s, then 4 s, ...); each readmission is a
    // probation its first failure ends.
    assert!(
        from_bad <= 15,
        "{from_bad} requests reached the failing endpoint"
    );
    // Recovered: back in rotation once its ejection is over (the balancer forgets its failures).
    failing.store(false, Ordering::SeqCst);
    let back = eventually(Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            let mut seen_bad = false;
            for _ in 0..50 {
                let r = post(&c, target, "/", Full::new(Bytes::new()).boxed()).await;
                seen_bad |= r.body().as_ref() == b"bad";
            }
            seen_bad
        }
    })
    .await;
    assert!(back, "the recovered endpoint never got traffic again");
    client.shutdown().await;
    for s in servers {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_frames_from_a_peer_reset_only_that_stream() {
    use bytes::BufMut;
    use prost::Message;
    use quicmesh_proto::tunnel::{Protocol, StatusCode as Tunnel, StreamHeader};
    use quicmesh_transport::l7::frame::{self, HttpHead, HttpHeader, Kind};

    let (app_addr, seen) = http_app().await;
    let (pki, server, client) = mesh_pair(app_addr, "http", "").await;
    // No proxy on this side: a QUIC peer with a mesh certificate that writes what it likes.
    let (_ep, conn) = crate::dataplane::raw_connection(&pki, server.inbound()).await;
    let opening = |after: &[u8]| {
        let h = StreamHeader {
            service: "echo".into(),
            port: 80,
            protocol: Protocol::Http1 as i32,
            ..Default::default()
        };
        let mut f = bytes::BytesMut::new();
        f.put_u16(u16::try_from(h.encoded_len()).expect("len"));
        h.encode(&mut f).expect("encode");
        f.extend_from_slice(after);
        f
    };
    let reset = Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(
        quicmesh_transport::tunnel::code::PROTOCOL_ERROR,
    )));
    let head = |method: &str, headers: Vec<HttpHeader>| {
        frame::encode_head(&HttpHead {
            method: method.into(),
            path: "/echo".into(),
            headers,
            ..Default::default()
        })
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown frame type", vec![9, 0, 0, 0, 1, 0]),
        (
            "head over 64 KiB",
            frame::prefix(Kind::Head, 1 << 20).to_vec(),
        ),
        ("data before the head", {
            let mut v = frame::prefix(Kind::Data, 2).to_vec();
            v.extend_from_slice(b"hi");
            v
        }),
        ("not protobuf", {
            let mut v = frame::prefix(Kind::Head, 4).to_vec();
            v.extend_from_slice(&[0xff; 4]);
            v
        }),
        (
            "invalid header name",
            head(
                "GET",
                vec![HttpHeader {
                    name: Bytes::from_static(b"bad name"),
                    value: Bytes::from_static(b"v"),
                }],
            )
            .to_vec(),
        ),
        ("invalid method", head("G E T", vec![]).to_vec()),
    ];
    for (what, bytes) in &cases {
        assert_eq!(
            crate::dataplane::send_raw(&conn, &opening(bytes)).await,
            reset,
            "{what}"
        );
    }
    // The connection lives on and a proper request on it is served.
    let back = crate::dataplane::send_raw(&conn, &opening(&head("GET", vec![])))
        .await
        .expect("good request");
    let (status, rest) = crate::dataplane::status_and_rest(&back);
    assert_eq!(status.code, Tunnel::Ok as i32);
    let (kind, len) = frame::parse_prefix(rest[..5].try_into().expect("prefix")).expect("frame");
    assert_eq!(kind, Kind::Head);
    let response =
        frame::decode_head(Bytes::copy_from_slice(&rest[5..5 + len])).expect("response head");
    assert_eq!(response.status, 200);
    let m = server.metrics().await;
    assert_eq!(
        metric(
            &m,
            "quicmesh_protocol_errors_total",
            &["reason=\"bad_request_frame\""]
        ),
        cases.len() as f64,
        "{m}"
    );
    assert_eq!(
        seen.requests.load(Ordering::Relaxed),
        1,
        "only the good request reached the app"
    );
    assert!(conn.close_reason().is_none());
    client.shutdown().await;
    server.shutdown().await;
}
