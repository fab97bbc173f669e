//! Google (OpenID Connect). Refresh tokens are only issued with `access_type=offline`, and
//! only on a consent screen; refresh responses usually omit `refresh_token`.

use super::{builtin_url, strings, Protocol, ProviderDefinition};
use crate::config::ConfigError;

pub const ISSUER: &str = "https://accounts.google.com";
pub const AUTHORIZATION_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
pub const TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const REVOCATION_URL: &str = "https://oauth2.googleapis.com/revoke";
pub const USERINFO_URL: &str = "https://openidconnect.googleapis.com/v1/userinfo";
pub const JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";

/// Google's endpoints with the given identity and scopes (shared with YouTube).
pub fn google_endpoints(
    name: &str,
    display_name: &str,
    scopes: &[&str],
    env: Vec<&'static str>,
) -> Result<ProviderDefinition, ConfigError> {
    let url = |value| builtin_url(name, value);
    Ok(ProviderDefinition {
        name: name.to_owned(),
        display_name: display_name.to_owned(),
        protocol: Protocol::Oidc,
        authorization_url: url(AUTHORIZATION_URL)?,
        token_url: url(TOKEN_URL)?,
        revocation_url: Some(url(REVOCATION_URL)?),
        userinfo_url: Some(url(USERINFO_URL)?),
        issuer: Some(ISSUER.to_owned()),
        jwks_url: Some(url(JWKS_URL)?),
        default_scopes: strings(scopes),
        pkce: true,
        credential_env_prefixes: env,
    })
}

pub fn definition() -> Result<ProviderDefinition, ConfigError> {
    google_endpoints(
        "google",
        "Google",
        &["openid", "email", "profile"],
        vec!["GOOGLE"],
    )
}
