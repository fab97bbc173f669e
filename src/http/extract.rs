//! Extractors: authentication, permission by type, and input extractors whose rejections are
//! problem+json like every other error.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts};
use axum::http::{header, request::Parts, Extensions, HeaderMap};

use super::error::ApiError;
use super::AppState;
use crate::auth::jwt::{AuthError, JwtVerifier};
use crate::auth::rbac::{Actor, Principal, RequiredPermission};
use crate::services::audit::{self, RequestContext};
use crate::storage::audit::Outcome;
use serde_json::json;

/// Any caller with a valid JWT.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Principal);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        verify_once(&parts.headers, &mut parts.extensions, &state.verifier)
            .await
            .map(Self)
            .map_err(ApiError::from)
    }
}

/// The outcome of verifying a request's bearer token, kept in its extensions.
#[derive(Debug, Clone)]
struct Verified(Result<Principal, AuthError>);

/// Verifies the request's bearer token, at most once per request: the rate limiter (which
/// runs first and needs the user) and the extractors share the outcome, failures included.
pub(crate) async fn verify_once(
    headers: &HeaderMap,
    extensions: &mut Extensions,
    verifier: &JwtVerifier,
) -> Result<Principal, AuthError> {
    if let Some(Verified(outcome)) = extensions.get::<Verified>() {
        return outcome.clone();
    }
    let outcome = match bearer_token(headers) {
        Ok(token) => verifier.verify(token).await,
        Err(err) => Err(err),
    };
    extensions.insert(Verified(outcome.clone()));
    outcome
}

fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Missing);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// A caller holding permission `P`: 401 without a valid JWT, 403 without the permission.
/// Handlers get an [`Actor<P>`], which is what service operations require.
#[derive(Debug)]
pub struct Authorized<P>(pub Actor<P>);

impl<P: RequiredPermission> FromRequestParts<AppState> for Authorized<P> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Authenticated(principal) = Authenticated::from_request_parts(parts, state).await?;
        match principal.authorize::<P>() {
            Ok(actor) => Ok(Self(actor)),
            Err(forbidden) => {
                let client = request_context(parts, state);
                let event = audit::event(
                    "authorization_denied",
                    Outcome::Denied,
                    Some(&principal.user_id),
                    None,
                    &client,
                    state.services.clock.now(),
                )
                .reason(forbidden.0.as_str())
                .details(json!({"method": parts.method.as_str(), "path": parts.uri.path()}));
                audit::record(&state.services, &event).await;
                Err(forbidden.into())
            }
        }
    }
}

#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Who is on the other end, for the audit log and consent records: the request id, the
/// client's IP (the last `X-Forwarded-For` hop when `OAUTH_TRUST_PROXY_HEADERS=true`, i.e. the
/// address the trusted proxy saw; otherwise the peer address) and the user agent.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo(pub RequestContext);

impl FromRequestParts<AppState> for ClientInfo {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(request_context(parts, state)))
    }
}

fn request_context(parts: &Parts, state: &AppState) -> RequestContext {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.chars().take(512).collect::<String>())
    };
    RequestContext {
        request_id: header("x-request-id"),
        client_ip: client_ip(
            &parts.headers,
            &parts.extensions,
            state.config.trust_proxy_headers,
        )
        .map(|ip| ip.to_string()),
        user_agent: header("user-agent"),
    }
}

/// The client's IP: the last `X-Forwarded-For` hop when `trust_proxy_headers` (the address the
/// trusted proxy saw; earlier hops are whatever the client claimed), else the peer address.
/// One definition for the audit log, consent records and rate limits.
pub(crate) fn client_ip(
    headers: &HeaderMap,
    extensions: &Extensions,
    trust_proxy_headers: bool,
) -> Option<IpAddr> {
    let forwarded = trust_proxy_headers
        .then(|| headers.get("x-forwarded-for"))
        .flatten()
        .and_then(|value| value.to_str().ok())
        .and_then(|list| list.rsplit(',').next())
        .and_then(|hop| hop.trim().parse::<IpAddr>().ok());
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip());
    forwarded.or(peer)
}
