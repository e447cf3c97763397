//! Who is connected: proxies following `Watch`, and every TLS connection that proved a mesh identity.
//!
//! Two jobs need the same bookkeeping. `quicmesh ctl proxies` lists the Watch streams; revocation must
//! end what a revoked identity still holds open (its Watch streams and its TLS connections, so no call
//! keeps running on a connection authenticated before the revocation), and a revoked identity's new
//! connections are dropped after the handshake. Each stream or connection registers here and gets a
//! guard: dropping it unregisters, and its [`Closer`] fires when the identity is revoked. Watch streams
//! are bounded per identity ([`watch_admitted`]), so one certificate cannot pin unbounded streams.
//!
//! The same bookkeeping keeps endpoints live. An endpoint registered with `RegisterEndpoint` is held by
//! the TLS connection the call came on (a proxy registers and watches on one connection); when that
//! connection goes (the proxy was killed, its host vanished), the endpoint is lost and, after a grace,
//! [`expired`] names it for withdrawal. A proxy that reconnects registers again and holds it anew. Only
//! the server assigns connection keys, and only the endpoint's own identity may register it, so no other
//! identity can hold it alive.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use quicmesh_transport::identity::SpiffeId;
use tokio_util::sync::CancellationToken;

/// Default bound on concurrent Watch streams of one identity.
pub const DEFAULT_MAX_WATCHES: usize = 8;

/// A connected proxy as `ctl proxies` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    /// Name it gave (capped).
    pub proxy_name: String,
    /// Its identity.
    pub spiffe_id: String,
    /// TCP peer address.
    pub peer_address: String,
    /// Version of the last snapshot sent.
    pub config_version: u64,
    /// When the stream opened, Unix seconds.
    pub connected_unix: i64,
    /// Expiry of the certificate it connected with.
    pub cert_not_after_unix: i64,
}

/// Whether one more Watch stream is admitted for an identity that holds `current` of at most `max`.
pub fn watch_admitted(current: usize, max: usize) -> bool {
    current < max
}

/// Why a Watch stream was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchRefusal {
    /// The identity holds the maximum.
    #[error("{id} already holds {max} Watch streams, the most one identity may hold")]
    TooMany {
        /// The identity.
        id: String,
        /// The bound.
        max: usize,
    },
    /// The identity is revoked.
    #[error("identity {0} is revoked")]
    Revoked(String),
}

/// An endpoint registered over one of this controller's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The identity that registered it.
    pub spiffe_id: String,
    /// Its record's version as that registration stored it.
    pub version: u64,
    /// Key of the connection holding it.
    pub connection: u64,
    /// When that connection went; `None` while it is open.
    pub lost_at: Option<Instant>,
}

/// An endpoint to withdraw: its key (`namespace/name`) and the record it must still be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// `namespace/name`.
    pub key: String,
    /// The identity that registered it.
    pub spiffe_id: String,
    /// The record version the withdrawal expects (compare-and-set).
    pub version: u64,
}

