//! A sidecar proxy: its listeners, its connection pool, its admin endpoint, and its drain.
//!
//! Everything binds in [`Proxy::bind`] before anything runs, so a bad certificate or a taken port stops
//! start-up with an error naming the configuration key, instead of a half-started proxy. [`Proxy::run`]
//! serves until the shutdown future resolves, then drains: readiness goes false, listeners stop
//! accepting, open tunneled connections get the grace period to finish, the rest are reset.

pub mod admission;
pub mod balance;
pub mod capture;
pub mod inbound;
pub mod lane;
pub mod outbound;
pub mod pool;
pub mod splice;

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};

use crate::{
    admin::Admin,
    config::{ConfigError, ProxyConfig},
    control,
    identity::{Credentials, Leaf, ServerNames, credentials::roots_from_pem, manager},
    metrics::{Direction, DirectionLabels, Metrics},
    model::{self, Resource},
    quic,
    retry::RetryBudget,
    state::{MeshState, ServiceRef, StateHandle},
};

/// Longest a draining proxy waits for the controller to withdraw its endpoints.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(1);

/// Signals shared by every task of a proxy for an orderly shutdown.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    /// Fires when the drain begins: stop taking new connections and streams.
    pub stop_accepting: CancellationToken,
    /// Fires when the grace period is over: reset what is still open.
    pub abort: CancellationToken,
    /// Every connection and stream task, so the drain can wait for them.
    pub tracker: TaskTracker,
}

/// The addresses a proxy actually bound (ports given as 0 are resolved).
#[derive(Debug, Clone, Serialize)]
pub struct ProxyAddresses {
    /// Admin HTTP.
    pub admin: SocketAddr,
    /// Inbound QUIC (UDP), if configured.
    pub inbound: Option<SocketAddr>,
    /// Outbound TCP listeners, in configuration order.
    pub outbound: Vec<SocketAddr>,
    /// The capture listener, if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<SocketAddr>,
    /// The HTTP/3 ingress (UDP), if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<SocketAddr>,
}

/// A bound, not yet running proxy.
pub struct Proxy {
    creds: Credentials,
    state: StateHandle,
    inbound: Option<inbound::Inbound>,
    outbound: Vec<outbound::Outbound>,
    capture: Option<capture::Capture>,
    /// The proxy's own capture rules (`[capture] install`), removed when the proxy is done.
    capture_rules: Option<capture::InstalledRules>,
    ingress: Option<crate::ingress::Ingress>,
    ingress_endpoint: Option<quinn::Endpoint>,
    admin: Admin,
    pool: Arc<pool::Pool>,
    /// Node gateway mode: each workload's pool (on `pool`'s endpoint), in workload order.
    workload_pools: Vec<Arc<pool::Pool>>,
    /// Node gateway mode: the workloads.
    gateway: Option<crate::gateway::Gateway>,
    inbound_endpoint: Option<quinn::Endpoint>,
    ready: Arc<AtomicBool>,
    metrics: Metrics,
    grace: Duration,
    addresses: ProxyAddresses,
    drain: Drain,
    /// Controller mode: stops the identity manager and the Watch follower when the proxy goes away.
    control: Option<DropGuard>,
    /// Controller mode: each registering identity's controller client (the proxy's own, or in a node
    /// gateway each workload's) with the endpoints it registered, withdrawn when the drain begins.
    registered: Vec<(
        control::Controller,
        Vec<quicmesh_proto::controller::Endpoint>,
    )>,
    readiness: Readiness,
}

/// What a proxy waits for before it reports ready: a certificate, in a node gateway every workload's
/// certificate too, and in controller mode the first configuration snapshot (so the endpoints of its
/// outbound services are known).
#[derive(Debug, Clone)]
pub struct Readiness {
    creds: Credentials,
    configured: Option<tokio::sync::watch::Receiver<bool>>,
    /// Controller mode: why the first certificate has not come yet.
    problem: Option<tokio::sync::watch::Receiver<Option<manager::BootstrapProblem>>>,
    /// Node gateway in controller mode: each workload's name, credentials and why its first
    /// certificate has not come yet.
    workloads: Vec<WorkloadReadiness>,
}

/// One gateway workload as readiness sees it.
#[derive(Debug, Clone)]
struct WorkloadReadiness {
    name: String,
    creds: Credentials,
    problem: tokio::sync::watch::Receiver<Option<manager::BootstrapProblem>>,
}

/// What readiness still lacks, in a form [`not_ready_reason`] puts in words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    /// The proxy's own certificate is not held: the last failure, if any.
    pub own: Option<Option<String>>,
    /// Workloads without a certificate: (name, the last failure, if any), in configuration order.
    pub workloads: Vec<(String, Option<String>)>,
    /// The first configuration snapshot has not been applied.
    pub unconfigured: bool,
}

