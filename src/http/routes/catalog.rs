//! The scope catalog and features.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::rbac::{Administer, ReadIntegrations};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiPath, Authenticated, Authorized, ClientInfo};
use crate::http::AppState;
use crate::providers::catalog::{CatalogEntry, Sensitivity};
use crate::services::{catalog, integrations};
use crate::storage::scopes::ScopeEntry;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScopeView {
    pub scope: String,
    /// What granting it allows, in plain words (shown to users).
    pub description: String,
    /// `basic`, `sensitive` or `restricted` (Google's classification where it applies).
    pub sensitivity: String,
    /// Features this scope enables.
    pub features: Vec<String>,
    /// Requested on every authorization of this provider (the provider's default scopes, set
    /// in its definition or `OAUTH_PROVIDERS_FILE`; informational here).
    pub is_default: bool,
}

impl From<ScopeEntry> for ScopeView {
    fn from(entry: ScopeEntry) -> Self {
        Self {
            scope: entry.scope,
            description: entry.description,
            sensitivity: entry.sensitivity,
            features: entry.features.0,
            is_default: entry.is_default,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScopeList {
    pub items: Vec<ScopeView>,
}

/// A provider's scope catalog.
#[utoipa::path(get, path = "/api/v1/oauth/providers/{provider}/scopes", tag = "catalog",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "Provider name")),
    responses((status = 200, body = ScopeList), (status = 401, body = crate::http::error::Problem),
              (status = 404, description = "unknown_provider", body = crate::http::error::Problem)))]
pub async fn scopes(
    State(state): State<AppState>,
    _caller: Authenticated,
    ApiPath(provider): ApiPath<String>,
) -> Result<Json<ScopeList>, ApiError> {
    let items = catalog::for_provider(&state.services, &provider).await?;
    Ok(Json(ScopeList {
        items: items.into_iter().map(ScopeView::from).collect(),
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScopeBody {
    pub scope: String,
    pub description: String,
    /// `basic`, `sensitive` or `restricted`.
    #[schema(value_type = String)]
    pub sensitivity: Sensitivity,
    #[serde(default)]
    pub features: Vec<String>,
}

/// Adds or changes a catalog entry (admin). Built-in entries changed here keep the change
/// across restarts; entries declared in OAUTH_PROVIDERS_FILE are rewritten from it at start-up.
#[utoipa::path(post, path = "/api/v1/oauth/providers/{provider}/scopes", tag = "catalog",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "Provider name")),
    request_body = ScopeBody,
    responses((status = 200, body = ScopeView), (status = 400, body = crate::http::error::Problem),
              (status = 401, body = crate::http::error::Problem), (status = 403, body = crate::http::error::Problem),
              (status = 404, description = "unknown_provider", body = crate::http::error::Problem)))]
pub async fn put_scope(
    State(state): State<AppState>,
    Authorized(actor): Authorized<Administer>,
    ApiPath(provider): ApiPath<String>,
    ClientInfo(client): ClientInfo,
    ApiJson(body): ApiJson<ScopeBody>,
) -> Result<Json<ScopeView>, ApiError> {
    let entry = CatalogEntry {
        scope: body.scope,
        description: body.description,
        sensitivity: body.sensitivity,
        features: body.features,
    };
    let stored = catalog::put_entry(&state.services, &actor, &provider, entry, &client).await?;
    Ok(Json(stored.into()))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeatureView {
    pub feature: String,
    /// Provider → the minimal scopes serving this feature there.
    pub providers: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeatureList {
    pub items: Vec<FeatureView>,
}

/// Every feature, and which providers can serve it with which scopes.
#[utoipa::path(get, path = "/api/v1/oauth/features", tag = "catalog", security(("bearer" = [])),
    responses((status = 200, body = FeatureList), (status = 401, body = crate::http::error::Problem)))]
pub async fn features(
    State(state): State<AppState>,
    _caller: Authenticated,
) -> Result<Json<FeatureList>, ApiError> {
    let features = catalog::features(&state.services).await?;
    let items = features
        .into_iter()
        .map(|(feature, providers)| FeatureView { feature, providers })
        .collect();
    Ok(Json(FeatureList { items }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IntegrationFeatures {
    pub integration_id: Uuid,
    pub provider: String,
    /// Features the granted scopes enable.
    pub enabled: Vec<String>,
    /// Other features of this provider: the scopes still missing for each (ask for them with
    /// `POST /providers/{provider}/authorize` and `integration_id`).
    pub available: BTreeMap<String, Vec<String>>,
}

/// Which features an integration's granted scopes enable, and what the others need.
#[utoipa::path(get, path = "/api/v1/oauth/integrations/{id}/features", tag = "catalog",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Integration id")),
    responses((status = 200, body = IntegrationFeatures), (status = 401, body = crate::http::error::Problem),
              (status = 403, body = crate::http::error::Problem), (status = 404, body = crate::http::error::Problem)))]
pub async fn integration_features(
    State(state): State<AppState>,
    Authorized(actor): Authorized<ReadIntegrations>,
    ApiPath(id): ApiPath<Uuid>,
    ClientInfo(client): ClientInfo,
) -> Result<Json<IntegrationFeatures>, ApiError> {
    let integration = integrations::visible(&state.services, &actor, id, &client).await?;
    let status = catalog::integration_features(&state.services, &integration).await?;
    Ok(Json(IntegrationFeatures {
        integration_id: integration.id,
        provider: integration.provider,
        enabled: status.enabled,
        available: status.available,
    }))
}
