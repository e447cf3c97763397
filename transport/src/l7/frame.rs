//! The framing of HTTP requests and responses inside one tunnel stream (protocol `http1`, `http2` or
//! `grpc` in the stream header).
//!
//! After the stream header (opener) and the stream status (acceptor) each side sends a `HEAD` frame (the
//! request or response head, protobuf `HttpHead`), then any number of `DATA` frames, at most one
//! `TRAILERS` frame, and ends with FIN. A frame is a 1-byte type and a 4-byte big-endian length; heads
//! and trailers are bounded by [`MAX_HEAD`], data frames by [`MAX_DATA`]. Anything else is a protocol
//! error that resets that stream only. Our own framing rather than HTTP/3: measured here, h3 cost twice
//! the CPU per stream, and the tunnel already carries what QPACK and h3 control streams would.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};
pub use quicmesh_proto::tunnel::{HttpHead, HttpHeader, HttpTrailers};

/// Largest request or response head (or trailer block) accepted, bytes; beyond, HTTP's 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest data frame, bytes.
pub const MAX_DATA: usize = 1024 * 1024;
/// Most header fields in one head or trailer block.
pub const MAX_FIELDS: usize = 512;

/// The kinds of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request or response head.
    Head = 1,
    /// Body bytes.
    Data = 2,
    /// Trailers; the last frame before FIN.
    Trailers = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Head),
            2 => Some(Self::Data),
            3 => Some(Self::Trailers),
            _ => None,
        }
    }

    fn limit(self) -> usize {
        match self {
            Self::Data => MAX_DATA,
            Self::Head | Self::Trailers => MAX_HEAD,
        }
    }
}

/// A frame prefix or body that breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Longer than the kind allows.
    #[error("{kind:?} frame of {len} bytes exceeds the {limit}-byte limit")]
    Oversized {
        /// Frame kind.
        kind: Kind,
        /// Announced length.
        len: usize,
        /// Its limit.
        limit: usize,
    },
    /// A frame where it may not be (e.g. data before the head).
    #[error("{0:?} frame out of order")]
    OutOfOrder(Kind),
    /// The head or trailers do not decode, or hold invalid header fields.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
}

/// Checks a 5-byte frame prefix: the kind and body length it announces.
pub fn parse_prefix(prefix: [u8; 5]) -> Result<(Kind, usize), FrameError> {
    let kind = Kind::from_u8(prefix[0]).ok_or(FrameError::UnknownType(prefix[0]))?;
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > kind.limit() {
        return Err(FrameError::Oversized {
            kind,
            len,
            limit: kind.limit(),
        });
    }
    Ok((kind, len))
}

/// Encodes a frame prefix.
pub fn prefix(kind: Kind, len: usize) -> [u8; 5] {
    let l = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    [kind as u8, l[0], l[1], l[2], l[3]]
}

/// Encodes a head frame.
pub fn encode_head(head: &HttpHead) -> BytesMut {
    encode_message(Kind::Head, head)
}

/// Encodes a trailers frame.
pub fn encode_trailers(t: &HeaderMap) -> BytesMut {
    let len = headers_len(t);
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_slice(&prefix(Kind::Trailers, len));
    put_headers(TRAILERS_HEADERS, t, &mut buf);
    buf
}

fn encode_message<M: Message>(kind: Kind, m: &M) -> BytesMut {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_slice(&prefix(kind, len));
    // Enough capacity: cannot fail.
    let _ = m.encode(&mut buf);
    buf
}

