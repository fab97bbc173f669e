//! Token endpoint client: the authorization-code and refresh grants (RFC 6749 §4.1.3, §6),
//! response parsing (§5.1, §5.2) and failure classification (F9).
//!
//! Parsing is a pure function ([`parse_token_response`]) so every provider quirk is testable
//! without a network: JSON or form-encoded bodies (GitHub), an `error` member at *any* HTTP
//! status (Slack answers 200 `{"ok":false,...}`, F6), numeric-string `expires_in`, and
//! `refresh_token: null` (Notion).

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use super::transport::{self, PostTarget};

/// An `expires_in` beyond this (ten years) is treated as "unknown" rather than trusted: it
/// would make the vault never refresh, which is worse than refreshing on the first 401 (F4).
const MAX_EXPIRES_IN: i64 = 10 * 365 * 24 * 60 * 60;
/// Provider-controlled text kept in errors (and so in logs) is bounded.
const MAX_DESCRIPTION_CHARS: usize = 300;
const MAX_ERROR_CODE_CHARS: usize = 100;
/// Members of a token response that have typed fields; everything else goes to `extra`.
const TOKEN_FIELDS: [&str; 6] = [
    "access_token",
    "token_type",
    "expires_in",
    "refresh_token",
    "id_token",
    "scope",
];

/// How the client authenticates to the endpoint: exactly one method per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretBasic,
    ClientSecretPost,
}

/// The request body encoding: RFC 6749 says form; Notion wants JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    Form,
    Json,
}

#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    pub url: Url,
    pub auth: ClientAuth,
    pub body: BodyFormat,
    /// Extra request headers, e.g. `Notion-Version`.
    pub headers: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: SecretString,
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[REDACTED]")
            .finish()
    }
}

/// The grants this client uses. The refresh grant has no `scope`: omitting it means "the
/// scope originally granted" (RFC 6749 §6), so a refresh can never widen access (R11).
pub enum TokenGrant<'a> {
    AuthorizationCode {
        code: &'a str,
        redirect_uri: &'a str,
        code_verifier: Option<&'a SecretString>,
    },
    RefreshToken {
        refresh_token: &'a SecretString,
    },
}

impl fmt::Debug for TokenGrant<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AuthorizationCode { redirect_uri, .. } => f
                .debug_struct("AuthorizationCode")
                .field("redirect_uri", redirect_uri)
                .finish_non_exhaustive(),
            Self::RefreshToken { .. } => f.debug_struct("RefreshToken").finish_non_exhaustive(),
        }
    }
}

impl TokenGrant<'_> {
    fn params(&self) -> Vec<(&str, &str)> {
        match self {
            Self::AuthorizationCode {
                code,
                redirect_uri,
                code_verifier,
            } => {
                let mut params = vec![
                    ("grant_type", "authorization_code"),
                    ("code", *code),
                    ("redirect_uri", *redirect_uri),
                ];
                if let Some(verifier) = code_verifier {
                    params.push(("code_verifier", verifier.expose_secret()));
                }
                params
            }
            Self::RefreshToken { refresh_token } => vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose_secret()),
            ],
        }
    }
}

