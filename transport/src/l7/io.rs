//! Moving HTTP heads and bodies between hyper and tunnel streams ([`super::frame`] framing).
//!
//! Every read has a bound (the frame limits) and a deadline. A body read from a stream is read as hyper
//! polls it ([`StreamBody`]), so a slow reader holds back the stream (QUIC flow control), not memory,
//! and a request costs no task or channel of its own; what is ready at once travels with its head
//! ([`take_ready`]), so a small request or response is one write.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use quinn::{RecvStream, SendStream};
use tokio::time::Instant;

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
        Some((Kind::Head, b)) => Ok(frame::decode_head(b)?),
        Some((k, _)) => Err(FrameError::OutOfOrder(k).into()),
        None => Err(ReadError::Truncated),
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

/// Largest piece taken from a stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes [`StreamBody::settle`] takes in before hyper asks.
const SETTLE_LIMIT: usize = 64 * 1024;

/// What is told when a body ended.
type Done = Box<dyn FnOnce(BodyEnd) + Send + Sync>;

/// A body read from a tunnel stream as hyper polls it (no task, no channel: a slow reader holds back
/// the stream through QUIC flow control), until FIN, the deadline, or a broken frame. On a failure
/// hyper gets an error (so the other side sees the request or response aborted) and the stream is
/// stopped; if hyper drops the body early the stream is stopped with `CANCELLED`. `done` is told the
/// outcome once, however the body ends.
pub struct StreamBody {
    recv: RecvStream,
    dec: frame::BodyDecoder,
    /// The stream's FIN was read.
    fin: bool,
    deadline: Option<Instant>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    grpc_status: Option<u32>,
    /// `None` once the body ended.
    done: Option<Done>,
}

impl std::fmt::Debug for StreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamBody")
            .field("fin", &self.fin)
            .field("ended", &self.done.is_none())
            .finish()
    }
}

fn stream_read_failure(e: quinn::ReadError) -> ReadError {
    match e {
        quinn::ReadError::Reset(code) => ReadError::Reset(code.into_inner()),
        e => ReadError::Stream(e.to_string()),
    }
}

impl StreamBody {
    /// The body that follows a head on `recv`.
    pub fn new(
        recv: RecvStream,
        deadline: Option<Instant>,
        done: impl FnOnce(BodyEnd) + Send + Sync + 'static,
    ) -> Self {
        Self {
            recv,
            dec: frame::BodyDecoder::default(),
            fin: false,
            deadline,
            sleep: None,
            grpc_status: None,
            done: Some(Box::new(done)),
        }
    }

    /// Takes in what has already arrived, without waiting (bounded): a body that came whole with its
    /// head is then known to end, so an empty one is sent on as no body at all (no chunked encoding).
    pub fn settle(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut taken = 0;
        while !self.fin && taken < SETTLE_LIMIT {
            let polled = {
                let read = self.recv.read_chunk(READ_CHUNK, true);
                std::pin::pin!(read).poll(&mut cx)
            };
            match polled {
                Poll::Ready(Ok(Some(c))) => {
                    taken += c.bytes.len();
                    self.dec.push(c.bytes);
                }
                Poll::Ready(Ok(None)) => self.fin = true,
                // Errors come again when hyper polls.
                Poll::Ready(Err(_)) | Poll::Pending => break,
            }
        }
    }

    fn end(&mut self, result: Result<(), ReadError>) -> Option<BoxError> {
        let err = match &result {
            Ok(()) => None,
            Err(e) => {
                let code = match e {
                    ReadError::Deadline => crate::tunnel::code::DEADLINE_EXCEEDED,
                    ReadError::Frame(_) | ReadError::Truncated => {
                        crate::tunnel::code::PROTOCOL_ERROR
                    }
                    ReadError::Stream(_) | ReadError::Reset(_) => crate::tunnel::code::CANCELLED,
                };
                let _ = self.recv.stop(code);
                Some(e.to_string().into())
            }
        };
        if let Some(done) = self.done.take() {
            done(BodyEnd {
                result,
                grpc_status: self.grpc_status,
            });
        }
        err
    }

