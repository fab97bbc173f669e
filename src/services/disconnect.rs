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
use super::tokens::backoff;
use super::{Context, ServiceError, ServiceResult};
use crate::auth::rbac::{Actor, WriteIntegrations};
use crate::oauth::{revoke, FailureClass, RevocationOutcome, TokenHint};
use crate::storage::audit::Outcome;
use crate::storage::integrations::IntegrationStatus;
use crate::storage::tokens::SealedTokens;

/// After this many failed attempts (about a week of back-off) a revocation is abandoned and
/// the tokens deleted anyway: they are unusable here, and keeping them has its own risk.
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
    let integration = match ctx.db.get_integration(id).await? {
        Some(integration) if actor.can_access(&integration.user_id) => integration,
        _ => return Err(ServiceError::NotFound),
    };
    let now = ctx.clock.now();
    let sealed = ctx.db.get_tokens(id).await?;
    let provider = ctx.providers.get(&integration.provider);
    let can_revoke =
        provider.is_some_and(|p| p.definition.revocation_url.is_some() && p.is_configured());
    let already = integration.status == IntegrationStatus::Revoked;
    let outcome = match sealed {
        None => {
            ctx.db.disconnect_integration(id, false, now).await?;
            ProviderRevocation::NothingToRevoke
        }
        Some(_) if !can_revoke => {
            ctx.db.disconnect_integration(id, false, now).await?;
            ProviderRevocation::NotSupported
        }
        Some(sealed) => {
            if !already {
                ctx.db.disconnect_integration(id, true, now).await?;
            }
            attempt(ctx, &integration.provider, &integration.user_id, &sealed, 0).await
        }
    };
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

/// One revocation attempt for a queued token row; reschedules or deletes it.
pub async fn attempt(
    ctx: &Context,
    provider_name: &str,
    user_id: &str,
    sealed: &SealedTokens,
    attempts: i32,
) -> ProviderRevocation {
    let id = sealed.integration_id;
    match try_revoke(ctx, provider_name, user_id, sealed).await {
        Ok(None) => finish(ctx, id, ProviderRevocation::Revoked).await,
        Ok(Some(retry_after)) => {
            postpone(
                ctx,
                id,
                attempts,
                Some(retry_after),
                "the provider asked to retry later",
            )
            .await
        }
        Err(reason) => postpone(ctx, id, attempts, None, &reason).await,
    }
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
    id: Uuid,
    attempts: i32,
    retry_after: Option<std::time::Duration>,
    reason: &str,
) -> ProviderRevocation {
    if attempts + 1 >= MAX_REVOCATION_ATTEMPTS {
        tracing::error!(integration = %id, reason, "provider revocation abandoned after repeated failures");
        return finish(ctx, id, ProviderRevocation::Abandoned).await;
    }
    let failures = u32::try_from(attempts).unwrap_or(0);
    let retry_at = ctx.clock.now() + backoff(failures, retry_after).max(Duration::seconds(1));
    if let Err(err) = ctx.db.postpone_revocation(id, retry_at, reason).await {
        tracing::error!(integration = %id, error = %err, "could not reschedule a provider revocation");
    }
    ProviderRevocation::Pending { retry_at }
}

async fn finish(ctx: &Context, id: Uuid, outcome: ProviderRevocation) -> ProviderRevocation {
    if let Err(err) = ctx.db.delete_tokens(id).await {
        tracing::error!(integration = %id, error = %err, "revoked tokens could not be deleted");
    }
    outcome
}
