//! The background worker: refreshes tokens before they expire, retries pending provider
//! revocations and purges expired authorization requests. Runs inside `serve` (unless
//! `OAUTH_BACKGROUND_REFRESH=false`) or alone as `oauth-manager worker`; any number of
//! replicas share the work, because each due integration is claimed with a lease
//! (PostgreSQL: `FOR UPDATE SKIP LOCKED`), the same lease on-demand refreshes take.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use chrono::Duration;
use rand::Rng;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::audit::RequestContext;
use super::disconnect;
use super::tokens::{ensure_fresh, Trigger};
use super::Context;

const SYSTEM_ACTOR: &str = "system:refresher";
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
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            interval: Duration::seconds(30),
            window: Duration::minutes(10),
            batch: 500,
            concurrency_per_provider: 64,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TickReport {
    pub refreshed: u64,
    pub refresh_failed: u64,
    pub revocations_attempted: u64,
    pub states_purged: u64,
}

/// Runs ticks every `interval` (with jitter, so replicas drift apart) until `shutdown`.
pub async fn run(ctx: Context, settings: WorkerSettings, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let report = tick(&ctx, &settings).await;
        if report != TickReport::default() {
            tracing::info!(?report, "background worker tick");
        }
        let base = settings.interval.num_milliseconds().max(100);
        let pause = rand::thread_rng().gen_range(base * 9 / 10..=base * 11 / 10);
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(std::time::Duration::from_millis(u64::try_from(pause).unwrap_or(1000))) => {}
        }
    }
}

/// One pass: refresh everything due, retry due revocations, purge old requests.
pub async fn tick(ctx: &Context, settings: &WorkerSettings) -> TickReport {
    let mut report = TickReport::default();
    refresh_due(ctx, settings, &mut report).await;
    retry_revocations(ctx, settings, &mut report).await;
    match ctx
        .db
        .purge_pending_authorizations(ctx.clock.now() - STATE_RETENTION)
        .await
    {
        Ok(purged) => report.states_purged = purged,
        Err(err) => tracing::warn!(error = %err, "purging expired authorization requests failed"),
    }
    report
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
    let mut tasks = JoinSet::new();
    loop {
        let now = ctx.clock.now();
        let claimed = ctx
            .db
            .claim_due_refreshes(
                &ctx.instance_id,
                now,
                now + settings.window,
                now + ctx.lifecycle.lease,
                settings.batch,
            )
            .await;
        let ids = match claimed {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!(error = %err, "claiming due refreshes failed");
                break;
            }
        };
        let last_batch = i64::try_from(ids.len()).unwrap_or(0) < settings.batch;
        for id in ids {
            spawn_refresh(&mut tasks, ctx, settings, &semaphores, id).await;
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

async fn spawn_refresh(
    tasks: &mut JoinSet<bool>,
    ctx: &Context,
    settings: &WorkerSettings,
    semaphores: &HashMap<String, Arc<Semaphore>>,
    id: Uuid,
) {
    let integration = match ctx.db.get_integration(id).await {
        Ok(Some(integration)) => integration,
        _ => return,
    };
    let Some(semaphore) = semaphores.get(&integration.provider).cloned() else {
        let _ = ctx.db.release_token_lease(id, &ctx.instance_id).await;
        return;
    };
    // Waiting here (not in the task) bounds the number of tasks as well as the requests.
    let Ok(permit) = semaphore.acquire_owned().await else {
        return;
    };
    let ctx = ctx.clone();
    let trigger = Trigger::Background {
        window: settings.window,
    };
    tasks.spawn(async move {
        let _permit = permit;
        let client = RequestContext::default();
        let result = ensure_fresh(&ctx, &integration, trigger, SYSTEM_ACTOR, &client).await;
        // Not refreshed after all (already fresh, or failed): the claim must not linger.
        let _ = ctx.db.release_token_lease(id, &ctx.instance_id).await;
        result.is_ok()
    });
}

fn count(report: &mut TickReport, done: Result<bool, tokio::task::JoinError>) {
    match done {
        Ok(true) => report.refreshed += 1,
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
    for queued in due {
        disconnect::attempt(
            ctx,
            &queued.provider,
            &queued.user_id,
            &queued.tokens,
            queued.revoke_attempts,
        )
        .await;
        report.revocations_attempted += 1;
    }
}
