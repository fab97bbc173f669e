//! Tokens for backends, refresh on request, disconnect.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::rbac::{ReadIntegrations, ReadTokens, WriteIntegrations};
use crate::http::error::ApiError;
use crate::http::extract::{ApiPath, Authenticated, Authorized, ClientInfo, OptionalJson};
use crate::http::AppState;
use crate::services::disconnect::{self, ProviderRevocation};
use crate::services::tokens::{self, Issued, IssuedToken};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Absent when the provider did not say (Notion): use the token until an API call
    /// answers 401, then `POST …/refresh` with `rejected_access_token`.
    pub expires_at: Option<DateTime<Utc>>,
    pub scopes: Vec<String>,
    pub provider: String,
    pub provider_account_id: String,
}

/// A working access token, refreshed first when it has expired or is about to.
#[utoipa::path(get, path = "/api/v1/oauth/integrations/{id}/token", tag = "tokens",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Integration id")),
    responses(
        (status = 200, body = TokenResponse),
        (status = 401, body = crate::http::error::Problem),
        (status = 403, description = "needs tokens:read", body = crate::http::error::Problem),
        (status = 404, body = crate::http::error::Problem),
        (status = 409, description = "reauth_required (run the connect flow again) or integration_revoked", body = crate::http::error::Problem),
        (status = 502, description = "provider_misconfigured", body = crate::http::error::Problem),
        (status = 503, description = "provider_unavailable, with Retry-After", body = crate::http::error::Problem),
    ))]
pub async fn token(
    State(state): State<AppState>,
    Authorized(actor): Authorized<ReadTokens>,
    ApiPath(id): ApiPath<Uuid>,
    ClientInfo(client): ClientInfo,
) -> Result<Response, ApiError> {
    let issued = tokens::access_token(&state.services, &actor, id, &client).await?;
    // Rendered once per cached token set, whoever asks (the same bytes `Json` would write).
    let body = issued
        .answer(|token| serde_json::to_vec(&TokenResponse::from(token)))
        .map_err(|err| ApiError::internal(&format!("token answer not rendered: {err}")))?;
    Ok(([(header::CONTENT_TYPE, JSON)], body).into_response())
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");

impl From<&Issued> for TokenResponse {
    fn from(issued: &Issued) -> Self {
        Self {
            access_token: issued.access_token.expose_secret().to_owned(),
            token_type: issued.token_type.clone(),
            expires_at: issued.expires_at,
            scopes: issued.scopes.clone(),
            provider: issued.provider.clone(),
            provider_account_id: issued.provider_account_id.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    /// The access token a provider API just rejected (401). The service refreshes only if it
    /// is still the stored one, so many callers reporting the same rejection cause one refresh.
    pub rejected_access_token: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RefreshResponse {
    pub integration: super::integrations::IntegrationView,
    /// The current token, for callers with `tokens:read` on this integration.
    pub token: Option<TokenResponse>,
}

/// Refreshes now (`tokens:read` or `integrations:read`: backends, owners, `service`, `admin`). At most one refresh per integration across all
/// callers; a token refreshed in the last 10 seconds is returned as it is.
#[utoipa::path(post, path = "/api/v1/oauth/integrations/{id}/refresh", tag = "tokens",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Integration id")),
    request_body(content = RefreshBody, description = "Optional", content_type = "application/json"),
    responses(
        (status = 200, body = RefreshResponse),
        (status = 401, body = crate::http::error::Problem),
        (status = 403, body = crate::http::error::Problem),
        (status = 404, body = crate::http::error::Problem),
        (status = 409, description = "reauth_required or integration_revoked", body = crate::http::error::Problem),
        (status = 503, description = "provider_unavailable", body = crate::http::error::Problem),
    ))]
pub async fn refresh(
    State(state): State<AppState>,
    Authenticated(principal): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
    ClientInfo(client): ClientInfo,
    OptionalJson(body): OptionalJson<RefreshBody>,
) -> Result<Json<RefreshResponse>, ApiError> {
    let rejected = body.rejected_access_token.map(SecretString::from);
    // Backends holding only tokens:read report rejected tokens; owners and readers may refresh.
    let (integration, fresh) = match principal.authorize::<ReadTokens>() {
        Ok(reader) => tokens::refresh_now(&state.services, &reader, id, rejected, &client).await?,
        Err(_) => {
            let actor = principal.authorize::<ReadIntegrations>()?;
            tokens::refresh_now(&state.services, &actor, id, rejected, &client).await?
        }
    };
    let may_read_token = principal
        .authorize::<ReadTokens>()
        .is_ok_and(|reader| reader.can_access(&integration.user_id));
    let token =
        may_read_token.then(|| TokenResponse::from(&*IssuedToken::new(&integration, &fresh)));
    Ok(Json(RefreshResponse {
        integration: integration.into(),
        token,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DisconnectResponse {
    pub integration_id: Uuid,
    /// Always `revoked`: the integration is kept (with its history) but hands out no token.
    pub status: &'static str,
    /// `revoked`, `pending` (the provider was unreachable: retried in the background),
    /// `not_supported` (the provider has no revocation endpoint), `nothing_to_revoke`, `abandoned`.
    pub provider_revocation: &'static str,
    pub retry_at: Option<DateTime<Utc>>,
    pub note: Option<String>,
}

/// Disconnects: revokes at the provider (RFC 7009) where possible, deletes the tokens, marks the
/// integration revoked. Idempotent.
#[utoipa::path(delete, path = "/api/v1/oauth/integrations/{id}", tag = "integrations",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Integration id")),
    responses(
        (status = 200, body = DisconnectResponse),
        (status = 401, body = crate::http::error::Problem),
        (status = 403, body = crate::http::error::Problem),
        (status = 404, body = crate::http::error::Problem),
    ))]
pub async fn disconnect(
    State(state): State<AppState>,
    Authorized(actor): Authorized<WriteIntegrations>,
    ApiPath(id): ApiPath<Uuid>,
    ClientInfo(client): ClientInfo,
) -> Result<Json<DisconnectResponse>, ApiError> {
    let outcome = disconnect::disconnect(&state.services, &actor, id, &client).await?;
    let (retry_at, note) = match &outcome {
        ProviderRevocation::Pending { retry_at } => (
            Some(*retry_at),
            Some("the provider could not be reached; revocation will be retried in the background".to_owned()),
        ),
        ProviderRevocation::NotSupported => (
            None,
            Some(
                "this provider offers no token revocation; the tokens were deleted here. The user can \
                 remove the app's access in their account settings at the provider (for Microsoft: \
                 My Apps)."
                    .to_owned(),
            ),
        ),
        ProviderRevocation::Abandoned => (None, Some("the provider kept refusing the revocation; the tokens were deleted here".to_owned())),
        _ => (None, None),
    };
    Ok(Json(DisconnectResponse {
        integration_id: id,
        status: "revoked",
        provider_revocation: outcome.as_str(),
        retry_at,
        note,
    }))
}