    fn complete(&self) -> bool {
        self.fin && self.dec.at_end()
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        let this = self.get_mut();
        loop {
            if this.done.is_none() {
                return Poll::Ready(None);
            }
            match this.dec.next_frame() {
                Ok(Some(frame::BodyFrame::Data(d))) => {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Some(frame::BodyFrame::Trailers(t))) => {
                    this.grpc_status = super::headers::grpc_status(&t);
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(this.end(Err(ReadError::Frame(e))).map(Err)),
            }
            if this.fin {
                let r = if this.dec.at_end() {
                    Ok(())
                } else {
                    Err(ReadError::Truncated)
                };
                return Poll::Ready(this.end(r).map(Err));
            }
            let polled = {
                let read = this.recv.read_chunk(READ_CHUNK, true);
                std::pin::pin!(read).poll(cx)
            };
            match polled {
                Poll::Ready(Ok(Some(c))) => this.dec.push(c.bytes),
                Poll::Ready(Ok(None)) => this.fin = true,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(this.end(Err(stream_read_failure(e))).map(Err));
                }
                Poll::Pending => {
                    if let Some(d) = this.deadline {
                        let sleep = this
                            .sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(d)));
                        if sleep.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(this.end(Err(ReadError::Deadline)).map(Err));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done.is_none() || self.complete()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.is_end_stream() {
            hyper::body::SizeHint::with_exact(0)
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        if self.done.is_some() {
            // Dropped before its end (hyper needs no more of it): the far side stops sending. A body
            // that was whole ends cleanly.
            let r = if self.complete() {
                Ok(())
            } else {
                let _ = self.recv.stop(crate::tunnel::code::CANCELLED);
                Ok(())
            };
            if let Some(done) = self.done.take() {
                done(BodyEnd {
                    result: r,
                    grpc_status: self.grpc_status,
                });
            }
        }
    }
}

/// Takes the frames of `body` that are ready now, without waiting, until about `limit` bytes of data
/// (one frame may pass it): what can travel in the same write as the head. `Ok(true)` when that is
/// the whole body.
pub fn take_ready<B>(
    body: &mut B,
    out: &mut Vec<frame::BodyFrame>,
    limit: usize,
) -> Result<bool, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut size = 0;
    while !body.is_end_stream() {
        if size >= limit {
            return Ok(false);
        }
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(None) => return Ok(true),
            Poll::Ready(Some(Ok(f))) => match f.into_data() {
                Ok(d) => {
                    size += d.len();
                    out.push(frame::BodyFrame::Data(d));
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        out.push(frame::BodyFrame::Trailers(t));
                    }
                }
            },
            Poll::Ready(Some(Err(e))) => return Err(e),
            Poll::Pending => return Ok(false),
        }
    }
    Ok(true)
}

/// `frames` encoded after `head`, in one buffer: one write.
pub fn with_frames(head: &[u8], frames: &[frame::BodyFrame]) -> Bytes {
    let size: usize = frames
        .iter()
        .map(|f| match f {
            frame::BodyFrame::Data(d) => d.len() + 5,
            frame::BodyFrame::Trailers(_) => 256,
        })
        .sum();
    let mut out = bytes::BytesMut::with_capacity(head.len() + size);
    out.extend_from_slice(head);
    for f in frames {
        f.encode(&mut out);
    }
    out.freeze()
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

/// Data up to this size is copied behind its frame prefix and written once.
const SMALL_DATA: usize = 16 * 1024;

/// Writes `data` as data frames (split at [`MAX_DATA`]).
pub async fn write_data(send: &mut SendStream, mut data: Bytes) -> Result<(), WriteError> {
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(MAX_DATA));
        let p = frame::prefix(Kind::Data, chunk.len());
        if chunk.len() <= SMALL_DATA {
            // One write: a copy costs less than a second trip through the connection's lock.
            let mut one = bytes::BytesMut::with_capacity(5 + chunk.len());
            one.extend_from_slice(&p);
            one.extend_from_slice(&chunk);
            send.write_chunk(one.freeze())
                .await
                .map_err(|e| WriteError::Stream(e.to_string()))?;
            continue;
        }
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