/// Header fields as protobuf messages (tests and tools; the data path writes them straight from the
/// map with [`encode_head_with`]).
pub fn fields(h: &HeaderMap) -> Vec<HttpHeader> {
    h.iter()
        .map(|(n, v)| HttpHeader {
            name: Bytes::copy_from_slice(n.as_str().as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
        })
        .collect()
}

/// Field number of `headers` in `HttpHead`, and in `HttpTrailers`.
const HEAD_HEADERS: u32 = 6;
const TRAILERS_HEADERS: u32 = 1;

/// The encoded length of one `HttpHeader` as a field, and of the message inside it.
fn header_field_len(name: &[u8], value: &[u8]) -> (usize, usize) {
    let inner = 2
        + encoded_len_varint(name.len() as u64)
        + name.len()
        + encoded_len_varint(value.len() as u64)
        + value.len();
    (1 + encoded_len_varint(inner as u64) + inner, inner)
}

fn headers_len(h: &HeaderMap) -> usize {
    h.iter()
        .map(|(n, v)| header_field_len(n.as_str().as_bytes(), v.as_bytes()).0)
        .sum()
}

/// Writes each header of `h` as a repeated `HttpHeader` field `tag`: the same bytes prost writes for
/// [`fields`], without building them first.
fn put_headers(tag: u32, h: &HeaderMap, out: &mut BytesMut) {
    for (n, v) in h {
        let (n, v) = (n.as_str().as_bytes(), v.as_bytes());
        let (_, inner) = header_field_len(n, v);
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(inner as u64, out);
        encode_key(1, WireType::LengthDelimited, out);
        encode_varint(n.len() as u64, out);
        out.put_slice(n);
        encode_key(2, WireType::LengthDelimited, out);
        encode_varint(v.len() as u64, out);
        out.put_slice(v);
    }
}

/// Encodes a head frame whose header fields are `headers` (`head.headers` is left empty).
pub fn encode_head_with(head: &HttpHead, headers: &HeaderMap) -> BytesMut {
    let own = head.encoded_len();
    let len = own + headers_len(headers);
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_slice(&prefix(Kind::Head, len));
    // Enough capacity: cannot fail.
    let _ = head.encode(&mut buf);
    put_headers(HEAD_HEADERS, headers, &mut buf);
    buf
}

/// Header fields from protobuf, checked (names and values as HTTP allows, at most [`MAX_FIELDS`]).
pub fn header_map(fields: &[HttpHeader], what: &'static str) -> Result<HeaderMap, FrameError> {
    if fields.len() > MAX_FIELDS {
        return Err(FrameError::Malformed {
            what,
            detail: format!("{} fields, at most {MAX_FIELDS}", fields.len()),
        });
    }
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(&f.name).map_err(|_| FrameError::Malformed {
            what,
            detail: "invalid header name".into(),
        })?;
        let value =
            HeaderValue::from_maybe_shared(f.value.clone()).map_err(|_| FrameError::Malformed {
                what,
                detail: format!("invalid value for {name}"),
            })?;
        map.append(name, value);
    }
    Ok(map)
}

/// Decodes a head frame body (header fields as slices of it).
pub fn decode_head(body: Bytes) -> Result<HttpHead, FrameError> {
    HttpHead::decode(body).map_err(|e| FrameError::Malformed {
        what: "head",
        detail: e.to_string(),
    })
}

/// Decodes a trailers frame body.
pub fn decode_trailers(body: Bytes) -> Result<HeaderMap, FrameError> {
    let t = HttpTrailers::decode(body).map_err(|e| FrameError::Malformed {
        what: "trailers",
        detail: e.to_string(),
    })?;
    header_map(&t.headers, "trailers")
}

/// One body frame as read from a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyFrame {
    /// Bytes.
    Data(Bytes),
    /// Trailers (the last frame).
    Trailers(HeaderMap),
}

impl BodyFrame {
    /// Appends this frame, encoded, to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Self::Data(d) => {
                out.put_slice(&prefix(Kind::Data, d.len()));
                out.put_slice(d);
            }
            Self::Trailers(t) => out.put_slice(&encode_trailers(t)),
        }
    }
}

/// Where the decoder is in the frame sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum At {
    /// Between frames.
    #[default]
    Boundary,
    /// Inside a data frame, this many bytes to go.
    Data(usize),
    /// A trailers block of this many bytes.
    Trailers(usize),
    /// After the trailers: nothing more may come.
    Ended,
}

/// Decodes body frames incrementally, from the chunks a stream delivers: what a body reader applies,
/// pure for tests and fuzzing. Data is handed on as it arrives (a data frame may come out in several
/// pieces), without copying unless a frame prefix or a trailers block spans chunks; what it holds is
/// bounded by one chunk plus one trailers block ([`MAX_HEAD`]).
#[derive(Debug, Default)]
pub struct BodyDecoder {
    pending: Bytes,
    at: At,
}

