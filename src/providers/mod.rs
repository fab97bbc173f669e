//! OAuth providers: a declarative [`ProviderDefinition`] per provider (endpoints, client
//! authentication, scopes, extra authorization parameters, how the account is identified), one
//! module per built-in provider with its quirks, and [`declared`] for the operator's
//! `OAUTH_PROVIDERS_FILE` (new providers, and overrides of built-ins' endpoints).

pub mod catalog;
pub mod declared;
pub mod discovery;
pub mod google;
pub mod microsoft;
pub mod notion;
pub mod youtube;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use secrecy::SecretString;
use serde::Serialize;
use url::Url;

use crate::config::{ClientCredentials, Config, ConfigError};
use crate::jwks::JwksCache;
use crate::oauth::{BodyFormat, ClientAuth, IssuerRule, RevocationEndpoint, TokenEndpoint};
use catalog::CatalogEntry;

/// Whether the provider speaks OpenID Connect (ID tokens) or plain OAuth 2.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Oidc,
    Oauth2,
}

/// Which quirks apply: how the account is identified and which extra parameters are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Google,
    YouTube,
    Microsoft,
    Notion,
    /// A declared provider: OIDC when it has an issuer, otherwise plain OAuth 2.0 + userinfo.
    Generic,
}

/// What the provider does with refresh tokens on refresh: decides whether a failed refresh may
/// be retried with the same token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshRotation {
    /// The refresh token stays valid (Google).
    None,
    /// A new refresh token each time, and the old one stays valid (Microsoft).
    Lenient,
    /// A new refresh token each time; reusing an old one revokes the grant (Notion, strict
    /// OpenID servers). A refresh whose answer was lost is never retried with the old token.
    Strict,
}

/// Everything about a provider that is data rather than code.
#[derive(Debug, Clone)]
pub struct ProviderDefinition {
    pub name: String,
    pub display_name: String,
    pub kind: ProviderKind,
    pub authorization_url: Url,
    pub token_url: Url,
    pub token_auth_method: ClientAuth,
    pub token_body: BodyFormat,
    /// Extra headers on token and revocation requests (Notion's `Notion-Version`).
    pub token_headers: Vec<(String, String)>,
    pub revocation_url: Option<Url>,
    pub userinfo_url: Option<Url>,
    /// Expected ID-token issuer; may hold Microsoft's `{tenantid}` placeholder.
    pub issuer: Option<String>,
    pub jwks_url: Option<Url>,
    /// YouTube Data API `channels.list`.
    pub channels_url: Option<Url>,
    pub default_scopes: Vec<String>,
    pub scope_separator: String,
    pub pkce: bool,
    pub refresh_rotation: RefreshRotation,
    /// Static extra authorization parameters (`access_type=offline`, `owner=user`, ...).
    pub authorization_params: BTreeMap<String, String>,
    /// RFC 9207: the provider returns `iss` in the authorization response, so it is required.
    pub iss_parameter_supported: bool,
    /// Scopes this provider knows, with descriptions and the features they serve.
    pub catalog: Vec<CatalogEntry>,
    /// Environment prefixes whose `_CLIENT_ID` / `_CLIENT_SECRET` configure this provider,
    /// first match wins (YouTube falls back to Google's). Empty for declared providers.
    pub credential_env_prefixes: Vec<&'static str>,
}

impl ProviderDefinition {
    pub fn protocol(&self) -> Protocol {
        if self.issuer.is_some() && self.jwks_url.is_some() {
            Protocol::Oidc
        } else {
            Protocol::Oauth2
        }
    }

    pub fn issuer_rule(&self) -> Option<IssuerRule> {
        let issuer = self.issuer.clone()?;
        Some(if issuer.contains("{tenantid}") {
            IssuerRule::TenantTemplate(issuer)
        } else {
            IssuerRule::Exact(issuer)
        })
    }

    pub fn token_endpoint(&self) -> TokenEndpoint {
        TokenEndpoint {
            url: self.token_url.clone(),
            auth: self.token_auth_method,
            body: self.token_body,
            headers: self.token_headers.clone(),
        }
    }

    pub fn revocation_endpoint(&self) -> Option<RevocationEndpoint> {
        Some(RevocationEndpoint {
            url: self.revocation_url.clone()?,
            auth: self.token_auth_method,
            body: self.token_body,
            headers: self.token_headers.clone(),
        })
    }
}

