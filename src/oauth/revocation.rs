//! Token revocation (RFC 7009, R12).
//!
//! Success is the *status*: a 200 means the token is gone (or never was valid), and the body
//! is ignored. A 503 means the token still exists and the caller must retry per
//! `Retry-After`, so it is an outcome rather than an error: the disconnect flow queues it.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use super::token::{BodyFormat, ClientAuth, ClientCredentials, TokenError};
use super::transport::{self, PostTarget, Reply};

#[derive(Debug, Clone)]
pub struct RevocationEndpoint {
    pub url: Url,
    pub auth: ClientAuth,
    pub body: BodyFormat,
    /// Extra request headers, e.g. `Notion-Version`.
    pub headers: Vec<(String, String)>,
}

/// Sent as `token_type_hint` (RFC 7009 §2.1). Pass `None` for endpoints that validate their
/// body strictly and do not know the parameter (Notion takes only `{"token"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenHint {
    AccessToken,
    RefreshToken,
}

impl TokenHint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AccessToken => "access_token",
            Self::RefreshToken => "refresh_token",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationOutcome {
    /// The token is no longer usable; never use it again.
    Revoked,
    /// HTTP 503: the token still exists; retry after the given delay, if any.
    RetryLater(Option<Duration>),
}

/// Revokes `token` at the provider.
pub async fn revoke(
    http: &reqwest::Client,
    endpoint: &RevocationEndpoint,
    client: &ClientCredentials,
    token: &SecretString,
    hint: Option<TokenHint>,
) -> Result<RevocationOutcome, TokenError> {
    let mut params = vec![("token", token.expose_secret())];
    if let Some(hint) = hint {
        params.push(("token_type_hint", hint.as_str()));
    }
    let target = PostTarget {
        url: &endpoint.url,
        auth: endpoint.auth,
        body: endpoint.body,
        headers: &endpoint.headers,
    };
    let secrets = transport::request_secrets(client, &params, &["token"]);
    let reply = transport::send(transport::client_post(http, &target, client, &params)).await?;
    outcome(&reply, &secrets)
}

/// `secrets`: the request's secret values, removed from any error text the provider sent.
fn outcome(reply: &Reply, secrets: &[String]) -> Result<RevocationOutcome, TokenError> {
    match reply.status {
        200..=299 => Ok(RevocationOutcome::Revoked),
        503 => Ok(RevocationOutcome::RetryLater(
            reply.transient().retry_after(),
        )),
        300..=399 => Err(transport::redirect_error(reply.status)),
        status if transport::is_transient_status(status) => Err(reply.transient()),
        status => {
            let (error, description) = error_body(&reply.body);
            // `invalid_token` means the server no longer recognises the token — it is already
            // unusable, which is exactly the state revocation wants. Google answers 400
            // `invalid_token` for a token revoked earlier; treating that as failure would
            // make disconnect non-idempotent and retry forever.
            if status == 400 && error == "invalid_token" {
                return Ok(RevocationOutcome::Revoked);
            }
            Err(TokenError::provider(
                error,
                description,
                Vec::new(),
                status,
                secrets,
            ))
        }
    }
}

