//! The quicmesh data plane: sidecar proxies that tunnel TCP over mutually authenticated QUIC.
//!
//! A byte's path: app → [`proxy::outbound`] (TCP listener) → [`proxy::pool`] (one QUIC connection per
//! peer proxy) → a stream opened with a [`tunnel`] header → the peer's [`proxy::inbound`] → its app.
//! Identity and trust live in [`identity`]; every QUIC setting in [`quic`].

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod clip;
pub mod config;
pub mod control;
pub mod gateway;
pub mod grpc;
pub mod http_server;
pub mod identity;
pub mod ingress;
pub mod l7;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod quic;
pub mod ratelimit;
pub mod retry;
pub mod run;
pub mod state;
pub mod trace;
pub mod tunnel;

pub use config::{ConfigError, ProxyConfig};
pub use proxy::{Proxy, ProxyAddresses};
