//! `oauth_tokens`: the sealed token set of one integration (one row per integration).
//!
//! Values arrive here already sealed (see `services::vault`); this module never sees plaintext.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{with_pool, Database, StorageResult};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SealedTokens {
    pub integration_id: Uuid,
    pub key_id: String,
    pub access_token: Vec<u8>,
    pub refresh_token: Option<Vec<u8>>,
    pub id_token: Option<Vec<u8>>,
    pub token_type: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub refresh_token_expires_at: Option<DateTime<Utc>>,
    /// Bumped on every write, so a writer can tell whether the row changed under it.
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A token row with the user id of its integration.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OwnedSealedTokens {
    #[sqlx(flatten)]
    pub tokens: SealedTokens,
    pub user_id: String,
}

pub(crate) const UPSERT_SQL: &str = "INSERT INTO oauth_tokens (integration_id, key_id, access_token, \
    refresh_token, id_token, token_type, expires_at, refresh_token_expires_at, generation, created_at, \
    updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9) \
    ON CONFLICT (integration_id) DO UPDATE SET key_id = excluded.key_id, \
    access_token = excluded.access_token, refresh_token = excluded.refresh_token, \
    id_token = excluded.id_token, token_type = excluded.token_type, expires_at = excluded.expires_at, \
    refresh_token_expires_at = excluded.refresh_token_expires_at, \
    generation = oauth_tokens.generation + 1, updated_at = excluded.updated_at RETURNING generation";

/// The upsert of a token row, bound and ready for any executor (pool or transaction).
macro_rules! upsert_tokens_query {
    ($tokens:expr) => {{
        let tokens: &$crate::storage::tokens::SealedTokens = $tokens;
        sqlx::query_scalar::<_, i64>($crate::storage::tokens::UPSERT_SQL)
            .bind(tokens.integration_id)
            .bind(&tokens.key_id)
            .bind(&tokens.access_token)
            .bind(&tokens.refresh_token)
            .bind(&tokens.id_token)
            .bind(&tokens.token_type)
            .bind(tokens.expires_at)
            .bind(tokens.refresh_token_expires_at)
            .bind(tokens.updated_at)
    }};
}
pub(crate) use upsert_tokens_query;

pub(crate) const COLUMNS: &str =
    "integration_id, key_id, access_token, refresh_token, id_token, token_type, \
    expires_at, refresh_token_expires_at, generation, created_at, updated_at";

impl Database {
    /// Inserts or replaces the token set of an integration; the stored generation becomes
    /// one more than the previous one (1 for a new row).
    pub async fn upsert_tokens(&self, tokens: &SealedTokens) -> StorageResult<i64> {
        Ok(with_pool!(self, pool => upsert_tokens_query!(tokens).fetch_one(pool).await)?)
    }

    pub async fn get_tokens(&self, integration_id: Uuid) -> StorageResult<Option<SealedTokens>> {
        let sql = format!("SELECT {COLUMNS} FROM oauth_tokens WHERE integration_id = $1");
        Ok(with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(integration_id)
            .fetch_optional(pool)
            .await)?)
    }

    /// Up to `limit` token rows sealed under a key other than `active_key_id`, with their owner
    /// (part of the associated data needed to open them).
    pub async fn tokens_not_under_key(
        &self,
        active_key_id: &str,
        limit: i64,
    ) -> StorageResult<Vec<OwnedSealedTokens>> {
        let columns = COLUMNS.replace(", ", ", t.");
        let sql = format!(
            "SELECT t.{columns}, i.user_id FROM oauth_tokens t \
             JOIN oauth_integrations i ON i.id = t.integration_id \
             WHERE t.key_id <> $1 ORDER BY t.integration_id LIMIT $2"
        );
        Ok(with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(active_key_id)
            .bind(limit)
            .fetch_all(pool)
            .await)?)
    }

    /// Replaces the sealed values of a row only if it is still at `expected_generation`
    /// (a concurrent refresh wins; re-sealing is retried on the next pass). Keeps the
    /// generation: re-sealing changes no token.
    pub async fn reseal_tokens(
        &self,
        resealed: &SealedTokens,
        expected_generation: i64,
    ) -> StorageResult<bool> {
        let sql = "UPDATE oauth_tokens SET key_id = $1, access_token = $2, refresh_token = $3, \
                   id_token = $4 WHERE integration_id = $5 AND generation = $6";
        let result = with_pool!(self, pool => sqlx::query(sql)
            .bind(&resealed.key_id)
            .bind(&resealed.access_token)
            .bind(&resealed.refresh_token)
            .bind(&resealed.id_token)
            .bind(resealed.integration_id)
            .bind(expected_generation)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(result == 1)
    }
}
