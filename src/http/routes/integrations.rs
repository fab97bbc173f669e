//! Reading integrations. Never returns token material.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{decode_cursor, encode_cursor};
use crate::auth::rbac::ReadIntegrations;
use crate::http::error::ApiError;
use crate::http::extract::{ApiPath, ApiQuery, Authorized, ClientInfo};
use crate::http::AppState;
use crate::services::integrations::{self, ListIntegrations};
use crate::storage::integrations::{Integration, IntegrationStatus};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IntegrationView {
    pub id: Uuid,
    pub user_id: String,
    pub provider: String,
    /// The provider's stable id of the connected account (never the email).
    pub provider_account_id: String,
    pub account_email: Option<String>,
    pub account_name: Option<String>,
    /// Provider-specific account details (Notion workspace, YouTube channel, Microsoft tenant).
    #[schema(value_type = Object)]
    pub account: serde_json::Value,
    pub status: IntegrationStatus,
    pub granted_scopes: Vec<String>,
    pub requested_scopes: Vec<String>,
    /// Requested but not granted (a user may untick scopes at the consent screen).
    pub missing_scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_refreshed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

impl From<Integration> for IntegrationView {
    fn from(integration: Integration) -> Self {
        let granted: BTreeSet<&String> = integration.granted_scopes.iter().collect();
        let missing_scopes = integration
            .requested_scopes
            .iter()
            .filter(|scope| !granted.contains(scope))
            .cloned()
            .collect();
        Self {
            id: integration.id,
            user_id: integration.user_id,
            provider: integration.provider,
            provider_account_id: integration.provider_account_id,
            account_email: integration.account_email,
            account_name: integration.account_name,
            account: integration.account_metadata,
            status: integration.status,
            granted_scopes: integration.granted_scopes,
            requested_scopes: integration.requested_scopes,
            missing_scopes,
            created_at: integration.created_at,
            updated_at: integration.updated_at,
            last_refreshed_at: integration.last_refreshed_at,
            last_error: integration.last_error,
            last_error_at: integration.last_error_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IntegrationList {
    pub items: Vec<IntegrationView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only this provider's integrations.
    pub provider: Option<String>,
    /// Only integrations in this status.
    pub status: Option<IntegrationStatus>,
    /// Another user's integrations (needs a role reaching every user: `admin`, `service`).
    pub user_id: Option<String>,
    /// Opaque cursor from a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<u32>,
}

/// Lists the caller's integrations (or, with `user_id`, another user's).
#[utoipa::path(get, path = "/api/v1/oauth/integrations", tag = "integrations",
    security(("bearer" = [])), params(ListParams),
    responses(
        (status = 200, body = IntegrationList),
        (status = 400, body = crate::http::error::Problem),
        (status = 401, body = crate::http::error::Problem),
        (status = 403, body = crate::http::error::Problem),
    ))]
pub async fn list(
    State(state): State<AppState>,
    Authorized(actor): Authorized<ReadIntegrations>,
    ClientInfo(client): ClientInfo,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<IntegrationList>, ApiError> {
    let query = ListIntegrations {
        user_id: params.user_id,
        provider: params.provider,
        status: params.status,
        after: decode_cursor(params.cursor.as_deref())?,
        limit: params.limit,
    };
    let page = integrations::list(&state.services, &actor, query, &client).await?;
    Ok(Json(IntegrationList {
        items: page.items.into_iter().map(IntegrationView::from).collect(),
        next_cursor: page.next.map(encode_cursor),
    }))
}

/// One integration; another user's is reported as not found.
#[utoipa::path(get, path = "/api/v1/oauth/integrations/{id}", tag = "integrations",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Integration id")),
    responses(
        (status = 200, body = IntegrationView),
        (status = 401, body = crate::http::error::Problem),
        (status = 403, body = crate::http::error::Problem),
        (status = 404, body = crate::http::error::Problem),
    ))]
pub async fn get(
    State(state): State<AppState>,
    Authorized(actor): Authorized<ReadIntegrations>,
    ApiPath(id): ApiPath<Uuid>,
    ClientInfo(client): ClientInfo,
) -> Result<Json<IntegrationView>, ApiError> {
    let integration = integrations::visible(&state.services, &actor, id, &client).await?;
    Ok(Json(integration.into()))
}
