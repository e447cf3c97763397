//! The mesh as one proxy sees it: one immutable, typed value, swapped whole.
//!
//! Everything a proxy decides per connection or per request — who may serve a service, where its
//! endpoints are, which peers are revoked, what the policies say — is read from a [`MeshState`]. It is
//! built **once** per change, from the controller's `Watch` snapshot ([`MeshState::from_snapshot`]) or
//! from the static mesh file and the proxy's own TOML ([`MeshState::from_resources`]); both paths go
//! through the same resource model ([`crate::model`]) and the same builder, so the two modes cannot
//! disagree. Readers take the current `Arc` from a [`StateHandle`] without a lock and keep it for the
//! whole decision, so a change never shows half-applied.
//!
//! The decisions themselves are pure functions over the state ([`MeshState::admit`],
//! [`MeshState::upstream`]): they take the facts of a stream or request and return a verdict, and are
//! unit-tested here without sockets. The I/O modules (`proxy::inbound`, `proxy::outbound`, the TLS
//! verifiers) only apply them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    sync::Arc,
};

use arc_swap::ArcSwap;
use quicmesh_proto::controller as pb;
use serde::Serialize;

use crate::{
    identity::{ServerNames, SpiffeId, naming::split_service},
    model::{
        self, Authorization, AuthzAction, AuthzMode, AuthzRule, PortProtocol, RateLimit, Resource,
        ServicePort, Timeouts, TrafficSplit,
    },
    tunnel::StatusCode,
};

/// A service, by namespace and name. Displayed `name.namespace`, the form outbound listeners use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceRef {
    /// `reference` (`name` or `name.namespace`), in `own_namespace` when it names none.
    pub fn parse(reference: &str, own_namespace: &str) -> Self {
        let (name, ns) = split_service(reference);
        Self {
            namespace: ns.unwrap_or(own_namespace).to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl Serialize for ServiceRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What an outbound listener tunnels to: where the service's proxies listen, and who may serve it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Upstream {
    /// Inbound QUIC addresses of the service's proxies, sorted.
    pub endpoints: Vec<SocketAddr>,
    /// The identities allowed to serve the service; a peer outside this set gets no stream.
    pub servers: ServerNames,
    /// A traffic split's groups: endpoints of one version each, with the split's weight. Empty
    /// without a split, or when no version of the split has an endpoint.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitGroup>,
}

/// The endpoints of one version of a traffic split, and its weight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SplitGroup {
    /// Version label.
    pub version: String,
    /// Weight from the split (positive).
    pub weight: u32,
    /// Endpoints carrying that version label, sorted.
    pub endpoints: Vec<SocketAddr>,
}

impl Upstream {
    /// The endpoints a new request or connection may go to: under a split, those of the version that
    /// `draw` (uniform over `u32`) falls on, in proportion to the weights; otherwise all of them.
    pub fn candidates(&self, draw: u32) -> &[SocketAddr] {
        let total: u64 = self.split.iter().map(|g| u64::from(g.weight)).sum();
        if total == 0 {
            return &self.endpoints;
        }
        let mut at = u64::from(draw) % total;
        for g in &self.split {
            if at < u64::from(g.weight) {
                return &g.endpoints;
            }
            at -= u64::from(g.weight);
        }
        &self.endpoints
    }
}

/// The groups of `split` over `endpoints`: versions with a positive weight and at least one endpoint.
fn split_groups(split: Option<&TrafficSplit>, endpoints: &[EndpointState]) -> Vec<SplitGroup> {
    let Some(split) = split else {
        return Vec::new();
    };
    split
        .backends
        .iter()
        .filter(|b| b.weight > 0)
        .filter_map(|b| {
            let endpoints: Vec<SocketAddr> = endpoints
                .iter()
                .filter(|e| e.version == b.service_version)
                .map(|e| e.address)
                .collect();
            (!endpoints.is_empty()).then(|| SplitGroup {
                version: b.service_version.clone(),
                weight: b.weight,
                endpoints,
            })
        })
        .collect()
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointState {
    /// The proxy's QUIC address.
    pub address: SocketAddr,
    /// The identity that registered it (controller mode); static endpoints are checked at connect time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffeId>,
    /// Version label of the workload behind it ("" = unversioned).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Relative weight among the endpoints of its version (1 unless set).
    pub weight: u32,
}

/// The policies that apply to one service. Several `Authorization` policies for a service combine (their
/// allow rules add up; `deny` and `enforce` win); of the other kinds the first by name applies.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServicePolicy {
    /// Access control.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    /// Request rate limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Timeouts and retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Weighted split between versions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_split: Option<TrafficSplit>,
}