fn error_body(body: &[u8]) -> (String, Option<String>) {
    let document: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        document
            .as_ref()
            .and_then(|doc| doc.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let error = field("error").unwrap_or_else(|| "unknown_error".to_owned());
    (error, field("error_description"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::http_client;
    use crate::oauth::test_server::{FakeServer, Scripted};
    use crate::oauth::FailureClass;

    fn credentials() -> ClientCredentials {
        ClientCredentials {
            client_id: "client-123".to_owned(),
            client_secret: SecretString::from("secret-456"),
        }
    }

    fn endpoint(server: &FakeServer, auth: ClientAuth, body: BodyFormat) -> RevocationEndpoint {
        RevocationEndpoint {
            url: server.url("/revoke"),
            auth,
            body,
            headers: Vec::new(),
        }
    }

    async fn revoke_once(scripted: Scripted) -> Result<RevocationOutcome, TokenError> {
        let server = FakeServer::start(vec![scripted]).await;
        let target = endpoint(&server, ClientAuth::ClientSecretPost, BodyFormat::Form);
        let token = SecretString::from("tok");
        revoke(
            &http_client().unwrap(),
            &target,
            &credentials(),
            &token,
            None,
        )
        .await
    }

    #[tokio::test]
    async fn a_refusal_never_repeats_the_token_or_the_client_secret() {
        let body = r#"{"error":"invalid_request","error_description":"bad token tok-echoed-value for secret-456"}"#;
        let server = FakeServer::start(vec![Scripted::json(400, body)]).await;
        let target = endpoint(&server, ClientAuth::ClientSecretPost, BodyFormat::Form);
        let token = SecretString::from("tok-echoed-value");
        let err = revoke(
            &http_client().unwrap(),
            &target,
            &credentials(),
            &token,
            None,
        )
        .await
        .unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains("tok-echoed-value") && !shown.contains("secret-456"),
            "{shown}"
        );
        assert!(
            shown.contains("bad token [redacted] for [redacted]"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn status_mapping() {
        let cases: Vec<(Scripted, Result<RevocationOutcome, FailureClass>)> = vec![
            (Scripted::text(200, ""), Ok(RevocationOutcome::Revoked)),
            // Unknown tokens are a 200 too (RFC 7009 §2.2); the body is ignored.
            (
                Scripted::json(200, r#"{"whatever":true}"#),
                Ok(RevocationOutcome::Revoked),
            ),
            (Scripted::text(204, ""), Ok(RevocationOutcome::Revoked)),
            (
                Scripted::json(
                    400,
                    r#"{"error":"invalid_token","error_description":"Token expired or revoked"}"#,
                ),
                Ok(RevocationOutcome::Revoked),
            ),
            (
                Scripted::text(503, "").with_header("retry-after", "30"),
                Ok(RevocationOutcome::RetryLater(Some(Duration::from_secs(30)))),
            ),
            (
                Scripted::text(503, ""),
                Ok(RevocationOutcome::RetryLater(None)),
            ),
            (Scripted::text(500, "boom"), Err(FailureClass::Transient)),
            (Scripted::text(429, ""), Err(FailureClass::Transient)),
            (
                Scripted::json(401, r#"{"error":"invalid_client"}"#),
                Err(FailureClass::InvalidClient),
            ),
            (
                Scripted::json(400, r#"{"error":"unsupported_token_type"}"#),
                Err(FailureClass::Other),
            ),
            (Scripted::text(404, "not found"), Err(FailureClass::Other)),
            (
                Scripted::text(301, "").with_header("location", "/x"),
                Err(FailureClass::Other),
            ),
        ];
        for (scripted, expected) in cases {
            let label = format!("{scripted:?}");
            let result = revoke_once(scripted).await.map_err(|err| err.class());
            assert_eq!(result, expected, "{label}");
        }
    }

    #[tokio::test]
    async fn unknown_4xx_keeps_status() {
        let err = revoke_once(Scripted::text(404, "nope")).await.unwrap_err();
        assert!(
            matches!(err, TokenError::Provider { status: 404, ref error, .. } if error == "unknown_error")
        );
    }

    #[tokio::test]
    async fn form_request_with_hint_and_basic_auth() {
        let server = FakeServer::start(vec![Scripted::text(200, "")]).await;
        let target = endpoint(&server, ClientAuth::ClientSecretBasic, BodyFormat::Form);
        let token = SecretString::from("1//refresh-token");
        let outcome = revoke(
            &http_client().unwrap(),
            &target,
            &credentials(),
            &token,
            Some(TokenHint::RefreshToken),
        )
        .await
        .unwrap();
        assert_eq!(outcome, RevocationOutcome::Revoked);
        let seen = &server.requests()[0];
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.header_count("authorization"), 1);
        let form = seen.form();
        let keys: Vec<&str> = form.keys().map(String::as_str).collect();
        assert_eq!(keys, ["token", "token_type_hint"]);
        assert_eq!(form["token"], "1//refresh-token");
        assert_eq!(form["token_type_hint"], "refresh_token");
    }

    #[tokio::test]
    async fn post_auth_puts_credentials_in_the_body() {
        let server = FakeServer::start(vec![Scripted::text(200, "")]).await;
        let target = endpoint(&server, ClientAuth::ClientSecretPost, BodyFormat::Form);
        let token = SecretString::from("at");
        revoke(
            &http_client().unwrap(),
            &target,
            &credentials(),
            &token,
            Some(TokenHint::AccessToken),
        )
        .await
        .unwrap();
        let seen = &server.requests()[0];
        assert_eq!(seen.header_count("authorization"), 0);
        let form = seen.form();
        assert_eq!(form["client_id"], "client-123");
        assert_eq!(form["client_secret"], "secret-456");
        assert_eq!(form["token_type_hint"], "access_token");
    }

    #[tokio::test]
    async fn notion_json_body() {
        let server = FakeServer::start(vec![Scripted::json(200, "{}")]).await;
        let mut target = endpoint(&server, ClientAuth::ClientSecretBasic, BodyFormat::Json);
        target.headers = vec![("Notion-Version".to_owned(), "2022-06-28".to_owned())];
        let token = SecretString::from("ntn_token");
        let outcome = revoke(
            &http_client().unwrap(),
            &target,
            &credentials(),
            &token,
            None,
        )
        .await
        .unwrap();
        assert_eq!(outcome, RevocationOutcome::Revoked);
        let seen = &server.requests()[0];
        assert!(seen.header("authorization").unwrap().starts_with("Basic "));
        assert_eq!(seen.header("notion-version").as_deref(), Some("2022-06-28"));
        assert_eq!(
            seen.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(seen.json(), serde_json::json!({"token": "ntn_token"}));
    }

    #[tokio::test]
    async fn retry_after_503_then_success() {
        let server = FakeServer::start(vec![
            Scripted::text(503, "").with_header("retry-after", "1"),
            Scripted::text(200, ""),
        ])
        .await;
        let target = endpoint(&server, ClientAuth::ClientSecretPost, BodyFormat::Form);
        let token = SecretString::from("rt");
        let http = http_client().unwrap();
        let first = revoke(&http, &target, &credentials(), &token, None)
            .await
            .unwrap();
        assert_eq!(
            first,
            RevocationOutcome::RetryLater(Some(Duration::from_secs(1)))
        );
        let second = revoke(&http, &target, &credentials(), &token, None)
            .await
            .unwrap();
        assert_eq!(second, RevocationOutcome::Revoked);
    }
}
