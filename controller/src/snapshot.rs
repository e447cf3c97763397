//! What proxies see: one whole, versioned snapshot of the mesh, and the channel it is published on.
//!
//! [`build`] is pure: from the stored resources, the trust bundle and the store revision it makes the
//! snapshot, serving only endpoints that secure naming still allows ([`crate::naming::served`]) and
//! listing revoked identities. The [`Publisher`] keeps the newest one on a watch channel; each Watch
//! stream sends the newest it has not sent (intermediate versions may be skipped: a snapshot is whole).
//! Concurrent writers may publish out of order, so an older snapshot never replaces a newer one, and
//! the same snapshot built twice (by a write and by the store's change feed) is sent once.

use std::sync::Arc;

use tokio::sync::watch;

use crate::model::{EndpointSpec, IdentitySpec, Object, PolicySpec, ServiceSpec};

/// One whole configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Store revision it reflects.
    pub version: u64,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Every service, with its raw `identities` (the proxies apply the naming rule themselves).
    pub services: Vec<Object<ServiceSpec>>,
    /// Endpoints whose identity may serve their service.
    pub endpoints: Vec<Object<EndpointSpec>>,
    /// Every policy.
    pub policies: Vec<Object<PolicySpec>>,
    /// Roots the mesh trusts, PEM.
    pub trust_bundle_pem: Vec<String>,
    /// Revoked SPIFFE IDs.
    pub revoked_spiffe_ids: Vec<String>,
}

/// The stored resources a snapshot is made of.
#[derive(Debug, Default)]
pub struct Inputs {
    /// Services.
    pub services: Vec<Object<ServiceSpec>>,
    /// Endpoints as stored (allowed or not).
    pub endpoints: Vec<Object<EndpointSpec>>,
    /// Policies.
    pub policies: Vec<Object<PolicySpec>>,
    /// Identities (for revocations).
    pub identities: Vec<Object<IdentitySpec>>,
}

/// Makes the snapshot of `inputs` at `version`.
pub fn build(
    version: u64,
    trust_domain: &str,
    trust_bundle_pem: Vec<String>,
    inputs: Inputs,
) -> Snapshot {
    let endpoints = crate::naming::served(trust_domain, &inputs.endpoints, &inputs.services)
        .into_iter()
        .cloned()
        .collect();
    let revoked_spiffe_ids = inputs
        .identities
        .iter()
        .filter(|o| o.spec.revoked)
        .map(|o| {
            format!(
                "spiffe://{trust_domain}/ns/{}/sa/{}",
                o.metadata.namespace, o.metadata.name
            )
        })
        .collect();
    Snapshot {
        version,
        trust_domain: trust_domain.to_owned(),
        services: inputs.services,
        endpoints,
        policies: inputs.policies,
        trust_bundle_pem,
        revoked_spiffe_ids,
    }
}

/// The newest snapshot and its subscribers.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Publisher {
    /// A publisher holding `first`.
    pub fn new(first: Snapshot) -> Self {
        let (tx, _) = watch::channel(Arc::new(first));
        Self { tx }
    }

    /// A receiver holding the current snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Publishes `snap` if it is newer and differs from the current one in more than its version: a
    /// batch elsewhere that did not touch what proxies see (a certificate issued) sends nothing.
    pub fn publish_changed(&self, snap: Snapshot) -> bool {
        self.tx.send_if_modified(|cur| {
            let same = Snapshot {
                version: cur.version,
                ..snap.clone()
            } == **cur;
            if snap.version > cur.version && !same {
                *cur = Arc::new(snap);
                true
            } else {
                false
            }
        })
    }

    /// Publishes `snap` unless a newer one, or the same, is out already. Returns whether it was
    /// published.
    pub fn publish(&self, snap: Snapshot) -> bool {
        self.tx.send_if_modified(|cur| {
            if snap.version >= cur.version && snap != **cur {
                *cur = Arc::new(snap);
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Metadata;

    #[test]
    fn revoked_identities_are_listed_and_older_snapshots_never_win() {
        let identity = |name: &str, revoked: bool| Object {
            metadata: Metadata {
                name: name.into(),
                namespace: "shop".into(),
                ..Default::default()
            },
            spec: IdentitySpec {
                revoked,
                ..Default::default()
            },
        };
        let snap = build(
            7,
            "t",
            vec![],
            Inputs {
                identities: vec![identity("a", true), identity("b", false)],
                ..Default::default()
            },
        );
        assert_eq!(snap.revoked_spiffe_ids, vec!["spiffe://t/ns/shop/sa/a"]);
        let p = Publisher::new(snap.clone());
        assert!(!p.publish(Snapshot {
            version: 6,
            ..Default::default()
        }));
        assert_eq!(p.current().version, 7);
        assert!(p.publish(Snapshot {
            version: 8,
            ..Default::default()
        }));
        assert_eq!(p.subscribe().borrow().version, 8);
    }
}
