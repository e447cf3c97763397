//! Moving bytes between a TCP connection and a QUIC stream, both ways, with half-close carried across.
//!
//! This is the per-byte hot path. TCP → QUIC hands quinn `Bytes` (`write_chunk`), which it keeps until
//! acknowledged: while the app streams, slices of one 64 KiB buffer (no copy); for request/response
//! traffic, an exact-size copy of each read, so that idle tunneled connections hold no buffer. QUIC → TCP writes quinn's received chunks straight to the socket, many per `writev`. An EOF on one side
//! becomes a FIN on the other (`finish` / `shutdown`), and the other direction carries on.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream, WriteError};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use quinn::VarInt;

use super::lane::Lane;
use crate::{
    metrics::PeerMetrics,
    tunnel::{self, code},
};

const SMALL: usize = 16 * 1024;
const CHUNKS: usize = 32;
const LARGE: usize = 64 * 1024;

/// Why a splice ended early.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The local TCP connection failed (reset, or a write error).
    #[error("local TCP connection: {0}")]
    Tcp(#[from] std::io::Error),
    /// The peer reset or stopped the stream, or the QUIC connection was lost.
    #[error("QUIC stream read: {0}")]
    Read(#[from] ReadError),
    /// Writing to the QUIC stream failed.
    #[error("QUIC stream write: {0}")]
    Write(#[from] WriteError),
}

impl SpliceError {
    /// The error code of the peer's reset or stop, if that is what ended the splice.
    pub fn peer_code(&self) -> Option<VarInt> {
        match self {
            Self::Read(ReadError::Reset(c)) | Self::Write(WriteError::Stopped(c)) => Some(*c),
            _ => None,
        }
    }
}

/// Byte totals of a finished splice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Read from TCP, sent on QUIC.
    pub to_peer: u64,
    /// Received on QUIC, written to TCP.
    pub from_peer: u64,
}

/// Copies both ways until both sides have ended cleanly, or until the first error.
pub async fn splice(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    metrics: &PeerMetrics,
    lane: &Lane,
) -> Result<Totals, SpliceError> {
    let (rd, wr) = tcp.split();
    let (up, down) = tokio::try_join!(
        tcp_to_quic(rd, send, metrics, lane),
        quic_to_tcp(recv, wr, metrics)
    )?;
    Ok(Totals {
        to_peer: up,
        from_peer: down,
    })
}

async fn tcp_to_quic(
    rd: ReadHalf<'_>,
    send: &mut SendStream,
    m: &PeerMetrics,
    lane: &Lane,
) -> Result<u64, SpliceError> {
    // Bulk mode keeps one growing buffer and hands slices of it to quinn without copying. Interactive
    // traffic copies each read into an exact-size `Bytes` from a stack buffer that never lives across an
    // await, so an idle tunneled connection holds no buffer at all.
    let mut bulk = BytesMut::new();
    let mut bulk_mode = false;
    let mut total = 0u64;
    loop {
        rd.readable().await?;
        let read = if bulk_mode {
            bulk.reserve(LARGE);
            rd.try_read_buf(&mut bulk).map(|n| {
                let chunk = bulk.split().freeze();
                if n < LARGE / 4 {
                    bulk_mode = false;
                    bulk = BytesMut::new();
                }
                (n, chunk)
            })
        } else {
            // Not zeroed first: a 16 KiB memset per read was most of a small request's
            // instructions (callgrind counts every byte of it), for bytes the read overwrites.
            let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); SMALL];
            let mut buf = tokio::io::ReadBuf::uninit(&mut tmp);
            rd.try_read_buf(&mut buf).map(|n| {
                bulk_mode = n == SMALL;
                (n, Bytes::copy_from_slice(buf.filled()))
            })
        };
        let (n, chunk) = match read {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            // The app closed its write side: pass the FIN on; the reverse direction continues.
            let _ = send.finish();
            return Ok(total);
        }
        total += n as u64;
        m.to_peer.inc_by(n as u64);
        lane.yield_to_control().await;
        send.write_chunk(chunk).await?;
    }
}

async fn quic_to_tcp(
    recv: &mut RecvStream,
    mut wr: WriteHalf<'_>,
    m: &PeerMetrics,
) -> Result<u64, SpliceError> {
    let mut total = 0u64;
    // quinn hands out received data one STREAM frame (about a packet) at a time; taking up to CHUNKS of
    // them and writing them with one writev keeps the syscall count per packet well below one.
    let mut chunks: [Bytes; CHUNKS] = Default::default();
    while let Some(n) = recv.read_chunks(&mut chunks).await? {
        let len = write_all_vectored(&mut wr, &mut chunks[..n]).await?;
        total += len as u64;
        m.from_peer.inc_by(len as u64);
    }
    // The peer finished: FIN to the app.
    wr.shutdown().await?;
    Ok(total)
}

