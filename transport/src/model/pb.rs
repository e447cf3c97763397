//! Mapping between the protobuf resource messages and the model types.
//!
//! Incoming messages are parsed, not trusted: unknown enum values and missing required messages become a
//! [`FieldError`] naming the field, so the admin API can answer `INVALID_ARGUMENT` before anything is
//! stored, and a proxy can skip what it cannot read in a snapshot.

use quicmesh_proto::controller as pb;

use super::{
    Authorization, AuthzAction, AuthzMode, AuthzRule, EndpointSpec, FieldError, IdentitySpec, Kind,
    Metadata, Object, PolicySpec, PortProtocol, RateLimit, Resource, RetryPolicy, ServicePort,
    ServiceSpec, SplitBackend, Timeouts, TrafficSplit, TrustDomainSpec,
};

/// The proto kind enum of a model kind.
pub fn kind_to_pb(k: Kind) -> pb::Kind {
    match k {
        Kind::TrustDomain => pb::Kind::TrustDomain,
        Kind::Identity => pb::Kind::Identity,
        Kind::Service => pb::Kind::Service,
        Kind::Endpoint => pb::Kind::Endpoint,
        Kind::Policy => pb::Kind::Policy,
    }
}

/// The model kind of a proto kind value.
pub fn kind_from_pb(field: &str, v: i32) -> Result<Kind, FieldError> {
    match pb::Kind::try_from(v) {
        Ok(pb::Kind::TrustDomain) => Ok(Kind::TrustDomain),
        Ok(pb::Kind::Identity) => Ok(Kind::Identity),
        Ok(pb::Kind::Service) => Ok(Kind::Service),
        Ok(pb::Kind::Endpoint) => Ok(Kind::Endpoint),
        Ok(pb::Kind::Policy) => Ok(Kind::Policy),
        _ => Err(FieldError::new(
            field,
            format!("must be a resource kind, got {v}"),
        )),
    }
}

fn meta_to_pb(m: &Metadata) -> pb::Metadata {
    pb::Metadata {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        version: m.version,
        created_unix: m.created_unix,
        updated_unix: m.updated_unix,
    }
}

fn meta_from_pb(field: &str, m: Option<pb::Metadata>) -> Result<Metadata, FieldError> {
    let m = m.ok_or_else(|| FieldError::new(format!("{field}.metadata"), "is required"))?;
    Ok(Metadata {
        name: m.name,
        namespace: m.namespace,
        version: m.version,
        // Output-only on writes: the controller sets both.
        created_unix: m.created_unix,
        updated_unix: m.updated_unix,
    })
}

fn protocol_to_pb(p: PortProtocol) -> pb::PortProtocol {
    match p {
        PortProtocol::Tcp => pb::PortProtocol::Tcp,
        PortProtocol::Http => pb::PortProtocol::Http,
        PortProtocol::Grpc => pb::PortProtocol::Grpc,
    }
}

/// A model resource as a proto resource.
pub fn resource_to_pb(r: &Resource) -> pb::Resource {
    use pb::resource::Resource as R;
    let inner = match r {
        Resource::TrustDomain(o) => R::TrustDomain(pb::TrustDomain {
            metadata: Some(meta_to_pb(&o.metadata)),
            trust_domain: o.spec.trust_domain.clone(),
            leaf_ttl_seconds: o.spec.leaf_ttl_seconds,
        }),
        Resource::Identity(o) => R::Identity(identity_to_pb(o, "")),
        Resource::Service(o) => R::Service(service_to_pb(o)),
        Resource::Endpoint(o) => R::Endpoint(endpoint_to_pb(o)),
        Resource::Policy(o) => R::Policy(policy_to_pb(o)),
    };
    pb::Resource {
        resource: Some(inner),
    }
}

/// An identity as proto; `trust_domain` fills in its SPIFFE ID when not empty.
pub fn identity_to_pb(o: &Object<IdentitySpec>, trust_domain: &str) -> pb::Identity {
    let spiffe_id = if trust_domain.is_empty() {
        String::new()
    } else {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            o.metadata.namespace, o.metadata.name
        )
    };
    pb::Identity {
        metadata: Some(meta_to_pb(&o.metadata)),
        spiffe_id,
        revoked: o.spec.revoked,
        revoked_unix: o.spec.revoked_unix,
        nodes: o.spec.nodes.clone(),
    }
}

/// A service as proto.
pub fn service_to_pb(o: &Object<ServiceSpec>) -> pb::Service {
    pb::Service {
        metadata: Some(meta_to_pb(&o.metadata)),
        ports: o
            .spec
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                port: p.port,
                protocol: protocol_to_pb(p.protocol) as i32,
                name: p.name.clone(),
            })
            .collect(),
        versions: o.spec.versions.clone(),
        identities: o.spec.identities.clone(),
    }
}