/// A successful token response (RFC 6749 §5.1).
#[derive(Clone)]
pub struct TokenResponse {
    pub access_token: SecretString,
    pub token_type: String,
    /// Seconds; `None` when absent or implausible (the expiry is then unknown, F4).
    pub expires_in: Option<i64>,
    /// `None` when absent, `null` or empty: the caller keeps the previous one (F3, R11).
    pub refresh_token: Option<SecretString>,
    pub id_token: Option<SecretString>,
    /// The granted scope as sent; `None` means "as requested" (R9).
    pub scope: Option<String>,
    /// Every other top-level member (Notion's `bot_id`, `workspace_id`, `owner`...).
    pub extra: Map<String, Value>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |present: bool| if present { "[REDACTED]" } else { "None" };
        f.debug_struct("TokenResponse")
            .field("access_token", &"[REDACTED]")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("refresh_token", &redacted(self.refresh_token.is_some()))
            .field("id_token", &redacted(self.id_token.is_some()))
            .field("scope", &self.scope)
            .field("extra_keys", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a token request failed. Messages never contain token values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The provider answered with an OAuth error (RFC 6749 §5.2, or a lookalike).
    #[error("{}", provider_message(error, description.as_deref(), error_codes, *status))]
    Provider {
        error: String,
        description: Option<String>,
        /// Microsoft's AADSTS numbers, which classify better than `error` does.
        error_codes: Vec<i64>,
        status: u16,
    },
    /// A resource server rejected the access token (HTTP 401): refresh once and retry.
    #[error("the access token was rejected (HTTP 401)")]
    Unauthorized,
    #[error("temporary failure: {reason}{}", retry_suffix(*retry_after))]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("the provider's response is not usable: {0}")]
    InvalidResponse(String),
    #[error("unsupported token type {0:?} (only Bearer is accepted)")]
    UnsupportedTokenType(String),
}

fn provider_message(error: &str, description: Option<&str>, codes: &[i64], status: u16) -> String {
    let mut message = format!("the provider answered {error} (HTTP {status})");
    if !codes.is_empty() {
        message.push_str(&format!(" codes {codes:?}"));
    }
    if let Some(description) = description {
        message.push_str(": ");
        message.push_str(description);
    }
    message
}

fn retry_suffix(retry_after: Option<Duration>) -> String {
    retry_after.map_or_else(String::new, |delay| {
        format!(" (retry after {}s)", delay.as_secs())
    })
}

/// What a failure means for the connection (F9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The grant is dead: mark the connection `needs_reauth`.
    InvalidGrant,
    /// Our client configuration is wrong: page ops, never blame users' connections.
    InvalidClient,
    /// Try again later with backoff; the connection stays healthy.
    Transient,
    Other,
}

/// Microsoft AADSTS codes meaning "the user must sign in again": expired/revoked/inactive
/// refresh tokens, revoked grants, missing consent, MFA required. Classified on codes rather
/// than `error`, which Microsoft varies (`invalid_grant`, `interaction_required`, ...).
const REAUTH_ERROR_CODES: [i64; 8] = [70008, 700082, 700084, 50173, 65001, 50076, 50078, 50079];

impl TokenError {
    /// A provider error with provider-controlled text sanitised and bounded for logs, every
    /// value of `secrets` removed from it first (before it is bounded, so no prefix of a secret
    /// survives either).
    pub fn provider(
        error: String,
        description: Option<String>,
        error_codes: Vec<i64>,
        status: u16,
        secrets: &[String],
    ) -> Self {
        Self::Provider {
            error: sanitize(&redact(&error, secrets), MAX_ERROR_CODE_CHARS),
            description: description
                .map(|text| sanitize(&redact(&text, secrets), MAX_DESCRIPTION_CHARS)),
            error_codes,
            status,
        }
    }

    pub fn class(&self) -> FailureClass {
        match self {
            Self::Provider {
                error, error_codes, ..
            } => classify(error, error_codes),
            Self::Transient { .. } => FailureClass::Transient,
            Self::Unauthorized | Self::InvalidResponse(_) | Self::UnsupportedTokenType(_) => {
                FailureClass::Other
            }
        }
    }

    /// The provider's requested delay, when it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn classify(error: &str, error_codes: &[i64]) -> FailureClass {
    if error_codes
        .iter()
        .any(|code| REAUTH_ERROR_CODES.contains(code))
    {
        return FailureClass::InvalidGrant;
    }
    let is = |name: &str| error.eq_ignore_ascii_case(name);
    if is("invalid_grant")
        || is("interaction_required")
        || is("consent_required")
        || is("login_required")
    {
        FailureClass::InvalidGrant
    } else if is("invalid_client") || is("unauthorized_client") {
        FailureClass::InvalidClient
    } else if is("temporarily_unavailable") || is("server_error") || is("slow_down") {
        FailureClass::Transient
    } else {
        FailureClass::Other
    }
}

