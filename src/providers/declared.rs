//! `OAUTH_PROVIDERS_FILE`: providers the operator declares, and overrides of built-ins'
//! endpoints (tests, sovereign clouds, proxies).
//!
//! ```toml
//! [providers.acme]
//! display_name = "Acme"
//! authorization_url = "https://id.acme.test/auth"
//! token_url = "https://id.acme.test/token"
//! issuer = "https://id.acme.test"          # OIDC discovery fills what is not given
//! client_id_env = "ACME_CLIENT_ID"
//! client_secret_env = "ACME_CLIENT_SECRET"
//! scopes = ["openid", "email", "offline_access"]
//! ```
//!
//! A bad file stops start-up naming the line and the field. Endpoints must be `https://`,
//! except on loopback addresses for local testing.

use std::collections::BTreeMap;
use std::path::Path;

use secrecy::SecretString;
use serde::Deserialize;
use toml::Spanned;
use url::Url;

use super::catalog::{CatalogEntry, Sensitivity};
use super::{Provider, ProviderDefinition, ProviderKind, RefreshRotation};
use crate::config::{is_loopback, ConfigError, Env};
use crate::oauth::{BodyFormat, ClientAuth};

const VAR: &str = "OAUTH_PROVIDERS_FILE";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvidersFile {
    #[serde(default)]
    providers: BTreeMap<String, RawDeclaration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeclaration {
    display_name: Option<String>,
    authorization_url: Option<Spanned<String>>,
    token_url: Option<Spanned<String>>,
    revocation_url: Option<Spanned<String>>,
    userinfo_url: Option<Spanned<String>>,
    jwks_url: Option<Spanned<String>>,
    channels_url: Option<Spanned<String>>,
    issuer: Option<Spanned<String>>,
    client_id: Option<String>,
    client_id_env: Option<String>,
    client_secret: Option<String>,
    client_secret_env: Option<String>,
    token_auth_method: Option<ClientAuth>,
    token_request_format: Option<BodyFormat>,
    scopes: Option<Vec<String>>,
    scope_separator: Option<String>,
    pkce: Option<bool>,
    authorization_params: Option<BTreeMap<String, String>>,
    authorization_response_iss_parameter_supported: Option<bool>,
    refresh_token_rotation: Option<RefreshRotation>,
    #[serde(default)]
    catalog: Vec<CatalogEntry>,
}

/// A validated declaration; `None` fields keep the built-in's value (or discovery's).
#[derive(Debug, Clone, Default)]
pub struct DeclaredProvider {
    pub name: String,
    pub display_name: Option<String>,
    pub authorization_url: Option<Url>,
    pub token_url: Option<Url>,
    pub revocation_url: Option<Url>,
    pub userinfo_url: Option<Url>,
    pub jwks_url: Option<Url>,
    pub channels_url: Option<Url>,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub token_auth_method: Option<ClientAuth>,
    pub token_request_format: Option<BodyFormat>,
    pub scopes: Option<Vec<String>>,
    pub scope_separator: Option<String>,
    pub pkce: Option<bool>,
    pub authorization_params: Option<BTreeMap<String, String>>,
    pub iss_parameter_supported: Option<bool>,
    pub refresh_rotation: Option<RefreshRotation>,
    pub catalog: Vec<CatalogEntry>,
    /// Set when OIDC discovery failed or disagreed: the provider is listed but unusable.
    pub unavailable: Option<String>,
}

/// Reads and validates the file; `env` resolves `client_id_env` / `client_secret_env`.
pub fn load(path: &Path, env: &Env<'_>) -> Result<Vec<DeclaredProvider>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError::invalid(VAR, format!("cannot read {}: {err}", path.display()))
    })?;
    parse(&text, env)
}

pub fn parse(text: &str, env: &Env<'_>) -> Result<Vec<DeclaredProvider>, ConfigError> {
    let file: ProvidersFile = toml::from_str(text).map_err(|err| toml_error(text, &err))?;
    file.providers
        .into_iter()
        .map(|(name, raw)| validate(text, name, raw, env))
        .collect()
}

