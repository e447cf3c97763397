//! The controller's failures and the one place they become gRPC statuses.
//!
//! Handlers return [`ApiError`]; the mapping to `tonic::Status` codes lives here so every API answers the
//! same problem with the same code (a bad field is always `INVALID_ARGUMENT` naming the field).

use std::fmt;

use crate::{issuer::IssueError, model::FieldError, store::StoreError};

/// Longest part of a peer-supplied string that goes into a log line or an error message.
pub const LOG_CAP: usize = 128;

/// Displays a peer-supplied string capped at [`LOG_CAP`] characters, then `…(N bytes)` with its full
/// length, so an 8,000-character name cannot flood the logs.
#[derive(Clone, Copy)]
pub struct Capped<'a>(pub &'a str);

impl Capped<'_> {
    fn parts(&self) -> (&str, Option<usize>) {
        match self.0.char_indices().nth(LOG_CAP) {
            Some((cut, _)) => (&self.0[..cut], Some(self.0.len())),
            None => (self.0, None),
        }
    }
}

impl fmt::Display for Capped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts() {
            (s, None) => f.write_str(s),
            (s, Some(n)) => write!(f, "{s}…({n} bytes)"),
        }
    }
}

impl fmt::Debug for Capped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts() {
            (s, None) => write!(f, "{s:?}"),
            (s, Some(n)) => write!(f, "{s:?}…({n} bytes)"),
        }
    }
}

/// Why a controller operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field breaks a rule.
    #[error("{0}")]
    Invalid(#[from] FieldError),
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Create of something that exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A conditional write saw another version, or an operation does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No credential, or a credential that is not valid.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid credential that does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// Storage failed; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA failed.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// A per-caller limit is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// One resource of a batch failed; nothing of the batch was stored.
    #[error("{label}: {source} (nothing of the batch was stored)")]
    InBatch {
        /// Which resource, e.g. `resources[2] (Service shop/web)`.
        label: String,
        /// Why.
        source: Box<ApiError>,
    },
    /// Anything else on our side.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store failed to open or write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CA operation failed.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// The key-encryption key or a sealed root key is unusable.
    #[error(transparent)]
    KeyStore(#[from] crate::keystore::KeyStoreError),
    /// A setting conflicts with the data directory or is invalid.
    #[error("{0}")]
    Config(String),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A file or directory could not be created, read or secured.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl ApiError {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) | ApiError::Issue(IssueError::Identity { .. }) => {
                Code::PermissionDenied
            }
            ApiError::Issue(IssueError::Csr(_)) => Code::InvalidArgument,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::InBatch { source, .. } => source.code(),
            ApiError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            ApiError::Store(StoreError::Conflict) => Code::Aborted,
            ApiError::Store(StoreError::TooLarge(_)) => Code::InvalidArgument,
            ApiError::Store(_) | ApiError::Issue(_) | ApiError::Internal(_) => Code::Internal,
        }
    }

    /// Whether the store refused the write because another controller committed first.
    pub fn is_conflict(&self) -> bool {
        match self {
            ApiError::Store(StoreError::Conflict) => true,
            ApiError::InBatch { source, .. } => source.is_conflict(),
            _ => false,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::NotFound(m) => format!("{m} not found"),
            ApiError::AlreadyExists(m) => format!("{m} already exists"),
            ApiError::Issue(IssueError::Csr(m)) => format!("csr_pem: {m}"),
            ApiError::Issue(IssueError::Identity { requested, granted }) => {
                format!("csr_pem: the CSR asks for {requested} but the credential grants {granted}")
            }
            ApiError::InBatch { label, source } => {
                format!(
                    "{label}: {} (nothing of the batch was stored)",
                    source.message()
                )
            }
            e => e.to_string(),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let code = e.code();
        if code == tonic::Code::Internal {
            tracing::error!(error = %e, "request failed");
        }
        tonic::Status::new(code, e.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_strings_keep_128_chars_and_say_the_length() {
        assert_eq!(Capped("short").to_string(), "short");
        let long = "é".repeat(200);
        let shown = Capped(&long).to_string();
        assert!(shown.starts_with(&"é".repeat(128)));
        assert!(shown.ends_with("…(400 bytes)"), "{shown}");
        assert_eq!(format!("{:?}", Capped("a\"b")), "\"a\\\"b\"");
    }

    #[test]
    fn batch_errors_keep_the_code_and_name_the_resource() {
        let e = ApiError::InBatch {
            label: "resources[2] (Service shop/web)".into(),
            source: Box::new(FieldError::new("spec.ports", "at least one").into()),
        };
        let s = tonic::Status::from(e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message()
                .starts_with("resources[2] (Service shop/web): spec.ports"),
            "{}",
            s.message()
        );
    }
}
