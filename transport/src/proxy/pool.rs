//! The outbound connection pool: one QUIC connection per destination proxy and server set, shared by
//! every stream.
//!
//! Concurrent callers that need the same peer while it is being dialled wait on one shared handshake
//! instead of starting their own, so a burst of a thousand tunneled connections makes one handshake, and
//! a dead peer costs one handshake timeout, not a thousand. A failed or closed connection is replaced on
//! the next request. The pool keeps connections only: which endpoint to try is [`super::balance`]'s job.
//!
//! Certificate rotation: a connection remembers the generation of our leaf it was made with. Once the
//! leaf is renewed, the next request dials a fresh connection (so peers see the new certificate) and the
//! old one is retired: it takes no new streams and is closed once its last tunneled connection ends.
//!
//! A connection is keyed by the peer's address and the TLS server name naming the identities wanted
//! there ([`crate::identity::ServerNames::sni`]): a node gateway serves several identities on one
//! address and presents the one asked for. A pool dials with one local identity; a gateway holds one
//! pool per workload on a shared UDP endpoint, so connections are per (local identity, peer).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use quinn::{ConnectionError, Endpoint};

use super::lane::Lane;
use crate::{
    identity::{Credentials, SpiffeId, credentials::leaf_info},
    metrics::{Direction, Metrics, PeerMetrics, ReasonLabels},
    state::StateHandle,
};

/// A pooled connection with what we learned about its peer. While any clone of it lives, the
/// connection counts as in use and is not closed by a retirement.
#[derive(Debug, Clone)]
pub struct PeerConn {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// The verified peer identity.
    pub peer: SpiffeId,
    /// Counters of this peer.
    pub metrics: PeerMetrics,
    /// Control frames of this connection before its bulk bytes.
    pub lane: Arc<Lane>,
    _lease: Arc<Lease>,
}

/// One user of a pooled connection; counted while alive.
#[derive(Debug)]
struct Lease(Arc<AtomicUsize>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the pool keeps per connection.
#[derive(Debug, Clone)]
struct Pooled {
    conn: quinn::Connection,
    peer: SpiffeId,
    metrics: PeerMetrics,
    /// [`Credentials::generation`] when the handshake was made.
    generation: u64,
    in_use: Arc<AtomicUsize>,
    lane: Arc<Lane>,
}

impl Pooled {
    fn lease(&self) -> PeerConn {
        self.in_use.fetch_add(1, Ordering::AcqRel);
        PeerConn {
            conn: self.conn.clone(),
            peer: self.peer.clone(),
            metrics: self.metrics.clone(),
            lane: self.lane.clone(),
            _lease: Arc::new(Lease(self.in_use.clone())),
        }
    }
}

/// Why a connection to a peer could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// No handshake within the timeout.
    #[error("QUIC handshake with {0} timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    /// The handshake failed.
    #[error("QUIC handshake with {0} failed: {1}")]
    Handshake(SocketAddr, ConnectionError),
    /// quinn refused to start the connection.
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, quinn::ConnectError),
    /// The peer presented no usable SPIFFE certificate (should have been refused by the verifier).
    #[error("peer {0} presented no usable identity")]
    NoIdentity(SocketAddr),
}

impl DialError {
    /// Counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout(..) => "timeout",
            Self::Handshake(_, ConnectionError::TransportError(_)) => "tls",
            Self::Handshake(_, ConnectionError::ConnectionClosed(_)) => "refused_by_peer",
            Self::Handshake(..) => "connection_error",
            Self::Connect(..) => "connect",
            Self::NoIdentity(..) => "no_identity",
        }
    }
}

type Dial = Shared<BoxFuture<'static, Result<Pooled, DialError>>>;

/// Which pooled connection: the peer's address and the server name sent to it.
type Key = (SocketAddr, Arc<str>);

/// Outbound QUIC connections, keyed by peer address and server name.
pub struct Pool {
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    creds: Credentials,
    metrics: Metrics,
    /// Which peers are revoked: their pooled connections are not reused.
    state: StateHandle,
    slots: Mutex<HashMap<Key, Dial>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool dialling from `endpoint` with `client`, whose certificate comes from `creds`.
    pub fn new(
        endpoint: Endpoint,
        client: quinn::ClientConfig,
        creds: Credentials,
        state: StateHandle,
        metrics: Metrics,
    ) -> Self {
        Self {
            endpoint,
            client,
            creds,
            state,
            metrics,
            slots: Mutex::default(),
        }
    }

