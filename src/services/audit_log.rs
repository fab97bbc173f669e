//! Reading the audit log. Users see the events about their own data; admins see everyone's.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::integrations::page;
use super::{Context, ServiceResult};
use crate::auth::rbac::{Administer, Forbidden, Permission, Principal};
use crate::storage::audit::{AuditEvent, AuditFilter};
use crate::storage::Paged;

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user_id: Option<String>,
    pub integration_id: Option<Uuid>,
    pub action: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

pub async fn list(
    ctx: &Context,
    principal: &Principal,
    query: AuditQuery,
) -> ServiceResult<Paged<AuditEvent, i64>> {
    let is_admin = principal.authorize::<Administer>().is_ok();
    let subject = match (query.user_id, is_admin) {
        (Some(user), true) => Some(user),
        (None, true) => None,
        (Some(user), false) if user != principal.user_id => {
            return Err(Forbidden(Permission::Admin).into())
        }
        _ => Some(principal.user_id.clone()),
    };
    let filter = AuditFilter {
        subject_user_id: subject,
        integration_id: query.integration_id,
        action: query.action,
        from: query.from,
        to: query.to,
    };
    Ok(ctx
        .db
        .list_audit_events_filtered(&filter, page(query.after, query.limit)?)
        .await?)
}
