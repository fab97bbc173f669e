//! Reading integrations, scoped by the caller's reach.

use uuid::Uuid;

use serde_json::json;

use super::audit::{self, RequestContext};
use super::{Context, ServiceError, ServiceResult};
use crate::auth::rbac::{Actor, ReadIntegrations, RequiredPermission, UserScope};
use crate::storage::audit::Outcome;
use crate::storage::integrations::{Integration, IntegrationFilter, IntegrationStatus};
use crate::storage::{Page, Paged};

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 200;

#[derive(Debug, Clone, Default)]
pub struct ListIntegrations {
    pub user_id: Option<String>,
    pub provider: Option<String>,
    pub status: Option<IntegrationStatus>,
    pub after: Option<Uuid>,
    pub limit: Option<u32>,
}

pub async fn list(
    ctx: &Context,
    actor: &Actor<ReadIntegrations>,
    query: ListIntegrations,
    client: &RequestContext,
) -> ServiceResult<Paged<Integration, Uuid>> {
    let user_id = match actor.list_scope(query.user_id.as_deref()) {
        Ok(UserScope::One(user)) => Some(user),
        Ok(UserScope::All) => None,
        Err(forbidden) => {
            // Asking for someone else's list is a refused attempt like any other 403.
            let subject = query.user_id.as_deref();
            audit::denied(ctx, actor.user_id(), subject, "integrations_list", client).await;
            return Err(forbidden.into());
        }
    };
    let filter = IntegrationFilter {
        user_id,
        provider: query.provider,
        status: query.status,
    };
    Ok(ctx
        .db
        .list_integrations(&filter, page(query.after, query.limit)?)
        .await?)
}

/// An integration the caller may see. Someone else's is reported as absent, exactly like a
/// missing one (no existence oracle), and the attempt is audited.
pub async fn visible<P: RequiredPermission>(
    ctx: &Context,
    actor: &Actor<P>,
    id: Uuid,
    client: &RequestContext,
) -> ServiceResult<Integration> {
    let found = ctx.db.get_integration(id).await?;
    visible_as_read(ctx, actor, found, client).await
}

/// [`visible`] for an integration already read (`found`, `None` when there is none).
pub async fn visible_as_read<P: RequiredPermission>(
    ctx: &Context,
    actor: &Actor<P>,
    found: Option<Integration>,
    client: &RequestContext,
) -> ServiceResult<Integration> {
    match found {
        Some(integration) if actor.can_access(&integration.user_id) => Ok(integration),
        Some(integration) => {
            let event = audit::event(
                "access_denied",
                Outcome::Denied,
                Some(actor.user_id()),
                Some(&integration.user_id),
                client,
                ctx.clock.now(),
            )
            .provider(&integration.provider)
            .integration(Some(integration.id))
            .reason("not_owner")
            .details(json!({"permission": P::PERMISSION}));
            audit::record(ctx, &event).await;
            Err(ServiceError::NotFound)
        }
        None => Err(ServiceError::NotFound),
    }
}

pub fn page<C>(after: Option<C>, limit: Option<u32>) -> ServiceResult<Page<C>> {
    let limit = limit.unwrap_or(DEFAULT_PAGE_SIZE);
    if limit == 0 || limit > MAX_PAGE_SIZE {
        return Err(ServiceError::invalid(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    Ok(Page { after, limit })
}
