//! Controller mode: the proxy's side of the controller's `ProxyApi`.
//!
//! Three jobs, all on the gRPC-over-TLS channel of [`crate::grpc`]: the CA client the
//! [identity manager](crate::identity::manager) uses (bootstrap over plain TLS with the join token,
//! renewals over mTLS with the current certificate); registering this proxy's inbound endpoint; and
//! following `Watch`: each snapshot's trust bundle goes to the credentials, everything else becomes the
//! proxy's [`MeshState`], built once per snapshot and swapped whole. When the controller is unreachable
//! the proxy keeps working on the last state and its still-valid certificate, and reconnects with
//! jittered exponential backoff. With several controllers configured it starts at a random one and
//! moves to the next when it loses it ([`failover`]); a Watch resumed elsewhere names the version the
//! proxy holds, so an unchanged mesh is not sent again. This module only writes the state; what the
//! proxy does with it is decided in [`crate::state`].

pub mod delta;
pub mod failover;
pub mod report;
pub mod tap;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use quicmesh_proto::controller::{self as pb, proxy_api_client::ProxyApiClient};
use rustls::RootCertStore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    clip::clip,
    config::{ConfigError, ControllerConfig},
    grpc,
    identity::{
        Credentials, SpiffeId,
        credentials::roots_from_pem,
        manager::{self, CaClient, CaClientError, Issued},
    },
    metrics::IdentityMetrics,
    state::{MeshState, StateHandle},
};

/// Deadline of each unary call to the controller.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A Watch stream silent for this long is reopened (HTTP/2 keep-alives find dead peers much sooner).
const WATCH_IDLE: Duration = Duration::from_secs(600);
/// A Watch stream that lived this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);

/// What controller mode needs from the configuration file, read and checked.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `host:port` of each controller (at least one).
    pub addresses: Vec<String>,
    /// Roots that verify the controller (the configured bundle).
    pub roots: RootCertStore,
    /// Manager settings (identity, token, renewal share).
    pub manager: manager::ManagerConfig,
    /// Name shown by `quicmesh ctl proxies`.
    pub proxy_name: String,
    /// Address to register for the inbound endpoint, if it differs from the bound one.
    pub advertise: Option<SocketAddr>,
    /// How often traffic summaries go to the controller (zero: never).
    pub report_interval: Duration,
}

impl Bootstrap {
    /// Reads the trust bundle and join token named by `c`, or fails naming the key.
    pub fn load(c: &ControllerConfig, file: &Path) -> Result<Self, ConfigError> {
        let read = |key: &str, p: &Path| {
            std::fs::read(p).map_err(|e| {
                ConfigError::new(file, key, format!("cannot read {}: {e}", p.display()))
            })
        };
        let bundle = read("controller.trust_bundle", &c.trust_bundle)?;
        let roots = roots_from_pem(&bundle)
            .map_err(|e| ConfigError::new(file, "controller.trust_bundle", e))?;
        let (join_token, kind, token_file) = match (
            &c.join_token,
            &c.join_token_file,
            &c.service_account_token_file,
        ) {
            (Some(t), _, _) => (t.trim().to_owned(), manager::TokenKind::Join, None),
            (None, Some(p), _) => (
                String::from_utf8_lossy(&read("controller.join_token_file", p)?)
                    .trim()
                    .to_owned(),
                manager::TokenKind::Join,
                Some(p.clone()),
            ),
            (None, None, Some(p)) => (
                String::from_utf8_lossy(&read("controller.service_account_token_file", p)?)
                    .trim()
                    .to_owned(),
                manager::TokenKind::ServiceAccount,
                Some(p.clone()),
            ),
            (None, None, None) => (String::new(), manager::TokenKind::Join, None),
        };
        if join_token.is_empty() {
            return Err(ConfigError::new(
                file,
                match kind {
                    manager::TokenKind::Join => "controller.join_token",
                    manager::TokenKind::ServiceAccount => "controller.service_account_token_file",
                },
                "the token is empty",
            ));
        }
        let id: SpiffeId = c.identity.parse().map_err(|e| {
            ConfigError::new(
                file,
                "controller.identity",
                format!("{:?}: {e}", c.identity),
            )
        })?;
        Ok(Self {
            addresses: c.all_addresses(),
            roots,
            proxy_name: c
                .proxy_name
                .clone()
                .unwrap_or_else(|| id.service_account().to_owned()),
            manager: manager::ManagerConfig {
                id,
                kind,
                join_token,
                join_token_file: token_file,
                renew_fraction: c.renew_fraction,
            },
            advertise: c.advertise,
            report_interval: c.report_interval,
        })
    }
}

