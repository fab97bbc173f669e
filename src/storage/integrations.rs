//! `oauth_integrations`: one connected provider account of one user.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::tokens::SealedTokens;
use super::{with_pool, with_writer, Database, Page, Paged, StorageError, StorageResult};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum IntegrationStatus {
    Active,
    NeedsReauth,
    Revoked,
    Error,
}

impl IntegrationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationStatus::Active => "active",
            IntegrationStatus::NeedsReauth => "needs_reauth",
            IntegrationStatus::Revoked => "revoked",
            IntegrationStatus::Error => "error",
        }
    }
}

impl fmt::Display for IntegrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IntegrationStatus {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "active" => Ok(Self::Active),
            "needs_reauth" => Ok(Self::NeedsReauth),
            "revoked" => Ok(Self::Revoked),
            "error" => Ok(Self::Error),
            other => Err(format!("unknown integration status {other:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Integration {
    pub id: Uuid,
    pub user_id: String,
    pub provider: String,
    pub provider_account_id: String,
    pub account_email: Option<String>,
    pub account_name: Option<String>,
    pub account_metadata: Value,
    pub status: IntegrationStatus,
    pub granted_scopes: Vec<String>,
    pub requested_scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_refreshed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    user_id: String,
    provider: String,
    provider_account_id: String,
    account_email: Option<String>,
    account_name: Option<String>,
    account_metadata: Json<Value>,
    status: String,
    granted_scopes: Json<Vec<String>>,
    requested_scopes: Json<Vec<String>>,
    /// Aliased in reads ([`READ_COLUMNS`]): the token row has columns of the same names.
    #[sqlx(rename = "integration_created_at")]
    created_at: DateTime<Utc>,
    #[sqlx(rename = "integration_updated_at")]
    updated_at: DateTime<Utc>,
    last_refreshed_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
}

/// An integration row with its token row, if it has one, read together (`LEFT JOIN`).
struct RowWithTokens {
    integration: Row,
    tokens: Option<SealedTokens>,
}

impl<'r, R> sqlx::FromRow<'r, R> for RowWithTokens
where
    R: sqlx::Row,
    Row: sqlx::FromRow<'r, R>,
    SealedTokens: sqlx::FromRow<'r, R>,
    &'r str: sqlx::ColumnIndex<R>,
    Option<Uuid>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        let integration = Row::from_row(row)?;
        // Null only when the join found no token row: a token row's `integration_id` equals
        // the integration's id (the join condition).
        let token_row: Option<Uuid> = row.try_get("integration_id")?;
        let tokens = match token_row {
            Some(_) => Some(SealedTokens::from_row(row)?),
            None => None,
        };
        Ok(Self {
            integration,
            tokens,
        })
    }
}

impl TryFrom<Row> for Integration {
    type Error = StorageError;

    fn try_from(row: Row) -> Result<Self, Self::Error> {
        Ok(Self {
            id: row.id,
            user_id: row.user_id,
            provider: row.provider,
            provider_account_id: row.provider_account_id,
            account_email: row.account_email,
            account_name: row.account_name,
            account_metadata: row.account_metadata.0,
            status: row.status.parse().map_err(StorageError::Corrupt)?,
            granted_scopes: row.granted_scopes.0,
            requested_scopes: row.requested_scopes.0,
            created_at: row.created_at,
            updated_at: row.updated_at,
            last_refreshed_at: row.last_refreshed_at,
            last_error: row.last_error,
            last_error_at: row.last_error_at,
        })
    }
}

const INSERT_COLUMNS: &str =
    "id, user_id, provider, provider_account_id, account_email, account_name, \
    account_metadata, status, granted_scopes, requested_scopes, created_at, updated_at, \
    last_refreshed_at, last_error, last_error_at";

/// [`INSERT_COLUMNS`] as a read selects them, in the names [`Row`] takes.
const READ_COLUMNS: &str =
    "id, user_id, provider, provider_account_id, account_email, account_name, \
    account_metadata, status, granted_scopes, requested_scopes, \
    created_at AS integration_created_at, updated_at AS integration_updated_at, \
    last_refreshed_at, last_error, last_error_at";

/// What listing filters on; `None` means "any".
#[derive(Debug, Clone, Default)]
pub struct IntegrationFilter {
    pub user_id: Option<String>,
    pub provider: Option<String>,
    pub status: Option<IntegrationStatus>,
}

