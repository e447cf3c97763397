//! The controller's certificate authority at work: join tokens, issuance, the audit log, the roots and
//! the controller's own serving certificate, and pruning of what is old.
//!
//! Decisions are the pure functions of [`rules`] (token validity, who may get which identity, retention)
//! and of [`crate::issuer`] (what a CSR may contain, the roots' lifecycle); this module reads the records
//! they need under the store's write lock, asks, and writes the outcome as one batch, flushed before the
//! answer. Issuance is built for rate: the credential is checked and the CSR signed without the lock
//! (on the runtime's workers, so certificates are signed in parallel, one per core), then the leaf
//! joins a queue; one committer task at a time takes the write lock, checks every queued leaf's
//! credential again (a single-use token spent meanwhile, by another controller or by an earlier leaf
//! of the same group, refuses it) and commits the group as one batch (group commit: one store write
//! and one flush for many audit records and token spends); leaves signed during that flush make the
//! next group, which waits a moment for the calls still being signed (a flush costs about the same
//! CPU for 5 leaves as for 30; a lone call is committed at once). Root private keys are sealed with
//! the key-encryption key before they are stored ([`crate::keystore`]).

pub mod rules;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use quicmesh_transport::identity::SpiffeId;
use time::OffsetDateTime;

use self::rules::{AuditRecord, TokenRecord};
use crate::{
    auth::{self, PeerInfo},
    error::{ApiError, StartError},
    issuer::{Issuer, RootRecord, Signed},
    keystore::Kek,
    model::{self, FieldError},
    resources::Resources,
    store::{self, Db, Op, Tree},
    tls,
};

/// Default and longest join token lifetime.
const DEFAULT_TOKEN_TTL: u64 = 3600;
/// Lifetime of the controller's own serving certificate; renewed at half-life and at root rotation.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Name of the trust bundle file written into the data directory.
pub const BUNDLE_FILE: &str = "trust-bundle.pem";
/// Audit records looked at per pruning round (oldest first), to bound one batch.
const PRUNE_BATCH: usize = 10_000;
/// Most certificates committed in one batch (each is up to two writes; etcd's `--max-txn-ops` is 128
/// by default).
const ISSUE_GROUP: usize = 32;
/// Longest the committer waits for more leaves before it commits a group that is not full (not for a
/// lone call, see [`rules::group_ready`]): a few sled flushes' time.
const GROUP_WAIT: Duration = Duration::from_millis(4);

/// How often a group is checked again on fresh data after another controller committed first.
const GROUP_RETRIES: usize = 8;

/// A group's batch, what it expects the records its checks read to hold, and each leaf's verdict.
struct GroupPlan {
    ops: Vec<Op>,
    expect: Vec<store::Expect>,
    verdicts: Vec<Result<(), ApiError>>,
}

/// A signed leaf waiting for its group commit.
struct Pending {
    /// The join token it spends, if any.
    token_id: Option<String>,
    granted: SpiffeId,
    signed: Signed,
    audit: AuditRecord,
    reply: tokio::sync::oneshot::Sender<Result<(), ApiError>>,
}

/// Signed leaves waiting for their group commit, and whether a committer task is at work on them.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    committing: bool,
}

/// An error of a group's commit, for each of its members (conflicts stay conflicts: they are retried).
fn group_error(e: &store::StoreError) -> ApiError {
    match e {
        store::StoreError::Conflict => ApiError::Store(store::StoreError::Conflict),
        store::StoreError::Unavailable(m) => {
            ApiError::Store(store::StoreError::Unavailable(m.clone()))
        }
        e => ApiError::Internal(e.to_string()),
    }
}

/// Answers every leaf of `group` with `e` (a store error as each member gets it from [`group_error`]).
fn refuse_all(group: Vec<Pending>, e: &ApiError) {
    for p in group {
        let answer = match e {
            ApiError::Store(s) => group_error(s),
            e => ApiError::Internal(e.to_string()),
        };
        let _ = p.reply.send(Err(answer));
    }
}

