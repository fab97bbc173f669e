//! Fresh access tokens on demand: hand-out, single-flight refresh, failure classification.
//!
//! **Single flight.** Inside a process, one task per integration refreshes while the others wait
//! on a per-integration mutex ([`Flights`]); across processes, the refresher holds a lease on
//! the token row (`lease_owner`/`lease_until`, taken by an atomic UPDATE on both backends) and
//! the others poll until the row changes. The lease is only granted while the row is as its
//! taker last read it (same generation, integration active, no back-off): whoever gets it
//! refreshes exactly what it saw, so any number of concurrent callers cause one provider
//! refresh. Providers that rotate refresh
//! tokens revoke the whole grant when an old one is reused, so this is what keeps connections
//! alive.
//!
//! **Rotation-safe persistence.** New tokens are committed (keeping the old refresh token when
//! the provider sends none) before any caller sees them; the commit does not depend on still
//! holding the lease, because a rotated refresh token is the only one that works.
//!
//! **Failures.** `invalid_grant` (and Microsoft's AADSTS codes): re-read once — a sibling may
//! just have rotated the token — then `needs_reauth`. `invalid_client`: our configuration; logged
//! loudly, users' integrations untouched. Anything transient (network, timeout, 5xx, 429,
//! garbage): the integration stays active, a still-valid token is served, back-off before the
//! next background attempt. A refresh that timed out is not retried in-request: for strict
//! rotation (Notion, OIDC servers with reuse detection) the outcome is unknown, and the next
//! attempt either works or meets `invalid_grant`, which is terminal — never a loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, PoisonError, Weak};
use std::time::{Duration as StdDuration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::audit::{self, RequestContext};
use super::lane::Crowds;
use super::token_cache::{CachedTokens, ReadStart};
use super::vault::{TokenOwner, TokenSet};
use super::{integrations, Context, ServiceError, ServiceResult};
use crate::auth::rbac::{Actor, ReadTokens, RequiredPermission};
use crate::oauth::{request_token, FailureClass, TokenError, TokenGrant, TokenResponse};
use crate::providers::RefreshRotation;
use crate::storage::audit::{NewAuditEvent, Outcome};
use crate::storage::integrations::{Integration, IntegrationStatus};
use crate::storage::tokens::{LeaseCheck, SealedTokens};

/// Timing of the lifecycle; configurable through the environment (see the README).
#[derive(Debug, Clone, Copy)]
pub struct LifecycleSettings {
    /// Refresh this long before expiry (capped at a quarter of the token's lifetime).
    pub refresh_skew: Duration,
    /// How long a refresher may hold the lease before others may take over. Always longer
    /// than a refresh can take (two provider calls at `provider_timeout`), checked at start-up.
    pub lease: Duration,
    /// Total timeout of one call to a provider (`OAUTH_PROVIDER_TIMEOUT_SECONDS`).
    pub provider_timeout: Duration,
    /// A forced refresh within this long of the last one returns the current token instead.
    pub min_forced_interval: Duration,
    /// How long a process hands out a token from memory without reading the database
    /// (`OAUTH_TOKEN_CACHE_SECONDS`; zero turns the cache off). See [`super::token_cache`].
    pub token_cache: Duration,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            refresh_skew: Duration::minutes(5),
            lease: Duration::seconds(60),
            provider_timeout: Duration::seconds(15),
            min_forced_interval: Duration::seconds(10),
            token_cache: Duration::seconds(2),
        }
    }
}

impl LifecycleSettings {
    /// The longest a refresh can take once it holds the lease: a provider call, possibly one
    /// quick retry, and the commit. A lease must last at least this long.
    pub fn longest_refresh(&self) -> Duration {
        self.provider_timeout * 2 + Duration::seconds(5)
    }
}

/// Per-integration in-process locks; entries vanish when nobody holds them. Two kinds: the
/// refresh lock ([`Flights::lock`]) and the load lock ([`Flights::load`]), held by the one
/// hand-out that reads an integration missing from the token cache while others with the same
/// miss wait for its result (a storm of callers on an expired token: one of them reads and
/// refreshes, the others wait in memory and answer from the cache).
#[derive(Debug, Default)]
pub struct Flights {
    refreshes: Registry,
    loads: Registry,
    /// Everyone in [`Flights::wait_for_running`], waiting for a load or refresh.
    crowds: Arc<Crowds>,
}

#[derive(Debug, Default)]
struct Registry {
    locks: StdMutex<HashMap<Uuid, Weak<Flight>>>,
}

/// One integration's lock, and a signal to everyone waiting for its holder to finish.
#[derive(Debug, Default)]
struct Flight {
    lock: Arc<Mutex<()>>,
    /// Notified whenever a holder lets go, or has put its result in the token cache
    /// ([`Flights::publish`]): waiters that only want the result wake together, instead of
    /// taking the lock one after another (a chain of a thousand hand-overs was most of the
    /// refresh storm's tail).
    released: Notify,
}

/// Holds an integration's lock; letting go wakes everyone waiting for the result.
pub struct FlightGuard {
    guard: Option<OwnedMutexGuard<()>>,
    flight: Arc<Flight>,
}

impl FlightGuard {
    /// Completes at the next [`Flights::publish`] of this flight's integration, or when a
    /// holder of its lock lets go; wakes in turn with everyone else waiting.
    pub fn published(&self) -> tokio::sync::futures::Notified<'_> {
        self.flight.released.notified()
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.flight.released.notify_waiters();
    }
}

impl Flights {
    /// The refresh lock of `id`.
    pub async fn lock(&self, id: Uuid) -> FlightGuard {
        self.refreshes.lock(id).await
    }

    /// The load lock of `id`.
    pub async fn load(&self, id: Uuid) -> FlightGuard {
        self.loads.lock(id).await
    }

    /// Waits for a load or a refresh of `id` under way in this process to finish or to
    /// publish its result; says whether there was one (its result is then in the token cache,
    /// unless it failed).
    pub async fn wait_for_running(&self, id: Uuid) -> bool {
        self.loads.wait_for_running(id, &self.crowds).await
            || self.refreshes.wait_for_running(id, &self.crowds).await
    }

    /// The callers waiting in [`Flights::wait_for_running`].
    pub fn crowds(&self) -> Arc<Crowds> {
        self.crowds.clone()
    }

    /// Wakes everyone waiting on a load or refresh of `id`: its result is in the token cache.
    /// The refresher still has its audit record to commit; the waiters need not wait for that.
    pub fn publish(&self, id: Uuid) {
        for registry in [&self.loads, &self.refreshes] {
            if let Some(flight) = registry.running(id) {
                flight.released.notify_waiters();
            }
        }
    }
}

