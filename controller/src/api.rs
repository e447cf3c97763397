//! The gRPC services: `ProxyApi` for proxies, `Admin` for operators, and the proto mapping they share.

pub mod admin;
pub mod convert;
pub mod proxy;
