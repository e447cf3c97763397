//! One load-generating connection per protocol, behind one `request()` call.
//!
//! Every handle carries one request at a time: the load loops decide when requests start, this module only
//! knows how to send one and check its answer (status and echoed length), and how to name a failure. HTTP/2
//! and gRPC unary handles can be [shared](Conn::share), so several requests run at once on one connection.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::{pb, server};

/// The request/response protocols the harness speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Raw TCP: write the payload, read it back.
    Tcp,
    /// HTTP/1.1 POST, body echoed.
    Http1,
    /// HTTP/2 (prior knowledge) POST, body echoed.
    Http2,
    /// gRPC unary call.
    GrpcUnary,
    /// One message each way on a long-lived bidirectional gRPC stream.
    GrpcStream,
}

impl Protocol {
    /// Every protocol, in report order.
    pub const ALL: [Protocol; 5] = [
        Protocol::Tcp,
        Protocol::Http1,
        Protocol::Http2,
        Protocol::GrpcUnary,
        Protocol::GrpcStream,
    ];

    /// Short name used in reports and file names.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::GrpcUnary => "grpc-unary",
            Protocol::GrpcStream => "grpc-stream",
        }
    }
}

/// Why a request failed; the report counts errors by this name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// TCP connect or protocol handshake failed.
    Connect,
    /// No complete answer within the request timeout.
    Timeout,
    /// The connection broke mid-request.
    Io,
    /// The server answered with a non-success status.
    Status,
    /// The answer was not the echo we sent.
    Mismatch,
    /// An open-loop request whose send time came after the run's hard deadline.
    NotSent,
}

impl ErrorKind {
    /// Stable name for reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Io => "io",
            ErrorKind::Status => "status",
            ErrorKind::Mismatch => "mismatch",
            ErrorKind::NotSent => "not-sent",
        }
    }
}

/// One client connection.
pub enum Conn {
    /// TCP echo.
    Tcp { stream: TcpStream, buf: Vec<u8> },
    /// HTTP/1.1.
    Http1(http1::SendRequest<Full<Bytes>>),
    /// HTTP/2.
    Http2(http2::SendRequest<Full<Bytes>>),
    /// gRPC unary over one HTTP/2 connection.
    GrpcUnary(pb::bench_client::BenchClient<tonic::transport::Channel>),
    /// gRPC bidirectional stream.
    GrpcStream {
        tx: mpsc::Sender<pb::Payload>,
        rx: tonic::Streaming<pb::Payload>,
    },
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Tcp { .. } => "Conn::Tcp",
            Conn::Http1(_) => "Conn::Http1",
            Conn::Http2(_) => "Conn::Http2",
            Conn::GrpcUnary(_) => "Conn::GrpcUnary",
            Conn::GrpcStream { .. } => "Conn::GrpcStream",
        })
    }
}

async fn tcp(addr: SocketAddr) -> Result<TcpStream, ErrorKind> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|_| ErrorKind::Connect)?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

