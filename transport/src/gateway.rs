//! Node gateway mode: one proxy serving several local workloads, each under its own SPIFFE identity
//! (the way ztunnel serves a node), instead of one sidecar per workload.
//!
//! Three decisions make a gateway, all pure functions here and applied by the I/O modules:
//!
//! - **Outbound attribution** ([`attribute`]): an app connection (to an outbound listener, or
//!   redirected by capture) belongs to the workload whose `sources` hold its source address. It is
//!   tunneled by that workload's pool, whose client certificate is the workload's, so the destination
//!   sees the caller's own identity. An address of no workload is refused: the gateway never lends
//!   an identity to a connection it cannot attribute.
//! - **Inbound certificate** ([`serving`]): every workload shares the one UDP port. A caller names
//!   the identities it wants in its TLS server name ([`crate::identity::ServerNames::sni`]), and the
//!   gateway presents the certificate of the workload that is one of them and serves a service with
//!   exactly that server set (or whose own identity that name names). So the caller's secure-naming
//!   check passes, and a name no workload answers fails the handshake.
//! - **Inbound routing**: a connection's streams go to the services and ports of the workload whose
//!   certificate it got; another workload's service on that connection gets `NO_ROUTE`.
//!
//! Each workload keeps its own key and credentials; the node's own identity (`[identity]` or
//! `[controller]`) is the gateway's, used for the controller and for nothing a workload does.

use std::{net::IpAddr, sync::Arc};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{
    config::InboundConfig,
    identity::{Credentials, SpiffeId, naming::server_name},
    state::{MeshState, ServiceRef, StateHandle},
};

/// One workload of a gateway, ready to serve.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Its name in the configuration.
    pub name: String,
    /// Its identity (from its certificate, or the one the node asks the controller for).
    pub id: SpiffeId,
    /// The server name that asks for exactly this identity.
    pub own_sni: Arc<str>,
    /// Its certificate and key (renewed in place in controller mode).
    pub creds: Credentials,
    /// Where its app's connections come from.
    pub sources: Vec<IpAddr>,
    /// The services it serves, in its namespace.
    pub services: Vec<ServiceRef>,
    /// The gateway's `[inbound]` with this workload's services and ports: the route of its streams.
    pub inbound: Arc<InboundConfig>,
}

impl Workload {
    /// A workload with identity `id`; `services` empty means the one named like its account.
    /// `inbound` is the gateway's, with the workload's ports; its services are set here.
    pub fn new(
        name: String,
        id: SpiffeId,
        creds: Credentials,
        sources: Vec<IpAddr>,
        services: &[String],
        mut inbound: InboundConfig,
    ) -> Self {
        let services: Vec<ServiceRef> = if services.is_empty() {
            vec![id.service_account().to_owned()]
        } else {
            services.to_vec()
        }
        .into_iter()
        .map(|name| ServiceRef {
            namespace: id.namespace().to_owned(),
            name,
        })
        .collect();
        inbound.services = services.iter().map(|s| s.name.clone()).collect();
        Self {
            name,
            own_sni: server_name([&id]).into(),
            id,
            creds,
            sources,
            services,
            inbound: Arc::new(inbound),
        }
    }
}

/// The workload an app connection from `source` belongs to, by its index in `workloads`.
pub fn attribute(workloads: &[Workload], source: IpAddr) -> Option<usize> {
    let source = source.to_canonical();
    workloads
        .iter()
        .position(|w| w.sources.iter().any(|s| s.to_canonical() == source))
}

/// The workload that answers a connection asking for server name `sni`, by its index: the one whose
/// own identity the name names, else the first that may serve (per `state`) a service it serves whose
/// server set the name names. None: no workload here is what the caller wants.
pub fn serving(workloads: &[Workload], state: &MeshState, sni: &str) -> Option<usize> {
    if let Some(i) = workloads.iter().position(|w| &*w.own_sni == sni) {
        return Some(i);
    }
    workloads.iter().position(|w| {
        w.services.iter().any(|s| {
            let up = state.upstream(s);
            &**up.servers.sni() == sni && up.servers.allows(&w.id)
        })
    })
}

/// The gateway's workloads with the mesh state their choices read; cloning shares them.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The workloads, in configuration order.
    pub workloads: Arc<[Workload]>,
    /// The mesh state (which services have which server sets).
    pub state: StateHandle,
}

