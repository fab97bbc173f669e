//! Disconnecting: revoke at the provider (RFC 7009), then forget the tokens.
//!
//! The local disconnect always happens at once: the integration becomes `revoked` (it is kept,
//! with its consents and audit trail; connecting the same account again reactivates it) and no
//! token is handed out any more. When the provider has a revocation endpoint, the sealed token
//! row stays in `oauth_tokens` as a queue entry until the provider confirms (200, even for an
//! unknown token); a 503 or an outage is retried per `Retry-After` by the background worker, so
//! a restart never forgets a pending revocation. Then the row is deleted. Providers without
//! revocation (Microsoft) get their tokens deleted at once and a note in the response.

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use uuid::Uuid;

use super::audit::{self, RequestContext};
use super::{integrations, Context, ServiceResult};
use crate::auth::rbac::{Actor, WriteIntegrations};
use crate::oauth::{revoke, FailureClass, RevocationOutcome, TokenHint};
use crate::storage::audit::Outcome;
use crate::storage::integrations::IntegrationStatus;
use crate::storage::tokens::SealedTokens;

/// After this many failed attempts (about four days, see `revocation_backoff`) a revocation
/// is abandoned and the tokens deleted anyway: they are unusable here, and keeping them has
/// its own risk.
const MAX_REVOCATION_ATTEMPTS: i32 = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderRevocation {
    /// The provider confirmed; the tokens are deleted.
    Revoked,
    /// Queued: the worker retries at `retry_at`.
    Pending { retry_at: DateTime<Utc> },
    /// The provider has no revocation endpoint; the tokens are deleted here.
    NotSupported,
    /// No tokens were stored.
    NothingToRevoke,
    /// Given up after repeated failures; the tokens are deleted here.
    Abandoned,
}

impl ProviderRevocation {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderRevocation::Revoked => "revoked",
            ProviderRevocation::Pending { .. } => "pending",
            ProviderRevocation::NotSupported => "not_supported",
            ProviderRevocation::NothingToRevoke => "nothing_to_revoke",
            ProviderRevocation::Abandoned => "abandoned",
        }
    }
}

pub async fn disconnect(
    ctx: &Context,
    actor: &Actor<WriteIntegrations>,
    id: Uuid,
    client: &RequestContext,
) -> ServiceResult<ProviderRevocation> {
    let integration = integrations::visible(ctx, actor, id, client).await?;
    let already = integration.status == IntegrationStatus::Revoked;
    // A refresh in flight would store new tokens after our snapshot (and they would never be
    // revoked): wait for it, here and on other replicas, before taking the snapshot.
    let _flight = ctx.flights.lock(id).await;
    let lease = wait_for_lease(ctx, id).await?;
    let now = ctx.clock.now();
    let sealed = ctx.db.get_tokens(id).await?;
    let revocable = ctx
        .providers
        .get(&integration.provider)
        .is_some_and(|provider| provider.definition.revocation_url.is_some());
    let outcome = match sealed {
        None => {
            ctx.db.disconnect_integration(id, false, now).await?;
            ProviderRevocation::NothingToRevoke
        }
        Some(_) if !revocable => {
            ctx.db.disconnect_integration(id, false, now).await?;
            ProviderRevocation::NotSupported
        }
        // Disconnected before and still queued: the worker owns the retries and their back-off.
        Some(_) if already => ProviderRevocation::Pending { retry_at: now },
        Some(sealed) => {
            ctx.db.disconnect_integration(id, true, now).await?;
            attempt(ctx, &integration.provider, &integration.user_id, &sealed, 0).await
        }
    };
    // After the write: a hand-out that read the row before it re-caches for at most the TTL.
    ctx.tokens_cache.forget(id);
    if let Some(lease) = lease {
        ctx.db.release_token_lease(id, &lease).await?;
    }
    let event = audit::event(
        "disconnect",
        Outcome::Success,
        Some(actor.user_id()),
        Some(&integration.user_id),
        client,
        now,
    )
    .provider(&integration.provider)
    .integration(Some(id))
    .details(json!({"provider_revocation": outcome.as_str(), "already_disconnected": already}));
    audit::record(ctx, &event).await;
    Ok(outcome)
}