fn tls_config(
    roots: RootCertStore,
    client: Option<&Credentials>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(crate::quic::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some(creds) => builder.with_client_cert_resolver(Arc::new(creds.clone())),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The controllers as seen by this proxy: their addresses, the one in use, how to verify them, and our
/// credentials for mTLS. Clones share the choice: the identity manager and the Watch follower move
/// together.
#[derive(Debug, Clone)]
pub struct Controller {
    addresses: Arc<[String]>,
    current: Arc<AtomicUsize>,
    bootstrap_roots: RootCertStore,
    creds: Credentials,
    token_kind: manager::TokenKind,
    /// One mTLS channel (one TLS connection) shared by the traffic reports and the tap call, and
    /// which controller it goes to.
    shared: Arc<tokio::sync::Mutex<Option<(usize, Channel)>>>,
}

impl Controller {
    /// A client of the controllers at `addresses` (at least one), starting at a random one.
    pub fn new(addresses: Vec<String>, bootstrap_roots: RootCertStore, creds: Credentials) -> Self {
        let start = failover::first_choice(addresses.len(), rand::random());
        Self {
            addresses: addresses.into(),
            current: Arc::new(AtomicUsize::new(start)),
            bootstrap_roots,
            creds,
            token_kind: manager::TokenKind::Join,
            shared: Arc::default(),
        }
    }

    /// Bootstrap tokens sent to Certify are of `kind` (a join token unless told).
    pub fn with_token_kind(mut self, kind: manager::TokenKind) -> Self {
        self.token_kind = kind;
        self
    }

    /// A client on the shared mTLS channel to the controller in use (no per-call deadline: callers
    /// bound their calls), opened on first use or after [`Controller::drop_shared`].
    async fn shared_client(&self) -> Result<ProxyApiClient<Channel>, String> {
        let at = self.current();
        let mut shared = self.shared.lock().await;
        let ch = match &*shared {
            Some((i, ch)) if *i == at => ch.clone(),
            _ => {
                let ch = self.channel(at, true, None).await?;
                *shared = Some((at, ch.clone()));
                ch
            }
        };
        Ok(ProxyApiClient::new(ch).max_decoding_message_size(grpc::MAX_MESSAGE))
    }

    /// Forgets the shared channel after a failure, so the next call connects again.
    async fn drop_shared(&self) {
        *self.shared.lock().await = None;
    }

    /// Index of the controller in use.
    fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    fn address(&self, i: usize) -> &str {
        self.addresses
            .get(i)
            .or_else(|| self.addresses.first())
            .map_or("", String::as_str)
    }

    /// Moves off controller `failed`, unless another caller already did.
    fn fail_over(&self, failed: usize) -> usize {
        let next = failover::next_choice(failed, self.addresses.len());
        match self
            .current
            .compare_exchange(failed, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => next,
            Err(now) => now,
        }
    }

    /// Opens a channel to controller `i`; with `mtls` it presents our current certificate.
    async fn channel(
        &self,
        i: usize,
        mtls: bool,
        timeout: Option<Duration>,
    ) -> Result<Channel, String> {
        // The configured bundle and the mesh bundle both verify the controller: the first covers an
        // operator-provided root, the second a root rotation learnt from snapshots.
        let mut roots = self.bootstrap_roots.clone();
        roots.roots.extend(self.creds.roots().roots.iter().cloned());
        let tls = tls_config(roots, mtls.then_some(&self.creds)).map_err(|e| e.to_string())?;
        grpc::connect(self.address(i), tls, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn client(
        &self,
        i: usize,
        mtls: bool,
        timeout: Option<Duration>,
    ) -> Result<ProxyApiClient<Channel>, String> {
        Ok(ProxyApiClient::new(self.channel(i, mtls, timeout).await?)
            .max_decoding_message_size(grpc::MAX_MESSAGE))
    }
}

impl Controller {
    /// Withdraws our registered `endpoints` (a draining proxy), each within `limit`; failures are logged:
    /// the endpoint then stays until the proxy registers again or it is deleted.
    pub async fn deregister(&self, endpoints: &[pb::Endpoint], limit: Duration) {
        if endpoints.is_empty() {
            return;
        }
        let work = async {
            let mut client = self.client(self.current(), true, Some(limit)).await?;
            for e in endpoints {
                let (namespace, name) = e
                    .metadata
                    .as_ref()
                    .map(|m| (m.namespace.clone(), m.name.clone()))
                    .unwrap_or_default();
                let r = client
                    .deregister_endpoint(pb::DeregisterEndpointRequest { namespace, name })
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), clip(s.message())))?;
                tracing::info!(service = %e.service, version = r.into_inner().version, "endpoint withdrawn");
            }
            Ok::<_, String>(())
        };
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not withdraw the endpoint"),
            Err(_) => tracing::warn!(?limit, "could not withdraw the endpoint in time"),
        }
    }
}