/// Why a proxy is not ready, in words for `/ready` (None: nothing is missing).
pub fn not_ready_reason(m: &Missing) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(why) = &m.own {
        parts.push(match why {
            Some(w) => format!("no certificate yet: {w}"),
            None => "no certificate yet".to_owned(),
        });
    }
    for (name, why) in &m.workloads {
        parts.push(match why {
            Some(w) => format!("workload {name} has no certificate: {w}"),
            None => format!("workload {name} has no certificate yet"),
        });
    }
    if m.unconfigured {
        parts.push("no configuration from the controller yet".to_owned());
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

impl Readiness {
    /// Resolves once the proxy holds a certificate (a gateway: every workload's too) and, in
    /// controller mode, its first configuration.
    pub async fn wait(&self) {
        self.creds.wait_leaf().await;
        for w in &self.workloads {
            w.creds.wait_leaf().await;
        }
        if let Some(mut rx) = self.configured.clone() {
            // An error means the follower is gone (shutdown): nothing more to wait for.
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// What is still missing now.
    pub fn missing(&self) -> Missing {
        let message = |rx: &tokio::sync::watch::Receiver<Option<manager::BootstrapProblem>>| {
            rx.borrow().as_ref().map(|p| p.message.clone())
        };
        Missing {
            own: self
                .creds
                .leaf()
                .is_none()
                .then(|| self.problem.as_ref().and_then(message)),
            workloads: self
                .workloads
                .iter()
                .filter(|w| w.creds.leaf().is_none())
                .map(|w| (w.name.clone(), message(&w.problem)))
                .collect(),
            unconfigured: self.configured.as_ref().is_some_and(|rx| !*rx.borrow()),
        }
    }

    /// The last reason the first certificate could not be obtained (controller mode), if any.
    pub fn problem(&self) -> Option<manager::BootstrapProblem> {
        self.problem.as_ref().and_then(|rx| rx.borrow().clone())
    }

    /// Resolves when the controller refuses the bootstrap credential (it will not change its mind for
    /// the same token); never in static mode.
    pub async fn refused(&self) -> manager::BootstrapProblem {
        if let Some(mut rx) = self.problem.clone()
            && let Ok(p) = rx.wait_for(|p| p.as_ref().is_some_and(|p| p.refused)).await
            && let Some(p) = p.clone()
        {
            return p;
        }
        std::future::pending().await
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

/// Reads the identity files named by the configuration (static mode).
pub fn load_credentials(cfg: &ProxyConfig, file: &Path) -> Result<Credentials, ConfigError> {
    let Some(identity) = &cfg.identity else {
        return Err(ConfigError::new(
            file,
            "identity",
            "missing: static mode needs [identity]",
        ));
    };
    let read = |key: &str, p: &Path| {
        std::fs::read(p)
            .map_err(|e| ConfigError::new(file, key, format!("cannot read {}: {e}", p.display())))
    };
    let cert = read("identity.cert", &identity.cert)?;
    let key = read("identity.key", &identity.key)?;
    let bundle = read("identity.trust_bundle", &identity.trust_bundle)?;
    let leaf = Leaf::from_pem(&quic::provider(), &cert, &key).map_err(|e| {
        let k = match e {
            crate::identity::CredentialsError::Key(_)
            | crate::identity::CredentialsError::KeyMismatch => "identity.key",
            _ => "identity.cert",
        };
        ConfigError::new(file, k, e)
    })?;
    let roots =
        roots_from_pem(&bundle).map_err(|e| ConfigError::new(file, "identity.trust_bundle", e))?;
    let now = time::OffsetDateTime::now_utc();
    if leaf.info.not_after < now {
        tracing::warn!(id = %leaf.info.id, not_after = %leaf.info.not_after, "our own certificate has expired; peers will refuse it");
    }
    let td = match &identity.trust_domain {
        Some(td) => {
            let probe = format!("spiffe://{td}/ns/x/sa/x");
            crate::identity::SpiffeId::from_str(&probe).map_err(|_| {
                ConfigError::new(
                    file,
                    "identity.trust_domain",
                    format!("{td:?} is not a valid trust domain"),
                )
            })?;
            td.clone()
        }
        None => leaf.info.id.trust_domain().to_owned(),
    };
    Ok(Credentials::with_trust_domain(leaf, roots, td))
}

/// Node gateway mode: the `[[workload]]`s with their credentials. Static mode reads each one's
/// certificate and key (trusting the node's bundle); controller mode starts each one pending, to be
/// certified through the node's controller connection.
fn load_workloads(
    cfg: &ProxyConfig,
    file: &Path,
    creds: &Credentials,
) -> Result<Vec<crate::gateway::Workload>, ConfigError> {
    let Some(inbound) = &cfg.inbound else {
        if cfg.workloads.is_empty() {
            return Ok(Vec::new());
        }
        return Err(ConfigError::new(
            file,
            "inbound",
            "missing: a node gateway serves its workloads on an [inbound] listener",
        ));
    };
    let mut out = Vec::with_capacity(cfg.workloads.len());
    for (i, w) in cfg.workloads.iter().enumerate() {
        let key = |k: &str| format!("workload[{i}].{k}");
        let roots = (*creds.roots()).clone();
        let td = creds.trust_domain().to_owned();
        let (id, wcreds) = match (&w.cert, &w.key, &w.identity) {
            (Some(cert), Some(k), _) => {
                let read = |key: String, p: &Path| {
                    std::fs::read(p).map_err(|e| {
                        ConfigError::new(file, key, format!("cannot read {}: {e}", p.display()))
                    })
                };
                let leaf = Leaf::from_pem(
                    &quic::provider(),
                    &read(key("cert"), cert)?,
                    &read(key("key"), k)?,
                )
                .map_err(|e| {
                    let k = match e {
                        crate::identity::CredentialsError::Key(_)
                        | crate::identity::CredentialsError::KeyMismatch => "key",
                        _ => "cert",
                    };
                    ConfigError::new(file, key(k), e)
                })?;
                if leaf.info.id.trust_domain() != td {
                    return Err(ConfigError::new(
                        file,
                        key("cert"),
                        format!("{} is not of the node's trust domain {td}", leaf.info.id),
                    ));
                }
                (
                    leaf.info.id.clone(),
                    Credentials::with_trust_domain(leaf, roots, td),
                )
            }
            (_, _, Some(id)) => {
                let id: crate::identity::SpiffeId = id
                    .parse()
                    .map_err(|e| ConfigError::new(file, key("identity"), e))?;
                (id, Credentials::pending(roots, td))
            }
            _ => return Err(ConfigError::new(file, key("cert"), "missing")),
        };
        let mut icfg = inbound.clone();
        icfg.app = None;
        icfg.ports = w.ports.clone();
        out.push(crate::gateway::Workload::new(
            w.name.clone(),
            id,
            wcreds,
            w.sources.clone(),
            &w.services,
            icfg,
        ));
    }
    Ok(out)
}

/// Node gateway in controller mode: the trust bundle the node follows (from `Watch` and its own
/// renewals) becomes each workload's too, so their handshakes trust a new root as soon as the node's do.
async fn share_roots(node: Credentials, workloads: Vec<Credentials>, stop: CancellationToken) {
    let mut changed = node.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changed.changed() => if r.is_err() { return },
        }
        let roots = node.roots();
        for w in &workloads {
            w.set_roots((*roots).clone());
        }
    }
}

/// Static mode's mesh state: the resources of the `mesh` file, checked with the rules `ctl apply`
/// applies, plus what the TOML says about each outbound service, as the same resources: its
/// `endpoints` become `Endpoint`s and its `server_identities` a `Service` (unless the file declares
/// that service, whose `identities` then decide).
fn static_state(
    cfg: &ProxyConfig,
    file: &Path,
    creds: &Credentials,
) -> Result<MeshState, ConfigError> {
    let td = creds.trust_domain();
    let own_ns = creds
        .id()
        .map(|id| id.namespace().to_owned())
        .ok_or_else(|| ConfigError::new(file, "identity", "no certificate loaded"))?;
    let mut resources = match &cfg.mesh {
        None => Vec::new(),
        Some(path) => {
            let shown = path.display();
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new(file, "mesh", format!("cannot read {shown}: {e}")))?;
            let rs = model::parse_yaml_documents(&text)
                .map_err(|e| ConfigError::new(file, "mesh", format!("{shown}: {e}")))?;
            for r in &rs {
                if matches!(r, Resource::TrustDomain(_)) {
                    return Err(ConfigError::new(
                        file,
                        "mesh",
                        format!(
                            "{shown}: {} {}: the trust domain comes from the certificate",
                            r.kind(),
                            r.key()
                        ),
                    ));
                }
                r.validate(td).map_err(|e| {
                    ConfigError::new(
                        file,
                        "mesh",
                        format!("{shown}: {} {}: {e}", r.kind(), r.key()),
                    )
                })?;
            }
            rs
        }
    };
    for (i, o) in cfg.outbound.iter().enumerate() {
        let target = ServiceRef::parse(&o.service, &own_ns);
        // Checked here so that a bad entry names its key instead of leaving the service unservable.
        ServerNames::resolve(td, &target.namespace, &target.name, &o.server_identities)
            .map_err(|e| ConfigError::new(file, format!("outbound[{i}].server_identities"), e))?;
        let declared = resources.iter().any(|r| {
            matches!(r, Resource::Service(s)
                if s.metadata.namespace == target.namespace && s.metadata.name == target.name)
        });
        if declared && !o.server_identities.is_empty() {
            return Err(ConfigError::new(
                file,
                format!("outbound[{i}].server_identities"),
                format!("service {target} is declared in the mesh file: name its identities there"),
            ));
        }
        let meta = |name: String| model::Metadata {
            name,
            namespace: target.namespace.clone(),
            ..Default::default()
        };
        if !declared {
            resources.push(Resource::Service(model::Object {
                metadata: meta(target.name.clone()),
                spec: model::ServiceSpec {
                    ports: vec![model::ServicePort {
                        port: u32::from(o.port),
                        protocol: model::PortProtocol::Tcp,
                        name: String::new(),
                    }],
                    versions: Vec::new(),
                    identities: o.server_identities.clone(),
                },
            }));
        }
        for (j, addr) in o.endpoints.iter().enumerate() {
            resources.push(Resource::Endpoint(model::Object {
                metadata: meta(format!("outbound-{i}-{j}")),
                spec: model::EndpointSpec {
                    service: target.name.clone(),
                    address: addr.to_string(),
                    ..Default::default()
                },
            }));
        }
    }
    Ok(MeshState::from_resources(0, td, resources, []))
}

/// Static mode's persistent secret for the endpoint keys ([`quic::endpoint_keys`]): the private key
/// file's bytes. It outlives restarts, and whoever reads it could impersonate the proxy anyway.
fn static_secret(cfg: &ProxyConfig, file: &Path) -> Result<Vec<u8>, ConfigError> {
    let Some(identity) = &cfg.identity else {
        return Err(ConfigError::new(file, "identity", "missing"));
    };
    std::fs::read(&identity.key).map_err(|e| {
        ConfigError::new(
            file,
            "identity.key",
            format!("cannot read {}: {e}", identity.key.display()),
        )
    })
}

/// Controller mode's persistent secret: the join token and the identity it is for. The private key is
/// generated anew at each start, so it cannot serve; the token is a secret of this proxy's
/// configuration that stays the same across restarts.
fn controller_secret(boot: &control::Bootstrap) -> Vec<u8> {
    let mut s = boot.manager.join_token.as_bytes().to_vec();
    s.push(0);
    s.extend_from_slice(boot.manager.id.as_str().as_bytes());
    s
}

/// The address a proxy registers for its inbound listener: the advertised one, else the bound one
/// (loopback for an unspecified bind, which no peer could dial).
pub fn register_address(advertise: Option<SocketAddr>, bound: SocketAddr) -> SocketAddr {
    advertise.unwrap_or(match bound.ip() {
        ip if ip.is_unspecified() && bound.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], bound.port()))
        }
        ip if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, bound.port()))
        }
        _ => bound,
    })
}

