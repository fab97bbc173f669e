//! `oauth_scopes`: the scope catalog, per provider.

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::{with_pool, with_writer, Database, StorageResult};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ScopeEntry {
    pub provider: String,
    pub scope: String,
    pub description: String,
    /// `basic`, `sensitive` or `restricted` (Google's classification where it applies).
    pub sensitivity: String,
    pub features: Json<Vec<String>>,
    pub is_default: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "provider, scope, description, sensitivity, features, is_default, created_at, updated_at";

impl Database {
    pub async fn list_scopes(&self, provider: &str) -> StorageResult<Vec<ScopeEntry>> {
        let sql = format!("SELECT {COLUMNS} FROM oauth_scopes WHERE provider = $1 ORDER BY scope");
        Ok(with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(provider)
            .fetch_all(pool)
            .await)?)
    }

    /// Every provider's catalog.
    pub async fn list_all_scopes(&self) -> StorageResult<Vec<ScopeEntry>> {
        let sql = format!("SELECT {COLUMNS} FROM oauth_scopes ORDER BY provider, scope");
        Ok(with_pool!(self, pool => sqlx::query_as(&sql).fetch_all(pool).await)?)
    }

    /// Adds a catalog entry unless one exists (seeding keeps operators' edits).
    pub async fn insert_scope_if_absent(&self, entry: &ScopeEntry) -> StorageResult<bool> {
        let sql = format!(
            "INSERT INTO oauth_scopes ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (provider, scope) DO NOTHING"
        );
        let inserted = with_writer!(self, pool => sqlx::query(&sql)
            .bind(&entry.provider)
            .bind(&entry.scope)
            .bind(&entry.description)
            .bind(&entry.sensitivity)
            .bind(&entry.features)
            .bind(entry.is_default)
            .bind(entry.created_at)
            .bind(entry.updated_at)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(inserted == 1)
    }

    /// Adds a catalog entry or replaces its description, sensitivity, features and default flag.
    pub async fn upsert_scope(&self, entry: &ScopeEntry) -> StorageResult<()> {
        let sql = format!(
            "INSERT INTO oauth_scopes ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (provider, scope) DO UPDATE SET description = excluded.description, \
               sensitivity = excluded.sensitivity, features = excluded.features, \
               is_default = excluded.is_default, updated_at = excluded.updated_at"
        );
        with_writer!(self, pool => sqlx::query(&sql)
            .bind(&entry.provider)
            .bind(&entry.scope)
            .bind(&entry.description)
            .bind(&entry.sensitivity)
            .bind(&entry.features)
            .bind(entry.is_default)
            .bind(entry.created_at)
            .bind(entry.updated_at)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }
}
