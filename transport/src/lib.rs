//! The quicmesh data plane.

pub mod identity;
