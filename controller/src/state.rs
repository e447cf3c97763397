//! The controller assembled: opens the data directory and wires its parts, each with one job.
//!
//! [`crate::resources`] (stored resources and their rules), [`crate::ca`] (tokens, issuance, audit,
//! roots, serving certificate), [`crate::snapshot`] (what proxies see, published on a channel) and
//! [`crate::registry`] (connected proxies and connections per identity). [`State`] runs the operations
//! that span parts: a write that changes what proxies see publishes a new snapshot, and publishing hands
//! the revoked identities to the registry, which closes what they hold open. No protobuf type appears
//! here: the gRPC layer ([`crate::api`]) maps.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use quicmesh_transport::identity::SpiffeId;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::{
    auth::{self, PeerInfo},
    ca::{
        Ca, CaSettings, CaStatus, Issued, Pruned, Retention,
        rules::{AuditRecord, TokenRecord},
    },
    error::{ApiError, StartError},
    keystore,
    model::{EndpointSpec, Kind, Metadata, Object, Resource, TrustDomainSpec},
    registry::{self, ProxyStatus, Registry, WatchGuard, WatchRefusal},
    resources::{Resources, WriteMode},
    snapshot::{self, Publisher, Snapshot},
    store::{
        self, Db, Op, SledStore, Store, StoreError, Tree,
        etcd::{EtcdOptions, EtcdStore},
    },
    tls,
};

/// Default leaf lifetime (SPIRE's default).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(3600);
/// Default trust domain of a new mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "quicmesh.local";
/// How often dead tokens and old audit records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often a write is checked again on fresh data after another controller committed first.
const CONFLICT_RETRIES: usize = 8;

pub use crate::ca::BUNDLE_FILE;

/// What the controller needs to open its state.
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// Data directory (sled files, the trust bundle, the default KEK file).
    pub data_dir: PathBuf,
    /// The state on etcd instead of sled in the data directory.
    pub etcd: Option<EtcdOptions>,
    /// Trust domain for a new mesh; if set on an existing one it must match.
    pub trust_domain: Option<String>,
    /// Leaf lifetime; if set, replaces the stored setting.
    pub leaf_ttl: Option<Duration>,
    /// Operator root `(cert_pem, key_pem)`, used when the store has no root yet.
    pub root_pem: Option<(String, String)>,
    /// Extra DNS names or IPs for the serving certificate.
    pub tls_names: Vec<String>,
    /// Retention of dead join tokens and audit records.
    pub retention: Retention,
    /// The key-encryption key file (default `<data_dir>/kek`).
    pub kek_file: Option<PathBuf>,
    /// The key-encryption key itself (base64), which wins over the file.
    pub kek: Option<String>,
    /// Watch streams one identity may hold at once.
    pub max_watches_per_identity: usize,
    /// Listener bounds.
    pub limits: tls::Limits,
    /// How long an endpoint outlives the connection of the proxy that registered it.
    pub endpoint_grace: Duration,
    /// Kubernetes bootstrap: the service-account token issuer this controller trusts, if any.
    pub service_account_tokens: Option<Arc<crate::k8s::TokenAuthority>>,
}

/// Default of [`StateOptions::endpoint_grace`]: short, so that a killed proxy's share of a mesh-wide
/// limit is given back within two seconds; a proxy that reconnects later registers again.
pub const DEFAULT_ENDPOINT_GRACE: Duration = Duration::from_secs(1);

impl StateOptions {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            etcd: None,
            trust_domain: None,
            leaf_ttl: None,
            root_pem: None,
            tls_names: Vec::new(),
            retention: Retention::default(),
            kek_file: None,
            kek: None,
            max_watches_per_identity: registry::DEFAULT_MAX_WATCHES,
            endpoint_grace: DEFAULT_ENDPOINT_GRACE,
            limits: tls::Limits::default(),
            service_account_tokens: None,
        }
    }
}