/// One service as the mesh knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceState {
    /// Whether a `Service` resource declares it (endpoints or policies alone do not).
    pub declared: bool,
    /// Declared ports and protocols.
    pub ports: Vec<ServicePort>,
    /// Declared version labels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<String>,
    /// Its endpoints whose identity may serve it, sorted by address.
    pub endpoints: Vec<EndpointState>,
    /// Policies targeting it.
    pub policy: ServicePolicy,
    /// Endpoint addresses and servers, ready for outbound listeners.
    #[serde(skip)]
    pub upstream: Arc<Upstream>,
}

impl ServiceState {
    /// The declared protocol of `port`; undeclared ports are opaque TCP.
    pub fn protocol(&self, port: u16) -> PortProtocol {
        self.ports
            .iter()
            .find(|p| p.port == u32::from(port))
            .map_or(PortProtocol::Tcp, |p| p.protocol)
    }
}

/// The whole mesh as this proxy sees it. Immutable: a change builds a new one.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MeshState {
    /// Snapshot version (controller mode) or 0 (static mode).
    pub version: u64,
    /// Our trust domain.
    pub trust_domain: String,
    /// Every service named by a resource, by namespace and name.
    pub services: BTreeMap<ServiceRef, ServiceState>,
    /// Identities revoked by an operator: refused at handshake and per stream.
    pub revoked: BTreeSet<SpiffeId>,
    /// What was skipped while building the state, and why (also logged).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The facts of one incoming stream or request that admission looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The verified peer identity.
    pub peer: &'a SpiffeId,
    /// The destination service.
    pub service: &'a ServiceRef,
    /// The destination port.
    pub port: u16,
    /// HTTP method, for requests; `None` for opaque streams.
    pub method: Option<&'a str>,
    /// HTTP path, for requests.
    pub path: Option<&'a str>,
}

/// The verdict on a stream or request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Let it through. `audit` is the denial an audit-mode policy would have made.
    Admit {
        /// Would-be denial (audit mode), logged and counted but not enforced.
        audit: Option<&'static str>,
    },
    /// Refuse it with `code`; `reason` is the counter label.
    Refuse {
        /// Status for the peer.
        code: StatusCode,
        /// Counter label.
        reason: &'static str,
    },
}

impl Admission {
    const ADMIT: Admission = Admission::Admit { audit: None };
}

/// The policy behind an admission refusal's `reason`, for counters.
pub fn denying_policy(reason: &str) -> &'static str {
    if reason == "revoked" {
        "revocation"
    } else {
        "authorization"
    }
}

