//! The connect flow over HTTP: start an authorization, and receive the provider's redirect.

use std::collections::HashMap;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use url::Url;
use uuid::Uuid;

use crate::auth::rbac::WriteIntegrations;
use crate::http::error::ApiError;
use crate::http::extract::{ApiPath, Authorized, ClientInfo, OptionalJson};
use crate::http::AppState;
use crate::services::flow::{
    self, AuthorizeRequest, CallbackError, CallbackOutcome, CallbackParams,
};

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeBody {
    /// Scopes to request on top of the provider's defaults (must be in its catalog).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Features (e.g. `calendar.read`) whose minimal scopes to request.
    #[serde(default)]
    pub features: Vec<String>,
    /// Where to send the browser afterwards; must be under `OAUTH_ALLOWED_RETURN_URLS`.
    pub return_to: Option<String>,
    /// Ask for more scopes on this existing integration (incremental authorization).
    pub integration_id: Option<Uuid>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuthorizeResponse {
    /// Send the user's browser here.
    pub authorization_url: String,
    /// The opaque state carried through the flow.
    pub state: String,
    /// The flow must complete before this time.
    pub expires_at: DateTime<Utc>,
    /// The scopes the provider is asked for.
    pub scopes: Vec<String>,
}

/// Starts connecting a provider account: returns the URL to send the user's browser to.
#[utoipa::path(post, path = "/api/v1/oauth/providers/{provider}/authorize", tag = "connect",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "Provider name")),
    request_body(content = AuthorizeBody, description = "All fields optional", content_type = "application/json"),
    responses(
        (status = 200, body = AuthorizeResponse),
        (status = 400, description = "unknown_feature, unknown_scope, return_to_not_allowed, invalid_body", body = crate::http::error::Problem),
        (status = 401, body = crate::http::error::Problem),
        (status = 403, body = crate::http::error::Problem),
        (status = 404, description = "unknown_provider, or integration_id not found", body = crate::http::error::Problem),
        (status = 409, description = "provider_not_configured: names the missing variables", body = crate::http::error::Problem),
    ))]
pub async fn authorize(
    State(state): State<AppState>,
    Authorized(actor): Authorized<WriteIntegrations>,
    ApiPath(provider): ApiPath<String>,
    ClientInfo(client): ClientInfo,
    // Every field is optional, so an empty body is an empty request.
    OptionalJson(body): OptionalJson<AuthorizeBody>,
) -> Result<Json<AuthorizeResponse>, ApiError> {
    let request = AuthorizeRequest {
        scopes: body.scopes,
        features: body.features,
        return_to: body.return_to,
        integration_id: body.integration_id,
    };
    let started = flow::start(&state.services, &actor, &provider, request, &client).await?;
    Ok(Json(AuthorizeResponse {
        authorization_url: started.authorization_url,
        state: started.state,
        expires_at: started.expires_at,
        scopes: started.scopes,
    }))
}

/// The result of a callback, as JSON (with `Accept: application/json`) or posted by the popup page.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CallbackResult {
    /// `success` or `error`.
    pub oauth_status: &'static str,
    pub provider: String,
    pub integration_id: Option<Uuid>,
    /// A stable code: `access_denied`, `invalid_state`, `state_already_used`, `state_expired`,
    /// `issuer_mismatch`, `token_exchange_failed`, `id_token_*`, `no_youtube_channel`, ...
    pub error: Option<&'static str>,
    pub error_description: Option<String>,
}

impl From<&CallbackOutcome> for CallbackResult {
    fn from(outcome: &CallbackOutcome) -> Self {
        let (oauth_status, integration_id, error, error_description) = match &outcome.result {
            Ok(integration) => ("success", Some(integration.id), None, None),
            Err(err) => ("error", None, Some(err.code), Some(err.description.clone())),
        };
        Self {
            oauth_status,
            provider: outcome.provider.clone(),
            integration_id,
            error,
            error_description,
        }
    }
}

