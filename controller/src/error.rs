//! The controller's failures and the one place they become gRPC statuses.
//!
//! Handlers return [`ApiError`]; the mapping to `tonic::Status` codes lives here so every API answers the
//! same problem with the same code (a bad field is always `INVALID_ARGUMENT` naming the field).

use crate::{issuer::IssueError, model::FieldError, store::StoreError};

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
    /// Anything else on our side.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic::Status;
        match e {
            ApiError::Invalid(f) => Status::invalid_argument(f.to_string()),
            ApiError::NotFound(m) => Status::not_found(format!("{m} not found")),
            ApiError::AlreadyExists(m) => Status::already_exists(format!("{m} already exists")),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::Issue(IssueError::Csr(m)) => {
                Status::invalid_argument(format!("csr_pem: {m}"))
            }
            ApiError::Issue(IssueError::Identity { requested, granted }) => {
                Status::permission_denied(format!(
                    "csr_pem: the CSR asks for {requested} but the credential grants {granted}"
                ))
            }
            e @ (ApiError::Store(_) | ApiError::Issue(_) | ApiError::Internal(_)) => {
                tracing::error!(error = %e, "request failed");
                Status::internal(e.to_string())
            }
        }
    }
}
