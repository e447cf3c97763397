//! Resources the controller test binaries apply.

use quicmesh_proto::controller as pb;

/// Service `ns/name` with one HTTP `port` and versions `v1` and `v2`.
pub fn service(ns: &str, name: &str, port: u32) -> pb::Resource {
    pb::Resource {
        resource: Some(pb::resource::Resource::Service(pb::Service {
            metadata: Some(pb::Metadata {
                name: name.into(),
                namespace: ns.into(),
                ..Default::default()
            }),
            ports: vec![pb::ServicePort {
                port,
                protocol: pb::PortProtocol::Http as i32,
                name: String::new(),
            }],
            versions: vec!["v1".into(), "v2".into()],
            identities: vec![],
        })),
    }
}
