//! Incremental Watch: the difference between two snapshots, and a held snapshot with a difference
//! applied.
//!
//! After the first whole snapshot a proxy that asked for deltas receives only the services, endpoints and
//! policies added or changed since the version it holds, and the keys of those removed; the trust bundle
//! only when it changed (a mesh always has a root, so an empty one means unchanged), the revocation list
//! always whole (empty is a real value there). A mesh of thousands of proxies then moves a
//! few hundred bytes per proxy and change instead of the whole mesh. The controller computes [`diff`]
//! once per pair of versions; the proxy rebuilds the whole snapshot with [`apply`] and from it its
//! state, exactly as from a whole snapshot, so the two paths cannot disagree. Pure functions.

use std::collections::{HashMap, HashSet};

use quicmesh_proto::controller as pb;

/// `namespace/name` of a resource's metadata.
fn key(m: Option<&pb::Metadata>) -> String {
    m.map(|m| format!("{}/{}", m.namespace, m.name))
        .unwrap_or_default()
}

fn sort_key(m: Option<&pb::Metadata>) -> (String, String) {
    m.map(|m| (m.namespace.clone(), m.name.clone()))
        .unwrap_or_default()
}

/// Added or changed items of `next` relative to `prev`, and the keys of `prev`'s items gone from `next`.
fn diff_list<T: Clone + PartialEq>(
    prev: &[T],
    next: &[T],
    meta: impl Fn(&T) -> Option<&pb::Metadata>,
) -> (Vec<T>, Vec<String>) {
    let old: HashMap<String, &T> = prev.iter().map(|x| (key(meta(x)), x)).collect();
    let kept: HashSet<String> = next.iter().map(|x| key(meta(x))).collect();
    let changed = next
        .iter()
        .filter(|x| old.get(&key(meta(x))) != Some(x))
        .cloned()
        .collect();
    let mut removed: Vec<String> = old.into_keys().filter(|k| !kept.contains(k)).collect();
    removed.sort();
    (changed, removed)
}

/// `held`'s items with `removed` dropped and `changed` put in place, sorted by namespace and name.
fn apply_list<T: Clone>(
    held: &[T],
    changed: &[T],
    removed: &[String],
    meta: impl Fn(&T) -> Option<&pb::Metadata>,
) -> Vec<T> {
    let drop: HashSet<String> = removed
        .iter()
        .cloned()
        .chain(changed.iter().map(|x| key(meta(x))))
        .collect();
    let mut out: Vec<T> = held
        .iter()
        .filter(|x| !drop.contains(&key(meta(x))))
        .cloned()
        .chain(changed.iter().cloned())
        .collect();
    out.sort_by_key(|x| sort_key(meta(x)));
    out
}

/// The delta that turns `prev` into `next`.
pub fn diff(prev: &pb::Snapshot, next: &pb::Snapshot) -> pb::Snapshot {
    let (services, removed_services) =
        diff_list(&prev.services, &next.services, |s| s.metadata.as_ref());
    let (endpoints, removed_endpoints) =
        diff_list(&prev.endpoints, &next.endpoints, |e| e.metadata.as_ref());
    let (policies, removed_policies) =
        diff_list(&prev.policies, &next.policies, |p| p.metadata.as_ref());
    pb::Snapshot {
        version: next.version,
        trust_domain: next.trust_domain.clone(),
        services,
        endpoints,
        policies,
        trust_bundle_pem: if prev.trust_bundle_pem == next.trust_bundle_pem {
            Vec::new()
        } else {
            next.trust_bundle_pem.clone()
        },
        revoked_spiffe_ids: next.revoked_spiffe_ids.clone(),
        base_version: prev.version,
        removed_services,
        removed_endpoints,
        removed_policies,
    }
}

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta is on a version this proxy does not hold.
    #[error("delta on version {base}, but this proxy holds {held:?}")]
    Base {
        /// The delta's base version.
        base: u64,
        /// The version held, if any.
        held: Option<u64>,
    },
}