    /// The endpoint this pool dials from.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A live connection to `addr` asking for server name `sni`, dialling (or joining a dial in
    /// progress) if needed. Peers are identified by the SPIFFE ID they present, not by this name; it
    /// only tells a gateway which of its identities to present. (Session resumption is off, see
    /// `quic.rs`, so every connection is a full handshake with certificates.)
    pub async fn get(
        &self,
        addr: SocketAddr,
        sni: &Arc<str>,
        handshake_timeout: Duration,
    ) -> Result<PeerConn, DialError> {
        let generation = self.creds.generation();
        let key = (addr, sni.clone());
        let (dial, retired) = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let mut retired = None;
            let reusable = slots.get(&key).filter(|d| match d.peek() {
                None => true,
                Some(Ok(p)) if p.conn.close_reason().is_some() => {
                    if matches!(p.conn.close_reason(), Some(ConnectionError::Reset)) {
                        // The peer restarted and answered with a stateless reset.
                        self.metrics.endpoint.dead_connections.inc();
                    }
                    false
                }
                // Revoked after the handshake: redial, and the verifier refuses the peer.
                Some(Ok(p)) if self.state.load().is_revoked(&p.peer) => false,
                Some(Ok(p)) if p.generation != generation => {
                    retired = Some(p.clone());
                    false
                }
                Some(Ok(_)) => true,
                Some(Err(_)) => false,
            });
            let d = match reusable {
                Some(d) => d.clone(),
                None => {
                    let d = self.dial(addr, sni.clone(), handshake_timeout, generation);
                    slots.insert(key.clone(), d.clone());
                    d
                }
            };
            (d, retired)
        };
        if let Some(old) = retired {
            self.metrics.rotated_connections.inc();
            tokio::spawn(retire(old));
        }
        let res = dial.clone().await;
        match res {
            Ok(p) => Ok(p.lease()),
            Err(e) => {
                let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
                if slots.get(&key).is_some_and(|d| d.ptr_eq(&dial)) {
                    slots.remove(&key);
                }
                Err(e)
            }
        }
    }

    fn dial(&self, addr: SocketAddr, sni: Arc<str>, timeout: Duration, generation: u64) -> Dial {
        let endpoint = self.endpoint.clone();
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        async move {
            let res: Result<_, DialError> = async {
                let connecting = endpoint
                    .connect_with(client, addr, &sni)
                    .map_err(|e| DialError::Connect(addr, e))?;
                let conn = tokio::time::timeout(timeout, connecting)
                    .await
                    .map_err(|_| DialError::Timeout(addr, timeout))?
                    .map_err(|e| DialError::Handshake(addr, e))?;
                let peer = peer_identity(&conn).ok_or(DialError::NoIdentity(addr))?;
                Ok((conn, peer))
            }
            .await;
            match res {
                Ok((conn, peer)) => {
                    tracing::debug!(%addr, %peer, "QUIC connection established");
                    metrics.observe_handshake(Direction::Outbound, &conn);
                    metrics
                        .connections
                        .track(Direction::Outbound, peer.to_string(), conn.clone());
                    let pm = metrics.peer(Direction::Outbound, peer.as_str());
                    Ok(Pooled {
                        conn,
                        peer,
                        metrics: pm,
                        generation,
                        in_use: Arc::default(),
                        lane: Arc::default(),
                    })
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "QUIC connection failed");
                    metrics
                        .handshake_failures
                        .get_or_create(&ReasonLabels {
                            direction: Direction::Outbound,
                            reason: e.reason(),
                        })
                        .inc();
                    Err(e)
                }
            }
        }
        .boxed()
        .shared()
    }

    /// Closes a pooled connection whose peer is gone; the next request for its address redials.
    pub fn discard(&self, pc: &PeerConn) {
        if pc.conn.close_reason().is_none() {
            self.metrics.endpoint.dead_connections.inc();
            tracing::info!(peer = %pc.peer, remote = %pc.conn.remote_address(), "peer gone: closing the pooled connection");
            pc.conn.close(crate::tunnel::code::PEER_GONE, b"peer gone");
        }
    }

    /// The RTT of the live pooled connection to `addr` for server name `sni`, if there is one.
    pub fn rtt(&self, addr: &SocketAddr, sni: &Arc<str>) -> Option<Duration> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get(&(*addr, sni.clone()))?.peek() {
            Some(Ok(p)) if p.conn.close_reason().is_none() => Some(p.conn.rtt()),
            _ => None,
        }
    }

    /// Closes every pooled connection.
    pub fn close_all(&self) {
        for d in self.slots.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            if let (_, Some(Ok(p))) = (d.0, d.1.peek()) {
                p.conn.close(crate::tunnel::code::DRAINING, b"draining");
            }
        }
    }
}

/// How often a retired connection is checked for remaining users.
const RETIRE_CHECK: Duration = Duration::from_secs(1);

/// Closes a connection made under an older certificate once nobody has used it for two checks in a
/// row (a caller that picked it just before the retirement holds a lease within microseconds).
async fn retire(p: Pooled) {
    let mut idle = 0;
    loop {
        tokio::select! {
            _ = p.conn.closed() => return,
            _ = tokio::time::sleep(RETIRE_CHECK) => {}
        }
        if p.in_use.load(Ordering::Acquire) == 0 {
            idle += 1;
            if idle >= 2 {
                tracing::debug!(peer = %p.peer, "closing a connection made with our previous certificate");
                p.conn
                    .close(crate::tunnel::code::NO_ERROR, b"certificate rotated");
                return;
            }
        } else {
            idle = 0;
        }
    }
}

/// Reads the SPIFFE ID from a connection's verified peer certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Option<SpiffeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    leaf_info(certs.first()?).ok().map(|i| i.id)
}
