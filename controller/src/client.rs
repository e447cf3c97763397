//! Client side of the controller APIs over TLS, for `quicmesh ctl`, tests and benchmarks.
//!
//! tonic is built without its TLS features (they would pull `aws-lc-rs`), so connections are made here
//! with tokio-rustls and handed to tonic as a custom connector ([`quicmesh_transport::grpc`], shared with the
//! proxy's controller mode). The server is verified against the mesh
//! trust bundle by host name or IP (the controller's certificate carries both, besides its SPIFFE ID).

use std::time::Duration;

use quicmesh_proto::controller::{admin_client::AdminClient, proxy_api_client::ProxyApiClient};
use quicmesh_transport::grpc;
use tonic::{
    metadata::MetadataValue, service::interceptor::InterceptedService, transport::Channel,
};

use crate::tls;

pub use grpc::{CONNECT_TIMEOUT, MAX_MESSAGE};

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
    grpc::connect(addr, config, request_timeout)
        .await
        .map_err(|e| match e {
            grpc::ChannelError::Address(a, m) => ClientError::Address(a, m),
            grpc::ChannelError::Connect(a, m) => ClientError::Connect(a, m),
        })
}

pub use grpc::error_chain;

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
