//! Notion public connections. Quirks: no OAuth scopes (capabilities are chosen on the
//! integration and the user picks pages), so the catalog holds one pseudo-scope, `workspace`,
//! that is never sent; `owner=user` on the authorization URL; HTTP Basic client authentication
//! with a JSON body and a `Notion-Version` header; no PKCE (reportedly unsupported: `state`
//! protects the flow); the token response names the bot (`bot_id`, the stable account key —
//! `workspace_id` is not unique per token), the workspace and the owner, carries no
//! `expires_in`, and a rotating `refresh_token` that may be null.

use serde_json::{json, Value};

use super::catalog::{CatalogEntry, Sensitivity};
use super::{builtin_url, params, ProviderDefinition, ProviderKind, RefreshRotation};
use crate::config::ConfigError;
use crate::oauth::{BodyFormat, ClientAuth};

pub const DEFAULT_VERSION: &str = "2022-06-28";
pub const WORKSPACE_SCOPE: &str = "workspace";

pub fn catalog() -> Vec<CatalogEntry> {
    vec![CatalogEntry::new(
        WORKSPACE_SCOPE,
        "Access the pages and databases you choose to share; what the app may do with them \
         (read, update, insert, comments) is set on the Notion integration, not per request",
        Sensitivity::Sensitive,
        &["workspace"],
    )]
}

pub fn definition(version: &str) -> Result<ProviderDefinition, ConfigError> {
    let url = |value| builtin_url("notion", value);
    Ok(ProviderDefinition {
        name: "notion".to_owned(),
        display_name: "Notion".to_owned(),
        kind: ProviderKind::Notion,
        authorization_url: url("https://api.notion.com/v1/oauth/authorize")?,
        token_url: url("https://api.notion.com/v1/oauth/token")?,
        token_auth_method: ClientAuth::ClientSecretBasic,
        token_body: BodyFormat::Json,
        token_headers: vec![("Notion-Version".to_owned(), version.to_owned())],
        revocation_url: Some(url("https://api.notion.com/v1/oauth/revoke")?),
        userinfo_url: None,
        issuer: None,
        jwks_url: None,
        channels_url: None,
        default_scopes: vec![WORKSPACE_SCOPE.to_owned()],
        scope_separator: " ".to_owned(),
        pkce: false,
        refresh_rotation: RefreshRotation::Strict,
        authorization_params: params(&[("owner", "user")]),
        iss_parameter_supported: false,
        catalog: catalog(),
        credential_env_prefixes: vec!["NOTION"],
    })
}

/// The account a Notion token response describes: `bot_id` as the key; workspace and owner
/// for display.
#[derive(Debug, Clone, PartialEq)]
pub struct NotionAccount {
    pub bot_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub metadata: Value,
}

pub fn account(extra: &serde_json::Map<String, Value>) -> Option<NotionAccount> {
    let text = |pointer: &str| {
        Value::Object(extra.clone())
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let bot_id = text("/bot_id").filter(|id| !id.is_empty())?;
    Some(NotionAccount {
        bot_id,
        email: text("/owner/user/person/email"),
        name: text("/workspace_name"),
        metadata: json!({
            "workspace_id": text("/workspace_id"),
            "workspace_name": text("/workspace_name"),
            "workspace_icon": text("/workspace_icon"),
            "owner_user_id": text("/owner/user/id"),
            "owner_name": text("/owner/user/name"),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bot_is_the_account_and_the_owner_is_for_display() {
        let response = json!({
            "bot_id": "b-1", "workspace_id": "w-1", "workspace_name": "Acme HQ", "workspace_icon": null,
            "owner": {"type": "user", "user": {"object": "user", "id": "u-1", "name": "Ada",
                      "type": "person", "person": {"email": "ada@example.com"}}},
            "duplicated_template_id": null, "request_id": "r"
        });
        let account = account(response.as_object().expect("object")).expect("account");
        assert_eq!(account.bot_id, "b-1");
        assert_eq!(account.email.as_deref(), Some("ada@example.com"));
        assert_eq!(account.metadata["workspace_id"], "w-1");
        assert!(
            super::account(json!({"workspace_id": "w"}).as_object().expect("object")).is_none()
        );
    }
}