/// Writes every chunk, in order, with as few `writev` calls as the socket allows. Returns the byte count.
async fn write_all_vectored(
    wr: &mut WriteHalf<'_>,
    chunks: &mut [Bytes],
) -> std::io::Result<usize> {
    let total = chunks.iter().map(Bytes::len).sum();
    let mut first = 0;
    while first < chunks.len() {
        let slices: [IoSlice<'_>; CHUNKS] = std::array::from_fn(|i| {
            IoSlice::new(chunks.get(first + i).map_or(&[][..], |b| &b[..]))
        });
        let count = (chunks.len() - first).min(CHUNKS);
        let mut written = wr.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let c = &mut chunks[first];
            let step = written.min(c.len());
            c.advance(step);
            written -= step;
            if c.is_empty() {
                first += 1;
            }
        }
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
    }
    Ok(total)
}

/// Runs an established tunneled connection to its end and counts it: both directions until they finish,
/// or until the deadline (reset with `DEADLINE_EXCEEDED`) or the end of the drain grace period (`DRAINING`).
/// On any failure the stream is reset and the app connection gets an RST. Returns the reset code, if any.
pub async fn carry(
    mut tcp: TcpStream,
    (mut send, mut recv): (SendStream, RecvStream),
    m: &PeerMetrics,
    edge: &EdgeTraffic,
    lane: &Lane,
    deadline: Option<tokio::time::Instant>,
    abort: &tokio_util::sync::CancellationToken,
) -> Result<(), VarInt> {
    let started = edge.log.as_ref().map(|_| std::time::Instant::now());
    m.opened.inc();
    m.active.inc();
    edge.counters.tcp_open();
    let outcome = tokio::select! {
        r = splice(&mut tcp, &mut send, &mut recv, m, lane) => r.map_err(|e| {
            tracing::debug!(error = %e, "tunneled connection failed");
            // Both proxies enforce the same deadline; whichever fires first resets the stream, and the
            // other side counts the same outcome.
            if e.peer_code() == Some(code::DEADLINE_EXCEEDED)
                || deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
            {
                code::DEADLINE_EXCEEDED
            } else {
                code::CONNECTION_RESET
            }
        }),
        _ = sleep_until(deadline) => Err(code::DEADLINE_EXCEEDED),
        _ = abort.cancelled() => Err(code::DRAINING),
    };
    m.active.dec();
    if let (Some(log), Some(t0)) = (&edge.log, started) {
        let direction = if edge.at_destination {
            crate::metrics::Direction::Inbound
        } else {
            crate::metrics::Direction::Outbound
        };
        let bytes = outcome.as_ref().map_or(0, |t| t.to_peer + t.from_peer);
        log.record(direction, t0.elapsed(), outcome.is_ok(), bytes);
    }
    match outcome {
        Ok(t) => {
            m.closed_ok.inc();
            // to_peer flows towards the destination on the caller's side, away from it on its own.
            let (to, from) = if edge.at_destination {
                (t.from_peer, t.to_peer)
            } else {
                (t.to_peer, t.from_peer)
            };
            edge.counters.tcp_close(false, to, from);
            Ok(())
        }
        Err(c) => {
            edge.counters.tcp_close(true, 0, 0);
            let counter = if c == code::DEADLINE_EXCEEDED {
                &m.closed_deadline
            } else {
                &m.closed_error
            };
            counter.inc();
            tunnel::reset(&mut send, &mut recv, c);
            abort_tcp(tcp);
            Err(c)
        }
    }
}

/// The traffic-report edge a tunneled connection counts under.
#[derive(Debug, Clone)]
pub struct EdgeTraffic {
    /// Its counters.
    pub counters: std::sync::Arc<crate::metrics::EdgeCounters>,
    /// Whether this proxy fronts the destination (inbound), so bytes to the peer come from it.
    pub at_destination: bool,
    /// The access log's line for this connection, when the log is on.
    pub log: Option<ConnLog>,
}

/// What the access log says of a tunneled connection besides its outcome.
#[derive(Debug, Clone)]
pub struct ConnLog {
    /// The log.
    pub access: std::sync::Arc<crate::access_log::AccessLog>,
    /// The peer proxy's identity.
    pub peer: String,
    /// Destination service.
    pub service: String,
    /// Request id, hex.
    pub request_id: String,
}

impl ConnLog {
    fn record(
        &self,
        direction: crate::metrics::Direction,
        took: std::time::Duration,
        ok: bool,
        bytes: u64,
    ) {
        self.access.record(&crate::access_log::Entry {
            kind: "tcp",
            direction,
            peer: &self.peer,
            service: &self.service,
            method: None,
            path: None,
            status: None,
            grpc_status: None,
            duration: took,
            bytes: Some(bytes),
            ok: Some(ok),
            request_id: &self.request_id,
            traceparent: None,
        });
    }
}

/// Sleeps until `deadline`, forever when there is none.
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Closes `tcp` with a reset (RST) rather than a FIN, so the app cannot mistake a failure for a clean end.
pub fn abort_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
    drop(tcp);
}
