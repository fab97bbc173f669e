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
//!
//! **Refresh ahead.** An entry past half its lifetime is re-read in the background after the
//! first hand-out that sees it (once per entry; entries due together are re-read together, one
//! query per table), while hand-outs go on taking it from memory. So
//! a token in steady use is never a miss: no hand-out waits for the database, which on a busy
//! machine is a wait for the database server to get a core (the hand-out p99 on PostgreSQL in
//! BENCHMARKS.md). Staleness stays bounded by the lifetime: an entry is only ever served within
//! it, and the re-read replaces it with one read after the change it might have missed.
//!
//! **No resurrection.** A read that started before a change this process makes (disconnect,
//! reconnect, erasure) must not put the old state back after the change dropped it. Every
//! `forget` moves an epoch on; a read notes the epoch before it starts and its result is kept
//! only if the epoch has not moved ([`TokenCache::put_read`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::tokens::IssuedToken;
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
    /// What a hand-out of it answers, made once.
    pub issued: IssuedToken,
    /// When this token set was stored (the start of its lifetime for the refresh margin).
    pub stored_at: DateTime<Utc>,
    /// When this entry was read (or refreshed) here.
    read_at: Instant,
    /// Set by the hand-out that started this entry's re-read.
    revalidating: AtomicBool,
}

#[derive(Clone)]
pub struct TokenCache {
    entries: Option<moka::sync::Cache<Uuid, Arc<CachedTokens>>>,
    ttl: StdDuration,
    /// Moved on by every `forget`: reads that began before it keep nothing.
    epoch: Arc<AtomicU64>,
    /// Entries claimed for a re-read, gathered so that one pair of queries re-reads them all.
    revalidations: Arc<Mutex<Vec<Uuid>>>,
}

/// Where a read for the cache began (see [`TokenCache::put_read`]).
#[derive(Debug, Clone, Copy)]
pub struct ReadStart(u64);

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
        let ttl = ttl.to_std().unwrap_or(StdDuration::ZERO);
        let entries = (ttl > StdDuration::ZERO).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(ttl)
                .build()
        });
        Self {
            entries,
            ttl,
            epoch: Arc::default(),
            revalidations: Arc::default(),
        }
    }

    /// Queues `id` for the next batched re-read; true for the caller that should start that
    /// batch (the queue was empty).
    pub fn queue_revalidation(&self, id: Uuid) -> bool {
        let mut queued = self
            .revalidations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        queued.push(id);
        queued.len() == 1
    }

    /// The ids queued for a re-read, emptying the queue.
    pub fn take_revalidations(&self) -> Vec<Uuid> {
        std::mem::take(
            &mut *self
                .revalidations
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    pub fn is_enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// Notes the epoch before a read whose result may go into the cache.
    pub fn read_start(&self) -> ReadStart {
        ReadStart(self.epoch.load(Ordering::Acquire))
    }

    /// Whether the caller that got `entry` should re-read it now: past half its lifetime,
    /// and nobody re-reading it yet (true for one caller only).
    pub fn claim_revalidation(&self, entry: &CachedTokens) -> bool {
        entry.read_at.elapsed() >= self.ttl / 2 && !entry.revalidating.swap(true, Ordering::AcqRel)
    }

    /// [`TokenCache::put`] for what a read begun at `start` found, unless something was
    /// forgotten since (the read may predate that change).
    pub fn put_read(
        &self,
        start: ReadStart,
        integration: &Integration,
        tokens: &TokenSet,
        stored_at: DateTime<Utc>,
    ) {
        if self.read_start().0 != start.0 {
            return;
        }
        self.put(integration, tokens, stored_at);
        // A forget between the check and the insert: undo the insert (forget moves the epoch
        // before it drops the entry, so one of the two always sees the other).
        if self.read_start().0 != start.0 {
            self.drop_entry(integration.id);
        }
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
                    issued: IssuedToken::new(integration, tokens),
                    integration: integration.clone(),
                    tokens: tokens.clone(),
                    stored_at,
                    read_at: Instant::now(),
                    revalidating: AtomicBool::new(false),
                };
                entries.insert(integration.id, Arc::new(entry));
            }
            IntegrationStatus::NeedsReauth | IntegrationStatus::Revoked => {
                entries.invalidate(&integration.id);
            }
        }
    }

    /// [`TokenCache::put`], but only over an entry already there (a token in use).
    pub fn replace(&self, integration: &Integration, tokens: &TokenSet, stored_at: DateTime<Utc>) {
        let cached = self
            .entries
            .as_ref()
            .is_some_and(|entries| entries.contains_key(&integration.id));
        if cached {
            self.put(integration, tokens, stored_at);
        }
    }

    pub fn forget(&self, id: Uuid) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.drop_entry(id);
    }

    fn drop_entry(&self, id: Uuid) {
        if let Some(entries) = &self.entries {
            entries.invalidate(&id);
        }
    }

    /// Drops every entry (erasure: rare, and simpler than finding one user's entries).
    pub fn forget_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
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
    fn a_replacement_updates_an_entry_but_adds_none() {
        let cache = TokenCache::new(Duration::seconds(5));
        let unused = integration(IntegrationStatus::Active);
        cache.replace(&unused, &tokens("a1"), Utc::now());
        assert!(cache.get(unused.id).is_none(), "not in use: not added");
        let in_use = integration(IntegrationStatus::Active);
        cache.put(&in_use, &tokens("a1"), Utc::now());
        cache.replace(&in_use, &tokens("a2"), Utc::now());
        let hit = cache.get(in_use.id).expect("still cached");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&hit.tokens.access_token),
            "a2"
        );
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
    fn a_read_begun_before_a_forget_puts_nothing_back() {
        let cache = TokenCache::new(Duration::seconds(5));
        let active = integration(IntegrationStatus::Active);
        let before = cache.read_start();
        cache.forget(active.id); // a disconnect committed while the read was under way
        cache.put_read(before, &active, &tokens("stale"), Utc::now());
        assert!(cache.get(active.id).is_none(), "the old state came back");
        let after = cache.read_start();
        cache.put_read(after, &active, &tokens("fresh"), Utc::now());
        assert!(cache.get(active.id).is_some());
    }

    #[test]
    fn one_caller_re_reads_an_entry_past_half_its_lifetime() {
        let cache = TokenCache::new(Duration::milliseconds(400));
        let active = integration(IntegrationStatus::Active);
        cache.put(&active, &tokens("a1"), Utc::now());
        let young = cache.get(active.id).expect("cached");
        assert!(!cache.claim_revalidation(&young), "too young to re-read");
        std::thread::sleep(StdDuration::from_millis(220));
        let old = cache.get(active.id).expect("still cached");
        assert!(cache.claim_revalidation(&old));
        assert!(
            !cache.claim_revalidation(&old),
            "only one re-read per entry"
        );
        cache.put(&active, &tokens("a2"), Utc::now());
        let replaced = cache.get(active.id).expect("cached");
        assert!(
            !cache.claim_revalidation(&replaced),
            "the re-read entry starts afresh"
        );
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
