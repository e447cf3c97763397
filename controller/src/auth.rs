//! Credentials: the admin token, join tokens, and the mesh identity of a TLS peer.
//!
//! Secrets are never stored: the controller keeps the SHA-256 of each token and compares digests in
//! constant time. A join token is `qmt_<id>.<secret>`; the id is public (it names the token for listing and
//! revocation), the secret is 32 random bytes. The identity of an mTLS caller is taken from its verified
//! client certificate by the TLS acceptor and handed to handlers as [`PeerInfo`]; it is never taken from a
//! request field.

use std::net::SocketAddr;

use base64::Engine;
use quicmesh_transport::identity::SpiffeId;
use sha2::{Digest, Sha256};

/// Longest token the controller will look at.
pub const MAX_TOKEN_LEN: usize = 256;
const JOIN_PREFIX: &str = "qmt_";
const ADMIN_PREFIX: &str = "qma_";

/// SHA-256 of `secret`, lowercase hex.
pub fn sha256_hex(secret: &[u8]) -> String {
    hex(&Sha256::digest(secret))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A new admin token.
pub fn new_admin_token() -> String {
    format!("{ADMIN_PREFIX}{}", random_secret())
}

/// A new join token: `(id, token)`.
pub fn new_join_token() -> (String, String) {
    let id = hex(&rand::random::<[u8; 6]>());
    let token = format!("{JOIN_PREFIX}{id}.{}", random_secret());
    (id, token)
}

/// The public id of a join token, or why the string is not one.
pub fn join_token_id(token: &str) -> Result<&str, &'static str> {
    if token.len() > MAX_TOKEN_LEN {
        return Err("join_token: too long");
    }
    let rest = token
        .strip_prefix(JOIN_PREFIX)
        .ok_or("join_token: not a quicmesh join token (expected qmt_<id>.<secret>)")?;
    let (id, secret) = rest
        .split_once('.')
        .ok_or("join_token: malformed (expected qmt_<id>.<secret>)")?;
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
        return Err("join_token: malformed (expected qmt_<id>.<secret>)");
    }
    Ok(id)
}

/// Checks an `authorization: Bearer <token>` value against the stored admin token hash.
pub fn check_bearer(header: Option<&str>, admin_sha256: &str) -> Result<(), &'static str> {
    let value =
        header.ok_or("missing admin credentials: send 'authorization: Bearer <admin token>'")?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or("authorization must be 'Bearer <admin token>'")?;
    if token.len() > MAX_TOKEN_LEN || !constant_time_eq(&sha256_hex(token.as_bytes()), admin_sha256)
    {
        return Err("invalid admin token");
    }
    Ok(())
}

/// Who is on the other end of a controller connection, as the TLS handshake proved it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// TCP peer address.
    pub remote: SocketAddr,
    /// SPIFFE ID of a verified client certificate; `None` when the client sent none.
    pub spiffe_id: Option<SpiffeId>,
    /// Expiry of that certificate, Unix seconds.
    pub cert_not_after_unix: Option<i64>,
    /// The server's key of this connection in the [`crate::registry::Registry`] (0: not registered, no
    /// mesh identity); an endpoint registered over it stays live while it is open.
    pub connection: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_round_trip() {
        let (id, token) = new_join_token();
        assert_eq!(join_token_id(&token), Ok(id.as_str()));
        for bad in [
            "",
            "qmt_",
            "qmt_abc.def",
            "xyz_0123456789ab.s",
            "qmt_0123456789ab.",
            "qmt_0123456789zz.s",
        ] {
            assert!(join_token_id(bad).is_err(), "{bad}");
        }
        assert!(join_token_id(&format!("qmt_0123456789ab.{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn bearer_checks() {
        let token = new_admin_token();
        let hash = sha256_hex(token.as_bytes());
        assert!(check_bearer(Some(&format!("Bearer {token}")), &hash).is_ok());
        assert!(check_bearer(None, &hash).is_err());
        assert!(check_bearer(Some(&token), &hash).is_err());
        assert!(check_bearer(Some("Bearer qma_wrong"), &hash).is_err());
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }
}
