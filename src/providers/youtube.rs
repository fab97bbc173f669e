//! YouTube: Google's OAuth with YouTube Data API scopes. The account is a channel (brand
//! accounts have their own), picked by the user on Google's consent screen.

use super::google::google_endpoints;
use super::ProviderDefinition;
use crate::config::ConfigError;

pub const READONLY_SCOPE: &str = "https://www.googleapis.com/auth/youtube.readonly";

pub fn definition() -> Result<ProviderDefinition, ConfigError> {
    google_endpoints(
        "youtube",
        "YouTube",
        &["openid", "email", "profile", READONLY_SCOPE],
        vec!["YOUTUBE", "GOOGLE"],
    )
}
