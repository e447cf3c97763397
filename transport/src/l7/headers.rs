//! The header fields the proxies read or rewrite, as names built at compile time, and the rules over
//! them (hop-by-hop fields, the caller identity, gRPC status). Each request passes here several times on
//! both proxies, so a lookup never parses a name from a string and a rule that usually finds nothing
//! scans the fields once instead of hashing each name it looks for.

use http::{HeaderMap, HeaderName, header};

/// The header that tells an application which verified identity called it. Set by the destination's
/// proxy from the peer certificate; any copy an application sends is removed by its own proxy.
pub const CLIENT_ID: HeaderName = HeaderName::from_static("x-quicmesh-client-id");
/// gRPC's status, in a response head (trailers-only) or its trailers.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// gRPC's human-readable status message.
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// gRPC's deadline, as the client gives it.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// Marks an answer the mesh made, not the destination application.
pub const MESH_ERROR: HeaderName = HeaderName::from_static("x-quicmesh-error");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether a field describes one hop's connection rather than the request. `te` is one unless it is
/// `trailers` (which gRPC needs end to end).
fn hop_by_hop(name: &HeaderName, value: &http::HeaderValue) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
        || (*name == header::TE && value != "trailers")
}

/// Removes the hop-by-hop fields (never forwarded).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Usually there is none: one pass over the fields finds that without hashing a name.
    if !h.iter().any(|(n, v)| hop_by_hop(n, v)) {
        return;
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        KEEP_ALIVE,
        PROXY_CONNECTION,
    ] {
        h.remove(name);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// The gRPC status in a header block, if any.
pub fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// Whether the content type says gRPC.
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_fields_go_and_the_rest_stays() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "close"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-kept", "1"),
        ] {
            h.append(
                HeaderName::from_static(n),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn te_trailers_is_kept_for_grpc() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::TE], "trailers");
        assert!(is_grpc(&h));
    }

    #[test]
    fn grpc_status_is_read_from_the_block() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert(GRPC_STATUS, HeaderValue::from_static(" 14 "));
        assert_eq!(grpc_status(&h), Some(14));
        h.insert(GRPC_STATUS, HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&h), None);
    }
}
