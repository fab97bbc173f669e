//! Notion public connections: no scopes (capabilities are set on the integration), HTTP Basic
//! client authentication with a JSON body, rotating refresh tokens without `expires_in`.

use super::{builtin_url, Protocol, ProviderDefinition};
use crate::config::ConfigError;

pub fn definition() -> Result<ProviderDefinition, ConfigError> {
    let url = |value| builtin_url("notion", value);
    Ok(ProviderDefinition {
        name: "notion".to_owned(),
        display_name: "Notion".to_owned(),
        protocol: Protocol::Oauth2,
        authorization_url: url("https://api.notion.com/v1/oauth/authorize")?,
        token_url: url("https://api.notion.com/v1/oauth/token")?,
        revocation_url: Some(url("https://api.notion.com/v1/oauth/revoke")?),
        userinfo_url: None,
        issuer: None,
        jwks_url: None,
        default_scopes: Vec::new(),
        // Reportedly unsupported by Notion; `state` alone protects the flow.
        pkce: false,
        credential_env_prefixes: vec!["NOTION"],
    })
}
