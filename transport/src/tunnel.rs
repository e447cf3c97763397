//! The `quicmesh/1` stream framing: a length-prefixed header, a length-prefixed status, then raw bytes.
//!
//! Each frame is a 2-byte big-endian length followed by that many bytes of protobuf
//! (`quicmesh.tunnel.v1.StreamHeader` / `StreamStatus`). Headers are bounded ([`MAX_FRAME`]) and must
//! arrive within a deadline; anything else is a protocol error answered by resetting that one stream with
//! [`code::PROTOCOL_ERROR`]. The connection and its other streams live on.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use prost::Message;
pub use quicmesh_proto::tunnel::{Protocol, StatusCode, StreamHeader, StreamStatus, TraceContext};
use quinn::{RecvStream, SendStream, VarInt};

/// ALPN of the tunnel protocol.
pub const ALPN: &[u8] = b"quicmesh/1";

/// Largest header or status frame accepted, bytes.
pub const MAX_FRAME: usize = 8 * 1024;

/// QUIC application error codes, used both to reset streams and to close connections.
pub mod code {
    use quinn::VarInt;

    /// Normal end (connection close on drain).
    pub const NO_ERROR: VarInt = VarInt::from_u32(0);
    /// A malformed, truncated or oversized stream header.
    pub const PROTOCOL_ERROR: VarInt = VarInt::from_u32(1);
    /// The stream's deadline expired.
    pub const DEADLINE_EXCEEDED: VarInt = VarInt::from_u32(2);
    /// The application on one side reset or broke its TCP connection.
    pub const CONNECTION_RESET: VarInt = VarInt::from_u32(3);
    /// The proxy is shutting down.
    pub const DRAINING: VarInt = VarInt::from_u32(4);
    /// A stream was abandoned for another reason (e.g. the local side gave up).
    pub const CANCELLED: VarInt = VarInt::from_u32(5);
    /// The acceptor is at a limit (streams waiting for a header) and took nothing from this stream.
    pub const REFUSED: VarInt = VarInt::from_u32(6);
    /// A pooled connection found dead (its peer answered nothing) and closed by the dialler.
    pub const PEER_GONE: VarInt = VarInt::from_u32(7);
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended before a whole frame arrived.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    /// The bytes are not the expected protobuf message, or a required field is missing.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame did not arrive in time.
    #[error("no frame within {0:?}")]
    Timeout(Duration),
    /// The peer reset the stream or the connection failed.
    #[error("stream failed: {0}")]
    Stream(#[from] quinn::ReadExactError),
}

impl FrameError {
    /// Counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Oversized(_) => "oversized",
            Self::Malformed(_) => "malformed",
            Self::Timeout(_) => "timeout",
            Self::Stream(_) => "stream_failed",
        }
    }

    /// Whether the peer broke the protocol (as opposed to the stream failing underneath).
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(self, Self::Stream(_))
    }
}

/// Encodes a message as one frame.
pub fn encode_frame<M: Message>(msg: &M) -> BytesMut {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(2 + len);
    // Our own messages are far below the limit; the peer enforces MAX_FRAME anyway.
    buf.put_u16(len.min(u16::MAX as usize) as u16);
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = msg.encode(&mut buf);
    buf
}

/// Longest service name a header may carry, bytes (a DNS name's limit; mesh names are at most 63).
pub const MAX_SERVICE_NAME: usize = 253;
/// Longest request id a header may carry, bytes (ours are 16).
pub const MAX_REQUEST_ID: usize = 16;

/// Checks a frame's 2-byte length prefix: the body length it announces, if within [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 2]) -> Result<usize, FrameError> {
    let len = usize::from(u16::from_be_bytes(prefix));
    if len > MAX_FRAME {
        return Err(FrameError::Oversized(len));
    }
    Ok(len)
}

/// Decodes one whole frame (length prefix and exactly that many bytes of protobuf). Pure and sync, so the
/// fuzz targets exercise the same code the streams run.
pub fn decode_frame<M: Message + Default>(frame: &[u8]) -> Result<M, FrameError> {
    let (prefix, body) = frame
        .split_first_chunk::<2>()
        .ok_or(FrameError::Truncated)?;
    let len = frame_len(*prefix)?;
    match body.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(FrameError::Truncated),
        std::cmp::Ordering::Greater => Err(FrameError::Malformed(format!(
            "{} bytes after a {len}-byte frame",
            body.len() - len
        ))),
        std::cmp::Ordering::Equal => {
            M::decode(body).map_err(|e| FrameError::Malformed(e.to_string()))
        }
    }
}

/// Decodes and checks one stream header frame: what [`read_header`] applies to the bytes it read.
pub fn decode_header(frame: &[u8]) -> Result<StreamHeader, FrameError> {
    let h: StreamHeader = decode_frame(frame)?;
    if h.service.is_empty() {
        return Err(FrameError::Malformed("header names no service".into()));
    }
    if h.service.len() > MAX_SERVICE_NAME {
        return Err(FrameError::Malformed(format!(
            "header service name of {} bytes exceeds {MAX_SERVICE_NAME}",
            h.service.len()
        )));
    }
    if h.port == 0 || h.port > u32::from(u16::MAX) {
        return Err(FrameError::Malformed(format!(
            "header port {} out of range",
            h.port
        )));
    }
    if h.request_id.len() > MAX_REQUEST_ID {
        return Err(FrameError::Malformed(format!(
            "header request id of {} bytes exceeds {MAX_REQUEST_ID}",
            h.request_id.len()
        )));
    }
    Ok(h)
}

