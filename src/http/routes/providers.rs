//! `GET /api/v1/oauth/providers`.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::auth::rbac::Administer;
use crate::http::extract::Authenticated;
use crate::http::AppState;
use crate::providers::{Protocol, Provider};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProviderView {
    /// Name used in routes (`google`, `microsoft`, `notion`, `youtube`, or a declared one).
    pub name: String,
    pub display_name: String,
    pub protocol: Protocol,
    /// Client id and secret are set.
    pub configured: bool,
    /// Environment variables still to set before the provider can be used (shown to callers
    /// with the `admin` permission only: operators' configuration is not end users' business).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_variables: Option<Vec<String>>,
    pub supports_pkce: bool,
    pub supports_revocation: bool,
    pub default_scopes: Vec<String>,
    /// The redirect URI to register at the provider.
    pub redirect_uri: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProviderList {
    pub items: Vec<ProviderView>,
}

/// Lists every provider, configured or not.
#[utoipa::path(get, path = "/api/v1/oauth/providers", tag = "providers",
    security(("bearer" = [])),
    responses(
        (status = 200, body = ProviderList),
        (status = 401, body = crate::http::error::Problem),
    ))]
pub async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Json<ProviderList> {
    let is_admin = caller.authorize::<Administer>().is_ok();
    let items = state
        .services
        .providers
        .iter()
        .map(|provider| view(&state, provider, is_admin))
        .collect();
    Json(ProviderList { items })
}

fn view(state: &AppState, provider: &Provider, is_admin: bool) -> ProviderView {
    let definition = &provider.definition;
    ProviderView {
        name: definition.name.clone(),
        display_name: definition.display_name.clone(),
        protocol: definition.protocol(),
        configured: provider.is_configured(),
        missing_variables: is_admin.then(|| provider.missing_variables()),
        supports_pkce: definition.pkce,
        supports_revocation: definition.revocation_url.is_some(),
        default_scopes: definition.default_scopes.clone(),
        redirect_uri: state.services.redirect_uri(&definition.name),
    }
}
