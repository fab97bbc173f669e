//! The background worker: refreshes tokens before they expire, retries pending provider
//! revocations and purges expired authorization requests. Runs inside `serve` (unless
//! `OAUTH_BACKGROUND_REFRESH=false`) or alone as `oauth-manager worker`; any number of
//! replicas share the work, because each due integration is claimed with a lease
//! (PostgreSQL: `FOR UPDATE SKIP LOCKED`), the same lease on-demand refreshes take.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use chrono::Duration;
use rand::Rng;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::audit::{self, RequestContext};
use super::disconnect::{self, ProviderRevocation};
use super::tokens::{background_due_at, backoff, refresh_claimed, WORKER_ACTOR};
use super::{Context, ServiceResult};
use crate::storage::audit::Outcome;
use crate::storage::integrations::Integration;
use crate::storage::tokens::SealedTokens;

/// Expired authorization requests are kept this long for replayed callbacks, then purged.
const STATE_RETENTION: Duration = Duration::hours(1);

#[derive(Debug, Clone, Copy)]
pub struct WorkerSettings {
    pub interval: Duration,
    /// Refresh tokens that expire within this window.
    pub window: Duration,
    /// Integrations claimed per round trip.
    pub batch: i64,
    /// Refreshes in flight per provider.
    pub concurrency_per_provider: usize,
    /// Integrations one tick claims at most. A tick remembers each one it claimed, so that
    /// none is handled twice in it; the bound keeps that memory small (100,000 due at once
    /// took 2–3 MiB), and a tick that reached it is followed by the next one at once.
    pub claims_per_tick: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            interval: Duration::seconds(30),
            window: Duration::minutes(10),
            batch: 500,
            concurrency_per_provider: 64,
            claims_per_tick: 16_384,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TickReport {
    pub refreshed: u64,
    /// Claimed but not due yet (short-lived tokens are refreshed half-way through their life).
    pub not_due: u64,
    pub refresh_failed: u64,
    pub revocations_attempted: u64,
    pub states_purged: u64,
    /// Audit rows deleted by retention (`OAUTH_AUDIT_RETENTION_DAYS`).
    pub audit_rows_pruned: u64,
    /// The tick stopped claiming at `claims_per_tick`: more may be due, the next tick starts
    /// without a pause.
    pub more_due: bool,
}

/// Runs ticks every `interval` (with jitter, so replicas drift apart) until `shutdown`.
pub async fn run(ctx: Context, settings: WorkerSettings, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let report = tick(&ctx, &settings).await;
        if report != TickReport::default() {
            tracing::info!(?report, "background worker tick");
        }
        // A tick that stopped at its claim bound is followed by the next at once.
        let pause = if report.more_due {
            0
        } else {
            let base = settings.interval.num_milliseconds().max(100);
            rand::thread_rng().gen_range(base * 9 / 10..=base * 11 / 10)
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = tokio::time::sleep(std::time::Duration::from_millis(u64::try_from(pause).unwrap_or(1000))) => {}
        }
    }
}

/// One pass: refresh what is due (up to `claims_per_tick`), retry due revocations, purge old
/// requests, prune the audit log past its retention.
pub async fn tick(ctx: &Context, settings: &WorkerSettings) -> TickReport {
    let mut report = TickReport::default();
    refresh_due(ctx, settings, &mut report).await;
    crate::metrics::worker_due_refreshes(report.refreshed + report.not_due + report.refresh_failed);
    retry_revocations(ctx, settings, &mut report).await;
    match ctx
        .db
        .purge_pending_authorizations(ctx.clock.now() - STATE_RETENTION)
        .await
    {
        Ok(purged) => report.states_purged = purged,
        Err(err) => tracing::warn!(error = %err, "purging expired authorization requests failed"),
    }
    match audit::prune_expired(ctx).await {
        Ok(pruned) => report.audit_rows_pruned = pruned,
        Err(err) => tracing::warn!(error = %err, "pruning the audit log failed"),
    }
    report
}

/// What happened to one claimed integration.
enum Refreshed {
    Yes,
    NotDue,
    Failed,
}

async fn refresh_due(ctx: &Context, settings: &WorkerSettings, report: &mut TickReport) {
    let semaphores: HashMap<String, Arc<Semaphore>> = ctx
        .providers
        .iter()
        .map(|p| {
            (
                p.definition.name.clone(),
                Arc::new(Semaphore::new(settings.concurrency_per_provider)),
            )
        })
        .collect();
    // This tick's claims carry their own token: releasing them can never touch a lease that
    // an on-demand refresh took meanwhile.
    let claim = ctx.new_lease("tick-");
    let mut seen = HashSet::new();
    let mut tasks = JoinSet::new();
    loop {
        let Some(room) = settings
            .claims_per_tick
            .checked_sub(seen.len())
            .filter(|n| *n > 0)
        else {
            // Never says "more" without having claimed any: a bound of 0 must not make the
            // worker tick without a pause.
            report.more_due = !seen.is_empty();
            break;
        };
        let limit = settings.batch.min(i64::try_from(room).unwrap_or(i64::MAX));
        let now = ctx.clock.now();
        let claimed = ctx
            .db
            .claim_due_refreshes(
                &claim,
                now,
                now + settings.window,
                now + ctx.lifecycle.lease,
                limit,
            )
            .await;
        let ids = match claimed {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!(error = %err, "claiming due refreshes failed");
                break;
            }
        };
        let fresh: Vec<Uuid> = ids.into_iter().filter(|id| seen.insert(*id)).collect();
        // Nothing new: every row still due was already handled (and deferred) in this tick.
        if fresh.is_empty() {
            break;
        }
        let last_batch = i64::try_from(fresh.len()).unwrap_or(0) < limit;
        // The batch's integrations and token generations in two queries, not two per row.
        let mut claimed = match read_claimed(ctx, &fresh).await {
            Ok(claimed) => claimed,
            Err(err) => {
                tracing::warn!(error = %err, "reading claimed integrations failed");
                HashMap::new()
            }
        };
        for id in fresh {
            let Some((integration, sealed)) = claimed.remove(&id) else {
                let _ = ctx.db.release_token_lease(id, &claim).await;
                continue;
            };
            let refresh = Claimed {
                integration,
                sealed,
                claim: &claim,
            };
            spawn_refresh(&mut tasks, ctx, settings, &semaphores, refresh).await;
            while let Some(done) = tasks.try_join_next() {
                count(report, done);
            }
        }
        if last_batch {
            break;
        }
    }
    while let Some(done) = tasks.join_next().await {
        count(report, done);
    }
}

