//! `quicmesh bench`: the load-testing harness that shows, side by side and as ratios to a direct
//! connection, what quicmesh costs and where it wins.
//!
//! Pieces: matching servers ([`server`]), a load generator with closed and open (coordinated-omission
//! safe) loops over TCP, HTTP/1.1, HTTP/2 and gRPC ([`client`], [`load`]), bulk throughput and the raw QUIC
//! ceiling ([`bulk`]), the paths under test and their proxy processes ([`topology`]), the comparison
//! ([`compare`]), the packet-loss scenario in network namespaces ([`loss`]), and output ([`report`]).

pub mod bulk;
pub mod certs;
pub mod cli;
pub mod client;
pub mod compare;
pub mod gateway;
pub mod h3load;
pub mod ingress;
pub mod instructions;
pub mod load;
pub mod loss;
pub mod machine;
pub mod otlp_sink;
pub mod report;
pub mod reporters;
pub mod server;
pub mod topology;
pub mod ztunnel;

pub use cli::{BenchArgs, run};

/// Generated from `proto/bench.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("bench");
}