fn status_error(s: &tonic::Status) -> CaClientError {
    use tonic::Code;
    let text = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::FailedPrecondition => CaClientError::Refused(text),
        _ => CaClientError::Unavailable(text),
    }
}

impl Controller {
    async fn certify_at(
        &self,
        i: usize,
        csr_pem: String,
        join_token: Option<String>,
        workload: Option<&SpiffeId>,
    ) -> Result<Issued, CaClientError> {
        let bootstrap = join_token.is_some();
        let call = async {
            let mut client = self
                .client(i, !bootstrap, Some(CALL_TIMEOUT))
                .await
                .map_err(CaClientError::Unavailable)?;
            client
                .certify(match (workload, self.token_kind) {
                    (Some(w), _) => pb::CertifyRequest {
                        csr_pem,
                        workload_spiffe_id: w.to_string(),
                        ..Default::default()
                    },
                    (None, manager::TokenKind::Join) => pb::CertifyRequest {
                        csr_pem,
                        join_token: join_token.unwrap_or_default(),
                        ..Default::default()
                    },
                    (None, manager::TokenKind::ServiceAccount) => pb::CertifyRequest {
                        csr_pem,
                        service_account_token: join_token.unwrap_or_default(),
                        ..Default::default()
                    },
                })
                .await
                .map_err(|s| status_error(&s))
        };
        let resp = tokio::time::timeout(CALL_TIMEOUT + grpc::CONNECT_TIMEOUT * 2, call)
            .await
            .map_err(|_| CaClientError::Unavailable("Certify timed out".into()))??
            .into_inner();
        Ok(Issued {
            cert_chain_pem: resp.cert_chain_pem,
            trust_bundle_pem: resp.trust_bundle_pem,
        })
    }
}

impl CaClient for Controller {
    /// Asks the controller in use; one that cannot be reached hands over to the next, each tried once.
    async fn certify(
        &self,
        csr_pem: String,
        join_token: Option<String>,
    ) -> Result<Issued, CaClientError> {
        self.certify_any(csr_pem, join_token, None).await
    }
}

impl Controller {
    /// Certify at the controller in use; one that cannot be reached hands over to the next, each
    /// tried once.
    async fn certify_any(
        &self,
        csr_pem: String,
        join_token: Option<String>,
        workload: Option<&SpiffeId>,
    ) -> Result<Issued, CaClientError> {
        let mut i = self.current();
        let mut tried = 0;
        loop {
            match self
                .certify_at(i, csr_pem.clone(), join_token.clone(), workload)
                .await
            {
                Err(CaClientError::Unavailable(e)) if tried + 1 < self.addresses.len() => {
                    tracing::warn!(controller = %self.address(i), error = %e, "controller unavailable for Certify; trying the next");
                    i = self.fail_over(i);
                    tried += 1;
                }
                other => return other,
            }
        }
    }
}

