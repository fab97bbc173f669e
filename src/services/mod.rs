//! Business rules: no SQL, no HTTP types. Every operation on a user's data takes an
//! [`Actor`](crate::auth::rbac::Actor) proving the caller's permission.

pub mod integrations;
pub mod keys;
pub mod vault;

use crate::auth::rbac::Forbidden;
use crate::crypto::CryptoError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Absent, or owned by someone the caller may not see (the two are indistinguishable).
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    #[error("{detail}")]
    InvalidInput { code: &'static str, detail: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl ServiceError {
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidInput {
            code,
            detail: detail.into(),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
