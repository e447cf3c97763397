//! The resource model lives in the transport crate, where proxies read the same resources from snapshots
//! and static mesh files; the controller uses it from there.

pub use quicmesh_transport::model::*;
