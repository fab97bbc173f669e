//! YouTube: Google's OAuth with YouTube Data API scopes. The connected account is a *channel*
//! (brand accounts have their own `sub`), picked by the user on Google's consent screen
//! (`prompt=select_account consent`), and read back with `channels.list?mine=true`: it
//! returns only the chosen channel, and an account without a channel returns no items.

use serde_json::{json, Value};

use super::catalog::{CatalogEntry, Sensitivity};
use super::google::{google_endpoints, identity_catalog};
use super::{builtin_url, ProviderDefinition, ProviderKind};
use crate::config::ConfigError;

pub const READONLY_SCOPE: &str = "https://www.googleapis.com/auth/youtube.readonly";
pub const CHANNELS_URL: &str = "https://www.googleapis.com/youtube/v3/channels";
pub const PROMPT: &str = "select_account consent";

pub fn catalog() -> Vec<CatalogEntry> {
    let mut entries = identity_catalog();
    entries.extend([
        CatalogEntry::new(
            READONLY_SCOPE,
            "View your YouTube account",
            Sensitivity::Sensitive,
            &["youtube.read"],
        ),
        CatalogEntry::new(
            "https://www.googleapis.com/auth/youtube",
            "Manage your YouTube account",
            Sensitivity::Sensitive,
            &["youtube.read", "youtube.manage"],
        ),
        CatalogEntry::new(
            "https://www.googleapis.com/auth/youtube.force-ssl",
            "See, edit and permanently delete your YouTube videos, ratings, comments and captions",
            Sensitivity::Sensitive,
            &["youtube.read", "youtube.manage"],
        ),
        CatalogEntry::new(
            "https://www.googleapis.com/auth/youtube.upload",
            "Manage your YouTube videos",
            Sensitivity::Sensitive,
            &["youtube.upload"],
        ),
    ]);
    entries
}

pub fn definition() -> Result<ProviderDefinition, ConfigError> {
    let mut definition = google_endpoints(
        "youtube",
        "YouTube",
        ProviderKind::YouTube,
        &["openid", "email", "profile", READONLY_SCOPE],
        catalog(),
        vec!["YOUTUBE", "GOOGLE"],
    )?;
    definition.channels_url = Some(builtin_url("youtube", CHANNELS_URL)?);
    Ok(definition)
}

/// The channel `channels.list?part=id,snippet&mine=true` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub id: String,
    pub title: Option<String>,
}

/// Reads the single channel of a `channels.list` response; none is an error the user must
/// fix at YouTube (create a channel, or pick another account).
pub fn channel(response: &Value) -> Option<Channel> {
    let item = response.get("items")?.as_array()?.first()?;
    let id = item.get("id")?.as_str().filter(|id| !id.is_empty())?;
    Some(Channel {
        id: id.to_owned(),
        title: item
            .pointer("/snippet/title")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

pub fn channel_metadata(channel: &Channel) -> Value {
    json!({"channel_id": channel.id, "channel_title": channel.title})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_list_shapes() {
        let one = json!({"kind": "youtube#channelListResponse", "items": [{"id": "UC123", "snippet": {"title": "Cats"}}]});
        assert_eq!(
            channel(&one),
            Some(Channel {
                id: "UC123".into(),
                title: Some("Cats".into())
            })
        );
        assert_eq!(channel(&json!({"items": []})), None);
        assert_eq!(channel(&json!({"pageInfo": {}})), None);
        assert_eq!(channel(&json!({"items": [{"id": ""}]})), None);
    }
}