/// The integrations among `ids` that have tokens, with their token rows.
async fn read_claimed(
    ctx: &Context,
    ids: &[Uuid],
) -> ServiceResult<HashMap<Uuid, (Integration, SealedTokens)>> {
    let mut tokens: HashMap<Uuid, SealedTokens> = ctx
        .db
        .get_tokens_of(ids)
        .await?
        .into_iter()
        .map(|sealed| (sealed.integration_id, sealed))
        .collect();
    Ok(ctx
        .db
        .get_integrations(ids)
        .await?
        .into_iter()
        .filter_map(|integration| {
            let sealed = tokens.remove(&integration.id)?;
            Some((integration.id, (integration, sealed)))
        })
        .collect())
}

/// A claimed integration and its token row as read after the claim.
struct Claimed<'a> {
    integration: Integration,
    sealed: SealedTokens,
    claim: &'a str,
}

async fn spawn_refresh(
    tasks: &mut JoinSet<Refreshed>,
    ctx: &Context,
    settings: &WorkerSettings,
    semaphores: &HashMap<String, Arc<Semaphore>>,
    claimed: Claimed<'_>,
) {
    let Claimed {
        integration,
        sealed,
        claim,
    } = claimed;
    let id = integration.id;
    let Some(semaphore) = semaphores.get(&integration.provider).cloned() else {
        let _ = ctx.db.release_token_lease(id, claim).await;
        let _ = ctx
            .db
            .defer_refresh(id, ctx.clock.now() + Duration::hours(1))
            .await;
        return;
    };
    let Ok(permit) = semaphore.acquire_owned().await else {
        return;
    };
    let ctx = ctx.clone();
    let window = settings.window;
    let claim = claim.to_owned();
    tasks.spawn(async move {
        let _permit = permit;
        let result = refresh_claimed(&ctx, &integration, sealed, window, &claim).await;
        if let Ok(true) = result {
            return Refreshed::Yes;
        }
        // Not refreshed: see when it is due (not due yet) or how often it failed (back-off).
        let after = ctx.db.get_tokens(id).await.ok().flatten();
        let now = ctx.clock.now();
        match (result, after) {
            (Ok(_), Some(after)) => {
                if let Some(due) = background_due_at(window, &after).filter(|due| *due > now) {
                    let _ = ctx.db.defer_refresh(id, due).await;
                }
                Refreshed::NotDue
            }
            (Ok(_), None) => Refreshed::NotDue,
            (Err(_), after) => {
                let failures = after.map_or(0, |sealed| {
                    u32::try_from(sealed.refresh_failures).unwrap_or(0)
                });
                let _ = ctx
                    .db
                    .defer_refresh(id, now + backoff(failures, None))
                    .await;
                Refreshed::Failed
            }
        }
    });
}

fn count(report: &mut TickReport, done: Result<Refreshed, tokio::task::JoinError>) {
    match done {
        Ok(Refreshed::Yes) => report.refreshed += 1,
        Ok(Refreshed::NotDue) => report.not_due += 1,
        _ => report.refresh_failed += 1,
    }
}

async fn retry_revocations(ctx: &Context, settings: &WorkerSettings, report: &mut TickReport) {
    let due = match ctx
        .db
        .due_revocations(ctx.clock.now(), settings.batch)
        .await
    {
        Ok(due) => due,
        Err(err) => {
            tracing::warn!(error = %err, "listing due revocations failed");
            return;
        }
    };
    crate::metrics::worker_due_revocations(due.len());
    for queued in due {
        let outcome = disconnect::attempt(
            ctx,
            &queued.provider,
            &queued.user_id,
            &queued.tokens,
            queued.revoke_attempts,
        )
        .await;
        report.revocations_attempted += 1;
        let settled = match outcome {
            ProviderRevocation::Revoked => Some(Outcome::Success),
            ProviderRevocation::Abandoned => Some(Outcome::Failure),
            _ => None,
        };
        if let Some(settled) = settled {
            let event = audit::event(
                "provider_revocation",
                settled,
                Some(WORKER_ACTOR),
                Some(&queued.user_id),
                &RequestContext::default(),
                ctx.clock.now(),
            )
            .provider(&queued.provider)
            .integration(Some(queued.tokens.integration_id))
            .details(serde_json::json!({"outcome": outcome.as_str(), "attempts": queued.revoke_attempts + 1}));
            audit::record(ctx, &event).await;
        }
    }
}