/// Replaces every occurrence of each secret in `text` with `[redacted]`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut clean = text.to_owned();
    // Longest first, so a secret containing another is removed whole.
    let mut secrets: Vec<&String> = secrets.iter().filter(|secret| !secret.is_empty()).collect();
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    for secret in secrets {
        if clean.contains(secret.as_str()) {
            clean = clean.replace(secret.as_str(), "[redacted]");
        }
    }
    clean
}

/// Replaces control characters (log injection) and truncates to `max` characters.
fn sanitize(text: &str, max: usize) -> String {
    let mut clean: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > max {
        clean.push('…');
    }
    clean
}

/// POSTs `grant` to the token endpoint and parses the answer.
pub async fn request_token(
    http: &reqwest::Client,
    endpoint: &TokenEndpoint,
    client: &ClientCredentials,
    grant: TokenGrant<'_>,
) -> Result<TokenResponse, TokenError> {
    let target = PostTarget {
        url: &endpoint.url,
        auth: endpoint.auth,
        body: endpoint.body,
        headers: &endpoint.headers,
    };
    let params = grant.params();
    let secrets =
        transport::request_secrets(client, &params, &["code", "code_verifier", "refresh_token"]);
    let request = transport::client_post(http, &target, client, &params);
    let reply = transport::send(request).await?;
    parse_token_response_redacting(
        reply.status,
        reply.content_type.as_deref(),
        reply.retry_after.as_deref(),
        &reply.body,
        &secrets,
    )
}

/// Interprets a token endpoint response. Pure: no I/O, never panics.
pub fn parse_token_response(
    status: u16,
    content_type: Option<&str>,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<TokenResponse, TokenError> {
    parse_token_response_redacting(status, content_type, retry_after, body, &[])
}

/// [`parse_token_response`], removing `secrets` (the request's secret values) from any error
/// text the provider sent.
pub fn parse_token_response_redacting(
    status: u16,
    content_type: Option<&str>,
    retry_after: Option<&str>,
    body: &[u8],
    secrets: &[String],
) -> Result<TokenResponse, TokenError> {
    let document = decode_body(content_type, body);
    if let Some(error) = document
        .as_ref()
        .and_then(|doc| oauth_error(doc, status, secrets))
    {
        return Err(error);
    }
    match status {
        200..=299 => {}
        300..=399 => return Err(transport::redirect_error(status)),
        _ if transport::is_transient_status(status) => {
            return Err(TokenError::Transient {
                reason: format!("HTTP {status}"),
                retry_after: retry_after
                    .and_then(|value| transport::parse_retry_after(value, chrono::Utc::now())),
            })
        }
        _ => {
            return Err(TokenError::InvalidResponse(format!(
                "HTTP {status} without an OAuth error"
            )))
        }
    }
    let document = document.ok_or_else(|| {
        TokenError::InvalidResponse("the body is neither a JSON object nor form-encoded".to_owned())
    })?;
    success(document)
}

/// The body as a JSON object: JSON whatever the declared type (some providers label JSON as
/// `text/plain` or `text/javascript`), else form-encoded when declared so or when it
/// plainly carries OAuth members (GitHub without `Accept` handling).
fn decode_body(content_type: Option<&str>, body: &[u8]) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) {
        return Some(object);
    }
    let text = std::str::from_utf8(body).ok()?.trim();
    let declared_form = content_type.is_some_and(|value| {
        value
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });
    let pairs: Map<String, Value> = url::form_urlencoded::parse(text.as_bytes())
        .map(|(name, value)| (name.into_owned(), Value::String(value.into_owned())))
        .collect();
    let looks_like_oauth = pairs.contains_key("access_token") || pairs.contains_key("error");
    ((declared_form && !pairs.is_empty()) || looks_like_oauth).then_some(pairs)
}

