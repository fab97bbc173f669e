//! The audit log.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::storage::audit::AuditEvent;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEventView {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    /// Who acted (a user id, `system:…`, or `erased:…` after erasure).
    pub actor_user_id: Option<String>,
    /// Whose data it concerns.
    pub subject_user_id: Option<String>,
    pub integration_id: Option<Uuid>,
    pub provider: Option<String>,
    pub action: String,
    /// `success`, `failure` or `denied`.
    pub outcome: String,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

impl From<AuditEvent> for AuditEventView {
    fn from(event: AuditEvent) -> Self {
        Self {
            id: event.id,
            occurred_at: event.occurred_at,
            actor_user_id: event.actor_user_id,
            subject_user_id: event.subject_user_id,
            integration_id: event.integration_id,
            provider: event.provider,
            action: event.action,
            outcome: event.outcome,
            reason: event.reason,
            request_id: event.request_id,
            client_ip: event.client_ip,
            user_agent: event.user_agent,
            details: event.details.0,
        }
    }
}
