//! `oauth_state`: pending authorization requests, looked up by the hash of their `state`.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{with_pool, with_writer, Database, StorageResult};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingAuthorization {
    pub id: Uuid,
    pub state_hash: Vec<u8>,
    pub user_id: String,
    pub provider: String,
    pub redirect_uri: String,
    pub requested_scopes: Json<Vec<String>>,
    pub integration_id: Option<Uuid>,
    pub return_to: Option<String>,
    pub key_id: String,
    /// Sealed PKCE verifier, when the provider uses PKCE.
    pub pkce_verifier: Option<Vec<u8>>,
    pub nonce: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    /// Set when the callback completed: the integration it saved, or its error code.
    pub result_integration_id: Option<Uuid>,
    pub result_error: Option<String>,
}

const INSERT_COLUMNS: &str = "id, state_hash, user_id, provider, redirect_uri, requested_scopes, \
    integration_id, return_to, key_id, pkce_verifier, nonce, client_ip, user_agent, created_at, \
    expires_at, used_at";
const COLUMNS: &str = "id, state_hash, user_id, provider, redirect_uri, requested_scopes, \
    integration_id, return_to, key_id, pkce_verifier, nonce, client_ip, user_agent, created_at, \
    expires_at, used_at, result_integration_id, result_error";

pub(crate) const RECORD_RESULT_SQL: &str =
    "UPDATE oauth_state SET result_integration_id = $2, result_error = $3 WHERE id = $1";

/// The record of how the authorization request `id` ended, bound and ready for any executor
/// (pool or transaction).
macro_rules! record_result_query {
    ($id:expr, $integration_id:expr, $error:expr) => {{
        let (id, integration_id, error): (uuid::Uuid, Option<uuid::Uuid>, Option<&str>) =
            ($id, $integration_id, $error);
        sqlx::query($crate::storage::state::RECORD_RESULT_SQL)
            .bind(id)
            .bind(integration_id)
            .bind(error)
    }};
}
pub(crate) use record_result_query;

impl Database {
    pub async fn insert_pending_authorization(
        &self,
        pending: &PendingAuthorization,
    ) -> StorageResult<()> {
        let sql = format!(
            "INSERT INTO oauth_state ({INSERT_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        );
        macro_rules! bound {
            ($query:expr) => {
                $query
                    .bind(pending.id)
                    .bind(&pending.state_hash)
                    .bind(&pending.user_id)
                    .bind(&pending.provider)
                    .bind(&pending.redirect_uri)
                    .bind(&pending.requested_scopes)
                    .bind(pending.integration_id)
                    .bind(&pending.return_to)
                    .bind(&pending.key_id)
                    .bind(&pending.pkce_verifier)
                    .bind(&pending.nonce)
                    .bind(&pending.client_ip)
                    .bind(&pending.user_agent)
                    .bind(pending.created_at)
                    .bind(pending.expires_at)
                    .bind(pending.used_at)
            };
        }
        match self {
            Database::Postgres(pool) => {
                let mut tx = Box::pin(pool.begin()).await?;
                // A state row guards one sign-in for minutes; if a server crash loses it, that
                // sign-in's callback finds no state and fails closed, and the user starts
                // again. Not worth a log flush of its own, which was most of authorize's time.
                sqlx::query("SET LOCAL synchronous_commit = off")
                    .execute(&mut *tx)
                    .await?;
                bound!(sqlx::query(&sql)).execute(&mut *tx).await?;
                tx.commit().await?;
            }
            Database::Sqlite(pool, gate) => {
                let _turn = gate.enter().await;
                bound!(sqlx::query(&sql)).execute(pool).await?;
            }
        }
        Ok(())
    }

    /// Marks the request with this state hash used, atomically: of any number of concurrent
    /// callbacks carrying the same state, exactly one gets the row back.
    pub async fn consume_pending_authorization(
        &self,
        state_hash: &[u8],
        now: DateTime<Utc>,
    ) -> StorageResult<Option<PendingAuthorization>> {
        let sql = format!(
            "UPDATE oauth_state SET used_at = $2 WHERE state_hash = $1 AND used_at IS NULL \
             RETURNING {COLUMNS}"
        );
        Ok(with_writer!(self, pool => sqlx::query_as(&sql)
            .bind(state_hash)
            .bind(now)
            .fetch_optional(pool)
            .await)?)
    }

    pub async fn find_pending_authorization(
        &self,
        state_hash: &[u8],
    ) -> StorageResult<Option<PendingAuthorization>> {
        let sql = format!("SELECT {COLUMNS} FROM oauth_state WHERE state_hash = $1");
        Ok(with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(state_hash)
            .fetch_optional(pool)
            .await)?)
    }

    /// Records how a consumed request ended, for replayed callbacks (a saved connection
    /// records its own, in its transaction).
    pub async fn record_authorization_result(
        &self,
        id: Uuid,
        integration_id: Option<Uuid>,
        error: Option<&str>,
    ) -> StorageResult<()> {
        with_writer!(self, pool => record_result_query!(id, integration_id, error)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Deletes requests that expired before `cutoff`; returns how many.
    pub async fn purge_pending_authorizations(&self, cutoff: DateTime<Utc>) -> StorageResult<u64> {
        let sql = "DELETE FROM oauth_state WHERE expires_at < $1";
        Ok(with_writer!(self, pool => sqlx::query(sql)
            .bind(cutoff)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?)
    }

    /// Up to `limit` pending requests whose verifier is sealed under another key.
    pub async fn pending_authorizations_not_under_key(
        &self,
        active_key_id: &str,
        limit: i64,
    ) -> StorageResult<Vec<PendingAuthorization>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM oauth_state WHERE key_id <> $1 AND pkce_verifier IS NOT NULL \
             ORDER BY id LIMIT $2"
        );
        Ok(with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(active_key_id)
            .bind(limit)
            .fetch_all(pool)
            .await)?)
    }

    /// Stores a re-sealed verifier if the row is still under `old_key_id`.
    pub async fn reseal_pending_authorization(
        &self,
        id: Uuid,
        old_key_id: &str,
        new_key_id: &str,
        pkce_verifier: &[u8],
    ) -> StorageResult<bool> {
        let sql =
            "UPDATE oauth_state SET key_id = $1, pkce_verifier = $2 WHERE id = $3 AND key_id = $4";
        let affected = with_writer!(self, pool => sqlx::query(sql)
            .bind(new_key_id)
            .bind(pkce_verifier)
            .bind(id)
            .bind(old_key_id)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(affected == 1)
    }
}
