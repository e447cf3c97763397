//! Durable storage of the controller's state, behind a small trait so sled can be replaced.
//!
//! sled (0.34, frozen since 2021 and called beta by its own README) is what we use today, so everything
//! above this module sees only [`Store`]: named trees of byte values, read by key or scan, and written in
//! atomic batches. Each batch bumps one store-wide revision (stored with the batch, in the same
//! transaction) and is flushed to disk before `commit` returns, so an acknowledged write survives `kill -9`.
//! The schema version is written at creation and checked at every open. [`Db`] adds what every writer
//! above needs: one write lock for the whole store (so "check, then write" holds across concurrent callers)
//! and JSON values.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Serialize, de::DeserializeOwned};
use sled::Transactional;

pub mod etcd;

/// Schema of the data this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

/// The named collections of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    /// Revision, schema version, admin token hash.
    Meta,
    /// Trust domain settings.
    TrustDomains,
    /// Identities.
    Identities,
    /// Services.
    Services,
    /// Endpoints.
    Endpoints,
    /// Policies.
    Policies,
    /// Join tokens (hashed).
    Tokens,
    /// CA roots, current and retired.
    Roots,
    /// Audit log of issued certificates, keyed by revision.
    Audit,
}

impl Tree {
    /// Every tree.
    pub const ALL: [Tree; 9] = [
        Tree::Meta,
        Tree::TrustDomains,
        Tree::Identities,
        Tree::Services,
        Tree::Endpoints,
        Tree::Policies,
        Tree::Tokens,
        Tree::Roots,
        Tree::Audit,
    ];

    /// The tree's name, as in errors.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::TrustDomains => "trust_domains",
            Tree::Identities => "identities",
            Tree::Services => "services",
            Tree::Endpoints => "endpoints",
            Tree::Policies => "policies",
            Tree::Tokens => "tokens",
            Tree::Roots => "roots",
            Tree::Audit => "audit",
        }
    }

    /// The tree of a name, as [`Tree::name`] gives it.
    pub fn from_name(name: &str) -> Option<Tree> {
        Tree::ALL.iter().copied().find(|t| t.name() == name)
    }

    fn index(self) -> usize {
        Tree::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// Keys in [`Tree::Meta`].
pub mod meta {
    /// Store revision, u64 big-endian.
    pub const REVISION: &str = "revision";
    /// Schema version, u64 big-endian.
    pub const SCHEMA: &str = "schema";
    /// SHA-256 of the admin token.
    pub const ADMIN_TOKEN_SHA256: &str = "admin_token_sha256";
}

/// What to do about a data directory that cannot be read.
const RECOVERY_ADVICE: &str = "restore the data directory from a backup, or move it away to start a new mesh \
     (every proxy then needs a new join token)";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or corruption error.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// The database files cannot be opened: damaged, or not written by quicmesh.
    #[error("{file}: {problem}; {RECOVERY_ADVICE}", file = file.display())]
    Damaged {
        /// The file at fault.
        file: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A value could not be encoded.
    #[error("encode {0}")]
    Encode(String),
    /// The store was written by another schema.
    #[error("{location} has schema version {found}, this build reads version {expected}{advice}",
        advice = if found > expected { ": it was written by a newer quicmesh; run that version (or newer) of the controller" } else { "" })]
    Schema {
        /// Which store: the data directory or the etcd prefix.
        location: String,
        /// Found in the store.
        found: u64,
        /// What this build knows.
        expected: u64,
    },
    /// The store cannot be reached now; nothing was written (or, for an ambiguous timeout, the write is
    /// either whole or absent).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store changed between the checks of a write and its commit (another controller wrote); the
    /// write was not applied and may be retried on fresh data.
    #[error("the store changed while this write was checked (another controller wrote); retry")]
    Conflict,
    /// The store's settings are not usable.
    #[error("store settings: {0}")]
    Settings(String),
    /// The batch exceeds what the store accepts in one transaction.
    #[error("the write is too large for one store transaction: {0}")]
    TooLarge(String),
    /// A stored value is not what this build wrote.
    #[error("corrupt value in {tree}/{key}: {problem}")]
    Corrupt {
        /// Tree name.
        tree: &'static str,
        /// Key.
        key: String,
        /// Decoding problem.
        problem: String,
    },
}

/// One write in a batch.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert or replace.
    Put(Tree, String, Vec<u8>),
    /// Remove (no error if absent).
    Delete(Tree, String),
}

/// A key a guarded write read, and the value its checks saw (`None`: absent); see [`Store::apply_if`].
pub type Expect = (Tree, String, Option<Vec<u8>>);