/// The parser's error as "line L, column C: message", without the excerpt of the file its
/// `Display` quotes: that line may hold a client secret (a repeated key, a typo next to it). On
/// a line naming `client_secret`, the message itself is replaced too, since messages such as
/// "invalid type: integer `…`" quote the value.
fn toml_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let Some(span) = err.span() else {
        return ConfigError::invalid(VAR, "not a valid TOML document");
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(1, |start| start.chars().count() + 1);
    let line_text = text.lines().nth(line - 1).unwrap_or_default();
    let names_secret = line_text
        .match_indices("client_secret")
        .any(|(at, _)| !line_text[at..].starts_with("client_secret_env"));
    let message = if names_secret {
        "this line, which sets a client_secret, is not valid (its text is not shown: it may hold \
         the secret); client_secret must be a string, given once"
            .to_owned()
    } else {
        err.message().trim().to_owned()
    };
    ConfigError::invalid(VAR, format!("line {line}, column {column}: {message}"))
}

fn validate(
    text: &str,
    name: String,
    raw: RawDeclaration,
    env: &Env<'_>,
) -> Result<DeclaredProvider, ConfigError> {
    let valid_name = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid_name {
        return Err(ConfigError::invalid(
            VAR,
            format!("providers.{name}: a provider name is 1-32 characters of a-z, 0-9, - and _"),
        ));
    }
    let url = |field: &str, value: Option<Spanned<String>>| -> Result<Option<Url>, ConfigError> {
        value
            .map(|spanned| endpoint(text, &name, field, &spanned))
            .transpose()
    };
    let issuer = raw.issuer.map(|spanned| {
        let issuer = spanned.get_ref().clone();
        // A template issuer (Microsoft's {tenantid}) is not a URL until filled in.
        let check = issuer.replace("{tenantid}", "tenant");
        endpoint(text, &name, "issuer", &Spanned::new(spanned.span(), check)).map(|_| issuer)
    });
    Ok(DeclaredProvider {
        authorization_url: url("authorization_url", raw.authorization_url)?,
        token_url: url("token_url", raw.token_url)?,
        revocation_url: url("revocation_url", raw.revocation_url)?,
        userinfo_url: url("userinfo_url", raw.userinfo_url)?,
        jwks_url: url("jwks_url", raw.jwks_url)?,
        channels_url: url("channels_url", raw.channels_url)?,
        issuer: issuer.transpose()?,
        client_id: credential(&name, "client_id", raw.client_id, raw.client_id_env, env)?,
        client_secret: credential(
            &name,
            "client_secret",
            raw.client_secret,
            raw.client_secret_env,
            env,
        )?
        .map(SecretString::from),
        display_name: raw.display_name,
        token_auth_method: raw.token_auth_method,
        token_request_format: raw.token_request_format,
        scopes: raw.scopes,
        scope_separator: raw.scope_separator,
        pkce: raw.pkce,
        authorization_params: raw.authorization_params,
        iss_parameter_supported: raw.authorization_response_iss_parameter_supported,
        refresh_rotation: raw.refresh_token_rotation,
        catalog: raw.catalog,
        unavailable: None,
        name,
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |before| before.matches('\n').count())
        + 1
}

fn endpoint(
    text: &str,
    provider: &str,
    field: &str,
    value: &Spanned<String>,
) -> Result<Url, ConfigError> {
    let at = |reason: String| {
        ConfigError::invalid(
            VAR,
            format!(
                "line {}: providers.{provider}.{field}: {reason}",
                line_of(text, value.span().start)
            ),
        )
    };
    let url = Url::parse(value.get_ref())
        .map_err(|err| at(format!("{:?} is not a URL ({err})", value.get_ref())))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        _ => Err(at(
            "must be https:// (http:// only on 127.0.0.1, [::1] or localhost)".to_owned(),
        )),
    }
}

fn credential(
    provider: &str,
    field: &str,
    literal: Option<String>,
    from_env: Option<String>,
    env: &Env<'_>,
) -> Result<Option<String>, ConfigError> {
    match (literal, from_env) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            VAR,
            format!("providers.{provider}: set {field} or {field}_env, not both"),
        )),
        (Some(value), None) => Ok(Some(value)),
        (None, Some(variable)) => Ok(env.var(&variable)),
        (None, None) => Ok(None),
    }
}