impl BodyDecoder {
    /// Adds bytes read from the stream after those it still holds (copied together only then).
    pub fn push(&mut self, chunk: Bytes) {
        if self.pending.is_empty() {
            self.pending = chunk;
        } else {
            let mut joined = BytesMut::with_capacity(self.pending.len() + chunk.len());
            joined.put_slice(&self.pending);
            joined.put_slice(&chunk);
            self.pending = joined.freeze();
        }
    }

    /// The next frame (or piece of a data frame) the bytes so far hold, if any.
    pub fn next_frame(&mut self) -> Result<Option<BodyFrame>, FrameError> {
        loop {
            match self.at {
                At::Boundary | At::Ended => {
                    if self.pending.is_empty() {
                        return Ok(None);
                    }
                    if self.at == At::Ended {
                        return Err(match Kind::from_u8(self.pending[0]) {
                            Some(k) => FrameError::OutOfOrder(k),
                            None => FrameError::UnknownType(self.pending[0]),
                        });
                    }
                    let Some(&p) = self.pending.first_chunk::<5>() else {
                        return Ok(None);
                    };
                    let (kind, len) = parse_prefix(p)?;
                    self.pending.advance(5);
                    self.at = match kind {
                        Kind::Data if len == 0 => At::Boundary,
                        Kind::Data => At::Data(len),
                        Kind::Trailers => At::Trailers(len),
                        Kind::Head => return Err(FrameError::OutOfOrder(Kind::Head)),
                    };
                }
                At::Data(left) => {
                    if self.pending.is_empty() {
                        return Ok(None);
                    }
                    let n = left.min(self.pending.len());
                    let piece = self.pending.split_to(n);
                    self.at = if n == left {
                        At::Boundary
                    } else {
                        At::Data(left - n)
                    };
                    return Ok(Some(BodyFrame::Data(piece)));
                }
                At::Trailers(len) => {
                    if self.pending.len() < len {
                        return Ok(None);
                    }
                    let block = self.pending.split_to(len);
                    self.at = At::Ended;
                    return Ok(Some(BodyFrame::Trailers(decode_trailers(block)?)));
                }
            }
        }
    }

    /// Whether the bytes so far end exactly between frames (or after the trailers): where a body may
    /// end. At the stream's end, anything else is a truncated frame.
    pub fn at_end(&self) -> bool {
        self.pending.is_empty() && matches!(self.at, At::Boundary | At::Ended)
    }
}

