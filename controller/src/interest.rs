//! Per-proxy interest: each proxy receives the part of the mesh it acts on, not the whole mesh.
//!
//! Why: with whole snapshots every proxy holds every service, endpoint and policy of the mesh and
//! receives every change to any of them, while most proxies call a handful of services. A Watch that
//! declares an [`Interest`] (the services its outbound listeners call; the services it serves follow
//! from its certificate) gets its snapshots [`View::filter`]ed to:
//!
//! - the services it serves (those whose `identities` allow its identity, the secure-naming rule) and
//!   the services it calls, declared or not (a policy may name a service no `Service` declares);
//! - the endpoints of both (a caller dials them; a server divides its rate limits by their count);
//! - every policy of a service it serves (it enforces authorization and rate limits there), and the
//!   timeouts and traffic splits of a service it only calls (what a caller applies). Authorization and
//!   rate-limit policies of a service it only calls stay with the proxies that enforce them, even when
//!   their rules name it as a source: a caller does not act on them, and another service's allow list
//!   is not its business;
//! - the trust domain, trust bundle and revoked identities whole (every connection checks them).
//!
//! A Watch without an interest (older proxies, tools) gets the whole mesh. The filtered snapshots of one
//! version are computed once per distinct interest (replicas share one), deltas between them as between
//! whole ones, and a change that leaves a proxy's filtered snapshot as it was sends it nothing. Pure.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use quicmesh_transport::{
    identity::{SpiffeId, naming::ServerNames},
    model::{FieldError, check_name},
    state::ServiceRef,
};

use crate::{
    model::{Object, PolicySpec, ServiceSpec},
    snapshot::Snapshot,
};

/// Most services one Watch may declare it calls.
pub use quicmesh_transport::control::MAX_CALLS;

/// What one proxy needs: who it is (what it serves follows from that) and what it calls.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interest {
    /// The proxy's identity, from its certificate.
    pub id: SpiffeId,
    /// Services it calls.
    pub calls: BTreeSet<ServiceRef>,
}

impl Interest {
    /// The interest of `id` declaring `calls` (`name` in `id`'s namespace, or `name.namespace`).
    pub fn declared(id: SpiffeId, calls: &[String]) -> Result<Self, FieldError> {
        if calls.len() > MAX_CALLS {
            return Err(FieldError::new(
                "interest.calls",
                format!("at most {MAX_CALLS} services, got {}", calls.len()),
            ));
        }
        let mut set = BTreeSet::new();
        for (i, c) in calls.iter().enumerate() {
            let field = format!("interest.calls[{i}]");
            let r = ServiceRef::parse(c, id.namespace());
            check_name(&field, &r.name)?;
            check_name(&field, &r.namespace)?;
            set.insert(r);
        }
        Ok(Self { id, calls: set })
    }
}

