//! Protocol-level OAuth 2.0 / OpenID Connect *client* building blocks: PKCE, scope sets, the
//! token endpoint (RFC 6749 §4.1.3, §5, §6), revocation (RFC 7009) and ID-token validation
//! (OIDC Core §3.1.3.7).
//!
//! Nothing here touches the database or knows business rules: these functions take explicit
//! inputs (endpoints, credentials, "now") and return typed outcomes, so the services layer
//! decides what a failure means for a connection. Token values only ever travel inside
//! [`secrecy::SecretString`] and never appear in `Debug`, `Display` or error messages.

pub mod id_token;
pub mod pkce;
pub mod revocation;
pub mod scope;
pub mod token;

mod transport;

#[cfg(test)]
mod test_server;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

pub use id_token::{
    validate_id_token, IdTokenClaims, IdTokenError, IdTokenExpectations, IssuerRule,
};
pub use pkce::{random_urlsafe, s256_challenge, Pkce};
pub use revocation::{revoke, RevocationEndpoint, RevocationOutcome, TokenHint};
pub use scope::{difference, join_scopes, parse_scopes, union};
pub use token::{
    parse_token_response, request_token, BodyFormat, ClientAuth, ClientCredentials, FailureClass,
    TokenEndpoint, TokenError, TokenGrant, TokenResponse,
};

/// Provider responses larger than this are refused: a token response or a userinfo document is
/// a few KiB, so anything bigger is a misbehaving (or hostile) endpoint, not data we need.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(15);
const USER_AGENT: &str = concat!("oauth-manager/", env!("CARGO_PKG_VERSION"));

/// The HTTP client for every call to a provider.
///
/// Redirects are never followed: a token or revocation request carries client credentials, and
/// a redirect would replay them (and the code or token) to wherever the `Location` points.
/// A 3xx therefore surfaces as an error instead.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    http_client_with(TOTAL_TIMEOUT, DEFAULT_IDLE_PER_HOST)
}

/// Idle connections [`http_client`] keeps per provider host.
const DEFAULT_IDLE_PER_HOST: usize = 64;

/// [`http_client`] with another total timeout per request (`OAUTH_PROVIDER_TIMEOUT_SECONDS`),
/// keeping at most `idle_per_host` idle connections to each provider host.
///
/// The bound matters after a burst: each connection holds its buffers (and, over TLS, its
/// session) for the 90 s it may stay idle, and a burst of sign-ins opens one per sign-in in
/// progress (256 by default). Callers keep as many as their steady load uses at once (the
/// background refresher's concurrency); connections beyond that close as they come back.
pub fn http_client_with(
    total: Duration,
    idle_per_host: usize,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .pool_max_idle_per_host(idle_per_host)
        .connect_timeout(CONNECT_TIMEOUT.min(total))
        .timeout(total)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .build()
}

/// GET a JSON document with a bearer access token (OIDC userinfo, YouTube `channels.list`).
///
/// A 401 is [`TokenError::Unauthorized`]: the access token died (possibly early, R9), so the
/// caller refreshes once and retries. 429/5xx/network failures are transient; any other
/// non-success status is a provider error carrying whatever error the body names.
pub async fn get_json_with_bearer(
    http: &reqwest::Client,
    url: &Url,
    access_token: &SecretString,
) -> Result<serde_json::Value, TokenError> {
    let mut authorization =
        reqwest::header::HeaderValue::try_from(format!("Bearer {}", access_token.expose_secret()))
            .map_err(|_| {
                TokenError::InvalidResponse(
                    "the access token is not a valid header value".to_owned(),
                )
            })?;
    authorization.set_sensitive(true);
    let request = http
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .header(reqwest::header::AUTHORIZATION, authorization);
    let reply = transport::send(request).await?;
    let token = access_token.expose_secret().to_owned();
    let encoded = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
    bearer_reply(&reply, &zeroize::Zeroizing::new(vec![token, encoded]))
}

/// `secrets`: the access token, removed from any error text the API sent.
fn bearer_reply(
    reply: &transport::Reply,
    secrets: &[String],
) -> Result<serde_json::Value, TokenError> {
    match reply.status {
        200..=299 => serde_json::from_slice(&reply.body).map_err(|_| {
            TokenError::InvalidResponse(format!("HTTP {} body is not JSON", reply.status))
        }),
        401 => Err(TokenError::Unauthorized),
        300..=399 => Err(transport::redirect_error(reply.status)),
        status if transport::is_transient_status(status) => Err(reply.transient()),
        status => Err(api_error(status, &reply.body, secrets)),
    }
}