impl MeshState {
    /// The state described by `resources` (already validated, e.g. by [`model::Resource::validate`]):
    /// services, endpoints, policies, and revoked identities (`Identity` resources with `revoked`), plus
    /// `revoked` from elsewhere (a snapshot's list). Endpoints whose address is not `ip:port` or whose
    /// registered identity may not serve their service are left out, with a warning.
    pub fn from_resources(
        version: u64,
        trust_domain: &str,
        resources: impl IntoIterator<Item = Resource>,
        revoked: impl IntoIterator<Item = SpiffeId>,
    ) -> Self {
        let mut warnings = Vec::new();
        let mut revoked: BTreeSet<SpiffeId> = revoked.into_iter().collect();
        let mut declared: BTreeMap<ServiceRef, model::Object<model::ServiceSpec>> = BTreeMap::new();
        let mut endpoints: Vec<model::Object<model::EndpointSpec>> = Vec::new();
        let mut policies: Vec<model::Object<model::PolicySpec>> = Vec::new();
        for r in resources {
            match r {
                Resource::Service(o) => {
                    let key = ServiceRef {
                        namespace: o.metadata.namespace.clone(),
                        name: o.metadata.name.clone(),
                    };
                    declared.insert(key, o);
                }
                Resource::Endpoint(o) => endpoints.push(o),
                Resource::Policy(o) => policies.push(o),
                Resource::Identity(o) if o.spec.revoked => {
                    match SpiffeId::new(trust_domain, &o.metadata.namespace, &o.metadata.name) {
                        Ok(id) => {
                            revoked.insert(id);
                        }
                        Err(e) => warnings.push(format!(
                            "revoked identity {}/{}: {e}",
                            o.metadata.namespace, o.metadata.name
                        )),
                    }
                }
                Resource::Identity(_) | Resource::TrustDomain(_) => {}
            }
        }

        // Every service named anywhere gets an entry, so a policy or endpoint for an undeclared service
        // still applies, and its servers follow the default rule.
        let mut services: BTreeMap<ServiceRef, ServiceState> = BTreeMap::new();
        for key in declared.keys() {
            service_entry(&mut services, &declared, trust_domain, key, &mut warnings);
        }

        for e in endpoints {
            let key = ServiceRef {
                namespace: e.metadata.namespace.clone(),
                name: e.spec.service.clone(),
            };
            let svc = service_entry(&mut services, &declared, trust_domain, &key, &mut warnings);
            let Ok(address) = e.spec.address.parse::<SocketAddr>() else {
                warnings.push(format!(
                    "endpoint {} of {key}: address {:?} is not ip:port; skipped",
                    e.metadata.name, e.spec.address
                ));
                continue;
            };
            let identity = if e.spec.spiffe_id.is_empty() {
                None
            } else {
                match e.spec.spiffe_id.parse::<SpiffeId>() {
                    Ok(id) if svc.upstream.servers.allows(&id) && !revoked.contains(&id) => {
                        Some(id)
                    }
                    Ok(id) => {
                        warnings.push(format!(
                            "endpoint {address} of {key}: {id} may not serve it; skipped"
                        ));
                        continue;
                    }
                    Err(err) => {
                        warnings.push(format!(
                            "endpoint {address} of {key}: identity {:?}: {err}; skipped",
                            e.spec.spiffe_id
                        ));
                        continue;
                    }
                }
            };
            svc.endpoints.push(EndpointState {
                address,
                identity,
                version: e.spec.service_version,
                weight: e.spec.weight.max(1),
            });
        }

        policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for p in policies {
            let key = ServiceRef {
                namespace: p.metadata.namespace.clone(),
                name: p.spec.target_service.clone(),
            };
            let name = p.metadata.name.clone();
            let svc = service_entry(&mut services, &declared, trust_domain, &key, &mut warnings);
            let pol = &mut svc.policy;
            let spec = p.spec;
            let shadowed = |kind: &str, warnings: &mut Vec<String>| {
                warnings.push(format!(
                    "policy {name} ({kind}) for {key}: an earlier {kind} policy applies; ignored"
                ));
            };
            if let Some(a) = spec.authorization {
                pol.authorization = Some(match pol.authorization.take() {
                    None => a,
                    Some(mut have) => {
                        have.allow.extend(a.allow);
                        if a.default_action == AuthzAction::Deny {
                            have.default_action = AuthzAction::Deny;
                        }
                        if a.mode == AuthzMode::Enforce {
                            have.mode = AuthzMode::Enforce;
                        }
                        have
                    }
                });
            }
            if let Some(r) = spec.rate_limit {
                if pol.rate_limit.is_some() {
                    shadowed("rate_limit", &mut warnings);
                } else {
                    pol.rate_limit = Some(r);
                }
            }
            if let Some(t) = spec.timeouts {
                if pol.timeouts.is_some() {
                    shadowed("timeouts", &mut warnings);
                } else {
                    pol.timeouts = Some(t);
                }
            }
            if let Some(s) = spec.traffic_split {
                if pol.traffic_split.is_some() {
                    shadowed("traffic_split", &mut warnings);
                } else {
                    pol.traffic_split = Some(s);
                }
            }
        }

        for svc in services.values_mut() {
            svc.endpoints.sort_by_key(|e| e.address);
            svc.endpoints.dedup_by_key(|e| e.address);
            let servers = svc.upstream.servers.clone();
            svc.upstream = Arc::new(Upstream {
                endpoints: svc.endpoints.iter().map(|e| e.address).collect(),
                servers,
                split: split_groups(svc.policy.traffic_split.as_ref(), &svc.endpoints),
            });
        }
        for w in &warnings {
            tracing::warn!(warning = %w, "mesh state");
        }
        Self {
            version,
            trust_domain: trust_domain.to_owned(),
            services,
            revoked,
            warnings,
        }
    }