/// How long dead join tokens and audit records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// A spent, revoked or expired token is dropped this long after it stopped being usable.
    pub tokens: Duration,
    /// An audit record is dropped this long after its certificate expired.
    pub audit: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            tokens: Duration::from_secs(24 * 3600),
            audit: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// A signed certificate as handed to the caller.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf, PEM.
    pub cert_pem: String,
    /// The trust bundle now.
    pub trust_bundle_pem: Vec<String>,
    /// Identity.
    pub spiffe_id: String,
    /// Validity start, Unix seconds.
    pub not_before_unix: i64,
    /// Validity end, Unix seconds.
    pub not_after_unix: i64,
    /// Serial, hex.
    pub serial_hex: String,
}

/// One root as `ctl certs` shows it.
#[derive(Debug, Clone)]
pub struct RootStatus {
    /// Fingerprint.
    pub fingerprint: String,
    /// End of validity.
    pub not_after_unix: i64,
    /// Signs new leaves.
    pub active: bool,
    /// For a retired root, when it leaves the bundle.
    pub retire_after_unix: i64,
}

/// The CA's state for `ctl certs`.
#[derive(Debug, Clone)]
pub struct CaStatus {
    /// Trust domain.
    pub trust_domain: String,
    /// Roots.
    pub roots: Vec<RootStatus>,
    /// Leaf lifetime.
    pub leaf_ttl_seconds: u64,
    /// Controller clock.
    pub server_time_unix: i64,
}

/// What [`Ca::prune`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Join tokens.
    pub tokens: usize,
    /// Audit records.
    pub audit: usize,
}

struct Serving {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// The certificate authority.
pub struct Ca {
    db: Arc<Db>,
    resources: Arc<Resources>,
    kek: Kek,
    trust_domain: String,
    leaf_ttl_secs: AtomicU64,
    issuer: Mutex<Issuer>,
    tls_names: Vec<String>,
    serving: Mutex<Serving>,
    tls: tls::ServingConfig,
    data_dir: PathBuf,
    retention: Retention,
    /// Signed leaves waiting for the next group commit.
    queue: Mutex<Queue>,
    /// `Certify` calls received and not yet queued (or refused): leaves the committer may wait for.
    arriving: AtomicUsize,
    /// Woken when a leaf is queued or an arriving call ends.
    arrived: tokio::sync::Notify,
    /// This process's part of audit keys, so that controllers sharing a store never write the same one.
    audit_tag: String,
}

/// Counts a `Certify` call as arriving until it is queued or refused (dropped).
struct Arriving<'a>(&'a Ca);

impl<'a> Arriving<'a> {
    fn new(ca: &'a Ca) -> Self {
        ca.arriving.fetch_add(1, Ordering::AcqRel);
        Self(ca)
    }
}

impl Drop for Arriving<'_> {
    fn drop(&mut self) {
        self.0.arriving.fetch_sub(1, Ordering::AcqRel);
        self.0.arrived.notify_one();
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("kek", &self.kek)
            .finish_non_exhaustive()
    }
}

