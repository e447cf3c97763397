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

/// Reads one frame and decodes it, within `timeout`.
pub async fn read_frame<M: Message + Default>(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<M, FrameError> {
    tokio::time::timeout(timeout, async {
        let mut len = [0u8; 2];
        recv.read_exact(&mut len).await.map_err(eof_as_truncated)?;
        let len = u16::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::Oversized(len));
        }
        // Sized by the checked prefix; a fixed array here would bloat every stream task's future.
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.map_err(eof_as_truncated)?;
        M::decode(&body[..]).map_err(|e| FrameError::Malformed(e.to_string()))
    })
    .await
    .map_err(|_| FrameError::Timeout(timeout))?
}

fn eof_as_truncated(e: quinn::ReadExactError) -> FrameError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        e => FrameError::Stream(e),
    }
}

/// Reads and checks a stream header.
pub async fn read_header(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<StreamHeader, FrameError> {
    let h: StreamHeader = read_frame(recv, timeout).await?;
    if h.service.is_empty() {
        return Err(FrameError::Malformed("header names no service".into()));
    }
    if h.port == 0 || h.port > u16::MAX as u32 {
        return Err(FrameError::Malformed(format!(
            "header port {} out of range",
            h.port
        )));
    }
    Ok(h)
}

/// Writes a status frame.
pub async fn write_status(
    send: &mut SendStream,
    code: StatusCode,
    message: &str,
) -> Result<(), quinn::WriteError> {
    let status = StreamStatus {
        code: code as i32,
        message: message.to_owned(),
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
    }
}
