//! [`Store`] on etcd v3, so several controllers can share one replicated state.
//!
//! Layout: one etcd key per value, `<prefix><tree>/<key>` (prefix default `/quicmesh/`), plus
//! `<prefix>meta/revision`, which every batch rewrites. A batch is one etcd transaction that succeeds
//! only if `meta/revision` still has the modification revision this process last saw: the checks of a
//! write (a join token is unspent, a resource is at the version asked) were made on the state at that
//! revision, so two controllers can never both commit on the same state, and the loser gets
//! [`StoreError::Conflict`] and retries on fresh data. The store revision is the etcd revision of the
//! last batch; on an etcd that only quicmesh writes it goes up by one per batch, as on sled.
//!
//! Reads are served from a mirror in memory (every tree but the audit log, which grows with every
//! certificate and is read from etcd when asked), loaded at open and kept current by an etcd watch on
//! the prefix; own commits are applied to it at once. So reads and `Watch` keep serving the last state
//! while etcd is unreachable, and every batch that changed what proxies see, whichever controller wrote
//! it, is announced on [`Store::changes`] (join tokens, the audit log and a root's latest leaf expiry,
//! written with every certificate, are not: they would rebuild every controller's snapshot per
//! certificate). Writes fail with [`StoreError::Unavailable`] when etcd does not answer within
//! the request deadline.
//!
//! The [`Store`] trait is synchronous (sled is), and its callers already run it on blocking threads.
//! The etcd client is async, so this store owns a small runtime of its own (one worker): the client,
//! its connections and the watch live there, a call from any thread hands the request over and waits
//! on a plain channel with the deadline, and nothing depends on the caller's runtime (or on it not
//! being one).
//!
//! The client ([`client`]) is our own, on stubs generated from the part of etcd's API this store uses.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::sync::watch;

use super::{Expect, Op, SCHEMA_VERSION, Store, StoreError, Tree, meta};

pub mod client;

use client::{
    Client,
    pb::{
        etcdserverpb::{
            Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
            WatchCreateRequest, compare, range_request, request_op, response_op,
        },
        mvccpb::event::EventType,
    },
};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/quicmesh/";
/// Default deadline of one etcd request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// Keys per range request when loading the mirror.
const PAGE: i64 = 1000;
/// Longest pause between two attempts to re-establish the watch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// TLS to etcd: the CA that signed the members' certificates and, for client-certificate auth, our
/// certificate and key (PEM).
#[derive(Clone)]
pub struct EtcdTls {
    /// CA certificates, PEM.
    pub ca_pem: String,
    /// Client certificate and key, PEM.
    pub identity: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Where and how to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// TLS, if the members serve it.
    pub tls: Option<EtcdTls>,
    /// User name and password, if etcd auth is on.
    pub user: Option<(String, String)>,
    /// Deadline of one request.
    pub timeout: Duration,
    /// Most operations one transaction may hold (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("timeout", &self.timeout)
            .field("max_txn_ops", &self.max_txn_ops)
            .finish()
    }
}

impl EtcdOptions {
    /// Options for `etcd://host:port,host:port`, with defaults for the rest.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{url:?}: expected etcd://host:port[,host:port...]"))?;
        let endpoints: Vec<String> = rest
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .map(str::to_owned)
            .collect();
        for e in &endpoints {
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(format!(
                    "{url:?}: member {e:?} is not host:port (expected etcd://host:port[,host:port...])"
                ));
            }
        }
        Ok(Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            tls: None,
            user: None,
            timeout: DEFAULT_TIMEOUT,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
        })
    }
}

/// The trees as loaded from etcd, at the revision of the last batch.
#[derive(Debug, Default)]
struct Mirror {
    trees: Vec<BTreeMap<String, Vec<u8>>>,
    /// Highest etcd revision applied.
    applied: u64,
    /// Modification revision of `meta/revision`: the last batch.
    batch: u64,
}

impl Mirror {
    fn new() -> Self {
        Self {
            trees: vec![BTreeMap::new(); Tree::ALL.len()],
            applied: 0,
            batch: 0,
        }
    }

    fn tree(&self, t: Tree) -> &BTreeMap<String, Vec<u8>> {
        &self.trees[t.index()]
    }

