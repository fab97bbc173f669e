//! `oauth_audit_log`: append-only record of who did what to which integration. Never holds
//! token values.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{with_pool, Database, Page, Paged, StorageResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

/// An event to append; the id and nothing else is assigned by the database.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEvent {
    pub occurred_at: DateTime<Utc>,
    pub actor_user_id: Option<String>,
    pub subject_user_id: Option<String>,
    pub integration_id: Option<Uuid>,
    pub provider: Option<String>,
    pub action: String,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub details: Value,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AuditEvent {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor_user_id: Option<String>,
    pub subject_user_id: Option<String>,
    pub integration_id: Option<Uuid>,
    pub provider: Option<String>,
    pub action: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub details: Json<Value>,
}

pub(crate) const INSERT_SQL: &str = "INSERT INTO oauth_audit_log (occurred_at, actor_user_id, \
    subject_user_id, integration_id, provider, action, outcome, reason, request_id, client_ip, \
    user_agent, details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id";

/// The insert of an audit event, bound and ready for any executor (pool or transaction).
macro_rules! insert_audit_query {
    ($event:expr) => {{
        let event: &$crate::storage::audit::NewAuditEvent = $event;
        sqlx::query_scalar::<_, i64>($crate::storage::audit::INSERT_SQL)
            .bind(event.occurred_at)
            .bind(&event.actor_user_id)
            .bind(&event.subject_user_id)
            .bind(event.integration_id)
            .bind(&event.provider)
            .bind(&event.action)
            .bind(event.outcome.as_str())
            .bind(&event.reason)
            .bind(&event.request_id)
            .bind(&event.client_ip)
            .bind(&event.user_agent)
            .bind(sqlx::types::Json(&event.details))
    }};
}
pub(crate) use insert_audit_query;

const COLUMNS: &str = "occurred_at, actor_user_id, subject_user_id, integration_id, provider, \
    action, outcome, reason, request_id, client_ip, user_agent, details";

impl Database {
    pub async fn append_audit_event(&self, event: &NewAuditEvent) -> StorageResult<i64> {
        Ok(with_pool!(self, pool => insert_audit_query!(event).fetch_one(pool).await)?)
    }

    /// Events about `subject_user_id` (all users when `None`), oldest first.
    pub async fn list_audit_events(
        &self,
        subject_user_id: Option<&str>,
        page: Page<i64>,
    ) -> StorageResult<Paged<AuditEvent, i64>> {
        let sql = format!(
            "SELECT id, {COLUMNS} FROM oauth_audit_log WHERE ($1 IS NULL OR subject_user_id = $1) \
             AND id > $2 ORDER BY id LIMIT $3"
        );
        let rows: Vec<AuditEvent> = with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(subject_user_id)
            .bind(page.after.unwrap_or(0))
            .bind(page.fetch_limit())
            .fetch_all(pool)
            .await)?;
        Ok(Paged::from_rows(rows, page.limit, |event| event.id))
    }
}
