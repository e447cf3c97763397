//! W3C Trace Context (`traceparent`) across the mesh: every proxy hop is a span of the caller's trace.
//!
//! Why: a request crossing the mesh keeps one trace id from the first app to the last, and each
//! proxy hop gets its own span id as the child of the span that sent it, so an app's tracer (and a
//! later OTLP exporter) links the hops. The caller's proxy keeps a valid `traceparent` (new span
//! id, same trace id and flags) or, when the app sent none or a malformed one, starts a trace
//! (random trace id, sampled flag set so the apps' tracers record it); the destination's proxy does
//! the same again before the request reaches its app. `tracestate` passes untouched. The cost is
//! one header lookup, 8 random bytes and a 55-byte header per request per hop.
//!
//! Pure: [`child`] decides the header from what arrived and the random ids given; [`hop`] applies
//! it to a header map.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header.
pub const TRACEPARENT: &str = "traceparent";

/// The parts of a valid version-00 `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent<'a> {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: &'a str,
    /// 16 lowercase hex digits, not all zero.
    pub span_id: &'a str,
    /// 2 hex digits.
    pub flags: &'a str,
}

fn lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `value` as a `traceparent` (version 00, or a later version's first four fields as the
/// spec asks); `None` when it is not one. The fields sit at fixed offsets (`vv-` 32 `-` 16 `-` 2).
pub fn parse(value: &str) -> Option<Parent<'_>> {
    let b = value.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = value.get(..2)?;
    if !lower_hex(version) || version == "ff" {
        return None;
    }
    // Version 00 has exactly four fields; a later one may add fields after a dash.
    if b.len() > 55 && (version == "00" || b[55] != b'-') {
        return None;
    }
    let (trace_id, span_id, flags) = (value.get(3..35)?, value.get(36..52)?, value.get(53..55)?);
    (lower_hex(trace_id)
        && lower_hex(span_id)
        && lower_hex(flags)
        && trace_id.bytes().any(|b| b != b'0')
        && span_id.bytes().any(|b| b != b'0'))
    .then_some(Parent {
        trace_id,
        span_id,
        flags,
    })
}

/// Appends `bytes` as lowercase hex (a table, not the formatter: this runs twice per request).
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// The `traceparent` this hop sends on: the child of `incoming` with span id `span`, or a new trace
/// `new_trace` when `incoming` is absent or invalid. All-zero random ids are nudged to non-zero.
pub fn child(incoming: Option<&str>, span: [u8; 8], new_trace: [u8; 16]) -> String {
    child_of(incoming.and_then(parse), span, new_trace)
}

fn child_of(parent: Option<Parent<'_>>, span: [u8; 8], new_trace: [u8; 16]) -> String {
    let mut span = span;
    if span == [0; 8] {
        span[7] = 1;
    }
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    match parent {
        Some(p) => {
            out.push_str(p.trace_id);
            out.push('-');
            push_hex(&mut out, &span);
            out.push('-');
            out.push_str(p.flags);
        }
        None => {
            let mut t = new_trace;
            if t == [0; 16] {
                t[15] = 1;
            }
            push_hex(&mut out, &t);
            out.push('-');
            push_hex(&mut out, &span);
            out.push_str("-01");
        }
    }
    out
}

/// The header's name, for lookups without parsing it per request.
const NAME: HeaderName = HeaderName::from_static(TRACEPARENT);

/// Replaces the `traceparent` of `headers` with this hop's child span (or a new trace); returns it.
pub fn hop(headers: &mut HeaderMap) -> String {
    let incoming = headers
        .get(NAME)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    // A trace id is drawn only for a request that starts a trace.
    let parent = incoming.and_then(parse);
    let new_trace = if parent.is_some() {
        [0; 16]
    } else {
        rand::random()
    };
    let value = child_of(parent, rand::random(), new_trace);
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(NAME, v);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_keeps_its_trace_and_flags_with_a_new_span() {
        let c = child(Some(VALID), [0xab; 8], [7; 16]);
        assert_eq!(c, "00-4bf92f3577b34da6a3ce929d0e0e4736-abababababababab-01");
        let p = parse(&c).expect("valid");
        assert_eq!(p.span_id, "abababababababab");
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(child(Some(unsampled), [1; 8], [7; 16]).ends_with("-00"));
        // A later version: its first four fields count, extra fields are dropped.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(
            child(Some(v1), [1; 8], [7; 16]).starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
    }

    #[test]
    fn absent_or_malformed_starts_a_sampled_trace() {
        let fresh = "00-07070707070707070707070707070707-0101010101010101-01";
        for bad in [
            None,
            Some(""),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01"),
        ] {
            assert_eq!(child(bad, [1; 8], [7; 16]), fresh, "{bad:?}");
        }
        assert_eq!(
            child(None, [0; 8], [0; 16]),
            "00-00000000000000000000000000000001-0000000000000001-01"
        );
    }

    #[test]
    fn hop_replaces_the_header_and_keeps_the_trace() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let first = hop(&mut h);
        let second = hop(&mut h);
        let (a, b) = (parse(&first).expect("a"), parse(&second).expect("b"));
        assert_eq!(a.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(b.trace_id, a.trace_id);
        assert_ne!(a.span_id, b.span_id);
        assert_eq!(h.get(TRACEPARENT).expect("set"), second.as_str());
        let mut empty = HeaderMap::new();
        assert!(parse(&hop(&mut empty)).is_some());
    }
}