impl Registry {
    fn locks(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Weak<Flight>>> {
        self.locks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The flight of `id`, if anyone holds or awaits its lock.
    fn running(&self, id: Uuid) -> Option<Arc<Flight>> {
        self.locks().get(&id).and_then(Weak::upgrade)
    }

    async fn lock(&self, id: Uuid) -> FlightGuard {
        let flight = {
            let mut locks = self.locks();
            if locks.len() > 1024 {
                locks.retain(|_, weak| weak.strong_count() > 0);
            }
            match locks.get(&id).and_then(Weak::upgrade) {
                Some(flight) => flight,
                None => {
                    let flight = Arc::new(Flight::default());
                    locks.insert(id, Arc::downgrade(&flight));
                    flight
                }
            }
        };
        crate::metrics::single_flight_lock(&flight);
        let guard = flight.lock.clone().lock_owned().await;
        FlightGuard {
            guard: Some(guard),
            flight,
        }
    }

    /// Waits until the holder of `id`'s lock (if there is one) lets go of it; says whether
    /// there was one. Does not take the lock.
    async fn wait_for_running(&self, id: Uuid, crowds: &Crowds) -> bool {
        let Some(flight) = self.running(id) else {
            return false;
        };
        crate::metrics::single_flight_lock(&flight);
        let released = flight.released.notified();
        tokio::pin!(released);
        // Registered before looking at the lock, so a release between the look and the wait
        // is not missed.
        released.as_mut().enable();
        if flight.lock.try_lock().is_err() {
            let _waiting = crowds.wait();
            released.await;
        }
        true
    }
}

/// Why a refresh is wanted.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// A caller wants a token: refresh if expired or about to be.
    OnDemand,
    /// The background refresher: refresh if expiring within `window`.
    Background { window: Duration },
    /// A caller saw the token rejected (HTTP 401 at the provider's API).
    Rejected { access_token: Option<SecretString> },
}

/// A token handed out to a caller, with what it is told of its integration. Made once per
/// cached token set and shared by all its hand-outs (a clone is a reference count), with the
/// answer the HTTP layer renders from it: a token in steady use is rendered once per cache
/// entry, not once per request (copying and serialising it per request was ~4 % of a
/// hand-out's CPU, BENCHMARKS.md).
#[derive(Debug, Clone)]
pub struct IssuedToken(Arc<Issued>);

#[derive(Debug)]
pub struct Issued {
    pub access_token: SecretString,
    pub token_type: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub scopes: Vec<String>,
    pub provider: String,
    pub provider_account_id: String,
    answer: OnceLock<Bytes>,
}

impl IssuedToken {
    pub fn new(integration: &Integration, tokens: &TokenSet) -> Self {
        Self(Arc::new(Issued {
            access_token: tokens.access_token.clone(),
            token_type: tokens.token_type.clone(),
            expires_at: tokens.expires_at,
            scopes: integration.granted_scopes.clone(),
            provider: integration.provider.clone(),
            provider_account_id: integration.provider_account_id.clone(),
            answer: OnceLock::new(),
        }))
    }

    /// The answer `render` makes of this token, rendered once however often it is handed out.
    /// It holds the token: its bytes are zeroed when the last copy (in a response being
    /// written, or here) is dropped.
    pub fn answer<E>(
        &self,
        render: impl FnOnce(&Issued) -> Result<Vec<u8>, E>,
    ) -> Result<Bytes, E> {
        if let Some(answer) = self.0.answer.get() {
            return Ok(answer.clone());
        }
        let answer = Bytes::from_owner(Zeroizing::new(render(&self.0)?));
        Ok(self.0.answer.get_or_init(|| answer).clone())
    }
}

impl std::ops::Deref for IssuedToken {
    type Target = Issued;