impl Conn {
    /// Opens one connection and completes the protocol's handshake, within `timeout`.
    pub async fn connect(
        protocol: Protocol,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Conn, ErrorKind> {
        tokio::time::timeout(timeout, Self::connect_inner(protocol, addr))
            .await
            .map_err(|_| ErrorKind::Connect)?
    }

    async fn connect_inner(protocol: Protocol, addr: SocketAddr) -> Result<Conn, ErrorKind> {
        match protocol {
            Protocol::Tcp => {
                let mut stream = tcp(addr).await?;
                stream
                    .write_all(server::MAGIC_ECHO)
                    .await
                    .map_err(|_| ErrorKind::Connect)?;
                Ok(Conn::Tcp {
                    stream,
                    buf: Vec::new(),
                })
            }
            Protocol::Http1 => {
                let io = TokioIo::new(tcp(addr).await?);
                let (send, conn) = http1::handshake(io).await.map_err(|_| ErrorKind::Connect)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Conn::Http1(send))
            }
            Protocol::Http2 => {
                let io = TokioIo::new(tcp(addr).await?);
                let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|_| ErrorKind::Connect)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Conn::Http2(send))
            }
            Protocol::GrpcUnary | Protocol::GrpcStream => {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|_| ErrorKind::Connect)?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|_| ErrorKind::Connect)?;
                let mut client = pb::bench_client::BenchClient::new(channel)
                    .max_decoding_message_size(64 * 1024 * 1024);
                if protocol == Protocol::GrpcUnary {
                    return Ok(Conn::GrpcUnary(client));
                }
                let (tx, rx) = mpsc::channel(4);
                let resp = client
                    .stream(ReceiverStream::new(rx))
                    .await
                    .map_err(|_| ErrorKind::Connect)?;
                Ok(Conn::GrpcStream {
                    tx,
                    rx: resp.into_inner(),
                })
            }
        }
    }

    /// Another handle on the same connection, for protocols that multiplex concurrent requests over one
    /// connection (HTTP/2, gRPC unary); `None` for the others.
    pub fn share(&self) -> Option<Conn> {
        match self {
            Conn::Http2(send) => Some(Conn::Http2(send.clone())),
            Conn::GrpcUnary(client) => Some(Conn::GrpcUnary(client.clone())),
            _ => None,
        }
    }

    /// Sends `payload` and waits for its echo, within `timeout`.
    pub async fn request(&mut self, payload: &Bytes, timeout: Duration) -> Result<(), ErrorKind> {
        tokio::time::timeout(timeout, self.request_inner(payload))
            .await
            .map_err(|_| ErrorKind::Timeout)?
    }

    async fn request_inner(&mut self, payload: &Bytes) -> Result<(), ErrorKind> {
        match self {
            Conn::Tcp { stream, buf } => {
                stream.write_all(payload).await.map_err(|_| ErrorKind::Io)?;
                buf.resize(payload.len(), 0);
                stream.read_exact(buf).await.map_err(|_| ErrorKind::Io)?;
                Ok(())
            }
            Conn::Http1(send) => {
                send.ready().await.map_err(|_| ErrorKind::Io)?;
                let resp = send
                    .send_request(http_request(payload)?)
                    .await
                    .map_err(|_| ErrorKind::Io)?;
                check_http(resp, payload.len()).await
            }
            Conn::Http2(send) => {
                send.ready().await.map_err(|_| ErrorKind::Io)?;
                let resp = send
                    .send_request(http_request(payload)?)
                    .await
                    .map_err(|_| ErrorKind::Io)?;
                check_http(resp, payload.len()).await
            }
            Conn::GrpcUnary(client) => {
                let reply = client
                    .unary(pb::Payload {
                        data: payload.to_vec(),
                    })
                    .await
                    .map_err(grpc_error)?;
                check_len(reply.into_inner().data.len(), payload.len())
            }
            Conn::GrpcStream { tx, rx } => {
                tx.send(pb::Payload {
                    data: payload.to_vec(),
                })
                .await
                .map_err(|_| ErrorKind::Io)?;
                match rx.message().await {
                    Ok(Some(m)) => check_len(m.data.len(), payload.len()),
                    Ok(None) => Err(ErrorKind::Io),
                    Err(s) => Err(grpc_error(s)),
                }
            }
        }
    }
}

fn grpc_error(s: tonic::Status) -> ErrorKind {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => ErrorKind::Io,
        tonic::Code::DeadlineExceeded => ErrorKind::Timeout,
        _ => ErrorKind::Status,
    }
}

fn check_len(got: usize, want: usize) -> Result<(), ErrorKind> {
    if got == want {
        Ok(())
    } else {
        Err(ErrorKind::Mismatch)
    }
}

fn http_request(payload: &Bytes) -> Result<hyper::Request<Full<Bytes>>, ErrorKind> {
    hyper::Request::post("/echo")
        .header(http::header::HOST, "bench")
        .body(Full::new(payload.clone()))
        .map_err(|_| ErrorKind::Io)
}

async fn check_http(
    resp: hyper::Response<hyper::body::Incoming>,
    want: usize,
) -> Result<(), ErrorKind> {
    if !resp.status().is_success() {
        return Err(ErrorKind::Status);
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|_| ErrorKind::Io)?
        .to_bytes();
    check_len(body.len(), want)
}
