//! Reading the audit log. Users see the events about their own data; admins see everyone's.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::integrations::page;
use super::{Context, ServiceResult};
use crate::auth::rbac::{Administer, Forbidden, Permission, Principal};
use crate::storage::audit::{AuditEvent, AuditFilter, GENESIS_ACTION};
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
    client: &super::audit::RequestContext,
) -> ServiceResult<Paged<AuditEvent, i64>> {
    let is_admin = principal.authorize::<Administer>().is_ok();
    let subject = match (query.user_id, is_admin) {
        (Some(user), true) => Some(user),
        (None, true) => None,
        (Some(user), false) if user != principal.user_id => {
            super::audit::denied(ctx, &principal.user_id, Some(&user), "audit_list", client).await;
            return Err(Forbidden(Permission::Admin).into());
        }
        _ => Some(principal.user_id.clone()),
    };
    // Hand-out events are written in the background: a reader sees its own process's events.
    ctx.audit.flush().await;
    let filter = AuditFilter {
        subject_user_id: subject,
        integration_id: query.integration_id,
        action: query.action,
        from: query.from,
        to: query.to,
    };
    let mut events = ctx
        .db
        .list_audit_events_filtered(&filter, page(query.after, query.limit)?)
        .await?;
    events.items = redact_for(principal, events.items);
    Ok(events)
}

/// What a caller may see of audit rows: admins everything; users their own rows in full, but
/// of events someone else caused (a backend, an admin, an intruder) not that person's id, IP
/// address, user agent or request id.
pub fn redact_for(principal: &Principal, events: Vec<AuditEvent>) -> Vec<AuditEvent> {
    // The genesis row carries the digest salt: with it, pseudonyms could be tested against
    // guessed user ids and addresses, so nobody reads it through the API (admins included).
    let events = events.into_iter().map(|mut event| {
        if event.action == GENESIS_ACTION {
            event.details = sqlx::types::Json(serde_json::json!({"salt": REDACTED}));
        }
        event
    });
    if principal.authorize::<Administer>().is_ok() {
        return events.collect();
    }
    events
        .into_iter()
        .map(|event| {
            if event.actor_user_id.as_deref() == Some(principal.user_id.as_str()) {
                return event;
            }
            AuditEvent {
                actor_user_id: event.actor_user_id.map(|_| REDACTED.to_owned()),
                client_ip: None,
                user_agent: None,
                request_id: None,
                ..event
            }
        })
        .collect()
}

const REDACTED: &str = "redacted";