/// Decodes a whole sequence of body frames (prefix and body each) as a stream would deliver them,
/// with [`BodyDecoder`]: for tests and fuzzing. Data after trailers is out of order.
pub fn decode_body(bytes: &[u8]) -> Result<Vec<BodyFrame>, FrameError> {
    let mut d = BodyDecoder::default();
    d.push(Bytes::copy_from_slice(bytes));
    let mut out = Vec::new();
    while let Some(f) = d.next_frame()? {
        out.push(f);
    }
    if !d.at_end() {
        return Err(FrameError::Malformed {
            what: "body",
            detail: "truncated frame".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_bounded_by_kind() {
        assert_eq!(parse_prefix(prefix(Kind::Data, 10)), Ok((Kind::Data, 10)));
        assert!(matches!(
            parse_prefix(prefix(Kind::Head, MAX_HEAD + 1)),
            Err(FrameError::Oversized { .. })
        ));
        assert_eq!(
            parse_prefix(prefix(Kind::Data, MAX_DATA)),
            Ok((Kind::Data, MAX_DATA))
        );
        assert_eq!(
            parse_prefix([9, 0, 0, 0, 0]),
            Err(FrameError::UnknownType(9))
        );
    }

    #[test]
    fn heads_and_trailers_round_trip() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("0"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        let head = HttpHead {
            method: "POST".into(),
            path: "/x?y=1".into(),
            headers: fields(&h),
            ..Default::default()
        };
        let enc = encode_head(&head);
        let (kind, len) = parse_prefix(enc[..5].try_into().expect("prefix")).expect("ok");
        assert_eq!((kind, len), (Kind::Head, enc.len() - 5));
        let back = decode_head(enc.clone().freeze().slice(5..)).expect("head");
        assert_eq!(back, head);
        assert_eq!(header_map(&back.headers, "head").expect("map"), h);

        let mut body = BytesMut::new();
        body.put_slice(&prefix(Kind::Data, 3));
        body.put_slice(b"abc");
        body.put_slice(&encode_trailers(&h));
        assert_eq!(
            decode_body(&body).expect("body"),
            vec![
                BodyFrame::Data(Bytes::from_static(b"abc")),
                BodyFrame::Trailers(h)
            ]
        );
    }

    #[test]
    fn heads_written_straight_from_the_map_decode_as_prost_would_write_them() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static(""));
        h.insert(
            "x-long",
            HeaderValue::from_str(&"v".repeat(300)).expect("value"),
        );
        let head = HttpHead {
            method: "GET".into(),
            path: "/a".into(),
            end_stream: true,
            ..Default::default()
        };
        let direct = encode_head_with(&head, &h);
        let (kind, len) = parse_prefix(direct[..5].try_into().expect("prefix")).expect("ok");
        assert_eq!((kind, len), (Kind::Head, direct.len() - 5));
        let back = decode_head(direct.freeze().slice(5..)).expect("head");
        let via_prost = HttpHead {
            headers: fields(&h),
            ..head.clone()
        };
        assert_eq!(
            header_map(&back.headers, "head").expect("map"),
            header_map(&via_prost.headers, "head").expect("map")
        );
        assert_eq!(
            HttpHead {
                headers: Vec::new(),
                ..back
            },
            head
        );
        let t = encode_trailers(&h);
        assert_eq!(decode_trailers(t.freeze().slice(5..)).expect("trailers"), h);
    }

    #[test]
    fn the_decoder_takes_bytes_in_any_split() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = [
            BodyFrame::Data(Bytes::from_static(b"hello")),
            BodyFrame::Data(Bytes::new()),
            BodyFrame::Data(Bytes::from(vec![7u8; 3000])),
            BodyFrame::Trailers(t.clone()),
        ];
        let mut enc = BytesMut::new();
        for f in &frames {
            f.encode(&mut enc);
        }
        let whole: Vec<u8> = [b"hello".to_vec(), vec![7u8; 3000]].concat();
        for step in [1, 2, 4, 5, 6, 7, 100, 4096] {
            let mut d = BodyDecoder::default();
            let (mut data, mut trailers) = (Vec::new(), None);
            for c in enc.chunks(step) {
                d.push(Bytes::copy_from_slice(c));
                while let Some(f) = d.next_frame().expect("valid") {
                    match f {
                        BodyFrame::Data(b) => data.extend_from_slice(&b),
                        BodyFrame::Trailers(t) => trailers = Some(t),
                    }
                }
            }
            assert!(d.at_end(), "step {step}");
            assert_eq!(data, whole, "step {step}");
            assert_eq!(trailers.as_ref(), Some(&t), "step {step}");
        }
        // Cut inside a frame: not at an end.
        let mut d = BodyDecoder::default();
        d.push(enc.clone().freeze().slice(..7));
        while d.next_frame().expect("valid").is_some() {}
        assert!(!d.at_end());
    }

    #[test]
    fn bad_frames_are_named() {
        let bad = HttpTrailers {
            headers: vec![HttpHeader {
                name: Bytes::from_static(b"bad name"),
                value: Bytes::from_static(b"v"),
            }],
        };
        let mut enc = BytesMut::new();
        enc.put_slice(&prefix(Kind::Trailers, bad.encoded_len()));
        let _ = bad.encode(&mut enc);
        assert!(matches!(
            decode_body(&enc),
            Err(FrameError::Malformed {
                what: "trailers",
                ..
            })
        ));
        // Data after trailers, a head inside a body, truncation.
        let mut t = BytesMut::from(&encode_trailers(&HeaderMap::new())[..]);
        t.put_slice(&prefix(Kind::Data, 0));
        assert_eq!(decode_body(&t), Err(FrameError::OutOfOrder(Kind::Data)));
        assert_eq!(
            decode_body(&encode_head(&HttpHead::default())),
            Err(FrameError::OutOfOrder(Kind::Head))
        );
        assert!(decode_body(&prefix(Kind::Data, 4)).is_err());
        assert!(decode_body(&[2, 0]).is_err());
    }
}