/// What [`Ca::open`] needs beyond the store.
#[derive(Debug)]
pub struct CaSettings {
    /// Data directory (trust bundle file).
    pub data_dir: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// Leaf lifetime, seconds.
    pub leaf_ttl_secs: u64,
    /// Operator root `(cert_pem, key_pem)` for a new mesh.
    pub root_pem: Option<(String, String)>,
    /// Extra names of the serving certificate.
    pub tls_names: Vec<String>,
    /// Retention of dead tokens and audit records.
    pub retention: Retention,
    /// KEK from the environment, if set.
    pub kek_env: Option<String>,
    /// KEK file.
    pub kek_file: PathBuf,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// `r` as stored: key sealed, no plain key.
fn stored_form(r: &RootRecord) -> RootRecord {
    RootRecord {
        key_pem: String::new(),
        ..r.clone()
    }
}

/// Writes the trust bundle file, owner-only, replacing the old one atomically.
pub fn write_bundle(dir: &Path, bundle: &[String]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{BUNDLE_FILE}.tmp"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::keystore::write_private(&tmp, bundle.concat().as_bytes())?;
    std::fs::rename(tmp, dir.join(BUNDLE_FILE))
}

impl Ca {
    /// Loads the roots (unsealing their keys; sealing any stored in plain by an older build), creates
    /// the first root of a new mesh, and issues the serving certificate. Returns the CA and the writes
    /// start-up must commit.
    pub fn open(
        db: Arc<Db>,
        resources: Arc<Resources>,
        s: CaSettings,
    ) -> Result<(Self, Vec<Op>), StartError> {
        let t = now();
        let mut roots: Vec<RootRecord> = db
            .scan(Tree::Roots, "", false, usize::MAX)?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let sealed_any = roots.iter().any(|r| !r.key_sealed.is_empty());
        let kek = Kek::load(s.kek_env.as_deref(), &s.kek_file, !sealed_any)?;
        let mut ops = Vec::new();
        for r in &mut roots {
            if !r.key_sealed.is_empty() {
                let plain = kek.open(&r.fingerprint, &r.key_sealed)?;
                r.key_pem = String::from_utf8(plain).map_err(|_| {
                    StartError::Config(format!("root {}: sealed key is not PEM", r.fingerprint))
                })?;
            } else if !r.key_pem.is_empty() {
                tracing::warn!(fingerprint = %r.fingerprint, "sealing a root key stored in plain by an older version; consider `quicmesh ctl rotate-root`, since old copies may stay in the database files until they are compacted");
                r.key_sealed = kek.seal(&r.fingerprint, r.key_pem.as_bytes())?;
                ops.push(Op::Put(
                    Tree::Roots,
                    r.fingerprint.clone(),
                    store::encode(&stored_form(r))?,
                ));
            } else {
                return Err(StartError::Config(format!(
                    "root {} in the store has no key",
                    r.fingerprint
                )));
            }
        }
        if let Some((cert, key)) = &s.root_pem {
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
            roots.push(Issuer::generate_root(&s.trust_domain, t)?);
        }
        for r in &mut roots {
            if r.key_sealed.is_empty() {
                r.key_sealed = kek.seal(&r.fingerprint, r.key_pem.as_bytes())?;
                ops.push(Op::Put(
                    Tree::Roots,
                    r.fingerprint.clone(),
                    store::encode(&stored_form(r))?,
                ));
            }
        }
        let issuer = Issuer::from_records(roots)?;
        let (cert, key, not_after) =
            issuer.serving_cert(&s.trust_domain, &s.tls_names, t, SERVING_LIFETIME)?;
        let bundle = issuer.bundle(t);
        let tls = tls::ServingConfig::new(tls::server_config(&bundle, &cert, &key)?);
        write_bundle(&s.data_dir, &bundle).map_err(|source| StartError::Io {
            path: s.data_dir.join(BUNDLE_FILE),
            source,
        })?;
        Ok((
            Self {
                db,
                resources,
                kek,
                trust_domain: s.trust_domain,
                leaf_ttl_secs: AtomicU64::new(s.leaf_ttl_secs),
                issuer: Mutex::new(issuer),
                tls_names: s.tls_names,
                serving: Mutex::new(Serving {
                    not_before: t,
                    not_after,
                }),
                tls,
                queue: Mutex::default(),
                arriving: AtomicUsize::new(0),
                arrived: tokio::sync::Notify::new(),
                audit_tag: format!("{:08x}", rand::random::<u32>()),
                data_dir: s.data_dir,
                retention: s.retention,
            },
            ops,
        ))
    }

    fn lock_issuer(&self) -> MutexGuard<'_, Issuer> {
        self.issuer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The serving TLS configuration handle (swapped on renewal and rotation).
    pub fn serving_config(&self) -> &tls::ServingConfig {
        &self.tls
    }

    /// Current leaf lifetime.
    pub fn leaf_ttl(&self) -> Duration {
        Duration::from_secs(self.leaf_ttl_secs.load(Ordering::Relaxed))
    }

    /// Changes the leaf lifetime (after the trust domain settings were written).
    pub fn set_leaf_ttl(&self, secs: u64) {
        self.leaf_ttl_secs.store(secs, Ordering::Relaxed);
    }

    /// The trust bundle now.
    pub fn bundle(&self) -> Vec<String> {
        self.lock_issuer().bundle(now())
    }

    /// The path of the trust bundle file.
    pub fn bundle_path(&self) -> PathBuf {
        self.data_dir.join(BUNDLE_FILE)
    }