    fn deref(&self) -> &Issued {
        &self.0
    }
}

/// Hands out a working access token, refreshing first when needed.
pub async fn access_token(
    ctx: &Context,
    actor: &Actor<ReadTokens>,
    id: Uuid,
    client: &RequestContext,
) -> ServiceResult<IssuedToken> {
    let mut cached = cached_token(ctx, actor, id);
    // A load or refresh of this token is under way here: its result will be in the cache, so
    // waiting for it costs no database read (a storm of callers on an expired token waits in
    // memory).
    let waited = cached.is_none() && ctx.flights.wait_for_running(id).await;
    if waited {
        cached = cached_token(ctx, actor, id);
    }
    // Otherwise this caller loads it, and callers with the same miss wait for it (above). One
    // that waited and still missed (the load failed, or is not for this caller) goes on by
    // itself: failures are not queued one behind the other.
    let loading = if cached.is_none() && !waited && ctx.tokens_cache.is_enabled() {
        let loading = ctx.flights.load(id).await;
        cached = cached_token(ctx, actor, id);
        Some(loading)
    } else {
        None
    };
    if let Some(cached) = cached {
        return Ok(hand_out_cached(ctx, actor, cached, client).await);
    }
    let (integration, result) = match &loading {
        Some(loading) => match load_on_lane(ctx, actor, id, client, loading).await? {
            Loaded::Cached(cached) => return Ok(hand_out_cached(ctx, actor, cached, client).await),
            Loaded::Read(read) => *read,
        },
        None => load_usable(ctx, actor, id, client).await?,
    };
    let outcome = if result.is_ok() {
        Outcome::Success
    } else {
        Outcome::Failure
    };
    audit::record_hand_out(ctx, handed_out(ctx, actor, &integration, outcome, client)).await;
    Ok(IssuedToken::new(&integration, &result?))
}

async fn hand_out_cached(
    ctx: &Context,
    actor: &Actor<ReadTokens>,
    cached: Arc<CachedTokens>,
    client: &RequestContext,
) -> IssuedToken {
    let issued = cached.issued.clone();
    let event = handed_out(ctx, actor, &cached.integration, Outcome::Success, client);
    drop(cached);
    audit::record_hand_out(ctx, event).await;
    issued
}

/// What a loader ends with: the token from the cache, or what it read itself.
enum Loaded {
    Cached(Arc<CachedTokens>),
    /// Boxed: the other answer is a pointer.
    Read(Box<(Integration, ServiceResult<TokenSet>)>),
}

/// The load of a token others wait for (`loading`), on the lane: they must not wait for the
/// whole crowd too. (Without the cache nobody waits, and the lane's one thread would only cap
/// the throughput.) A refresh publishes its tokens before it commits its audit record; the
/// loader answers from the cache then, as its waiters do, instead of when the lane is done.
/// Woken by the lane only after them all, the loader was the storm's last answer
/// (BENCHMARKS.md, session 15).
async fn load_on_lane(
    ctx: &Context,
    actor: &Actor<ReadTokens>,
    id: Uuid,
    client: &RequestContext,
    loading: &FlightGuard,
) -> ServiceResult<Loaded> {
    let published = loading.published();
    tokio::pin!(published);
    // Registered before the work starts, so that no publication is missed.
    published.as_mut().enable();
    let (lane, on_lane, on_lane_client) = (ctx.for_lane(), actor.clone(), client.clone());
    let work = ctx
        .lane
        .run(async move { load_usable(&lane, &on_lane, id, &on_lane_client).await });
    tokio::pin!(work);
    tokio::select! {
        biased;
        read = &mut work => return read.map(|read| Loaded::Read(Box::new(read))),
        () = &mut published => {}
    }
    match cached_token(ctx, actor, id) {
        Some(cached) => Ok(Loaded::Cached(cached)),
        None => work.await.map(|read| Loaded::Read(Box::new(read))),
    }
}

/// The integration visible to `actor`, and its tokens, refreshed if they need it (the
/// refusal of a visible integration's tokens is the second part, to be audited).
async fn load_usable(
    ctx: &Context,
    actor: &Actor<ReadTokens>,
    id: Uuid,
    client: &RequestContext,
) -> ServiceResult<(Integration, ServiceResult<TokenSet>)> {
    let start = ctx.tokens_cache.read_start();
    let (found, sealed) = ctx.db.get_integration_with_tokens(id).await?.unzip();
    let sealed = sealed.flatten();
    let integration = integrations::visible_as_read(ctx, actor, found, client).await?;
    let result = match (check_status(&integration), sealed) {
        (Err(refused), _) => Err(refused),
        (Ok(()), None) => Err(reauth(&integration)),
        (Ok(()), Some(sealed)) => {
            let read = TokenRead { sealed, start };
            let user = actor.user_id();
            ensure_fresh_from(ctx, &integration, Trigger::OnDemand, user, client, read).await
        }
    };
    Ok((integration, result))
}

/// The fast path: a token this process read or refreshed moments ago, still good to hand out
/// to this caller. Anything else (not cached, someone else's, due for refresh) takes the
/// full path, which also audits refusals.
fn cached_token(ctx: &Context, actor: &Actor<ReadTokens>, id: Uuid) -> Option<Arc<CachedTokens>> {
    let cached = fresh_in_cache(ctx, id, &Trigger::OnDemand)?;
    if !actor.can_access(&cached.integration.user_id) {
        return None;
    }
    if ctx.tokens_cache.claim_revalidation(&cached) && ctx.tokens_cache.queue_revalidation(id) {
        tokio::spawn(revalidate_queued(ctx.clone()));
    }
    Some(cached)
}

/// How long a batch of re-reads gathers before it reads.
const REVALIDATION_GATHER: StdDuration = StdDuration::from_millis(20);

/// Re-reads the cached entries queued for it, in the background (refresh ahead, see
/// [`super::token_cache`]). A token still good goes back in with a new lifetime; an
/// integration that can no longer hand out tokens is dropped, one gone entirely forgotten. A
/// token now due for refresh is left: the next hand-out finds it due and takes the full path.
async fn revalidate_queued(ctx: Context) {
    tokio::time::sleep(REVALIDATION_GATHER).await;
    let ids = ctx.tokens_cache.take_revalidations();
    let start = ctx.tokens_cache.read_start();
    let current = match read_current(&ctx, &ids).await {
        Ok(current) => current,
        Err(err) => {
            tracing::debug!(error = %err, "cached tokens not re-read; they expire as usual");
            return;
        }
    };
    let now = ctx.clock.now();
    for id in ids {
        match current.get(&id) {
            Some((integration, Ok((tokens, stored_at)))) => {
                if !needs_refresh(&Trigger::OnDemand, tokens, *stored_at, now, &ctx.lifecycle) {
                    ctx.tokens_cache
                        .put_read(start, integration, tokens, *stored_at);
                }
            }
            Some((_, Err(err))) => {
                tracing::warn!(error = %err, %id, "stored tokens could not be opened");
                ctx.tokens_cache.forget(id);
            }
            None => ctx.tokens_cache.forget(id),
        }
    }
}

type Current = HashMap<Uuid, (Integration, ServiceResult<(TokenSet, DateTime<Utc>)>)>;

/// The integrations among `ids` that have tokens, with their tokens opened (two queries).
async fn read_current(ctx: &Context, ids: &[Uuid]) -> ServiceResult<Current> {
    let mut integrations: HashMap<Uuid, Integration> = ctx
        .db
        .get_integrations(ids)
        .await?
        .into_iter()
        .map(|integration| (integration.id, integration))
        .collect();
    let tokens = ctx.db.get_tokens_of(ids).await?;
    Ok(tokens
        .into_iter()
        .filter_map(|sealed| {
            let integration = integrations.remove(&sealed.integration_id)?;
            let opened = ctx
                .vault
                .open(&integration.user_id, &sealed)
                .map(|tokens| (tokens, sealed.updated_at))
                .map_err(ServiceError::from);
            Some((integration.id, (integration, opened)))
        })
        .collect())
}

/// The cached token set of `id`, if it satisfies `trigger` as it stands.
fn fresh_in_cache(ctx: &Context, id: Uuid, trigger: &Trigger) -> Option<Arc<CachedTokens>> {
    let cached = ctx.tokens_cache.get(id)?;
    let now = ctx.clock.now();
    (!needs_refresh(
        trigger,
        &cached.tokens,
        cached.stored_at,
        now,
        &ctx.lifecycle,
    ))
    .then_some(cached)
}

fn handed_out(
    ctx: &Context,
    actor: &Actor<ReadTokens>,
    integration: &Integration,
    outcome: Outcome,
    client: &RequestContext,
) -> NewAuditEvent {
    audit::event(
        "token_handed_out",
        outcome,
        Some(actor.user_id()),
        Some(&integration.user_id),
        client,
        ctx.clock.now(),
    )
    .provider(&integration.provider)
    .integration(Some(integration.id))
}

/// Refreshes now (`POST …/refresh`). With `rejected`, only if that is still the stored token:
/// a sibling may already have replaced it. The new token is returned only to callers that may
/// read tokens.
pub async fn refresh_now<P: RequiredPermission>(
    ctx: &Context,
    actor: &Actor<P>,
    id: Uuid,
    rejected: Option<SecretString>,
    client: &RequestContext,
) -> ServiceResult<(Integration, TokenSet)> {
    let start = ctx.tokens_cache.read_start();
    let integration = integrations::visible(ctx, actor, id, client).await?;
    let tokens = usable_tokens(
        ctx,
        &integration,
        Trigger::Rejected {
            access_token: rejected,
        },
        actor.user_id(),
        client,
        start,
    )
    .await?;
    let integration = ctx
        .db
        .get_integration(id)
        .await?
        .ok_or(ServiceError::NotFound)?;
    Ok((integration, tokens))
}

async fn usable_tokens(
    ctx: &Context,
    integration: &Integration,
    trigger: Trigger,
    actor: &str,
    client: &RequestContext,
    start: ReadStart,
) -> ServiceResult<TokenSet> {
    check_status(integration)?;
    ensure_fresh(ctx, integration, trigger, actor, client, start).await
}

/// Whether an integration in this state may hand out tokens at all.
fn check_status(integration: &Integration) -> ServiceResult<()> {
    match integration.status {
        IntegrationStatus::Revoked => Err(ServiceError::IntegrationRevoked),
        IntegrationStatus::NeedsReauth => Err(reauth(integration)),
        IntegrationStatus::Active | IntegrationStatus::Error => Ok(()),
    }
}

fn reauth(integration: &Integration) -> ServiceError {
    ServiceError::ReauthRequired {
        provider: integration.provider.clone(),
    }
}

/// [`ensure_fresh_from`] the token row as stored now. `start`: where the caller's reads began
/// (before it read `integration`), for the cache.
pub async fn ensure_fresh(
    ctx: &Context,
    integration: &Integration,
    trigger: Trigger,
    actor: &str,
    client: &RequestContext,
    start: ReadStart,
) -> ServiceResult<TokenSet> {
    let sealed = ctx
        .db
        .get_tokens(integration.id)
        .await?
        .ok_or_else(|| reauth(integration))?;
    let read = TokenRead { sealed, start };
    ensure_fresh_from(ctx, integration, trigger, actor, client, read).await
}

/// A token row as read, and where the reads behind it began (for the cache).
struct TokenRead {
    sealed: SealedTokens,
    start: ReadStart,
}

/// Returns tokens that satisfy `trigger`, refreshing at most once across all callers, starting
/// from the token row as `read`.
///
/// A token that needs nothing is returned without any lock. Otherwise the work runs in a
/// detached task: a caller that goes away (client disconnect, request timeout) must not abort
/// a refresh the provider may already have answered, or the rotated refresh token would be lost.
async fn ensure_fresh_from(
    ctx: &Context,
    integration: &Integration,
    trigger: Trigger,
    actor: &str,
    client: &RequestContext,
    read: TokenRead,
) -> ServiceResult<TokenSet> {
    let TokenRead { sealed, start } = read;
    let current = ctx.vault.open(&integration.user_id, &sealed)?;
    if !needs_refresh(
        &trigger,
        &current,
        sealed.updated_at,
        ctx.clock.now(),
        &ctx.lifecycle,
    ) {
        ctx.tokens_cache
            .put_read(start, integration, &current, sealed.updated_at);
        return Ok(current);
    }
    let wanted = Wanted {
        integration: integration.clone(),
        trigger,
        actor: actor.to_owned(),
        client: client.clone(),
        seen: Some(Seen { sealed, current }),
        claimed: None,
    };
    let task = tokio::spawn(single_flight(ctx.clone(), wanted));
    let flown = task
        .await
        .map_err(|err| ServiceError::Internal(format!("refresh task failed: {err}")))??;
    Ok(flown.tokens)
}

/// The background worker's refresh of an integration it claimed with the lease `claim`, as it
/// read it (`sealed`) when claiming: the claim is handed over to the refresh, never released
/// in between (another worker could claim the row in that gap). True when this call refreshed.
pub async fn refresh_claimed(
    ctx: &Context,
    integration: &Integration,
    sealed: SealedTokens,
    window: Duration,
    claim: &str,
) -> ServiceResult<bool> {
    let current = ctx.vault.open(&integration.user_id, &sealed)?;
    let handoff = Claim {
        owner: claim.to_owned(),
        transferred: Arc::new(AtomicBool::new(false)),
    };
    let transferred = handoff.transferred.clone();
    let wanted = Wanted {
        integration: integration.clone(),
        trigger: Trigger::Background { window },
        actor: WORKER_ACTOR.to_owned(),
        client: RequestContext::default(),
        seen: Some(Seen { sealed, current }),
        claimed: Some(handoff),
    };
    let task = tokio::spawn(single_flight(ctx.clone(), wanted));
    let result = task
        .await
        .map_err(|err| ServiceError::Internal(format!("refresh task failed: {err}")))?;
    // Not needed after all, or failed before the hand-over: the claim must not linger. (After
    // the hand-over the refresh owns the lease and releases it itself: no write needed here.)
    if !transferred.load(Ordering::Acquire) {
        ctx.db.release_token_lease(integration.id, claim).await?;
    }
    result.map(|flown| flown.refreshed)
}

/// A worker's claim on a token row, which its refresh keeps as the lease or hands over to a
/// lease of its own ([`adopt_claim`]).
struct Claim {
    owner: String,
    /// Set once the refresh holds the lease: the claim itself, or a lease it was handed to.
    transferred: Arc<AtomicBool>,
}

pub const WORKER_ACTOR: &str = "system:refresher";

/// While another replica refreshes, a current token with at least this much life left is
/// handed out instead of waiting.
const USABLE_WHILE_WAITING: Duration = Duration::seconds(30);

/// How long a caller waits for another replica's refresh before answering 503.
const WAIT_FOR_OTHER_REFRESHER: StdDuration = StdDuration::from_secs(20);

/// One refresh wanted: of what, why, for whom, and what the caller already read.
struct Wanted {
    integration: Integration,
    trigger: Trigger,
    actor: String,
    client: RequestContext,
    /// The token row as the caller read it (with `integration`) before asking: the first
    /// attempt leases on the condition that nothing changed since, instead of reading again.
    seen: Option<Seen>,
    claimed: Option<Claim>,
}

struct Seen {
    sealed: SealedTokens,
    current: TokenSet,
}

/// What a single flight ends with.
struct Flown {
    tokens: TokenSet,
    /// This flight got new tokens from the provider.
    refreshed: bool,
}

impl Flown {
    fn unchanged(tokens: TokenSet) -> Self {
        Self {
            tokens,
            refreshed: false,
        }
    }
}

async fn single_flight(ctx: Context, wanted: Wanted) -> ServiceResult<Flown> {
    let ctx = &ctx;
    let Wanted {
        integration,
        trigger,
        actor,
        client,
        mut seen,
        mut claimed,
    } = wanted;
    let _flight = ctx.flights.lock(integration.id).await;
    // Waiters of a refresh in this process find its result here without a database read.
    if let Some(cached) = fresh_in_cache(ctx, integration.id, &trigger) {
        return Ok(Flown::unchanged(cached.tokens.clone()));
    }
    let deadline = Instant::now() + WAIT_FOR_OTHER_REFRESHER;
    loop {
        let now = ctx.clock.now();
        let first_look = seen.is_some();
        let (sealed, current, status) = match seen.take() {
            Some(Seen { sealed, current }) => (sealed, current, integration.status),
            None => {
                // With the status as it is now: a caller before us may have given up on this
                // integration, or be backing off.
                let (sealed, status) = ctx
                    .db
                    .get_tokens_and_status(integration.id)
                    .await?
                    .ok_or_else(|| reauth(&integration))?;
                let current = ctx.vault.open(&integration.user_id, &sealed)?;
                (sealed, current, status)
            }
        };
        if !needs_refresh(&trigger, &current, sealed.updated_at, now, &ctx.lifecycle) {
            return Ok(Flown::unchanged(current));
        }
        match status {
            IntegrationStatus::Revoked => return Err(ServiceError::IntegrationRevoked),
            IntegrationStatus::NeedsReauth => return Err(reauth(&integration)),
            IntegrationStatus::Active | IntegrationStatus::Error => {}
        }
        let forced = matches!(trigger, Trigger::Rejected { .. });
        if let Some(wait_until) = sealed.refresh_not_before.filter(|until| *until > now) {
            if !forced {
                return still_valid_or_unavailable(
                    current,
                    now,
                    wait_until,
                    "the provider failed recently; retrying later",
                )
                .map(Flown::unchanged);
            }
        }
        if current.refresh_token.is_none() {
            return no_refresh_token(ctx, &integration, &trigger, &actor, &client)
                .await
                .map(Flown::unchanged);
        }
        let mut lease = ctx.new_lease("");
        let ours = ctx.own_leases();
        let until = now + ctx.lifecycle.lease;
        // The lease is only granted if the row is still as read above (same generation, still
        // active, not backing off): whoever gets it refreshes exactly what it saw.
        let check = LeaseCheck {
            generation: sealed.generation,
            now,
            honour_backoff: !forced,
            ours: &ours,
        };
        let taken = match &claimed {
            Some(claim) => {
                let moved =
                    match adopt_claim(ctx, integration.id, claim, check, &lease, until).await? {
                        Some(adopted) => {
                            lease = adopted;
                            true
                        }
                        None => false,
                    };
                claim.transferred.store(moved, Ordering::Release);
                // A claim on a row that changed since the worker read it is kept for one more
                // look (read afresh); after that, a failed hand-over means the claim is gone.
                if moved || !first_look {
                    claimed = None;
                }
                moved
            }
            None => {
                ctx.db
                    .lease_unchanged_tokens(integration.id, &lease, check, until)
                    .await?
            }
        };
        if taken {
            let leased = Leased {
                lease: &lease,
                sealed,
                current,
                background: matches!(trigger, Trigger::Background { .. }),
            };
            return refresh_leased(ctx, &integration, &trigger, leased, &actor, &client).await;
        }
        if first_look {
            // The row changed since the caller read it, or someone holds the lease: look again.
            continue;
        }
        // Another replica is refreshing: a token that still works for a while is good enough
        // meanwhile; one about to expire is not worth handing out, so wait for the new one.
        let usable = current
            .expires_at
            .is_none_or(|expires| expires - USABLE_WHILE_WAITING > now);
        if usable && !forced {
            return Ok(Flown::unchanged(current));
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::ProviderUnavailable {
                detail: "another replica is still refreshing this token".to_owned(),
                retry_after_seconds: 1,
            });
        }
        crate::metrics::single_flight_wait("replica");
        let pause = rand::thread_rng().gen_range(20..60);
        tokio::time::sleep(StdDuration::from_millis(pause)).await;
    }
}

