//! The CA's decisions as pure functions over records and a time passed in: whether a join token may
//! still buy a certificate, who may get which identity, and when spent tokens and audit records are
//! old enough to drop. The I/O around them ([`super::Ca`]) only reads records, asks, and writes.

use quicmesh_transport::identity::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::model::{IdentitySpec, SYSTEM_NAMESPACE};

/// A join token as stored: the hash of the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the whole token, hex.
    pub sha256: String,
    /// Identity it grants.
    pub spiffe_id: String,
    /// Creation, Unix seconds.
    pub created_unix: i64,
    /// Expiry, Unix seconds.
    pub expires_unix: i64,
    /// Usable more than once (until expiry).
    pub reusable: bool,
    /// Successful uses.
    pub uses: u32,
    /// Revoked by an operator.
    pub revoked: bool,
    /// Last successful use, Unix seconds (0 = never).
    #[serde(default)]
    pub last_used_unix: i64,
    /// When it was revoked, Unix seconds (0 = not revoked, or revoked before this was recorded).
    #[serde(default)]
    pub revoked_unix: i64,
}

/// One issued certificate in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Serial, hex.
    pub serial_hex: String,
    /// Identity.
    pub spiffe_id: String,
    /// Issue time.
    pub issued_unix: i64,
    /// Expiry.
    pub not_after_unix: i64,
    /// `join-token:<id>` or `mtls`.
    pub credential: String,
    /// Signing root.
    pub root_fingerprint: String,
    /// Caller address.
    pub peer_address: String,
}

/// Why a join token buys nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// Revoked by an operator.
    #[error("join_token: {0} was revoked")]
    Revoked(String),
    /// Past its expiry.
    #[error("join_token: {0} has expired")]
    Expired(String),
    /// Single use, already used.
    #[error("join_token: {0} was already used (single use)")]
    Spent(String),
}

/// Whether `rec` may buy a certificate at `now` (the secret was already checked).
pub fn check_token(rec: &TokenRecord, now: i64) -> Result<(), TokenRefusal> {
    if rec.revoked {
        return Err(TokenRefusal::Revoked(rec.id.clone()));
    }
    if now > rec.expires_unix {
        return Err(TokenRefusal::Expired(rec.id.clone()));
    }
    if !rec.reusable && rec.uses > 0 {
        return Err(TokenRefusal::Spent(rec.id.clone()));
    }
    Ok(())
}

/// The latest leaf expiry to store on a root after it signed a leaf expiring at `leaf_not_after`, when
/// the stored one (`stored`, `None` if the root has no record) does not cover it; `None` when it does.
/// The value written runs ahead of the leaf by a tenth of the leaf lifetime (at most a minute), so
/// that a root signing many leaves is written about once per that span, not once per certificate
/// (each write of a root is a point where controllers sharing a store conflict). A root thus stays in
/// the bundle at most that long after its last leaf expired: later, never sooner.
pub fn leaf_expiry_to_store(
    stored: Option<i64>,
    leaf_not_after: i64,
    ttl_secs: u64,
) -> Option<i64> {
    if stored.is_some_and(|s| s >= leaf_not_after) {
        return None;
    }
    let ahead = i64::try_from((ttl_secs / 10).min(60)).unwrap_or(60);
    Some(leaf_not_after.saturating_add(ahead))
}

/// `rec` after a successful use at `now`.
pub fn token_used(rec: &TokenRecord, now: i64) -> TokenRecord {
    TokenRecord {
        uses: rec.uses.saturating_add(1),
        last_used_unix: now,
        ..rec.clone()
    }
}

/// Since when `rec` can buy nothing any more (spent, revoked or expired), or `None` while it still can.
pub fn token_dead_since(rec: &TokenRecord, now: i64) -> Option<i64> {
    let mut since: Option<i64> = None;
    let mut at = |t: i64| since = Some(since.map_or(t, |s| s.min(t)));
    if rec.revoked {
        at(if rec.revoked_unix > 0 {
            rec.revoked_unix
        } else {
            rec.created_unix
        });
    }
    if !rec.reusable && rec.uses > 0 {
        at(if rec.last_used_unix > 0 {
            rec.last_used_unix
        } else {
            rec.created_unix
        });
    }
    if now > rec.expires_unix {
        at(rec.expires_unix);
    }
    since
}