/// Takes the token row's refresh lease, waiting up to a lease's length for a refresher
/// elsewhere to finish; `None` when there is no row or the wait ran out (disconnect anyway).
async fn wait_for_lease(ctx: &Context, id: Uuid) -> ServiceResult<Option<String>> {
    let lease = ctx.new_lease("");
    let ours = ctx.own_leases();
    let deadline = std::time::Instant::now() + ctx.lifecycle.lease.to_std().unwrap_or_default();
    loop {
        let now = ctx.clock.now();
        if ctx
            .db
            .try_lease_tokens(id, &lease, &ours, now, now + ctx.lifecycle.lease)
            .await?
        {
            return Ok(Some(lease));
        }
        if ctx.db.get_tokens(id).await?.is_none() || std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// One revocation attempt for a queued token row; reschedules or deletes it.
pub async fn attempt(
    ctx: &Context,
    provider_name: &str,
    user_id: &str,
    sealed: &SealedTokens,
    attempts: i32,
) -> ProviderRevocation {
    match try_revoke(ctx, provider_name, user_id, sealed).await {
        Ok(None) => finish(ctx, sealed, ProviderRevocation::Revoked).await,
        Ok(Some(retry_after)) => {
            postpone(
                ctx,
                sealed,
                attempts,
                Some(retry_after),
                "the provider asked to retry later",
            )
            .await
        }
        Err(reason) => postpone(ctx, sealed, attempts, None, &reason).await,
    }
}

/// One immediate attempt, nothing queued (erasure keeps nothing for later): true when the
/// provider confirmed the revocation.
pub async fn revoke_now(
    ctx: &Context,
    provider_name: &str,
    user_id: &str,
    sealed: &SealedTokens,
) -> bool {
    matches!(
        try_revoke(ctx, provider_name, user_id, sealed).await,
        Ok(None)
    )
}

/// `Ok(None)`: revoked. `Ok(Some(wait))`: 503 with Retry-After. `Err`: failed, with why.
async fn try_revoke(
    ctx: &Context,
    provider_name: &str,
    user_id: &str,
    sealed: &SealedTokens,
) -> Result<Option<std::time::Duration>, String> {
    let provider = ctx
        .providers
        .get(provider_name)
        .ok_or("the provider is no longer configured")?;
    let endpoint = provider
        .definition
        .revocation_endpoint()
        .ok_or("the provider has no revocation endpoint")?;
    let credentials = provider
        .credentials()
        .ok_or("the provider has no client credentials")?;
    let tokens = ctx
        .vault
        .open(user_id, sealed)
        .map_err(|err| err.to_string())?;
    // RFC 7009 §2.1: revoking the refresh token also invalidates its access tokens.
    let (token, hint) = match &tokens.refresh_token {
        Some(refresh) => (refresh, TokenHint::RefreshToken),
        None => (&tokens.access_token, TokenHint::AccessToken),
    };
    // Notion's endpoint takes only `{"token"}`.
    let hint = (provider.definition.token_body == crate::oauth::BodyFormat::Form).then_some(hint);
    match revoke(&ctx.http, &endpoint, &credentials, token, hint).await {
        Ok(RevocationOutcome::Revoked) => Ok(None),
        Ok(RevocationOutcome::RetryLater(wait)) => {
            Ok(Some(wait.unwrap_or(std::time::Duration::from_secs(30))))
        }
        Err(err) if err.class() == FailureClass::InvalidClient => {
            tracing::error!(provider = provider_name, error = %err, "revocation refused our client credentials");
            Err(err.to_string())
        }
        Err(err) => Err(err.to_string()),
    }
}

async fn postpone(
    ctx: &Context,
    sealed: &SealedTokens,
    attempts: i32,
    retry_after: Option<std::time::Duration>,
    reason: &str,
) -> ProviderRevocation {
    let id = sealed.integration_id;
    if attempts + 1 >= MAX_REVOCATION_ATTEMPTS {
        tracing::error!(integration = %id, reason, "provider revocation abandoned after repeated failures");
        return finish(ctx, sealed, ProviderRevocation::Abandoned).await;
    }
    let failures = u32::try_from(attempts).unwrap_or(0);
    let retry_at = ctx.clock.now() + revocation_backoff(failures, retry_after);
    if let Err(err) = ctx
        .db
        .postpone_revocation(id, sealed.generation, retry_at, reason)
        .await
    {
        tracing::error!(integration = %id, error = %err, "could not reschedule a provider revocation");
    }
    ProviderRevocation::Pending { retry_at }
}

/// Deletes the queued row, unless a reconnect replaced it with live tokens meanwhile.
async fn finish(
    ctx: &Context,
    sealed: &SealedTokens,
    outcome: ProviderRevocation,
) -> ProviderRevocation {
    let id = sealed.integration_id;
    if let Err(err) = ctx.db.delete_queued_tokens(id, sealed.generation).await {
        tracing::error!(integration = %id, error = %err, "revoked tokens could not be deleted");
    }
    outcome
}

/// Revocations back off from 30 s, doubling, to at most 6 hours; a longer Retry-After wins.
/// With MAX_REVOCATION_ATTEMPTS that keeps trying for about four days.
fn revocation_backoff(failures: u32, retry_after: Option<std::time::Duration>) -> Duration {
    let doubling = 30i64.saturating_mul(1i64 << failures.min(10));
    let hinted = retry_after.map_or(0, |wait| i64::try_from(wait.as_secs()).unwrap_or(i64::MAX));
    Duration::seconds(doubling.min(6 * 3600).max(hinted.min(86_400)).max(1))
}
