//! `oauth_tokens`: the sealed token set of one integration (one row per integration).
//!
//! Values arrive here already sealed (see `services::vault`); this module never sees plaintext.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::integrations::IntegrationStatus;
use super::{with_pool, with_writer, Database, StorageError, StorageResult};

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
    /// Consecutive transient refresh failures (drives the back-off).
    pub refresh_failures: i32,
    /// No refresh before this time (back-off after a failure, or not due yet).
    pub refresh_not_before: Option<DateTime<Utc>>,
}

/// A token row with the user id of its integration.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OwnedSealedTokens {
    #[sqlx(flatten)]
    pub tokens: SealedTokens,
    pub user_id: String,
}

#[derive(sqlx::FromRow)]
struct TokensWithStatus {
    #[sqlx(flatten)]
    tokens: SealedTokens,
    status: String,
}

pub(crate) const UPSERT_SQL: &str = "INSERT INTO oauth_tokens (integration_id, key_id, access_token, \
    refresh_token, id_token, token_type, expires_at, refresh_token_expires_at, generation, created_at, \
    updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9) \
    ON CONFLICT (integration_id) DO UPDATE SET key_id = excluded.key_id, \
    access_token = excluded.access_token, refresh_token = excluded.refresh_token, \
    id_token = excluded.id_token, token_type = excluded.token_type, expires_at = excluded.expires_at, \
    refresh_token_expires_at = excluded.refresh_token_expires_at, \
    generation = oauth_tokens.generation + 1, updated_at = excluded.updated_at, \
    lease_owner = NULL, lease_until = NULL, refresh_failures = 0, refresh_not_before = NULL, \
    revoke_requested_at = NULL, revoke_attempts = 0, revoke_not_before = NULL, \
    revoke_last_error = NULL RETURNING generation";

