//! Consent records: what a user granted, to whom, when; and withdrawing it.
//!
//! Withdrawing a consent that an integration depends on (any consent recorded for an
//! integration that is still connected) disconnects that integration, as `DELETE
//! /integrations/{id}` does: the provider is asked to revoke the tokens and they are deleted.

use serde_json::json;
use uuid::Uuid;

use super::audit::{self, RequestContext};
use super::disconnect::{self, ProviderRevocation};
use super::integrations::page;
use super::{Context, ServiceError, ServiceResult};
use crate::auth::rbac::{
    Actor, Administer, Principal, ReadIntegrations, UserScope, WriteIntegrations,
};
use crate::storage::audit::Outcome;
use crate::storage::consents::Consent;
use crate::storage::integrations::IntegrationStatus;
use crate::storage::Paged;

/// The caller's own consents; other users' (`user_id`, or everyone's) need `admin`: they hold
/// browsers' addresses and user agents.
pub async fn list(
    ctx: &Context,
    principal: &Principal,
    user_id: Option<&str>,
    after: Option<Uuid>,
    limit: Option<u32>,
    client: &RequestContext,
) -> ServiceResult<Paged<Consent, Uuid>> {
    let own = user_id.is_none_or(|user| user == principal.user_id);
    let user = match principal.authorize::<Administer>() {
        Ok(admin) => match admin.list_scope(user_id)? {
            UserScope::One(user) => Some(user),
            UserScope::All => None,
        },
        Err(_) if own => {
            principal.authorize::<ReadIntegrations>()?;
            Some(principal.user_id.clone())
        }
        Err(forbidden) => {
            audit::denied(ctx, &principal.user_id, user_id, "consents_list", client).await;
            return Err(forbidden.into());
        }
    };
    Ok(ctx
        .db
        .list_consents(user.as_deref(), page(after, limit)?)
        .await?)
}

/// The consent after withdrawal, and how its integration was disconnected (if it was).
pub async fn withdraw(
    ctx: &Context,
    actor: &Actor<WriteIntegrations>,
    id: Uuid,
    client: &RequestContext,
) -> ServiceResult<(Consent, Option<ProviderRevocation>)> {
    let consent = match ctx.db.get_consent(id).await? {
        Some(consent) if actor.can_access(&consent.user_id) => consent,
        Some(consent) => {
            audit::denied(
                ctx,
                actor.user_id(),
                Some(&consent.user_id),
                "consent_withdraw",
                client,
            )
            .await;
            return Err(ServiceError::NotFound);
        }
        None => return Err(ServiceError::NotFound),
    };
    let now = ctx.clock.now();
    let newly = ctx.db.withdraw_consent(id, now).await?;
    let mut revocation = None;
    // The integration depends on its consents: it goes when the last active one is withdrawn
    // (withdrawing an old consent again, after a reconnect, changes nothing).
    let integration_id = match consent.integration_id {
        Some(id) if newly && ctx.db.active_consents(id).await? == 0 => Some(id),
        _ => None,
    };
    if let Some(integration_id) = integration_id {
        let still_connected = ctx
            .db
            .get_integration(integration_id)
            .await?
            .is_some_and(|integration| integration.status != IntegrationStatus::Revoked);
        if still_connected {
            revocation = Some(disconnect::disconnect(ctx, actor, integration_id, client).await?);
        }
    }
    if newly {
        let event = audit::event("consent_withdrawn", Outcome::Success, Some(actor.user_id()), Some(&consent.user_id), client, now)
            .provider(&consent.provider)
            .integration(consent.integration_id)
            .details(json!({"consent_id": id, "disconnected": revocation.as_ref().map(ProviderRevocation::as_str)}));
        audit::record(ctx, &event).await;
    }
    let consent = ctx
        .db
        .get_consent(id)
        .await?
        .ok_or(ServiceError::NotFound)?;
    Ok((consent, revocation))
}