/// The name a node gateway's workload goes by at the controller (its Watch in `ctl proxies`, and its
/// endpoints' names): the gateway's proxy name and the workload's.
pub fn workload_proxy_name(proxy_name: &str, workload: &str) -> String {
    format!("{proxy_name}-{workload}")
}

/// The endpoints `id` registers for its inbound `services` (none: the one named like its account) at
/// `addr`, named after `proxy_name`, the service and the port (replicas share an account, and so a
/// default proxy name: the port keeps their endpoints apart).
pub fn endpoints_to_register(
    proxy_name: &str,
    id: &crate::identity::SpiffeId,
    services: &[String],
    version: &str,
    addr: SocketAddr,
) -> Vec<quicmesh_proto::controller::Endpoint> {
    let services = if services.is_empty() {
        vec![id.service_account().to_owned()]
    } else {
        services.to_vec()
    };
    services
        .into_iter()
        .map(|service| quicmesh_proto::controller::Endpoint {
            metadata: Some(quicmesh_proto::controller::Metadata {
                name: format!("{proxy_name}-{service}-{}", addr.port()),
                namespace: id.namespace().to_owned(),
                ..Default::default()
            }),
            service,
            address: addr.to_string(),
            service_version: version.to_owned(),
            ..Default::default()
        })
        .collect()
}

