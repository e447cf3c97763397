//! SPIFFE IDs: the only form of workload identity quicmesh knows.
//!
//! A mesh identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, carried as the one URI
//! SAN of a workload certificate. Parsing is strict (the "parse, don't validate" habit): once a `SpiffeId`
//! exists, its trust domain, namespace and service account are known to be well formed, so policy code
//! never re-checks strings.

use std::{fmt, str::FromStr};

/// Why a string is not a quicmesh SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The trust domain is empty or holds characters SPIFFE does not allow.
    #[error("{0:?}: trust domain must be non-empty lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("{0:?}: path must be /ns/<namespace>/sa/<service-account>")]
    Path(String),
    /// A namespace or service account segment holds characters SPIFFE does not allow.
    #[error(
        "{0:?}: namespace and service account must be non-empty letters, digits, '.', '-' or '_'"
    )]
    Segment(String),
    /// A path segment is `.` or `..`, which the SPIFFE specification forbids.
    #[error("{0:?}: path segments '.' and '..' are not allowed")]
    DotSegment(String),
}

/// A workload identity `spiffe://<td>/ns/<ns>/sa/<sa>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_end: usize,
    ns: (usize, usize),
    sa_start: usize,
}

const SCHEME: &str = "spiffe://";

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    /// Builds an identity from its parts, checking each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    /// The namespace segment.
    pub fn namespace(&self) -> &str {
        &self.uri[self.ns.0..self.ns.1]
    }

    /// The service account segment.
    pub fn service_account(&self) -> &str {
        &self.uri[self.sa_start..]
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_trust_domain(td) {
            return Err(SpiffeIdError::TrustDomain(s.to_owned()));
        }
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SpiffeIdError::Path(s.to_owned()));
        };
        if [ns, sa].iter().any(|seg| matches!(*seg, "." | "..")) {
            return Err(SpiffeIdError::DotSegment(s.to_owned()));
        }
        if !valid_segment(ns) || !valid_segment(sa) {
            return Err(SpiffeIdError::Segment(s.to_owned()));
        }
        let td_end = SCHEME.len() + td.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + ns.len();
        Ok(Self {
            uri: s.to_owned(),
            td_end,
            ns: (ns_start, ns_end),
            sa_start: ns_end + "/sa/".len(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parts() {
        let id: SpiffeId = "spiffe://mesh.local/ns/shop/sa/cart"
            .parse()
            .expect("valid");
        assert_eq!(id.trust_domain(), "mesh.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart");
        assert_eq!(id.to_string(), "spiffe://mesh.local/ns/shop/sa/cart");
        assert_eq!(SpiffeId::new("mesh.local", "shop", "cart"), Ok(id));
    }

    #[test]
    fn rejects_malformed() {
        for (s, want) in [
            ("https://mesh.local/ns/a/sa/b", "Scheme"),
            ("spiffe:///ns/a/sa/b", "TrustDomain"),
            ("spiffe://Mesh/ns/a/sa/b", "TrustDomain"),
            ("spiffe://mesh/ns/a", "Path"),
            ("spiffe://mesh/ns/a/sa/b/c", "Path"),
            ("spiffe://mesh/sa/a/ns/b", "Path"),
            ("spiffe://mesh/ns//sa/b", "Segment"),
            ("spiffe://mesh/ns/a b/sa/b", "Segment"),
            ("spiffe://mesh/ns/./sa/b", "DotSegment"),
            ("spiffe://mesh/ns/a/sa/..", "DotSegment"),
            ("spiffe://mesh/ns/../sa/b", "DotSegment"),
        ] {
            let err = s.parse::<SpiffeId>().expect_err(s);
            assert!(format!("{err:?}").starts_with(want), "{s}: {err:?}");
        }
    }
}
