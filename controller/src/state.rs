//! The controller's state and every operation on it, independent of the gRPC layer.
//!
//! All writes go through here: each is validated first, then checked against the current data and applied
//! as one atomic store batch under a single write lock (so "single use", "create if absent" and "update if
//! still at version N" hold under concurrency), then flushed outside the lock (so concurrent writers share
//! flushes) and only then acknowledged. Writes that change what proxies see publish a new [`pb::Snapshot`]
//! on a watch channel; each Watch stream sends the newest one it has not sent.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use quicmesh_proto::controller as pb;
use quicmesh_transport::identity::SpiffeId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::{
    api::convert,
    auth::{self, PeerInfo},
    error::ApiError,
    issuer::{Issuer, RootRecord},
    model::{self, FieldError, IdentitySpec, Kind, Metadata, Object, Resource, TrustDomainSpec},
    store::{self, Op, SledStore, Store, StoreError, Tree},
    tls,
};

/// Default leaf lifetime (SPIRE's default).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(3600);
/// Default trust domain of a new mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "quicmesh.local";
/// Default and longest join token lifetime.
const DEFAULT_TOKEN_TTL: u64 = 3600;
/// Lifetime of the controller's own serving certificate; renewed at half-life and at root rotation.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Name of the trust bundle file written into the data directory.
pub const BUNDLE_FILE: &str = "trust-bundle.pem";

/// What the controller needs to open its state.
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// Data directory (sled files and the trust bundle).
    pub data_dir: PathBuf,
    /// Trust domain for a new mesh; if set on an existing one it must match.
    pub trust_domain: Option<String>,
    /// Leaf lifetime; if set, replaces the stored setting.
    pub leaf_ttl: Option<Duration>,
    /// Operator root `(cert_pem, key_pem)`, used when the store has no root yet.
    pub root_pem: Option<(String, String)>,
    /// Extra DNS names or IPs for the serving certificate.
    pub tls_names: Vec<String>,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store failed to open or write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CA operation failed.
    #[error(transparent)]
    Issue(#[from] crate::issuer::IssueError),
    /// A setting conflicts with the data directory or is invalid.
    #[error("{0}")]
    Config(String),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A join token as stored: the hash of the secret, never the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the whole token, hex.
    pub sha256: String,
    /// Identity it grants.
    pub spiffe_id: String,
    /// Creation, Unix seconds.
    pub created_unix: i64,
    /// Expiry, Unix seconds.
    pub expires_unix: i64,
    /// Usable more than once (until expiry).
    pub reusable: bool,
    /// Successful uses.
    pub uses: u32,
    /// Revoked by an operator.
    pub revoked: bool,
}

/// One issued certificate in the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Serial, hex.
    pub serial_hex: String,
    /// Identity.
    pub spiffe_id: String,
    /// Issue time.
    pub issued_unix: i64,
    /// Expiry.
    pub not_after_unix: i64,
    /// `join-token:<id>` or `mtls`.
    pub credential: String,
    /// Signing root.
    pub root_fingerprint: String,
    /// Caller address.
    pub peer_address: String,
}

/// How a resource write treats an existing resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Must not exist.
    Create,
    /// Must exist.
    Update,
    /// Either.
    Apply,
}

struct Serving {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// The controller: store, CA, published snapshot, connected proxies.
pub struct State {
    store: Arc<dyn Store>,
    write: tokio::sync::Mutex<()>,
    trust_domain: String,
    leaf_ttl_secs: AtomicU64,
    issuer: Mutex<Issuer>,
    admin_sha256: String,
    snapshot: watch::Sender<Arc<pb::Snapshot>>,
    proxies: Mutex<HashMap<u64, pb::ProxyStatus>>,
    next_proxy: AtomicU64,
    tls_names: Vec<String>,
    serving: Mutex<Serving>,
    tls_config: RwLock<Arc<rustls::ServerConfig>>,
    data_dir: PathBuf,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("trust_domain", &self.trust_domain)
            .field("revision", &self.store.revision())
            .finish_non_exhaustive()
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(|e| ApiError::Internal(format!("encode: {e}")))
}

fn decode<T: for<'de> Deserialize<'de>>(
    tree: &'static str,
    key: &str,
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_owned(),
        problem: e.to_string(),
    })
}