/// Reads one whole frame (prefix included) within `timeout`, without decoding it.
async fn read_frame_bytes(recv: &mut RecvStream, timeout: Duration) -> Result<Vec<u8>, FrameError> {
    tokio::time::timeout(timeout, async {
        let mut prefix = [0u8; 2];
        recv.read_exact(&mut prefix)
            .await
            .map_err(eof_as_truncated)?;
        let len = frame_len(prefix)?;
        // Sized by the checked prefix; a fixed array here would bloat every stream task's future.
        let mut frame = vec![0u8; 2 + len];
        frame[..2].copy_from_slice(&prefix);
        recv.read_exact(&mut frame[2..])
            .await
            .map_err(eof_as_truncated)?;
        Ok(frame)
    })
    .await
    .map_err(|_| FrameError::Timeout(timeout))?
}

/// Reads one frame and decodes it, within `timeout`.
pub async fn read_frame<M: Message + Default>(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<M, FrameError> {
    decode_frame(&read_frame_bytes(recv, timeout).await?)
}

fn eof_as_truncated(e: quinn::ReadExactError) -> FrameError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        e => FrameError::Stream(e),
    }
}

/// Reads and checks a stream header within `timeout` ([`decode_header`] on the bytes read).
pub async fn read_header(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<StreamHeader, FrameError> {
    decode_header(&read_frame_bytes(recv, timeout).await?)
}

/// Writes a status frame.
pub async fn write_status(
    send: &mut SendStream,
    code: StatusCode,
    message: &str,
) -> Result<(), quinn::WriteError> {
    send.write_all(&status_frame(code, message)).await
}

/// A status frame, to write alone or ahead of what follows it.
pub fn status_frame(code: StatusCode, message: &str) -> BytesMut {
    encode_frame(&StreamStatus {
        code: code as i32,
        message: message.to_owned(),
        retry_after_ms: 0,
    })
}

/// Writes a `RATE_LIMITED` status saying when to try again.
pub async fn write_rate_limited(
    send: &mut SendStream,
    retry_after: std::time::Duration,
) -> Result<(), quinn::WriteError> {
    let status = StreamStatus {
        code: StatusCode::RateLimited as i32,
        message: "rate limited".to_owned(),
        retry_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
    };
    send.write_all(&encode_frame(&status)).await
}

/// Resets both halves of a stream with `code`.
pub fn reset(send: &mut SendStream, recv: &mut RecvStream, code: VarInt) {
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// A 16-byte random request id.
pub fn new_request_id() -> [u8; 16] {
    rand::random()
}

/// Hex form of a request id, for logs; formats only when a log line is actually written.
pub fn request_id_hex(id: &[u8]) -> RequestIdHex<'_> {
    RequestIdHex(id)
}

/// See [`request_id_hex`].
#[derive(Debug, Clone, Copy)]
pub struct RequestIdHex<'a>(&'a [u8]);

impl std::fmt::Display for RequestIdHex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_length_prefix() {
        let h = StreamHeader {
            service: "echo".into(),
            port: 7,
            ..Default::default()
        };
        let f = encode_frame(&h);
        let len = u16::from_be_bytes([f[0], f[1]]) as usize;
        assert_eq!(len, f.len() - 2);
        assert_eq!(StreamHeader::decode(&f[2..]).expect("decodes"), h);
        assert_eq!(decode_header(&f).expect("decodes"), h);
    }

    fn frame(h: &StreamHeader) -> Vec<u8> {
        encode_frame(h).to_vec()
    }

    fn valid() -> StreamHeader {
        StreamHeader {
            service: "echo".into(),
            port: 7,
            request_id: vec![7; 16],
            ..Default::default()
        }
    }

    #[test]
    fn decode_header_checks_prefix_bounds_and_fields() {
        let reason = |bytes: &[u8]| decode_header(bytes).expect_err("refused").reason();
        assert_eq!(reason(&[]), "truncated");
        assert_eq!(reason(&[0]), "truncated");
        assert_eq!(reason(&[0x20, 0x01]), "oversized");
        assert_eq!(reason(&[0, 5, 1, 2]), "truncated");
        let mut trailing = frame(&valid());
        trailing.push(0);
        assert_eq!(reason(&trailing), "malformed");
        assert_eq!(reason(&[0, 2, 0xff, 0xff]), "malformed");
        let no_service = StreamHeader {
            service: String::new(),
            ..valid()
        };
        assert_eq!(reason(&frame(&no_service)), "malformed");
        for port in [0, 65536, u32::MAX] {
            assert_eq!(
                reason(&frame(&StreamHeader { port, ..valid() })),
                "malformed"
            );
        }
        let long_name = StreamHeader {
            service: "s".repeat(MAX_SERVICE_NAME + 1),
            ..valid()
        };
        assert_eq!(reason(&frame(&long_name)), "malformed");
        let long_id = StreamHeader {
            request_id: vec![0; MAX_REQUEST_ID + 1],
            ..valid()
        };
        assert_eq!(reason(&frame(&long_id)), "malformed");
        let edge = StreamHeader {
            service: "s".repeat(MAX_SERVICE_NAME),
            port: 65535,
            ..valid()
        };
        assert_eq!(decode_header(&frame(&edge)).expect("at the limits"), edge);
    }

    #[test]
    fn decode_frame_accepts_the_largest_frame() {
        let status = StreamStatus {
            code: 0,
            message: "m".repeat(MAX_FRAME - 3),
            retry_after_ms: 0,
        };
        let f = encode_frame(&status);
        assert_eq!(f.len(), 2 + MAX_FRAME);
        assert_eq!(decode_frame::<StreamStatus>(&f).expect("fits"), status);
    }
}