/// Whether a dead token has been kept for `retention` seconds and may be dropped.
pub fn token_prunable(rec: &TokenRecord, now: i64, retention: i64) -> bool {
    token_dead_since(rec, now).is_some_and(|since| since.saturating_add(retention) <= now)
}

/// Whether an audit record may be dropped: its certificate expired `retention` seconds ago.
pub fn audit_prunable(rec: &AuditRecord, now: i64, retention: i64) -> bool {
    rec.not_after_unix.saturating_add(retention) <= now
}

/// Why an identity gets no certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueRefusal {
    /// The controller's own namespace.
    #[error("{0} is reserved for the controller")]
    Reserved(String),
    /// Revoked by an operator.
    #[error("identity {0} is revoked")]
    Revoked(String),
    /// A node gateway asked for an identity not placed on it.
    #[error(
        "identity {workload} is not placed on node {node} (its Identity resource's spec.nodes)"
    )]
    NotPlaced {
        /// Asked for.
        workload: String,
        /// The asking node.
        node: String,
    },
}

/// Whether node gateway `node` may obtain a certificate for `workload`, whose Identity resource (if
/// any) says where it is placed: only a node it lists, and never the node's own identity by this way
/// (that one renews as itself). Revocation and reserved namespaces are [`may_issue`]'s.
pub fn may_certify_for_node(
    node: &SpiffeId,
    workload: &SpiffeId,
    placement: Option<&IdentitySpec>,
) -> Result<(), IssueRefusal> {
    let placed = workload != node
        && workload.trust_domain() == node.trust_domain()
        && placement.is_some_and(|p| p.nodes.iter().any(|n| n == node.as_str()));
    if placed {
        Ok(())
    } else {
        Err(IssueRefusal::NotPlaced {
            workload: workload.to_string(),
            node: node.to_string(),
        })
    }
}

/// The identities placed on node gateway `node`, among `identities` (each one's SPIFFE ID and Identity
/// spec): what the node serves on their behalf, so its traffic reports may name their services.
pub fn placed_on<'a>(
    node: &SpiffeId,
    identities: impl IntoIterator<Item = (SpiffeId, &'a IdentitySpec)>,
) -> Vec<SpiffeId> {
    identities
        .into_iter()
        .filter(|(w, spec)| may_certify_for_node(node, w, Some(spec)).is_ok())
        .map(|(w, _)| w)
        .collect()
}

/// Whether `granted` may be issued a certificate, given whether it is revoked.
pub fn may_issue(granted: &SpiffeId, revoked: bool) -> Result<(), IssueRefusal> {
    if granted.namespace() == SYSTEM_NAMESPACE {
        return Err(IssueRefusal::Reserved(granted.to_string()));
    }
    if revoked {
        return Err(IssueRefusal::Revoked(granted.to_string()));
    }
    Ok(())
}

/// Whether a CSR's URI SANs fit the granted identity: every one must be it (none is fine: the CA
/// writes the granted ID). Returns the first other URI.
pub fn foreign_uri<'a>(
    uris: impl IntoIterator<Item = &'a str>,
    granted: &SpiffeId,
) -> Option<&'a str> {
    uris.into_iter().find(|u| *u != granted.as_str())
}