    /// The state a controller snapshot describes. Resources the proxy cannot read are skipped with a
    /// warning (the controller validated them; a newer controller may send what we do not know).
    pub fn from_snapshot(snap: &pb::Snapshot) -> Self {
        let mut warnings = Vec::new();
        let mut resources =
            Vec::with_capacity(snap.services.len() + snap.endpoints.len() + snap.policies.len());
        let items = snap
            .services
            .iter()
            .map(|s| pb::resource::Resource::Service(s.clone()))
            .chain(
                snap.endpoints
                    .iter()
                    .map(|e| pb::resource::Resource::Endpoint(e.clone())),
            )
            .chain(
                snap.policies
                    .iter()
                    .map(|p| pb::resource::Resource::Policy(p.clone())),
            );
        for r in items {
            match model::pb::resource_from_pb(pb::Resource { resource: Some(r) }) {
                Ok(r) => resources.push(r),
                Err(e) => warnings.push(format!("snapshot resource unreadable: {e}; skipped")),
            }
        }
        let mut revoked = Vec::new();
        for s in &snap.revoked_spiffe_ids {
            match s.parse::<SpiffeId>() {
                Ok(id) => revoked.push(id),
                Err(e) => warnings.push(format!("revoked identity {s:?}: {e}; skipped")),
            }
        }
        for w in &warnings {
            tracing::warn!(warning = %w, "mesh state");
        }
        let mut state = Self::from_resources(snap.version, &snap.trust_domain, resources, revoked);
        warnings.append(&mut state.warnings);
        state.warnings = warnings;
        state
    }

    /// A service, if any resource names it.
    pub fn service(&self, service: &ServiceRef) -> Option<&ServiceState> {
        self.services.get(service)
    }

    /// Where traffic for `service` goes and who may answer it. A service no resource names has no
    /// endpoints, and its servers follow the default rule (never "anyone").
    pub fn upstream(&self, service: &ServiceRef) -> Arc<Upstream> {
        match self.services.get(service) {
            Some(s) => s.upstream.clone(),
            None => Arc::new(Upstream {
                endpoints: Vec::new(),
                servers: ServerNames::resolve(
                    &self.trust_domain,
                    &service.namespace,
                    &service.name,
                    &[],
                )
                .unwrap_or_default(),
                split: Vec::new(),
            }),
        }
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &SpiffeId) -> bool {
        !self.revoked.is_empty() && self.revoked.contains(id)
    }