    /// Stores `value`; returns whether proxies' view may have changed: a resource or the trust domain
    /// settings, or a root added (an update of a root only moves its latest leaf expiry or retires it
    /// from signing, which arrives with the new root).
    fn put(&mut self, t: Tree, key: String, value: Vec<u8>) -> bool {
        let added = self.trees[t.index()].insert(key, value).is_none();
        visible(t) || (t == Tree::Roots && added)
    }

    /// Removes `key`; returns whether proxies' view may have changed.
    fn delete(&mut self, t: Tree, key: &str) -> bool {
        let removed = self.trees[t.index()].remove(key).is_some();
        removed && (visible(t) || t == Tree::Roots)
    }
}

/// Whether `t` holds what snapshots are made of.
fn visible(t: Tree) -> bool {
    matches!(
        t,
        Tree::TrustDomains | Tree::Identities | Tree::Services | Tree::Endpoints | Tree::Policies
    )
}

/// Splits an etcd key under `prefix` into its tree and key; `None` for keys that are not ours.
fn split_key<'a>(prefix: &str, full: &'a [u8]) -> Option<(Tree, &'a str)> {
    let rest = std::str::from_utf8(full).ok()?.strip_prefix(prefix)?;
    let (tree, key) = rest.split_once('/')?;
    Some((Tree::from_name(tree)?, key))
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn etcd_err(e: client::Error) -> StoreError {
    let text = e.to_string();
    if text.contains("too many operations in txn request") || text.contains("request is too large")
    {
        return StoreError::TooLarge(format!(
            "etcd refused it ({text}); raise etcd's --max-txn-ops / --max-request-bytes or write less at once"
        ));
    }
    if text.contains("authentication failed") {
        return StoreError::Settings(format!(
            "etcd refused the user name or password ({text}); check --etcd-user and QUICMESH_ETCD_PASSWORD"
        ));
    }
    match e {
        client::Error::Endpoint(..) | client::Error::Tls(_) => StoreError::Settings(text),
        client::Error::Rpc(_) => StoreError::Unavailable(format!("etcd: {text}")),
    }
}

/// Sends what `f` makes until it reaches a member (the caller bounds the time): the client has tried
/// every member once when it reports the request unsent.
async fn send<T, F, Fut>(mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, client::Error>>,
{
    loop {
        match f().await {
            Err(e) if e.unsent() => {
                tracing::debug!(error = %e, "no etcd member took the request; trying again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r.map_err(etcd_err),
        }
    }
}

/// A range request for `[key, end)`.
fn range(key: impl Into<Vec<u8>>, end: Vec<u8>) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        range_end: end,
        ..Default::default()
    }
}

fn put_op(key: String, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into_bytes(),
            value,
        })),
    }
}

/// A comparison `target(key) == value`.
fn equal(key: String, target: compare::CompareTarget, value: compare::TargetUnion) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: target as i32,
        key: key.into_bytes(),
        target_union: Some(value),
    }
}

fn i64_rev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

fn u64_rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// Runs `f` on `handle` and waits for it on this thread, at most `timeout`.
fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    timeout: Duration,
    f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let r = match tokio::time::timeout(timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd did not answer within {}",
                humantime::format_duration(timeout)
            ))),
        };
        let _ = tx.send(r);
    });
    rx.recv()
        .map_err(|_| StoreError::Unavailable("the etcd client stopped".into()))?
}

/// What the mirror and the watch share.
struct Shared {
    prefix: String,
    mirror: RwLock<Mirror>,
    /// Every batch.
    changes: watch::Sender<u64>,
    /// Batches that changed what proxies see.
    visible: watch::Sender<u64>,
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        self.mirror.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Mirror> {
        self.mirror.write().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, tree: Tree, key: &str) -> String {
        format!("{}{}/{}", self.prefix, tree.name(), key)
    }

    fn announce(&self, batch: u64, visible: bool) {
        let raise = |cur: &mut u64| {
            let newer = batch > *cur;
            if newer {
                *cur = batch;
            }
            newer
        };
        self.changes.send_if_modified(raise);
        if visible {
            self.visible.send_if_modified(raise);
        }
    }
}