/// The provider's redirect back (register `{OAUTH_PUBLIC_URL}/api/v1/oauth/callback/{provider}`).
/// No JWT: the single-use `state` identifies the request. Answers a 303 to `return_to` with
/// `oauth_status`, `provider`, `integration_id` or `error` + `error_description`; without
/// `return_to`, JSON when asked for, else a small page that posts the result to `window.opener`.
#[utoipa::path(get, path = "/api/v1/oauth/callback/{provider}", tag = "connect",
    params(
        ("provider" = String, Path, description = "Provider name"),
        ("code" = Option<String>, Query, description = "Authorization code"),
        ("state" = Option<String>, Query, description = "State from the authorization request"),
        ("error" = Option<String>, Query, description = "Provider error (e.g. access_denied)"),
        ("error_description" = Option<String>, Query, description = "Provider error text"),
        ("iss" = Option<String>, Query, description = "RFC 9207 issuer"),
    ),
    responses(
        (status = 303, description = "Redirect to return_to with the result in the query"),
        (status = 200, description = "Success: JSON with `Accept: application/json`, else an HTML page posting the result to `window.opener`",
            content((CallbackResult = "application/json"), (String = "text/html"))),
        (status = 400, description = "Failure (JSON or HTML page, as for 200; a malformed path is a problem)",
            content((CallbackResult = "application/json"), (String = "text/html"))),
    ))]
pub async fn callback(
    State(state): State<AppState>,
    ApiPath(provider): ApiPath<String>,
    ClientInfo(client): ClientInfo,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let outcome = match parse_callback_query(query.as_deref()) {
        Ok(params) => flow::complete(&state.services, &provider, params, &client).await,
        Err(err) => CallbackOutcome {
            provider,
            return_to: None,
            result: Err(err),
        },
    };
    let result = CallbackResult::from(&outcome);
    let mut response = match &outcome.return_to {
        Some(return_to) => redirect(return_to, &result),
        None if wants_json(&headers) => (status_of(&result), Json(&result)).into_response(),
        None => popup_page(&state, &result),
    };
    let headers = response.headers_mut();
    // The callback URL carried a code: never leak it onward, never cache the answer.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The parameters of the provider's redirect that the flow reads; any others (Google's
/// `authuser`, Microsoft's `session_state`, ...) are ignored. A parameter given twice, or a value
/// holding a NUL character, is refused as `invalid_request` before anything is looked up: RFC
/// 6749 §3.1 forbids repeated parameters, and which of two `state`s or `code`s was meant must
/// not be guessed.
pub fn parse_callback_query(query: Option<&str>) -> Result<CallbackParams, CallbackError> {
    const READ: [&str; 5] = ["code", "state", "error", "error_description", "iss"];
    let refuse = |description: String| CallbackError {
        code: "invalid_request",
        description,
    };
    let mut found: HashMap<&'static str, String> = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let Some(name) = READ.iter().copied().find(|known| *known == name) else {
            continue;
        };
        if value.contains('\0') {
            return Err(refuse(format!(
                "the {name} parameter holds a NUL character"
            )));
        }
        if found.insert(name, value.into_owned()).is_some() {
            return Err(refuse(format!("the {name} parameter is repeated")));
        }
    }
    let mut take = |name: &str| found.remove(name);
    Ok(CallbackParams {
        code: take("code"),
        state: take("state"),
        error: take("error"),
        error_description: take("error_description"),
        iss: take("iss"),
    })
}

fn status_of(result: &CallbackResult) -> StatusCode {
    if result.error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    }
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"))
}

fn redirect(return_to: &Url, result: &CallbackResult) -> Response {
    let mut url = return_to.clone();
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("oauth_status", result.oauth_status);
        query.append_pair("provider", &result.provider);
        if let Some(id) = result.integration_id {
            query.append_pair("integration_id", &id.to_string());
        }
        if let Some(error) = result.error {
            query.append_pair("error", error);
        }
        if let Some(description) = &result.error_description {
            query.append_pair("error_description", description);
        }
    }
    match HeaderValue::from_str(url.as_str()) {
        Ok(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
        Err(_) => ApiError::internal(&"return_to is not a valid header value").into_response(),
    }
}

/// A page for popup flows: says the result in words, and posts it to the opener at each
/// allowed return origin (never `*`: the integration id is for the host application only).
fn popup_page(state: &AppState, result: &CallbackResult) -> Response {
    let nonce = crate::oauth::random_urlsafe(16);
    let origins: Vec<String> = state
        .services
        .allowed_return_urls
        .iter()
        .map(|url| url.origin().ascii_serialization())
        .collect();
    let message = match result.error {
        None => "The account is connected. You can close this window.".to_owned(),
        Some(_) => format!(
            "The account could not be connected: {}. You can close this window and try again.",
            result
                .error_description
                .as_deref()
                .unwrap_or("unknown error")
        ),
    };
    let payload = serde_json::json!({"type": "oauth-manager:result", "result": result});
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><p>{message}</p><script nonce=\"{nonce}\">(function () {{\
         var result = {payload}; var origins = {origins};\
         if (window.opener) {{ origins.forEach(function (o) {{ window.opener.postMessage(result, o); }});\
         window.close(); }} }})();</script></body></html>",
        title = if result.error.is_none() { "Connected" } else { "Connection failed" },
        message = escape_html(&message),
        payload = script_json(&payload),
        origins = script_json(&serde_json::json!(origins)),
    );
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let mut response = (
        status_of(result),
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&csp) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, value);
    }
    response
        .headers_mut()
        .insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn escape_html(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            other => other.to_string(),
        })
        .collect()
}

