//! ID token validation (OIDC Core §3.1.3.7; O1–O3).
//!
//! The signing algorithm comes from the provider's JWKS key, never from the token: the header
//! `alg` must merely agree with it, so `none` and HS* (the "sign with the public key as an HMAC
//! secret" confusion) can never verify. Time checks use the caller's `now`, so they are
//! testable and consistent with the rest of the request.

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, Validation};
use serde_json::{Map, Value};

use crate::jwks::{JwksCache, JwksError};

/// Larger tokens are refused before parsing; real ID tokens are 1–3 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// OIDC Core §2: `sub` must not exceed 255 ASCII characters.
const MAX_SUBJECT_CHARS: usize = 255;
/// The placeholder in Microsoft's multi-tenant issuer.
const TENANT_PLACEHOLDER: &str = "{tenantid}";

/// How the `iss` claim is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerRule {
    Exact(String),
    /// Microsoft `common`/`organizations`: `https://login.microsoftonline.com/{tenantid}/v2.0`,
    /// with the token's `tid` substituted, then compared exactly.
    TenantTemplate(String),
}

pub struct IdTokenExpectations<'a> {
    pub issuer: &'a IssuerRule,
    pub client_id: &'a str,
    /// The nonce sent in the authorization request; when set, the token must carry it (O1).
    pub nonce: Option<&'a str>,
    pub now: DateTime<Utc>,
    pub leeway: Duration,
}

/// The validated claims. Identify users by `issuer` + `subject` (or Microsoft's
/// `tenant_id` + `object_id`), never by email (O3).
#[derive(Debug, Clone)]
pub struct IdTokenClaims {
    pub issuer: String,
    pub subject: String,
    pub audience: Vec<String>,
    pub authorized_party: Option<String>,
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    pub name: Option<String>,
    pub tenant_id: Option<String>,
    pub object_id: Option<String>,
    pub preferred_username: Option<String>,
    pub nonce: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub issued_at: Option<DateTime<Utc>>,
    pub raw: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error("the ID token is not a well-formed JWT")]
    Malformed,
    #[error("the ID token's signature or algorithm is not accepted")]
    BadSignature,
    #[error("the ID token's signing key is unknown")]
    UnknownKey,
    #[error("the provider's signing keys could not be fetched: {0}")]
    KeysUnavailable(String),
    #[error("the ID token's issuer is not the expected one")]
    WrongIssuer,
    #[error("the ID token was not issued to this client")]
    WrongAudience,
    #[error("the ID token has expired")]
    Expired,
    #[error("the ID token was issued in the future")]
    IssuedInFuture,
    #[error("the ID token's nonce does not match the request")]
    NonceMismatch,
    #[error("the ID token has no usable sub claim")]
    MissingSubject,
}

impl IdTokenError {
    /// Stable machine-readable codes for API errors and audit entries.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed => "id_token_malformed",
            Self::BadSignature => "id_token_bad_signature",
            Self::UnknownKey => "id_token_unknown_key",
            Self::KeysUnavailable(_) => "id_token_keys_unavailable",
            Self::WrongIssuer => "id_token_wrong_issuer",
            Self::WrongAudience => "id_token_wrong_audience",
            Self::Expired => "id_token_expired",
            Self::IssuedInFuture => "id_token_issued_in_future",
            Self::NonceMismatch => "id_token_nonce_mismatch",
            Self::MissingSubject => "id_token_missing_subject",
        }
    }
}

