//! Privacy: a user's data export, and erasure.
//!
//! Export returns everything stored about a user — integrations, granted scopes, consents and
//! audit events — and never a token value. Erasure revokes every integration at its provider
//! (best effort, at once: nothing may be kept for a later retry), deletes tokens, pending
//! authorizations, integrations and consents, and pseudonymises the user's audit rows: user id,
//! IP address and user agent are replaced by `erased:<digest>`, the same digest the hash chain
//! was computed over, so `audit verify` still passes and the history stays provable without
//! naming the person.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::audit::{self, RequestContext};
use super::disconnect::revoke_now;
use super::{Context, ServiceError, ServiceResult};
use crate::auth::rbac::{Administer, Principal};
use crate::storage::audit::{AuditEvent, Outcome};
use crate::storage::consents::Consent;
use crate::storage::integrations::{ErasedRows, Integration, IntegrationFilter};
use crate::storage::{Page, Paged, StorageResult};

const EXPORT_PAGE: u32 = 200;

fn page<C>(after: Option<C>) -> Page<C> {
    Page {
        after,
        limit: EXPORT_PAGE,
    }
}

/// Every row of a cursor-paginated listing, page by page.
async fn all_pages<T, C, F, Fut>(mut fetch: F) -> StorageResult<Vec<T>>
where
    F: FnMut(Option<C>) -> Fut,
    Fut: std::future::Future<Output = StorageResult<Paged<T, C>>>,
{
    let mut items = Vec::new();
    let mut after = None;
    loop {
        let page = fetch(after).await?;
        items.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(items),
        }
    }
}

/// Only the user themself or an admin may export or erase a user's data.
async fn check_self_or_admin(
    ctx: &Context,
    principal: &Principal,
    user_id: &str,
    attempted: &str,
    client: &RequestContext,
) -> ServiceResult<()> {
    if principal.user_id == user_id || principal.authorize::<Administer>().is_ok() {
        return Ok(());
    }
    audit::denied(ctx, &principal.user_id, Some(user_id), attempted, client).await;
    Err(ServiceError::Forbidden(crate::auth::rbac::Forbidden(
        crate::auth::rbac::Permission::Admin,
    )))
}

#[derive(Debug)]
pub struct Export {
    pub user_id: String,
    pub exported_at: DateTime<Utc>,
    pub integrations: Vec<Integration>,
    pub consents: Vec<Consent>,
    pub audit_events: Vec<AuditEvent>,
}

pub async fn export(
    ctx: &Context,
    principal: &Principal,
    user_id: &str,
    client: &RequestContext,
) -> ServiceResult<Export> {
    check_self_or_admin(ctx, principal, user_id, "export", client).await?;
    let filter = IntegrationFilter {
        user_id: Some(user_id.to_owned()),
        ..IntegrationFilter::default()
    };
    let integrations = all_pages(|after| ctx.db.list_integrations(&filter, page(after))).await?;
    let consents = all_pages(|after| ctx.db.list_consents(Some(user_id), page(after))).await?;
    ctx.audit.flush().await;
    let audit_events =
        all_pages(|after| ctx.db.list_audit_events_involving(user_id, page(after))).await?;
    let audit_events = super::audit_log::redact_for(principal, audit_events);
    let now = ctx.clock.now();
    let event = audit::event(
        "data_exported",
        Outcome::Success,
        Some(&principal.user_id),
        Some(user_id),
        client,
        now,
    );
    audit::record(ctx, &event).await;
    Ok(Export {
        user_id: user_id.to_owned(),
        exported_at: now,
        integrations,
        consents,
        audit_events,
    })
}

#[derive(Debug, Serialize)]
pub struct Erasure {
    pub user_id: String,
    /// Integrations whose tokens the provider confirmed revoked.
    pub provider_revocations_confirmed: u64,
    /// Integrations whose provider could not confirm (or has no revocation): tokens deleted anyway.
    pub provider_revocations_unconfirmed: u64,
    pub deleted: ErasedRows,
    pub audit_rows_pseudonymised: u64,
}

pub async fn erase(
    ctx: &Context,
    principal: &Principal,
    user_id: &str,
    client: &RequestContext,
) -> ServiceResult<Erasure> {
    check_self_or_admin(ctx, principal, user_id, "erase", client).await?;
    let filter = IntegrationFilter {
        user_id: Some(user_id.to_owned()),
        ..IntegrationFilter::default()
    };
    let (mut confirmed, mut unconfirmed) = (0, 0);
    let integrations = all_pages(|after| ctx.db.list_integrations(&filter, page(after))).await?;
    for integration in &integrations {
        if let Some(sealed) = ctx.db.get_tokens(integration.id).await? {
            if revoke_now(ctx, &integration.provider, user_id, &sealed).await {
                confirmed += 1;
            } else {
                unconfirmed += 1;
            }
        }
    }
    let deleted = ctx.db.erase_user_data(user_id).await?;
    ctx.tokens_cache.forget_all();
    // Queued hand-out events of this user must be written before they are pseudonymised.
    ctx.audit.flush().await;
    let pseudonymised = audit::pseudonymise_user(ctx, user_id).await?;
    let now = ctx.clock.now();
    // The record of the erasure names nobody: when users erase themselves, neither their id
    // nor their browser's address or user agent is kept.
    let itself = principal.user_id == user_id;
    let actor = (!itself).then_some(principal.user_id.as_str());
    let anonymous = RequestContext::default();
    let origin = if itself { &anonymous } else { client };
    let event =
        audit::event("user_erased", Outcome::Success, actor, None, origin, now).details(json!({
            "integrations": deleted.integrations,
            "consents": deleted.consents,
            "provider_revocations_confirmed": confirmed,
            "provider_revocations_unconfirmed": unconfirmed,
            "audit_rows_pseudonymised": pseudonymised,
        }));
    audit::record(ctx, &event).await;
    Ok(Erasure {
        user_id: user_id.to_owned(),
        provider_revocations_confirmed: confirmed,
        provider_revocations_unconfirmed: unconfirmed,
        deleted,
        audit_rows_pseudonymised: pseudonymised,
    })
}
