//! Liveness and readiness, outside the authenticated API.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::http::error::ApiError;
use crate::http::AppState;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness answers within this, well inside usual probe timeouts, rather than after the
/// pool's (longer) acquire timeout when the database is gone.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The process can serve requests: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, body = Health),
    (status = 503, description = "database unreachable", body = crate::http::error::Problem)
))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    let failure = match tokio::time::timeout(READY_TIMEOUT, state.services.db.ping()).await {
        Ok(Ok(())) => return Ok(Json(Health { status: "ready" })),
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no answer within {READY_TIMEOUT:?}"),
    };
    tracing::warn!(error = %failure, "readiness check failed");
    Err(ApiError::unavailable(
        "database_unavailable",
        "the database is unreachable",
        2,
    ))
}
