//! Mapping between the protobuf messages of the APIs and the controller's own types (snapshots, proxies,
//! tokens, audit records, CA status). Resources map in `quicmesh_transport::model::pb`, re-exported here,
//! since proxies read the same resources from snapshots.

use quicmesh_proto::controller as pb;

use crate::{
    ca::{
        CaStatus, Issued,
        rules::{AuditRecord, TokenRecord},
    },
    registry::ProxyStatus,
    snapshot::Snapshot,
};
pub use quicmesh_transport::model::pb::*;

/// A snapshot as proto.
pub fn snapshot_to_pb(s: &Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        version: s.version,
        trust_domain: s.trust_domain.clone(),
        services: s.services.iter().map(service_to_pb).collect(),
        endpoints: s.endpoints.iter().map(endpoint_to_pb).collect(),
        policies: s.policies.iter().map(policy_to_pb).collect(),
        trust_bundle_pem: s.trust_bundle_pem.clone(),
        revoked_spiffe_ids: s.revoked_spiffe_ids.clone(),
        ..Default::default()
    }
}

/// A connected proxy as proto.
pub fn proxy_status_to_pb(p: &ProxyStatus) -> pb::ProxyStatus {
    pb::ProxyStatus {
        proxy_name: p.proxy_name.clone(),
        spiffe_id: p.spiffe_id.clone(),
        peer_address: p.peer_address.clone(),
        config_version: p.config_version,
        connected_unix: p.connected_unix,
        cert_not_after_unix: p.cert_not_after_unix,
    }
}

/// A join token's public facts as proto.
pub fn token_to_pb(r: &TokenRecord) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        id: r.id.clone(),
        spiffe_id: r.spiffe_id.clone(),
        created_unix: r.created_unix,
        expires_unix: r.expires_unix,
        reusable: r.reusable,
        uses: r.uses,
        revoked: r.revoked,
    }
}

/// An audit record as proto.
pub fn audit_to_pb(a: AuditRecord) -> pb::IssuedCertificate {
    pb::IssuedCertificate {
        serial_hex: a.serial_hex,
        spiffe_id: a.spiffe_id,
        issued_unix: a.issued_unix,
        not_after_unix: a.not_after_unix,
        credential: a.credential,
        root_fingerprint: a.root_fingerprint,
        peer_address: a.peer_address,
    }
}

/// The CA status as proto.
pub fn ca_status_to_pb(s: CaStatus) -> pb::CaStatusResponse {
    pb::CaStatusResponse {
        trust_domain: s.trust_domain,
        roots: s
            .roots
            .into_iter()
            .map(|r| pb::RootInfo {
                fingerprint: r.fingerprint,
                not_after_unix: r.not_after_unix,
                active: r.active,
                retire_after_unix: r.retire_after_unix,
            })
            .collect(),
        leaf_ttl_seconds: s.leaf_ttl_seconds,
        server_time_unix: s.server_time_unix,
    }
}

/// An issued certificate as the Certify answer.
pub fn issued_to_pb(i: Issued) -> pb::CertifyResponse {
    pb::CertifyResponse {
        cert_chain_pem: vec![i.cert_pem],
        trust_bundle_pem: i.trust_bundle_pem,
        spiffe_id: i.spiffe_id,
        not_before_unix: i.not_before_unix,
        not_after_unix: i.not_after_unix,
        serial_hex: i.serial_hex,
    }
}