    /// Admission of an incoming stream or request: revoked peers are refused, then the service's
    /// authorization policy decides. Without a policy everything from the mesh is admitted (peers are
    /// already authenticated). Rules naming methods or paths never match an opaque stream.
    pub fn admit(&self, req: &Request<'_>) -> Admission {
        if self.is_revoked(req.peer) {
            return Admission::Refuse {
                code: StatusCode::Forbidden,
                reason: "revoked",
            };
        }
        let Some(authz) = self
            .services
            .get(req.service)
            .and_then(|s| s.policy.authorization.as_ref())
        else {
            return Admission::ADMIT;
        };
        let allowed = authz.allow.iter().any(|r| rule_matches(r, req))
            || authz.default_action == AuthzAction::Allow;
        match (allowed, authz.mode) {
            (true, _) => Admission::ADMIT,
            (false, AuthzMode::Audit) => Admission::Admit {
                audit: Some("unauthorized"),
            },
            (false, AuthzMode::Enforce) => Admission::Refuse {
                code: StatusCode::Forbidden,
                reason: "unauthorized",
            },
        }
    }

    /// This state with `revoked` as its revoked identities.
    pub fn with_revoked(&self, revoked: impl IntoIterator<Item = SpiffeId>) -> Self {
        Self {
            revoked: revoked.into_iter().collect(),
            ..self.clone()
        }
    }
}

/// The entry of `key` in `services`, created on first mention: its servers follow its `Service`'s
/// identities, or the default rule when no `Service` declares it.
fn service_entry<'m>(
    services: &'m mut BTreeMap<ServiceRef, ServiceState>,
    declared: &BTreeMap<ServiceRef, model::Object<model::ServiceSpec>>,
    trust_domain: &str,
    key: &ServiceRef,
    warnings: &mut Vec<String>,
) -> &'m mut ServiceState {
    services.entry(key.clone()).or_insert_with(|| {
        let spec = declared.get(key);
        let identities = spec.map_or(&[][..], |o| &o.spec.identities[..]);
        let servers =
            match ServerNames::resolve(trust_domain, &key.namespace, &key.name, identities) {
                Ok(s) => s,
                Err(e) => {
                    // The controller validates with the same rule; refuse all rather than guess.
                    warnings.push(format!(
                        "service {key}: identities unusable ({e}); no server allowed"
                    ));
                    ServerNames::default()
                }
            };
        ServiceState {
            declared: spec.is_some(),
            ports: spec.map(|o| o.spec.ports.clone()).unwrap_or_default(),
            versions: spec.map(|o| o.spec.versions.clone()).unwrap_or_default(),
            endpoints: Vec::new(),
            policy: ServicePolicy::default(),
            upstream: Arc::new(Upstream {
                endpoints: Vec::new(),
                servers,
                split: Vec::new(),
            }),
        }
    })
}

fn rule_matches(rule: &AuthzRule, req: &Request<'_>) -> bool {
    let any_or =
        |list: &[String], f: &dyn Fn(&str) -> bool| list.is_empty() || list.iter().any(|s| f(s));
    any_or(&rule.from_identities, &|s| s == req.peer.as_str())
        && any_or(&rule.from_namespaces, &|s| s == req.peer.namespace())
        && any_or(&rule.methods, &|m| req.method == Some(m))
        && any_or(&rule.path_prefixes, &|p| {
            req.path.is_some_and(|path| path.starts_with(p))
        })
}

/// The live [`MeshState`]: readers load the current one without locking; a writer replaces it whole.
/// Cloning shares it.
#[derive(Clone)]
pub struct StateHandle(Arc<ArcSwap<MeshState>>);

impl fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateHandle")
            .field("version", &self.load().version)
            .finish_non_exhaustive()
    }
}

