//! Extractors: authentication, permission by type, and input extractors whose rejections are
//! problem+json like every other error.

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::{header, request::Parts};

use super::error::ApiError;
use super::AppState;
use crate::auth::jwt::AuthError;
use crate::auth::rbac::{Actor, Principal, RequiredPermission};

/// Any caller with a valid JWT.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Principal);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(Self(principal.clone()));
        }
        let token = bearer_token(parts)?;
        let principal = state.verifier.verify(token).await?;
        parts.extensions.insert(principal.clone());
        Ok(Self(principal))
    }
}

fn bearer_token(parts: &Parts) -> Result<&str, AuthError> {
    let value = parts
        .headers
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
        let actor = principal.authorize::<P>()?;
        Ok(Self(actor))
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
