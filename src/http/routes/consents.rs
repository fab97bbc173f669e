//! Consent records.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{decode_cursor, encode_cursor};
use crate::auth::rbac::WriteIntegrations;
use crate::http::error::ApiError;
use crate::http::extract::{ApiPath, ApiQuery, Authenticated, Authorized, ClientInfo};
use crate::http::AppState;
use crate::services::consents;
use crate::storage::consents::Consent;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsentView {
    pub id: Uuid,
    pub user_id: String,
    pub provider: String,
    pub integration_id: Option<Uuid>,
    pub scopes_granted: Vec<String>,
    /// Requested but not granted.
    pub scopes_denied: Vec<String>,
    /// The catalog's words for each requested scope, as the user was shown them.
    #[schema(value_type = Object)]
    pub descriptions_shown: serde_json::Value,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub granted_at: DateTime<Utc>,
    pub withdrawn_at: Option<DateTime<Utc>>,
}

impl From<Consent> for ConsentView {
    fn from(consent: Consent) -> Self {
        Self {
            id: consent.id,
            user_id: consent.user_id,
            provider: consent.provider,
            integration_id: consent.integration_id,
            scopes_granted: consent.scopes_granted.0,
            scopes_denied: consent.scopes_denied.0,
            descriptions_shown: consent.descriptions_shown.0,
            client_ip: consent.client_ip,
            user_agent: consent.user_agent,
            granted_at: consent.granted_at,
            withdrawn_at: consent.withdrawn_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsentList {
    pub items: Vec<ConsentView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsentParams {
    /// Another user's consents (admin only).
    pub user_id: Option<String>,
    pub cursor: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<u32>,
}

/// The caller's consent records (or, for admins, another user's with `user_id`, or all),
/// oldest first.
#[utoipa::path(get, path = "/api/v1/oauth/consents", tag = "consents", security(("bearer" = [])),
    params(ConsentParams),
    responses((status = 200, body = ConsentList), (status = 400, body = crate::http::error::Problem),
              (status = 401, body = crate::http::error::Problem), (status = 403, body = crate::http::error::Problem)))]
pub async fn list(
    State(state): State<AppState>,
    Authenticated(principal): Authenticated,
    ApiQuery(params): ApiQuery<ConsentParams>,
    ClientInfo(client): ClientInfo,
) -> Result<Json<ConsentList>, ApiError> {
    let after = decode_cursor(params.cursor.as_deref())?;
    let page = consents::list(
        &state.services,
        &principal,
        params.user_id.as_deref(),
        after,
        params.limit,
        &client,
    )
    .await?;
    Ok(Json(ConsentList {
        items: page.items.into_iter().map(ConsentView::from).collect(),
        next_cursor: page.next.map(encode_cursor),
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WithdrawResponse {
    pub consent: ConsentView,
    /// When the consent's integration was still connected: how its tokens were revoked
    /// (`revoked`, `pending`, `not_supported`, `nothing_to_revoke`, `abandoned`).
    pub integration_disconnected: Option<&'static str>,
}

/// Withdraws a consent; the integration that depends on it is disconnected. Idempotent.
#[utoipa::path(post, path = "/api/v1/oauth/consents/{id}/withdraw", tag = "consents",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Consent id")),
    responses((status = 200, body = WithdrawResponse), (status = 401, body = crate::http::error::Problem),
              (status = 403, body = crate::http::error::Problem), (status = 404, body = crate::http::error::Problem)))]
pub async fn withdraw(
    State(state): State<AppState>,
    Authorized(actor): Authorized<WriteIntegrations>,
    ApiPath(id): ApiPath<Uuid>,
    ClientInfo(client): ClientInfo,
) -> Result<Json<WithdrawResponse>, ApiError> {
    let (consent, revocation) = consents::withdraw(&state.services, &actor, id, &client).await?;
    Ok(Json(WithdrawResponse {
        consent: consent.into(),
        integration_disconnected: revocation.as_ref().map(|r| r.as_str()),
    }))
}
