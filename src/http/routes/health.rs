//! Liveness and readiness, outside the authenticated API.

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

/// The process can serve requests: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, body = Health),
    (status = 503, description = "database unreachable", body = crate::http::error::Problem)
))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    match state.services.db.ping().await {
        Ok(()) => Ok(Json(Health { status: "ready" })),
        Err(err) => {
            tracing::warn!(error = %err, "readiness check failed");
            Err(ApiError::unavailable(
                "database_unavailable",
                "the database is unreachable",
                2,
            ))
        }
    }
}
