//! Workload identity: SPIFFE IDs, the certificates that carry them, and how peers are verified.

pub mod ca;
pub mod inspect;
pub mod spiffe;

pub use ca::{CaError, CertificateAuthority, IssuedLeaf};
pub use spiffe::{SpiffeId, SpiffeIdError};
