//! gRPC channels to the controller over rustls, shared by the proxy (controller mode) and `quicmesh ctl`.
//!
//! tonic is built without its TLS features (they would pull `aws-lc-rs`), so the TLS connection is made
//! here with tokio-rustls and handed to tonic as a custom connector. The caller brings the rustls client
//! configuration: a proxy presents its live mesh certificate through a resolver, `ctl` presents none.
//! Both the TCP connect and the TLS handshake carry deadlines; HTTP/2 keep-alives find a dead peer on
//! long Watch streams.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Deadline of the TCP connect, and separately of the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message a client accepts (snapshots of big meshes).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The address is not `host:port`.
    #[error("controller address {0:?}: {1}")]
    Address(String, String),
    /// The connection failed.
    #[error("cannot reach the controller at {0}: {1}")]
    Connect(String, String),
}

/// Opens an HTTP/2 channel over TLS to `addr` (`host:port`), verifying the server as `host`.
/// `request_timeout` bounds each call (None for long-lived streams such as Watch).
pub async fn connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    request_timeout: Option<Duration>,
) -> Result<Channel, ChannelError> {
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| ChannelError::Address(addr.into(), "expected host:port".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = ServerName::try_from(host)
        .map_err(|e| ChannelError::Address(addr.into(), e.to_string()))?;
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ChannelError::Address(addr.into(), e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(t) = request_timeout {
        endpoint = endpoint.timeout(t);
    }
    let connector = tls_connector(Arc::new(tokio_rustls::TlsConnector::from(tls)), server_name);
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| ChannelError::Connect(addr.into(), error_chain(&e)))
}

fn tls_connector(
    tls: Arc<tokio_rustls::TlsConnector>,
    server_name: ServerName<'static>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Future<
        Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error>,
    > + Send,
> + Clone {
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        let server_name = server_name.clone();
        async move {
            let authority = uri
                .authority()
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "no authority")
                })?
                .to_string();
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect timed out")
                })??;
            let _ = tcp.set_nodelay(true);
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(server_name, tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(TokioIo::new(stream))
        }
    })
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