/// Storage of the controller state. Implementations must make `commit` atomic and durable.
pub trait Store: Send + Sync + 'static {
    /// The revision of the last committed batch (0 for a new store).
    fn revision(&self) -> u64;
    /// One value.
    fn get(&self, tree: Tree, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Values whose key starts with `prefix`, in key order (reversed if `reverse`), at most `limit`.
    fn scan(
        &self,
        tree: Tree,
        prefix: &str,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies `ops` atomically as the next revision and returns it, if the store is still at revision
    /// `base` (the one the caller's checks read), else fails with [`StoreError::Conflict`] and applies
    /// nothing. The batch is visible at once but durable only after [`Store::sync`].
    fn apply(&self, base: u64, ops: Vec<Op>) -> Result<u64, StoreError>;
    /// Applies `ops` atomically, like [`Store::apply`], if every key of `expect` still holds the value
    /// given (`None`: absent), whatever else changed since: for a write whose checks read only those
    /// keys (issuance), so that writers on other controllers touching other keys do not conflict with
    /// it. Fails with [`StoreError::Conflict`] otherwise. A store only this process writes needs no
    /// comparison: the caller's [`Db::lock`] keeps what its checks read.
    fn apply_if(&self, expect: Vec<Expect>, ops: Vec<Op>) -> Result<u64, StoreError> {
        let _ = expect;
        self.apply(self.revision(), ops)
    }
    /// Makes every applied batch durable. Concurrent callers share one flush (group commit).
    fn sync(&self) -> Result<(), StoreError>;
    /// Brings this process's view up to the store's latest committed batch (after a
    /// [`StoreError::Conflict`]); a store only this process writes is always current.
    fn catch_up(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// For a store other processes write too: the revision of every batch another process committed
    /// that changed what proxies see (resources, trust domain settings, roots added or removed), so
    /// the controller republishes what changed elsewhere (its own writes it publishes itself).
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Most writes one batch may hold.
    fn max_ops(&self) -> usize {
        usize::MAX
    }
    /// `apply` then `sync`: what to call before acknowledging a write.
    fn commit(&self, base: u64, ops: Vec<Op>) -> Result<u64, StoreError> {
        let revision = self.apply(base, ops)?;
        self.sync()?;
        Ok(revision)
    }
}

/// [`Store`] on a sled database in a directory.
pub struct SledStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    revision: std::sync::atomic::AtomicU64,
    apply_lock: std::sync::Mutex<()>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("revision", &self.revision())
            .finish()
    }
}

