//! TLS for the controller's gRPC listener and its clients, with rustls' `ring` provider only.
//!
//! We terminate TLS ourselves (tokio-rustls) instead of enabling tonic's TLS features, for two reasons:
//! tonic's TLS features pull `aws-lc-rs` unless chosen with care, and we need the verified client
//! certificate's SPIFFE ID in every request ([`PeerInfo`] as tonic connect info) plus a configuration that
//! changes at run time (root rotation, serving certificate renewal). Client certificates are optional at
//! the TLS layer (a bootstrapping proxy has none yet, an operator uses the admin token); each API decides
//! what credential it requires.
//!
//! The accept loop never waits: each connection's handshake runs on its own task with a deadline, at
//! most [`Limits::max_handshakes`] at once and [`Limits::max_connections`] connections in all; past
//! either bound a new connection is closed at once (refused fast, not queued behind idle ones). A
//! connection that proved a mesh identity is registered ([`crate::registry`]) and closed when that
//! identity is revoked.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use quicmesh_transport::identity::inspect::CertInfo;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{
    auth::PeerInfo,
    registry::{ConnectionGuard, Registry},
};

/// How long a revoked identity's connection lives on after the revocation (its calls already refused).
const REVOKED_GRACE: Duration = Duration::from_millis(500);

/// Bounds of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; more are closed at once.
    pub max_handshakes: usize,
    /// Connections (handshaking or established) at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 1024,
            max_connections: 8192,
        }
    }
}

/// Whether a new connection is admitted given what is open: a pure rule, so it is tested without
/// sockets.
pub fn admit(handshaking: usize, connections: usize, limits: &Limits) -> bool {
    handshaking < limits.max_handshakes && connections < limits.max_connections
}

/// The serving configuration new connections use; swapped at renewal and rotation.
#[derive(Clone)]
pub struct ServingConfig(Arc<RwLock<Arc<ServerConfig>>>);

impl std::fmt::Debug for ServingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingConfig(..)")
    }
}

impl ServingConfig {
    /// Starts with `cfg`.
    pub fn new(cfg: Arc<ServerConfig>) -> Self {
        Self(Arc::new(RwLock::new(cfg)))
    }

    /// The current configuration.
    pub fn get(&self) -> Arc<ServerConfig> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces it for new connections.
    pub fn set(&self, cfg: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input is malformed.
    #[error("PEM: {0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The crypto provider: the proxies' one (ring only).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    quicmesh_transport::quic::provider()
}

/// Every certificate in a PEM string.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    quicmesh_transport::identity::pem::certs(pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))
}

/// The private key in a PEM string.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    quicmesh_transport::identity::pem::private_key(pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))
}

/// A root store holding every certificate of `bundle`.
pub fn root_store(bundle: &[String]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for pem in bundle {
        for c in certs_from_pem(pem)? {
            roots.add(c)?;
        }
    }
    Ok(roots)
}

/// The listener's configuration: our serving certificate, client certificates optional but, when sent,
/// verified against the trust bundle.
pub fn server_config(
    bundle: &[String],
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(bundle)?), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration trusting `bundle`, presenting `client` (`cert_pem`, `key_pem`) if given.
pub fn client_config(
    bundle: &[String],
    client: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(bundle)?);
    let mut cfg = match client {
        Some((cert, key)) => {
            builder.with_client_auth_cert(certs_from_pem(cert)?, key_from_pem(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Counts a live connection until dropped.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Self(c.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted TLS connection, carrying who the peer proved to be. Reads and writes fail once its
/// identity is revoked, which ends the connection and every call on it.
pub struct TlsIo {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    revoked: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    _registered: Option<ConnectionGuard>,
    _counted: Counted,
}

impl TlsIo {
    fn check_revoked(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(f) = &mut self.revoked
            && f.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer's identity was revoked",
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for TlsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo").field("info", &self.info).finish()
    }
}

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn peer_info(remote: SocketAddr, stream: &TlsStream<TcpStream>) -> PeerInfo {
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|der| CertInfo::from_der(der));
    match leaf {
        Some(Ok(info)) => PeerInfo {
            remote,
            spiffe_id: Some(info.spiffe_id),
            cert_not_after_unix: Some(info.not_after.unix_timestamp()),
            connection: 0,
        },
        // Chain verified but no SPIFFE ID: treated as no mesh identity.
        Some(Err(e)) => {
            tracing::debug!(%remote, error = %e, "client certificate without a mesh identity");
            PeerInfo {
                remote,
                spiffe_id: None,
                cert_not_after_unix: None,
                connection: 0,
            }
        }
        None => PeerInfo {
            remote,
            spiffe_id: None,
            cert_not_after_unix: None,
            connection: 0,
        },
    }
}

/// Accepts TCP connections, runs each TLS handshake (with a deadline) on its own task, and yields the
/// established connections for tonic's `serve_with_incoming`. Never blocks accepting: connections past
/// the limits are closed at once.
pub fn incoming(
    listener: TcpListener,
    config: ServingConfig,
    registry: Arc<Registry>,
    limits: Limits,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsIo, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let handshaking = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        let mut refused: u64 = 0;
        loop {
            let accepted = tokio::select! {
                // The server is gone: stop accepting.
                () = tx.closed() => return,
                r = listener.accept() => r,
            };
            let (tcp, remote) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if !admit(
                handshaking.load(Ordering::Acquire),
                connections.load(Ordering::Acquire),
                &limits,
            ) {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%remote, refused, ?limits, "connection refused: listener at its limits");
                }
                drop(tcp);
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.get());
            let tx = tx.clone();
            let counted = Counted::new(&connections);
            let in_handshake = Counted::new(&handshaking);
            let registry = registry.clone();
            tokio::spawn(async move {
                let done =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                drop(in_handshake);
                let stream = match done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let mut info = peer_info(remote, &stream);
                let registered = match &info.spiffe_id {
                    Some(id) => match registry.connection(id) {
                        Some(g) => Some(g),
                        None => {
                            tracing::info!(%remote, %id, "connection of a revoked identity closed");
                            return;
                        }
                    },
                    None => None,
                };
                if let Some(g) = &registered {
                    info.connection = g.key();
                }
                let revoked = registered.as_ref().map(|g| {
                    let closed = g.closer().closed_owned();
                    // The grace lets a Watch stream deliver its PERMISSION_DENIED before the
                    // connection goes; new calls are refused meanwhile (the identity is revoked).
                    Box::pin(async move {
                        closed.await;
                        tokio::time::sleep(REVOKED_GRACE).await;
                    }) as Pin<Box<dyn Future<Output = ()> + Send>>
                });
                let _ = tx
                    .send(Ok(TlsIo {
                        inner: stream,
                        info,
                        revoked,
                        _registered: registered,
                        _counted: counted,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_bounds_handshakes_and_connections() {
        let l = Limits {
            handshake_timeout: Duration::from_secs(1),
            max_handshakes: 2,
            max_connections: 3,
        };
        assert!(admit(0, 0, &l));
        assert!(admit(1, 2, &l));
        assert!(!admit(2, 2, &l), "handshakes full");
        assert!(!admit(0, 3, &l), "connections full");
    }
}