/// Makes `dir` and everything in it owner-only: directories 0700, files 0600.
pub fn secure_dir(dir: &Path) -> Result<(), StartError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StartError::Io { path, source }
        };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            let ty = entry.file_type().map_err(io(&path))?;
            if ty.is_dir() {
                secure_dir(&path)?;
            } else if ty.is_file() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io(&path))?;
            }
        }
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), StartError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|source| StartError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// The controller.
pub struct State {
    db: Arc<Db>,
    resources: Arc<Resources>,
    ca: Arc<Ca>,
    publisher: Publisher,
    registry: Arc<Registry>,
    admin_sha256: String,
    trust_domain: String,
    limits: tls::Limits,
    last_prune: Mutex<Option<Instant>>,
    endpoint_grace: Duration,
    service_account_tokens: Option<Arc<crate::k8s::TokenAuthority>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("trust_domain", &self.trust_domain)
            .field("revision", &self.db.revision())
            .finish_non_exhaustive()
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task: {e}")))?
        .map_err(ApiError::Store)
}

impl State {
    /// Opens the data directory, initialising a new mesh on first start. Returns the admin token when one
    /// was created (first start only: it is never shown again).
    pub fn open(opts: StateOptions) -> Result<(Arc<State>, Option<String>), StartError> {
        create_private_dir(&opts.data_dir)?;
        secure_dir(&opts.data_dir)?;
        let store: Arc<dyn Store> = match &opts.etcd {
            Some(e) => Arc::new(EtcdStore::open(e)?),
            None => Arc::new(SledStore::open(&opts.data_dir.join("db"))?),
        };
        // Controllers starting together on a new etcd store: one initialises it, the others start
        // again on what it wrote.
        let mut attempt = 0;
        loop {
            match Self::open_on(store.clone(), &opts) {
                Err(StartError::Store(StoreError::Conflict)) if attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    store.catch_up()?;
                }
                r => return r,
            }
        }
    }

    fn open_on(
        store: Arc<dyn Store>,
        opts: &StateOptions,
    ) -> Result<(Arc<State>, Option<String>), StartError> {
        let t = now();
        let base = store.revision();
        let mut ops = Vec::new();

        let stored_td: Option<Resource> = store
            .get(Tree::TrustDomains, "default")?
            .map(|v| store::decode(Tree::TrustDomains, "default", &v))
            .transpose()?;
        let (trust_domain, mut leaf_ttl) = match stored_td {
            Some(Resource::TrustDomain(o)) => {
                if let Some(td) = &opts.trust_domain
                    && *td != o.spec.trust_domain
                {
                    return Err(StartError::Config(format!(
                        "--trust-domain {td} does not match the store's trust domain {}",
                        o.spec.trust_domain
                    )));
                }
                (o.spec.trust_domain, o.spec.leaf_ttl_seconds)
            }
            Some(_) => return Err(StartError::Config("corrupt trust domain settings".into())),
            None => (
                opts.trust_domain
                    .clone()
                    .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned()),
                0,
            ),
        };
        let wanted_ttl = opts
            .leaf_ttl
            .map(|d| d.as_secs())
            .unwrap_or(if leaf_ttl == 0 {
                DEFAULT_LEAF_TTL.as_secs()
            } else {
                leaf_ttl
            });
        if wanted_ttl != leaf_ttl {
            leaf_ttl = wanted_ttl;
            let r = Resource::TrustDomain(Object {
                metadata: Metadata {
                    name: "default".into(),
                    version: store.revision() + 1,
                    created_unix: t.unix_timestamp(),
                    updated_unix: t.unix_timestamp(),
                    ..Default::default()
                },
                spec: TrustDomainSpec {
                    trust_domain: trust_domain.clone(),
                    leaf_ttl_seconds: leaf_ttl,
                },
            });
            r.validate(&trust_domain)
                .map_err(|e| StartError::Config(format!("settings: {e}")))?;
            ops.push(Op::Put(
                Tree::TrustDomains,
                "default".into(),
                store::encode(&r)?,
            ));
        }

        let mut admin_token = None;
        let admin_sha256 = match store.get(Tree::Meta, store::meta::ADMIN_TOKEN_SHA256)? {
            Some(v) => String::from_utf8(v)
                .map_err(|_| StartError::Config("corrupt admin token hash".into()))?,
            None => {
                let token = auth::new_admin_token();
                let h = auth::sha256_hex(token.as_bytes());
                ops.push(Op::Put(
                    Tree::Meta,
                    store::meta::ADMIN_TOKEN_SHA256.into(),
                    h.clone().into_bytes(),
                ));
                admin_token = Some(token);
                h
            }
        };

        let db = Arc::new(Db::new(store.clone()));
        let resources = Arc::new(Resources::new(db.clone(), trust_domain.clone()));
        let (ca, ca_ops) = Ca::open(
            db.clone(),
            resources.clone(),
            CaSettings {
                data_dir: opts.data_dir.clone(),
                trust_domain: trust_domain.clone(),
                leaf_ttl_secs: leaf_ttl,
                root_pem: opts.root_pem.clone(),
                tls_names: opts.tls_names.clone(),
                retention: opts.retention,
                kek_env: opts.kek.clone(),
                kek_file: opts
                    .kek_file
                    .clone()
                    .unwrap_or_else(|| opts.data_dir.join(keystore::KEK_FILE)),
            },
        )?;
        ops.extend(ca_ops);
        if !ops.is_empty() {
            store.commit(base, ops)?;
        }
        // sled and the first start created files: owner-only, whatever the umask was.
        secure_dir(&opts.data_dir)?;

        let snap = snapshot::build(
            db.revision(),
            &trust_domain,
            ca.bundle(),
            resources.snapshot_inputs()?,
        );
        let registry = Registry::new(opts.max_watches_per_identity);
        registry.set_revoked(revoked_set(&snap));
        let state = Arc::new(State {
            db,
            resources,
            ca: Arc::new(ca),
            publisher: Publisher::new(snap),
            registry,
            admin_sha256,
            trust_domain,
            limits: opts.limits,
            last_prune: Mutex::new(None),
            endpoint_grace: opts.endpoint_grace,
            service_account_tokens: opts.service_account_tokens.clone(),
        });
        Ok((state, admin_token))
    }

    /// Runs a write again on fresh data while another controller committed between its checks and its
    /// commit ([`StoreError::Conflict`], only on a store several controllers share).
    async fn retrying<T, F>(&self, mut write: impl FnMut() -> F) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        let mut attempt = 0;
        loop {
            match write().await {
                Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    self.db.catch_up().await?;
                }
                r => return r,
            }
        }
    }

    /// Follows batches committed by any controller on a shared store (etcd): reloads the leaf
    /// lifetime and the roots, then publishes a new snapshot if what proxies see changed. Returns at
    /// once on a store only this process writes.
    pub async fn follow_store(self: Arc<Self>) {
        let Some(mut changes) = self.db.changes() else {
            return;
        };
        while changes.changed().await.is_ok() {
            changes.borrow_and_update();
            if let Err(e) = self.store_changed().await {
                tracing::warn!(error = %e, "applying a change of the shared store failed");
            }
        }
    }

    async fn store_changed(self: &Arc<Self>) -> Result<(), ApiError> {
        if let Some(Resource::TrustDomain(o)) = self.resources.get(Kind::TrustDomain, "default")? {
            self.ca.set_leaf_ttl(o.spec.leaf_ttl_seconds);
        }
        self.ca.refresh_roots()?;
        self.publish_with(true).await
    }

    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Current leaf lifetime.
    pub fn leaf_ttl(&self) -> Duration {
        self.ca.leaf_ttl()
    }

    /// SHA-256 of the admin token.
    pub fn admin_sha256(&self) -> &str {
        &self.admin_sha256
    }

    /// Current store revision.
    pub fn revision(&self) -> u64 {
        self.db.revision()
    }

    /// The TLS configuration handle of the listener.
    pub fn serving_config(&self) -> tls::ServingConfig {
        self.ca.serving_config().clone()
    }

    /// Listener bounds.
    pub fn limits(&self) -> tls::Limits {
        self.limits
    }

    /// The registry of connections and Watch streams.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The path of the trust bundle file.
    pub fn bundle_path(&self) -> PathBuf {
        self.ca.bundle_path()
    }

    /// The trust bundle now.
    pub fn bundle(&self) -> Vec<String> {
        self.ca.bundle()
    }

    /// A receiver of snapshots, holding the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.publisher.subscribe()
    }

    /// Rebuilds the snapshot, publishes it, and closes what newly revoked identities hold.
    async fn publish(self: &Arc<Self>) -> Result<(), ApiError> {
        self.publish_with(false).await
    }

    /// As [`State::publish`]; with `only_changed`, a snapshot that differs in its version only is not
    /// sent.
    async fn publish_with(self: &Arc<Self>, only_changed: bool) -> Result<(), ApiError> {
        let this = self.clone();
        let snap = blocking(move || {
            Ok(snapshot::build(
                this.db.revision(),
                &this.trust_domain,
                this.ca.bundle(),
                this.resources.snapshot_inputs()?,
            ))
        })
        .await?;
        let revoked = revoked_set(&snap);
        if only_changed {
            self.publisher.publish_changed(snap);
        } else {
            self.publisher.publish(snap);
        }
        let closed = self.registry.set_revoked(revoked);
        if closed > 0 {
            tracing::warn!(
                closed,
                "closed Watch streams and connections of revoked identities"
            );
        }
        Ok(())
    }

    fn after_write(&self, rs: &[Resource]) {
        for r in rs {
            if let Resource::TrustDomain(o) = r {
                self.ca.set_leaf_ttl(o.spec.leaf_ttl_seconds);
            }
        }
    }

    /// Creates, updates or applies a resource.
    pub async fn put(self: &Arc<Self>, r: Resource, mode: WriteMode) -> Result<Resource, ApiError> {
        let stored = self
            .retrying(|| self.resources.put(r.clone(), mode))
            .await?;
        self.after_write(std::slice::from_ref(&stored));
        self.publish().await?;
        Ok(stored)
    }

    /// Writes a batch as one revision, or nothing.
    pub async fn put_all(
        self: &Arc<Self>,
        rs: Vec<Resource>,
        mode: WriteMode,
    ) -> Result<(Vec<Resource>, u64), ApiError> {
        let (stored, rev) = self
            .retrying(|| self.resources.put_all(rs.clone(), mode))
            .await?;
        self.after_write(&stored);
        self.publish().await?;
        Ok((stored, rev))
    }

    /// One resource.
    pub async fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Resource, ApiError> {
        let key = crate::model::key_of(kind, namespace, name);
        self.resources
            .get(kind, &key)?
            .ok_or_else(|| ApiError::NotFound(format!("{kind} {key}")))
    }

    /// Every resource of `kind`, in `namespace` or all.
    pub async fn list(&self, kind: Kind, namespace: &str) -> Result<Vec<Resource>, ApiError> {
        Ok(self.resources.list(kind, namespace)?)
    }

    /// Deletes a resource; returns the store revision of the delete.
    pub async fn delete(
        self: &Arc<Self>,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<u64, ApiError> {
        let rev = self
            .retrying(|| self.resources.delete(kind, namespace, name))
            .await?;
        self.publish().await?;
        Ok(rev)
    }

    /// Creates a join token for `namespace/sa`, creating the identity if it does not exist.
    pub async fn create_token(
        self: &Arc<Self>,
        namespace: &str,
        sa: &str,
        ttl_seconds: u64,
        reusable: bool,
    ) -> Result<(String, TokenRecord), ApiError> {
        self.retrying(|| self.ca.create_token(namespace, sa, ttl_seconds, reusable))
            .await
    }

    /// Revokes a join token by id.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord, ApiError> {
        self.retrying(|| self.ca.revoke_token(id)).await
    }

    /// Every join token (hashes only).
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, ApiError> {
        self.ca.list_tokens()
    }

    /// Revokes an identity: no more certificates, its open Watch streams and connections are closed, and
    /// peers learn it from the next snapshot.
    pub async fn revoke_identity(
        self: &Arc<Self>,
        namespace: &str,
        sa: &str,
    ) -> Result<Resource, ApiError> {
        let r = self
            .retrying(|| self.resources.revoke_identity(namespace, sa))
            .await?;
        self.publish().await?;
        Ok(r)
    }

    /// The identities placed on node gateway `node` by their Identity resources
    /// ([`crate::ca::rules::placed_on`]).
    pub fn placed_on(&self, node: &SpiffeId) -> Result<Vec<SpiffeId>, ApiError> {
        let identities = self.resources.list(crate::model::Kind::Identity, "")?;
        let specs: Vec<(SpiffeId, crate::model::IdentitySpec)> = identities
            .into_iter()
            .filter_map(|r| match r {
                crate::model::Resource::Identity(o) => {
                    SpiffeId::new(node.trust_domain(), &o.metadata.namespace, &o.metadata.name)
                        .ok()
                        .map(|id| (id, o.spec))
                }
                _ => None,
            })
            .collect();
        Ok(crate::ca::rules::placed_on(
            node,
            specs.iter().map(|(id, spec)| (id.clone(), spec)),
        ))
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &SpiffeId) -> Result<bool, ApiError> {
        Ok(self.registry.is_revoked(id) || self.resources.is_revoked(id)?)
    }

    /// Signs a CSR for the identity granted by a join token, a Kubernetes service-account token, or
    /// the caller's mesh certificate.
    pub async fn certify(
        &self,
        csr_pem: &str,
        join_token: &str,
        service_account_token: &str,
        peer: Option<&PeerInfo>,
    ) -> Result<Issued, ApiError> {
        let verified = if service_account_token.is_empty() {
            None
        } else {
            if !join_token.is_empty() {
                return Err(ApiError::Unauthenticated(
                    "give a join_token or a service_account_token, not both".into(),
                ));
            }
            let Some(authority) = &self.service_account_tokens else {
                return Err(ApiError::Unauthenticated(
                    "service_account_token: this controller accepts no Kubernetes tokens (start it with --k8s-jwks or --k8s-discovery)".into(),
                ));
            };
            let refused = |e: crate::k8s::TokenError| {
                ApiError::Unauthenticated(format!("service_account_token: {e}"))
            };
            let sa = authority
                .verify(service_account_token, now().unix_timestamp())
                .await
                .map_err(refused)?;
            let id = sa.spiffe_id(&self.trust_domain).map_err(refused)?;
            Some((id, format!("k8s-sa:{}/{}", sa.namespace, sa.name)))
        };
        self.retrying(|| self.ca.certify(csr_pem, join_token, verified.clone(), peer))
            .await
    }

    /// The Kubernetes token settings, when this controller takes service-account tokens.
    pub fn service_account_tokens(&self) -> Option<Arc<crate::k8s::TokenAuthority>> {
        self.service_account_tokens.clone()
    }

    /// Node gateway: signs a CSR for `workload`, asked by the node authenticated as `peer` (its own
    /// mesh certificate), if the workload's Identity resource places it on that node
    /// ([`crate::ca::rules::may_certify_for_node`]); refused otherwise, and for a revoked node.
    pub async fn certify_for_node(
        &self,
        csr_pem: &str,
        workload: &str,
        peer: Option<&PeerInfo>,
    ) -> Result<Issued, ApiError> {
        let Some(node) = peer.and_then(|p| p.spiffe_id.clone()) else {
            return Err(ApiError::Unauthenticated(
                "workload_spiffe_id: a node asks with its own mesh certificate (mTLS), not a token"
                    .into(),
            ));
        };
        let workload: SpiffeId = workload.parse().map_err(|e| {
            ApiError::Invalid(crate::model::FieldError::new(
                "workload_spiffe_id",
                format!("{e}"),
            ))
        })?;
        if self.is_revoked(&node)? {
            return Err(ApiError::PermissionDenied(format!(
                "identity {node} is revoked"
            )));
        }
        let key = crate::model::key_of(
            crate::model::Kind::Identity,
            workload.namespace(),
            workload.service_account(),
        );
        let placement = match self.resources.get(crate::model::Kind::Identity, &key)? {
            Some(crate::model::Resource::Identity(o)) => Some(o.spec),
            _ => None,
        };
        crate::ca::rules::may_certify_for_node(&node, &workload, placement.as_ref())
            .map_err(|r| ApiError::PermissionDenied(r.to_string()))?;
        let credential = format!("node:{node}");
        self.retrying(|| {
            self.ca.certify(
                csr_pem,
                "",
                Some((workload.clone(), credential.clone())),
                peer,
            )
        })
        .await
    }

    /// The newest issued certificates, newest first.
    pub async fn list_issued(&self, limit: usize) -> Result<Vec<AuditRecord>, ApiError> {
        self.ca.list_issued(limit)
    }

    /// The CA status.
    pub fn ca_status(&self) -> CaStatus {
        self.ca.status()
    }

    /// Starts a root rotation and publishes the new bundle.
    pub async fn rotate_root(self: &Arc<Self>) -> Result<CaStatus, ApiError> {
        let status = self.retrying(|| self.ca.rotate_root()).await?;
        self.publish().await?;
        Ok(status)
    }

    /// Periodic work: root retirement and serving certificate renewal, and pruning once a minute.
    pub async fn tick(self: &Arc<Self>) -> Result<(), ApiError> {
        let t = now();
        if self.retrying(|| self.ca.tick(t)).await? {
            self.publish().await?;
        }
        let due = {
            let mut last = self.last_prune.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|l| l.elapsed() >= PRUNE_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            self.prune(t).await?;
        }
        Ok(())
    }

    /// Prunes dead join tokens and old audit records as of `t`.
    pub async fn prune(&self, t: OffsetDateTime) -> Result<Pruned, ApiError> {
        self.retrying(|| self.ca.prune(t)).await
    }

    /// Records (or refreshes) the caller's endpoint, held live by the caller's connection `connection`
    /// (see [`PeerInfo::connection`]; 0: none, the endpoint is withdrawn after the grace).
    pub async fn register_endpoint(
        self: &Arc<Self>,
        obj: Object<EndpointSpec>,
        peer: &SpiffeId,
        connection: u64,
    ) -> Result<u64, ApiError> {
        if self.is_revoked(peer)? {
            return Err(ApiError::PermissionDenied(format!(
                "identity {peer} is revoked"
            )));
        }
        let (key, version) = self
            .retrying(|| self.resources.register_endpoint(obj.clone(), peer))
            .await?;
        self.registry
            .hold_endpoint(&key, peer, version, connection, Instant::now());
        self.publish().await?;
        Ok(version)
    }

    /// Withdraws an endpoint `peer` registered; the version without it (0 if there was none).
    pub async fn deregister_endpoint(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        peer: &SpiffeId,
    ) -> Result<u64, ApiError> {
        let removed = self
            .retrying(|| self.resources.deregister_endpoint(namespace, name, peer))
            .await?;
        let namespace = if namespace.is_empty() {
            peer.namespace()
        } else {
            namespace
        };
        match removed {
            Some(v) => {
                self.registry
                    .release_endpoint(&crate::model::key_of(Kind::Endpoint, namespace, name), None);
                self.publish().await?;
                Ok(v)
            }
            None => Ok(0),
        }
    }

    /// How long an endpoint outlives the connection of the proxy that registered it.
    pub fn endpoint_grace(&self) -> Duration {
        self.endpoint_grace
    }

    /// Withdraws the endpoints whose proxy's connection went at least the grace before `now`, each
    /// only if it is still the record that proxy registered. Returns how many were withdrawn.
    pub async fn expire_endpoints(self: &Arc<Self>, now: Instant) -> Result<usize, ApiError> {
        let mut withdrawn = 0;
        for e in self.registry.expired_endpoints(now, self.endpoint_grace) {
            let removed = self
                .retrying(|| {
                    self.resources
                        .withdraw_endpoint(&e.key, &e.spiffe_id, e.version)
                })
                .await?;
            self.registry.release_endpoint(&e.key, Some(e.version));
            match removed {
                Some(v) => {
                    withdrawn += 1;
                    tracing::info!(
                        endpoint = %e.key, id = %e.spiffe_id, version = v,
                        "endpoint withdrawn: the proxy that registered it disconnected"
                    );
                }
                None => tracing::debug!(
                    endpoint = %e.key,
                    "endpoint not withdrawn: registered again or removed meanwhile"
                ),
            }
        }
        if withdrawn > 0 {
            self.publish().await?;
        }
        Ok(withdrawn)
    }

    /// Admits a Watch stream of `id`.
    pub fn watch(
        &self,
        name: &str,
        peer: &PeerInfo,
        id: &SpiffeId,
    ) -> Result<WatchGuard, ApiError> {
        self.registry
            .watch(
                name,
                peer.remote,
                id,
                peer.cert_not_after_unix.unwrap_or(0),
                now().unix_timestamp(),
            )
            .map_err(|r| match r {
                WatchRefusal::TooMany { .. } => ApiError::ResourceExhausted(r.to_string()),
                WatchRefusal::Revoked(_) => ApiError::PermissionDenied(r.to_string()),
            })
    }

    /// Connected proxies.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.registry.proxies()
    }
}

fn revoked_set(snap: &Snapshot) -> HashSet<SpiffeId> {
    snap.revoked_spiffe_ids
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}