impl Proxy {
    /// Loads the identity and binds every listener, or fails naming the key at fault. In controller
    /// mode this also starts the identity manager and the Watch follower; the proxy turns ready once
    /// the first certificate is held ([`Credentials::wait_leaf`]).
    pub async fn bind(cfg: &ProxyConfig, file: &Path) -> Result<Self, ConfigError> {
        let (None, Some(c)) = (&cfg.identity, &cfg.controller) else {
            let creds = load_credentials(cfg, file)?;
            let secret = static_secret(cfg, file)?;
            return Self::bind_keyed(cfg, file, creds, Some(&secret)).await;
        };
        let boot = control::Bootstrap::load(c, file)?;
        let td = boot.manager.id.trust_domain().to_owned();
        let creds = Credentials::pending(boot.roots.clone(), td);
        let secret = controller_secret(&boot);
        let mut proxy = Self::bind_keyed(cfg, file, creds, Some(&secret)).await?;
        proxy.start_control(cfg, boot);
        Ok(proxy)
    }

    fn start_control(&mut self, cfg: &ProxyConfig, boot: control::Bootstrap) {
        let stop = CancellationToken::new();
        let controller = control::Controller::new(
            boot.addresses.clone(),
            boot.roots.clone(),
            self.creds.clone(),
        )
        .with_token_kind(boot.manager.kind);
        let workloads: Vec<crate::gateway::Workload> = self
            .gateway
            .iter()
            .flat_map(|g| g.workloads.iter().cloned())
            .collect();
        // A sidecar registers its inbound services under its own identity. A gateway's node identity
        // serves nothing itself: each workload registers its services under its own identity, over a
        // connection authenticated with its own certificate (below).
        let inbound_addr = self
            .addresses
            .inbound
            .map(|bound| register_address(boot.advertise, bound));
        let register = match (&cfg.inbound, inbound_addr) {
            (Some(i), Some(addr)) if workloads.is_empty() => endpoints_to_register(
                &boot.proxy_name,
                &boot.manager.id,
                &i.services,
                &i.version,
                addr,
            ),
            _ => Vec::new(),
        };
        if !register.is_empty() {
            self.registered.push((controller.clone(), register.clone()));
        }
        let follower = control::Follower {
            controller: controller.clone(),
            creds: self.creds.clone(),
            proxy_name: boot.proxy_name.clone(),
            state: self.state.clone(),
            register,
            // A gateway takes the whole mesh: the controller sends a proxy the authorization of
            // the services its own identity serves, and the node's serves none of its workloads'.
            calls: workloads.is_empty().then(|| {
                cfg.outbound
                    .iter()
                    .map(|o| o.service.clone())
                    .chain(
                        cfg.ingress
                            .iter()
                            .flat_map(|i| i.routes.iter().map(|r| r.service.clone())),
                    )
                    .collect()
            }),
            metrics: self.metrics.identity.clone(),
            configured: tokio::sync::watch::Sender::new(false),
        };
        self.readiness.configured = Some(follower.configured.subscribe());
        let problems = tokio::sync::watch::Sender::new(None);
        self.readiness.problem = Some(problems.subscribe());
        // Each workload's certificate is asked for by the node, over its own mTLS connection, and
        // renewed the same way; the controller signs only identities placed on this node.
        for w in &workloads {
            let ca = control::WorkloadCa {
                controller: controller.clone(),
                workload: w.id.clone(),
            };
            let mcfg = manager::ManagerConfig {
                id: w.id.clone(),
                kind: manager::TokenKind::Join,
                join_token: String::new(),
                join_token_file: None,
                renew_fraction: boot.manager.renew_fraction,
            };
            let problems = tokio::sync::watch::Sender::new(None);
            self.readiness.workloads.push(WorkloadReadiness {
                name: w.name.clone(),
                creds: w.creds.clone(),
                problem: problems.subscribe(),
            });
            tokio::spawn(manager::run(
                ca,
                w.creds.clone(),
                mcfg,
                self.metrics.identity.clone(),
                problems,
                stop.clone(),
            ));
            // Once it holds its certificate, the workload registers its services' endpoints (the
            // gateway's inbound address) under its own identity and holds them with a Watch on that
            // connection, re-registering on every reconnect, as a sidecar does. Its snapshots (only
            // what it serves: it calls nothing) are not the gateway's state, which the node follows.
            let Some(addr) = inbound_addr else { continue };
            let name = workload_proxy_name(&boot.proxy_name, &w.name);
            let services: Vec<String> = w.services.iter().map(|s| s.name.clone()).collect();
            let register = endpoints_to_register(&name, &w.id, &services, &w.inbound.version, addr);
            let wcontroller = control::Controller::new(
                boot.addresses.clone(),
                boot.roots.clone(),
                w.creds.clone(),
            );
            self.registered
                .push((wcontroller.clone(), register.clone()));
            let follower = control::Follower {
                controller: wcontroller,
                creds: w.creds.clone(),
                proxy_name: name,
                state: StateHandle::new(MeshState {
                    trust_domain: self.creds.trust_domain().to_owned(),
                    ..MeshState::default()
                }),
                register,
                calls: Some(Vec::new()),
                // The node's link gauges are the node's own Watch; refusals are counted together.
                metrics: crate::metrics::IdentityMetrics {
                    registrations_refused: self.metrics.identity.registrations_refused.clone(),
                    ..Default::default()
                },
                configured: tokio::sync::watch::Sender::new(false),
            };
            tokio::spawn(follower.run(stop.clone()));
        }
        if !workloads.is_empty() {
            let node = self.creds.clone();
            let creds: Vec<Credentials> = workloads.iter().map(|w| w.creds.clone()).collect();
            tokio::spawn(share_roots(node, creds, stop.clone()));
        }
        tokio::spawn(manager::run(
            controller.clone(),
            self.creds.clone(),
            boot.manager,
            self.metrics.identity.clone(),
            problems,
            stop.clone(),
        ));
        tokio::spawn(follower.run(stop.clone()));
        if !boot.report_interval.is_zero() {
            let reporter = control::report::Reporter {
                controller: controller.clone(),
                edges: self.metrics.edges.clone(),
                connections: self.metrics.connections.clone(),
                interval: boot.report_interval,
                metrics: self.metrics.identity.clone(),
            };
            tokio::spawn(reporter.run(stop.clone()));
        }
        let tapper = control::tap::Tapper {
            controller: controller.clone(),
            tap: self.metrics.tap.clone(),
        };
        tokio::spawn(tapper.run(stop.clone()));
        self.control = Some(stop.drop_guard());
    }