/// An endpoint as proto.
pub fn endpoint_to_pb(o: &Object<EndpointSpec>) -> pb::Endpoint {
    pb::Endpoint {
        metadata: Some(meta_to_pb(&o.metadata)),
        service: o.spec.service.clone(),
        address: o.spec.address.clone(),
        spiffe_id: o.spec.spiffe_id.clone(),
        service_version: o.spec.service_version.clone(),
        weight: o.spec.weight,
    }
}

/// A policy as proto.
pub fn policy_to_pb(o: &Object<PolicySpec>) -> pb::Policy {
    use pb::policy::Kind as K;
    let s = &o.spec;
    let kind = if let Some(a) = &s.authorization {
        Some(K::Authorization(pb::Authorization {
            mode: match a.mode {
                AuthzMode::Enforce => pb::AuthzMode::Enforce,
                AuthzMode::Audit => pb::AuthzMode::Audit,
            } as i32,
            default_action: match a.default_action {
                AuthzAction::Allow => pb::AuthzAction::Allow,
                AuthzAction::Deny => pb::AuthzAction::Deny,
            } as i32,
            allow: a
                .allow
                .iter()
                .map(|r| pb::AuthzRule {
                    from_identities: r.from_identities.clone(),
                    from_namespaces: r.from_namespaces.clone(),
                    methods: r.methods.clone(),
                    path_prefixes: r.path_prefixes.clone(),
                })
                .collect(),
        }))
    } else if let Some(r) = &s.rate_limit {
        Some(K::RateLimit(pb::RateLimit {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
            per_source: r.per_source,
        }))
    } else if let Some(t) = &s.timeouts {
        Some(K::Timeouts(pb::Timeouts {
            request_timeout_ms: t.request_timeout_ms,
            connect_timeout_ms: t.connect_timeout_ms,
            retry: t.retry.as_ref().map(|r| pb::RetryPolicy {
                max_retries: r.max_retries,
                per_try_timeout_ms: r.per_try_timeout_ms,
                budget_percent: r.budget_percent,
                retry_on: r.retry_on.clone(),
            }),
        }))
    } else {
        s.traffic_split.as_ref().map(|t| {
            K::TrafficSplit(pb::TrafficSplit {
                backends: t
                    .backends
                    .iter()
                    .map(|b| pb::SplitBackend {
                        service_version: b.service_version.clone(),
                        weight: b.weight,
                    })
                    .collect(),
            })
        })
    };
    pb::Policy {
        metadata: Some(meta_to_pb(&o.metadata)),
        target_service: s.target_service.clone(),
        kind,
    }
}

/// An endpoint from proto (field paths relative to `field`).
pub fn endpoint_from_pb(field: &str, e: pb::Endpoint) -> Result<Object<EndpointSpec>, FieldError> {
    Ok(Object {
        metadata: meta_from_pb(field, e.metadata)?,
        spec: EndpointSpec {
            service: e.service,
            address: e.address,
            spiffe_id: e.spiffe_id,
            service_version: e.service_version,
            weight: e.weight,
        },
    })
}