/// Node gateway: a workload's certificates, asked for by the node over its own mTLS connection to
/// the controller (never with a token: the node authenticated once). The controller signs only
/// identities placed on the node. The manager's bootstrap and renewal both come here.
#[derive(Clone)]
pub struct WorkloadCa {
    /// The node's controller client (its certificate authenticates the calls).
    pub controller: Controller,
    /// The workload identity asked for.
    pub workload: SpiffeId,
}

impl CaClient for WorkloadCa {
    async fn certify(
        &self,
        csr_pem: String,
        _join_token: Option<String>,
    ) -> Result<Issued, CaClientError> {
        // Nothing to authenticate with before the node holds its own certificate.
        self.controller.creds.wait_leaf().await;
        self.controller
            .certify_any(csr_pem, None, Some(&self.workload))
            .await
    }
}

/// Most services a Watch may declare it calls (the controller refuses more).
pub const MAX_CALLS: usize = 1024;

/// The Watch interest of a proxy whose outbound listeners call `calls`, each once; `None` (the whole
/// mesh) past [`MAX_CALLS`] services.
pub fn interest(calls: &[String]) -> Option<pb::Interest> {
    let calls: std::collections::BTreeSet<&String> = calls.iter().collect();
    (calls.len() <= MAX_CALLS).then(|| pb::Interest {
        calls: calls.into_iter().cloned().collect(),
    })
}

/// Whether a `RegisterEndpoint` error is the controller's answer (not a failure to reach it).
fn registration_refused(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::PermissionDenied | Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument
    )
}

/// What the follower holds from the snapshots it applied.
#[derive(Debug, Default)]
struct Held {
    /// Version of the last snapshot applied (0: none yet), sent when resuming a Watch.
    version: u64,
    /// The trust bundle last applied.
    bundle: Vec<String>,
    /// The whole snapshot last applied (deltas apply to it).
    snapshot: Option<pb::Snapshot>,
}

/// What the Watch follower applies snapshots to and registers.
#[derive(Debug, Clone)]
pub struct Follower {
    /// The controller.
    pub controller: Controller,
    /// Our credentials (trust bundle updates).
    pub creds: Credentials,
    /// Name shown by `quicmesh ctl proxies`.
    pub proxy_name: String,
    /// The mesh state each snapshot replaces.
    pub state: StateHandle,
    /// Endpoints to register (our inbound), re-registered on every reconnect.
    pub register: Vec<pb::Endpoint>,
    /// Services our outbound listeners call (`name` or `name.namespace`): the Watch's interest, so the
    /// controller sends only what this proxy serves and calls ([`interest`]). `None`: the whole mesh.
    pub calls: Option<Vec<String>>,
    /// Metrics.
    pub metrics: IdentityMetrics,
    /// Set to true once the first snapshot is applied.
    pub configured: tokio::sync::watch::Sender<bool>,
}

