//! Extractors: authentication, permission by type, and input extractors whose rejections are
//! problem+json like every other error.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::{header, request::Parts, Extensions, HeaderMap, HeaderValue, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::auth::jwt::{AuthError, JwtVerifier};
use crate::auth::rbac::{Actor, Principal, RequiredPermission};
use crate::services::audit::{self, RequestContext};
use crate::storage::audit::Outcome;
use serde_json::json;

/// Any caller with a valid JWT.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Arc<Principal>);

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
struct Verified(Result<Arc<Principal>, AuthError>);

/// Verifies the request's bearer token, at most once per request: the rate limiter (which
/// runs first and needs the user) and the extractors share the outcome, failures included.
pub(crate) async fn verify_once(
    headers: &HeaderMap,
    extensions: &mut Extensions,
    verifier: &JwtVerifier,
) -> Result<Arc<Principal>, AuthError> {
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

/// A JSON request body, strictly: `Content-Type: application/json` (else 415
/// `unsupported_media_type`), within the body limit (else 413 `payload_too_large`), well-formed
/// JSON without NUL characters in any string (PostgreSQL text cannot hold them), of the
/// expected shape (request types deny unknown fields); else 400 `invalid_body`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = read_body(request, state).await?;
        parse_json(body.content_type.as_ref(), &body.bytes).map(Self)
    }
}

/// Like [`ApiJson`], for bodies whose every field is optional: an empty (or blank) body, with
/// any content type or none, is `T::default()`.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = read_body(request, state).await?;
        if body.bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        parse_json(body.content_type.as_ref(), &body.bytes).map(Self)
    }
}

struct Body {
    content_type: Option<HeaderValue>,
    bytes: Bytes,
}

async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Body, ApiError> {
    // The one header the body's parsing needs (not a copy of them all).
    let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
    let bytes = Bytes::from_request(request, state).await?;
    Ok(Body {
        content_type,
        bytes,
    })
}

fn parse_json<T: DeserializeOwned>(
    content_type: Option<&HeaderValue>,
    bytes: &[u8],
) -> Result<T, ApiError> {
    if !is_json_content_type(content_type) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON, sent with Content-Type: application/json",
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|err| ApiError::bad_request("invalid_body", format!("not valid JSON: {err}")))?;
    if holds_nul(&value) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "text in the body must not contain NUL characters",
        ));
    }
    T::deserialize(value).map_err(|err| ApiError::bad_request("invalid_body", err.to_string()))
}

/// `application/json`, or an `application/…+json` type, with any parameters.
fn is_json_content_type(content_type: Option<&HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype.ends_with("+json"))
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(members) => members
            .iter()
            .any(|(name, member)| name.contains('\0') || holds_nul(member)),
        _ => false,
    }
}

/// Query parameters (400 `invalid_query` when they do not fit `T`, or hold a NUL character).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // A NUL can only arrive percent-encoded (as in `ApiPath`): no need to decode twice.
        if parts.uri.query().is_some_and(|query| query.contains("%00")) {
            return Err(ApiError::bad_request(
                "invalid_query",
                "query parameters must not contain NUL characters",
            ));
        }
        let Query(value) = Query::try_from_uri(&parts.uri)?;
        Ok(Self(value))
    }
}

/// Path parameters (400 `invalid_path` when they do not fit `T`, e.g. an id that is not a UUID,
/// are not UTF-8, or hold a NUL character).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // A NUL can only arrive percent-encoded: raw control bytes are not valid in a URI.
        if parts.uri.path().contains("%00") {
            return Err(ApiError::bad_request(
                "invalid_path",
                "path parameters must not contain NUL characters",
            ));
        }
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

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
