//! `oauth_consents`: what a user granted to which provider, when, and whether withdrawn.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{with_pool, with_writer, Database, Page, Paged, StorageResult};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Consent {
    pub id: Uuid,
    pub user_id: String,
    pub provider: String,
    pub integration_id: Option<Uuid>,
    pub scopes_granted: Json<Vec<String>>,
    pub scopes_denied: Json<Vec<String>>,
    /// The catalog descriptions the user was shown, as they were at the time.
    pub descriptions_shown: Json<Value>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub granted_at: DateTime<Utc>,
    pub withdrawn_at: Option<DateTime<Utc>>,
}

pub(crate) const INSERT_SQL: &str = "INSERT INTO oauth_consents (id, user_id, provider, \
    integration_id, scopes_granted, scopes_denied, descriptions_shown, client_ip, user_agent, \
    granted_at, withdrawn_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// The insert of a consent record, bound and ready for any executor (pool or transaction).
macro_rules! insert_consent_query {
    ($consent:expr) => {{
        let consent: &$crate::storage::consents::Consent = $consent;
        sqlx::query($crate::storage::consents::INSERT_SQL)
            .bind(consent.id)
            .bind(&consent.user_id)
            .bind(&consent.provider)
            .bind(consent.integration_id)
            .bind(&consent.scopes_granted)
            .bind(&consent.scopes_denied)
            .bind(&consent.descriptions_shown)
            .bind(&consent.client_ip)
            .bind(&consent.user_agent)
            .bind(consent.granted_at)
            .bind(consent.withdrawn_at)
    }};
}
pub(crate) use insert_consent_query;

const COLUMNS: &str = "id, user_id, provider, integration_id, scopes_granted, scopes_denied, \
    descriptions_shown, client_ip, user_agent, granted_at, withdrawn_at";

impl Database {
    pub async fn insert_consent(&self, consent: &Consent) -> StorageResult<()> {
        with_writer!(self, pool => insert_consent_query!(consent).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn list_consents(
        &self,
        user_id: Option<&str>,
        page: Page<Uuid>,
    ) -> StorageResult<Paged<Consent, Uuid>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM oauth_consents WHERE ($1 IS NULL OR user_id = $1) \
             AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3"
        );
        let rows: Vec<Consent> = with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(user_id)
            .bind(page.after)
            .bind(page.fetch_limit())
            .fetch_all(pool)
            .await)?;
        Ok(Paged::from_rows(rows, page.limit, |consent| consent.id))
    }

    pub async fn get_consent(&self, id: Uuid) -> StorageResult<Option<Consent>> {
        let sql = format!("SELECT {COLUMNS} FROM oauth_consents WHERE id = $1");
        Ok(with_pool!(self, pool => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await)?)
    }

    /// Marks a consent withdrawn; false when it already was.
    pub async fn withdraw_consent(&self, id: Uuid, now: DateTime<Utc>) -> StorageResult<bool> {
        let sql =
            "UPDATE oauth_consents SET withdrawn_at = $2 WHERE id = $1 AND withdrawn_at IS NULL";
        let changed = with_writer!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(now)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(changed == 1)
    }

    /// How many consents recorded for an integration are not withdrawn.
    pub async fn active_consents(&self, integration_id: Uuid) -> StorageResult<i64> {
        let sql = "SELECT COUNT(*) FROM oauth_consents WHERE integration_id = $1 AND withdrawn_at IS NULL";
        Ok(
            with_pool!(self, pool => sqlx::query_scalar(sql).bind(integration_id).fetch_one(pool).await)?,
        )
    }
}