    /// Brings the roots in memory up to the store's, on a store several controllers share (another
    /// controller rotated, retired, or issued leaves from them): the latest leaf expiries are merged,
    /// and a changed set of roots is reloaded (keys unsealed with the KEK) and renews the serving
    /// certificate and the bundle file. Returns whether the set of roots changed.
    pub fn refresh_roots(&self) -> Result<bool, ApiError> {
        if self.db.changes().is_none() {
            return Ok(false);
        }
        let stored: Vec<RootRecord> = self
            .db
            .scan(Tree::Roots, "", false, usize::MAX)?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        if stored.is_empty() {
            return Ok(false);
        }
        let t = now();
        let mut issuer = self.lock_issuer();
        let same = stored.len() == issuer.roots().len()
            && stored.iter().all(|s| {
                issuer
                    .roots()
                    .iter()
                    .any(|r| r.fingerprint == s.fingerprint && r.active == s.active)
            });
        if same {
            issuer.merge_leaf_expiry(&stored);
            return Ok(false);
        }
        let mut records = Vec::with_capacity(stored.len());
        for mut r in stored {
            r.key_pem = match issuer
                .roots()
                .iter()
                .find(|m| m.fingerprint == r.fingerprint && !m.key_pem.is_empty())
            {
                Some(m) => m.key_pem.clone(),
                None => {
                    let plain = self
                        .kek
                        .open(&r.fingerprint, &r.key_sealed)
                        .map_err(|e| ApiError::Internal(e.to_string()))?;
                    String::from_utf8(plain).map_err(|_| {
                        ApiError::Internal(format!("root {}: sealed key is not PEM", r.fingerprint))
                    })?
                }
            };
            records.push(r);
        }
        *issuer = Issuer::from_records(records)?;
        drop(issuer);
        self.renew_serving_cert(t)?;
        self.write_bundle_file()?;
        tracing::info!(
            "the roots changed in the store (another controller rotated or retired one): reloaded"
        );
        Ok(true)
    }

