//! OpenID Connect discovery for declared providers that give only an `issuer`.
//!
//! RFC 8414 §3.3 / OIDC Discovery §4.3: the document's `issuer` must equal the configured one
//! exactly, or the document is not used (a mix-up or misconfiguration); the provider is then
//! listed as unavailable rather than trusted.

use serde::Deserialize;
use url::Url;

use super::declared::DeclaredProvider;
use crate::config::parse_outbound_url;

#[derive(Debug, Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    userinfo_endpoint: Option<String>,
    jwks_uri: Option<String>,
    revocation_endpoint: Option<String>,
    #[serde(default)]
    code_challenge_methods_supported: Vec<String>,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

const MAX_METADATA_BYTES: usize = 256 * 1024;

/// Fills the endpoints `declared` does not set from the issuer's metadata; on failure the
/// provider is marked unavailable with the reason.
pub async fn complete(declared: &mut DeclaredProvider, http: &reqwest::Client) {
    let Some(issuer) = declared.issuer.clone() else {
        return;
    };
    match fetch(http, &issuer).await {
        Ok(metadata) => {
            if let Err(reason) = fill(declared, &issuer, metadata) {
                tracing::error!(provider = %declared.name, %reason, "OIDC discovery rejected");
                declared.unavailable = Some(reason);
            }
        }
        Err(reason) => {
            tracing::error!(provider = %declared.name, %reason, "OIDC discovery failed");
            declared.unavailable = Some(format!("OIDC discovery failed: {reason}"));
        }
    }
}

async fn fetch(http: &reqwest::Client, issuer: &str) -> Result<Metadata, String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let response = http
        .get(&url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|err| err.without_url().to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {} from {url}", response.status()));
    }
    // Refused as soon as it grows past the limit, not after buffering whatever was sent.
    let body =
        crate::jwks::read_limited(response, MAX_METADATA_BYTES, "metadata document too large")
            .await?;
    serde_json::from_slice(&body).map_err(|err| format!("metadata is not valid JSON: {err}"))
}

fn fill(declared: &mut DeclaredProvider, issuer: &str, metadata: Metadata) -> Result<(), String> {
    if metadata.issuer != issuer {
        return Err(format!(
            "metadata issuer {:?} differs from the configured issuer {issuer:?}",
            metadata.issuer
        ));
    }
    let endpoint = |value: &str| -> Result<Url, String> {
        parse_outbound_url(&declared.name, value).map_err(|err| err.to_string())
    };
    let optional = |value: Option<String>| value.as_deref().map(endpoint).transpose();
    if declared.authorization_url.is_none() {
        declared.authorization_url = Some(endpoint(&metadata.authorization_endpoint)?);
    }
    if declared.token_url.is_none() {
        declared.token_url = Some(endpoint(&metadata.token_endpoint)?);
    }
    if declared.userinfo_url.is_none() {
        declared.userinfo_url = optional(metadata.userinfo_endpoint)?;
    }
    if declared.jwks_url.is_none() {
        declared.jwks_url = optional(metadata.jwks_uri)?;
    }
    if declared.revocation_url.is_none() {
        declared.revocation_url = optional(metadata.revocation_endpoint)?;
    }
    if declared.pkce.is_none() && !metadata.code_challenge_methods_supported.is_empty() {
        declared.pkce = Some(
            metadata
                .code_challenge_methods_supported
                .iter()
                .any(|m| m == "S256"),
        );
    }
    if declared.iss_parameter_supported.is_none() {
        declared.iss_parameter_supported =
            Some(metadata.authorization_response_iss_parameter_supported);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(issuer: &str) -> Metadata {
        Metadata {
            issuer: issuer.to_owned(),
            authorization_endpoint: "https://id.acme.test/auth".into(),
            token_endpoint: "https://id.acme.test/token".into(),
            userinfo_endpoint: None,
            jwks_uri: Some("https://id.acme.test/jwks".into()),
            revocation_endpoint: None,
            code_challenge_methods_supported: vec!["S256".into()],
            authorization_response_iss_parameter_supported: true,
        }
    }

    /// An issuer whose metadata never ends (chunked, no length): the read stops at the limit
    /// instead of buffering until the client's timeout.
    #[tokio::test]
    async fn an_endless_metadata_document_is_refused_at_the_size_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        transfer-encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            let chunk = format!("4000\r\n{}\r\n", " ".repeat(0x4000));
            while socket.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let err = fetch(&http, &format!("http://{address}"))
            .await
            .unwrap_err();
        assert_eq!(err, "metadata document too large");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn metadata_fills_missing_endpoints_only_for_the_same_issuer() {
        let mut declared = DeclaredProvider {
            name: "acme".into(),
            issuer: Some("https://id.acme.test".into()),
            token_url: Some(Url::parse("https://proxy.acme.test/token").expect("url")),
            ..Default::default()
        };
        fill(
            &mut declared,
            "https://id.acme.test",
            metadata("https://id.acme.test"),
        )
        .expect("filled");
        assert_eq!(
            declared.authorization_url.as_ref().map(Url::as_str),
            Some("https://id.acme.test/auth")
        );
        assert_eq!(
            declared.token_url.as_ref().map(Url::as_str),
            Some("https://proxy.acme.test/token")
        );
        assert_eq!(
            (declared.pkce, declared.iss_parameter_supported),
            (Some(true), Some(true))
        );
        let mut other = DeclaredProvider {
            name: "acme".into(),
            ..Default::default()
        };
        assert!(fill(
            &mut other,
            "https://id.acme.test",
            metadata("https://evil.test")
        )
        .is_err());
    }
}
