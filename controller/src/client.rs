//! Client side of the controller APIs over TLS, for `quicmesh ctl`, tests and benchmarks.
//!
//! tonic is built without its TLS features (they would pull `aws-lc-rs`), so connections are made here
//! with tokio-rustls and handed to tonic as a custom connector. The server is verified against the mesh
//! trust bundle by host name or IP (the controller's certificate carries both, besides its SPIFFE ID).

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use quicmesh_proto::controller::{admin_client::AdminClient, proxy_api_client::ProxyApiClient};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint, Uri},
};

use crate::tls;

/// Largest message a client accepts (snapshots of big meshes).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Default connect deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The address is not `host:port`.
    #[error("controller address {0:?}: {1}")]
    Address(String, String),
    /// The connection failed.
    #[error("cannot reach the controller at {0}: {1}")]
    Connect(String, String),
    /// The admin token cannot be sent as metadata.
    #[error("admin token holds characters not allowed in a header")]
    Token,
}

/// Opens a TLS channel to `addr` (`host:port`) trusting `bundle`, optionally presenting a client
/// certificate. `request_timeout` bounds each unary call (None for Watch streams).
pub async fn connect(
    addr: &str,
    bundle: &[String],
    client_cert: Option<(&str, &str)>,
    request_timeout: Option<Duration>,
) -> Result<Channel, ClientError> {
    let config = tls::client_config(bundle, client_cert)?;
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| ClientError::Address(addr.into(), "expected host:port".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| ClientError::Address(addr.into(), e.to_string()))?;
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Address(addr.into(), e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(t) = request_timeout {
        endpoint = endpoint.timeout(t);
    }
    let connector = tls_connector(
        Arc::new(tokio_rustls::TlsConnector::from(config)),
        server_name,
    );
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Connect(addr.into(), error_chain(&e)))
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
            let stream =
                tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, tls.connect(server_name, tcp))
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

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The admin client type.
pub type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;

/// An admin client sending `token` on every call.
pub fn admin(channel: Channel, token: &str) -> Result<Admin, ClientError> {
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::Token)?;
    Ok(AdminClient::with_interceptor(channel, BearerToken(value))
        .max_decoding_message_size(MAX_MESSAGE))
}

/// A proxy API client.
pub fn proxy(channel: Channel) -> ProxyApiClient<Channel> {
    ProxyApiClient::new(channel).max_decoding_message_size(MAX_MESSAGE)
}