impl Follower {
    /// Follows the controller until `shutdown`, reconnecting with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.creds.wait_leaf() => {}
        }
        let mut failures = 0u32;
        let mut held = Held::default();
        loop {
            let started = Instant::now();
            let at = self.controller.current();
            let err = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = self.watch_once(at, &mut held) => e,
            };
            self.metrics.controller_connected.set(0);
            self.metrics.watch_failures.inc();
            failures = if started.elapsed() >= STABLE {
                1
            } else {
                failures.saturating_add(1)
            };
            let next = self.controller.fail_over(at);
            let delay =
                failover::retry_delay(failures, self.controller.addresses.len(), rand::random());
            tracing::warn!(
                controller = %self.controller.address(at), error = %err, next = %self.controller.address(next),
                retry_in = ?delay, "controller unreachable; keeping the last configuration"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn watch_once(&self, at: usize, held: &mut Held) -> String {
        let mut client = match self.controller.client(at, true, None).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        for e in &self.register {
            let call = client.register_endpoint(pb::RegisterEndpointRequest {
                endpoint: Some(e.clone()),
            });
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(r)) => tracing::info!(
                    service = %e.service, address = %e.address, version = r.into_inner().version,
                    "endpoint registered"
                ),
                // A refusal will not change by retrying: say so loudly and keep following the
                // configuration, so this proxy's outbound side still works.
                Ok(Err(s)) if registration_refused(s.code()) => {
                    self.metrics.registrations_refused.inc();
                    tracing::error!(
                        service = %e.service, code = ?s.code(), reason = %clip(s.message()),
                        "the controller refused this proxy as an endpoint of the service; it gets no traffic for it"
                    );
                }
                Ok(Err(s)) => return format!("RegisterEndpoint: {:?}: {}", s.code(), s.message()),
                Err(_) => return "RegisterEndpoint timed out".into(),
            }
        }
        let req = pb::WatchRequest {
            proxy_name: self.proxy_name.clone(),
            spiffe_ids: self.creds.id().map(|i| i.to_string()).into_iter().collect(),
            resume_version: held.version,
            deltas: true,
            interest: self.calls.as_deref().and_then(interest),
        };
        let mut stream = match tokio::time::timeout(CALL_TIMEOUT, client.watch(req)).await {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) => return format!("Watch: {:?}: {}", s.code(), s.message()),
            Err(_) => return "Watch timed out".into(),
        };
        self.metrics.controller_connected.set(1);
        tracing::info!(controller = %self.controller.address(at), resume_version = held.version, "watching the controller");
        loop {
            match tokio::time::timeout(WATCH_IDLE, stream.message()).await {
                Ok(Ok(Some(msg))) => {
                    // A delta on a version we do not hold: watch again (the controller then sends
                    // the whole snapshot unless it is the version we hold).
                    let snap = match delta::apply(held.snapshot.as_ref(), &msg) {
                        Ok(s) => s,
                        Err(e) => return e.to_string(),
                    };
                    self.apply(&snap, held);
                    held.snapshot = Some(snap);
                }
                Ok(Ok(None)) => return "Watch stream ended".into(),
                Ok(Err(s)) => return format!("Watch: {:?}: {}", s.code(), s.message()),
                Err(_) => return format!("no snapshot for {WATCH_IDLE:?}; reconnecting"),
            }
        }
    }

    fn apply(&self, snap: &pb::Snapshot, held: &mut Held) {
        held.version = snap.version;
        if !snap.trust_bundle_pem.is_empty() && snap.trust_bundle_pem != held.bundle {
            match roots_from_pem(snap.trust_bundle_pem.join("\n").as_bytes()) {
                Ok(r) => {
                    self.creds.set_roots(r);
                    held.bundle = snap.trust_bundle_pem.clone();
                    tracing::info!(roots = snap.trust_bundle_pem.len(), "trust bundle updated");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "snapshot trust bundle unusable; keeping ours")
                }
            }
        }
        let next = MeshState::from_snapshot(snap);
        let prev = self.state.load();
        if next.revoked != prev.revoked {
            tracing::info!(revoked = next.revoked.len(), "revoked identities updated");
        }
        for (service, svc) in &next.services {
            let before = prev.services.get(service).map(|s| &s.upstream);
            if before != Some(&svc.upstream) {
                tracing::info!(
                    %service, endpoints = ?svc.upstream.endpoints, servers = %svc.upstream.servers,
                    "upstream updated"
                );
            }
        }
        self.state.store(next);
        self.metrics
            .snapshot_version
            .set(i64::try_from(snap.version).unwrap_or(i64::MAX));
        self.metrics.snapshots.inc();
        self.configured.send_replace(true);
        tracing::debug!(version = snap.version, "snapshot applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_interest_lists_each_called_service_once_and_gives_up_past_the_cap() {
        let calls = ["cart".to_owned(), "web.shop".to_owned(), "cart".to_owned()];
        let i = interest(&calls).expect("interest");
        assert_eq!(i.calls, ["cart", "web.shop"]);
        // No outbound listener: only what it serves, which the controller works out.
        assert_eq!(interest(&[]).map(|i| i.calls.len()), Some(0));
        let many: Vec<String> = (0..=MAX_CALLS).map(|n| format!("s{n}")).collect();
        assert!(interest(&many).is_none(), "past the cap: the whole mesh");
    }
}