/// Makes the worker's claim the refresh's lease: kept as it is when it still holds the row
/// as read for long enough (a read), else handed over to `lease` with a new end (a write).
/// Returns the lease the refresh now holds; `None` when the claim no longer holds the row
/// unchanged.
async fn adopt_claim(
    ctx: &Context,
    integration_id: Uuid,
    claim: &Claim,
    check: LeaseCheck<'_>,
    lease: &str,
    until: DateTime<Utc>,
) -> ServiceResult<Option<String>> {
    let held_until = check.now + ctx.lifecycle.longest_refresh();
    if ctx
        .db
        .holds_unchanged_lease(integration_id, &claim.owner, check, held_until)
        .await?
    {
        return Ok(Some(claim.owner.clone()));
    }
    let moved = ctx
        .db
        .transfer_token_lease(integration_id, &claim.owner, lease, check, until)
        .await?;
    Ok(moved.then(|| lease.to_owned()))
}

fn still_valid_or_unavailable(
    current: TokenSet,
    now: DateTime<Utc>,
    wait_until: DateTime<Utc>,
    why: &str,
) -> ServiceResult<TokenSet> {
    if current.expires_at.is_none_or(|expires| expires > now) {
        return Ok(current);
    }
    let seconds = (wait_until - now).num_seconds().clamp(1, 86_400);
    Err(ServiceError::ProviderUnavailable {
        detail: why.to_owned(),
        retry_after_seconds: u64::try_from(seconds).unwrap_or(1),
    })
}

