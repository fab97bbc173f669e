//! OAuth providers: one module per built-in provider, each a declarative [`ProviderDefinition`]
//! plus whatever quirks that provider needs.

pub mod google;
pub mod microsoft;
pub mod notion;
pub mod youtube;

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::Serialize;
use url::Url;

use crate::config::{ClientCredentials, Config, ConfigError};

/// Whether the provider speaks OpenID Connect (ID tokens) or plain OAuth 2.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Oidc,
    Oauth2,
}

/// Everything about a provider that is data rather than code.
#[derive(Debug, Clone)]
pub struct ProviderDefinition {
    pub name: String,
    pub display_name: String,
    pub protocol: Protocol,
    pub authorization_url: Url,
    pub token_url: Url,
    pub revocation_url: Option<Url>,
    pub userinfo_url: Option<Url>,
    pub issuer: Option<String>,
    pub jwks_url: Option<Url>,
    pub default_scopes: Vec<String>,
    pub pkce: bool,
    /// Environment prefixes whose `_CLIENT_ID` / `_CLIENT_SECRET` configure this provider,
    /// first match wins (YouTube falls back to Google's).
    pub credential_env_prefixes: Vec<&'static str>,
}

/// A provider with the credentials the environment gave it (if any).
#[derive(Debug, Clone)]
pub struct Provider {
    pub definition: ProviderDefinition,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
}

impl Provider {
    pub fn is_configured(&self) -> bool {
        self.client_id.is_some() && self.client_secret.is_some()
    }

    /// The variables an operator must set to configure this provider.
    pub fn missing_variables(&self) -> Vec<String> {
        let Some(prefix) = self.definition.credential_env_prefixes.first() else {
            return Vec::new();
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
}

/// Built-in and (later) operator-declared providers, by name.
#[derive(Debug, Clone)]
pub struct ProviderRegistry {
    providers: BTreeMap<String, Provider>,
}

impl ProviderRegistry {
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let setting = |name: &str| config.provider_settings.get(name).map(String::as_str);
        let definitions = [
            google::definition()?,
            microsoft::definition(
                setting("MICROSOFT_TENANT").unwrap_or(microsoft::DEFAULT_TENANT),
            )?,
            notion::definition()?,
            youtube::definition()?,
        ];
        let providers = definitions
            .into_iter()
            .map(|definition| {
                let credentials = credentials_for(&definition, &config.client_credentials);
                let provider = Provider {
                    definition,
                    client_id: credentials.client_id,
                    client_secret: credentials.client_secret,
                };
                (provider.definition.name.clone(), provider)
            })
            .collect();
        Ok(Self { providers })
    }

    pub fn get(&self, name: &str) -> Option<&Provider> {
        self.providers.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Provider> {
        self.providers.values()
    }
}

/// The first prefix with a client id supplies both id and secret, so a half-configured
/// YouTube never mixes its id with Google's secret.
fn credentials_for(
    definition: &ProviderDefinition,
    all: &std::collections::HashMap<String, ClientCredentials>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    fn registry(vars: &[(&str, &str)]) -> ProviderRegistry {
        let vars: std::collections::HashMap<String, String> = vars
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
    }

    #[test]
    fn a_malformed_tenant_is_a_config_error_naming_the_variable() {
        let vars: std::collections::HashMap<String, String> =
            [("MICROSOFT_TENANT".to_owned(), "a/../b?x".to_owned())].into();
        let lookup = move |name: &str| vars.get(name).cloned();
        let config = Config::from_lookup(&Env::new(&lookup)).expect("config");
        let err = ProviderRegistry::from_config(&config).expect_err("rejected");
        assert!(matches!(err, ConfigError::Invalid { var, .. } if var == "MICROSOFT_TENANT"));
    }
}
