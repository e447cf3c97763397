//! Moving HTTP heads and bodies between hyper and tunnel streams ([`super::frame`] framing).
//!
//! Every read has a bound (the frame limits) and a deadline; a body read from a stream reaches hyper
//! through a small channel, so a slow reader holds back the stream (QUIC flow control), not memory.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use quinn::{RecvStream, SendStream};
use tokio::{sync::mpsc, time::Instant};

use super::frame::{self, FrameError, Kind, MAX_DATA};

/// A request in flight: counted in a gauge until dropped.
pub struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    /// Counts one more in `gauge` until the guard drops.
    pub fn enter(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Errors of bodies crossing the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why reading from a tunnel stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer broke the framing.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The deadline passed.
    #[error("deadline exceeded")]
    Deadline,
    /// The peer reset the stream with this code (e.g. `DEADLINE_EXCEEDED`).
    #[error("stream reset by the peer with code {0}")]
    Reset(u64),
    /// The connection was lost, or the stream stopped otherwise.
    #[error("stream failed: {0}")]
    Stream(String),
}

fn read_failure(e: quinn::ReadExactError) -> ReadError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => ReadError::Truncated,
        quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)) => {
            ReadError::Reset(code.into_inner())
        }
        e => ReadError::Stream(e.to_string()),
    }
}

async fn within<T>(
    deadline: Option<Instant>,
    f: impl std::future::Future<Output = T>,
) -> Result<T, ReadError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f)
            .await
            .map_err(|_| ReadError::Deadline),
        None => Ok(f.await),
    }
}

/// Reads one frame; `None` when the stream ends cleanly between frames.
pub async fn read_frame(
    recv: &mut RecvStream,
    deadline: Option<Instant>,
) -> Result<Option<(Kind, Bytes)>, ReadError> {
    within(deadline, async {
        let mut p = [0u8; 5];
        match recv.read_exact(&mut p).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(read_failure(e)),
        }
        let (kind, len) = frame::parse_prefix(p)?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.map_err(read_failure)?;
        Ok(Some((kind, Bytes::from(body))))
    })
    .await?
}

/// Reads the head frame that must come first.
pub async fn read_head(
    recv: &mut RecvStream,
    deadline: Option<Instant>,
) -> Result<frame::HttpHead, ReadError> {
    match read_frame(recv, deadline).await? {
        Some((Kind::Head, b)) => Ok(frame::decode_head(&b)?),
        Some((k, _)) => Err(FrameError::OutOfOrder(k).into()),
        None => Err(ReadError::Truncated),
    }
}

/// A body fed by a channel: what a task reading a tunnel stream hands to hyper.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// How a body read from a stream ended.
#[derive(Debug)]
pub struct BodyEnd {
    /// Whole, or why not.
    pub result: Result<(), ReadError>,
    /// The `grpc-status` of its trailers, if any.
    pub grpc_status: Option<u32>,
}

/// Frames a body reader task may run ahead of hyper.
const BODY_CHANNEL: usize = 4;

/// A body read from `recv` by a task, until FIN, the deadline, or a broken frame. On a failure hyper
/// gets an error (so the other side sees the request or response aborted) and the stream is stopped
/// with `code`. `done` is called with the outcome once the body ended.
pub fn body_from_stream(
    mut recv: RecvStream,
    deadline: Option<Instant>,
    done: impl FnOnce(BodyEnd) + Send + 'static,
) -> ChannelBody {
    let (tx, rx) = mpsc::channel(BODY_CHANNEL);
    tokio::spawn(async move {
        let mut ended = false;
        let mut grpc_status = None;
        let outcome = loop {
            let f = match read_frame(&mut recv, deadline).await {
                Ok(None) => break Ok(()),
                Ok(Some((Kind::Data, b))) if !ended => Frame::data(b),
                Ok(Some((Kind::Trailers, b))) if !ended => match frame::decode_trailers(&b) {
                    Ok(t) => {
                        ended = true;
                        grpc_status = t
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse().ok());
                        Frame::trailers(t)
                    }
                    Err(e) => break Err(ReadError::Frame(e)),
                },
                Ok(Some((k, _))) => break Err(ReadError::Frame(FrameError::OutOfOrder(k))),
                Err(e) => break Err(e),
            };
            if tx.send(Ok(f)).await.is_err() {
                // Hyper dropped the body: the far side's request or response is abandoned.
                let _ = recv.stop(crate::tunnel::code::CANCELLED);
                break Ok(());
            }
        };
        if let Err(e) = &outcome {
            let code = match e {
                ReadError::Deadline => crate::tunnel::code::DEADLINE_EXCEEDED,
                ReadError::Frame(_) | ReadError::Truncated => crate::tunnel::code::PROTOCOL_ERROR,
                ReadError::Stream(_) | ReadError::Reset(_) => crate::tunnel::code::CANCELLED,
            };
            let _ = recv.stop(code);
            let _ = tx.send(Err(e.to_string().into())).await;
        }
        done(BodyEnd {
            result: outcome,
            grpc_status,
        });
    });
    ChannelBody { rx }
}

/// Why writing a body to a tunnel stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The body's source failed (the app aborted it).
    #[error("body source failed: {0}")]
    Source(String),
    /// The stream was stopped or reset by the peer, or the connection lost.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The deadline passed.
    #[error("deadline exceeded")]
    Deadline,
}

/// Writes `data` as data frames (split at [`MAX_DATA`]).
pub async fn write_data(send: &mut SendStream, mut data: Bytes) -> Result<(), WriteError> {
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(MAX_DATA));
        let p = frame::prefix(Kind::Data, chunk.len());
        send.write_all(&p)
            .await
            .map_err(|e| WriteError::Stream(e.to_string()))?;
        send.write_chunk(chunk)
            .await
            .map_err(|e| WriteError::Stream(e.to_string()))?;
    }
    Ok(())
}

/// Writes trailers.
pub async fn write_trailers(send: &mut SendStream, t: &HeaderMap) -> Result<(), WriteError> {
    send.write_all(&frame::encode_trailers(t))
        .await
        .map_err(|e| WriteError::Stream(e.to_string()))
}

/// Copies `body` to `send` as frames and finishes the stream, by `deadline`. On failure the stream is
/// reset (the far side sees the body aborted).
pub async fn write_body<B>(
    send: &mut SendStream,
    mut body: B,
    deadline: Option<Instant>,
) -> Result<(), WriteError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let copy = async {
        while let Some(f) = body.frame().await {
            let f = f.map_err(|e| WriteError::Source(e.to_string()))?;
            match f.into_data() {
                Ok(d) => write_data(send, d).await?,
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        write_trailers(send, &t).await?;
                    }
                }
            }
        }
        send.finish().map_err(|e| WriteError::Stream(e.to_string()))
    };
    let r = match deadline {
        Some(d) => tokio::time::timeout_at(d, copy)
            .await
            .unwrap_or(Err(WriteError::Deadline)),
        None => copy.await,
    };
    if let Err(e) = &r {
        let code = match e {
            WriteError::Deadline => crate::tunnel::code::DEADLINE_EXCEEDED,
            _ => crate::tunnel::code::CANCELLED,
        };
        let _ = send.reset(code);
    }
    r
}