fn be_u64(tree: Tree, key: &str, v: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt {
        tree: tree.name(),
        key: key.to_owned(),
        problem: format!("expected 8 bytes, found {}", v.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// Checks sled's settings file `conf` before sled reads it, so a damaged one is reported by name: UTF-8
/// `key: value` lines naming `segment_size`, `use_compression` and `version`, then a 4-byte checksum.
fn check_conf(path: &Path) -> Result<(), StoreError> {
    let damaged = |problem: &str| StoreError::Damaged {
        file: path.to_owned(),
        problem: format!("sled's settings file is damaged ({problem})"),
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(StoreError::Damaged {
                file: path.to_owned(),
                problem: format!("cannot read: {e}"),
            });
        }
    };
    // sled treats 8 bytes or fewer as "no settings yet" and writes new ones.
    if bytes.len() <= 8 {
        return Ok(());
    }
    let text = std::str::from_utf8(&bytes[..bytes.len() - 4]).map_err(|_| damaged("not text"))?;
    for key in ["segment_size", "use_compression", "version"] {
        let found = text.lines().any(|l| {
            l.split_once(": ")
                .is_some_and(|(k, v)| k == key && !v.is_empty())
        });
        if !found {
            return Err(damaged(&format!("no {key} line")));
        }
    }
    Ok(())
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, checking the schema version. A damaged or foreign database
    /// is an error naming the file and what to do, never a panic.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        check_conf(&dir.join("conf"))?;
        // A database that held data must still hold our schema: sled may read a garbled file as empty,
        // and starting a new mesh over it would lose the old one silently.
        let had_data = std::fs::metadata(dir.join("db")).is_ok_and(|m| m.len() > 0);
        let damaged = |e: &dyn std::fmt::Display| StoreError::Damaged {
            file: dir.join("db"),
            problem: format!("the database cannot be read ({e})"),
        };
        let opened = std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .open()
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(sled::Error::Io(e))) => return Err(StoreError::Sled(sled::Error::Io(e))),
            Ok(Err(e)) => return Err(damaged(&e)),
            Err(_) => return Err(damaged(&"sled panicked while recovering it")),
        };
        let trees = Tree::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| damaged(&e))?;
        let meta = &trees[Tree::Meta.index()];
        match meta.get(meta::SCHEMA).map_err(|e| damaged(&e))? {
            Some(v) => {
                let found = be_u64(Tree::Meta, meta::SCHEMA, &v)?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        location: format!("data directory {}", dir.display()),
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
            None if had_data => {
                return Err(damaged(
                    &"it holds no quicmesh schema: damaged, or not a quicmesh database",
                ));
            }
            None => {
                meta.insert(meta::SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
        }
        let revision = match meta.get(meta::REVISION)? {
            Some(v) => be_u64(Tree::Meta, meta::REVISION, &v)?,
            None => 0,
        };
        Ok(Self {
            db,
            trees,
            revision: revision.into(),
            apply_lock: std::sync::Mutex::new(()),
        })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees[t.index()]
    }
}

impl Store for SledStore {
    fn revision(&self) -> u64 {
        self.revision.load(std::sync::atomic::Ordering::Acquire)
    }

    fn get(&self, tree: Tree, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(tree).get(key)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &str,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let iter = self.tree(tree).scan_prefix(prefix);
        let decode =
            |kv: sled::Result<(sled::IVec, sled::IVec)>| -> Result<(String, Vec<u8>), StoreError> {
                let (k, v) = kv?;
                let key = String::from_utf8(k.to_vec()).map_err(|e| StoreError::Corrupt {
                    tree: tree.name(),
                    key: format!("{k:?}"),
                    problem: e.to_string(),
                })?;
                Ok((key, v.to_vec()))
            };
        if reverse {
            iter.rev().take(limit).map(decode).collect()
        } else {
            iter.take(limit).map(decode).collect()
        }
    }

    fn apply(&self, base: u64, ops: Vec<Op>) -> Result<u64, StoreError> {
        // Revisions are assigned in commit order; a poisoned lock only means another writer panicked.
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.revision() != base {
            return Err(StoreError::Conflict);
        }
        // The transaction spans only the trees the batch writes (and Meta, for the revision): a
        // sled transaction locks and commits every tree it is given.
        let mut slot = [usize::MAX; Tree::ALL.len()];
        let mut refs: Vec<&sled::Tree> = Vec::with_capacity(4);
        let touched = ops.iter().map(|op| match op {
            Op::Put(t, ..) | Op::Delete(t, _) => *t,
        });
        for t in std::iter::once(Tree::Meta).chain(touched) {
            if slot[t.index()] == usize::MAX {
                slot[t.index()] = refs.len();
                refs.push(self.tree(t));
            }
        }
        let next = self.revision() + 1;
        refs.as_slice()
            .transaction(|views| {
                for op in &ops {
                    match op {
                        Op::Put(t, k, v) => {
                            views[slot[t.index()]].insert(k.as_bytes(), v.as_slice())?;
                        }
                        Op::Delete(t, k) => {
                            views[slot[t.index()]].remove(k.as_bytes())?;
                        }
                    }
                }
                views[slot[Tree::Meta.index()]].insert(meta::REVISION, &next.to_be_bytes())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => {
                    StoreError::Sled(sled::Error::Unsupported("transaction aborted".into()))
                }
            })?;
        self.revision
            .store(next, std::sync::atomic::Ordering::Release);
        Ok(next)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// JSON of a stored value.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Encode(e.to_string()))
}

/// A stored value read back.
pub fn decode<T: DeserializeOwned>(tree: Tree, key: &str, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree: tree.name(),
        key: key.to_owned(),
        problem: e.to_string(),
    })
}

/// The store as the controller's parts share it: typed reads, and writes serialized by one lock.
///
/// A writer takes [`Db::lock`], reads what its checks need, and hands the guard to [`Db::commit`], which
/// applies the batch under the lock and flushes after releasing it (concurrent writers share flushes).
/// The guard remembers the revision the checks read: on a store other controllers write too, a batch
/// committed elsewhere in between makes the commit fail with [`StoreError::Conflict`], and the caller
/// checks again on fresh data.
pub struct Db {
    store: Arc<dyn Store>,
    write: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("revision", &self.store.revision())
            .finish()
    }
}

/// The write lock, held from the checks to the apply, and the revision the checks read.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    // Owned, so the blocking task that applies the batch releases it (see `Db::commit`).
    lock: tokio::sync::OwnedMutexGuard<()>,
    base: u64,
    db: std::marker::PhantomData<&'a Db>,
}