impl StateHandle {
    /// A handle holding `initial`.
    pub fn new(initial: MeshState) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(initial)))
    }

    /// The current state.
    pub fn load(&self) -> Arc<MeshState> {
        self.0.load_full()
    }

    /// Replaces the state for every decision made from now on.
    pub fn store(&self, state: MeshState) {
        self.0.store(Arc::new(state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_yaml_documents;

    const TD: &str = "td";

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("spiffe id")
    }

    fn svc(name: &str, ns: &str) -> ServiceRef {
        ServiceRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn state(yaml: &str) -> MeshState {
        // Not validated: the builder must cope with what validation would refuse too (an endpoint
        // without identity is what static mode synthesizes from its TOML).
        let rs = parse_yaml_documents(yaml).expect("yaml");
        MeshState::from_resources(1, TD, rs, [])
    }

    const SHOP: &str = r#"
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 80, protocol: http}, {port: 9090, protocol: tcp}], identities: [web]}
---
kind: Endpoint
metadata: {name: web-1, namespace: shop}
spec: {service: web, address: "127.0.0.1:2", spiffe_id: "spiffe://td/ns/shop/sa/web", service_version: v1}
---
kind: Endpoint
metadata: {name: web-0, namespace: shop}
spec: {service: web, address: "127.0.0.1:1", spiffe_id: "spiffe://td/ns/shop/sa/web", service_version: v2, weight: 3}
---
kind: Endpoint
metadata: {name: evil, namespace: shop}
spec: {service: web, address: "127.0.0.1:3", spiffe_id: "spiffe://td/ns/shop/sa/evil"}
---
kind: Endpoint
metadata: {name: static, namespace: shop}
spec: {service: db, address: "127.0.0.1:4"}
"#;

    #[test]
    fn endpoints_of_identities_not_allowed_to_serve_are_left_out_with_a_warning() {
        let s = state(SHOP);
        let web = s.service(&svc("web", "shop")).expect("web");
        assert!(web.declared);
        let addrs: Vec<String> = web
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(web.endpoints[0].version, "v2");
        assert_eq!(web.endpoints[0].weight, 3);
        assert_eq!(web.endpoints[1].weight, 1);
        assert_eq!(web.upstream.endpoints.len(), 2);
        assert!(
            web.upstream
                .servers
                .allows(&id("spiffe://td/ns/shop/sa/web"))
        );
        assert!(
            !web.upstream
                .servers
                .allows(&id("spiffe://td/ns/shop/sa/evil"))
        );
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("sa/evil may not serve it")),
            "{:?}",
            s.warnings
        );
        // An endpoint without a registered identity (static mode) is kept; the check is per stream.
        let db = s.service(&svc("db", "shop")).expect("db");
        assert!(!db.declared);
        assert_eq!(db.endpoints.len(), 1);
        assert!(db.upstream.servers.allows(&id("spiffe://td/ns/shop/sa/db")));
    }

    const SPLIT: &str = r#"---