/// A provider with its credentials and, for OpenID providers, its key cache.
#[derive(Debug, Clone)]
pub struct Provider {
    pub definition: ProviderDefinition,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub jwks: Option<Arc<JwksCache>>,
    /// Why the provider cannot be used although configured (failed discovery).
    pub unavailable: Option<String>,
}

impl Provider {
    pub fn is_configured(&self) -> bool {
        self.client_id.is_some() && self.client_secret.is_some() && self.unavailable.is_none()
    }

    /// The variables an operator must set to configure this provider.
    pub fn missing_variables(&self) -> Vec<String> {
        let Some(prefix) = self.definition.credential_env_prefixes.first() else {
            let mut missing = Vec::new();
            if self.client_id.is_none() {
                missing.push(format!(
                    "{}: client_id or client_id_env",
                    self.definition.name
                ));
            }
            if self.client_secret.is_none() {
                missing.push(format!(
                    "{}: client_secret or client_secret_env",
                    self.definition.name
                ));
            }
            return missing;
        };
        let mut missing = Vec::new();
        if self.client_id.is_none() {
            missing.push(format!("{prefix}_CLIENT_ID"));
        }
        if self.client_secret.is_none() {
            missing.push(format!("{prefix}_CLIENT_SECRET"));
        }
        missing
    }

    /// Credentials for token requests, when configured.
    pub fn credentials(&self) -> Option<crate::oauth::ClientCredentials> {
        Some(crate::oauth::ClientCredentials {
            client_id: self.client_id.clone()?,
            client_secret: self.client_secret.clone()?,
        })
    }
}

/// Built-in and operator-declared providers, by name.
#[derive(Debug, Clone)]
pub struct ProviderRegistry {
    providers: BTreeMap<String, Provider>,
}

impl ProviderRegistry {
    /// The built-ins, then the declarations of `OAUTH_PROVIDERS_FILE` applied on top.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let setting = |name: &str| config.provider_settings.get(name).map(String::as_str);
        let definitions = [
            google::definition()?,
            microsoft::definition(
                setting("MICROSOFT_TENANT").unwrap_or(microsoft::DEFAULT_TENANT),
            )?,
            notion::definition(setting("NOTION_VERSION").unwrap_or(notion::DEFAULT_VERSION))?,
            youtube::definition()?,
        ];
        let mut providers: BTreeMap<String, Provider> = definitions
            .into_iter()
            .map(|definition| {
                let credentials = credentials_for(&definition, &config.client_credentials);
                let provider = Provider {
                    definition,
                    client_id: credentials.client_id,
                    client_secret: credentials.client_secret,
                    jwks: None,
                    unavailable: None,
                };
                (provider.definition.name.clone(), provider)
            })
            .collect();
        for declaration in &config.declared_providers {
            declaration.apply(&mut providers)?;
        }
        for provider in providers.values_mut() {
            provider.jwks = jwks_cache(&provider.definition)?;
        }
        Ok(Self { providers })
    }

    pub fn get(&self, name: &str) -> Option<&Provider> {
        self.providers.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Provider> {
        self.providers.values()
    }
}

fn jwks_cache(definition: &ProviderDefinition) -> Result<Option<Arc<JwksCache>>, ConfigError> {
    let Some(url) = definition.jwks_url.clone() else {
        return Ok(None);
    };
    let cache = JwksCache::new(url)
        .map_err(|err| ConfigError::invalid(&definition.name, err.to_string()))?;
    Ok(Some(Arc::new(cache)))
}

/// The first prefix with a client id supplies both id and secret, so a half-configured
/// YouTube never mixes its id with Google's secret.
fn credentials_for(
    definition: &ProviderDefinition,
    all: &HashMap<String, ClientCredentials>,
) -> ClientCredentials {
    definition
        .credential_env_prefixes
        .iter()
        .filter_map(|prefix| all.get(*prefix))
        .find(|credentials| credentials.client_id.is_some())
        .cloned()
        .unwrap_or_default()
}

/// Parses an endpoint of a built-in provider; `var` names the setting that shaped it.
pub(crate) fn builtin_url(var: &str, url: &str) -> Result<Url, ConfigError> {
    Url::parse(url)
        .map_err(|err| ConfigError::invalid(var, format!("gives the invalid URL {url:?}: {err}")))
}