/// A query with a token row's values bound as `$1` to `$9`, in the order [`UPSERT_SQL`] and
/// the refresh's `UPDATE` both take them.
macro_rules! bind_token_row {
    ($query:expr, $tokens:expr) => {{
        let tokens: &$crate::storage::tokens::SealedTokens = $tokens;
        $query
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
pub(crate) use bind_token_row;

/// The upsert of a token row, bound and ready for any executor (pool or transaction).
macro_rules! upsert_tokens_query {
    ($tokens:expr) => {
        $crate::storage::tokens::bind_token_row!(
            sqlx::query_scalar::<_, i64>($crate::storage::tokens::UPSERT_SQL),
            $tokens
        )
    };
}
pub(crate) use upsert_tokens_query;

pub(crate) const COLUMNS: &str =
    "integration_id, key_id, access_token, refresh_token, id_token, token_type, \
    expires_at, refresh_token_expires_at, generation, created_at, updated_at, refresh_failures, refresh_not_before";

/// [`COLUMNS`] of `oauth_tokens` aliased `t`, for reads joined with `oauth_integrations i`.
pub(super) fn joined_columns() -> String {
    super::prefixed(COLUMNS, "t")
}

/// What a refresher saw before asking for the lease ([`Database::lease_unchanged_tokens`]).
#[derive(Debug, Clone, Copy)]
pub struct LeaseCheck<'a> {
    pub generation: i64,
    pub now: DateTime<Utc>,
    /// False for a refresh the caller's API request forces (a token the provider rejected):
    /// a back-off does not stop it.
    pub honour_backoff: bool,
    /// The owner prefix of this process's leases. The caller holds this process's lock of the
    /// integration, so none of them is in use: a lease of a refresher that died with its task,
    /// or the background worker's claim, whose refresh waits for that same lock (waiting for
    /// the claim would deadlock with it).
    pub ours: &'a str,
}

/// The row is as the refresher saw it: $1 integration, $4 now, $5 generation, $6 "ignore the
/// back-off".
macro_rules! unchanged {
    () => {
        "generation = $5 AND revoke_requested_at IS NULL \
         AND ($6 OR refresh_not_before IS NULL OR refresh_not_before <= $4) \
         AND EXISTS (SELECT 1 FROM oauth_integrations i WHERE i.id = $1 \
         AND i.status IN ('active', 'error'))"
    };
}

/// The claim of [`Database::claim_due_refreshes`]; `lock` is PostgreSQL's row-locking clause.
///
/// `CROSS JOIN` fixes the join order on SQLite (tokens first, walked in `expires_at` order, so
/// the scan stops after `LIMIT` due rows). Left to itself, SQLite's planner started from the
/// integrations' status index: every claim visited every active integration and sorted them,
/// with the write lock held — with 100,000 integrations that was what the background refresh
/// spent its time on. PostgreSQL plans a cross join with a join condition like any join.
fn claim_sql(lock: &str) -> String {
    let candidates = "SELECT t.integration_id FROM oauth_tokens t \
         CROSS JOIN oauth_integrations i \
         WHERE i.id = t.integration_id AND i.status = 'active' \
         AND t.revoke_requested_at IS NULL \
         AND t.refresh_token IS NOT NULL AND t.expires_at IS NOT NULL AND t.expires_at <= $3 \
         AND (t.lease_until IS NULL OR t.lease_until <= $4) \
         AND (t.refresh_not_before IS NULL OR t.refresh_not_before <= $4) \
         ORDER BY t.expires_at LIMIT $5";
    format!(
        "UPDATE oauth_tokens SET lease_owner = $1, lease_until = $2 \
         WHERE integration_id IN ({candidates}{lock}) \
         AND (lease_until IS NULL OR lease_until <= $4) RETURNING integration_id"
    )
}

impl Database {
    /// Inserts or replaces the token set of an integration; the stored generation becomes
    /// one more than the previous one (1 for a new row).
    pub async fn upsert_tokens(&self, tokens: &SealedTokens) -> StorageResult<i64> {
        Ok(with_writer!(self, pool => upsert_tokens_query!(tokens).fetch_one(pool).await)?)
    }

    pub async fn get_tokens(&self, integration_id: Uuid) -> StorageResult<Option<SealedTokens>> {
        let sql = format!("SELECT {COLUMNS} FROM oauth_tokens WHERE integration_id = $1");
        Ok(with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(integration_id)
            .fetch_optional(pool)
            .await)?)
    }

    /// The token row with its integration's current status, in one read (a refresh decides
    /// on both, and on a crowded machine every round trip is a wait for a core).
    pub async fn get_tokens_and_status(
        &self,
        integration_id: Uuid,
    ) -> StorageResult<Option<(SealedTokens, IntegrationStatus)>> {
        let columns = joined_columns();
        let sql = format!(
            "SELECT {columns}, i.status FROM oauth_tokens t \
             JOIN oauth_integrations i ON i.id = t.integration_id WHERE t.integration_id = $1"
        );
        let row: Option<TokensWithStatus> = with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(integration_id)
            .fetch_optional(pool)
            .await)?;
        row.map(|row| {
            let status = row.status.parse().map_err(StorageError::Corrupt)?;
            Ok((row.tokens, status))
        })
        .transpose()
    }

    /// The token rows of those integrations among `ids` that have tokens, in no particular order.
    pub async fn get_tokens_of(&self, ids: &[Uuid]) -> StorageResult<Vec<SealedTokens>> {
        let select = format!("SELECT {COLUMNS} FROM oauth_tokens WHERE integration_id");
        self.rows_with_ids(&select, ids).await
    }

    /// Up to `limit` token rows sealed under a key other than `active_key_id`, with their owner
    /// (part of the associated data needed to open them).
    pub async fn tokens_not_under_key(
        &self,
        active_key_id: &str,
        limit: i64,
    ) -> StorageResult<Vec<OwnedSealedTokens>> {
        let columns = joined_columns();
        let sql = format!(
            "SELECT {columns}, i.user_id FROM oauth_tokens t \
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
        let result = with_writer!(self, pool => sqlx::query(sql)
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

/// A token row queued for revocation at its provider, with what is needed to do it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct QueuedRevocation {
    #[sqlx(flatten)]
    pub tokens: SealedTokens,
    pub user_id: String,
    pub provider: String,
    pub revoke_attempts: i32,
}

impl Database {
    /// Takes the refresh lease of an integration's tokens if nobody else holds a live one.
    /// Each acquisition has its own owner token, so nobody can release or re-take a lease
    /// that is not theirs; leases whose owner starts with `ours` count as free (see
    /// [`LeaseCheck::ours`]).
    pub async fn try_lease_tokens(
        &self,
        integration_id: Uuid,
        owner: &str,
        ours: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        let sql = "UPDATE oauth_tokens SET lease_owner = $2, lease_until = $3 \
                   WHERE integration_id = $1 AND revoke_requested_at IS NULL \
                   AND (lease_until IS NULL OR lease_until <= $4 \
                   OR substr(lease_owner, 1, length($5)) = $5)";
        let affected = with_writer!(self, pool => sqlx::query(sql)
            .bind(integration_id)
            .bind(owner)
            .bind(until)
            .bind(now)
            .bind(ours)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(affected == 1)
    }

    /// Takes the refresh lease of a token row that is still as the caller last read it:
    /// generation `seen.generation`, integration active (or in error), not being disconnected,
    /// not leased by anyone else, and (with `seen.honour_backoff`) not backing off. One statement checks what
    /// a refresher would otherwise re-read after taking the lease; false when anything changed.
    pub async fn lease_unchanged_tokens(
        &self,
        integration_id: Uuid,
        owner: &str,
        seen: LeaseCheck<'_>,
        until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        let sql = concat!(
            "UPDATE oauth_tokens SET lease_owner = $2, lease_until = $3 \
             WHERE integration_id = $1 AND (lease_until IS NULL OR lease_until <= $4 \
             OR substr(lease_owner, 1, length($7)) = $7) AND ",
            unchanged!()
        );
        let affected = with_writer!(self, pool => sqlx::query(sql)
            .bind(integration_id)
            .bind(owner)
            .bind(until)
            .bind(seen.now)
            .bind(seen.generation)
            .bind(!seen.honour_backoff)
            .bind(seen.ours)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(affected == 1)
    }

    /// Hands a held lease (the worker's claim) over to a new owner, atomically: no one else
    /// can slip in between. False when `from` no longer holds it, or when the row changed
    /// since `seen` (as [`Database::lease_unchanged_tokens`] checks).
    pub async fn transfer_token_lease(
        &self,
        integration_id: Uuid,
        from: &str,
        to: &str,
        seen: LeaseCheck<'_>,
        until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        // $2 is `from` here; the shared conditions only use $1 and $4 to $6.
        let sql = concat!(
            "UPDATE oauth_tokens SET lease_owner = $7, lease_until = $3 \
             WHERE integration_id = $1 AND lease_owner = $2 AND ",
            unchanged!()
        );
        let affected = with_writer!(self, pool => sqlx::query(sql)
            .bind(integration_id)
            .bind(from)
            .bind(until)
            .bind(seen.now)
            .bind(seen.generation)
            .bind(!seen.honour_backoff)
            .bind(to)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(affected == 1)
    }

    /// Whether `owner` still holds the lease of a row unchanged since `seen` (as
    /// [`Database::lease_unchanged_tokens`] checks), until at least `held_until`. A read, not
    /// a write: the worker's claim is kept as the refresh's lease when it has that much time
    /// left, which saves the background refresher one write per refresh (its rate on SQLite
    /// is bound by writes). No one can take a held lease meanwhile: other processes wait for
    /// it to end, and this process's own refreshes of the row wait for its lock, which the
    /// caller holds.
    pub async fn holds_unchanged_lease(
        &self,
        integration_id: Uuid,
        owner: &str,
        seen: LeaseCheck<'_>,
        held_until: DateTime<Utc>,
    ) -> StorageResult<bool> {
        let sql = concat!(
            "SELECT 1 FROM oauth_tokens \
             WHERE integration_id = $1 AND lease_owner = $2 AND lease_until >= $3 AND ",
            unchanged!()
        );
        let held: Option<i32> = with_pool!(self, pool => sqlx::query_scalar(sql)
            .bind(integration_id)
            .bind(owner)
            .bind(held_until)
            .bind(seen.now)
            .bind(seen.generation)
            .bind(!seen.honour_backoff)
            .fetch_optional(pool)
            .await)?;
        Ok(held.is_some())
    }

    /// Gives the lease back without changing the tokens (nothing to refresh after all).
    pub async fn release_token_lease(
        &self,
        integration_id: Uuid,
        owner: &str,
    ) -> StorageResult<()> {
        let sql = "UPDATE oauth_tokens SET lease_owner = NULL, lease_until = NULL \
                   WHERE integration_id = $1 AND lease_owner = $2";
        with_writer!(self, pool => sqlx::query(sql).bind(integration_id).bind(owner).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Stores refreshed tokens and releases the lease in one statement. Deliberately not
    /// conditional on still holding the lease: a rotated refresh token is the only one that
    /// works now, and losing it would lose the connection.
    ///
    /// The integration's `last_refreshed_at` is set (and its last error cleared) in the same
    /// transaction: one write per refresh, which is what bounds the background refresher's
    /// rate on SQLite's single writer (refreshes ending together share one:
    /// [`crate::services::refresh_commits`]).
    pub async fn store_refreshed_tokens(
        &self,
        tokens: &SealedTokens,
    ) -> StorageResult<Option<i64>> {
        let stored = self.store_refreshed_tokens_together(&[tokens]).await?;
        Ok(stored.into_iter().next().flatten())
    }

    /// [`Database::store_refreshed_tokens`] for several integrations in one transaction (all
    /// or none); one generation (or `None`) per row, in order. The integrations must differ.
    pub async fn store_refreshed_tokens_together(
        &self,
        rows: &[&SealedTokens],
    ) -> StorageResult<Vec<Option<i64>>> {
        match self {
            Database::Postgres(pool) => store_refreshed_on_postgres(pool, rows).await,
            Database::Sqlite(pool, gate) => {
                let _turn = gate.enter().await;
                Ok(store_refreshed_on_sqlite(pool, rows).await?)
            }
        }
    }

    /// No refresh attempt before `not_before` (not due yet, or backing off), without counting
    /// a failure.
    pub async fn defer_refresh(
        &self,
        integration_id: Uuid,
        not_before: DateTime<Utc>,
    ) -> StorageResult<()> {
        let sql = "UPDATE oauth_tokens SET refresh_not_before = $2 WHERE integration_id = $1";
        with_writer!(self, pool => sqlx::query(sql).bind(integration_id).bind(not_before).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// A transient refresh failure: release the lease and back off until `not_before`.
    pub async fn record_refresh_failure(
        &self,
        integration_id: Uuid,
        owner: &str,
        not_before: DateTime<Utc>,
    ) -> StorageResult<()> {
        let sql = "UPDATE oauth_tokens SET refresh_failures = refresh_failures + 1, \
                   refresh_not_before = $3, lease_owner = NULL, lease_until = NULL \
                   WHERE integration_id = $1 AND lease_owner = $2";
        with_writer!(self, pool => sqlx::query(sql)
            .bind(integration_id)
            .bind(owner)
            .bind(not_before)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Leases up to `limit` active integrations whose tokens expire before `due_before`, for
    /// the background refresher. Replicas never claim the same row: PostgreSQL skips rows
    /// another claimer has locked, and the lease condition is re-checked on the locked row.
    pub async fn claim_due_refreshes(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        due_before: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> StorageResult<Vec<Uuid>> {
        let ids = match self {
            Database::Postgres(pool) => {
                sqlx::query_scalar(&claim_sql(" FOR UPDATE OF t SKIP LOCKED"))
                    .bind(owner)
                    .bind(lease_until)
                    .bind(due_before)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
            // SQLite serialises writers, so the claim is atomic as it stands.
            Database::Sqlite(pool, gate) => {
                let _turn = gate.enter().await;
                sqlx::query_scalar(&claim_sql(""))
                    .bind(owner)
                    .bind(lease_until)
                    .bind(due_before)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
        };
        Ok(ids)
    }

    /// Revocations whose next attempt is due.
    pub async fn due_revocations(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> StorageResult<Vec<QueuedRevocation>> {
        let columns = joined_columns();
        let sql = format!(
            "SELECT {columns}, i.user_id, i.provider, t.revoke_attempts FROM oauth_tokens t \
             JOIN oauth_integrations i ON i.id = t.integration_id \
             WHERE t.revoke_requested_at IS NOT NULL AND t.revoke_not_before <= $1 \
             ORDER BY t.revoke_not_before LIMIT $2"
        );
        Ok(
            with_pool!(self, pool => sqlx::query_as(&sql).bind(now).bind(limit).fetch_all(pool).await)?,
        )
    }

    /// A failed revocation attempt: try again at `not_before`.
    pub async fn postpone_revocation(
        &self,
        integration_id: Uuid,
        generation: i64,
        not_before: DateTime<Utc>,
        error: &str,
    ) -> StorageResult<()> {
        let sql = "UPDATE oauth_tokens SET revoke_attempts = revoke_attempts + 1, \
                   revoke_not_before = $2, revoke_last_error = $3 \
                   WHERE integration_id = $1 AND revoke_requested_at IS NOT NULL AND generation = $4";
        with_writer!(self, pool => sqlx::query(sql)
            .bind(integration_id)
            .bind(not_before)
            .bind(error)
            .bind(generation)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Deletes a queued token row once its revocation is settled — only if it is still the
    /// queued row seen (`generation`): a reconnect meanwhile replaced it with live tokens.
    pub async fn delete_queued_tokens(
        &self,
        integration_id: Uuid,
        generation: i64,
    ) -> StorageResult<bool> {
        let sql = "DELETE FROM oauth_tokens WHERE integration_id = $1 AND generation = $2 \
                   AND revoke_requested_at IS NOT NULL";
        let deleted = with_writer!(self, pool => sqlx::query(sql)
            .bind(integration_id)
            .bind(generation)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(deleted == 1)
    }

    /// Deletes an integration's tokens (after revocation, or when nothing is left to revoke):
    /// the sealed values are gone for good.
    pub async fn delete_tokens(&self, integration_id: Uuid) -> StorageResult<()> {
        let sql = "DELETE FROM oauth_tokens WHERE integration_id = $1";
        with_writer!(self, pool => sqlx::query(sql).bind(integration_id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }
}

/// Refreshed tokens of many integrations in one statement: the rows as arrays, `unnest`ed.
/// One round trip, and one statement text for every batch size (so one prepared statement).
const PG_STORE_REFRESHED_SQL: &str = "WITH v AS (SELECT * FROM unnest($1::uuid[], $2::text[], \
    $3::bytea[], $4::bytea[], $5::bytea[], $6::text[], $7::timestamptz[], $8::timestamptz[], \
    $9::timestamptz[]) AS v(integration_id, key_id, access_token, refresh_token, id_token, \
    token_type, expires_at, refresh_token_expires_at, updated_at)), \
    t AS (UPDATE oauth_tokens o SET key_id = v.key_id, access_token = v.access_token, \
    refresh_token = v.refresh_token, id_token = v.id_token, token_type = v.token_type, \
    expires_at = v.expires_at, refresh_token_expires_at = v.refresh_token_expires_at, \
    updated_at = v.updated_at, generation = o.generation + 1, lease_owner = NULL, \
    lease_until = NULL, refresh_failures = 0, refresh_not_before = NULL \
    FROM v WHERE o.integration_id = v.integration_id \
    RETURNING o.integration_id, o.generation, v.updated_at), \
    i AS (UPDATE oauth_integrations SET last_refreshed_at = t.updated_at, \
    updated_at = t.updated_at, last_error = NULL, last_error_at = NULL \
    FROM t WHERE oauth_integrations.id = t.integration_id) \
    SELECT integration_id, generation FROM t";

async fn store_refreshed_on_postgres(
    pool: &sqlx::PgPool,
    rows: &[&SealedTokens],
) -> StorageResult<Vec<Option<i64>>> {
    fn column<'r, T>(rows: &[&'r SealedTokens], pick: fn(&'r SealedTokens) -> T) -> Vec<T> {
        rows.iter().map(|row| pick(row)).collect()
    }
    let stored: Vec<(Uuid, i64)> = sqlx::query_as(PG_STORE_REFRESHED_SQL)
        .bind(column(rows, |row| row.integration_id))
        .bind(column(rows, |row| row.key_id.as_str()))
        .bind(column(rows, |row| row.access_token.as_slice()))
        .bind(column(rows, |row| row.refresh_token.as_deref()))
        .bind(column(rows, |row| row.id_token.as_deref()))
        .bind(column(rows, |row| row.token_type.as_str()))
        .bind(column(rows, |row| row.expires_at))
        .bind(column(rows, |row| row.refresh_token_expires_at))
        .bind(column(rows, |row| row.updated_at))
        .fetch_all(pool)
        .await?;
    let stored: HashMap<Uuid, i64> = stored.into_iter().collect();
    Ok(rows
        .iter()
        .map(|row| stored.get(&row.integration_id).copied())
        .collect())
}

/// SQLite has no arrays: one statement per row, in one transaction (the caller holds the
/// write gate). In process, a statement costs no network round trip.
async fn store_refreshed_on_sqlite(
    pool: &sqlx::SqlitePool,
    rows: &[&SealedTokens],
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    let sql = "UPDATE oauth_tokens SET key_id = $2, access_token = $3, refresh_token = $4, \
               id_token = $5, token_type = $6, expires_at = $7, refresh_token_expires_at = $8, \
               updated_at = $9, generation = generation + 1, lease_owner = NULL, \
               lease_until = NULL, refresh_failures = 0, refresh_not_before = NULL \
               WHERE integration_id = $1 RETURNING generation";
    let mut tx = Box::pin(pool.begin()).await?;
    let mut generations = Vec::with_capacity(rows.len());
    for tokens in rows {
        let generation: Option<i64> = bind_token_row!(sqlx::query_scalar(sql), tokens)
            .fetch_optional(&mut *tx)
            .await?;
        if generation.is_some() {
            sqlx::query(super::integrations::MARK_REFRESHED_SQL)
                .bind(tokens.integration_id)
                .bind(tokens.updated_at)
                .execute(&mut *tx)
                .await?;
        }
        generations.push(generation);
    }
    tx.commit().await?;
    Ok(generations)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The claim walks the tokens' `expires_at` index and stops at its limit: no full scan of
    /// the integrations, no sort (it did both before, BENCHMARKS.md).
    #[tokio::test]
    async fn the_sqlite_claim_walks_the_expiry_index_without_sorting() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}", dir.path().join("plan.db").display());
        let db = Database::connect(&url, crate::storage::PoolSettings::default_for(&url))
            .await
            .expect("connect");
        db.migrate().await.expect("migrate");
        let Database::Sqlite(pool, _) = &db else {
            panic!("a SQLite URL gives SQLite");
        };
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {}", claim_sql("")))
                .bind("owner")
                .bind(Utc::now())
                .bind(Utc::now())
                .bind(Utc::now())
                .bind(500)
                .fetch_all(pool)
                .await
                .expect("plan");
        let steps: Vec<&str> = plan.iter().map(|(.., step)| step.as_str()).collect();
        assert!(
            steps
                .iter()
                .any(|step| step.contains("SEARCH t USING INDEX oauth_tokens_expires_idx")),
            "{steps:?}"
        );
        assert!(
            !steps.iter().any(|step| step.contains("TEMP B-TREE")),
            "{steps:?}"
        );
        db.close().await;
    }
}