/// A successful refresh: written with the refreshed tokens (`Database::store_refreshed_tokens`).
pub(super) const MARK_REFRESHED_SQL: &str =
    "UPDATE oauth_integrations SET last_refreshed_at = $2, \
    updated_at = $2, last_error = NULL, last_error_at = NULL WHERE id = $1";

impl Database {
    pub async fn insert_integration(&self, integration: &Integration) -> StorageResult<()> {
        let sql = format!(
            "INSERT INTO oauth_integrations ({INSERT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        );
        with_writer!(self, pool => sqlx::query(&sql)
            .bind(integration.id)
            .bind(&integration.user_id)
            .bind(&integration.provider)
            .bind(&integration.provider_account_id)
            .bind(&integration.account_email)
            .bind(&integration.account_name)
            .bind(Json(&integration.account_metadata))
            .bind(integration.status.as_str())
            .bind(Json(&integration.granted_scopes))
            .bind(Json(&integration.requested_scopes))
            .bind(integration.created_at)
            .bind(integration.updated_at)
            .bind(integration.last_refreshed_at)
            .bind(&integration.last_error)
            .bind(integration.last_error_at)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    pub async fn get_integration(&self, id: Uuid) -> StorageResult<Option<Integration>> {
        let sql = format!("SELECT {READ_COLUMNS} FROM oauth_integrations WHERE id = $1");
        let row: Option<Row> = with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        row.map(Integration::try_from).transpose()
    }

    /// The integration with its token row if it has one, in one read (one snapshot): the
    /// token hand-out's read, where on a crowded machine every round trip waits for a core.
    pub async fn get_integration_with_tokens(
        &self,
        id: Uuid,
    ) -> StorageResult<Option<(Integration, Option<SealedTokens>)>> {
        // Built once: this is the hand-out's read, and the column lists are qualified one by one.
        static SQL: LazyLock<String> = LazyLock::new(|| {
            let integration = super::prefixed(READ_COLUMNS, "i");
            let tokens = super::tokens::joined_columns();
            format!(
                "SELECT {integration}, {tokens} FROM oauth_integrations i \
                 LEFT JOIN oauth_tokens t ON t.integration_id = i.id WHERE i.id = $1"
            )
        });
        let row: Option<RowWithTokens> = with_pool!(self, pool => sqlx::query_as(SQL.as_str())
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        row.map(|row| Ok((Integration::try_from(row.integration)?, row.tokens)))
            .transpose()
    }

    /// The integrations among `ids` that exist, in no particular order.
    pub async fn get_integrations(&self, ids: &[Uuid]) -> StorageResult<Vec<Integration>> {
        let select = format!("SELECT {READ_COLUMNS} FROM oauth_integrations WHERE id");
        let rows: Vec<Row> = self.rows_with_ids(&select, ids).await?;
        rows.into_iter().map(Integration::try_from).collect()
    }

    /// Integrations matching `filter`, in id (creation) order, one page at a time.
    pub async fn list_integrations(
        &self,
        filter: &IntegrationFilter,
        page: Page<Uuid>,
    ) -> StorageResult<Paged<Integration, Uuid>> {
        let sql = format!(
            "SELECT {READ_COLUMNS} FROM oauth_integrations \
             WHERE ($1 IS NULL OR user_id = $1) AND ($2 IS NULL OR provider = $2) \
               AND ($3 IS NULL OR status = $3) AND ($4 IS NULL OR id > $4) \
             ORDER BY id LIMIT $5"
        );
        let rows: Vec<Row> = with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(&filter.user_id)
            .bind(&filter.provider)
            .bind(filter.status.map(IntegrationStatus::as_str))
            .bind(page.after)
            .bind(page.fetch_limit())
            .fetch_all(pool)
            .await)?;
        let items = rows
            .into_iter()
            .map(Integration::try_from)
            .collect::<StorageResult<Vec<_>>>()?;
        Ok(Paged::from_rows(items, page.limit, |integration| {
            integration.id
        }))
    }
}

/// A completed authorization, saved atomically: the integration (created, or updated when the
/// same provider account is connected again), its tokens, the consent and the authorization's
/// result.
pub struct NewConnection<'a> {
    /// Used when no integration exists yet for this account.
    pub proposed_id: Uuid,
    pub user_id: &'a str,
    pub provider: &'a str,
    pub provider_account_id: &'a str,
    pub account_email: Option<&'a str>,
    pub account_name: Option<&'a str>,
    pub account_metadata: &'a Value,
    pub granted_scopes: &'a [String],
    /// Requested this time; merged with what the integration requested before.
    pub requested_scopes: &'a [String],
    pub now: DateTime<Utc>,
    /// The pending authorization (`oauth_state`) this connection completes: its result is
    /// recorded in the same transaction, for a replayed callback to find.
    pub authorization_id: Uuid,
}

/// What `save_connection` stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedConnection {
    pub integration: Integration,
    pub created: bool,
}

const UPSERT_CONNECTION_SQL: &str = "INSERT INTO oauth_integrations (id, user_id, provider, \
    provider_account_id, account_email, account_name, account_metadata, status, granted_scopes, \
    requested_scopes, created_at, updated_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $10, $10) \
    ON CONFLICT (user_id, provider, provider_account_id) DO UPDATE SET \
      account_email = excluded.account_email, account_name = excluded.account_name, \
      account_metadata = excluded.account_metadata, status = 'active', \
      granted_scopes = excluded.granted_scopes, requested_scopes = excluded.requested_scopes, \
      updated_at = excluded.updated_at, last_error = NULL, last_error_at = NULL";

impl Database {
    /// Saves a connection in one transaction, with the authorization's result. `seal_tokens`
    /// receives the integration id (the tokens' associated data) and the previously stored
    /// tokens, if any, and returns the row to store; `consent` is completed with the
    /// integration id.
    ///
    /// Every statement is a round trip on the critical path of a user's sign-in: the row comes
    /// back from the upsert itself, and a new integration has no tokens to read.
    pub async fn save_connection<F>(
        &self,
        connection: &NewConnection<'_>,
        seal_tokens: F,
        consent: &mut crate::storage::consents::Consent,
    ) -> StorageResult<SavedConnection>
    where
        F: Fn(Uuid, Option<&SealedTokens>) -> StorageResult<SealedTokens>,
    {
        let find_sql = format!(
            "SELECT {READ_COLUMNS} FROM oauth_integrations \
             WHERE user_id = $1 AND provider = $2 AND provider_account_id = $3"
        );
        let tokens_sql = format!(
            "SELECT {} FROM oauth_tokens WHERE integration_id = $1",
            crate::storage::tokens::COLUMNS
        );
        let upsert_sql = format!("{UPSERT_CONNECTION_SQL} RETURNING {READ_COLUMNS}");
        // SQLite: take the write lock up front. A deferred transaction that reads first cannot
        // upgrade to a write once another connection has committed (SQLITE_BUSY_SNAPSHOT,
        // returned at once, no busy wait): concurrent callbacks failed with "database is locked".
        let begin = match self {
            Database::Postgres(_) => "BEGIN",
            Database::Sqlite(..) => "BEGIN IMMEDIATE",
        };
        with_writer!(self, pool => {
            let mut tx = Box::pin(pool.begin_with(begin)).await?;
            let existing: Option<Row> = sqlx::query_as(&find_sql)
                .bind(connection.user_id)
                .bind(connection.provider)
                .bind(connection.provider_account_id)
                .fetch_optional(&mut *tx)
                .await?;
            let (proposed, requested) = match &existing {
                Some(row) => (row.id, crate::oauth::union(&row.requested_scopes.0, connection.requested_scopes)),
                None => (connection.proposed_id, connection.requested_scopes.to_vec()),
            };
            let stored: Row = sqlx::query_as(&upsert_sql)
                .bind(proposed)
                .bind(connection.user_id)
                .bind(connection.provider)
                .bind(connection.provider_account_id)
                .bind(connection.account_email)
                .bind(connection.account_name)
                .bind(Json(connection.account_metadata))
                .bind(Json(connection.granted_scopes))
                .bind(Json(&requested))
                .bind(connection.now)
                .fetch_one(&mut *tx)
                .await?;
            // The row as stored: on PostgreSQL another callback for the same account may have
            // inserted it since the read above (the upsert then updated theirs).
            let id = stored.id;
            // An existing row keeps its id: only a row this call inserted has the proposed one.
            let created = id == connection.proposed_id;
            crate::storage::state::record_result_query!(connection.authorization_id, Some(id), None)
                .execute(&mut *tx)
                .await?;
            let previous: Option<SealedTokens> = if created {
                None
            } else {
                sqlx::query_as(&tokens_sql).bind(id).fetch_optional(&mut *tx).await?
            };
            let tokens = seal_tokens(id, previous.as_ref())?;
            crate::storage::tokens::upsert_tokens_query!(&tokens).fetch_one(&mut *tx).await?;
            consent.integration_id = Some(id);
            crate::storage::consents::insert_consent_query!(consent).execute(&mut *tx).await?;
            let integration = Integration::try_from(stored)?;
            tx.commit().await?;
            Ok(SavedConnection { integration, created })
        })
    }
}

impl Database {
    /// Sets the status; `error` (when given) becomes the last error.
    pub async fn set_integration_status(
        &self,
        id: Uuid,
        status: IntegrationStatus,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> StorageResult<()> {
        let sql = "UPDATE oauth_integrations SET status = $2, updated_at = $3, \
                   last_error = COALESCE($4, last_error), \
                   last_error_at = CASE WHEN $4 IS NULL THEN last_error_at ELSE $3 END WHERE id = $1";
        with_writer!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(status.as_str())
            .bind(now)
            .bind(error)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// The provider reported a different granted set (a scope revoked at the provider, say).
    pub async fn set_granted_scopes(
        &self,
        id: Uuid,
        scopes: &[String],
        now: DateTime<Utc>,
    ) -> StorageResult<()> {
        let sql =
            "UPDATE oauth_integrations SET granted_scopes = $2, updated_at = $3 WHERE id = $1";
        with_writer!(self, pool => sqlx::query(sql).bind(id).bind(Json(scopes)).bind(now).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// A failure that leaves the status as it is (transient, or our own configuration).
    pub async fn record_integration_error(
        &self,
        id: Uuid,
        error: &str,
        now: DateTime<Utc>,
    ) -> StorageResult<()> {
        let sql = "UPDATE oauth_integrations SET last_error = $2, last_error_at = $3 WHERE id = $1";
        with_writer!(self, pool => sqlx::query(sql).bind(id).bind(error).bind(now).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Disconnects locally in one transaction: the integration becomes `revoked` and its tokens
    /// are queued for revocation at the provider (or deleted when `queue` is false).
    pub async fn disconnect_integration(
        &self,
        id: Uuid,
        queue: bool,
        now: DateTime<Utc>,
    ) -> StorageResult<()> {
        let status_sql =
            "UPDATE oauth_integrations SET status = 'revoked', updated_at = $2 WHERE id = $1";
        let tokens_sql = if queue {
            "UPDATE oauth_tokens SET revoke_requested_at = $2, revoke_not_before = $2, \
             lease_owner = NULL, lease_until = NULL WHERE integration_id = $1"
        } else {
            "DELETE FROM oauth_tokens WHERE integration_id = $1 AND $2 IS NOT NULL"
        };
        with_writer!(self, pool => {
            let mut tx = Box::pin(pool.begin()).await?;
            sqlx::query(status_sql).bind(id).bind(now).execute(&mut *tx).await?;
            sqlx::query(tokens_sql).bind(id).bind(now).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

/// What an erasure deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ErasedRows {
    pub integrations: u64,
    pub tokens: u64,
    pub consents: u64,
    pub pending_authorizations: u64,
}

impl Database {
    /// Deletes everything stored about a user except the audit log, in one transaction.
    pub async fn erase_user_data(&self, user_id: &str) -> StorageResult<ErasedRows> {
        let statements = [
            "DELETE FROM oauth_state WHERE user_id = $1",
            "DELETE FROM oauth_consents WHERE user_id = $1",
            "DELETE FROM oauth_tokens WHERE integration_id IN \
             (SELECT id FROM oauth_integrations WHERE user_id = $1)",
            "DELETE FROM oauth_integrations WHERE user_id = $1",
        ];
        with_writer!(self, pool => {
            let mut tx = Box::pin(pool.begin()).await?;
            let mut counts = [0u64; 4];
            for (count, sql) in counts.iter_mut().zip(statements) {
                *count = sqlx::query(sql).bind(user_id).execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(ErasedRows {
                pending_authorizations: counts[0],
                consents: counts[1],
                tokens: counts[2],
                integrations: counts[3],
            })
        })
    }
}