impl DeclaredProvider {
    /// Needs OIDC discovery: an issuer, and endpoints left for the metadata to fill.
    pub fn needs_discovery(&self) -> bool {
        self.issuer
            .as_deref()
            .is_some_and(|issuer| !issuer.contains("{tenantid}"))
            && (self.authorization_url.is_none()
                || self.token_url.is_none()
                || self.jwks_url.is_none())
    }

    /// Adds this provider to `providers`, or overrides the built-in of the same name.
    pub fn apply(&self, providers: &mut BTreeMap<String, Provider>) -> Result<(), ConfigError> {
        match providers.get_mut(&self.name) {
            Some(existing) => {
                self.override_definition(&mut existing.definition);
                if self.client_id.is_some() {
                    existing.client_id = self.client_id.clone();
                    existing.client_secret = self.client_secret.clone();
                }
                existing.unavailable = self.unavailable.clone();
            }
            None => {
                let provider = Provider {
                    definition: self.new_definition()?,
                    client_id: self.client_id.clone(),
                    client_secret: self.client_secret.clone(),
                    jwks: None,
                    unavailable: self.unavailable.clone(),
                };
                providers.insert(self.name.clone(), provider);
            }
        }
        Ok(())
    }

    fn override_definition(&self, definition: &mut ProviderDefinition) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(value) = value {
                *target = value.clone();
            }
        }
        fn set_some<T: Clone>(target: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                target.clone_from(value);
            }
        }
        set(&mut definition.display_name, &self.display_name);
        set(&mut definition.authorization_url, &self.authorization_url);
        set(&mut definition.token_url, &self.token_url);
        set_some(&mut definition.revocation_url, &self.revocation_url);
        set_some(&mut definition.userinfo_url, &self.userinfo_url);
        set_some(&mut definition.jwks_url, &self.jwks_url);
        set_some(&mut definition.channels_url, &self.channels_url);
        set_some(&mut definition.issuer, &self.issuer);
        set(&mut definition.token_auth_method, &self.token_auth_method);
        set(&mut definition.token_body, &self.token_request_format);
        set(&mut definition.default_scopes, &self.scopes);
        set(&mut definition.scope_separator, &self.scope_separator);
        set(&mut definition.pkce, &self.pkce);
        set(
            &mut definition.iss_parameter_supported,
            &self.iss_parameter_supported,
        );
        if let Some(extra) = &self.authorization_params {
            definition.authorization_params.extend(extra.clone());
        }
        merge_catalog(&mut definition.catalog, &self.catalog);
    }

    fn new_definition(&self) -> Result<ProviderDefinition, ConfigError> {
        let required = |field: &str, value: &Option<Url>| {
            value.clone().ok_or_else(|| {
                ConfigError::invalid(
                    VAR,
                    format!(
                        "providers.{}: {field} is required (or an issuer for OIDC discovery)",
                        self.name
                    ),
                )
            })
        };
        let default_scopes = self.scopes.clone().unwrap_or_default();
        let mut catalog: Vec<CatalogEntry> = default_scopes
            .iter()
            .map(|scope| CatalogEntry::new(scope, scope, Sensitivity::Basic, &[]))
            .collect();
        merge_catalog(&mut catalog, &self.catalog);
        Ok(ProviderDefinition {
            name: self.name.clone(),
            display_name: self
                .display_name
                .clone()
                .unwrap_or_else(|| self.name.clone()),
            kind: ProviderKind::Generic,
            authorization_url: required("authorization_url", &self.authorization_url)?,
            token_url: required("token_url", &self.token_url)?,
            token_auth_method: self
                .token_auth_method
                .unwrap_or(ClientAuth::ClientSecretBasic),
            token_body: self.token_request_format.unwrap_or(BodyFormat::Form),
            token_headers: Vec::new(),
            revocation_url: self.revocation_url.clone(),
            userinfo_url: self.userinfo_url.clone(),
            issuer: self.issuer.clone(),
            jwks_url: self.jwks_url.clone(),
            channels_url: None,
            default_scopes,
            scope_separator: self
                .scope_separator
                .clone()
                .unwrap_or_else(|| " ".to_owned()),
            pkce: self.pkce.unwrap_or(true),
            // Unknown servers are assumed strict: the safe assumption for retries.
            refresh_rotation: self.refresh_rotation.unwrap_or(RefreshRotation::Strict),
            authorization_params: self.authorization_params.clone().unwrap_or_default(),
            iss_parameter_supported: self.iss_parameter_supported.unwrap_or(false),
            catalog,
            credential_env_prefixes: Vec::new(),
        })
    }
}