/// [`Store`] on an etcd cluster.
pub struct EtcdStore {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    client: Client,
    shared: Arc<Shared>,
    timeout: Duration,
    max_ops: usize,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.shared.prefix)
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Loads every tree but the audit log at one revision; returns the mirror.
async fn load(client: &Client, prefix: &str) -> Result<Mirror, StoreError> {
    let mut m = Mirror::new();
    let mut at = 0i64;
    for tree in Tree::ALL {
        if tree == Tree::Audit {
            continue;
        }
        let tree_prefix = format!("{prefix}{}/", tree.name());
        let end = prefix_end(tree_prefix.as_bytes());
        let mut from = tree_prefix.clone().into_bytes();
        loop {
            let req = RangeRequest {
                limit: PAGE,
                revision: at,
                ..range(from.clone(), end.clone())
            };
            let resp = send(|| client.range(req.clone())).await?;
            if at == 0 {
                at = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            for kv in resp.kvs.iter() {
                if let Some((t, key)) = split_key(prefix, &kv.key) {
                    if t == Tree::Meta && key == meta::REVISION {
                        m.batch = u64_rev(kv.mod_revision);
                    }
                    m.put(t, key.to_owned(), kv.value.clone());
                }
                from = kv.key.clone();
                from.push(0);
            }
            if !resp.more || resp.kvs.is_empty() {
                break;
            }
        }
    }
    m.applied = u64_rev(at);
    Ok(m)
}

/// Follows the prefix from the mirror's revision on, forever, re-establishing the watch (or reloading
/// after a compaction) with backoff.
async fn follow(client: Client, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // On its own task, so even a panic while applying events only ends this attempt, never the
        // following.
        // `watch_once` resets the backoff once the watch delivers.
        let (c, s, mut b) = (client.clone(), shared.clone(), backoff);
        let attempt = tokio::spawn(async move {
            let r = watch_once(&c, &s, &mut b).await;
            (r, b)
        })
        .await;
        match attempt {
            Ok((r, b)) => {
                backoff = b;
                match r {
                    Ok(()) => tracing::warn!("etcd watch ended; re-establishing it"),
                    Err(e) => tracing::warn!(error = %e, "etcd watch failed; re-establishing it"),
                }
            }
            Err(e) => tracing::error!(error = %e, "etcd watch task failed; re-establishing it"),
        }
        let jitter = Duration::from_millis(u64::from(rand::random::<u8>()));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn watch_once(
    client: &Client,
    shared: &Shared,
    backoff: &mut Duration,
) -> Result<(), StoreError> {
    let start = shared.read().applied + 1;
    let mut stream = send(|| {
        client.watch(WatchCreateRequest {
            key: shared.prefix.clone().into_bytes(),
            range_end: prefix_end(shared.prefix.as_bytes()),
            start_revision: i64_rev(start),
            progress_notify: true,
        })
    })
    .await?;
    while let Some(resp) = stream.message().await.map_err(etcd_err)? {
        *backoff = Duration::from_millis(50);
        if resp.canceled {
            if resp.compact_revision > 0 {
                // The history we need is gone: start again from a whole copy.
                let fresh = load(client, &shared.prefix).await?;
                let batch = fresh.batch;
                *shared.write() = fresh;
                shared.announce(batch, true);
                tracing::warn!("etcd compacted past the watch; reloaded the whole state");
                return Ok(());
            }
            return Err(StoreError::Unavailable(format!(
                "watch canceled: {}",
                resp.cancel_reason
            )));
        }
        if resp.events.is_empty() {
            continue;
        }
        let (batch, seen) = {
            let mut m = shared.write();
            let mut seen = false;
            let base = m.applied;
            for ev in &resp.events {
                let Some(kv) = &ev.kv else { continue };
                let rev = u64_rev(kv.mod_revision);
                if rev <= base {
                    continue;
                }
                m.applied = m.applied.max(rev);
                let Some((tree, key)) = split_key(&shared.prefix, &kv.key) else {
                    continue;
                };
                if tree == Tree::Audit {
                    continue;
                }
                if tree == Tree::Meta && key == meta::REVISION {
                    m.batch = m.batch.max(rev);
                }
                seen |= match EventType::try_from(ev.r#type) {
                    Ok(EventType::Put) => m.put(tree, key.to_owned(), kv.value.clone()),
                    Ok(EventType::Delete) => m.delete(tree, key),
                    Err(_) => {
                        tracing::warn!(event = ev.r#type, "unknown etcd event type; ignored");
                        false
                    }
                };
            }
            (m.batch, seen)
        };
        shared.announce(batch, seen);
    }
    Ok(())
}

impl EtcdStore {
    /// Connects, loads the state (creating the schema marker in an empty prefix, refusing another
    /// schema) and starts following the prefix.
    pub fn open(opts: &EtcdOptions) -> Result<Self, StoreError> {
        if !opts.prefix.starts_with('/') || !opts.prefix.ends_with('/') {
            return Err(StoreError::Settings(format!(
                "etcd prefix {:?} must start and end with /",
                opts.prefix
            )));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("etcd client runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let timeout = opts.timeout;
        // Its connections live on our runtime.
        let client = {
            let _on = handle.enter();
            Client::new(opts).map_err(etcd_err)?
        };
        let shared = Arc::new(Shared {
            prefix: opts.prefix.clone(),
            mirror: RwLock::new(Mirror::new()),
            changes: watch::channel(0).0,
            visible: watch::channel(0).0,
        });
        let location = format!("etcd prefix {}", opts.prefix);
        let mirror = loop {
            let c = client.clone();
            let prefix = opts.prefix.clone();
            let m = run_on(&handle, timeout, async move { load(&c, &prefix).await })?;
            match m.tree(Tree::Meta).get(meta::SCHEMA) {
                Some(v) => {
                    let arr: [u8; 8] =
                        v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                            tree: Tree::Meta.name(),
                            key: meta::SCHEMA.into(),
                            problem: format!("expected 8 bytes, found {}", v.len()),
                        })?;
                    let found = u64::from_be_bytes(arr);
                    if found != SCHEMA_VERSION {
                        return Err(StoreError::Schema {
                            location,
                            found,
                            expected: SCHEMA_VERSION,
                        });
                    }
                    break m;
                }
                None => {
                    let c = client.clone();
                    let prefix = opts.prefix.clone();
                    let schema_key = format!("{prefix}{}/{}", Tree::Meta.name(), meta::SCHEMA);
                    let rev_key = format!("{prefix}{}/{}", Tree::Meta.name(), meta::REVISION);
                    run_on(&handle, timeout, async move {
                        // Anything under the prefix without a schema is not ours to overwrite.
                        let count = RangeRequest {
                            count_only: true,
                            ..range(prefix.clone(), prefix_end(prefix.as_bytes()))
                        };
                        let any = send(|| c.range(count.clone())).await?;
                        if any.count > 0 {
                            // Another controller may have created the mesh since we loaded.
                            let schema =
                                send(|| c.range(range(schema_key.clone(), Vec::new()))).await?;
                            if !schema.kvs.is_empty() {
                                return Ok(());
                            }
                            return Err(StoreError::Corrupt {
                                tree: Tree::Meta.name(),
                                key: meta::SCHEMA.into(),
                                problem: format!(
                                    "etcd prefix {prefix} holds {} keys but no quicmesh schema: not a quicmesh store; choose another --etcd-prefix",
                                    any.count
                                ),
                            });
                        }
                        // Two controllers starting on an empty prefix: one creates it, both then load it.
                        let create = TxnRequest {
                            compare: vec![equal(
                                schema_key.clone(),
                                compare::CompareTarget::Create,
                                compare::TargetUnion::CreateRevision(0),
                            )],
                            success: vec![
                                put_op(schema_key, SCHEMA_VERSION.to_be_bytes().to_vec()),
                                put_op(rev_key, Vec::new()),
                            ],
                            failure: Vec::new(),
                        };
                        send(|| c.txn(create.clone())).await?;
                        Ok(())
                    })?;
                }
            }
        };
        let batch = mirror.batch;
        *shared.write() = mirror;
        shared.announce(batch, true);
        let follower = client.clone();
        let s = shared.clone();
        handle.spawn(follow(follower, s));
        Ok(Self {
            runtime: Some(runtime),
            handle,
            client,
            shared,
            timeout,
            max_ops: opts.max_txn_ops.saturating_sub(1).max(1),
        })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_on(&self.handle, self.timeout, f)
    }

    /// Runs `success` if every comparison holds; [`StoreError::Conflict`] if one does not.
    fn transact(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
    ) -> Result<client::pb::etcdserverpb::TxnResponse, StoreError> {
        let txn = TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        let c = self.client.clone();
        let resp = self.run(async move { send(|| c.txn(txn.clone())).await })?;
        if !resp.succeeded {
            return Err(StoreError::Conflict);
        }
        Ok(resp)
    }

    fn check_size(&self, ops: &[Op]) -> Result<(), StoreError> {
        if ops.len() > self.max_ops {
            return Err(StoreError::TooLarge(format!(
                "{} writes, the etcd store takes at most {} per transaction (--etcd-max-txn-ops, etcd's --max-txn-ops)",
                ops.len(),
                self.max_ops
            )));
        }
        Ok(())
    }

    fn request_ops(&self, ops: &[Op]) -> Vec<RequestOp> {
        ops.iter()
            .map(|op| match op {
                Op::Put(t, k, v) => put_op(self.shared.key(*t, k), v.clone()),
                Op::Delete(t, k) => RequestOp {
                    request: Some(request_op::Request::RequestDeleteRange(
                        DeleteRangeRequest {
                            key: self.shared.key(*t, k).into_bytes(),
                            range_end: Vec::new(),
                        },
                    )),
                },
            })
            .collect()
    }

    /// Applies this process's own committed batch `ops` (revision `rev`) to the mirror at once, unless
    /// the watch delivered it already. `contiguous`: no other batch came between the mirror's last one
    /// and this one, so the mirror is now at `rev`; otherwise the watch still has to bring those, and
    /// this batch again (its values are the same, so reads stay current meanwhile).
    fn mirror_own(&self, rev: u64, ops: Vec<Op>, contiguous: bool) {
        {
            let mut m = self.shared.write();
            if rev > m.applied {
                for op in ops {
                    match op {
                        Op::Put(Tree::Audit, ..) | Op::Delete(Tree::Audit, _) => {}
                        Op::Put(t, k, v) => {
                            m.put(t, k, v);
                        }
                        Op::Delete(t, k) => {
                            m.delete(t, &k);
                        }
                    }
                }
                if contiguous {
                    m.put(Tree::Meta, meta::REVISION.to_owned(), Vec::new());
                    m.applied = rev;
                    m.batch = rev;
                }
            }
        }
        if contiguous {
            // The writer publishes its own batch; `changes` is for what others wrote.
            self.shared.announce(rev, false);
        }
    }

    fn audit_scan(
        &self,
        prefix: &str,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let from = self.shared.key(Tree::Audit, prefix);
        let end = prefix_end(from.as_bytes());
        let mut req = RangeRequest {
            limit: i64::try_from(limit).unwrap_or(i64::MAX).min(PAGE * 100),
            ..range(from, end)
        };
        if reverse {
            req.sort_target = range_request::SortTarget::Key as i32;
            req.sort_order = range_request::SortOrder::Descend as i32;
        }
        let c = self.client.clone();
        let resp = self.run(async move { send(|| c.range(req.clone())).await })?;
        Ok(resp
            .kvs
            .into_iter()
            .filter_map(|kv| {
                split_key(&self.shared.prefix, &kv.key).map(|(_, k)| (k.to_owned(), kv.value))
            })
            .collect())
    }
}

impl Store for EtcdStore {
    fn revision(&self) -> u64 {
        self.shared.read().batch
    }

    fn get(&self, tree: Tree, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if tree == Tree::Audit {
            return Ok(self
                .audit_scan(key, false, 1)?
                .into_iter()
                .find_map(|(k, v)| (k == key).then_some(v)));
        }
        Ok(self.shared.read().tree(tree).get(key).cloned())
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &str,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if tree == Tree::Audit {
            return self.audit_scan(prefix, reverse, limit);
        }
        let m = self.shared.read();
        let matching = m
            .tree(tree)
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()));
        Ok(if reverse {
            let mut all: Vec<_> = matching.collect();
            all.reverse();
            all.truncate(limit);
            all
        } else {
            matching.take(limit).collect()
        })
    }

    fn apply(&self, base: u64, ops: Vec<Op>) -> Result<u64, StoreError> {
        self.check_size(&ops)?;
        let rev_key = self.shared.key(Tree::Meta, meta::REVISION);
        let mut success = self.request_ops(&ops);
        success.push(put_op(rev_key.clone(), Vec::new()));
        let resp = self.transact(
            vec![equal(
                rev_key,
                compare::CompareTarget::Mod,
                compare::TargetUnion::ModRevision(i64_rev(base)),
            )],
            success,
        )?;
        let rev = u64_rev(resp.header.map_or(0, |h| h.revision));
        // No batch came between `base` and this one (the comparison held).
        self.mirror_own(rev, ops, true);
        Ok(rev)
    }

    fn apply_if(&self, expect: Vec<Expect>, ops: Vec<Op>) -> Result<u64, StoreError> {
        self.check_size(&ops)?;
        let rev_key = self.shared.key(Tree::Meta, meta::REVISION);
        let compare = expect
            .into_iter()
            .map(|(t, k, v)| match v {
                Some(v) => equal(
                    self.shared.key(t, &k),
                    compare::CompareTarget::Value,
                    compare::TargetUnion::Value(v),
                ),
                None => equal(
                    self.shared.key(t, &k),
                    compare::CompareTarget::Version,
                    compare::TargetUnion::Version(0),
                ),
            })
            .collect();
        // The last batch before this one, read inside the transaction, then the batch, which also
        // moves `meta/revision` (so writes checked on the whole state still see it).
        let mut success = vec![RequestOp {
            request: Some(request_op::Request::RequestRange(range(
                rev_key.clone(),
                Vec::new(),
            ))),
        }];
        success.extend(self.request_ops(&ops));
        success.push(put_op(rev_key, Vec::new()));
        let resp = self.transact(compare, success)?;
        let rev = u64_rev(resp.header.as_ref().map_or(0, |h| h.revision));
        let before = resp
            .responses
            .first()
            .and_then(|r| r.response.as_ref())
            .map(|response_op::Response::ResponseRange(rr)| {
                rr.kvs.first().map_or(0, |kv| u64_rev(kv.mod_revision))
            });
        // Whether the mirror already held every batch before this one: only then may it be marked as
        // at this revision (else the watch brings the batches in between, and this one again).
        let contiguous = before.is_some_and(|b| b == self.shared.read().batch);
        self.mirror_own(rev, ops, contiguous);
        Ok(rev)
    }

    fn sync(&self) -> Result<(), StoreError> {
        // etcd acknowledged the transaction once a majority of members had it on disk.
        Ok(())
    }

    fn catch_up(&self) -> Result<(), StoreError> {
        let key = self.shared.key(Tree::Meta, meta::REVISION);
        let c = self.client.clone();
        let mut rx = self.shared.changes.subscribe();
        let shared = self.shared.clone();
        self.run(async move {
            // A linearizable read: the last batch committed by anyone.
            let resp = send(|| c.range(range(key.clone(), Vec::new()))).await?;
            let target = resp.kvs.first().map_or(0, |kv| u64_rev(kv.mod_revision));
            while shared.read().batch < target {
                rx.changed()
                    .await
                    .map_err(|_| StoreError::Unavailable("the etcd watch stopped".into()))?;
            }
            Ok(())
        })
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.shared.visible.subscribe())
    }

    fn max_ops(&self) -> usize {
        self.max_ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keys_and_ranges() {
        let o = EtcdOptions::from_url("etcd://127.0.0.1:2379,localhost:22379").expect("url");
        assert_eq!(o.endpoints, ["127.0.0.1:2379", "localhost:22379"]);
        assert_eq!(o.prefix, DEFAULT_PREFIX);
        for bad in [
            "http://x:1",
            "etcd://",
            "etcd://host",
            "etcd://h:0",
            "etcd://h:1,:2",
        ] {
            assert!(EtcdOptions::from_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_key("/q/", b"/q/services/shop/web"),
            Some((Tree::Services, "shop/web"))
        );
        assert_eq!(split_key("/q/", b"/q/nope/x"), None);
        assert_eq!(split_key("/q/", b"/other/services/x"), None);
        assert_eq!(prefix_end(b"/q/"), b"/q0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