/// Verifies the signature and every claim OIDC Core §3.1.3.7 requires of a code-flow client.
pub async fn validate_id_token(
    token: &str,
    jwks: &JwksCache,
    expected: &IdTokenExpectations<'_>,
) -> Result<IdTokenClaims, IdTokenError> {
    let claims = verified_claims(token, jwks, expected.now).await?;
    check_issuer(&claims, expected.issuer)?;
    let audience = check_audience(&claims, expected.client_id)?;
    let (expires_at, issued_at) = check_times(&claims, expected.now, expected.leeway)?;
    check_nonce(&claims, expected.nonce)?;
    let subject = text(&claims, "sub")
        .filter(|sub| !sub.is_empty() && sub.chars().count() <= MAX_SUBJECT_CHARS)
        .ok_or(IdTokenError::MissingSubject)?;
    Ok(IdTokenClaims {
        issuer: text(&claims, "iss").unwrap_or_default(),
        subject,
        audience,
        authorized_party: text(&claims, "azp"),
        email: text(&claims, "email"),
        email_verified: claims.get("email_verified").and_then(boolean),
        name: text(&claims, "name"),
        tenant_id: text(&claims, "tid"),
        object_id: text(&claims, "oid"),
        preferred_username: text(&claims, "preferred_username"),
        nonce: text(&claims, "nonce"),
        expires_at,
        issued_at,
        raw: claims,
    })
}

/// Signature check with the JWKS key's algorithm; returns the claims unchecked otherwise.
async fn verified_claims(
    token: &str,
    jwks: &JwksCache,
    now: DateTime<Utc>,
) -> Result<Map<String, Value>, IdTokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(IdTokenError::Malformed);
    }
    let header = decode_header(token).map_err(|_| header_error(token))?;
    let (key, algorithm) =
        jwks.key_for(header.kid.as_deref(), now)
            .await
            .map_err(|err| match err {
                JwksError::UnknownKey => IdTokenError::UnknownKey,
                JwksError::Unavailable(reason) => IdTokenError::KeysUnavailable(reason),
            })?;
    if header.alg != algorithm || !is_asymmetric(algorithm) {
        return Err(IdTokenError::BadSignature);
    }
    decode::<Map<String, Value>>(token, &key, &signature_only(algorithm))
        .map(|data| data.claims)
        .map_err(|err| match err.kind() {
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => IdTokenError::Malformed,
            _ => IdTokenError::BadSignature,
        })
}

/// jsonwebtoken refuses headers whose `alg` it does not know (`none`, typos). A header that
/// parses as JSON and names an algorithm is an algorithm refusal; anything else is malformed.
fn header_error(token: &str) -> IdTokenError {
    use base64::Engine;
    let names_alg = token
        .split('.')
        .next()
        .and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .is_some_and(|header| header.get("alg").is_some_and(Value::is_string));
    if names_alg {
        IdTokenError::BadSignature
    } else {
        IdTokenError::Malformed
    }
}

/// Defence in depth: `parse_jwks` already drops symmetric keys, but an HMAC key here would let
/// anyone holding the (public) key material mint tokens.
fn is_asymmetric(algorithm: Algorithm) -> bool {
    !matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    )
}

/// Only the signature and algorithm are checked by jsonwebtoken; the claims are checked here,
/// with the caller's clock and OIDC's audience/azp rules.
fn signature_only(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation
}

fn check_issuer(claims: &Map<String, Value>, rule: &IssuerRule) -> Result<(), IdTokenError> {
    let issuer = text(claims, "iss").ok_or(IdTokenError::WrongIssuer)?;
    let expected = match rule {
        IssuerRule::Exact(exact) => exact.clone(),
        IssuerRule::TenantTemplate(template) => {
            let tenant = text(claims, "tid")
                .filter(|tid| is_tenant_id(tid))
                .ok_or(IdTokenError::WrongIssuer)?;
            template.replace(TENANT_PLACEHOLDER, &tenant)
        }
    };
    if issuer == expected {
        Ok(())
    } else {
        Err(IdTokenError::WrongIssuer)
    }
}

/// Tenant ids are GUIDs; refusing anything else keeps a crafted `tid` (with `/`, `?`, `#`)
/// from bending the substituted issuer into a different URL shape.
fn is_tenant_id(tid: &str) -> bool {
    !tid.is_empty()
        && tid.len() <= 64
        && tid
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
}

