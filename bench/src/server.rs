//! The application servers the harness puts load on: TCP echo, a TCP sink for bulk runs, HTTP/1.1 and
//! HTTP/2 echo, and gRPC echo (unary and streaming), all on ONE port.
//!
//! One port keeps every proxy topology simple (one outbound listener, one inbound app, one HAProxy
//! frontend). Raw TCP clients open with a 4-byte magic (`QMBE` echo, `QMBS` sink); anything else is handed
//! to hyper's HTTP/1 + HTTP/2 server, which sends `/bench.Bench/*` to tonic and answers every other request
//! with its own body. A [`StallPlan`] makes every handler pause at one moment of the run, which is how the
//! open-loop mode is shown to catch a stall that closed-loop load hides.
//!
//! The server counts the HTTP requests (gRPC calls included) it answered, and can serve that count on a
//! separate port ([`serve_stats`]): a fault test compares it with the requests its clients saw
//! acknowledged, so a request the mesh lost after the server answered it, or one it delivered twice, shows.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tower::ServiceExt;

use crate::pb;

/// Magic that selects the TCP echo protocol.
pub const MAGIC_ECHO: &[u8; 4] = b"QMBE";
/// Magic that selects the TCP sink (bulk) protocol: read to EOF, answer with the byte count (u64 BE).
pub const MAGIC_SINK: &[u8; 4] = b"QMBS";

/// When the server pauses: `after` the first request it sees, every handler waits until `pause` is over.
#[derive(Debug, Clone, Copy)]
pub struct StallPlan {
    /// Time from the first request to the start of the pause.
    pub after: Duration,
    /// How long every response is held.
    pub pause: Duration,
}

/// Shared stall state of one server.
#[derive(Debug, Clone, Default)]
pub struct Stall {
    plan: Option<StallPlan>,
    first: Arc<OnceLock<Instant>>,
}

impl Stall {
    fn new(plan: Option<StallPlan>) -> Self {
        Self {
            plan,
            first: Arc::default(),
        }
    }

    /// Waits out the pause if `now` falls inside it.
    async fn wait(&self) {
        let Some(plan) = self.plan else { return };
        let first = *self.first.get_or_init(Instant::now);
        let start = first + plan.after;
        let end = start + plan.pause;
        let now = Instant::now();
        if now >= start && now < end {
            tokio::time::sleep_until(end).await;
        }
    }
}

/// A running application server; dropped, it stops accepting.
#[derive(Debug)]
pub struct AppServer {
    addr: SocketAddr,
    answered: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl AppServer {
    /// Binds `listen` and serves every protocol on it.
    pub async fn spawn(listen: SocketAddr, stall: Option<StallPlan>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("bench server cannot bind {listen}: {e}"))?;
        let addr = listener.local_addr()?;
        let stall = Stall::new(stall);
        let answered = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(listener, stall, answered.clone()));
        tracing::debug!(%addr, "bench server listening");
        Ok(Self {
            addr,
            answered,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HTTP requests and gRPC calls answered so far (counted as the response is handed to the connection).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// A handle on the same count, for [`serve_stats`].
    pub fn answered_counter(&self) -> Arc<AtomicU64> {
        self.answered.clone()
    }
}

/// Serves `{"requests": N}` (N = [`AppServer::answered`]) to every HTTP/1.1 request on `listener`, until
/// the task is dropped. A plain port of its own, so the count is read without going through the mesh.
pub async fn serve_stats(listener: TcpListener, answered: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::task::yield_now().await;
            continue;
        };
        let answered = answered.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = serde_json::json!({"requests": answered.load(Ordering::Relaxed)});
                let mut resp = Response::new(Full::new(bytes::Bytes::from(body.to_string())));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            // Bounded: a client that sends nothing is dropped after the header timeout.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, stall: Stall, answered: Arc<AtomicU64>) {
    let grpc = pb::bench_server::BenchServer::new(GrpcEcho {
        stall: stall.clone(),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: keep serving the connections we have.
                tracing::warn!(error = %e, "bench server accept failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let stall = stall.clone();
        let grpc = grpc.clone();
        let answered = answered.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(stream, stall, grpc, answered).await {
                tracing::trace!(%peer, error = %e, "bench connection ended");
            }
        });
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    stall: Stall,
    grpc: pb::bench_server::BenchServer<GrpcEcho>,
    answered: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic).await?;
    match &magic {
        m if m == MAGIC_ECHO => echo(stream, stall).await,
        m if m == MAGIC_SINK => sink(stream).await,
        _ => {
            let io = TokioIo::new(Prefixed {
                prefix: magic,
                pos: 0,
                inner: stream,
            });
            let svc = hyper::service::service_fn(move |req| {
                let grpc = grpc.clone();
                let stall = stall.clone();
                let answered = answered.clone();
                async move {
                    let resp = handle_http(req, grpc, stall).await;
                    answered.fetch_add(1, Ordering::Relaxed);
                    resp
                }
            });
            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await
                .map_err(|e| anyhow::anyhow!("http: {e}"))
        }
    }
}

async fn echo(mut stream: TcpStream, stall: Stall) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            stream.shutdown().await?;
            return Ok(());
        }
        stall.wait().await;
        stream.write_all(&buf[..n]).await?;
    }
}