/// An OAuth error in the body, whatever the status (F6). Slack's `{"ok":false}` without an
/// `error` member still counts as a failure.
fn oauth_error(
    document: &Map<String, Value>,
    status: u16,
    secrets: &[String],
) -> Option<TokenError> {
    let code = error_code(document)?;
    let description = document
        .get("error_description")
        .and_then(Value::as_str)
        .or_else(|| {
            document
                .get("error")
                .and_then(|error| error.get("message"))
                .and_then(Value::as_str)
        })
        .map(str::to_owned);
    let error_codes = document
        .get("error_codes")
        .and_then(Value::as_array)
        .map(|codes| codes.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    Some(TokenError::provider(
        code,
        description,
        error_codes,
        status,
        secrets,
    ))
}

/// The `error` member as text, if the document reports a failure at all.
fn error_code(document: &Map<String, Value>) -> Option<String> {
    let unknown = || "unknown_error".to_owned();
    // Slack-style `{"ok":false}` without a usable `error` is still a failure (F6).
    let not_ok =
        || (document.get("ok") == Some(&Value::Bool(false))).then(|| "request_failed".to_owned());
    match document.get("error") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => not_ok(),
        Some(Value::String(text)) if text.trim().is_empty() => not_ok(),
        Some(Value::String(text)) => Some(text.clone()),
        // Nested error objects ({"error":{"message":...}}) are not RFC 6749 but do happen.
        Some(Value::Object(nested)) => Some(
            ["code", "status", "type"]
                .iter()
                .find_map(|key| nested.get(*key).and_then(scalar_text))
                .unwrap_or_else(unknown),
        ),
        Some(other) => Some(scalar_text(other).unwrap_or_else(unknown)),
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn success(mut document: Map<String, Value>) -> Result<TokenResponse, TokenError> {
    let access_token = non_empty_string(document.get("access_token")).ok_or_else(|| {
        TokenError::InvalidResponse("access_token is missing or empty".to_owned())
    })?;
    let token_type = document
        .get("token_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    // Only Bearer is understood (R9): using a MAC/DPoP token as a bearer token would fail
    // at every API call or, worse, leak a proof-of-possession token.
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::UnsupportedTokenType(sanitize(&token_type, 40)));
    }
    let response = TokenResponse {
        access_token: SecretString::from(access_token),
        token_type,
        expires_in: document.get("expires_in").and_then(expires_in),
        refresh_token: non_empty_string(document.get("refresh_token")).map(SecretString::from),
        id_token: non_empty_string(document.get("id_token")).map(SecretString::from),
        scope: document.get("scope").and_then(scope_text),
        extra: Map::new(),
    };
    for field in TOKEN_FIELDS {
        document.remove(field);
    }
    Ok(TokenResponse {
        extra: document,
        ..response
    })
}

fn non_empty_string(value: Option<&Value>) -> Option<String> {
    value
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
        .map(str::to_owned)
}

/// A number or a numeric string (some providers quote it); non-positive or absurd → unknown.
fn expires_in(value: &Value) -> Option<i64> {
    let seconds = match value {
        Value::Number(number) => number
            .as_i64()
            .or_else(|| number.as_f64().and_then(float_seconds)),
        Value::String(text) => {
            let text = text.trim();
            text.parse::<i64>()
                .ok()
                .or_else(|| text.parse::<f64>().ok().and_then(float_seconds))
        }
        _ => None,
    }?;
    (1..=MAX_EXPIRES_IN).contains(&seconds).then_some(seconds)
}

fn float_seconds(seconds: f64) -> Option<i64> {
    // The bounds check keeps the cast exact; NaN fails it too.
    #[allow(clippy::cast_possible_truncation)]
    (seconds.is_finite() && (0.0..=MAX_EXPIRES_IN as f64).contains(&seconds))
        .then(|| seconds.floor() as i64)
}

/// `scope` is a string per RFC 6749; a few providers send an array of strings instead.
fn scope_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Array(items) => Some(
            items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

#[cfg(test)]
#[path = "token_tests.rs"]
mod tests;