/// Nothing to refresh with: a rejected or expired token means the user must reconnect; a mere
/// "refresh now" changes nothing.
async fn no_refresh_token(
    ctx: &Context,
    integration: &Integration,
    trigger: &Trigger,
    actor: &str,
    client: &RequestContext,
) -> ServiceResult<TokenSet> {
    if matches!(trigger, Trigger::Rejected { access_token: None }) {
        return Err(ServiceError::RefreshUnavailable);
    }
    give_up(
        ctx,
        integration,
        "the token cannot be used and the provider issued no refresh token",
        actor,
        client,
    )
    .await
}

fn needs_refresh(
    trigger: &Trigger,
    current: &TokenSet,
    stored_at: DateTime<Utc>,
    now: DateTime<Utc>,
    settings: &LifecycleSettings,
) -> bool {
    let expiring_within = |margin: Duration| {
        current
            .expires_at
            .is_some_and(|expires| expires - margin <= now)
    };
    match trigger {
        Trigger::OnDemand => expiring_within(skew(settings.refresh_skew, current, stored_at)),
        // The worker's window, but never more than half the token's lifetime: a token living
        // less than the window would otherwise be refreshed on every tick.
        Trigger::Background { window } => {
            expiring_within(background_margin(*window, current, stored_at))
        }
        Trigger::Rejected { access_token } => {
            let still_current = access_token.as_ref().is_none_or(|rejected| {
                bool::from(
                    rejected
                        .expose_secret()
                        .as_bytes()
                        .ct_eq(current.access_token.expose_secret().as_bytes()),
                )
            });
            // Refreshed moments ago and rejected again: refreshing once more cannot help.
            still_current && stored_at + settings.min_forced_interval <= now
        }
    }
}