/// Declared catalog entries replace same-named ones and add the rest.
fn merge_catalog(catalog: &mut Vec<CatalogEntry>, declared: &[CatalogEntry]) {
    for entry in declared {
        match catalog
            .iter_mut()
            .find(|existing| existing.scope == entry.scope)
        {
            Some(existing) => *existing = entry.clone(),
            None => catalog.push(entry.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_with(text: &str, vars: &[(&str, &str)]) -> Result<Vec<DeclaredProvider>, ConfigError> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| vars.get(name).cloned();
        parse(text, &Env::new(&lookup))
    }

    fn reason(result: Result<Vec<DeclaredProvider>, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { var, reason }) => {
                assert_eq!(var, VAR);
                reason
            }
            other => panic!("expected an invalid-file error, got {other:?}"),
        }
    }

    const ACME: &str = r#"
[providers.acme]
display_name = "Acme"
authorization_url = "https://id.acme.test/auth"
token_url = "https://id.acme.test/token"
client_id_env = "ACME_CLIENT_ID"
client_secret = "s3cret"
token_auth_method = "client_secret_post"
scopes = ["openid", "email"]
authorization_params = { prompt = "consent" }

[[providers.acme.catalog]]
scope = "calendar"
description = "Read your calendar"
sensitivity = "sensitive"
features = ["calendar.read"]
"#;

    #[test]
    fn a_declared_provider_is_parsed_with_env_credentials_and_catalog() {
        let declared = parse_with(ACME, &[("ACME_CLIENT_ID", "acme-id")]).expect("valid");
        let acme = &declared[0];
        assert_eq!(acme.client_id.as_deref(), Some("acme-id"));
        assert_eq!(acme.token_auth_method, Some(ClientAuth::ClientSecretPost));
        let definition = acme.new_definition().expect("definition");
        assert_eq!(definition.kind, ProviderKind::Generic);
        assert!(definition.pkce, "PKCE on by default");
        assert_eq!(definition.catalog.len(), 3);
        assert_eq!(definition.authorization_params["prompt"], "consent");
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let plain_http = "[providers.acme]\n\ntoken_url = \"http://id.acme.test/token\"\n";
        let message = reason(parse_with(plain_http, &[]));
        assert!(
            message.contains("line 3") && message.contains("providers.acme.token_url"),
            "{message}"
        );
        let typo = "[providers.acme]\ntokn_url = \"https://x.test\"\n";
        let message = reason(parse_with(typo, &[]));
        assert!(
            message.contains("line 2") && message.contains("tokn_url"),
            "{message}"
        );
        let both = "[providers.acme]\nclient_id = \"a\"\nclient_id_env = \"B\"\n";
        assert!(reason(parse_with(both, &[])).contains("client_id or client_id_env"));
        assert!(reason(parse_with("[providers.\"Bad Name\"]\n", &[])).contains("provider name"));
    }

    #[test]
    fn loopback_http_is_allowed_for_testing() {
        let text = "[providers.acme]\nauthorization_url = \"http://127.0.0.1:9/a\"\ntoken_url = \"http://localhost:9/t\"\n";
        assert!(parse_with(text, &[]).is_ok());
    }

    #[test]
    fn a_new_provider_needs_endpoints_or_an_issuer() {
        let declared = parse_with("[providers.acme]\nclient_id = \"x\"\n", &[]).expect("parses");
        assert!(declared[0].new_definition().is_err());
        let oidc = parse_with("[providers.acme]\nissuer = \"https://id.acme.test\"\n", &[])
            .expect("parses");
        assert!(oidc[0].needs_discovery());
    }

    #[test]
    fn errors_never_quote_a_client_secret() {
        let secret = "sup3r-s3cret-value-0123456789";
        for text in [
            // A repeated key: the parser's message would quote the line.
            format!(
                "[providers.acme]\nclient_secret = \"{secret}\"\nclient_secret = \"{secret}\"\n"
            ),
            // A syntax error on the secret's line.
            format!("[providers.acme]\nclient_secret = \"{secret}\" x\n"),
            // A secret that is not a string.
            "[providers.acme]\nclient_secret = 123456789012345\n".to_owned(),
            // A bad value elsewhere, next to the secret.
            format!("[providers.acme]\nclient_secret = \"{secret}\"\npkce = \"maybe\"\n"),
            // A secret in an inline table.
            format!("providers = {{ acme = {{ client_secret = \"{secret}\", pkce = 3 }} }}\n"),
        ] {
            let message = reason(parse_with(&text, &[]));
            assert!(
                !message.contains(secret) && !message.contains("123456789012345"),
                "{message}"
            );
            assert!(message.contains("line "), "names the line: {message}");
        }
    }

    /// A TOML document of the file's shape with arbitrary members and values.
    fn declaration() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("display_name"),
            Just("authorization_url"),
            Just("token_url"),
            Just("revocation_url"),
            Just("userinfo_url"),
            Just("jwks_url"),
            Just("issuer"),
            Just("client_id"),
            Just("client_id_env"),
            Just("client_secret"),
            Just("token_auth_method"),
            Just("token_request_format"),
            Just("scopes"),
            Just("scope_separator"),
            Just("pkce"),
            Just("authorization_params"),
            Just("refresh_token_rotation"),
            Just("unknown_field"),
        ];
        let value = prop_oneof![
            "[ -~]{0,40}".prop_map(|text| format!("{text:?}")),
            Just("\"https://id.acme.test/x\"".to_owned()),
            Just("\"http://127.0.0.1:9/x\"".to_owned()),
            Just("\"client_secret_post\"".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            proptest::collection::vec("[a-z.]{0,10}", 0..3).prop_map(|items| format!("{items:?}")),
            "[a-z]{1,8}".prop_map(|key| format!("{{ {key} = \"v\" }}")),
        ];
        let name = prop_oneof![
            Just("acme".to_owned()),
            Just("google".to_owned()),
            "[a-zA-Z0-9 _-]{0,40}"
        ];
        (name, proptest::collection::vec((key, value), 0..8)).prop_map(|(name, members)| {
            let mut text = format!("[providers.{name:?}]\n");
            for (key, value) in members {
                text.push_str(&format!("{key} = {value}\n"));
            }
            text
        })
    }

    proptest! {
        /// Documents of the right shape with arbitrary values: parsed or refused naming the
        /// variable, never a panic, and a refusal never quotes the client secret.
        #[test]
        fn arbitrary_declarations_never_panic(text in declaration()) {
            match parse_with(&text, &[]) {
                Ok(declared) => {
                    for provider in &declared {
                        let _ = provider.new_definition();
                        let _ = provider.needs_discovery();
                    }
                }
                Err(ConfigError::Invalid { var, reason }) => {
                    prop_assert_eq!(var, VAR);
                    for line in text.lines().filter(|line| line.starts_with("client_secret = ")) {
                        let value = line.trim_start_matches("client_secret = ").trim_matches('"');
                        // (A value also given to another field may be quoted for that one.)
                        let elsewhere = text
                            .lines()
                            .any(|other| !other.starts_with("client_secret") && other.contains(value));
                        // (Nor is a value that the message names anyway: an enum variant.)
                        let variant = ["client_secret_post", "client_secret_basic"].contains(&value);
                        if value.len() >= 8 && !elsewhere && !variant {
                            prop_assert!(!reason.contains(value), "{}", reason);
                        }
                    }
                }
                Err(other) => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = parse_with(&text, &[]);
        }

        #[test]
        fn arbitrary_field_values_never_panic(value in "[ -~]{0,60}") {
            let text = format!("[providers.acme]\ntoken_url = {value:?}\nauthorization_url = {value:?}\n");
            let _ = parse_with(&text, &[]);
        }
    }
}