/// A proto resource as a model resource. Only shape is checked here; rules are [`Resource::validate`].
pub fn resource_from_pb(r: pb::Resource) -> Result<Resource, FieldError> {
    use pb::resource::Resource as R;
    let inner = r.resource.ok_or_else(|| {
        FieldError::new(
            "resource",
            "one of trust_domain, identity, service, endpoint, policy is required",
        )
    })?;
    Ok(match inner {
        R::TrustDomain(t) => Resource::TrustDomain(Object {
            metadata: meta_from_pb("trust_domain", t.metadata)?,
            spec: TrustDomainSpec {
                trust_domain: t.trust_domain,
                leaf_ttl_seconds: t.leaf_ttl_seconds,
            },
        }),
        R::Identity(i) => Resource::Identity(Object {
            metadata: meta_from_pb("identity", i.metadata)?,
            spec: IdentitySpec {
                revoked: i.revoked,
                revoked_unix: i.revoked_unix,
                nodes: i.nodes,
            },
        }),
        R::Service(s) => {
            let ports = s
                .ports
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    let protocol = match pb::PortProtocol::try_from(p.protocol) {
                        Ok(pb::PortProtocol::Tcp) => PortProtocol::Tcp,
                        Ok(pb::PortProtocol::Http) => PortProtocol::Http,
                        Ok(pb::PortProtocol::Grpc) => PortProtocol::Grpc,
                        _ => {
                            return Err(FieldError::new(
                                format!("spec.ports[{i}].protocol"),
                                format!("must be tcp, http or grpc, got {}", p.protocol),
                            ));
                        }
                    };
                    Ok(ServicePort {
                        port: p.port,
                        protocol,
                        name: p.name,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Resource::Service(Object {
                metadata: meta_from_pb("service", s.metadata)?,
                spec: ServiceSpec {
                    ports,
                    versions: s.versions,
                    identities: s.identities,
                },
            })
        }
        R::Endpoint(e) => Resource::Endpoint(endpoint_from_pb("endpoint", e)?),
        R::Policy(p) => Resource::Policy(policy_from_pb(p)?),
    })
}

fn policy_from_pb(p: pb::Policy) -> Result<Object<PolicySpec>, FieldError> {
    use pb::policy::Kind as K;
    let mut spec = PolicySpec {
        target_service: p.target_service,
        ..Default::default()
    };
    match p.kind {
        None => {}
        Some(K::Authorization(a)) => {
            let mode = match pb::AuthzMode::try_from(a.mode) {
                Ok(pb::AuthzMode::Enforce | pb::AuthzMode::Unspecified) => AuthzMode::Enforce,
                Ok(pb::AuthzMode::Audit) => AuthzMode::Audit,
                Err(_) => {
                    return Err(FieldError::new(
                        "spec.authorization.mode",
                        format!("must be enforce or audit, got {}", a.mode),
                    ));
                }
            };
            let default_action = match pb::AuthzAction::try_from(a.default_action) {
                Ok(pb::AuthzAction::Allow | pb::AuthzAction::Unspecified) => AuthzAction::Allow,
                Ok(pb::AuthzAction::Deny) => AuthzAction::Deny,
                Err(_) => {
                    return Err(FieldError::new(
                        "spec.authorization.default_action",
                        format!("must be allow or deny, got {}", a.default_action),
                    ));
                }
            };
            spec.authorization = Some(Authorization {
                mode,
                default_action,
                allow: a
                    .allow
                    .into_iter()
                    .map(|r| AuthzRule {
                        from_identities: r.from_identities,
                        from_namespaces: r.from_namespaces,
                        methods: r.methods,
                        path_prefixes: r.path_prefixes,
                    })
                    .collect(),
            });
        }
        Some(K::RateLimit(r)) => {
            spec.rate_limit = Some(RateLimit {
                requests_per_second: r.requests_per_second,
                burst: r.burst,
                per_source: r.per_source,
            });
        }
        Some(K::Timeouts(t)) => {
            spec.timeouts = Some(Timeouts {
                request_timeout_ms: t.request_timeout_ms,
                connect_timeout_ms: t.connect_timeout_ms,
                retry: t.retry.map(|r| RetryPolicy {
                    max_retries: r.max_retries,
                    per_try_timeout_ms: r.per_try_timeout_ms,
                    budget_percent: r.budget_percent,
                    retry_on: r.retry_on,
                }),
            });
        }
        Some(K::TrafficSplit(t)) => {
            spec.traffic_split = Some(TrafficSplit {
                backends: t
                    .backends
                    .into_iter()
                    .map(|b| SplitBackend {
                        service_version: b.service_version,
                        weight: b.weight,
                    })
                    .collect(),
            });
        }
    }
    Ok(Object {
        metadata: meta_from_pb("policy", p.metadata)?,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_yaml_documents;

    #[test]
    fn round_trips_every_kind() {
        let text = r#"
kind: TrustDomain
metadata: {name: default}
spec: {trust_domain: mesh.local, leaf_ttl_seconds: 60}
---
kind: Identity
metadata: {name: cart, namespace: shop}
---
kind: Service
metadata: {name: cart, namespace: shop}
spec: {ports: [{port: 80, protocol: grpc, name: api}], versions: [v1], identities: [cart]}
---
kind: Endpoint
metadata: {name: p1, namespace: shop}
spec: {service: cart, address: "10.0.0.1:4433", service_version: v1}
---
kind: Policy
metadata: {name: authz, namespace: shop}
spec:
  target_service: cart
  authorization:
    mode: audit
    default_action: deny
    allow: [{from_namespaces: [web], methods: [GET], path_prefixes: [/api]}]
---
kind: Policy
metadata: {name: rl, namespace: shop}
spec: {target_service: cart, rate_limit: {requests_per_second: 10.5, burst: 5}}
---
kind: Policy
metadata: {name: to, namespace: shop}
spec: {target_service: cart, timeouts: {request_timeout_ms: 500, retry: {max_retries: 2, retry_on: [5xx]}}}
"#;
        for r in parse_yaml_documents(text).expect("yaml") {
            let back = resource_from_pb(resource_to_pb(&r)).expect("from pb");
            assert_eq!(back, r);
        }
    }

    #[test]
    fn bad_enums_name_the_field() {
        let r = pb::Resource {
            resource: Some(pb::resource::Resource::Service(pb::Service {
                metadata: Some(pb::Metadata::default()),
                ports: vec![pb::ServicePort {
                    port: 1,
                    protocol: 42,
                    name: String::new(),
                }],
                ..Default::default()
            })),
        };
        assert_eq!(
            resource_from_pb(r).expect_err("enum").field,
            "spec.ports[0].protocol"
        );
        assert_eq!(
            resource_from_pb(pb::Resource::default())
                .expect_err("empty")
                .field,
            "resource"
        );
    }
}