/// The tree that holds resources of `kind`.
pub fn tree_of(kind: Kind) -> Tree {
    match kind {
        Kind::TrustDomain => Tree::TrustDomains,
        Kind::Identity => Tree::Identities,
        Kind::Service => Tree::Services,
        Kind::Endpoint => Tree::Endpoints,
        Kind::Policy => Tree::Policies,
    }
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

fn write_bundle(dir: &Path, bundle: &[String]) -> Result<(), std::io::Error> {
    let tmp = dir.join(format!("{BUNDLE_FILE}.tmp"));
    std::fs::write(&tmp, bundle.concat())?;
    std::fs::rename(tmp, dir.join(BUNDLE_FILE))
}

impl State {
    /// Opens the data directory, initialising a new mesh on first start. Returns the admin token when one
    /// was created (first start only: it is never shown again).
    pub fn open(opts: StateOptions) -> Result<(Arc<State>, Option<String>), StartError> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|source| StartError::Io {
            path: opts.data_dir.clone(),
            source,
        })?;
        let store = SledStore::open(&opts.data_dir.join("db"))?;
        let t = now();
        let mut ops = Vec::new();

        let stored_td: Option<Resource> = store
            .get(Tree::TrustDomains, "default")?
            .map(|v| decode("trust_domains", "default", &v))
            .transpose()?;
        let (trust_domain, mut leaf_ttl) = match stored_td {
            Some(Resource::TrustDomain(o)) => {
                if let Some(td) = &opts.trust_domain
                    && *td != o.spec.trust_domain
                {
                    return Err(StartError::Config(format!(
                        "--trust-domain {td} does not match the data directory's trust domain {}",
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
                serde_json::to_vec(&r).map_err(|e| StartError::Config(e.to_string()))?,
            ));
        }

        let mut roots: Vec<RootRecord> = store
            .scan(Tree::Roots, "", false, usize::MAX)?
            .into_iter()
            .map(|(k, v)| decode("roots", &k, &v))
            .collect::<Result<_, _>>()?;
        if let Some((cert, key)) = &opts.root_pem {
            let given = Issuer::load_root(cert, key, t)?;
            if roots.is_empty() {
                roots.push(given);
            } else if !roots.iter().any(|r| r.fingerprint == given.fingerprint) {
                return Err(StartError::Config(
                    "the data directory already has a root CA; --root-cert only applies to a new mesh (rotate with `quicmesh ctl rotate-root`)".into(),
                ));
            }
        }
        if roots.is_empty() {
            roots.push(Issuer::generate_root(&trust_domain, t)?);
        }
        for r in &roots {
            if store.get(Tree::Roots, &r.fingerprint)?.is_none() {
                ops.push(Op::Put(
                    Tree::Roots,
                    r.fingerprint.clone(),
                    serde_json::to_vec(r).map_err(|e| StartError::Config(e.to_string()))?,
                ));
            }
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
        if !ops.is_empty() {
            store.commit(ops)?;
        }

        let issuer = Issuer::from_records(roots)?;
        let (cert, key, not_after) =
            issuer.serving_cert(&trust_domain, &opts.tls_names, t, SERVING_LIFETIME)?;
        let bundle = issuer.bundle(t);
        let tls_config = tls::server_config(&bundle, &cert, &key)?;
        write_bundle(&opts.data_dir, &bundle).map_err(|source| StartError::Io {
            path: opts.data_dir.join(BUNDLE_FILE),
            source,
        })?;
        let (snapshot, _) = watch::channel(Arc::new(pb::Snapshot::default()));
        let state = Arc::new(State {
            store: Arc::new(store),
            write: tokio::sync::Mutex::new(()),
            trust_domain,
            leaf_ttl_secs: AtomicU64::new(leaf_ttl),
            issuer: Mutex::new(issuer),
            admin_sha256,
            snapshot,
            proxies: Mutex::new(HashMap::new()),
            next_proxy: AtomicU64::new(1),
            tls_names: opts.tls_names,
            serving: Mutex::new(Serving {
                not_before: t,
                not_after,
            }),
            tls_config: RwLock::new(tls_config),
            data_dir: opts.data_dir,
        });
        let snap = state.build_snapshot()?;
        state.snapshot.send_replace(Arc::new(snap));
        Ok((state, admin_token))
    }

    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Current leaf lifetime.
    pub fn leaf_ttl(&self) -> Duration {
        Duration::from_secs(self.leaf_ttl_secs.load(Ordering::Relaxed))
    }

    /// SHA-256 of the admin token.
    pub fn admin_sha256(&self) -> &str {
        &self.admin_sha256
    }

    /// Current store revision.
    pub fn revision(&self) -> u64 {
        self.store.revision()
    }

    /// The TLS configuration new connections use.
    pub fn tls_config(&self) -> Arc<rustls::ServerConfig> {
        self.tls_config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The path of the trust bundle file.
    pub fn bundle_path(&self) -> PathBuf {
        self.data_dir.join(BUNDLE_FILE)
    }

    /// The trust bundle now.
    pub fn bundle(&self) -> Vec<String> {
        self.issuer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bundle(now())
    }

    /// A receiver of snapshots, holding the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<pb::Snapshot>> {
        self.snapshot.subscribe()
    }

    fn lock_issuer(&self) -> std::sync::MutexGuard<'_, Issuer> {
        self.issuer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn list_resources(&self, kind: Kind, namespace: &str) -> Result<Vec<Resource>, StoreError> {
        let prefix = if namespace.is_empty() || !kind.namespaced() {
            String::new()
        } else {
            format!("{namespace}/")
        };
        let name = tree_name(kind);
        self.store
            .scan(tree_of(kind), &prefix, false, usize::MAX)?
            .into_iter()
            .map(|(k, v)| decode(name, &k, &v))
            .collect()
    }

    fn get_resource(&self, kind: Kind, key: &str) -> Result<Option<Resource>, StoreError> {
        self.store
            .get(tree_of(kind), key)?
            .map(|v| decode(tree_name(kind), key, &v))
            .transpose()
    }

    fn build_snapshot(&self) -> Result<pb::Snapshot, StoreError> {
        let mut snap = pb::Snapshot {
            version: self.store.revision(),
            trust_domain: self.trust_domain.clone(),
            trust_bundle_pem: self.bundle(),
            ..Default::default()
        };
        for r in self.list_resources(Kind::Service, "")? {
            if let Resource::Service(o) = r {
                snap.services.push(convert::service_to_pb(&o));
            }
        }
        for r in self.list_resources(Kind::Endpoint, "")? {
            if let Resource::Endpoint(o) = r {
                snap.endpoints.push(convert::endpoint_to_pb(&o));
            }
        }
        for r in self.list_resources(Kind::Policy, "")? {
            if let Resource::Policy(o) = r {
                snap.policies.push(convert::policy_to_pb(&o));
            }
        }
        for r in self.list_resources(Kind::Identity, "")? {
            if let Resource::Identity(o) = r
                && o.spec.revoked
            {
                snap.revoked_spiffe_ids.push(format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    self.trust_domain, o.metadata.namespace, o.metadata.name
                ));
            }
        }
        Ok(snap)
    }

    /// Rebuilds the snapshot and publishes it to every watcher.
    async fn publish(self: &Arc<Self>) -> Result<(), ApiError> {
        let this = self.clone();
        let snap = blocking(move || this.build_snapshot()).await?;
        // Several writers may publish concurrently; never replace a newer snapshot with an older one.
        self.snapshot.send_if_modified(|cur| {
            if snap.version >= cur.version {
                *cur = Arc::new(snap);
                true
            } else {
                false
            }
        });
        Ok(())
    }

    /// Applies `ops` (under the write lock held by the caller), then flushes after the lock is released.
    async fn commit(
        self: &Arc<Self>,
        guard: tokio::sync::MutexGuard<'_, ()>,
        ops: Vec<Op>,
    ) -> Result<u64, ApiError> {
        let store = self.store.clone();
        let rev = blocking(move || store.apply(ops)).await?;
        drop(guard);
        let store = self.store.clone();
        blocking(move || store.sync()).await?;
        Ok(rev)
    }

    // ----- resources -----

    /// Creates, updates or applies a resource.
    pub async fn put(
        self: &Arc<Self>,
        mut r: Resource,
        mode: WriteMode,
    ) -> Result<Resource, ApiError> {
        r.validate(&self.trust_domain)?;
        let kind = r.kind();
        let key = r.key();
        let guard = self.write.lock().await;
        let existing = self.get_resource(kind, &key)?;
        let label = format!("{kind} {key}");
        match (&existing, mode) {
            (Some(_), WriteMode::Create) => return Err(ApiError::AlreadyExists(label)),
            (None, WriteMode::Update) => return Err(ApiError::NotFound(label)),
            _ => {}
        }
        let asked = r.metadata().version;
        if asked != 0 {
            let have = existing.as_ref().map(|e| e.metadata().version).unwrap_or(0);
            if have != asked {
                return Err(ApiError::FailedPrecondition(format!(
                    "{label} is at version {have}, not {asked}: read it again and retry"
                )));
            }
        }
        if let (Resource::Identity(new), Some(Resource::Identity(old))) = (&mut r, &existing)
            && old.spec.revoked
        {
            if !new.spec.revoked {
                return Err(FieldError::new(
                    "spec.revoked",
                    "a revoked identity stays revoked; delete it and create it again to reuse the name",
                )
                .into());
            }
            new.spec.revoked_unix = old.spec.revoked_unix;
        }
        let t = now().unix_timestamp();
        let m = r.metadata_mut();
        m.version = self.store.revision() + 1;
        m.created_unix = existing
            .as_ref()
            .map(|e| e.metadata().created_unix)
            .unwrap_or(t);
        m.updated_unix = t;
        let ops = vec![Op::Put(tree_of(kind), key, json(&r)?)];
        self.commit(guard, ops).await?;
        if let Resource::TrustDomain(o) = &r {
            self.leaf_ttl_secs
                .store(o.spec.leaf_ttl_seconds, Ordering::Relaxed);
        }
        self.publish().await?;
        Ok(r)
    }

    /// One resource.
    pub async fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Resource, ApiError> {
        let key = model::key_of(kind, namespace, name);
        self.get_resource(kind, &key)?
            .ok_or_else(|| ApiError::NotFound(format!("{kind} {key}")))
    }

    /// Every resource of `kind`, in `namespace` or all.
    pub async fn list(&self, kind: Kind, namespace: &str) -> Result<Vec<Resource>, ApiError> {
        Ok(self.list_resources(kind, namespace)?)
    }

    /// Deletes a resource; returns the store revision of the delete.
    pub async fn delete(
        self: &Arc<Self>,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<u64, ApiError> {
        if kind == Kind::TrustDomain {
            return Err(ApiError::FailedPrecondition(
                "the trust domain settings cannot be deleted".into(),
            ));
        }
        model::check_name("namespace", namespace)?;
        model::check_name("name", name)?;
        let key = model::key_of(kind, namespace, name);
        let guard = self.write.lock().await;
        if self.get_resource(kind, &key)?.is_none() {
            return Err(ApiError::NotFound(format!("{kind} {key}")));
        }
        let rev = self
            .commit(guard, vec![Op::Delete(tree_of(kind), key)])
            .await?;
        self.publish().await?;
        Ok(rev)
    }

    // ----- identities and tokens -----

    fn identity_id(&self, namespace: &str, sa: &str) -> Result<SpiffeId, ApiError> {
        model::check_name("namespace", namespace)?;
        model::check_name("service_account", sa)?;
        if namespace == model::SYSTEM_NAMESPACE {
            return Err(FieldError::new(
                "namespace",
                format!("{namespace} is reserved for the controller"),
            )
            .into());
        }
        SpiffeId::new(&self.trust_domain, namespace, sa)
            .map_err(|e| FieldError::new("service_account", e.to_string()).into())
    }

    /// Creates a join token for `namespace/sa`, creating the identity if it does not exist.
    pub async fn create_token(
        self: &Arc<Self>,
        namespace: &str,
        sa: &str,
        ttl_seconds: u64,
        reusable: bool,
    ) -> Result<(String, TokenRecord), ApiError> {
        let id = self.identity_id(namespace, sa)?;
        let ttl = if ttl_seconds == 0 {
            DEFAULT_TOKEN_TTL
        } else {
            ttl_seconds
        };
        if ttl > model::MAX_LEAF_TTL_SECONDS {
            return Err(FieldError::new(
                "ttl_seconds",
                format!(
                    "must be at most {} (30 days), got {ttl}",
                    model::MAX_LEAF_TTL_SECONDS
                ),
            )
            .into());
        }
        let key = model::key_of(Kind::Identity, namespace, sa);
        let guard = self.write.lock().await;
        let mut ops = Vec::new();
        let t = now().unix_timestamp();
        match self.get_resource(Kind::Identity, &key)? {
            Some(Resource::Identity(o)) if o.spec.revoked => {
                return Err(ApiError::FailedPrecondition(format!(
                    "identity {id} is revoked"
                )));
            }
            Some(_) => {}
            None => {
                let r = Resource::Identity(Object {
                    metadata: Metadata {
                        name: sa.into(),
                        namespace: namespace.into(),
                        version: self.store.revision() + 1,
                        created_unix: t,
                        updated_unix: t,
                    },
                    spec: IdentitySpec::default(),
                });
                ops.push(Op::Put(Tree::Identities, key, json(&r)?));
            }
        }
        let (token_id, token) = auth::new_join_token();
        let rec = TokenRecord {
            id: token_id.clone(),
            sha256: auth::sha256_hex(token.as_bytes()),
            spiffe_id: id.to_string(),
            created_unix: t,
            expires_unix: t.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)),
            reusable,
            uses: 0,
            revoked: false,
        };
        ops.push(Op::Put(Tree::Tokens, token_id, json(&rec)?));
        self.commit(guard, ops).await?;
        Ok((token, rec))
    }

    /// Revokes a join token by id.
    pub async fn revoke_token(self: &Arc<Self>, id: &str) -> Result<TokenRecord, ApiError> {
        if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FieldError::new(
                "id",
                format!("{id:?} is not a join token id (12 hex digits)"),
            )
            .into());
        }
        let guard = self.write.lock().await;
        let mut rec: TokenRecord = match self.store.get(Tree::Tokens, id)? {
            Some(v) => decode("tokens", id, &v)?,
            None => return Err(ApiError::NotFound(format!("join token {id}"))),
        };
        rec.revoked = true;
        self.commit(
            guard,
            vec![Op::Put(Tree::Tokens, id.to_owned(), json(&rec)?)],
        )
        .await?;
        Ok(rec)
    }

    /// Every join token (hashes only).
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, ApiError> {
        Ok(self
            .store
            .scan(Tree::Tokens, "", false, usize::MAX)?
            .into_iter()
            .map(|(k, v)| decode("tokens", &k, &v))
            .collect::<Result<_, _>>()?)
    }

    /// Revokes an identity: no more certificates, and peers learn it from the next snapshot.
    pub async fn revoke_identity(
        self: &Arc<Self>,
        namespace: &str,
        sa: &str,
    ) -> Result<Resource, ApiError> {
        self.identity_id(namespace, sa)?;
        let key = model::key_of(Kind::Identity, namespace, sa);
        let guard = self.write.lock().await;
        let Some(Resource::Identity(mut o)) = self.get_resource(Kind::Identity, &key)? else {
            return Err(ApiError::NotFound(format!("Identity {key}")));
        };
        let t = now().unix_timestamp();
        if !o.spec.revoked {
            o.spec.revoked = true;
            o.spec.revoked_unix = t;
        }
        o.metadata.version = self.store.revision() + 1;
        o.metadata.updated_unix = t;
        let r = Resource::Identity(o);
        self.commit(guard, vec![Op::Put(Tree::Identities, key, json(&r)?)])
            .await?;
        self.publish().await?;
        Ok(r)
    }

    fn is_revoked(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        let key = model::key_of(Kind::Identity, id.namespace(), id.service_account());
        Ok(matches!(
            self.get_resource(Kind::Identity, &key)?,
            Some(Resource::Identity(o)) if o.spec.revoked
        ))
    }

    // ----- certificates -----

    /// Signs a CSR for the identity granted by a join token or by the caller's mesh certificate.
    pub async fn certify(
        self: &Arc<Self>,
        csr_pem: &str,
        join_token: &str,
        peer: Option<&PeerInfo>,
    ) -> Result<pb::CertifyResponse, ApiError> {
        let guard = self.write.lock().await;
        let t = now();
        let mut ops = Vec::new();
        let (granted, credential) = if !join_token.is_empty() {
            let id =
                auth::join_token_id(join_token).map_err(|m| ApiError::Unauthenticated(m.into()))?;
            let invalid = || ApiError::Unauthenticated("join_token: not valid".into());
            let mut rec: TokenRecord = match self.store.get(Tree::Tokens, id)? {
                Some(v) => decode("tokens", id, &v)?,
                None => return Err(invalid()),
            };
            if !auth::constant_time_eq(&auth::sha256_hex(join_token.as_bytes()), &rec.sha256) {
                return Err(invalid());
            }
            if rec.revoked {
                return Err(ApiError::Unauthenticated(format!(
                    "join_token: {id} was revoked"
                )));
            }
            if t.unix_timestamp() > rec.expires_unix {
                return Err(ApiError::Unauthenticated(format!(
                    "join_token: {id} has expired"
                )));
            }
            if !rec.reusable && rec.uses > 0 {
                return Err(ApiError::Unauthenticated(format!(
                    "join_token: {id} was already used (single use)"
                )));
            }
            let granted: SpiffeId = rec
                .spiffe_id
                .parse()
                .map_err(|e| ApiError::Internal(format!("stored token identity: {e}")))?;
            rec.uses = rec.uses.saturating_add(1);
            ops.push(Op::Put(Tree::Tokens, id.to_owned(), json(&rec)?));
            (granted, format!("join-token:{id}"))
        } else if let Some(id) = peer.and_then(|p| p.spiffe_id.clone()) {
            (id, "mtls".to_owned())
        } else {
            return Err(ApiError::Unauthenticated(
                "Certify needs a join_token or a mesh client certificate".into(),
            ));
        };
        if granted.namespace() == model::SYSTEM_NAMESPACE {
            return Err(ApiError::PermissionDenied(format!(
                "{granted} is reserved for the controller"
            )));
        }
        if self.is_revoked(&granted)? {
            return Err(ApiError::PermissionDenied(format!(
                "identity {granted} is revoked"
            )));
        }
        let (signed, root) = self
            .lock_issuer()
            .sign(csr_pem, &granted, t, self.leaf_ttl())?;
        ops.push(Op::Put(Tree::Roots, root.fingerprint.clone(), json(&root)?));
        let audit = AuditRecord {
            serial_hex: signed.serial_hex.clone(),
            spiffe_id: granted.to_string(),
            issued_unix: t.unix_timestamp(),
            not_after_unix: signed.not_after.unix_timestamp(),
            credential,
            root_fingerprint: signed.root_fingerprint.clone(),
            peer_address: peer.map(|p| p.remote.to_string()).unwrap_or_default(),
        };
        ops.push(Op::Put(
            Tree::Audit,
            format!("{:020}", self.store.revision() + 1),
            json(&audit)?,
        ));
        self.commit(guard, ops).await?;
        tracing::info!(spiffe_id = %granted, serial = %signed.serial_hex, credential = %audit.credential, "issued certificate");
        Ok(pb::CertifyResponse {
            cert_chain_pem: vec![signed.cert_pem],
            trust_bundle_pem: self.bundle(),
            spiffe_id: granted.to_string(),
            not_before_unix: signed.not_before.unix_timestamp(),
            not_after_unix: signed.not_after.unix_timestamp(),
            serial_hex: signed.serial_hex,
        })
    }

    /// The newest issued certificates, newest first.
    pub async fn list_issued(&self, limit: usize) -> Result<Vec<AuditRecord>, ApiError> {
        Ok(self
            .store
            .scan(Tree::Audit, "", true, limit)?
            .into_iter()
            .map(|(k, v)| decode("audit", &k, &v))
            .collect::<Result<_, _>>()?)
    }

    /// The CA status.
    pub fn ca_status(&self) -> pb::CaStatusResponse {
        let issuer = self.lock_issuer();
        pb::CaStatusResponse {
            trust_domain: self.trust_domain.clone(),
            roots: issuer
                .roots()
                .iter()
                .map(|r| pb::RootInfo {
                    fingerprint: r.fingerprint.clone(),
                    not_after_unix: r.not_after_unix,
                    active: r.active,
                    retire_after_unix: if r.active {
                        0
                    } else {
                        r.max_leaf_not_after_unix
                    },
                })
                .collect(),
            leaf_ttl_seconds: self.leaf_ttl().as_secs(),
            server_time_unix: now().unix_timestamp(),
        }
    }

    /// Starts a root rotation.
    pub async fn rotate_root(self: &Arc<Self>) -> Result<pb::CaStatusResponse, ApiError> {
        let guard = self.write.lock().await;
        let t = now();
        let new = Issuer::generate_root(&self.trust_domain, t)?;
        let changed = self.lock_issuer().rotate_to(new)?;
        let ops = changed
            .iter()
            .map(|r| Ok(Op::Put(Tree::Roots, r.fingerprint.clone(), json(r)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        self.commit(guard, ops).await?;
        tracing::info!(
            "root rotated: new root signs, old root stays in the bundle until its leaves expire"
        );
        self.renew_serving_cert(t)?;
        self.bundle_changed().await?;
        Ok(self.ca_status())
    }

    fn renew_serving_cert(&self, t: OffsetDateTime) -> Result<(), ApiError> {
        let issuer = self.lock_issuer();
        let (cert, key, not_after) =
            issuer.serving_cert(&self.trust_domain, &self.tls_names, t, SERVING_LIFETIME)?;
        let cfg = tls::server_config(&issuer.bundle(t), &cert, &key)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        drop(issuer);
        *self.tls_config.write().unwrap_or_else(|e| e.into_inner()) = cfg;
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Serving {
            not_before: t,
            not_after,
        };
        Ok(())
    }

    async fn bundle_changed(self: &Arc<Self>) -> Result<(), ApiError> {
        let bundle = self.bundle();
        write_bundle(&self.data_dir, &bundle)
            .map_err(|e| ApiError::Internal(format!("trust bundle file: {e}")))?;
        self.publish().await
    }

    /// Periodic work: retire roots whose leaves all expired, renew the serving certificate at half-life.
    pub async fn tick(self: &Arc<Self>) -> Result<(), ApiError> {
        let t = now();
        let guard = self.write.lock().await;
        let gone = self.lock_issuer().take_retired(t);
        if !gone.is_empty() {
            let ops = gone
                .iter()
                .map(|r| Op::Delete(Tree::Roots, r.fingerprint.clone()))
                .collect();
            self.commit(guard, ops).await?;
            for r in &gone {
                tracing::info!(fingerprint = %r.fingerprint, "retired root left the trust bundle");
            }
            self.renew_serving_cert(t)?;
            self.bundle_changed().await?;
        } else {
            drop(guard);
            let renew = {
                let s = self.serving.lock().unwrap_or_else(|e| e.into_inner());
                t > s.not_before + (s.not_after - s.not_before) / 2
            };
            if renew {
                self.renew_serving_cert(t)?;
            }
        }
        Ok(())
    }

    // ----- proxies -----

    /// Records (or refreshes) the caller's endpoint. The identity and namespace come from its certificate.
    pub async fn register_endpoint(
        self: &Arc<Self>,
        e: pb::Endpoint,
        peer: &SpiffeId,
    ) -> Result<u64, ApiError> {
        let mut obj = convert::endpoint_from_pb("endpoint", e)?;
        if obj.metadata.namespace.is_empty() {
            obj.metadata.namespace = peer.namespace().to_owned();
        }
        if obj.metadata.namespace != peer.namespace() {
            return Err(ApiError::PermissionDenied(format!(
                "endpoint.metadata.namespace: {peer} may only register endpoints in namespace {}",
                peer.namespace()
            )));
        }
        if !obj.spec.spiffe_id.is_empty() && obj.spec.spiffe_id != peer.as_str() {
            return Err(ApiError::PermissionDenied(format!(
                "endpoint.spiffe_id: must be the caller's identity {peer}"
            )));
        }
        obj.spec.spiffe_id = peer.to_string();
        obj.metadata.version = 0;
        let key = model::key_of(Kind::Endpoint, &obj.metadata.namespace, &obj.metadata.name);
        if let Some(Resource::Endpoint(old)) = self.get_resource(Kind::Endpoint, &key)?
            && old.spec.spiffe_id != peer.as_str()
        {
            return Err(ApiError::PermissionDenied(format!(
                "endpoint {key} belongs to {}",
                old.spec.spiffe_id
            )));
        }
        let r = self.put(Resource::Endpoint(obj), WriteMode::Apply).await?;
        Ok(r.metadata().version)
    }

    /// Adds a connected proxy; it is listed until the returned guard drops.
    pub fn proxy_connected(
        self: &Arc<Self>,
        name: &str,
        peer: &PeerInfo,
        id: &SpiffeId,
    ) -> ProxyGuard {
        let key = self.next_proxy.fetch_add(1, Ordering::Relaxed);
        let status = pb::ProxyStatus {
            proxy_name: name.chars().take(128).collect(),
            spiffe_id: id.to_string(),
            peer_address: peer.remote.to_string(),
            config_version: 0,
            connected_unix: now().unix_timestamp(),
            cert_not_after_unix: peer.cert_not_after_unix.unwrap_or(0),
        };
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, status);
        ProxyGuard {
            state: self.clone(),
            key,
        }
    }

    /// Connected proxies.
    pub fn proxies(&self) -> Vec<pb::ProxyStatus> {
        let mut v: Vec<_> = self
            .proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            a.proxy_name
                .cmp(&b.proxy_name)
                .then(a.peer_address.cmp(&b.peer_address))
        });
        v
    }
}

fn tree_name(kind: Kind) -> &'static str {
    match kind {
        Kind::TrustDomain => "trust_domains",
        Kind::Identity => "identities",
        Kind::Service => "services",
        Kind::Endpoint => "endpoints",
        Kind::Policy => "policies",
    }
}

/// Keeps a proxy in the connected list while a Watch stream lives.
pub struct ProxyGuard {
    state: Arc<State>,
    key: u64,
}

impl std::fmt::Debug for ProxyGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyGuard")
            .field("key", &self.key)
            .finish()
    }
}

impl ProxyGuard {
    /// Records the config version last sent to the proxy.
    pub fn sent(&self, version: u64) {
        if let Some(p) = self
            .state
            .proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.key)
        {
            p.config_version = version;
        }
    }
}

impl Drop for ProxyGuard {
    fn drop(&mut self) {
        self.state
            .proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}