    /// Signs a CSR for the identity granted by a join token, by a credential verified elsewhere
    /// (`verified`: the identity and how it was proven, e.g. a Kubernetes service-account token), or by
    /// the caller's mesh certificate.
    pub async fn certify(
        self: &Arc<Self>,
        csr_pem: &str,
        join_token: &str,
        verified: Option<(SpiffeId, String)>,
        peer: Option<&PeerInfo>,
    ) -> Result<Issued, ApiError> {
        let arriving = Arriving::new(self);
        // Sign with the root the store says is active.
        self.refresh_roots()?;
        let t = now();
        // Who: checked here without the lock, and again under it before the commit.
        let (granted, credential, token_id) = if let Some((id, credential)) = verified {
            (id, credential, None)
        } else if !join_token.is_empty() {
            let id =
                auth::join_token_id(join_token).map_err(|m| ApiError::Unauthenticated(m.into()))?;
            let invalid = || ApiError::Unauthenticated("join_token: not valid".into());
            let rec: TokenRecord = match self.db.get(Tree::Tokens, id)? {
                Some(r) => r,
                // On a shared store the token may have been made on another controller a moment
                // ago: look again on the latest state (the commit then retries on it).
                None if self.db.changes().is_some() => {
                    self.db.catch_up().await?;
                    self.db.get(Tree::Tokens, id)?.ok_or_else(invalid)?
                }
                None => return Err(invalid()),
            };
            if !auth::constant_time_eq(&auth::sha256_hex(join_token.as_bytes()), &rec.sha256) {
                return Err(invalid());
            }
            rules::check_token(&rec, t.unix_timestamp())
                .map_err(|r| ApiError::Unauthenticated(r.to_string()))?;
            let granted: SpiffeId = rec
                .spiffe_id
                .parse()
                .map_err(|e| ApiError::Internal(format!("stored token identity: {e}")))?;
            (granted, format!("join-token:{id}"), Some(id.to_owned()))
        } else if let Some(id) = peer.and_then(|p| p.spiffe_id.clone()) {
            (id, "mtls".to_owned(), None)
        } else {
            return Err(ApiError::Unauthenticated(
                "Certify needs a join_token or a mesh client certificate".into(),
            ));
        };
        rules::may_issue(&granted, self.resources.is_revoked(&granted)?)
            .map_err(|r| ApiError::PermissionDenied(r.to_string()))?;
        // Signed on this task's thread, without the store's lock: the runtime's workers (one per
        // core) sign in parallel. About the CPU of one TLS handshake, which the workers do too; a
        // blocking-pool hop per certificate cost more in thread switches than it spared, and let
        // every waiting caller start a thread of its own (64 callers, 64 signing threads, 2 cores).
        let signer = self.lock_issuer().signer()?;
        let signed = signer.sign(csr_pem, &granted, t, self.leaf_ttl())?;
        let audit = AuditRecord {
            serial_hex: signed.serial_hex.clone(),
            spiffe_id: granted.to_string(),
            issued_unix: t.unix_timestamp(),
            not_after_unix: signed.not_after.unix_timestamp(),
            credential,
            root_fingerprint: signed.root_fingerprint.clone(),
            peer_address: peer.map(|p| p.remote.to_string()).unwrap_or_default(),
        };
        let issued = Issued {
            cert_pem: signed.cert_pem.clone(),
            trust_bundle_pem: Vec::new(),
            spiffe_id: granted.to_string(),
            not_before_unix: signed.not_before.unix_timestamp(),
            not_after_unix: signed.not_after.unix_timestamp(),
            serial_hex: signed.serial_hex.clone(),
        };
        let (reply, done) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = self.lock_queue();
            q.pending.push(Pending {
                token_id,
                granted,
                signed,
                audit,
                reply,
            });
            !std::mem::replace(&mut q.committing, true)
        };
        drop(arriving);
        // One committer at a time, on its own task (a caller that goes away does not abandon the
        // group); it takes whatever queued up while the previous group was written and flushed.
        if start {
            let ca = self.clone();
            tokio::spawn(async move { ca.run_commits().await });
        }
        done.await
            .map_err(|_| ApiError::Internal("the issuance group was dropped".into()))??;
        tracing::info!(spiffe_id = %issued.spiffe_id, serial = %issued.serial_hex, "issued certificate");
        Ok(Issued {
            trust_bundle_pem: self.bundle(),
            ..issued
        })
    }

