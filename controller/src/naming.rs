//! Secure naming on the controller: which endpoints may be stored and which are served to proxies.
//!
//! The rule itself is [`ServerNames`] (shared with the proxies, which check every connection against
//! it): a Service's `identities`, or by default the service account named like the service in its
//! namespace. Here it decides, as pure functions, whether an endpoint (registered by a proxy or applied
//! by an operator) may exist: its service must exist and its identity must be one the service allows.
//! Stored endpoints are kept when their Service later changes or goes away, but a snapshot carries only
//! those still allowed ([`served`]), so narrowing `identities` or deleting the service takes effect at
//! once and widening it again brings them back.

use quicmesh_transport::identity::{SpiffeId, naming::ServerNames};

use crate::{
    error::{ApiError, Capped},
    model::{EndpointSpec, Object, ServiceSpec},
};

/// Why an endpoint may not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointRefusal {
    /// No such service in the endpoint's namespace.
    #[error("service {0} does not exist: create the Service before its endpoints")]
    NoService(String),
    /// The identity may not serve the service.
    #[error("{id} may not serve service {service}: its Service allows only {allowed}")]
    NotAllowed {
        /// `namespace/name` of the service.
        service: String,
        /// The endpoint's identity.
        id: String,
        /// The identities the service allows.
        allowed: String,
    },
    /// The endpoint's identity is not a SPIFFE ID, or the service's list does not resolve.
    #[error("{0}")]
    Malformed(String),
}

impl From<EndpointRefusal> for ApiError {
    fn from(r: EndpointRefusal) -> Self {
        match r {
            // The request is fine; the mesh is not in the state it needs (FAILED_PRECONDITION).
            EndpointRefusal::NoService(_) => ApiError::FailedPrecondition(r.to_string()),
            EndpointRefusal::NotAllowed { .. } => ApiError::PermissionDenied(r.to_string()),
            EndpointRefusal::Malformed(_) => ApiError::FailedPrecondition(r.to_string()),
        }
    }
}

/// The identities allowed to serve `service`.
pub fn server_names(
    trust_domain: &str,
    service: &Object<ServiceSpec>,
) -> Result<ServerNames, EndpointRefusal> {
    let m = &service.metadata;
    ServerNames::resolve(
        trust_domain,
        &m.namespace,
        &m.name,
        &service.spec.identities,
    )
    .map_err(|e| {
        EndpointRefusal::Malformed(format!(
            "service {}/{}: identities: {e}",
            m.namespace, m.name
        ))
    })
}

/// Whether `endpoint` (namespace from its metadata) may exist given its `service` (`None`: absent).
pub fn check_endpoint(
    trust_domain: &str,
    endpoint: &Object<EndpointSpec>,
    service: Option<&Object<ServiceSpec>>,
) -> Result<(), EndpointRefusal> {
    let key = format!(
        "{}/{}",
        endpoint.metadata.namespace,
        Capped(&endpoint.spec.service)
    );
    let service = service.ok_or(EndpointRefusal::NoService(key.clone()))?;
    let id: SpiffeId = endpoint.spec.spiffe_id.parse().map_err(|e| {
        EndpointRefusal::Malformed(format!(
            "spiffe_id {:?}: {e}",
            Capped(&endpoint.spec.spiffe_id)
        ))
    })?;
    let names = server_names(trust_domain, service)?;
    if !names.allows(&id) {
        return Err(EndpointRefusal::NotAllowed {
            service: key,
            id: id.to_string(),
            allowed: names.to_string(),
        });
    }
    Ok(())
}

/// The endpoints a snapshot serves: those whose service exists and allows their identity. Each
/// service's names are resolved once, so a snapshot costs O(services + endpoints).
pub fn served<'a>(
    trust_domain: &str,
    endpoints: &'a [Object<EndpointSpec>],
    services: &[Object<ServiceSpec>],
) -> Vec<&'a Object<EndpointSpec>> {
    let names: std::collections::HashMap<(&str, &str), Option<ServerNames>> = services
        .iter()
        .map(|s| {
            (
                (s.metadata.namespace.as_str(), s.metadata.name.as_str()),
                server_names(trust_domain, s).ok(),
            )
        })
        .collect();
    endpoints
        .iter()
        .filter(|e| {
            let Some(Some(allowed)) =
                names.get(&(e.metadata.namespace.as_str(), e.spec.service.as_str()))
            else {
                return false;
            };
            e.spec
                .spiffe_id
                .parse::<SpiffeId>()
                .is_ok_and(|id| allowed.allows(&id))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Metadata, PortProtocol, ServicePort};

    const TD: &str = "mesh.local";

    fn service(name: &str, identities: &[&str]) -> Object<ServiceSpec> {
        Object {
            metadata: Metadata {
                name: name.into(),
                namespace: "shop".into(),
                ..Default::default()
            },
            spec: ServiceSpec {
                ports: vec![ServicePort {
                    port: 80,
                    protocol: PortProtocol::Http,
                    name: String::new(),
                }],
                versions: vec![],
                identities: identities.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    fn endpoint(service: &str, sa: &str) -> Object<EndpointSpec> {
        Object {
            metadata: Metadata {
                name: format!("{sa}-{service}"),
                namespace: "shop".into(),
                ..Default::default()
            },
            spec: EndpointSpec {
                service: service.into(),
                address: "127.0.0.1:4433".into(),
                spiffe_id: format!("spiffe://{TD}/ns/shop/sa/{sa}"),
                service_version: String::new(),
                weight: 0,
            },
        }
    }

    #[test]
    fn only_allowed_identities_serve_existing_services() {
        let web = service("web", &["web"]);
        assert_eq!(
            check_endpoint(TD, &endpoint("web", "web"), Some(&web)),
            Ok(())
        );
        let e = check_endpoint(TD, &endpoint("web", "evil"), Some(&web)).expect_err("impostor");
        assert!(matches!(e, EndpointRefusal::NotAllowed { .. }), "{e}");
        assert!(
            e.to_string().contains("shop/web") && e.to_string().contains("sa/web"),
            "{e}"
        );
        // Empty identities: the account named like the service.
        let open = service("api", &[]);
        assert_eq!(
            check_endpoint(TD, &endpoint("api", "api"), Some(&open)),
            Ok(())
        );
        assert!(check_endpoint(TD, &endpoint("api", "evil"), Some(&open)).is_err());
        // No service.
        let e = check_endpoint(TD, &endpoint("ghost", "ghost"), None).expect_err("missing");
        assert_eq!(e, EndpointRefusal::NoService("shop/ghost".into()));
        assert_eq!(
            tonic::Status::from(ApiError::from(e)).code(),
            tonic::Code::FailedPrecondition
        );
        // Another namespace's identity, listed by full ID.
        let gw = service("edge", &["spiffe://mesh.local/ns/ingress/sa/gw"]);
        let mut ep = endpoint("edge", "gw");
        ep.spec.spiffe_id = "spiffe://mesh.local/ns/ingress/sa/gw".into();
        assert_eq!(check_endpoint(TD, &ep, Some(&gw)), Ok(()));
    }

    #[test]
    fn snapshots_serve_only_endpoints_still_allowed() {
        let eps = vec![
            endpoint("web", "web"),
            endpoint("web", "old"),
            endpoint("gone", "gone"),
        ];
        let services = vec![service("web", &["web"])];
        let served: Vec<_> = served(TD, &eps, &services)
            .into_iter()
            .map(|e| e.metadata.name.clone())
            .collect();
        assert_eq!(served, vec!["web-web".to_owned()]);
    }
}