/// The refresh margin: the configured skew, but never more than a quarter of the token's
/// lifetime, so short-lived tokens are not refreshed on every call.
fn skew(configured: Duration, current: &TokenSet, stored_at: DateTime<Utc>) -> Duration {
    match current.expires_at {
        Some(expires) => configured.min((expires - stored_at) / 4),
        None => Duration::zero(),
    }
}

/// When the background worker should refresh: within `window` of expiry, at most half-way.
fn background_margin(window: Duration, current: &TokenSet, stored_at: DateTime<Utc>) -> Duration {
    match current.expires_at {
        Some(expires) => window.min((expires - stored_at) / 2),
        None => Duration::zero(),
    }
}

/// The time from which the background worker refreshes these tokens (`None`: never).
pub fn background_due_at(window: Duration, sealed: &SealedTokens) -> Option<DateTime<Utc>> {
    let expires = sealed.expires_at?;
    Some(expires - window.min((expires - sealed.updated_at) / 2))
}

/// The lease this refresher holds and what it saw when taking it.
struct Leased<'a> {
    lease: &'a str,
    sealed: SealedTokens,
    current: TokenSet,
    /// The background refresher took the lease, not a caller wanting a token: the refreshed
    /// tokens replace a cached entry but do not add one. Added, the refresher's 2,000 tokens a
    /// second would crowd the cache's 4,096 entries, evicting the tokens callers do use.
    background: bool,
}

async fn refresh_leased(
    ctx: &Context,
    integration: &Integration,
    trigger: &Trigger,
    leased: Leased<'_>,
    actor: &str,
    client: &RequestContext,
) -> ServiceResult<Flown> {
    let provider = match ctx.providers.get(&integration.provider) {
        Some(provider) if provider.credentials().is_some() => provider,
        Some(provider) => {
            ctx.db
                .release_token_lease(integration.id, leased.lease)
                .await?;
            return Err(ServiceError::ProviderNotConfigured {
                provider: integration.provider.clone(),
                missing: provider.missing_variables(),
            });
        }
        None => {
            ctx.db
                .release_token_lease(integration.id, leased.lease)
                .await?;
            return Err(ServiceError::UnknownProvider(integration.provider.clone()));
        }
    };
    let (Some(credentials), Some(refresh_token)) =
        (provider.credentials(), leased.current.refresh_token.clone())
    else {
        ctx.db
            .release_token_lease(integration.id, leased.lease)
            .await?;
        return Err(reauth(integration));
    };
    let endpoint = provider.definition.token_endpoint();
    let grant = || TokenGrant::RefreshToken {
        refresh_token: &refresh_token,
    };
    let started = Instant::now();
    let mut result = request_token(&ctx.http, &endpoint, &credentials, grant()).await;
    let strict = provider.definition.refresh_rotation == RefreshRotation::Strict;
    if let Some(pause) = quick_retry_pause(&result, started.elapsed()).filter(|_| !strict) {
        tokio::time::sleep(pause).await;
        result = request_token(&ctx.http, &endpoint, &credentials, grant()).await;
    }
    match result {
        Ok(response) => {
            // Boxed (as the failure path): inline, storing would size every refresh for the
            // whole of its wait for the provider (see `services` on future sizes).
            let tokens = Box::pin(store_refreshed(
                ctx,
                integration,
                provider,
                leased,
                response,
                actor,
                client,
            ))
            .await?;
            Ok(Flown {
                tokens,
                refreshed: true,
            })
        }
        Err(err) => Box::pin(refresh_failed(
            ctx,
            integration,
            trigger,
            leased,
            err,
            actor,
            client,
        ))
        .await
        .map(Flown::unchanged),
    }
}

/// One quick in-request retry, only for fast transient failures (connection refused, 5xx,
/// 429 with a short Retry-After) and never for strict-rotation providers (the failed attempt
/// may have rotated the token): a slow failure (timeout) has an unknown outcome.
fn quick_retry_pause(
    result: &Result<TokenResponse, TokenError>,
    elapsed: StdDuration,
) -> Option<StdDuration> {
    let err = result.as_ref().err()?;
    if err.class() != FailureClass::Transient || elapsed > StdDuration::from_secs(2) {
        return None;
    }
    let jitter = StdDuration::from_millis(rand::thread_rng().gen_range(50..250));
    match err.retry_after() {
        Some(wait) if wait <= StdDuration::from_secs(2) => Some(wait + jitter),
        Some(_) => None,
        None => Some(jitter),
    }
}