pub(crate) fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

pub(crate) fn params(items: &[(&str, &str)]) -> BTreeMap<String, String> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    fn registry(vars: &[(&str, &str)]) -> ProviderRegistry {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| vars.get(name).cloned();
        ProviderRegistry::from_config(&Config::from_lookup(&Env::new(&lookup)).expect("config"))
            .expect("registry")
    }

    #[test]
    fn the_four_built_ins_are_always_listed() {
        let names: Vec<_> = registry(&[])
            .iter()
            .map(|p| p.definition.name.clone())
            .collect();
        assert_eq!(names, ["google", "microsoft", "notion", "youtube"]);
        assert!(registry(&[]).iter().all(|p| !p.is_configured()));
    }

    #[test]
    fn configured_needs_both_id_and_secret_and_names_what_is_missing() {
        let reg = registry(&[("NOTION_CLIENT_ID", "id")]);
        let notion = reg.get("notion").expect("notion");
        assert!(!notion.is_configured());
        assert_eq!(notion.missing_variables(), ["NOTION_CLIENT_SECRET"]);
        let reg = registry(&[("NOTION_CLIENT_ID", "id"), ("NOTION_CLIENT_SECRET", "s")]);
        assert!(reg.get("notion").expect("notion").is_configured());
    }

    #[test]
    fn youtube_falls_back_to_google_credentials() {
        let reg = registry(&[("GOOGLE_CLIENT_ID", "g"), ("GOOGLE_CLIENT_SECRET", "gs")]);
        let youtube = reg.get("youtube").expect("youtube");
        assert!(youtube.is_configured());
        assert_eq!(youtube.client_id.as_deref(), Some("g"));
        let reg = registry(&[
            ("GOOGLE_CLIENT_ID", "g"),
            ("GOOGLE_CLIENT_SECRET", "gs"),
            ("YOUTUBE_CLIENT_ID", "y"),
        ]);
        let youtube = reg.get("youtube").expect("youtube");
        assert_eq!(youtube.client_id.as_deref(), Some("y"));
        assert!(
            !youtube.is_configured(),
            "YouTube's own id must not borrow Google's secret"
        );
    }

    #[test]
    fn microsoft_tenant_shapes_its_endpoints() {
        let reg = registry(&[("MICROSOFT_TENANT", "contoso.onmicrosoft.com")]);
        let ms = &reg.get("microsoft").expect("microsoft").definition;
        assert_eq!(
            ms.token_url.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(
            ms.revocation_url.is_none(),
            "Microsoft has no revocation endpoint"
        );
        assert!(matches!(
            ms.issuer_rule(),
            Some(IssuerRule::TenantTemplate(_))
        ));
    }

    #[test]
    fn a_malformed_tenant_is_a_config_error_naming_the_variable() {
        let vars: HashMap<String, String> =
            [("MICROSOFT_TENANT".to_owned(), "a/../b?x".to_owned())].into();
        let lookup = move |name: &str| vars.get(name).cloned();
        let config = Config::from_lookup(&Env::new(&lookup)).expect("config");
        let err = ProviderRegistry::from_config(&config).expect_err("rejected");
        assert!(matches!(err, ConfigError::Invalid { var, .. } if var == "MICROSOFT_TENANT"));
    }

    #[test]
    fn built_in_quirks_are_declared() {
        let reg = registry(&[]);
        let notion = &reg.get("notion").expect("notion").definition;
        assert_eq!(
            (notion.token_auth_method, notion.token_body),
            (ClientAuth::ClientSecretBasic, BodyFormat::Json)
        );
        assert!(notion
            .token_headers
            .iter()
            .any(|(name, _)| name == "Notion-Version"));
        assert_eq!(
            notion.authorization_params.get("owner").map(String::as_str),
            Some("user")
        );
        assert!(!notion.pkce);
        let google = &reg.get("google").expect("google").definition;
        assert_eq!(
            google
                .authorization_params
                .get("access_type")
                .map(String::as_str),
            Some("offline")
        );
        assert_eq!(google.protocol(), Protocol::Oidc);
        let youtube = &reg.get("youtube").expect("youtube").definition;
        assert!(youtube.channels_url.is_some());
        let ms = &reg.get("microsoft").expect("microsoft").definition;
        assert!(ms.default_scopes.contains(&"offline_access".to_owned()));
    }
}