fn service_ref(namespace: &str, name: &str) -> ServiceRef {
    ServiceRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

/// Whether a policy of a service a proxy only calls reaches it: what a caller applies.
fn caller_applies(p: &PolicySpec) -> bool {
    p.timeouts.is_some() || p.traffic_split.is_some()
}

/// One snapshot indexed for filtering: built once per version, then [`View::filter`] per interest costs
/// the size of what the proxy gets plus one lookup per service.
#[derive(Debug)]
pub struct View {
    snap: Arc<Snapshot>,
    /// Each service with the identities allowed to serve it (`None`: its list does not resolve).
    servers: Vec<(ServiceRef, Option<ServerNames>)>,
    /// Index of the service named so in `snap.services`.
    services: HashMap<ServiceRef, usize>,
    /// Indexes of the endpoints of each service in `snap.endpoints`.
    endpoints: HashMap<ServiceRef, Vec<usize>>,
    /// Indexes of the policies targeting each service in `snap.policies`.
    policies: HashMap<ServiceRef, Vec<usize>>,
}

impl View {
    /// Indexes `snap`.
    pub fn new(snap: Arc<Snapshot>) -> Self {
        let servers = snap
            .services
            .iter()
            .map(|s| {
                (
                    service_ref(&s.metadata.namespace, &s.metadata.name),
                    crate::naming::server_names(&snap.trust_domain, s).ok(),
                )
            })
            .collect::<Vec<_>>();
        let services = servers
            .iter()
            .enumerate()
            .map(|(i, (r, _))| (r.clone(), i))
            .collect();
        let mut endpoints: HashMap<ServiceRef, Vec<usize>> = HashMap::new();
        for (i, e) in snap.endpoints.iter().enumerate() {
            endpoints
                .entry(service_ref(&e.metadata.namespace, &e.spec.service))
                .or_default()
                .push(i);
        }
        let mut policies: HashMap<ServiceRef, Vec<usize>> = HashMap::new();
        for (i, p) in snap.policies.iter().enumerate() {
            policies
                .entry(service_ref(&p.metadata.namespace, &p.spec.target_service))
                .or_default()
                .push(i);
        }
        Self {
            snap,
            servers,
            services,
            endpoints,
            policies,
        }
    }

    /// The snapshot indexed.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// The services `id` may serve.
    pub fn served_by(&self, id: &SpiffeId) -> BTreeSet<ServiceRef> {
        self.servers
            .iter()
            .filter(|(_, names)| names.as_ref().is_some_and(|n| n.allows(id)))
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// What a proxy with `interest` receives (see the module doc), in the snapshot's order.
    pub fn filter(&self, interest: &Interest) -> Snapshot {
        let served = self.served_by(&interest.id);
        let wanted: BTreeSet<&ServiceRef> = served.iter().chain(&interest.calls).collect();
        let mut services = Vec::new();
        let mut endpoints = Vec::new();
        let mut policies = Vec::new();
        for r in wanted {
            services.extend(self.services.get(r).copied());
            endpoints.extend(self.endpoints.get(r).into_iter().flatten().copied());
            let serves = served.contains(r);
            policies.extend(
                self.policies
                    .get(r)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|&i| serves || caller_applies(&self.snap.policies[i].spec)),
            );
        }
        // In the order of the whole snapshot (each item belongs to one service: no duplicates).
        services.sort_unstable();
        endpoints.sort_unstable();
        policies.sort_unstable();
        let pick = |all: &[Object<ServiceSpec>]| -> Vec<Object<ServiceSpec>> {
            services.iter().map(|&i| all[i].clone()).collect()
        };
        Snapshot {
            version: self.snap.version,
            trust_domain: self.snap.trust_domain.clone(),
            services: pick(&self.snap.services),
            endpoints: endpoints
                .iter()
                .map(|&i| self.snap.endpoints[i].clone())
                .collect(),
            policies: policies
                .iter()
                .map(|&i| self.snap.policies[i].clone())
                .collect(),
            trust_bundle_pem: self.snap.trust_bundle_pem.clone(),
            revoked_spiffe_ids: self.snap.revoked_spiffe_ids.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        Authorization, AuthzRule, EndpointSpec, Metadata, RateLimit, Timeouts, TrafficSplit,
    };

    fn meta(ns: &str, name: &str) -> Metadata {
        Metadata {
            name: name.into(),
            namespace: ns.into(),
            ..Default::default()
        }
    }

    fn service(ns: &str, name: &str, identities: &[&str]) -> Object<ServiceSpec> {
        Object {
            metadata: meta(ns, name),
            spec: ServiceSpec {
                identities: identities.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            },
        }
    }

    fn endpoint(ns: &str, service: &str, n: u32) -> Object<EndpointSpec> {
        Object {
            metadata: meta(ns, &format!("{service}-{n}")),
            spec: EndpointSpec {
                service: service.into(),
                address: format!("10.0.0.{n}:4433"),
                spiffe_id: format!("spiffe://td/ns/{ns}/sa/{service}"),
                ..Default::default()
            },
        }
    }

    fn policy(ns: &str, name: &str, target: &str, spec: PolicySpec) -> Object<PolicySpec> {
        Object {
            metadata: meta(ns, name),
            spec: PolicySpec {
                target_service: target.into(),
                ..spec
            },
        }
    }

    /// shop/web calls shop/cart; pay/x is unrelated; shop/cart has all four kinds of policy, one of
    /// them an authorization naming web as a source.
    fn mesh() -> Arc<Snapshot> {
        let authz = PolicySpec {
            authorization: Some(Authorization {
                allow: vec![AuthzRule {
                    from_identities: vec!["spiffe://td/ns/shop/sa/web".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        Arc::new(Snapshot {
            version: 9,
            trust_domain: "td".into(),
            services: vec![
                service("pay", "x", &[]),
                service("shop", "cart", &[]),
                service("shop", "web", &[]),
                // Served by web too, through its identities list.
                service("shop", "web-admin", &["web"]),
            ],
            endpoints: vec![
                endpoint("pay", "x", 1),
                endpoint("shop", "cart", 2),
                endpoint("shop", "cart", 3),
                endpoint("shop", "web", 4),
            ],
            policies: vec![
                policy(
                    "pay",
                    "x-split",
                    "x",
                    PolicySpec {
                        traffic_split: Some(TrafficSplit::default()),
                        ..Default::default()
                    },
                ),
                policy("shop", "cart-authz", "cart", authz.clone()),
                policy(
                    "shop",
                    "cart-limit",
                    "cart",
                    PolicySpec {
                        rate_limit: Some(RateLimit::default()),
                        ..Default::default()
                    },
                ),
                policy(
                    "shop",
                    "cart-split",
                    "cart",
                    PolicySpec {
                        traffic_split: Some(TrafficSplit::default()),
                        ..Default::default()
                    },
                ),
                policy(
                    "shop",
                    "cart-timeouts",
                    "cart",
                    PolicySpec {
                        timeouts: Some(Timeouts::default()),
                        ..Default::default()
                    },
                ),
                policy("shop", "web-authz", "web", authz),
            ],
            trust_bundle_pem: vec!["ROOT".into()],
            revoked_spiffe_ids: vec!["spiffe://td/ns/pay/sa/gone".into()],
        })
    }

    fn names<T>(items: &[Object<T>]) -> Vec<String> {
        items
            .iter()
            .map(|o| format!("{}/{}", o.metadata.namespace, o.metadata.name))
            .collect()
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("td", ns, sa).expect("spiffe id")
    }

    #[test]
    fn a_proxy_gets_what_it_serves_and_calls_and_nothing_else() {
        let view = View::new(mesh());
        let web = Interest::declared(id("shop", "web"), &["cart".into()]).expect("interest");
        let got = view.filter(&web);
        assert_eq!(
            names(&got.services),
            ["shop/cart", "shop/web", "shop/web-admin"]
        );
        assert_eq!(
            names(&got.endpoints),
            ["shop/cart-2", "shop/cart-3", "shop/web-4"]
        );
        // Of the called service only what a caller applies; of its own service everything, its
        // authorization included.
        assert_eq!(
            names(&got.policies),
            ["shop/cart-split", "shop/cart-timeouts", "shop/web-authz"]
        );
        // What every connection checks stays whole.
        assert_eq!(got.version, 9);
        assert_eq!(got.trust_domain, "td");
        assert_eq!(got.trust_bundle_pem, ["ROOT"]);
        assert_eq!(got.revoked_spiffe_ids, ["spiffe://td/ns/pay/sa/gone"]);

        // The server of cart, calling nothing, gets every policy of cart and nothing of web or pay.
        let cart = Interest::declared(id("shop", "cart"), &[]).expect("interest");
        let got = view.filter(&cart);
        assert_eq!(names(&got.services), ["shop/cart"]);
        assert_eq!(names(&got.endpoints), ["shop/cart-2", "shop/cart-3"]);
        assert_eq!(
            names(&got.policies),
            [
                "shop/cart-authz",
                "shop/cart-limit",
                "shop/cart-split",
                "shop/cart-timeouts"
            ]
        );
    }

    #[test]
    fn calls_name_other_namespaces_and_services_no_resource_declares() {
        let view = View::new(mesh());
        let i = Interest::declared(id("shop", "cart"), &["x.pay".into(), "ghost".into()])
            .expect("interest");
        assert!(i.calls.contains(&service_ref("shop", "ghost")));
        let got = view.filter(&i);
        assert_eq!(names(&got.services), ["pay/x", "shop/cart"]);
        assert_eq!(
            names(&got.endpoints),
            ["pay/x-1", "shop/cart-2", "shop/cart-3"]
        );
        assert!(names(&got.policies).contains(&"pay/x-split".to_owned()));
        // An identity that serves nothing and calls nothing gets only the mesh-wide parts.
        let none = view.filter(&Interest::declared(id("ops", "batch"), &[]).expect("interest"));
        assert!(none.services.is_empty() && none.endpoints.is_empty() && none.policies.is_empty());
        assert_eq!(none.trust_bundle_pem, ["ROOT"]);
    }

    #[test]
    fn narrowing_a_services_identities_takes_it_away() {
        let mut snap = (*mesh()).clone();
        snap.services[3].spec.identities = vec!["someone-else".into()];
        let got = View::new(Arc::new(snap))
            .filter(&Interest::declared(id("shop", "web"), &[]).expect("interest"));
        assert_eq!(names(&got.services), ["shop/web"]);
    }

    #[test]
    fn bad_declarations_are_refused_by_field() {
        let e = Interest::declared(id("shop", "web"), &["cart".into(), "Bad_Name".into()])
            .expect_err("bad name");
        assert_eq!(e.field, "interest.calls[1]");
        let e = Interest::declared(id("shop", "web"), &["cart.".into()]).expect_err("empty ns");
        assert_eq!(e.field, "interest.calls[0]");
        let many: Vec<String> = (0..=MAX_CALLS).map(|i| format!("s{i}")).collect();
        let e = Interest::declared(id("shop", "web"), &many).expect_err("too many");
        assert_eq!(e.field, "interest.calls");
        // Duplicates are one.
        let i = Interest::declared(id("shop", "web"), &["cart".into(), "cart.shop".into()])
            .expect("interest");
        assert_eq!(i.calls.len(), 1);
    }
}