async fn store_refreshed(
    ctx: &Context,
    integration: &Integration,
    provider: &crate::providers::Provider,
    leased: Leased<'_>,
    response: TokenResponse,
    actor: &str,
    client: &RequestContext,
) -> ServiceResult<TokenSet> {
    let now = ctx.clock.now();
    let rotated = response.refresh_token.is_some();
    let reported_scopes = response.scope.as_deref().map(|raw| {
        super::flow::reported_scopes(&provider.definition, raw, &integration.granted_scopes)
    });
    let fresh = TokenSet {
        access_token: response.access_token,
        // Google usually sends no refresh token on refresh: keep the old one, never null (F3).
        refresh_token: response.refresh_token.or(leased.current.refresh_token),
        // The ID token validated at connect time stays: a refreshed one is not re-validated.
        id_token: leased.current.id_token,
        token_type: "Bearer".to_owned(),
        expires_at: response
            .expires_in
            .map(|seconds| now + Duration::seconds(seconds)),
        refresh_token_expires_at: leased.current.refresh_token_expires_at,
    };
    let owner = TokenOwner {
        integration_id: integration.id,
        user_id: &integration.user_id,
    };
    let sealed = ctx.vault.seal(owner, &fresh, now)?;
    if commit_refreshed(ctx, &sealed).await?.is_none() {
        tracing::warn!(integration = %integration.id, "refreshed tokens for an integration disconnected meanwhile");
        return Err(ServiceError::IntegrationRevoked);
    }
    let mut refreshed = integration.clone();
    refreshed.last_refreshed_at = Some(now);
    if let Some(scopes) = reported_scopes.filter(|scopes| *scopes != integration.granted_scopes) {
        ctx.db
            .set_granted_scopes(integration.id, &scopes, now)
            .await?;
        refreshed.granted_scopes = scopes;
    }
    let event = audit::event("token_refreshed", Outcome::Success, Some(actor), Some(&integration.user_id), client, now)
        .provider(&integration.provider)
        .integration(Some(integration.id))
        .details(json!({"refresh_token_rotated": rotated, "expires_at": fresh.expires_at, "previous_generation": leased.sealed.generation}));
    // Queued before the new token reaches anyone (the cache, then the waiters, answer them
    // without waiting for its commit): a flush from then on, a graceful shutdown's too,
    // writes it.
    let record = audit::record_ahead(ctx, &event).await;
    if leased.background {
        ctx.tokens_cache
            .replace(&refreshed, &fresh, sealed.updated_at);
    } else {
        ctx.tokens_cache.put(&refreshed, &fresh, sealed.updated_at);
    }
    ctx.flights.publish(integration.id);
    record.committed().await;
    crate::metrics::refresh(&integration.provider, "success");
    Ok(fresh)
}

/// Commits refreshed tokens, retrying a few times: after a rotation they are the only working
/// copy, so a passing database hiccup must not lose them.
async fn commit_refreshed(ctx: &Context, sealed: &SealedTokens) -> ServiceResult<Option<i64>> {
    let mut pause = StdDuration::from_millis(50);
    for _ in 0..4 {
        match ctx.refresh_commits.store(&ctx.db, sealed).await {
            Ok(generation) => return Ok(generation),
            Err(err) => {
                tracing::error!(integration = %sealed.integration_id, error = %err, "storing refreshed tokens failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 4;
            }
        }
    }
    Ok(ctx.refresh_commits.store(&ctx.db, sealed).await?)
}

async fn refresh_failed(
    ctx: &Context,
    integration: &Integration,
    trigger: &Trigger,
    leased: Leased<'_>,
    err: TokenError,
    actor: &str,
    client: &RequestContext,
) -> ServiceResult<TokenSet> {
    let now = ctx.clock.now();
    let class = err.class();
    crate::metrics::refresh(&integration.provider, failure_reason(class));
    let event = audit::event(
        "token_refresh_failed",
        Outcome::Failure,
        Some(actor),
        Some(&integration.user_id),
        client,
        now,
    )
    .provider(&integration.provider)
    .integration(Some(integration.id))
    .reason(failure_reason(class))
    // Codes only: provider text can name the account, and audit rows are hashed verbatim.
    .details(json!({"error": error_code(&err)}));
    audit::record(ctx, &event).await;
    let failures = u32::try_from(leased.sealed.refresh_failures).unwrap_or(0);
    let retry_at = now + backoff(failures, err.retry_after());
    match class {
        FailureClass::InvalidGrant => {
            // A sibling may have rotated the token with ours a moment ago: re-read once.
            let latest = ctx.db.get_tokens(integration.id).await?;
            ctx.db
                .release_token_lease(integration.id, leased.lease)
                .await?;
            if let Some(latest) =
                latest.filter(|latest| latest.generation != leased.sealed.generation)
            {
                return Ok(ctx.vault.open(&integration.user_id, &latest)?);
            }
            give_up(
                ctx,
                integration,
                &format!("the provider refused the refresh token: {err}"),
                actor,
                client,
            )
            .await
        }
        FailureClass::InvalidClient => {
            tracing::error!(provider = %integration.provider, error = %err,
                "the provider rejected this service's client credentials: fix the configuration; users' integrations are left untouched");
            ctx.db
                .record_refresh_failure(integration.id, leased.lease, retry_at)
                .await?;
            ctx.db
                .record_integration_error(integration.id, "provider_misconfigured", now)
                .await?;
            Err(ServiceError::ProviderMisconfigured {
                provider: integration.provider.clone(),
            })
        }
        FailureClass::Transient | FailureClass::Other => {
            ctx.db
                .record_refresh_failure(integration.id, leased.lease, retry_at)
                .await?;
            ctx.db
                .record_integration_error(integration.id, &format!("refresh failed: {err}"), now)
                .await?;
            if !matches!(trigger, Trigger::Rejected { .. }) {
                tracing::warn!(integration = %integration.id, error = %err, "refresh failed");
                return still_valid_or_unavailable(
                    leased.current,
                    now,
                    retry_at,
                    &format!("the provider could not refresh the token: {err}"),
                );
            }
            Err(ServiceError::ProviderUnavailable {
                detail: format!("the provider could not refresh the token: {err}"),
                retry_after_seconds: u64::try_from((retry_at - now).num_seconds().clamp(1, 86_400))
                    .unwrap_or(5),
            })
        }
    }
}

/// The provider's OAuth error code (and Microsoft's numeric codes), never its free text.
fn error_code(err: &TokenError) -> serde_json::Value {
    match err {
        TokenError::Provider {
            error,
            error_codes,
            status,
            ..
        } => {
            json!({"error": error, "error_codes": error_codes, "status": status})
        }
        TokenError::Unauthorized => json!("unauthorized"),
        TokenError::Transient { .. } => json!("transient"),
        TokenError::InvalidResponse(_) => json!("invalid_response"),
        TokenError::UnsupportedTokenType(_) => json!("unsupported_token_type"),
    }
}

fn failure_reason(class: FailureClass) -> &'static str {
    match class {
        FailureClass::InvalidGrant => "invalid_grant",
        FailureClass::InvalidClient => "invalid_client",
        FailureClass::Transient => "transient",
        FailureClass::Other => "provider_error",
    }
}