impl Gateway {
    /// The workload answering a connection that asked for `sni` ([`serving`]).
    pub fn serving(&self, sni: Option<&str>) -> Option<&Workload> {
        let i = serving(&self.workloads, &self.state.load(), sni?)?;
        self.workloads.get(i)
    }

    /// The workload of an app connection from `source` ([`attribute`]).
    pub fn attribute(&self, source: IpAddr) -> Option<usize> {
        attribute(&self.workloads, source)
    }
}

/// rustls asks on every inbound handshake: the certificate of the workload the caller asked for.
impl ResolvesServerCert for Gateway {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        let Some(w) = self.serving(sni) else {
            tracing::info!(
                ?sni,
                "inbound handshake for an identity no workload here holds"
            );
            return None;
        };
        w.creds.leaf().map(|l| l.key)
    }
}

/// The server name a connection's client sent, if any.
pub fn requested_name(conn: &quinn::Connection) -> Option<String> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .server_name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::ServerNames,
        model::{self, Resource},
    };

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("valid id")
    }

    fn inbound() -> InboundConfig {
        toml::from_str("listen = \"127.0.0.1:0\"").expect("inbound")
    }

    fn workload(name: &str, account: &str, services: &[&str], sources: &[&str]) -> Workload {
        let id = id(&format!("spiffe://mesh.local/ns/shop/sa/{account}"));
        Workload::new(
            name.into(),
            id,
            Credentials::pending(rustls::RootCertStore::empty(), "mesh.local".into()),
            sources.iter().map(|s| s.parse().expect("ip")).collect(),
            &services.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            inbound(),
        )
    }

    fn state(yaml: &str) -> MeshState {
        let rs: Vec<Resource> = model::parse_yaml_documents(yaml).expect("yaml");
        MeshState::from_resources(0, "mesh.local", rs, [])
    }

    #[test]
    fn connections_belong_to_the_workload_of_their_source_address() {
        let ws = [
            workload("a", "a", &[], &["127.0.0.2", "10.0.0.2"]),
            workload("b", "b", &[], &["127.0.0.3"]),
        ];
        assert_eq!(attribute(&ws, "127.0.0.2".parse().expect("ip")), Some(0));
        assert_eq!(attribute(&ws, "10.0.0.2".parse().expect("ip")), Some(0));
        assert_eq!(attribute(&ws, "127.0.0.3".parse().expect("ip")), Some(1));
        // The IPv4-mapped form of a source (a dual-stack listener) is the same source.
        assert_eq!(
            attribute(&ws, "::ffff:127.0.0.3".parse().expect("ip")),
            Some(1)
        );
        assert_eq!(attribute(&ws, "127.0.0.1".parse().expect("ip")), None);
    }

    #[test]
    fn the_certificate_is_the_one_the_caller_names() {
        let ws = [
            workload("a", "a", &[], &["127.0.0.2"]),
            workload("b", "b", &["cart", "b"], &["127.0.0.3"]),
        ];
        // `shared` may be served by b or by c: callers name that pair.
        let st = state(
            "kind: Service\nmetadata: {name: shared, namespace: shop}\nspec:\n  ports: [{port: 80, protocol: tcp}]\n  identities: [b, c]\n",
        );
        let names = |accounts: &[&str]| {
            ServerNames::from_ids(
                accounts
                    .iter()
                    .map(|a| id(&format!("spiffe://mesh.local/ns/shop/sa/{a}"))),
            )
            .sni()
            .to_string()
        };
        assert_eq!(serving(&ws, &st, &names(&["a"])), Some(0));
        assert_eq!(serving(&ws, &st, &names(&["b"])), Some(1));
        // b does not serve `shared`, so the pair's name finds nobody.
        assert_eq!(serving(&ws, &st, &names(&["b", "c"])), None);
        let ws2 = [
            workload("a", "a", &[], &["127.0.0.2"]),
            workload("b", "b", &["shared"], &["127.0.0.3"]),
        ];
        assert_eq!(serving(&ws2, &st, &names(&["b", "c"])), Some(1));
        // An identity nobody here holds, the old fixed name, or none at all: no certificate.
        assert_eq!(serving(&ws, &st, &names(&["c"])), None);
        assert_eq!(serving(&ws, &st, "peer.quicmesh.invalid"), None);
        let gw = Gateway {
            workloads: ws.to_vec().into(),
            state: StateHandle::new(st),
        };
        assert!(gw.serving(None).is_none());
        assert_eq!(
            gw.serving(Some(&names(&["a"]))).map(|w| w.name.as_str()),
            Some("a")
        );
    }
}
