//! Microsoft identity platform v2 (Entra ID / Graph). Refresh tokens rotate on every use;
//! there is no per-application revocation endpoint.

use super::{builtin_url, strings, Protocol, ProviderDefinition};
use crate::config::ConfigError;

pub const DEFAULT_TENANT: &str = "common";
const LOGIN: &str = "https://login.microsoftonline.com";

/// Tenant names are `common`, `organizations`, `consumers`, a GUID or a domain name.
fn validate_tenant(tenant: &str) -> Result<(), ConfigError> {
    let valid = !tenant.is_empty()
        && tenant.len() <= 253
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !tenant.contains("..");
    if valid {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "MICROSOFT_TENANT",
            "must be common, organizations, consumers, a tenant id or a domain name",
        ))
    }
}

pub fn definition(tenant: &str) -> Result<ProviderDefinition, ConfigError> {
    validate_tenant(tenant)?;
    let url = |value: String| builtin_url("MICROSOFT_TENANT", &value);
    Ok(ProviderDefinition {
        name: "microsoft".to_owned(),
        display_name: "Microsoft".to_owned(),
        protocol: Protocol::Oidc,
        authorization_url: url(format!("{LOGIN}/{tenant}/oauth2/v2.0/authorize"))?,
        token_url: url(format!("{LOGIN}/{tenant}/oauth2/v2.0/token"))?,
        revocation_url: None,
        userinfo_url: Some(url("https://graph.microsoft.com/oidc/userinfo".to_owned())?),
        // The multi-tenant issuer is a template; the ID token's `tid` fills it in.
        issuer: Some(format!("{LOGIN}/{{tenantid}}/v2.0")),
        jwks_url: Some(url(format!("{LOGIN}/{tenant}/discovery/v2.0/keys"))?),
        default_scopes: strings(&["openid", "profile", "email", "offline_access", "User.Read"]),
        pkce: true,
        credential_env_prefixes: vec!["MICROSOFT"],
    })
}
