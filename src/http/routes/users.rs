//! Privacy: a user's data export and erasure.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::audit::AuditEventView;
use super::consents::ConsentView;
use super::integrations::IntegrationView;
use crate::http::error::ApiError;
use crate::http::extract::{ApiPath, Authenticated, ClientInfo};
use crate::http::AppState;
use crate::services::privacy::{self, Erasure};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExportView {
    pub user_id: String,
    pub exported_at: DateTime<Utc>,
    pub integrations: Vec<IntegrationView>,
    pub consents: Vec<ConsentView>,
    pub audit_events: Vec<AuditEventView>,
}

/// Everything stored about a user (the user themself, or an admin) — never token values.
#[utoipa::path(get, path = "/api/v1/oauth/users/{user_id}/export", tag = "privacy",
    security(("bearer" = [])),
    params(("user_id" = String, Path, description = "The host product's user id")),
    responses((status = 200, body = ExportView), (status = 401, body = crate::http::error::Problem),
              (status = 403, body = crate::http::error::Problem)))]
pub async fn export(
    State(state): State<AppState>,
    Authenticated(principal): Authenticated,
    ApiPath(user_id): ApiPath<String>,
    ClientInfo(client): ClientInfo,
) -> Result<Json<ExportView>, ApiError> {
    let export = privacy::export(&state.services, &principal, &user_id, &client).await?;
    Ok(Json(ExportView {
        user_id: export.user_id,
        exported_at: export.exported_at,
        integrations: export
            .integrations
            .into_iter()
            .map(IntegrationView::from)
            .collect(),
        consents: export.consents.into_iter().map(ConsentView::from).collect(),
        audit_events: export
            .audit_events
            .into_iter()
            .map(AuditEventView::from)
            .collect(),
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErasureView {
    pub user_id: String,
    pub provider_revocations_confirmed: u64,
    pub provider_revocations_unconfirmed: u64,
    pub integrations_deleted: u64,
    pub tokens_deleted: u64,
    pub consents_deleted: u64,
    pub pending_authorizations_deleted: u64,
    /// Audit rows kept with the user id, IP and user agent replaced by pseudonyms.
    pub audit_rows_pseudonymised: u64,
}

impl From<Erasure> for ErasureView {
    fn from(erasure: Erasure) -> Self {
        Self {
            user_id: erasure.user_id,
            provider_revocations_confirmed: erasure.provider_revocations_confirmed,
            provider_revocations_unconfirmed: erasure.provider_revocations_unconfirmed,
            integrations_deleted: erasure.deleted.integrations,
            tokens_deleted: erasure.deleted.tokens,
            consents_deleted: erasure.deleted.consents,
            pending_authorizations_deleted: erasure.deleted.pending_authorizations,
            audit_rows_pseudonymised: erasure.audit_rows_pseudonymised,
        }
    }
}

/// Erases a user (the user themself, or an admin): revokes every integration at its provider,
/// deletes tokens, pending authorizations, integrations and consents; audit rows are kept,
/// pseudonymised, and the audit chain still verifies.
#[utoipa::path(delete, path = "/api/v1/oauth/users/{user_id}", tag = "privacy",
    security(("bearer" = [])),
    params(("user_id" = String, Path, description = "The host product's user id")),
    responses((status = 200, body = ErasureView), (status = 401, body = crate::http::error::Problem),
              (status = 403, body = crate::http::error::Problem)))]
pub async fn erase(
    State(state): State<AppState>,
    Authenticated(principal): Authenticated,
    ApiPath(user_id): ApiPath<String>,
    ClientInfo(client): ClientInfo,
) -> Result<Json<ErasureView>, ApiError> {
    let erasure = privacy::erase(&state.services, &principal, &user_id, &client).await?;
    Ok(Json(erasure.into()))
}