/// The endpoints whose connection went at least `grace` before `now`.
pub fn expired<'a>(
    held: impl IntoIterator<Item = (&'a String, &'a Held)>,
    now: Instant,
    grace: Duration,
) -> Vec<Expired> {
    let mut out: Vec<Expired> = held
        .into_iter()
        .filter(|(_, h)| {
            h.lost_at
                .is_some_and(|t| now.saturating_duration_since(t) >= grace)
        })
        .map(|(k, h)| Expired {
            key: k.clone(),
            spiffe_id: h.spiffe_id.clone(),
            version: h.version,
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[derive(Default)]
struct Inner {
    next: u64,
    proxies: HashMap<u64, ProxyStatus>,
    watches: HashMap<SpiffeId, usize>,
    closers: HashMap<SpiffeId, HashMap<u64, CancellationToken>>,
    revoked: HashSet<SpiffeId>,
    /// Endpoints held by connections, by `namespace/name`.
    held: HashMap<String, Held>,
}

/// The registry.
pub struct Registry {
    inner: Mutex<Inner>,
    max_watches: usize,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("max_watches", &self.max_watches)
            .finish_non_exhaustive()
    }
}

/// Fires when the identity that holds it is revoked.
#[derive(Debug, Clone)]
pub struct Closer(CancellationToken);

impl Closer {
    /// Completes once the identity is revoked.
    pub async fn closed(&self) {
        self.0.cancelled().await
    }

    /// An owned future of [`Closer::closed`], for poll-based code.
    pub fn closed_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.0.clone().cancelled_owned()
    }

    /// Whether it fired.
    pub fn is_closed(&self) -> bool {
        self.0.is_cancelled()
    }
}

impl Registry {
    /// A registry admitting `max_watches` Watch streams per identity.
    pub fn new(max_watches: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            max_watches,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_closer(inner: &mut Inner, id: &SpiffeId) -> (u64, Closer) {
        inner.next += 1;
        let key = inner.next;
        let token = CancellationToken::new();
        inner
            .closers
            .entry(id.clone())
            .or_default()
            .insert(key, token.clone());
        (key, Closer(token))
    }

    fn remove_closer(inner: &mut Inner, id: &SpiffeId, key: u64) {
        if let Some(m) = inner.closers.get_mut(id) {
            m.remove(&key);
            if m.is_empty() {
                inner.closers.remove(id);
            }
        }
    }

    /// Registers a TLS connection of `id`; `None` if `id` is revoked (drop the connection).
    pub fn connection(self: &Arc<Self>, id: &SpiffeId) -> Option<ConnectionGuard> {
        let mut inner = self.lock();
        if inner.revoked.contains(id) {
            return None;
        }
        let (key, closer) = Self::add_closer(&mut inner, id);
        Some(ConnectionGuard {
            registry: self.clone(),
            id: id.clone(),
            key,
            closer,
        })
    }

    /// Admits a Watch stream of `id` from proxy `name` at `remote`.
    pub fn watch(
        self: &Arc<Self>,
        name: &str,
        remote: SocketAddr,
        id: &SpiffeId,
        cert_not_after_unix: i64,
        now_unix: i64,
    ) -> Result<WatchGuard, WatchRefusal> {
        let mut inner = self.lock();
        if inner.revoked.contains(id) {
            return Err(WatchRefusal::Revoked(id.to_string()));
        }
        let current = inner.watches.get(id).copied().unwrap_or(0);
        if !watch_admitted(current, self.max_watches) {
            return Err(WatchRefusal::TooMany {
                id: id.to_string(),
                max: self.max_watches,
            });
        }
        inner.watches.insert(id.clone(), current + 1);
        let (key, closer) = Self::add_closer(&mut inner, id);
        inner.proxies.insert(
            key,
            ProxyStatus {
                proxy_name: name.chars().take(crate::error::LOG_CAP).collect(),
                spiffe_id: id.to_string(),
                peer_address: remote.to_string(),
                config_version: 0,
                connected_unix: now_unix,
                cert_not_after_unix,
            },
        );
        Ok(WatchGuard {
            registry: self.clone(),
            id: id.clone(),
            key,
            closer,
        })
    }

    /// Sets the revoked identities; everything the newly revoked ones hold is closed. Returns how many
    /// streams and connections were closed.
    pub fn set_revoked(&self, revoked: HashSet<SpiffeId>) -> usize {
        let mut inner = self.lock();
        let mut closed = 0;
        for id in revoked
            .difference(&inner.revoked)
            .cloned()
            .collect::<Vec<_>>()
        {
            if let Some(m) = inner.closers.get(&id) {
                for t in m.values() {
                    t.cancel();
                    closed += 1;
                }
            }
        }
        inner.revoked = revoked;
        closed
    }

    /// Whether `id` is revoked (as of the last published snapshot).
    pub fn is_revoked(&self, id: &SpiffeId) -> bool {
        self.lock().revoked.contains(id)
    }

    /// Connected proxies, by name then address.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        let mut v: Vec<_> = self.lock().proxies.values().cloned().collect();
        v.sort_by(|a, b| {
            a.proxy_name
                .cmp(&b.proxy_name)
                .then(a.peer_address.cmp(&b.peer_address))
        });
        v
    }

    /// Whether `id` has a Watch stream open (a connected proxy).
    pub fn is_watching(&self, id: &SpiffeId) -> bool {
        self.lock().watches.get(id).is_some_and(|n| *n > 0)
    }

    /// Live TLS connections and Watch streams of `id`.
    pub fn open_of(&self, id: &SpiffeId) -> usize {
        self.lock().closers.get(id).map_or(0, HashMap::len)
    }

    /// Records that `id`'s connection `connection` registered endpoint `key` as record `version`: it is
    /// held while that connection stays open (lost at once if it already went, or is 0: none).
    pub fn hold_endpoint(
        &self,
        key: &str,
        id: &SpiffeId,
        version: u64,
        connection: u64,
        now: Instant,
    ) {
        let mut inner = self.lock();
        let open = connection != 0
            && inner
                .closers
                .get(id)
                .is_some_and(|m| m.contains_key(&connection));
        inner.held.insert(
            key.to_owned(),
            Held {
                spiffe_id: id.to_string(),
                version,
                connection,
                lost_at: (!open).then_some(now),
            },
        );
    }

    /// Stops tracking endpoint `key` (withdrawn by its proxy); with `version`, only if it is still
    /// that record (a newer registration keeps its own tracking).
    pub fn release_endpoint(&self, key: &str, version: Option<u64>) {
        let mut inner = self.lock();
        if version.is_none_or(|v| inner.held.get(key).is_some_and(|h| h.version == v)) {
            inner.held.remove(key);
        }
    }

    /// Endpoints lost at least `grace` before `now`.
    pub fn expired_endpoints(&self, now: Instant, grace: Duration) -> Vec<Expired> {
        expired(&self.lock().held, now, grace)
    }

    /// The tracked endpoints, by key (for tests and diagnostics).
    pub fn held_endpoints(&self) -> Vec<(String, Held)> {
        let mut v: Vec<_> = self
            .lock()
            .held
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Keeps a TLS connection registered.
#[derive(Debug)]
pub struct ConnectionGuard {
    registry: Arc<Registry>,
    id: SpiffeId,
    key: u64,
    closer: Closer,
}

impl ConnectionGuard {
    /// Fires when the connection's identity is revoked.
    pub fn closer(&self) -> &Closer {
        &self.closer
    }

    /// The connection's key (never 0), which endpoints registered on it are held by.
    pub fn key(&self) -> u64 {
        self.key
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut inner = self.registry.lock();
        Registry::remove_closer(&mut inner, &self.id, self.key);
        for h in inner.held.values_mut() {
            if h.connection == self.key && h.lost_at.is_none() {
                h.lost_at = Some(now);
            }
        }
    }
}

/// Keeps a Watch stream registered (and listed by `ctl proxies`).
#[derive(Debug)]
pub struct WatchGuard {
    registry: Arc<Registry>,
    id: SpiffeId,
    key: u64,
    closer: Closer,
}

impl WatchGuard {
    /// Records the snapshot version last sent.
    pub fn sent(&self, version: u64) {
        if let Some(p) = self.registry.lock().proxies.get_mut(&self.key) {
            p.config_version = version;
        }
    }

    /// Fires when the stream's identity is revoked.
    pub fn closer(&self) -> &Closer {
        &self.closer
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        inner.proxies.remove(&self.key);
        if let Some(n) = inner.watches.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.watches.remove(&self.id);
            }
        }
        Registry::remove_closer(&mut inner, &self.id, self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("t", "shop", sa).expect("id")
    }

    #[test]
    fn watches_are_bounded_per_identity_and_released_on_drop() {
        let r = Registry::new(2);
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let a = r.watch("p", addr, &id("a"), 0, 0).expect("1st");
        let b = r.watch("p", addr, &id("a"), 0, 0).expect("2nd");
        assert!(matches!(
            r.watch("p", addr, &id("a"), 0, 0),
            Err(WatchRefusal::TooMany { max: 2, .. })
        ));
        let _other = r.watch("p", addr, &id("b"), 0, 0).expect("other identity");
        assert_eq!(r.proxies().len(), 3);
        drop(a);
        let _c = r.watch("p", addr, &id("a"), 0, 0).expect("after a release");
        drop(b);
        assert!(watch_admitted(0, 1) && !watch_admitted(1, 1));
    }

    #[test]
    fn revocation_closes_what_the_identity_holds_and_refuses_more() {
        let r = Registry::new(8);
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let conn = r.connection(&id("a")).expect("conn");
        let watch = r.watch("p", addr, &id("a"), 0, 0).expect("watch");
        let other = r.connection(&id("b")).expect("other");
        assert_eq!(r.open_of(&id("a")), 2);
        assert_eq!(r.set_revoked(HashSet::from([id("a")])), 2);
        assert!(conn.closer().is_closed() && watch.closer().is_closed());
        assert!(!other.closer().is_closed());
        assert!(r.connection(&id("a")).is_none());
        assert!(matches!(
            r.watch("p", addr, &id("a"), 0, 0),
            Err(WatchRefusal::Revoked(_))
        ));
        // Setting the same set again closes nothing more.
        assert_eq!(r.set_revoked(HashSet::from([id("a")])), 0);
        drop((conn, watch));
        assert_eq!(r.open_of(&id("a")), 0);
    }

    fn held(version: u64, lost_at: Option<Instant>) -> Held {
        Held {
            spiffe_id: "spiffe://t/ns/shop/sa/a".into(),
            version,
            connection: 1,
            lost_at,
        }
    }

    #[test]
    fn endpoints_expire_a_grace_after_their_connection_went() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(1);
        let m: HashMap<String, Held> = [
            ("shop/live".to_owned(), held(3, None)),
            ("shop/just-lost".to_owned(), held(4, Some(t0))),
            (
                "shop/lost-earlier".to_owned(),
                held(5, Some(t0 + Duration::from_millis(300))),
            ),
        ]
        .into();
        assert!(expired(&m, t0, grace).is_empty());
        assert!(expired(&m, t0 + Duration::from_millis(999), grace).is_empty());
        let at_grace = expired(&m, t0 + grace, grace);
        assert_eq!(
            at_grace,
            vec![Expired {
                key: "shop/just-lost".into(),
                spiffe_id: "spiffe://t/ns/shop/sa/a".into(),
                version: 4,
            }]
        );
        let later: Vec<_> = expired(&m, t0 + Duration::from_secs(60), grace)
            .into_iter()
            .map(|e| (e.key, e.version))
            .collect();
        assert_eq!(
            later,
            vec![
                ("shop/just-lost".into(), 4),
                ("shop/lost-earlier".into(), 5)
            ],
            "a live endpoint never expires"
        );
    }

    #[test]
    fn an_endpoint_is_held_by_its_connection_and_released_only_as_the_same_record() {
        let r = Registry::new(8);
        let t0 = Instant::now();
        let grace = Duration::from_secs(1);
        let c1 = r.connection(&id("a")).expect("conn");
        let c2 = r.connection(&id("a")).expect("conn");
        // Registered on c1; c2 (same identity, another proxy) going does not affect it.
        r.hold_endpoint("shop/a-0", &id("a"), 7, c1.key(), t0);
        drop(c2);
        assert!(r.expired_endpoints(t0 + grace * 10, grace).is_empty());
        // c1 goes: lost now, expired after the grace.
        drop(c1);
        let lost = r.held_endpoints()[0].1.lost_at.expect("lost");
        assert!(r.expired_endpoints(lost, grace).is_empty());
        assert_eq!(r.expired_endpoints(lost + grace, grace)[0].version, 7);
        // Registered again (a reconnect) on a new connection: live again, as the new record; the
        // withdrawal of the old record releases nothing.
        let c3 = r.connection(&id("a")).expect("conn");
        r.hold_endpoint("shop/a-0", &id("a"), 9, c3.key(), t0);
        assert!(r.expired_endpoints(lost + grace * 10, grace).is_empty());
        r.release_endpoint("shop/a-0", Some(7));
        assert_eq!(r.held_endpoints().len(), 1);
        r.release_endpoint("shop/a-0", Some(9));
        assert!(r.held_endpoints().is_empty());
        // No connection (0) or one already gone: lost at once.
        r.hold_endpoint("shop/a-1", &id("a"), 10, 0, t0);
        r.hold_endpoint("shop/a-2", &id("a"), 11, 12345, t0);
        assert_eq!(r.expired_endpoints(t0 + grace, grace).len(), 2);
        // Another identity's connection key does not hold it either.
        let other = r.connection(&id("b")).expect("conn");
        r.hold_endpoint("shop/a-3", &id("a"), 12, other.key(), t0);
        assert_eq!(r.expired_endpoints(t0 + grace, grace).len(), 3);
        r.release_endpoint("shop/a-1", None);
        assert_eq!(r.expired_endpoints(t0 + grace, grace).len(), 2);
    }
}