/// The connection cannot be refreshed any more: `needs_reauth`, audited, 409 to the caller.
async fn give_up(
    ctx: &Context,
    integration: &Integration,
    why: &str,
    actor: &str,
    client: &RequestContext,
) -> ServiceResult<TokenSet> {
    let now = ctx.clock.now();
    ctx.tokens_cache.forget(integration.id);
    ctx.db
        .set_integration_status(
            integration.id,
            IntegrationStatus::NeedsReauth,
            Some(why),
            now,
        )
        .await?;
    let event = audit::event(
        "reauth_required",
        Outcome::Failure,
        Some(actor),
        Some(&integration.user_id),
        client,
        now,
    )
    .provider(&integration.provider)
    .integration(Some(integration.id))
    .reason("invalid_grant");
    audit::record(ctx, &event).await;
    Err(reauth(integration))
}

/// Exponential back-off with ±20 % jitter, from 30 s to 30 min; a longer Retry-After wins.
pub fn backoff(failures: u32, retry_after: Option<StdDuration>) -> Duration {
    let base = 30f64 * 2f64.powi(i32::try_from(failures.min(6)).unwrap_or(6));
    let jittered = (base * rand::thread_rng().gen_range(0.8..1.2)).min(1800.0);
    #[allow(clippy::cast_possible_truncation)]
    let seconds = jittered as i64;
    let hinted = retry_after.map_or(0, |wait| i64::try_from(wait.as_secs()).unwrap_or(i64::MAX));
    Duration::seconds(seconds.max(hinted.min(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn crowded(crowds: &Crowds) {
        while !crowds.any() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn callers_waiting_for_a_load_are_a_crowd_until_woken() {
        let flights = Arc::new(Flights::default());
        let (id, crowds) = (Uuid::new_v4(), flights.crowds());
        let loading = flights.load(id).await;
        assert!(!crowds.any(), "nobody waits yet");
        let waiter = tokio::spawn({
            let flights = flights.clone();
            async move { flights.wait_for_running(id).await }
        });
        let joined = tokio::time::timeout(StdDuration::from_secs(5), crowded(&crowds));
        assert!(joined.await.is_ok(), "the waiter is not in the crowd");
        flights.publish(id);
        assert!(matches!(waiter.await, Ok(true)), "the waiter saw no load");
        let dispersed = tokio::time::timeout(StdDuration::from_secs(5), crowds.dispersed());
        assert!(dispersed.await.is_ok(), "the crowd is still there");
        // A caller that goes away while it waits leaves the crowd.
        let impatient = tokio::spawn({
            let flights = flights.clone();
            async move { flights.wait_for_running(id).await }
        });
        let joined = tokio::time::timeout(StdDuration::from_secs(5), crowded(&crowds));
        assert!(
            joined.await.is_ok(),
            "the second waiter is not in the crowd"
        );
        impatient.abort();
        assert!(impatient.await.is_err_and(|err| err.is_cancelled()));
        let dispersed = tokio::time::timeout(StdDuration::from_secs(5), crowds.dispersed());
        assert!(
            dispersed.await.is_ok(),
            "a cancelled waiter is still in the crowd"
        );
        drop(loading);
        // Nobody holds the lock now: a caller does not wait, and is no crowd.
        assert!(!flights.wait_for_running(id).await);
        assert!(!crowds.any());
    }

    fn set(expires_in: Option<i64>, issued: DateTime<Utc>) -> (TokenSet, SealedTokens) {
        let tokens = TokenSet {
            access_token: SecretString::from("at".to_owned()),
            refresh_token: Some(SecretString::from("rt".to_owned())),
            id_token: None,
            token_type: "Bearer".into(),
            expires_at: expires_in.map(|s| issued + Duration::seconds(s)),
            refresh_token_expires_at: None,
        };
        let sealed = SealedTokens {
            integration_id: Uuid::nil(),
            key_id: "k".into(),
            access_token: vec![],
            refresh_token: None,
            id_token: None,
            token_type: "Bearer".into(),
            expires_at: tokens.expires_at,
            refresh_token_expires_at: None,
            generation: 1,
            created_at: issued,
            updated_at: issued,
            refresh_failures: 0,
            refresh_not_before: None,
        };
        (tokens, sealed)
    }

    #[test]
    fn the_skew_scales_with_short_lifetimes_and_unknown_expiry_never_refreshes() {
        let issued = Utc::now();
        let settings = LifecycleSettings::default();
        let (hour, sealed) = set(Some(3600), issued);
        assert!(!needs_refresh(
            &Trigger::OnDemand,
            &hour,
            sealed.updated_at,
            issued + Duration::minutes(54),
            &settings
        ));
        assert!(needs_refresh(
            &Trigger::OnDemand,
            &hour,
            sealed.updated_at,
            issued + Duration::minutes(56),
            &settings
        ));
        // A 60 s token is not "always expiring" under a 5 min skew: margin 15 s.
        let (minute, sealed) = set(Some(60), issued);
        assert!(!needs_refresh(
            &Trigger::OnDemand,
            &minute,
            sealed.updated_at,
            issued + Duration::seconds(40),
            &settings
        ));
        assert!(needs_refresh(
            &Trigger::OnDemand,
            &minute,
            sealed.updated_at,
            issued + Duration::seconds(46),
            &settings
        ));
        let (unknown, sealed) = set(None, issued);
        assert!(!needs_refresh(
            &Trigger::OnDemand,
            &unknown,
            sealed.updated_at,
            issued + Duration::days(365),
            &settings
        ));
    }

    #[test]
    fn a_rejection_refreshes_once_and_only_the_current_token() {
        let issued = Utc::now();
        let settings = LifecycleSettings::default();
        let (tokens, sealed) = set(None, issued);
        let later = issued + Duration::minutes(1);
        let rejected = |value: &str| Trigger::Rejected {
            access_token: Some(SecretString::from(value.to_owned())),
        };
        assert!(needs_refresh(
            &rejected("at"),
            &tokens,
            sealed.updated_at,
            later,
            &settings
        ));
        assert!(!needs_refresh(
            &rejected("an-older-token"),
            &tokens,
            sealed.updated_at,
            later,
            &settings
        ));
        assert!(
            !needs_refresh(
                &rejected("at"),
                &tokens,
                sealed.updated_at,
                issued + Duration::seconds(3),
                &settings
            ),
            "just refreshed"
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        assert!(backoff(0, None) <= Duration::seconds(36));
        assert!(backoff(10, None) <= Duration::minutes(30));
        assert!(backoff(3, None) >= Duration::seconds(190));
        assert_eq!(
            backoff(0, Some(StdDuration::from_secs(3600))),
            Duration::seconds(3600)
        );
    }
}
