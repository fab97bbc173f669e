//! The single mapping from every layer's errors to HTTP: RFC 9457 `application/problem+json`
//! with a stable, machine-readable `code`.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::jwt::AuthError;
use crate::auth::rbac::Forbidden;
use crate::services::ServiceError;

pub const PROBLEM_JSON: &str = "application/problem+json";
const REALM: &str = "oauth-manager";

/// An error response. Build it from a layer's error with `?`/`From`; `detail` is shown to the
/// caller, so it never carries secrets or internal error text.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    www_authenticate: Option<String>,
    retry_after_seconds: Option<u64>,
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`urn:oauth-manager:problem:<code>`).
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable error code.
    pub code: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            www_authenticate: None,
            retry_after_seconds: None,
        }
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// A failure whose cause is logged, never shown.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the request failed on our side; it has been logged",
        )
    }

    pub fn unavailable(
        code: &'static str,
        detail: impl Into<String>,
        retry_after_seconds: u64,
    ) -> Self {
        Self {
            retry_after_seconds: Some(retry_after_seconds),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
        }
    }

    /// 429 `rate_limited`: the caller may try again after `retry_after_seconds`.
    pub fn rate_limited(retry_after_seconds: u64) -> Self {
        Self {
            retry_after_seconds: Some(retry_after_seconds),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests; retry after the number of seconds in Retry-After",
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            problem_type: format!("urn:oauth-manager:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code.to_owned(),
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, json).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(value) = self
            .www_authenticate
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
        if let Some(seconds) = self.retry_after_seconds {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        if let AuthError::KeysUnavailable(_) = err {
            return Self::unavailable(
                "jwks_unavailable",
                "the token signing keys cannot be fetched right now",
                5,
            );
        }
        // RFC 6750 §3: no error code when no credentials were sent at all.
        let challenge = match err {
            AuthError::Missing => format!("Bearer realm=\"{REALM}\""),
            _ => format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{err}\""
            ),
        };
        let code = match err {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "token_expired",
            _ => "invalid_token",
        };
        Self {
            www_authenticate: Some(challenge),
            ..Self::new(StatusCode::UNAUTHORIZED, code, err.to_string())
        }
    }
}

impl From<Forbidden> for ApiError {
    fn from(err: Forbidden) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", err.to_string())
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::NotFound => Self::not_found(),
            ServiceError::UnknownProvider(_) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_provider", err.to_string())
            }
            ServiceError::ProviderNotConfigured { .. } => Self::new(
                StatusCode::CONFLICT,
                "provider_not_configured",
                err.to_string(),
            ),
            ServiceError::Forbidden(forbidden) => forbidden.into(),
            ServiceError::InvalidInput { code, detail } => Self::bad_request(code, detail),
            ServiceError::ReauthRequired { .. } => {
                Self::new(StatusCode::CONFLICT, "reauth_required", err.to_string())
            }
            ServiceError::IntegrationRevoked => {
                Self::new(StatusCode::CONFLICT, "integration_revoked", err.to_string())
            }
            ServiceError::ProviderUnavailable {
                detail,
                retry_after_seconds,
            } => Self::unavailable("provider_unavailable", detail, retry_after_seconds),
            ServiceError::RefreshUnavailable => {
                Self::new(StatusCode::CONFLICT, "refresh_unavailable", err.to_string())
            }
            ServiceError::Internal(cause) => Self::internal(&cause),
            ServiceError::ProviderMisconfigured { .. } => Self::new(
                StatusCode::BAD_GATEWAY,
                "provider_misconfigured",
                err.to_string(),
            ),
            ServiceError::Storage(storage) if storage.is_unavailable() => {
                tracing::warn!(error = %storage, "database unavailable");
                Self::unavailable(
                    "database_unavailable",
                    "the database is unavailable; retry shortly",
                    2,
                )
            }
            ServiceError::Storage(storage) => Self::internal(&storage),
            ServiceError::Crypto(crypto) => Self::internal(&crypto),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body exceeds the 64 KiB limit",
            )
        } else {
            Self::bad_request("invalid_body", rejection.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request("invalid_query", rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request("invalid_path", rejection.body_text())
    }
}