    /// Binds with credentials obtained elsewhere (e.g. from the controller). The inbound endpoint's
    /// reset key is random: a restart is not recognised by peers (see [`Proxy::bind`]).
    pub async fn bind_with(
        cfg: &ProxyConfig,
        file: &Path,
        creds: Credentials,
    ) -> Result<Self, ConfigError> {
        Self::bind_keyed(cfg, file, creds, None).await
    }

    /// Binds; the inbound endpoint's stateless-reset keys derive from `secret` when given.
    async fn bind_keyed(
        cfg: &ProxyConfig,
        file: &Path,
        creds: Credentials,
        secret: Option<&[u8]>,
    ) -> Result<Self, ConfigError> {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let err = |key: String, e: &dyn std::fmt::Display| ConfigError::new(file, key, e);
        let local = || match &cfg.controller {
            Some(c) => c.identity.clone(),
            None => creds.id().map(|i| i.to_string()).unwrap_or_default(),
        };
        if let Some(a) = &cfg.access_log {
            metrics
                .access_log
                .start(a, local())
                .await
                .map_err(|e| err("access_log.path".into(), &e))?;
        }
        if let Some(t) = &cfg.tracing {
            metrics
                .tracer
                .start(t, local())
                .map_err(|e| err("tracing.otlp_endpoint".into(), &e))?;
        }
        // Controller mode: nothing is known (or allowed) until the first snapshot.
        let state = StateHandle::new(match cfg.controller {
            Some(_) => MeshState {
                trust_domain: creds.trust_domain().to_owned(),
                ..MeshState::default()
            },
            None => static_state(cfg, file, &creds)?,
        });

        let workloads = load_workloads(cfg, file, &creds)?;
        let gateway = (!workloads.is_empty()).then(|| crate::gateway::Gateway {
            workloads: workloads.into(),
            state: state.clone(),
        });

        let (inbound, inbound_endpoint) = match &cfg.inbound {
            Some(icfg) => {
                // A gateway presents the certificate of the workload the caller asks for.
                let certs: Arc<dyn rustls::server::ResolvesServerCert> = match &gateway {
                    Some(g) => Arc::new(g.clone()),
                    None => Arc::new(creds.clone()),
                };
                let server =
                    quic::server_config(&creds, certs, &state, &cfg.quic, metrics.refusals.clone())
                        .map_err(|e| err("identity".into(), &e))?;
                let ep = quic::endpoint(icfg.listen, &cfg.quic, Some(server), secret)
                    .map_err(|e| err("inbound.listen".into(), &e))?;
                let mut inbound = inbound::Inbound::new(
                    ep.clone(),
                    icfg.clone(),
                    metrics.clone(),
                    creds.clone(),
                    state.clone(),
                    cfg.quic.max_concurrent_streams,
                );
                if let Some(g) = &gateway {
                    inbound = inbound.with_gateway(g.clone());
                }
                (Some(inbound), Some(ep))
            }
            None => (None, None),
        };

        let client = quic::client_config(&creds, &state, &cfg.quic, metrics.refusals.clone(), None)
            .map_err(|e| err("identity".into(), &e))?;
        let any_v6 = cfg
            .outbound
            .iter()
            .flat_map(|o| &o.endpoints)
            .any(|a| a.is_ipv6());
        let client_bind: SocketAddr = if any_v6 {
            "[::]:0"
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0u16; 8], 0)))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        let client_ep = quic::endpoint(client_bind, &cfg.quic, None, None)
            .map_err(|e| err("outbound".into(), &e))?;
        let pool = Arc::new(pool::Pool::new(
            client_ep,
            client,
            creds.clone(),
            state.clone(),
            metrics.clone(),
        ));
        let budget = Arc::new(Mutex::new(RetryBudget::new(
            cfg.retry.ratio,
            cfg.retry.min_per_second,
            Instant::now(),
        )));

        let shared = outbound::Shared {
            state: state.clone(),
            creds: creds.clone(),
            pool: pool.clone(),
            health: Arc::default(),
            budget,
            metrics: metrics.clone(),
        };
        // A gateway's workloads dial from the same UDP endpoint, each with its own certificate and
        // pool, so every connection is one (workload, peer) pair.
        let mut workload_pools = Vec::new();
        let mut workload_shared = Vec::new();
        for (i, w) in gateway.iter().flat_map(|g| g.workloads.iter()).enumerate() {
            let client =
                quic::client_config(&w.creds, &state, &cfg.quic, metrics.refusals.clone(), None)
                    .map_err(|e| err(format!("workload[{i}]"), &e))?;
            let pool = Arc::new(pool::Pool::new(
                pool.endpoint().clone(),
                client,
                w.creds.clone(),
                state.clone(),
                metrics.clone(),
            ));
            workload_pools.push(pool.clone());
            workload_shared.push(outbound::Shared {
                creds: w.creds.clone(),
                pool,
                ..shared.clone()
            });
        }
        let mut outbound = Vec::with_capacity(cfg.outbound.len());
        for (i, o) in cfg.outbound.iter().enumerate() {
            let bound = match &gateway {
                Some(g) => {
                    outbound::Outbound::bind_gateway(
                        o.clone(),
                        g.clone(),
                        workload_shared.clone(),
                        metrics.clone(),
                    )
                    .await
                }
                None => outbound::Outbound::bind(o.clone(), shared.clone()).await,
            };
            let ob = bound.map_err(|e| {
                err(
                    format!("outbound[{i}].listen"),
                    &format!("cannot bind {}: {e}", o.listen),
                )
            })?;
            outbound.push(ob);
        }
        let capture = match &cfg.capture {
            Some(c) => {
                let routes = cfg
                    .outbound
                    .iter()
                    .zip(&outbound)
                    .filter_map(|(o, ob)| o.capture.map(|a| (a, ob.tunnel())))
                    .collect();
                Some(
                    capture::Capture::bind(c.listen, routes, metrics.clone())
                        .await
                        .map_err(|e| {
                            err(
                                "capture.listen".into(),
                                &format!("cannot bind {}: {e}", c.listen),
                            )
                        })?,
                )
            }
            None => None,
        };
        let ingress = match &cfg.ingress {
            Some(i) => Some(crate::ingress::Ingress::bind(
                i,
                file,
                &cfg.quic,
                &shared,
                crate::ingress::IngressMetrics::register(&mut registry),
            )?),
            None => None,
        };
        let ready = Arc::new(AtomicBool::new(false));
        let listeners = serde_json::json!({
            "inbound": cfg.inbound.as_ref().map(|i| serde_json::json!({
                "listen": i.listen,
                "services": i.services,
                "ports": match i.app {
                    Some(app) => serde_json::json!({"app": app}),
                    None => serde_json::json!(i.ports.iter().map(|m| serde_json::json!({"port": m.port, "app": m.app})).collect::<Vec<_>>()),
                },
            })),
            "outbound": cfg.outbound.iter().map(|o| serde_json::json!({
                "listen": o.listen, "service": o.service, "port": o.port, "capture": o.capture,
            })).collect::<Vec<_>>(),
            "capture": cfg.capture.as_ref().map(|c| c.listen),
            "workloads": gateway.iter().flat_map(|g| g.workloads.iter()).map(|w| serde_json::json!({
                "name": w.name,
                "identity": w.id.as_str(),
                "sources": w.sources,
                "services": w.services,
                "ports": w.inbound.ports.iter().map(|m| serde_json::json!({"port": m.port, "app": m.app})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "ingress": cfg.ingress.as_ref().map(|i| serde_json::json!({
                "listen": i.listen,
                "routes": i.routes.iter().map(|r| serde_json::json!({
                    "host": r.host, "path_prefix": r.path_prefix, "service": r.service, "port": r.port,
                })).collect::<Vec<_>>(),
            })),
        });
        let view = crate::admin::ConfigView {
            state: state.clone(),
            creds: creds.clone(),
            listeners,
        };
        let admin = Admin::bind(cfg.admin.listen, registry, ready.clone(), view)
            .await
            .map_err(|e| {
                err(
                    "admin.listen".into(),
                    &format!("cannot bind {}: {e}", cfg.admin.listen),
                )
            })?;

        // Last, once everything is bound: a failed start leaves no rules behind.
        let capture_rules = match &cfg.capture {
            Some(c) if c.install => {
                let captured: Vec<_> = cfg.outbound.iter().filter_map(|o| o.capture).collect();
                Some(
                    capture::InstalledRules::install(
                        &captured,
                        c.listen.port(),
                        c.exempt_uid,
                        !cfg.workloads.is_empty(),
                    )
                    .map_err(|e| err("capture.install".into(), &e))?,
                )
            }
            _ => None,
        };
        let local = |r: std::io::Result<SocketAddr>, key: &str| r.map_err(|e| err(key.into(), &e));
        let addresses = ProxyAddresses {
            admin: local(admin.local_addr(), "admin.listen")?,
            inbound: match &inbound {
                Some(i) => Some(local(i.local_addr(), "inbound.listen")?),
                None => None,
            },
            outbound: outbound
                .iter()
                .enumerate()
                .map(|(i, o)| local(o.local_addr(), &format!("outbound[{i}].listen")))
                .collect::<Result<_, _>>()?,
            capture: match &capture {
                Some(c) => Some(local(c.local_addr(), "capture.listen")?),
                None => None,
            },
            ingress: match &ingress {
                Some(i) => Some(local(i.local_addr(), "ingress.listen")?),
                None => None,
            },
        };
        Ok(Self {
            creds: creds.clone(),
            state,
            inbound,
            outbound,
            capture,
            capture_rules,
            ingress_endpoint: ingress.as_ref().map(|i| i.endpoint()),
            ingress,
            admin,
            pool,
            workload_pools,
            gateway,
            inbound_endpoint,
            ready,
            metrics,
            grace: cfg.drain_grace,
            addresses,
            drain: Drain::default(),
            control: None,
            registered: Vec::new(),
            readiness: Readiness {
                creds,
                configured: None,
                problem: None,
                workloads: Vec::new(),
            },
        })
    }

    /// What was bound.
    pub fn addresses(&self) -> &ProxyAddresses {
        &self.addresses
    }

    /// The proxy's metrics (for in-process callers such as `quicmesh up`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The live mesh state (the controller's, or the static files').
    pub fn state(&self) -> StateHandle {
        self.state.clone()
    }

    /// What the proxy waits for before it reports ready.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// The live credentials; replacing the leaf here rotates the certificate for new handshakes.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.run_notify(shutdown, || {}).await;
    }

    /// [`Proxy::run`], calling `on_ready` once the proxy reports ready (`/ready` answers 200). The
    /// admin endpoint serves from the start, so `/ready` can say what is missing meanwhile.
    pub async fn run_notify(
        self,
        shutdown: impl Future<Output = ()>,
        on_ready: impl FnOnce() + Send + 'static,
    ) {
        let drain = self.drain.clone();
        // Removed at the end of the drain (dropped when this function returns).
        let _capture_rules = self.capture_rules;
        let explain = self.readiness.clone();
        let admin = tokio::spawn(
            self.admin
                .explain(move || not_ready_reason(&explain.missing()))
                .run(),
        );
        // The data listeners start once the proxy is ready (a certificate held: at once in static
        // mode, after bootstrap and the first snapshot in controller mode; a gateway's workloads
        // certified too): until then an application's connections wait in the listen backlog
        // instead of being accepted and failed.
        let (inbound, outbound, capture, ingress) =
            (self.inbound, self.outbound, self.capture, self.ingress);
        let mark_ready = {
            let (ready, readiness, addresses) = (
                self.ready.clone(),
                self.readiness.clone(),
                self.addresses.clone(),
            );
            let creds = self.creds.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                readiness.wait().await;
                let mut listeners = Vec::new();
                if let Some(i) = inbound {
                    listeners.push(tokio::spawn(i.run(drain.clone())));
                }
                for o in outbound {
                    listeners.push(tokio::spawn(o.run(drain.clone())));
                }
                if let Some(c) = capture {
                    listeners.push(tokio::spawn(c.run(drain.clone())));
                }
                if let Some(i) = ingress {
                    listeners.push(tokio::spawn(i.run(drain.clone())));
                }
                ready.store(true, Ordering::Release);
                let id = creds.id().map(|i| i.to_string()).unwrap_or_default();
                tracing::info!(%id, ?addresses, "proxy ready");
                on_ready();
                listeners
            })
        };

        shutdown.await;
        // Stopped before ready: no listener was started (the task only waits before starting them).
        mark_ready.abort();
        let listeners = mark_ready.await.unwrap_or_default();
        self.ready.store(false, Ordering::Release);
        let open: i64 = [Direction::Outbound, Direction::Inbound]
            .into_iter()
            // One statement per lookup: a family's read guard must be gone before the next get_or_create.
            .map(|direction| {
                self.metrics
                    .active
                    .get_or_create(&DirectionLabels { direction })
                    .get()
            })
            .sum();
        tracing::info!(grace = ?self.grace, open, "draining");
        // Callers stop choosing this endpoint (and a shared rate limit is reshared) while what is in
        // flight finishes; streams that still arrive are refused as draining and retried elsewhere.
        futures::future::join_all(
            self.registered.iter().map(|(controller, endpoints)| {
                controller.deregister(endpoints, DEREGISTER_TIMEOUT)
            }),
        )
        .await;
        drain.stop_accepting.cancel();
        for l in listeners {
            let _ = l.await;
        }
        drain.tracker.close();
        if tokio::time::timeout(self.grace, drain.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; resetting the tunneled connections still open");
            drain.abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), drain.tracker.wait()).await;
        }
        self.pool.close_all();
        for p in &self.workload_pools {
            p.close_all();
        }
        let close = async {
            if let Some(ep) = &self.inbound_endpoint {
                ep.close(crate::tunnel::code::DRAINING, b"draining");
                ep.wait_idle().await;
            }
            if let Some(ep) = &self.ingress_endpoint {
                // H3_NO_ERROR: what is left after the grace period is closed without blame.
                ep.close(quinn::VarInt::from_u32(0x100), b"draining");
                ep.wait_idle().await;
            }
            self.pool
                .endpoint()
                .close(crate::tunnel::code::DRAINING, b"draining");
            self.pool.endpoint().wait_idle().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        admin.abort();
        drop(self.control);
        tracing::info!("proxy stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn the_registered_address_is_the_advertised_one_else_a_dialable_bound_one() {
        let bound = addr("0.0.0.0:4433");
        assert_eq!(register_address(None, bound), addr("127.0.0.1:4433"));
        assert_eq!(
            register_address(None, addr("[::]:4433")),
            addr("[::1]:4433")
        );
        assert_eq!(
            register_address(None, addr("10.1.0.2:4433")),
            addr("10.1.0.2:4433")
        );
        assert_eq!(
            register_address(Some(addr("10.1.0.9:443")), bound),
            addr("10.1.0.9:443")
        );
    }

    #[test]
    fn each_workload_registers_its_services_under_a_name_of_its_own() {
        let a: crate::identity::SpiffeId = "spiffe://mesh.local/ns/shop/sa/a".parse().expect("id");
        let at = addr("10.1.0.2:4433");
        let name = workload_proxy_name("gateway-a", "web");
        assert_eq!(name, "gateway-a-web");
        // No services: the one named like the account.
        let eps = endpoints_to_register(&name, &a, &[], "v1", at);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].service, "a");
        assert_eq!(eps[0].address, "10.1.0.2:4433");
        assert_eq!(eps[0].service_version, "v1");
        let meta = eps[0].metadata.as_ref().expect("metadata");
        assert_eq!(meta.name, "gateway-a-web-a-4433");
        assert_eq!(meta.namespace, "shop");
        // The identity is left to the controller: the caller's own.
        assert!(eps[0].spiffe_id.is_empty());
        let eps = endpoints_to_register(&name, &a, &["cart".into(), "a".into()], "", at);
        let names: Vec<_> = eps
            .iter()
            .filter_map(|e| e.metadata.as_ref().map(|m| m.name.as_str()))
            .collect();
        assert_eq!(names, ["gateway-a-web-cart-4433", "gateway-a-web-a-4433"]);
        // Two workloads of one gateway serving a service each never share an endpoint name.
        let b = endpoints_to_register(&workload_proxy_name("gateway-a", "api"), &a, &[], "", at);
        assert_ne!(
            b[0].metadata.as_ref().map(|m| &m.name),
            Some(&"gateway-a-web-a-4433".to_owned())
        );
    }

    #[test]
    fn not_ready_names_what_is_missing_and_why() {
        assert_eq!(not_ready_reason(&Missing::default()), None);
        let m = Missing {
            own: None,
            workloads: vec![
                (
                    "b".into(),
                    Some("refused: PermissionDenied: not placed on node".into()),
                ),
                ("c".into(), None),
            ],
            unconfigured: false,
        };
        assert_eq!(
            not_ready_reason(&m).as_deref(),
            Some(
                "workload b has no certificate: refused: PermissionDenied: not placed on node; workload c has no certificate yet"
            )
        );
        let m = Missing {
            own: Some(Some("controller unreachable".into())),
            workloads: vec![],
            unconfigured: true,
        };
        assert_eq!(
            not_ready_reason(&m).as_deref(),
            Some(
                "no certificate yet: controller unreachable; no configuration from the controller yet"
            )
        );
    }
}