kind: Policy
metadata: {name: canary, namespace: shop}
spec: {target_service: web, traffic_split: {backends: [{service_version: v1, weight: 90}, {service_version: v2, weight: 10}, {service_version: v3, weight: 50}]}}
"#;

    #[test]
    fn a_split_sends_each_version_its_weight_and_ignores_versions_without_endpoints() {
        let s = state(&format!("{SHOP}{SPLIT}"));
        let up = &s.service(&svc("web", "shop")).expect("web").upstream;
        // v3 has no endpoint: its weight goes to the others.
        assert_eq!(up.split.len(), 2);
        let v1: SocketAddr = "127.0.0.1:2".parse().expect("addr");
        let v2: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let mut counts = [0u32; 2];
        for draw in 0..100_000u32 {
            let c = up.candidates(draw.wrapping_mul(2_654_435_761));
            assert_eq!(c.len(), 1);
            counts[usize::from(c[0] == v2)] += 1;
            assert!(c[0] == v1 || c[0] == v2);
        }
        let share = f64::from(counts[1]) / 100_000.0;
        assert!((share - 0.10).abs() < 0.005, "v2 got {share}");
        // Without a split every endpoint is a candidate.
        let plain = state(SHOP);
        let up = &plain.service(&svc("web", "shop")).expect("web").upstream;
        assert!(up.split.is_empty());
        assert_eq!(up.candidates(7).len(), 2);
    }

    #[test]
    fn a_split_whose_versions_have_no_endpoints_falls_back_to_all() {
        let yaml = format!(
            "{SHOP}---\nkind: Policy\nmetadata: {{name: c, namespace: shop}}\nspec: {{target_service: web, traffic_split: {{backends: [{{service_version: v9, weight: 1}}]}}}}\n"
        );
        let s = state(&yaml);
        let up = &s.service(&svc("web", "shop")).expect("web").upstream;
        assert!(up.split.is_empty());
        assert_eq!(up.candidates(3).len(), 2);
    }

    #[test]
    fn ports_carry_their_declared_protocol_and_others_are_tcp() {
        let s = state(SHOP);
        let web = s.service(&svc("web", "shop")).expect("web");
        assert_eq!(web.protocol(80), PortProtocol::Http);
        assert_eq!(web.protocol(9090), PortProtocol::Tcp);
        assert_eq!(web.protocol(22), PortProtocol::Tcp);
    }

    #[test]
    fn unknown_services_have_no_endpoints_and_the_default_servers() {
        let s = state(SHOP);
        let up = s.upstream(&ServiceRef::parse("cache", "shop"));
        assert!(up.endpoints.is_empty());
        assert!(up.servers.allows(&id("spiffe://td/ns/shop/sa/cache")));
        assert!(!up.servers.allows(&id("spiffe://td/ns/shop/sa/web")));
        assert_eq!(
            ServiceRef::parse("web.shop", "other"),
            ServiceRef::parse("web", "shop")
        );
    }

    #[test]
    fn revoked_identities_are_refused_and_their_endpoints_dropped() {
        let mut yaml = SHOP.to_owned();
        yaml.push_str(
            "---\nkind: Identity\nmetadata: {name: web, namespace: shop}\nspec: {revoked: true}\n",
        );
        let s = state(&yaml);
        let web = id("spiffe://td/ns/shop/sa/web");
        assert!(s.is_revoked(&web));
        assert!(
            s.service(&svc("web", "shop"))
                .expect("web")
                .endpoints
                .is_empty()
        );
        let target = svc("web", "shop");
        let req = Request {
            peer: &web,
            service: &target,
            port: 80,
            method: None,
            path: None,
        };
        assert_eq!(
            s.admit(&req),
            Admission::Refuse {
                code: StatusCode::Forbidden,
                reason: "revoked"
            }
        );
        assert_eq!(s.with_revoked([]).admit(&req), Admission::ADMIT);
    }

    const AUTHZ: &str = r#"
kind: Policy
metadata: {name: a, namespace: shop}
spec:
  target_service: web
  authorization:
    default_action: deny
    allow:
      - {from_namespaces: [front]}
      - {from_identities: ["spiffe://td/ns/ops/sa/admin"], methods: [GET], path_prefixes: [/admin]}
---
kind: Policy
metadata: {name: b, namespace: shop}
spec:
  target_service: web
  authorization:
    mode: audit
    allow: [{from_identities: ["spiffe://td/ns/batch/sa/job"]}]
