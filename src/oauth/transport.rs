//! HTTP plumbing shared by the token, revocation and bearer calls: client authentication,
//! body encoding, a size-capped body read, and the mapping of transport failures.

use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use url::form_urlencoded;

use super::token::{BodyFormat, ClientAuth, ClientCredentials, TokenError};
use super::MAX_RESPONSE_BYTES;

/// A `Retry-After` longer than this is clamped: a provider asking for days of silence is more
/// likely misconfigured than right, and the caller's own backoff caps apply anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// A response read into memory (bounded by [`MAX_RESPONSE_BYTES`]).
pub(crate) struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn transient(&self) -> TokenError {
        TokenError::Transient {
            reason: format!("HTTP {}", self.status),
            retry_after: self
                .retry_after
                .as_deref()
                .and_then(|value| parse_retry_after(value, Utc::now())),
        }
    }
}

/// Where a client-authenticated POST goes and how it is encoded.
pub(crate) struct PostTarget<'a> {
    pub url: &'a url::Url,
    pub auth: ClientAuth,
    pub body: BodyFormat,
    pub headers: &'a [(String, String)],
}

/// Builds a POST with exactly one client authentication method (RFC 6749 §2.3.1): HTTP Basic,
/// or `client_id` + `client_secret` in the body — never both, which the RFC forbids and some
/// servers reject.
pub(crate) fn client_post(
    http: &reqwest::Client,
    target: &PostTarget<'_>,
    client: &ClientCredentials,
    params: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let mut fields: Vec<(&str, &str)> = params.to_vec();
    let mut request = http
        .post(target.url.clone())
        .header(reqwest::header::ACCEPT, "application/json");
    for (name, value) in target.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    match target.auth {
        ClientAuth::ClientSecretBasic => {
            request = request.header(reqwest::header::AUTHORIZATION, basic_authorization(client));
        }
        ClientAuth::ClientSecretPost => {
            fields.push(("client_id", &client.client_id));
            fields.push(("client_secret", client.client_secret.expose_secret()));
        }
    }
    match target.body {
        BodyFormat::Form => request
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form_body(&fields)),
        BodyFormat::Json => request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json_body(&fields)),
    }
}

/// The secret values a client-authenticated POST carries, in every form they take on the wire
/// (as given, form-encoded, and the HTTP Basic credentials): the client secret, plus the values
/// of `secret_params`. Whatever the provider answers is cleaned of them
/// ([`super::token::redact`]), because some servers repeat the value they refuse ("Invalid
/// refresh token: …") and that text reaches logs, the database and API responses.
pub(crate) fn request_secrets(
    client: &ClientCredentials,
    params: &[(&str, &str)],
    secret_params: &[&str],
) -> zeroize::Zeroizing<Vec<String>> {
    let mut secrets = vec![client.client_secret.expose_secret().to_owned()];
    if let Some(credentials) = basic_authorization(client)
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Basic "))
    {
        secrets.push(credentials.to_owned());
    }
    secrets.extend(
        params
            .iter()
            .filter(|(name, _)| secret_params.contains(name))
            .map(|(_, value)| (*value).to_owned()),
    );
    let encoded: Vec<String> = secrets
        .iter()
        .map(|secret| form_urlencoded::byte_serialize(secret.as_bytes()).collect())
        .collect();
    secrets.extend(encoded);
    zeroize::Zeroizing::new(secrets)
}

/// RFC 6749 §2.3.1: id and secret are form-urlencoded *before* base64, so a secret containing
/// `:` or non-ASCII characters survives the `id:secret` split on the server.
fn basic_authorization(client: &ClientCredentials) -> reqwest::header::HeaderValue {
    let id: String = form_urlencoded::byte_serialize(client.client_id.as_bytes()).collect();
    let secret: String =
        form_urlencoded::byte_serialize(client.client_secret.expose_secret().as_bytes()).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    // Base64 output is always a valid header value; the fallback is unreachable.
    let mut value = reqwest::header::HeaderValue::try_from(format!("Basic {encoded}"))
        .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static("Basic"));
    value.set_sensitive(true);
    value
}

fn form_body(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

fn json_body(fields: &[(&str, &str)]) -> String {
    let object: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(name, value)| {
            (
                (*name).to_owned(),
                serde_json::Value::String((*value).to_owned()),
            )
        })
        .collect();
    serde_json::Value::Object(object).to_string()
}

/// Sends the request and reads at most [`MAX_RESPONSE_BYTES`] of the body.
pub(crate) async fn send(request: reqwest::RequestBuilder) -> Result<Reply, TokenError> {
    let mut response = request.send().await.map_err(network_error)?;
    let header = |name: reqwest::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(reqwest::header::CONTENT_TYPE);
    let retry_after = header(reqwest::header::RETRY_AFTER);
    let status = response.status().as_u16();
    if response
        .content_length()
        .is_some_and(|length| length > MAX_RESPONSE_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(network_error)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply {
        status,
        content_type,
        retry_after,
        body,
    })
}

fn too_large() -> TokenError {
    TokenError::InvalidResponse(format!("response body exceeds {MAX_RESPONSE_BYTES} bytes"))
}

/// Transport failures are transient (the provider may be fine a moment later), except a
/// request that could not even be built, which is our configuration (e.g. a bad header).
/// The URL is stripped from the message: it is configuration, not news, and keeps logs short.
pub(crate) fn network_error(err: reqwest::Error) -> TokenError {
    if err.is_builder() {
        return TokenError::InvalidResponse(format!(
            "the request could not be built (check the endpoint configuration): {}",
            err.without_url()
        ));
    }
    let kind = if err.is_timeout() {
        "timeout"
    } else {
        "network error"
    };
    TokenError::Transient {
        reason: format!("{kind}: {}", err.without_url()),
        retry_after: None,
    }
}

pub(crate) fn redirect_error(status: u16) -> TokenError {
    TokenError::InvalidResponse(format!(
        "unexpected redirect (HTTP {status}); redirects are not followed"
    ))
}

/// 429 and 5xx mean "not now", not "never" (F9).
pub(crate) fn is_transient_status(status: u16) -> bool {
    status == 429 || (500..=599).contains(&status)
}

/// `Retry-After` is either delta-seconds or an HTTP-date (RFC 9110 §10.2.3). A date in the
/// past means "now" (zero); unparseable values are ignored rather than failing the response.
pub(crate) fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
        // More digits than fit in a u64 is absurd: clamp rather than drop.
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = DateTime::parse_from_rfc2822(value)
            .ok()?
            .with_timezone(&Utc);
        (at - now).to_std().unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    #[test]
    fn retry_after_forms() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn basic_credentials_are_form_encoded_before_base64() {
        let client = ClientCredentials {
            client_id: "my app".to_owned(),
            client_secret: SecretString::from("a:b/c~d+é"),
        };
        let header = basic_authorization(&client);
        assert!(header.is_sensitive());
        let encoded = header
            .to_str()
            .unwrap()
            .strip_prefix("Basic ")
            .unwrap()
            .to_owned();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "my+app:a%3Ab%2Fc%7Ed%2B%C3%A9"
        );
    }
}
