//! Writing the audit log: who did what to which integration, from where, with what outcome.
//! Never token values. A failed audit write is logged loudly but does not undo the action.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::storage::audit::{NewAuditEvent, Outcome};
use super::Context;

/// Where a request came from, as far as the HTTP layer could tell.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
}

/// An event about `subject_user_id`'s data, caused by `actor_user_id`.
pub fn event(
    action: &str,
    outcome: Outcome,
    actor_user_id: Option<&str>,
    subject_user_id: Option<&str>,
    request: &RequestContext,
    now: DateTime<Utc>,
) -> NewAuditEvent {
    NewAuditEvent {
        occurred_at: now,
        actor_user_id: actor_user_id.map(str::to_owned),
        subject_user_id: subject_user_id.map(str::to_owned),
        integration_id: None,
        provider: None,
        action: action.to_owned(),
        outcome,
        reason: None,
        request_id: request.request_id.clone(),
        client_ip: request.client_ip.clone(),
        user_agent: request.user_agent.clone(),
        details: Value::Object(Default::default()),
    }
}

impl NewAuditEvent {
    pub fn provider(mut self, provider: &str) -> Self {
        self.provider = Some(provider.to_owned());
        self
    }

    pub fn integration(mut self, id: Option<Uuid>) -> Self {
        self.integration_id = id;
        self
    }

    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_owned());
        self
    }

    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// Appends `event` to the audit log. The one way services write audit events.
pub async fn record(ctx: &Context, event: &NewAuditEvent) {
    if let Err(err) = ctx.db.append_audit_event(event).await {
        tracing::error!(error = %err, action = %event.action, "audit event could not be written");
    }
}