/// The whole snapshot `msg` stands for: `msg` itself if whole, else `held` with the delta applied.
pub fn apply(held: Option<&pb::Snapshot>, msg: &pb::Snapshot) -> Result<pb::Snapshot, DeltaError> {
    if msg.base_version == 0 {
        return Ok(msg.clone());
    }
    let held = held
        .filter(|h| h.version == msg.base_version)
        .ok_or(DeltaError::Base {
            base: msg.base_version,
            held: held.map(|h| h.version),
        })?;
    Ok(pb::Snapshot {
        version: msg.version,
        trust_domain: msg.trust_domain.clone(),
        services: apply_list(&held.services, &msg.services, &msg.removed_services, |s| {
            s.metadata.as_ref()
        }),
        endpoints: apply_list(
            &held.endpoints,
            &msg.endpoints,
            &msg.removed_endpoints,
            |e| e.metadata.as_ref(),
        ),
        policies: apply_list(&held.policies, &msg.policies, &msg.removed_policies, |p| {
            p.metadata.as_ref()
        }),
        trust_bundle_pem: if msg.trust_bundle_pem.is_empty() {
            held.trust_bundle_pem.clone()
        } else {
            msg.trust_bundle_pem.clone()
        },
        revoked_spiffe_ids: msg.revoked_spiffe_ids.clone(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ns: &str, name: &str, version: u64) -> Option<pb::Metadata> {
        Some(pb::Metadata {
            name: name.into(),
            namespace: ns.into(),
            version,
            ..Default::default()
        })
    }

    fn service(ns: &str, name: &str, version: u64) -> pb::Service {
        pb::Service {
            metadata: meta(ns, name, version),
            ..Default::default()
        }
    }

    fn endpoint(name: &str, address: &str) -> pb::Endpoint {
        pb::Endpoint {
            metadata: meta("shop", name, 1),
            service: "cart".into(),
            address: address.into(),
            ..Default::default()
        }
    }

    fn snapshot(
        version: u64,
        services: Vec<pb::Service>,
        endpoints: Vec<pb::Endpoint>,
    ) -> pb::Snapshot {
        pb::Snapshot {
            version,
            trust_domain: "mesh.local".into(),
            services,
            endpoints,
            trust_bundle_pem: vec!["root".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_delta_carries_only_what_changed_and_rebuilds_the_whole() {
        let prev = snapshot(
            5,
            vec![
                service("shop", "a", 1),
                service("shop", "b", 2),
                service("shop", "c", 3),
            ],
            vec![endpoint("e1", "127.0.0.1:1"), endpoint("e2", "127.0.0.1:2")],
        );
        let next = snapshot(
            9,
            vec![
                service("bank", "z", 9),
                service("shop", "a", 1),
                service("shop", "c", 8),
            ],
            vec![endpoint("e1", "127.0.0.1:1"), endpoint("e3", "127.0.0.1:3")],
        );
        let d = diff(&prev, &next);
        assert_eq!(d.base_version, 5);
        assert_eq!(d.version, 9);
        assert_eq!(
            d.services,
            vec![service("bank", "z", 9), service("shop", "c", 8)]
        );
        assert_eq!(d.removed_services, vec!["shop/b".to_owned()]);
        assert_eq!(d.endpoints, vec![endpoint("e3", "127.0.0.1:3")]);
        assert_eq!(d.removed_endpoints, vec!["shop/e2".to_owned()]);
        assert!(d.trust_bundle_pem.is_empty(), "unchanged bundle left out");
        assert_eq!(apply(Some(&prev), &d), Ok(next.clone()));
        // A new bundle travels whole.
        let rotated = pb::Snapshot {
            version: 10,
            trust_bundle_pem: vec!["root".into(), "new root".into()],
            ..next.clone()
        };
        let d = diff(&next, &rotated);
        assert_eq!(d.trust_bundle_pem, rotated.trust_bundle_pem);
        assert_eq!(apply(Some(&next), &d), Ok(rotated.clone()));
        // Nothing changed: an empty delta, and applying it changes only the version.
        let same = diff(
            &next,
            &pb::Snapshot {
                version: 10,
                ..next.clone()
            },
        );
        assert!(
            same.services.is_empty()
                && same.endpoints.is_empty()
                && same.removed_services.is_empty()
        );
        assert_eq!(apply(Some(&next), &same).map(|s| s.version), Ok(10));
    }

    #[test]
    fn a_delta_on_another_version_is_refused_and_a_whole_snapshot_is_taken_as_is() {
        let prev = snapshot(5, vec![service("shop", "a", 1)], vec![]);
        let next = snapshot(6, vec![], vec![]);
        let d = diff(&prev, &next);
        let other = snapshot(4, vec![], vec![]);
        assert_eq!(
            apply(Some(&other), &d),
            Err(DeltaError::Base {
                base: 5,
                held: Some(4)
            })
        );
        assert_eq!(
            apply(None, &d),
            Err(DeltaError::Base {
                base: 5,
                held: None
            })
        );
        assert_eq!(apply(Some(&other), &next), Ok(next.clone()));
        assert_eq!(apply(None, &next), Ok(next));
    }
}
