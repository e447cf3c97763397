//! Secure naming: which identities may serve a service.
//!
//! Being in the trust domain proves only that a peer belongs to the mesh, not that it may answer for a
//! particular service: without this rule any workload of a namespace could register as an endpoint of
//! any service and receive its callers' traffic. One rule, used by the controller when an endpoint is
//! registered and by the caller's proxy for every connection and stream it opens:
//!
//! - a `Service` lists the identities allowed to serve it, each either a full SPIFFE ID or a service
//!   account name, meaning that account in the service's own namespace;
//! - an empty list means the service account named like the service, in its namespace
//!   (`spiffe://<td>/ns/<ns>/sa/<service>`), so a mesh is safe without extra configuration.
//!
//! A caller also names the set in its TLS server name ([`ServerNames::sni`]): a node gateway serves
//! several identities on one UDP port and presents the certificate of the one the caller wants.
//! The set, not the service, is named, so services sharing their servers share one connection.

use std::collections::BTreeSet;

use super::{SpiffeId, SpiffeIdError};

/// Splits a service reference `name` or `name.namespace` (the form outbound listeners use) into the
/// service name and, if given, its namespace. A reference without a namespace means the caller's own.
pub fn split_service(reference: &str) -> (&str, Option<&str>) {
    match reference.split_once('.') {
        Some((name, ns)) => (name, Some(ns)),
        None => (reference, None),
    }
}

/// The identities allowed to serve one service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct ServerNames {
    ids: BTreeSet<SpiffeId>,
    /// [`server_name`] of `ids`, computed once: callers send it on every dial.
    #[serde(skip)]
    sni: std::sync::Arc<str>,
}

impl Default for ServerNames {
    fn default() -> Self {
        Self::from_ids([])
    }
}

/// The TLS server name a caller sends when it wants one of `ids` to answer: a hash of the sorted set
/// (one DNS label of 32 hex digits under `id.quicmesh.invalid`), so it is a valid name whatever the
/// IDs contain, and a gateway can compute it for each identity it holds. A sidecar ignores it.
pub fn server_name<'a>(ids: impl IntoIterator<Item = &'a SpiffeId>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for id in ids {
        ctx.update(id.as_str().as_bytes());
        ctx.update(b"\n");
    }
    let digest = ctx.finish();
    let label = crate::tunnel::request_id_hex(&digest.as_ref()[..16]);
    format!("{label}.id.quicmesh.invalid")
}

impl ServerNames {
    /// Resolves a service's `identities` list (see the module doc for the rule and its default).
    ///
    /// Each entry that fails to parse is an error naming it; callers validate stored resources with
    /// the same function, so a list that was accepted always resolves.
    pub fn resolve(
        trust_domain: &str,
        namespace: &str,
        service: &str,
        identities: &[String],
    ) -> Result<Self, SpiffeIdError> {
        if identities.is_empty() {
            return Ok(Self::from_ids([SpiffeId::new(
                trust_domain,
                namespace,
                service,
            )?]));
        }
        let ids: BTreeSet<SpiffeId> = identities
            .iter()
            .map(|entry| {
                if entry.starts_with("spiffe://") {
                    entry.parse()
                } else {
                    SpiffeId::new(trust_domain, namespace, entry)
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::from_ids(ids))
    }

    /// Exactly these identities.
    pub fn from_ids(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        let ids: BTreeSet<SpiffeId> = ids.into_iter().collect();
        let sni = server_name(&ids).into();
        Self { ids, sni }
    }

    /// The TLS server name that asks for one of these identities ([`server_name`]).
    pub fn sni(&self) -> &std::sync::Arc<str> {
        &self.sni
    }

    /// Whether `peer` may serve the service.
    pub fn allows(&self, peer: &SpiffeId) -> bool {
        self.ids.contains(peer)
    }

    /// The allowed identities, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &SpiffeId> {
        self.ids.iter()
    }

    /// Whether no identity is allowed (nothing can serve the service).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl std::fmt::Display for ServerNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for id in &self.ids {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("valid id")
    }

    #[test]
    fn empty_list_means_the_account_named_like_the_service() {
        let n = ServerNames::resolve("mesh.local", "shop", "cart", &[]).expect("resolves");
        assert!(n.allows(&id("spiffe://mesh.local/ns/shop/sa/cart")));
        assert!(!n.allows(&id("spiffe://mesh.local/ns/shop/sa/evil")));
        assert!(!n.allows(&id("spiffe://mesh.local/ns/other/sa/cart")));
        assert!(!n.allows(&id("spiffe://other.td/ns/shop/sa/cart")));
    }

    #[test]
    fn short_names_are_accounts_of_the_service_namespace() {
        let n = ServerNames::resolve(
            "mesh.local",
            "shop",
            "web",
            &["web-v2".into(), "spiffe://mesh.local/ns/edge/sa/gw".into()],
        )
        .expect("resolves");
        assert!(n.allows(&id("spiffe://mesh.local/ns/shop/sa/web-v2")));
        assert!(n.allows(&id("spiffe://mesh.local/ns/edge/sa/gw")));
        // An explicit list replaces the default.
        assert!(!n.allows(&id("spiffe://mesh.local/ns/shop/sa/web")));
        assert_eq!(
            n.to_string(),
            "spiffe://mesh.local/ns/edge/sa/gw, spiffe://mesh.local/ns/shop/sa/web-v2"
        );
    }

    #[test]
    fn the_server_name_depends_on_the_set_only_and_is_one_dns_label() {
        let a = ServerNames::resolve("mesh.local", "shop", "cart", &[]).expect("resolves");
        let b = ServerNames::from_ids([id("spiffe://mesh.local/ns/shop/sa/cart")]);
        assert_eq!(a.sni(), b.sni());
        assert_eq!(
            **a.sni(),
            server_name([&id("spiffe://mesh.local/ns/shop/sa/cart")])
        );
        let two =
            ServerNames::resolve("mesh.local", "shop", "cart", &["cart".into(), "web".into()])
                .expect("resolves");
        assert_ne!(a.sni(), two.sni());
        let label = a.sni().split('.').next().expect("label");
        assert_eq!(label.len(), 32);
        assert!(label.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(rustls::pki_types::ServerName::try_from(a.sni().to_string()).is_ok());
    }

    #[test]
    fn service_references_split_at_the_first_dot() {
        assert_eq!(split_service("cart"), ("cart", None));
        assert_eq!(split_service("cart.shop"), ("cart", Some("shop")));
    }

    #[test]
    fn malformed_entries_are_errors() {
        assert!(ServerNames::resolve("mesh.local", "shop", "web", &["a b".into()]).is_err());
        assert!(
            ServerNames::resolve("mesh.local", "shop", "web", &["spiffe://x/ns/a".into()]).is_err()
        );
        assert!(ServerNames::resolve("mesh.local", "shop", "bad name", &[]).is_err());
    }
}