/// Whether the committer should commit the leaves queued now rather than wait for more: the group
/// is full (`max`), or the wait for a fuller group is over (`waited_out`), or it is a lone call (one
/// leaf queued, no other `Certify` on its way: `arriving` counts calls received and not yet queued),
/// whose answer waiting would only delay. Several leaves queued mean calls are coming in together,
/// so more are likely to follow within the wait even if none has arrived yet. Larger groups share
/// one store write and flush (on sled a wake-up of its writer threads, on etcd a transaction), which
/// cost about the same for 5 leaves as for 30.
pub fn group_ready(queued: usize, arriving: usize, max: usize, waited_out: bool) -> bool {
    queued >= max || waited_out || (arriving == 0 && queued <= 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_root_is_written_only_when_a_leaf_outlives_its_stored_expiry() {
        use super::leaf_expiry_to_store as store;
        // No record, or one that does not cover the leaf: written, ahead by ttl/10 capped at 60 s.
        assert_eq!(store(None, 1_000, 3600), Some(1_060));
        assert_eq!(store(Some(999), 1_000, 300), Some(1_030));
        assert_eq!(store(Some(0), 1_000, 5), Some(1_000));
        // Covered (the same second, or an earlier leaf): not written.
        assert_eq!(store(Some(1_000), 1_000, 3600), None);
        assert_eq!(store(Some(1_060), 1_010, 3600), None);
        // Each write covers the leaves of the next minute: one write per minute at a steady rate.
        let mut stored = None;
        let writes = (0..600)
            .filter(|s| {
                let w = store(stored, 10_000 + s, 3600);
                if w.is_some() {
                    stored = w;
                }
                w.is_some()
            })
            .count();
        assert_eq!(writes, 10);
    }

    #[test]
    fn a_node_serves_on_behalf_of_the_identities_placed_on_it_only() {
        use super::*;
        let id = |s: &str| -> SpiffeId { s.parse().expect("id") };
        let node = id("spiffe://t/ns/nodes/sa/a");
        let spec = |nodes: &[&str]| IdentitySpec {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        let (here, there, none) = (
            spec(&["spiffe://t/ns/nodes/sa/a", "spiffe://t/ns/nodes/sa/b"]),
            spec(&["spiffe://t/ns/nodes/sa/b"]),
            spec(&[]),
        );
        let got = placed_on(
            &node,
            [
                (id("spiffe://t/ns/demo/sa/web"), &here),
                (id("spiffe://t/ns/demo/sa/api"), &there),
                (id("spiffe://t/ns/demo/sa/db"), &none),
                // Never the node itself, even if listed.
                (id("spiffe://t/ns/nodes/sa/a"), &here),
            ],
        );
        assert_eq!(got, [id("spiffe://t/ns/demo/sa/web")]);
    }

    use super::*;

    #[test]
    fn a_group_waits_only_under_load() {
        // A lone call is committed at once; an empty queue ends the committer.
        assert!(group_ready(1, 0, 32, false));
        assert!(group_ready(0, 0, 32, false));
        // Others on their way, or several queued: wait, unless the group is full or the wait is over.
        assert!(!group_ready(1, 3, 32, false));
        assert!(!group_ready(5, 0, 32, false));
        assert!(!group_ready(5, 3, 32, false));
        assert!(group_ready(32, 3, 32, false));
        assert!(group_ready(40, 0, 32, false));
        assert!(group_ready(5, 3, 32, true));
    }

    fn token(reusable: bool) -> TokenRecord {
        TokenRecord {
            id: "0123456789ab".into(),
            sha256: String::new(),
            spiffe_id: "spiffe://t/ns/a/sa/b".into(),
            created_unix: 1000,
            expires_unix: 2000,
            reusable,
            uses: 0,
            revoked: false,
            last_used_unix: 0,
            revoked_unix: 0,
        }
    }

    #[test]
    fn single_use_tokens_buy_one_certificate_before_expiry() {
        let t = token(false);
        assert_eq!(check_token(&t, 1500), Ok(()));
        assert_eq!(
            check_token(&t, 2000),
            Ok(()),
            "valid through its expiry second"
        );
        assert!(matches!(
            check_token(&t, 2001),
            Err(TokenRefusal::Expired(_))
        ));
        let used = token_used(&t, 1600);
        assert_eq!((used.uses, used.last_used_unix), (1, 1600));
        assert!(matches!(
            check_token(&used, 1601),
            Err(TokenRefusal::Spent(_))
        ));
        let reusable = token_used(&token(true), 1600);
        assert_eq!(check_token(&reusable, 1601), Ok(()));
        let revoked = TokenRecord {
            revoked: true,
            ..token(true)
        };
        assert!(matches!(
            check_token(&revoked, 1100),
            Err(TokenRefusal::Revoked(_))
        ));
    }

    #[test]
    fn dead_tokens_are_kept_for_the_retention_then_pruned() {
        let day = 86_400;
        // Live: never pruned.
        assert_eq!(token_dead_since(&token(false), 1500), None);
        assert!(!token_prunable(&token(true), 1500, 0));
        // Spent at 1600: kept a day after that.
        let spent = token_used(&token(false), 1600);
        assert_eq!(token_dead_since(&spent, 1700), Some(1600));
        assert!(!token_prunable(&spent, 1600 + day - 1, day));
        assert!(token_prunable(&spent, 1600 + day, day));
        // A reusable token dies at its expiry.
        let used = token_used(&token(true), 1600);
        assert_eq!(token_dead_since(&used, 1900), None);
        assert_eq!(token_dead_since(&used, 2001), Some(2000));
        assert!(token_prunable(&used, 2000 + day, day));
        // Revoked: from the revocation.
        let revoked = TokenRecord {
            revoked: true,
            revoked_unix: 1200,
            ..token(true)
        };
        assert_eq!(token_dead_since(&revoked, 1300), Some(1200));
    }

    #[test]
    fn audit_records_outlive_their_certificate_by_the_retention() {
        let rec = AuditRecord {
            serial_hex: "01".into(),
            spiffe_id: "spiffe://t/ns/a/sa/b".into(),
            issued_unix: 1000,
            not_after_unix: 4600,
            credential: "mtls".into(),
            root_fingerprint: String::new(),
            peer_address: String::new(),
        };
        assert!(!audit_prunable(&rec, 4600, 30));
        assert!(!audit_prunable(&rec, 4629, 30));
        assert!(audit_prunable(&rec, 4630, 30));
    }

    #[test]
    fn issuance_refuses_reserved_and_revoked_identities() {
        let id: SpiffeId = "spiffe://t/ns/shop/sa/cart".parse().expect("id");
        assert_eq!(may_issue(&id, false), Ok(()));
        assert!(matches!(
            may_issue(&id, true),
            Err(IssueRefusal::Revoked(_))
        ));
        let ctl: SpiffeId = "spiffe://t/ns/quicmesh-system/sa/controller"
            .parse()
            .expect("id");
        assert!(matches!(
            may_issue(&ctl, false),
            Err(IssueRefusal::Reserved(_))
        ));
        assert_eq!(foreign_uri(["spiffe://t/ns/shop/sa/cart"], &id), None);
        assert_eq!(
            foreign_uri(
                ["spiffe://t/ns/shop/sa/cart", "spiffe://t/ns/shop/sa/x"],
                &id
            ),
            Some("spiffe://t/ns/shop/sa/x")
        );
    }

    #[test]
    fn a_node_obtains_only_the_identities_placed_on_it() {
        let id = |s: &str| -> SpiffeId { s.parse().expect("id") };
        let node = id("spiffe://t/ns/nodes/sa/node-1");
        let cart = id("spiffe://t/ns/shop/sa/cart");
        let placed = IdentitySpec {
            nodes: vec!["spiffe://t/ns/nodes/sa/node-1".into()],
            ..Default::default()
        };
        assert_eq!(may_certify_for_node(&node, &cart, Some(&placed)), Ok(()));
        // Placed elsewhere, placed nowhere, or no Identity resource at all.
        let elsewhere = IdentitySpec {
            nodes: vec!["spiffe://t/ns/nodes/sa/node-2".into()],
            ..Default::default()
        };
        for p in [Some(&elsewhere), Some(&IdentitySpec::default()), None] {
            assert_eq!(
                may_certify_for_node(&node, &cart, p),
                Err(IssueRefusal::NotPlaced {
                    workload: cart.to_string(),
                    node: node.to_string()
                })
            );
        }
        // The node's own identity is not obtained this way, even if listed.
        let own = IdentitySpec {
            nodes: vec![node.to_string()],
            ..Default::default()
        };
        assert!(may_certify_for_node(&node, &node, Some(&own)).is_err());
        // Another trust domain's identity never, whatever the listing says.
        let foreign = id("spiffe://other/ns/shop/sa/cart");
        assert!(may_certify_for_node(&node, &foreign, Some(&placed)).is_err());
    }
}
