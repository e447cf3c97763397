//! Workload identity: SPIFFE IDs, the certificates that carry them, and how peers are verified.

pub mod ca;
pub mod credentials;
pub mod inspect;
pub mod manager;
pub mod naming;
pub mod pem;
pub mod spiffe;
pub mod verify;

pub use ca::{CaError, CertificateAuthority, IssuedLeaf};
pub use credentials::{Credentials, CredentialsError, Leaf};
pub use naming::ServerNames;
pub use spiffe::{SpiffeId, SpiffeIdError};