/// A non-success API answer. Google APIs nest the error (`{"error":{"message":..,
/// "errors":[{"reason":"quotaExceeded"}]}}`), OAuth-style endpoints put a string in `error`.
fn api_error(status: u16, body: &[u8], secrets: &[String]) -> TokenError {
    let document: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = document.as_ref().and_then(|doc| doc.get("error"));
    let (code, description) = match error {
        Some(serde_json::Value::String(code)) => (
            code.clone(),
            document
                .as_ref()
                .and_then(|doc| doc.get("error_description"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
        ),
        Some(nested @ serde_json::Value::Object(_)) => (
            nested
                .pointer("/errors/0/reason")
                .or_else(|| nested.get("status"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("unknown_error")
                .to_owned(),
            nested
                .get("message")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
        ),
        _ => ("unknown_error".to_owned(), None),
    };
    TokenError::provider(code, description, Vec::new(), status, secrets)
}

#[cfg(test)]
mod tests {
    use super::test_server::{FakeServer, Scripted};
    use super::*;

    fn token() -> SecretString {
        SecretString::from("ya29.secret-access-token")
    }

    #[tokio::test]
    async fn bearer_get_sends_the_token_and_parses_json() {
        let server =
            FakeServer::start(vec![Scripted::json(200, r#"{"sub":"123","items":[]}"#)]).await;
        let http = http_client().unwrap();
        let value = get_json_with_bearer(&http, &server.url("/userinfo"), &token())
            .await
            .unwrap();
        assert_eq!(value["sub"], "123");
        let seen = server.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, "GET");
        assert_eq!(
            seen[0].header("authorization").as_deref(),
            Some("Bearer ya29.secret-access-token")
        );
        assert_eq!(
            seen[0].header("accept").as_deref(),
            Some("application/json")
        );
        let agent = seen[0].header("user-agent").unwrap();
        assert!(agent.starts_with("oauth-manager/"), "{agent}");
    }

    #[tokio::test]
    async fn bearer_get_maps_statuses() {
        let too_big = "x".repeat(MAX_RESPONSE_BYTES + 1);
        type Check = fn(&TokenError) -> bool;
        let cases: Vec<(Scripted, Check)> = vec![
            (Scripted::json(401, r#"{"error":"invalid_token"}"#), |e| {
                *e == TokenError::Unauthorized
            }),
            (
                Scripted::json(503, "oops").with_header("retry-after", "7"),
                |e| matches!(e, TokenError::Transient { retry_after: Some(d), .. } if d.as_secs() == 7),
            ),
            (Scripted::json(429, ""), |e| {
                e.class() == FailureClass::Transient
            }),
            (Scripted::text(200, "<html>not json</html>"), |e| {
                matches!(e, TokenError::InvalidResponse(_))
            }),
            (Scripted::text(200, &too_big), |e| {
                matches!(e, TokenError::InvalidResponse(_))
            }),
            (
                Scripted::text(302, "").with_header("location", "https://evil.example/"),
                |e| matches!(e, TokenError::InvalidResponse(_)),
            ),
            (
                Scripted::json(
                    403,
                    r#"{"error":{"code":403,"message":"quota","errors":[{"reason":"quotaExceeded"}]}}"#,
                ),
                |e| matches!(e, TokenError::Provider { error, status: 403, .. } if error == "quotaExceeded"),
            ),
        ];
        for (scripted, check) in cases {
            let server = FakeServer::start(vec![scripted]).await;
            let http = http_client().unwrap();
            let err = get_json_with_bearer(&http, &server.url("/api"), &token())
                .await
                .unwrap_err();
            assert!(check(&err), "unexpected {err:?}");
            assert!(!format!("{err} {err:?}").contains("secret-access-token"));
        }
    }

    #[tokio::test]
    async fn an_api_error_never_repeats_the_access_token() {
        let body = r#"{"error":{"message":"token ya29.secret-access-token is not valid","status":"PERMISSION_DENIED"}}"#;
        let server = FakeServer::start(vec![Scripted::json(403, body)]).await;
        let err = get_json_with_bearer(&http_client().unwrap(), &server.url("/api"), &token())
            .await
            .unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("secret-access-token"), "{shown}");
        assert!(shown.contains("token [redacted] is not valid"), "{shown}");
    }

    #[tokio::test]
    async fn network_failure_is_transient() {
        let (socket, address) = super::test_server::refusing_address();
        let url = Url::parse(&format!("http://{address}/userinfo")).unwrap();
        let err = get_json_with_bearer(&http_client().unwrap(), &url, &token())
            .await
            .unwrap_err();
        assert_eq!(err.class(), FailureClass::Transient, "{err:?}");
        drop(socket);
    }
}

#[cfg(test)]
mod pool_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A keep-alive HTTP/1.1 server that answers every request after 100 ms and counts the
    /// connections open to it.
    async fn slow_server() -> (Url, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let open = counter.clone();
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = [0_u8; 4096];
                    // One read is one request here: they are small GETs without bodies.
                    while socket.read(&mut buffer).await.is_ok_and(|read| read > 0) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                        if socket.write_all(reply).await.is_err() {
                            break;
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (url, open)
    }

    /// Connections still open to the server once 8 concurrent requests are done.
    async fn left_open_after_a_burst(idle_per_host: usize) -> usize {
        let (url, open) = slow_server().await;
        let client = http_client_with(TOTAL_TIMEOUT, idle_per_host).unwrap();
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..8 {
            burst.spawn(client.get(url.clone()).send());
        }
        while let Some(response) = burst.join_next().await {
            assert_eq!(response.unwrap().unwrap().status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        open.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_burst_leaves_at_most_the_idle_bound_open() {
        assert_eq!(left_open_after_a_burst(2).await, 2);
        assert_eq!(
            left_open_after_a_burst(8).await,
            8,
            "the bound is what closes them"
        );
    }
}
