//! TLS for the controller's gRPC listener and its clients, with rustls' `ring` provider only.
//!
//! We terminate TLS ourselves (tokio-rustls) instead of enabling tonic's TLS features, for two reasons:
//! tonic's TLS features pull `aws-lc-rs` unless chosen with care, and we need the verified client
//! certificate's SPIFFE ID in every request ([`PeerInfo`] as tonic connect info) plus a configuration that
//! changes at run time (root rotation, serving certificate renewal). Client certificates are optional at
//! the TLS layer (a bootstrapping proxy has none yet, an operator uses the admin token); each API decides
//! what credential it requires.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
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

use crate::{auth::PeerInfo, state::State};

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel backlog.
const MAX_HANDSHAKES: usize = 512;

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

/// The ring crypto provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM string.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The private key in a PEM string.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?
        .ok_or_else(|| TlsError::Pem("no PRIVATE KEY block".into()))
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

/// An accepted TLS connection, carrying who the peer proved to be.
pub struct TlsIo {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
        },
        // Chain verified but no SPIFFE ID: treated as no mesh identity.
        Some(Err(e)) => {
            tracing::debug!(%remote, error = %e, "client certificate without a mesh identity");
            PeerInfo {
                remote,
                spiffe_id: None,
                cert_not_after_unix: None,
            }
        }
        None => PeerInfo {
            remote,
            spiffe_id: None,
            cert_not_after_unix: None,
        },
    }
}

/// Accepts TCP connections, runs each TLS handshake (with a deadline) on its own task, and yields the
/// established connections for tonic's `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    state: Arc<State>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsIo, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
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
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(state.tls_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let info = peer_info(remote, &stream);
                        let _ = tx
                            .send(Ok(TlsIo {
                                inner: stream,
                                info,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
