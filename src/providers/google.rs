//! Google (OpenID Connect). Quirks: a refresh token is issued only with `access_type=offline`
//! and only on a consent screen, so `prompt=consent` is sent until one is held; refresh
//! responses usually omit `refresh_token` (the old one stays valid); granted scopes are
//! reported as URLs (`…/auth/userinfo.email` for `email`); users may untick scopes
//! (granular consent), so the granted set is read from the token response.

use super::catalog::{CatalogEntry, Sensitivity};
use super::{builtin_url, params, strings, ProviderDefinition, ProviderKind, RefreshRotation};
use crate::config::ConfigError;
use crate::oauth::{BodyFormat, ClientAuth};

pub const ISSUER: &str = "https://accounts.google.com";
pub const AUTHORIZATION_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
pub const TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const REVOCATION_URL: &str = "https://oauth2.googleapis.com/revoke";
pub const USERINFO_URL: &str = "https://openidconnect.googleapis.com/v1/userinfo";
pub const JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
const SCOPE_PREFIX: &str = "https://www.googleapis.com/auth/";

/// Google's endpoints with the given identity and scopes (shared with YouTube).
pub fn google_endpoints(
    name: &str,
    display_name: &str,
    kind: ProviderKind,
    scopes: &[&str],
    catalog: Vec<CatalogEntry>,
    env: Vec<&'static str>,
) -> Result<ProviderDefinition, ConfigError> {
    let url = |value| builtin_url(name, value);
    Ok(ProviderDefinition {
        name: name.to_owned(),
        display_name: display_name.to_owned(),
        kind,
        authorization_url: url(AUTHORIZATION_URL)?,
        token_url: url(TOKEN_URL)?,
        token_auth_method: ClientAuth::ClientSecretPost,
        token_body: BodyFormat::Form,
        token_headers: Vec::new(),
        revocation_url: Some(url(REVOCATION_URL)?),
        userinfo_url: Some(url(USERINFO_URL)?),
        issuer: Some(ISSUER.to_owned()),
        jwks_url: Some(url(JWKS_URL)?),
        channels_url: None,
        default_scopes: strings(scopes),
        scope_separator: " ".to_owned(),
        pkce: true,
        refresh_rotation: RefreshRotation::None,
        authorization_params: params(&[
            ("access_type", "offline"),
            ("include_granted_scopes", "true"),
        ]),
        iss_parameter_supported: false,
        catalog,
        credential_env_prefixes: env,
    })
}

/// Sign-in scopes shared by Google and YouTube.
pub fn identity_catalog() -> Vec<CatalogEntry> {
    vec![
        CatalogEntry::new(
            "openid",
            "Sign you in with your Google account",
            Sensitivity::Basic,
            &["profile"],
        ),
        CatalogEntry::new(
            "email",
            "See your primary email address",
            Sensitivity::Basic,
            &["profile"],
        ),
        CatalogEntry::new(
            "profile",
            "See your name and profile picture",
            Sensitivity::Basic,
            &["profile"],
        ),
    ]
}

pub fn catalog() -> Vec<CatalogEntry> {
    let scope = |name: &str| format!("{SCOPE_PREFIX}{name}");
    let mut entries = identity_catalog();
    for (name, description, sensitivity, features) in [
        (
            "calendar.readonly",
            "See your calendars and events",
            Sensitivity::Sensitive,
            &["calendar.read"][..],
        ),
        (
            "calendar",
            "See, edit, share and delete your calendars and events",
            Sensitivity::Sensitive,
            &["calendar.read", "calendar.write"][..],
        ),
        (
            "gmail.readonly",
            "Read your email messages and settings",
            Sensitivity::Restricted,
            &["email.read"][..],
        ),
        (
            "gmail.send",
            "Send email on your behalf",
            Sensitivity::Sensitive,
            &["email.send"][..],
        ),
        (
            "drive.file",
            "See, edit and delete only the Drive files you use with this app",
            Sensitivity::Basic,
            &["files"][..],
        ),
        (
            "contacts.readonly",
            "See and download your contacts",
            Sensitivity::Sensitive,
            &["contacts"][..],
        ),
    ] {
        entries.push(CatalogEntry::new(
            &scope(name),
            description,
            sensitivity,
            features,
        ));
    }
    entries
}

pub fn definition() -> Result<ProviderDefinition, ConfigError> {
    google_endpoints(
        "google",
        "Google",
        ProviderKind::Google,
        &["openid", "email", "profile"],
        catalog(),
        vec!["GOOGLE"],
    )
}

/// Google only returns a refresh token on a consent screen: ask for one until we hold one.
pub fn prompt(holds_refresh_token: bool) -> Option<&'static str> {
    (!holds_refresh_token).then_some("consent")
}

/// Google reports `email` / `profile` as their legacy URL forms; map them back so the granted
/// set compares equal to what was requested.
pub fn normalize_scope(scope: &str) -> String {
    match scope {
        "https://www.googleapis.com/auth/userinfo.email" => "email".to_owned(),
        "https://www.googleapis.com/auth/userinfo.profile" => "profile".to_owned(),
        other => other.to_owned(),
    }
}
