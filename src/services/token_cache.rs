//! The hand-out's fast path: recently read tokens, kept in memory for a short while.
//!
//! Backends ask for the same integration's token over and over; reading and decrypting it from
//! the database each time is most of what a hand-out costs. An entry lives
//! `OAUTH_TOKEN_CACHE_SECONDS` (default 2 s; 0 turns the cache off) and is dropped or replaced
//! at once by every change this process makes (refresh, reconnect, disconnect, reauth,
//! erasure). A change made by *another* replica is seen here at the latest when the entry
//! expires: that is the bound on how long a replica may keep handing out a token another one
//! has just disconnected (SECURITY.md). Entries hold the decrypted token set, as every request
//! handling it does; they are zeroized when dropped (`SecretString`).

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::vault::TokenSet;
use crate::storage::integrations::{Integration, IntegrationStatus};

/// Enough for every integration a busy replica serves within a few seconds; bounded so that
/// memory does not grow with the number of stored integrations.
const CAPACITY: u64 = 4096;

/// A token set as read (or just refreshed), with what the refresh decision needs.
#[derive(Debug)]
pub struct CachedTokens {
    pub integration: Integration,
    pub tokens: TokenSet,
    /// When this token set was stored (the start of its lifetime for the refresh margin).
    pub stored_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct TokenCache {
    entries: Option<moka::sync::Cache<Uuid, Arc<CachedTokens>>>,
}

impl std::fmt::Debug for TokenCache {
    // Never the entries: they hold tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("enabled", &self.entries.is_some())
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A cache whose entries live `ttl` (none at all when `ttl` is zero or negative).
    pub fn new(ttl: Duration) -> Self {
        let entries = ttl
            .to_std()
            .ok()
            .filter(|ttl| *ttl > StdDuration::ZERO)
            .map(|ttl| {
                moka::sync::Cache::builder()
                    .max_capacity(CAPACITY)
                    .time_to_live(ttl)
                    .build()
            });
        Self { entries }
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<CachedTokens>> {
        self.entries.as_ref()?.get(&id)
    }

    /// Remembers `tokens` of `integration`, if the integration can hand out tokens at all.
    pub fn put(&self, integration: &Integration, tokens: &TokenSet, stored_at: DateTime<Utc>) {
        let Some(entries) = &self.entries else {
            return;
        };
        match integration.status {
            IntegrationStatus::Active | IntegrationStatus::Error => {
                let entry = CachedTokens {
                    integration: integration.clone(),
                    tokens: tokens.clone(),
                    stored_at,
                };
                entries.insert(integration.id, Arc::new(entry));
            }
            IntegrationStatus::NeedsReauth | IntegrationStatus::Revoked => {
                entries.invalidate(&integration.id);
            }
        }
    }

    pub fn forget(&self, id: Uuid) {
        if let Some(entries) = &self.entries {
            entries.invalidate(&id);
        }
    }

    /// Drops every entry (erasure: rare, and simpler than finding one user's entries).
    pub fn forget_all(&self) {
        if let Some(entries) = &self.entries {
            entries.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn integration(status: IntegrationStatus) -> Integration {
        let now = Utc::now();
        Integration {
            id: Uuid::new_v4(),
            user_id: "alice".to_owned(),
            provider: "google".to_owned(),
            provider_account_id: "sub-1".to_owned(),
            account_email: None,
            account_name: None,
            account_metadata: serde_json::Value::Null,
            status,
            granted_scopes: Vec::new(),
            requested_scopes: Vec::new(),
            created_at: now,
            updated_at: now,
            last_refreshed_at: None,
            last_error: None,
            last_error_at: None,
        }
    }

    fn tokens(access: &str) -> TokenSet {
        TokenSet {
            access_token: SecretString::from(access.to_owned()),
            refresh_token: None,
            id_token: None,
            token_type: "Bearer".to_owned(),
            expires_at: None,
            refresh_token_expires_at: None,
        }
    }

    #[test]
    fn keeps_usable_integrations_and_forgets_on_request() {
        let cache = TokenCache::new(Duration::seconds(5));
        let active = integration(IntegrationStatus::Active);
        cache.put(&active, &tokens("a1"), Utc::now());
        let hit = cache.get(active.id).expect("cached");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&hit.tokens.access_token),
            "a1"
        );
        cache.forget(active.id);
        assert!(cache.get(active.id).is_none());
    }

    #[test]
    fn an_integration_that_cannot_hand_out_tokens_replaces_its_entry_with_nothing() {
        let cache = TokenCache::new(Duration::seconds(5));
        let mut integration = integration(IntegrationStatus::Active);
        cache.put(&integration, &tokens("a1"), Utc::now());
        integration.status = IntegrationStatus::NeedsReauth;
        cache.put(&integration, &tokens("a1"), Utc::now());
        assert!(cache.get(integration.id).is_none());
    }

    #[test]
    fn zero_seconds_turns_the_cache_off_and_debug_never_shows_tokens() {
        let cache = TokenCache::new(Duration::zero());
        let active = integration(IntegrationStatus::Active);
        cache.put(&active, &tokens("secret-access"), Utc::now());
        assert!(cache.get(active.id).is_none());
        let on = TokenCache::new(Duration::seconds(5));
        on.put(&active, &tokens("secret-access"), Utc::now());
        assert!(!format!("{on:?}").contains("secret-access"));
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = TokenCache::new(Duration::milliseconds(20));
        let active = integration(IntegrationStatus::Active);
        cache.put(&active, &tokens("a1"), Utc::now());
        std::thread::sleep(StdDuration::from_millis(60));
        assert!(cache.get(active.id).is_none());
    }
}