impl Db {
    /// Wraps a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            write: Arc::default(),
        }
    }

    /// Revision of the last applied batch.
    pub fn revision(&self) -> u64 {
        self.store.revision()
    }

    /// Takes the write lock.
    pub async fn lock(&self) -> WriteGuard<'_> {
        let lock = self.write.clone().lock_owned().await;
        WriteGuard {
            lock,
            base: self.store.revision(),
            db: std::marker::PhantomData,
        }
    }

    /// Applies `ops` as one batch while `guard` is held, releases it, then waits for the flush.
    pub async fn commit(&self, guard: WriteGuard<'_>, ops: Vec<Op>) -> Result<u64, StoreError> {
        let store = self.store.clone();
        let WriteGuard { lock, base, .. } = guard;
        // One trip to the blocking pool: the lock is released right after the apply, so the next
        // writer applies while this one waits for the flush.
        blocking(move || {
            let rev = store.apply(base, ops);
            drop(lock);
            let rev = rev?;
            store.sync()?;
            Ok(rev)
        })
        .await
    }

    /// Applies `ops` while `guard` is held if every key of `expect` still holds the value given
    /// ([`Store::apply_if`]), releases it, then waits for the flush.
    pub async fn commit_if(
        &self,
        guard: WriteGuard<'_>,
        expect: Vec<Expect>,
        ops: Vec<Op>,
    ) -> Result<u64, StoreError> {
        let store = self.store.clone();
        let WriteGuard { lock, .. } = guard;
        blocking(move || {
            let rev = store.apply_if(expect, ops);
            drop(lock);
            let rev = rev?;
            store.sync()?;
            Ok(rev)
        })
        .await
    }

    /// One value as stored (what a guarded write expects, see [`Store::apply_if`]).
    pub fn raw(&self, tree: Tree, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(tree, key)
    }

    /// See [`Store::catch_up`].
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let store = self.store.clone();
        blocking(move || store.catch_up()).await
    }

    /// See [`Store::changes`].
    pub fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.store.changes()
    }

    /// See [`Store::max_ops`].
    pub fn max_ops(&self) -> usize {
        self.store.max_ops()
    }

    /// One value, decoded.
    pub fn get<T: DeserializeOwned>(&self, tree: Tree, key: &str) -> Result<Option<T>, StoreError> {
        self.store
            .get(tree, key)?
            .map(|v| decode(tree, key, &v))
            .transpose()
    }

    /// Values under `prefix`, decoded, with their keys.
    pub fn scan<T: DeserializeOwned>(
        &self,
        tree: Tree,
        prefix: &str,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.store
            .scan(tree, prefix, reverse, limit)?
            .into_iter()
            .map(|(k, v)| {
                let t = decode(tree, &k, &v)?;
                Ok((k, t))
            })
            .collect()
    }

    /// Raw bytes of one value.
    pub fn get_raw(&self, tree: Tree, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(tree, key)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        StoreError::Sled(sled::Error::Unsupported(format!("store task failed: {e}")))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        SledStore::open(dir.path()).expect("create");
        std::fs::write(dir.path().join("conf"), [0xffu8; 64]).expect("garble conf");
        let e = SledStore::open(dir.path()).expect_err("garbled conf");
        let msg = e.to_string();
        assert!(msg.contains("conf") && msg.contains("backup"), "{msg}");
        assert!(!msg.contains("0.29"), "{msg}");
    }

    #[test]
    fn commits_are_versioned_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(dir.path()).expect("open");
            assert_eq!(s.revision(), 0);
            let r1 = s
                .commit(
                    0,
                    vec![
                        Op::Put(Tree::Services, "shop/a".into(), b"1".to_vec()),
                        Op::Put(Tree::Services, "shop/b".into(), b"2".to_vec()),
                        Op::Put(Tree::Services, "zoo/c".into(), b"3".to_vec()),
                    ],
                )
                .expect("commit");
            assert_eq!(r1, 1);
            assert!(matches!(
                s.commit(0, vec![Op::Delete(Tree::Services, "shop/a".into())]),
                Err(StoreError::Conflict)
            ));
            let r2 = s
                .commit(1, vec![Op::Delete(Tree::Services, "shop/b".into())])
                .expect("delete");
            assert_eq!(r2, 2);
            let shop = s
                .scan(Tree::Services, "shop/", false, usize::MAX)
                .expect("scan");
            assert_eq!(shop, vec![("shop/a".to_owned(), b"1".to_vec())]);
            let rev = s.scan(Tree::Services, "", true, 1).expect("rev");
            assert_eq!(rev[0].0, "zoo/c");
        }
        let s = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(s.revision(), 2);
        assert_eq!(
            s.get(Tree::Services, "shop/a").expect("get"),
            Some(b"1".to_vec())
        );
        assert_eq!(s.get(Tree::Services, "shop/b").expect("get"), None);
    }

    #[test]
    fn refuses_other_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            db.open_tree("meta")
                .expect("tree")
                .insert(meta::SCHEMA, &99u64.to_be_bytes())
                .expect("insert");
            db.flush().expect("flush");
        }
        match SledStore::open(dir.path()) {
            Err(
                e @ StoreError::Schema {
                    found: 99,
                    expected,
                    ..
                },
            ) => {
                assert_eq!(expected, SCHEMA_VERSION);
                assert!(e.to_string().contains("newer quicmesh"), "{e}");
            }
            other => panic!("expected schema error, got {other:?}"),
        }
    }
}