    /// The committer: lets the next group fill while leaves are being signed ([`Ca::gather`]), takes
    /// the write lock and commits the queued leaves (up to [`ISSUE_GROUP`]) as one group, waits for its
    /// flush, and goes on until the queue is empty. One group in flight at a time: leaves signed during
    /// a flush wait for the next group instead of each starting a smaller one (fewer, larger batches;
    /// each flush is one store write and wakes the store's threads).
    async fn run_commits(&self) {
        /// Should the committer stop early (a panic, the runtime shutting down), the queued callers
        /// are answered (their reply dropped) and the next leaf starts a new committer.
        struct Stopped<'a>(Option<&'a Ca>);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                if let Some(ca) = self.0 {
                    let mut q = ca.lock_queue();
                    q.committing = false;
                    q.pending.clear();
                }
            }
        }
        let mut stopped = Stopped(Some(self));
        loop {
            self.gather().await;
            let guard = self.db.lock().await;
            let group: Vec<Pending> = {
                let mut q = self.lock_queue();
                if q.pending.is_empty() {
                    q.committing = false;
                    stopped.0 = None;
                    return;
                }
                let n = q.pending.len().min(ISSUE_GROUP);
                q.pending.drain(..n).collect()
            };
            self.commit_group(guard, group).await;
        }
    }

    /// Waits, at most [`GROUP_WAIT`], while the next group could still grow: calls are coming in and
    /// the queue holds less than a group ([`rules::group_ready`]).
    async fn gather(&self) {
        let deadline = tokio::time::Instant::now() + GROUP_WAIT;
        let mut waited_out = false;
        loop {
            // A leaf queued between this check and the wait leaves a permit (`notify_one`): not missed.
            let arrived = self.arrived.notified();
            let queued = self.lock_queue().pending.len();
            let arriving = self.arriving.load(Ordering::Acquire);
            if rules::group_ready(queued, arriving, ISSUE_GROUP, waited_out) {
                return;
            }
            waited_out = tokio::time::timeout_at(deadline, arrived).await.is_err();
        }
    }

    /// Commits `group` as one batch under `guard`, each leaf checked again on the state under the
    /// lock; answers each. The batch is guarded by the records its checks read (the tokens it spends,
    /// the granted identities, the roots that signed its leaves), not by the whole store: on a
    /// store several controllers share, their issuance conflicts only over the same token or root. On
    /// a conflict the group is checked again on fresh data (its leaves are not signed again).
    async fn commit_group(&self, guard: store::WriteGuard<'_>, group: Vec<Pending>) {
        let mut guard = Some(guard);
        let mut attempt = 0;
        loop {
            let held = match guard.take() {
                Some(g) => g,
                None => self.db.lock().await,
            };
            let plan = match self.plan_group(&group) {
                Ok(p) => p,
                Err(e) => return refuse_all(group, &e),
            };
            let accepted = plan.verdicts.iter().filter(|v| v.is_ok()).count();
            let result = if accepted == 0 {
                Ok(0)
            } else {
                self.db.commit_if(held, plan.expect, plan.ops).await
            };
            match result {
                Err(store::StoreError::Conflict) if attempt < GROUP_RETRIES => {
                    attempt += 1;
                    let fresh = match self.db.catch_up().await {
                        Ok(()) => self.refresh_roots(),
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = fresh {
                        return refuse_all(group, &e);
                    }
                }
                result => {
                    if accepted > 0 && result.is_ok() {
                        tracing::debug!(certificates = accepted, "issuance group committed");
                    }
                    for (p, verdict) in group.into_iter().zip(plan.verdicts) {
                        let answer = match (&result, verdict) {
                            (_, Err(e)) => Err(e),
                            (Ok(_), Ok(())) => Ok(()),
                            (Err(e), Ok(())) => Err(group_error(e)),
                        };
                        let _ = p.reply.send(answer);
                    }
                    return;
                }
            }
        }
    }

    /// The checks of each leaf of `group` on the state now, and the batch of those that pass: their
    /// audit records, the tokens they spend, their roots' latest leaf expiry where it moves, and what
    /// the batch expects those records (and the granted identities) to hold.
    fn plan_group(&self, group: &[Pending]) -> Result<GroupPlan, ApiError> {
        let t = now().unix_timestamp();
        let mut tokens: std::collections::BTreeMap<String, TokenRecord> = Default::default();
        let mut roots: std::collections::BTreeMap<String, RootRecord> = Default::default();
        let mut expect: std::collections::BTreeMap<(Tree, String), Option<Vec<u8>>> =
            Default::default();
        let mut read = |tree: Tree, key: &str| -> Result<Option<Vec<u8>>, ApiError> {
            let v = self.db.raw(tree, key)?;
            expect
                .entry((tree, key.to_owned()))
                .or_insert_with(|| v.clone());
            Ok(v)
        };
        let ttl = self.leaf_ttl().as_secs();
        let mut verdicts = Vec::with_capacity(group.len());
        let mut audits = Vec::with_capacity(group.len());
        for p in group {
            let check = (|| {
                if let Some(id) = &p.token_id {
                    let rec = match tokens.get(id) {
                        Some(r) => r.clone(),
                        None => read(Tree::Tokens, id)?
                            .map(|v| store::decode::<TokenRecord>(Tree::Tokens, id, &v))
                            .transpose()?
                            .ok_or_else(|| {
                                ApiError::Unauthenticated("join_token: not valid".into())
                            })?,
                    };
                    rules::check_token(&rec, t)
                        .map_err(|r| ApiError::Unauthenticated(r.to_string()))?;
                    tokens.insert(id.clone(), rules::token_used(&rec, t));
                }
                let identity = model::key_of(
                    model::Kind::Identity,
                    p.granted.namespace(),
                    p.granted.service_account(),
                );
                read(crate::resources::tree_of(model::Kind::Identity), &identity)?;
                rules::may_issue(&p.granted, self.resources.is_revoked(&p.granted)?)
                    .map_err(|r| ApiError::PermissionDenied(r.to_string()))?;
                let root = self.lock_issuer().record_leaf(&p.signed)?;
                let fp = &root.fingerprint;
                let stored = match roots.get(fp) {
                    Some(r) => Some(r.max_leaf_not_after_unix),
                    None => read(Tree::Roots, fp)?
                        .map(|v| store::decode::<RootRecord>(Tree::Roots, fp, &v))
                        .transpose()?
                        .map(|r| r.max_leaf_not_after_unix),
                };
                let not_after = p.signed.not_after.unix_timestamp();
                if let Some(ahead) = rules::leaf_expiry_to_store(stored, not_after, ttl) {
                    roots.insert(
                        fp.clone(),
                        RootRecord {
                            max_leaf_not_after_unix: ahead,
                            ..stored_form(&root)
                        },
                    );
                }
                Ok::<_, ApiError>(())
            })();
            if check.is_ok() {
                audits.push(store::encode(&p.audit)?);
            }
            verdicts.push(check);
        }
        let mut ops = Vec::with_capacity(tokens.len() + roots.len() + audits.len());
        for (id, rec) in tokens {
            ops.push(Op::Put(Tree::Tokens, id, store::encode(&rec)?));
        }
        for (fp, rec) in roots {
            ops.push(Op::Put(Tree::Roots, fp, store::encode(&rec)?));
        }
        // One key per leaf, in the order of issue: the time of this batch, this process, the leaf's
        // place in the group.
        let nanos = now().unix_timestamp_nanos();
        for (i, v) in audits.into_iter().enumerate() {
            let key = format!("{nanos:020}.{}.{i:04}", self.audit_tag);
            ops.push(Op::Put(Tree::Audit, key, v));
        }
        Ok(GroupPlan {
            ops,
            expect: expect.into_iter().map(|((t, k), v)| (t, k, v)).collect(),
            verdicts,
        })
    }

    /// Creates a join token for `namespace/sa`, creating the identity if it does not exist.
    pub async fn create_token(
        &self,
        namespace: &str,
        sa: &str,
        ttl_seconds: u64,
        reusable: bool,
    ) -> Result<(String, TokenRecord), ApiError> {
        let id = self.resources.identity_id(namespace, sa)?;
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
        let guard = self.db.lock().await;
        let t = now().unix_timestamp();
        let mut ops: Vec<Op> = self
            .resources
            .identity_for_token(namespace, sa, self.db.revision() + 1, t)?
            .into_iter()
            .collect();
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
            last_used_unix: 0,
            revoked_unix: 0,
        };
        ops.push(Op::Put(Tree::Tokens, token_id, store::encode(&rec)?));
        self.db.commit(guard, ops).await?;
        Ok((token, rec))
    }

    /// Revokes a join token by id.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord, ApiError> {
        if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FieldError::new(
                "id",
                format!(
                    "{:?} is not a join token id (12 hex digits)",
                    crate::error::Capped(id)
                ),
            )
            .into());
        }
        let guard = self.db.lock().await;
        let mut rec: TokenRecord = self
            .db
            .get(Tree::Tokens, id)?
            .ok_or_else(|| ApiError::NotFound(format!("join token {id}")))?;
        if !rec.revoked {
            rec.revoked = true;
            rec.revoked_unix = now().unix_timestamp();
        }
        self.db
            .commit(
                guard,
                vec![Op::Put(Tree::Tokens, id.to_owned(), store::encode(&rec)?)],
            )
            .await?;
        Ok(rec)
    }

    /// Every join token (hashes only).
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, ApiError> {
        Ok(self
            .db
            .scan(Tree::Tokens, "", false, usize::MAX)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// The newest issued certificates, newest first.
    pub fn list_issued(&self, limit: usize) -> Result<Vec<AuditRecord>, ApiError> {
        Ok(self
            .db
            .scan(Tree::Audit, "", true, limit)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// The CA status.
    pub fn status(&self) -> CaStatus {
        let issuer = self.lock_issuer();
        CaStatus {
            trust_domain: self.trust_domain.clone(),
            roots: issuer
                .roots()
                .iter()
                .map(|r| RootStatus {
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

    /// Starts a root rotation. The caller publishes the new bundle.
    pub async fn rotate_root(&self) -> Result<CaStatus, ApiError> {
        let guard = self.db.lock().await;
        self.refresh_roots()?;
        let t = now();
        let mut new = Issuer::generate_root(&self.trust_domain, t)?;
        new.key_sealed = self
            .kek
            .seal(&new.fingerprint, new.key_pem.as_bytes())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let changed = self.lock_issuer().rotate_to(new)?;
        let ops = changed
            .iter()
            .map(|r| {
                Ok(Op::Put(
                    Tree::Roots,
                    r.fingerprint.clone(),
                    store::encode(&stored_form(r))?,
                ))
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        self.db.commit(guard, ops).await?;
        tracing::info!(
            "root rotated: new root signs, old root stays in the bundle until its leaves expire"
        );
        self.renew_serving_cert(t)?;
        self.write_bundle_file()?;
        Ok(self.status())
    }

    fn renew_serving_cert(&self, t: OffsetDateTime) -> Result<(), ApiError> {
        let issuer = self.lock_issuer();
        let (cert, key, not_after) =
            issuer.serving_cert(&self.trust_domain, &self.tls_names, t, SERVING_LIFETIME)?;
        let cfg = tls::server_config(&issuer.bundle(t), &cert, &key)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        drop(issuer);
        self.tls.set(cfg);
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Serving {
            not_before: t,
            not_after,
        };
        Ok(())
    }

    fn write_bundle_file(&self) -> Result<(), ApiError> {
        write_bundle(&self.data_dir, &self.bundle())
            .map_err(|e| ApiError::Internal(format!("trust bundle file: {e}")))
    }

    /// Periodic work at `t`: retire roots whose leaves all expired, renew the serving certificate at
    /// half-life. Returns whether the trust bundle changed (the caller publishes it).
    pub async fn tick(&self, t: OffsetDateTime) -> Result<bool, ApiError> {
        let guard = self.db.lock().await;
        self.refresh_roots()?;
        let gone = self.lock_issuer().take_retired(t);
        if !gone.is_empty() {
            let ops = gone
                .iter()
                .map(|r| Op::Delete(Tree::Roots, r.fingerprint.clone()))
                .collect();
            self.db.commit(guard, ops).await?;
            for r in &gone {
                tracing::info!(fingerprint = %r.fingerprint, "retired root left the trust bundle");
            }
            self.renew_serving_cert(t)?;
            self.write_bundle_file()?;
            return Ok(true);
        }
        drop(guard);
        let renew = {
            let s = self.serving.lock().unwrap_or_else(|e| e.into_inner());
            t > s.not_before + (s.not_after - s.not_before) / 2
        };
        if renew {
            self.renew_serving_cert(t)?;
        }
        Ok(false)
    }

    /// Drops join tokens dead for longer than the token retention and audit records whose certificate
    /// expired longer than the audit retention ago (oldest first, at most [`PRUNE_BATCH`] per round).
    pub async fn prune(&self, t: OffsetDateTime) -> Result<Pruned, ApiError> {
        let now = t.unix_timestamp();
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let guard = self.db.lock().await;
        // One batch per round, within what the store takes in one transaction.
        let max = self.db.max_ops().min(PRUNE_BATCH);
        let mut ops = Vec::new();
        let mut pruned = Pruned::default();
        for (key, rec) in self
            .db
            .scan::<TokenRecord>(Tree::Tokens, "", false, usize::MAX)?
        {
            if ops.len() < max && rules::token_prunable(&rec, now, secs(self.retention.tokens)) {
                ops.push(Op::Delete(Tree::Tokens, key));
                pruned.tokens += 1;
            }
        }
        for (key, rec) in self.db.scan::<AuditRecord>(Tree::Audit, "", false, max)? {
            if ops.len() < max && rules::audit_prunable(&rec, now, secs(self.retention.audit)) {
                ops.push(Op::Delete(Tree::Audit, key));
                pruned.audit += 1;
            }
        }
        if ops.is_empty() {
            return Ok(pruned);
        }
        self.db.commit(guard, ops).await?;
        tracing::info!(
            tokens = pruned.tokens,
            audit_records = pruned.audit,
            "pruned dead join tokens and old audit records"
        );
        Ok(pruned)
    }
}