/// JSON safe to embed in a `<script>`: no `<`, `>` or `&` that could close the element.
fn script_json(value: &serde_json::Value) -> String {
    value
        .to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn callback_query_reads_the_five_parameters_and_ignores_the_rest() {
        let params = parse_callback_query(Some(
            "code=4%2F0abc&state=s+1&iss=https%3A%2F%2Fid.test&authuser=0&prompt=consent&scope=a+b",
        ))
        .expect("parses");
        assert_eq!(params.code.as_deref(), Some("4/0abc"));
        assert_eq!(params.state.as_deref(), Some("s 1"));
        assert_eq!(params.iss.as_deref(), Some("https://id.test"));
        assert_eq!(params.error, None);
        let denied = parse_callback_query(Some(
            "error=access_denied&error_description=The+user+said+no&state=s&error_subcode=cancel",
        ))
        .expect("parses");
        assert_eq!(denied.error.as_deref(), Some("access_denied"));
        assert_eq!(
            denied.error_description.as_deref(),
            Some("The user said no")
        );
        let empty = parse_callback_query(None).expect("parses");
        assert!(empty.code.is_none() && empty.state.is_none());
        // Repeating an ignored parameter is no concern of ours.
        assert!(parse_callback_query(Some("authuser=0&authuser=1&state=s")).is_ok());
    }

    #[test]
    fn callback_query_refuses_repeated_parameters_and_nul() {
        for query in [
            "state=a&state=b",
            "code=a&state=s&code=b",
            "state=s&iss=x&iss=x",
            "error=a&error=a",
            "state=a%00b",
            "code=%00",
            "state=s&error_description=x%00",
        ] {
            let err = parse_callback_query(Some(query)).expect_err(query);
            assert_eq!(err.code, "invalid_request", "{query}");
        }
    }

    proptest! {
        /// Any query string parses or is refused as `invalid_request`; never a panic, and a
        /// parsed value is exactly what the query carried.
        #[test]
        fn arbitrary_callback_queries_never_panic(query in ".{0,200}") {
            match parse_callback_query(Some(&query)) {
                Ok(params) => {
                    for value in [&params.code, &params.state, &params.error, &params.error_description, &params.iss]
                        .into_iter()
                        .flatten()
                    {
                        prop_assert!(!value.contains('\0'));
                    }
                }
                Err(err) => prop_assert_eq!(err.code, "invalid_request"),
            }
        }

        /// Well-formed callbacks, parameters in any order among unknown ones, round-trip.
        #[test]
        fn encoded_parameters_round_trip(
            code in ".{1,40}",
            state in "[A-Za-z0-9_-]{1,64}",
            extra in proptest::collection::vec(("[a-z_]{1,10}", ".{0,20}"), 0..4),
        ) {
            let known = ["code", "state", "error", "error_description", "iss"];
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            for (name, value) in extra.iter().filter(|(name, _)| !known.contains(&name.as_str())) {
                query.append_pair(name, value);
            }
            query.append_pair("state", &state);
            query.append_pair("code", &code);
            let parsed = parse_callback_query(Some(&query.finish()));
            if code.contains('\0') {
                prop_assert!(parsed.is_err());
            } else {
                let parsed = parsed.expect("parses");
                prop_assert_eq!(parsed.code.as_deref(), Some(code.as_str()));
                prop_assert_eq!(parsed.state.as_deref(), Some(state.as_str()));
            }
        }
    }

    #[test]
    fn embedded_json_cannot_close_the_script() {
        let value = serde_json::json!({"d": "</script><script>alert(1)</script>"});
        let embedded = script_json(&value);
        assert!(!embedded.contains("</script>"));
        let back: serde_json::Value = serde_json::from_str(&embedded).expect("still JSON");
        assert_eq!(back, value);
        assert_eq!(escape_html("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;");
    }
}
