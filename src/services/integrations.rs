//! Reading integrations, scoped by the caller's reach.

use uuid::Uuid;

use super::{ServiceError, ServiceResult};
use crate::auth::rbac::{Actor, ReadIntegrations, UserScope};
use crate::storage::integrations::{Integration, IntegrationFilter, IntegrationStatus};
use crate::storage::{Database, Page, Paged};

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
    db: &Database,
    actor: &Actor<ReadIntegrations>,
    query: ListIntegrations,
) -> ServiceResult<Paged<Integration, Uuid>> {
    let user_id = match actor.list_scope(query.user_id.as_deref())? {
        UserScope::One(user) => Some(user),
        UserScope::All => None,
    };
    let filter = IntegrationFilter {
        user_id,
        provider: query.provider,
        status: query.status,
    };
    Ok(db
        .list_integrations(&filter, page(query.after, query.limit)?)
        .await?)
}

/// An integration the caller may see; someone else's is reported as absent.
pub async fn get(
    db: &Database,
    actor: &Actor<ReadIntegrations>,
    id: Uuid,
) -> ServiceResult<Integration> {
    match db.get_integration(id).await? {
        Some(integration) if actor.can_access(&integration.user_id) => Ok(integration),
        _ => Err(ServiceError::NotFound),
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
