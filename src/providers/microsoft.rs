//! Microsoft identity platform v2 (Entra ID / Graph). Quirks: `offline_access` must be
//! requested to get a refresh token; refresh tokens rotate on every use (the old one stays
//! valid); there is no revocation endpoint; the multi-tenant issuer is the template
//! `…/{tenantid}/v2.0`, filled from the ID token's `tid`; `sub` is pairwise, so accounts are
//! keyed on `tid` + `oid`; Graph scopes come back resource-qualified
//! (`https://graph.microsoft.com/User.Read`) and without the OpenID scopes.

use serde_json::{json, Value};

use super::catalog::{CatalogEntry, Sensitivity};
use super::{builtin_url, strings, ProviderDefinition, ProviderKind, RefreshRotation};
use crate::config::ConfigError;
use crate::oauth::{BodyFormat, ClientAuth, IdTokenClaims};

pub const DEFAULT_TENANT: &str = "common";
const LOGIN: &str = "https://login.microsoftonline.com";
const GRAPH_PREFIX: &str = "https://graph.microsoft.com/";
/// Scopes about the sign-in itself, which the token response's `scope` does not repeat.
pub const OPENID_SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];

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

pub fn catalog() -> Vec<CatalogEntry> {
    vec![
        CatalogEntry::new(
            "openid",
            "Sign you in with your Microsoft account",
            Sensitivity::Basic,
            &["profile"],
        ),
        CatalogEntry::new(
            "profile",
            "See your basic profile",
            Sensitivity::Basic,
            &["profile"],
        ),
        CatalogEntry::new(
            "email",
            "See your email address",
            Sensitivity::Basic,
            &["profile"],
        ),
        CatalogEntry::new(
            "offline_access",
            "Keep access while you are not using the app",
            Sensitivity::Basic,
            &[],
        ),
        CatalogEntry::new(
            "User.Read",
            "Sign you in and read your profile",
            Sensitivity::Basic,
            &["profile"],
        ),
        CatalogEntry::new(
            "Calendars.Read",
            "Read your calendars",
            Sensitivity::Sensitive,
            &["calendar.read"],
        ),
        CatalogEntry::new(
            "Calendars.ReadWrite",
            "Read and write your calendars",
            Sensitivity::Sensitive,
            &["calendar.read", "calendar.write"],
        ),
        CatalogEntry::new(
            "Mail.Read",
            "Read your mail",
            Sensitivity::Restricted,
            &["email.read"],
        ),
        CatalogEntry::new(
            "Mail.Send",
            "Send mail as you",
            Sensitivity::Sensitive,
            &["email.send"],
        ),
        CatalogEntry::new(
            "Files.ReadWrite",
            "Have full access to your files",
            Sensitivity::Sensitive,
            &["files"],
        ),
        CatalogEntry::new(
            "Contacts.Read",
            "Read your contacts",
            Sensitivity::Sensitive,
            &["contacts"],
        ),
    ]
}

pub fn definition(tenant: &str) -> Result<ProviderDefinition, ConfigError> {
    validate_tenant(tenant)?;
    let url = |value: String| builtin_url("MICROSOFT_TENANT", &value);
    Ok(ProviderDefinition {
        name: "microsoft".to_owned(),
        display_name: "Microsoft".to_owned(),
        kind: ProviderKind::Microsoft,
        authorization_url: url(format!("{LOGIN}/{tenant}/oauth2/v2.0/authorize"))?,
        token_url: url(format!("{LOGIN}/{tenant}/oauth2/v2.0/token"))?,
        token_auth_method: ClientAuth::ClientSecretPost,
        token_body: BodyFormat::Form,
        token_headers: Vec::new(),
        revocation_url: None,
        userinfo_url: Some(url("https://graph.microsoft.com/oidc/userinfo".to_owned())?),
        issuer: Some(format!("{LOGIN}/{{tenantid}}/v2.0")),
        jwks_url: Some(url(format!("{LOGIN}/{tenant}/discovery/v2.0/keys"))?),
        channels_url: None,
        default_scopes: strings(&["openid", "profile", "email", "offline_access", "User.Read"]),
        scope_separator: " ".to_owned(),
        pkce: true,
        refresh_rotation: RefreshRotation::Lenient,
        authorization_params: Default::default(),
        iss_parameter_supported: false,
        catalog: catalog(),
        credential_env_prefixes: vec!["MICROSOFT"],
    })
}

/// `https://graph.microsoft.com/User.Read` → `User.Read` (the catalog's form).
pub fn normalize_scope(scope: &str) -> String {
    scope.strip_prefix(GRAPH_PREFIX).unwrap_or(scope).to_owned()
}

/// The stable account key (`tid`.`oid`) and display metadata from a validated ID token.
pub fn account(claims: &IdTokenClaims) -> Option<(String, Value)> {
    let tenant = claims.tenant_id.as_deref().filter(|t| !t.is_empty())?;
    let object = claims.object_id.as_deref().filter(|o| !o.is_empty())?;
    Some((
        format!("{tenant}.{object}"),
        json!({"tenant_id": tenant, "object_id": object}),
    ))
}