async fn sink(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    stream.write_all(&total.to_be_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn handle_http(
    req: Request<Incoming>,
    grpc: pb::bench_server::BenchServer<GrpcEcho>,
    stall: Stall,
) -> Result<Response<tonic::body::Body>, Infallible> {
    if req.uri().path().starts_with("/bench.Bench/") {
        return grpc.oneshot(req).await;
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let mut resp = Response::new(tonic::body::Body::empty());
            *resp.status_mut() = http::StatusCode::BAD_REQUEST;
            return Ok(resp);
        }
    };
    stall.wait().await;
    Ok(Response::new(tonic::body::Body::new(Full::new(body))))
}

#[derive(Clone)]
struct GrpcEcho {
    stall: Stall,
}

type PayloadStream = Pin<Box<dyn Stream<Item = Result<pb::Payload, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::bench_server::Bench for GrpcEcho {
    async fn unary(
        &self,
        request: tonic::Request<pb::Payload>,
    ) -> Result<tonic::Response<pb::Payload>, tonic::Status> {
        self.stall.wait().await;
        Ok(tonic::Response::new(request.into_inner()))
    }

    type StreamStream = PayloadStream;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<pb::Payload>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stall = self.stall.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                stall.wait().await;
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A stream that replays the bytes already read to pick the protocol.
struct Prefixed {
    prefix: [u8; 4],
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let rest = &self.prefix[self.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("answer within 5 s")
            .expect("read");
        out
    }

    #[tokio::test]
    async fn answered_requests_are_counted_and_served_on_the_stats_port() {
        let server = AppServer::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), None)
            .await
            .expect("server");
        let stats = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stats_addr = stats.local_addr().expect("addr");
        let stats_task = tokio::spawn(serve_stats(stats, server.answered_counter()));
        for _ in 0..3 {
            let r = exchange(
                server.addr(),
                "POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("hi"), "{r}");
        }
        assert_eq!(server.answered(), 3);
        let r = exchange(
            stats_addr,
            "GET /stats HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(r.ends_with(r#"{"requests":3}"#), "{r}");
        // Reading the count is not a request of the app.
        assert_eq!(server.answered(), 3);
        stats_task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn stall_holds_only_inside_the_window() {
        let stall = Stall::new(Some(StallPlan {
            after: Duration::from_secs(2),
            pause: Duration::from_secs(1),
        }));
        let t0 = Instant::now();
        stall.wait().await; // arms at t0, outside the window
        assert_eq!(Instant::now(), t0);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stall.wait().await; // inside: held until t0 + 3 s
        assert_eq!(Instant::now(), t0 + Duration::from_secs(3));
        stall.wait().await; // after the window: no wait
        assert_eq!(Instant::now(), t0 + Duration::from_secs(3));
    }
}