/// `aud` must contain our client id; with several audiences `azp` must be present and be us,
/// and a present `azp` must always be us (OIDC Core §3.1.3.7 steps 3–5).
fn check_audience(
    claims: &Map<String, Value>,
    client_id: &str,
) -> Result<Vec<String>, IdTokenError> {
    let audience: Vec<String> = match claims.get("aud") {
        Some(Value::String(single)) => vec![single.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    if !audience.iter().any(|aud| aud == client_id) {
        return Err(IdTokenError::WrongAudience);
    }
    match text(claims, "azp") {
        Some(azp) if azp != client_id => Err(IdTokenError::WrongAudience),
        None if audience.len() > 1 => Err(IdTokenError::WrongAudience),
        _ => Ok(audience),
    }
}

fn check_times(
    claims: &Map<String, Value>,
    now: DateTime<Utc>,
    leeway: Duration,
) -> Result<(DateTime<Utc>, Option<DateTime<Utc>>), IdTokenError> {
    let time = |name: &str| match claims.get(name) {
        None => Ok(None),
        Some(value) => numeric_date(value).map(Some).ok_or(IdTokenError::Malformed),
    };
    // `exp` is REQUIRED in an ID token: without it the token would be valid forever.
    let expires_at = time("exp")?.ok_or(IdTokenError::Malformed)?;
    // Checked: dates at chrono's limits would overflow (and panic) when shifted by the leeway.
    let shifted = |time: DateTime<Utc>, by: Duration| {
        time.checked_add_signed(by).ok_or(IdTokenError::Malformed)
    };
    if shifted(expires_at, leeway)? <= now {
        return Err(IdTokenError::Expired);
    }
    let issued_at = time("iat")?;
    if let Some(iat) = issued_at {
        if shifted(iat, -leeway)? > now {
            return Err(IdTokenError::IssuedInFuture);
        }
    }
    Ok((expires_at, issued_at))
}

/// Constant-time comparison: the nonce is a session secret, and timing must not reveal how
/// many leading characters of a guess were right.
fn check_nonce(claims: &Map<String, Value>, expected: Option<&str>) -> Result<(), IdTokenError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let actual = claims
        .get("nonce")
        .and_then(Value::as_str)
        .ok_or(IdTokenError::NonceMismatch)?;
    if crate::crypto::secrets_equal(actual.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(IdTokenError::NonceMismatch)
    }
}

fn text(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims.get(name).and_then(Value::as_str).map(str::to_owned)
}

/// `email_verified` is a boolean per the spec; some providers send `"true"`/`"false"`.
fn boolean(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(flag) => Some(*flag),
        Value::String(text) if text.eq_ignore_ascii_case("true") => Some(true),
        Value::String(text) if text.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// A JSON NumericDate (seconds, possibly fractional) as a UTC time.
fn numeric_date(value: &Value) -> Option<DateTime<Utc>> {
    let seconds = value.as_f64()?;
    // Bounded so the cast below cannot saturate into a misleading date.
    if !seconds.is_finite() || seconds.abs() > 1e15 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)]
    DateTime::from_timestamp(seconds.floor() as i64, 0)
}

#[cfg(test)]
#[path = "id_token_tests.rs"]
mod tests;

#[cfg(test)]
mod time_limit_tests {
    use serde_json::json;

    use super::*;

    fn times(claims: Value) -> Result<(DateTime<Utc>, Option<DateTime<Utc>>), IdTokenError> {
        let Value::Object(claims) = claims else {
            panic!("claims are an object");
        };
        check_times(&claims, Utc::now(), Duration::seconds(30))
    }

    #[test]
    fn dates_at_chronos_limits_are_malformed_not_a_panic() {
        // ≈ 8.2e12 and -8.3e12: representable, but not once shifted by the leeway.
        let latest = DateTime::<Utc>::MAX_UTC.timestamp();
        let earliest = DateTime::<Utc>::MIN_UTC.timestamp();
        let valid_until = Utc::now().timestamp() + 3600;
        assert_eq!(
            times(json!({"exp": latest})).err(),
            Some(IdTokenError::Malformed)
        );
        assert_eq!(
            times(json!({"exp": valid_until, "iat": earliest})).err(),
            Some(IdTokenError::Malformed)
        );
        assert!(times(json!({"exp": valid_until, "iat": 0})).is_ok());
    }
}