"#;

    #[test]
    fn authorization_allows_matching_rules_and_applies_the_default_to_the_rest() {
        let s = state(AUTHZ);
        let web = svc("web", "shop");
        let check = |peer: &str, method: Option<&str>, path: Option<&str>| {
            let peer = id(peer);
            s.admit(&Request {
                peer: &peer,
                service: &web,
                port: 80,
                method,
                path,
            })
        };
        let denied = Admission::Refuse {
            code: StatusCode::Forbidden,
            reason: "unauthorized",
        };
        assert_eq!(
            check("spiffe://td/ns/front/sa/ui", None, None),
            Admission::ADMIT
        );
        // The two policies' rules add up; deny and enforce win.
        assert_eq!(
            check("spiffe://td/ns/batch/sa/job", None, None),
            Admission::ADMIT
        );
        assert_eq!(check("spiffe://td/ns/other/sa/x", None, None), denied);
        // Method and path rules match requests only.
        let admin = "spiffe://td/ns/ops/sa/admin";
        assert_eq!(check(admin, None, None), denied);
        assert_eq!(
            check(admin, Some("GET"), Some("/admin/users")),
            Admission::ADMIT
        );
        assert_eq!(check(admin, Some("POST"), Some("/admin/users")), denied);
        assert_eq!(check(admin, Some("GET"), Some("/public")), denied);
        // Another service has no policy: admitted.
        let other = svc("db", "shop");
        let peer = id("spiffe://td/ns/other/sa/x");
        let req = Request {
            peer: &peer,
            service: &other,
            port: 1,
            method: None,
            path: None,
        };
        assert_eq!(s.admit(&req), Admission::ADMIT);
    }

    #[test]
    fn audit_mode_admits_what_it_would_deny_and_says_so() {
        let s = state(
            r#"
kind: Policy
metadata: {name: a, namespace: shop}
spec: {target_service: web, authorization: {mode: audit, default_action: deny}}
"#,
        );
        let peer = id("spiffe://td/ns/x/sa/y");
        let web = svc("web", "shop");
        let req = Request {
            peer: &peer,
            service: &web,
            port: 80,
            method: None,
            path: None,
        };
        assert_eq!(
            s.admit(&req),
            Admission::Admit {
                audit: Some("unauthorized")
            }
        );
    }

    #[test]
    fn a_second_policy_of_a_kind_is_ignored_with_a_warning() {
        let s = state(
            r#"
kind: Policy
metadata: {name: b, namespace: shop}
spec: {target_service: web, timeouts: {request_timeout_ms: 200}}
---
kind: Policy
metadata: {name: a, namespace: shop}
spec: {target_service: web, timeouts: {request_timeout_ms: 100}}
"#,
        );
        let web = s.service(&svc("web", "shop")).expect("web");
        let t = web.policy.timeouts.as_ref().expect("timeouts");
        assert_eq!(t.request_timeout_ms, 100, "first by name applies");
        assert!(s.warnings.iter().any(|w| w.contains("policy b (timeouts)")));
    }

    #[test]
    fn a_snapshot_builds_the_same_state_as_its_resources() {
        let rs = parse_yaml_documents(SHOP).expect("yaml");
        let mut snap = pb::Snapshot {
            version: 7,
            trust_domain: TD.into(),
            revoked_spiffe_ids: vec!["spiffe://td/ns/x/sa/gone".into(), "not an id".into()],
            ..Default::default()
        };
        for r in &rs {
            match model::pb::resource_to_pb(r).resource {
                Some(pb::resource::Resource::Service(s)) => snap.services.push(s),
                Some(pb::resource::Resource::Endpoint(e)) => snap.endpoints.push(e),
                _ => {}
            }
        }
        let from_snap = MeshState::from_snapshot(&snap);
        let direct = MeshState::from_resources(7, TD, rs, [id("spiffe://td/ns/x/sa/gone")]);
        assert_eq!(from_snap.services, direct.services);
        assert_eq!(from_snap.revoked, direct.revoked);
        assert!(from_snap.warnings.iter().any(|w| w.contains("not an id")));
    }

    #[test]
    fn the_example_mesh_file_is_valid() {
        let rs =
            parse_yaml_documents(include_str!("../../deploy/mesh.example.yaml")).expect("yaml");
        for r in &rs {
            r.validate("mesh.local").expect("valid");
        }
        let s = MeshState::from_resources(0, "mesh.local", rs, []);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let checkout = s.service(&svc("checkout", "shop")).expect("checkout");
        assert_eq!(checkout.endpoints.len(), 1);
        assert_eq!(checkout.protocol(8080), PortProtocol::Http);
        assert!(checkout.policy.authorization.is_some());
    }

    #[test]
    fn the_handle_swaps_whole_states() {
        let h = StateHandle::new(MeshState::default());
        let before = h.load();
        h.store(state(SHOP));
        assert_eq!(before.services.len(), 0);
        assert_eq!(h.load().services.len(), 2);
        // The state serializes for the admin endpoint.
        let json = serde_json::to_value(&*h.load()).expect("json");
        assert!(json["services"]["web.shop"]["endpoints"].is_array());
    }
}
