//! Generated protobuf types shared by the proxy, the controller and the CLI.
//!
//! The `.proto` files under `proto/proto` are the wire contract; this crate only compiles them.

/// The quicmesh/1 tunnel stream framing between proxies.
pub mod tunnel {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/quicmesh.tunnel.v1.rs"));
}

/// The controller's proxy-facing (`ProxyApi`) and operator (`Admin`) gRPC APIs and the resources they carry.
pub mod controller {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/quicmesh.controller.v1.rs"));
}

/// A service with every kind of gRPC call, for tests and the load harness.
pub mod echo {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/quicmesh.echo.v1.rs"));
}

/// Encoded `FileDescriptorSet` of every quicmesh proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/quicmesh_descriptor.bin"));
