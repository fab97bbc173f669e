//! `oauth_audit_log`: append-only record of who did what to which integration. Never holds
//! token values.
//!
//! Rows form hash chains; what the hash covers, why chains are per user and what verification
//! can and cannot prove is documented in [`crate::services::audit`], which computes the hashes
//! and passes them in as closures. This module only stores, under these rules:
//!
//! - Every chained write (append, genesis, pruning) runs in one transaction holding the chain's
//!   lock: on PostgreSQL `pg_advisory_xact_lock(hashtextextended(chain, 0))` inside a READ
//!   COMMITTED transaction (so the head read after the lock is granted sees the previous
//!   holder's commit, whatever the server's default isolation); on SQLite a transaction begun
//!   with `BEGIN IMMEDIATE` (SQLite has one writer at a time, and a deferred transaction that
//!   reads and then writes cannot upgrade safely: it fails with SQLITE_BUSY instead of waiting).
//! - The unique index on `(chain, chain_seq)` backs the lock up: even if locking failed, two
//!   appenders could not fork a chain (one insert would fail).

use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{with_pool, with_writer, Database, Page, Paged, StorageError, StorageResult};

/// The chain holding the single genesis row (which carries the digest salt).
pub const GENESIS_CHAIN: &str = "genesis";
/// The chain of events that concern no user.
pub const SYSTEM_CHAIN: &str = "system";
/// Action of the genesis row.
pub const GENESIS_ACTION: &str = "audit_genesis";
/// Action of a pruning checkpoint row.
pub const CHECKPOINT_ACTION: &str = "audit_pruned";
/// SHA-256 output length.
pub const HASH_LEN: usize = 32;
/// The `prev_hash` of the first row of every chain.
pub const ZERO_HASH: [u8; HASH_LEN] = [0; HASH_LEN];

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

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "success" => Some(Outcome::Success),
            "failure" => Some(Outcome::Failure),
            "denied" => Some(Outcome::Denied),
            _ => None,
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

impl AuditEvent {
    /// The event as it was appended (`None` when the stored outcome is not one of ours).
    pub fn to_new_event(&self) -> Option<NewAuditEvent> {
        Some(NewAuditEvent {
            occurred_at: self.occurred_at,
            actor_user_id: self.actor_user_id.clone(),
            subject_user_id: self.subject_user_id.clone(),
            integration_id: self.integration_id,
            provider: self.provider.clone(),
            action: self.action.clone(),
            outcome: Outcome::parse(&self.outcome)?,
            reason: self.reason.clone(),
            request_id: self.request_id.clone(),
            client_ip: self.client_ip.clone(),
            user_agent: self.user_agent.clone(),
            details: self.details.0.clone(),
        })
    }
}

/// A stored row with its chain columns, as `audit verify` reads it. The chain columns are
/// `None` only on rows that were never chained (or were tampered with).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ChainedAuditRow {
    #[sqlx(flatten)]
    pub event: AuditEvent,
    pub chain: Option<String>,
    pub chain_seq: Option<i64>,
    pub prev_hash: Option<Vec<u8>>,
    pub row_hash: Option<Vec<u8>>,
}

/// The position a row is appended at: what its hash covers besides the event itself.
#[derive(Debug, Clone, Copy)]
pub struct ChainLink<'a> {
    pub chain: &'a str,
    pub seq: i64,
    pub prev_hash: &'a [u8],
}

/// The service's hash of a row at a position (see `services::audit::row_hash`).
pub type RowHasher<'a> = &'a (dyn Fn(&ChainLink<'_>, &NewAuditEvent) -> Vec<u8> + Send + Sync);

/// The service's chain key of an event (see `services::audit::chain_key`).
pub type ChainOf<'a> = &'a (dyn Fn(&NewAuditEvent) -> String + Send + Sync);

/// A reader of the whole log, as [`Database::walk_audit_log`] shows it.
pub trait AuditWalk {
    /// Called first: the genesis row (if any), how many rows sit outside every chain (no chain
    /// or no position) and the lowest id among them.
    fn start(
        &mut self,
        genesis: Option<&ChainedAuditRow>,
        unchained: u64,
        first_unchained: Option<i64>,
    );
    /// Then every chained row, in `(chain, chain_seq)` order.
    fn row(&mut self, row: &ChainedAuditRow);
}

/// What one pruning removed from a chain; the checkpoint row records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunedRange {
    /// Rows with `chain_seq <= through_seq` were deleted.
    pub through_seq: i64,
    /// `row_hash` of the deleted row `through_seq`: the `prev_hash` of the next row.
    pub last_hash: Vec<u8>,
    pub rows: u64,
}

/// Filters of [`Database::list_audit_events_filtered`]; `None` means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Events about this user.
    pub subject_user_id: Option<String>,
    pub integration_id: Option<Uuid>,
    pub action: Option<String>,
    /// Events at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Events strictly before this time.
    pub to: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "occurred_at, actor_user_id, subject_user_id, integration_id, provider, \
    action, outcome, reason, request_id, client_ip, user_agent, details";

const CHAIN_COLUMNS: &str = "chain, chain_seq, prev_hash, row_hash";

const INSERT_SQL: &str = "INSERT INTO oauth_audit_log (occurred_at, actor_user_id, \
    subject_user_id, integration_id, provider, action, outcome, reason, request_id, client_ip, \
    user_agent, details, chain, chain_seq, prev_hash, row_hash) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING id";

/// The newest row of a chain.
const HEAD_SQL: &str = "SELECT chain_seq, row_hash FROM oauth_audit_log WHERE chain = $1 \
    ORDER BY chain_seq DESC LIMIT 1";

/// Takes the locks of the chains in `$1`, in the array's order (a function scan of `unnest`
/// yields the elements in order).
const PG_CHAIN_LOCKS_SQL: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended(chain, 0)) FROM unnest($1::text[]) AS chain";

const INSERT_COLUMNS: &str = "occurred_at, actor_user_id, subject_user_id, integration_id, \
    provider, action, outcome, reason, request_id, client_ip, user_agent, details, chain, \
    chain_seq, prev_hash, row_hash";
const INSERT_COLUMN_COUNT: usize = 16;
/// Rows per multi-row INSERT on SQLite. Small on purpose: binding costs sqlx time linear in
/// the statement's parameter count *per parameter* (it looks each one's name up, and SQLite
/// walks a list for that), so a statement of n rows costs O(n²). At 256 rows that lookup was a
/// quarter of the process's CPU under hand-out load; at 16 rows (256 parameters) it is noise.
const SQLITE_INSERT_CHUNK: usize = 16;

/// The head of each chain (`chain_seq`, `row_hash`) as a writer remembers it between batches.
/// A remembered head that another writer has moved on makes the next append collide on the
/// unique `(chain, chain_seq)` index; the writer then forgets its heads and retries.
pub type ChainHeads = HashMap<String, (i64, Vec<u8>)>;

/// Binds an audit row's sixteen columns, in `INSERT_COLUMNS` order, onto `$query`.
macro_rules! bind_audit_row {
    ($query:expr, $event:expr, $chain:expr, $seq:expr, $prev:expr, $hash:expr) => {{
        let event: &NewAuditEvent = $event;
        $query
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
            .bind(Json(&event.details))
            .bind($chain)
            .bind($seq)
            .bind($prev)
            .bind($hash)
    }};
}

/// A chained row ready to insert: chain, event, position, previous hash, own hash.
type ChainedRow<'a> = (&'a str, &'a NewAuditEvent, i64, Vec<u8>, Vec<u8>);

/// One statement inserting many chained rows, answering `(id, chain, chain_seq)` per row.
/// Each driver has its own form: PostgreSQL one fixed statement over arrays (parsed and
/// planned once per connection, whatever the batch size); SQLite a multi-row `VALUES`.
trait InsertChainedRows {
    async fn insert_chained_rows(
        self,
        rows: &[ChainedRow<'_>],
    ) -> StorageResult<Vec<(i64, String, i64)>>;
}

/// `INSERT … SELECT … FROM unnest(arrays)`: one statement text for every batch size, so the
/// connection's prepared statement serves every batch (a `VALUES` list of a new length is a
/// new statement to parse and plan, which cost PostgreSQL more than the inserts themselves).
const PG_UNNEST_INSERT_SQL: &str = "INSERT INTO oauth_audit_log (occurred_at, actor_user_id, \
    subject_user_id, integration_id, provider, action, outcome, reason, request_id, client_ip, \
    user_agent, details, chain, chain_seq, prev_hash, row_hash) \
    SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::uuid[], $5::text[], \
    $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::jsonb[], \
    $13::text[], $14::int8[], $15::bytea[], $16::bytea[]) \
    RETURNING id, chain, chain_seq";

impl InsertChainedRows for &mut sqlx::PgConnection {
    async fn insert_chained_rows(
        self,
        rows: &[ChainedRow<'_>],
    ) -> StorageResult<Vec<(i64, String, i64)>> {
        let column = |pick: fn(&NewAuditEvent) -> Option<&str>| -> Vec<Option<&str>> {
            rows.iter().map(|(_, event, ..)| pick(event)).collect()
        };
        let inserted = sqlx::query_as(PG_UNNEST_INSERT_SQL)
            .bind(
                rows.iter()
                    .map(|(_, e, ..)| e.occurred_at)
                    .collect::<Vec<_>>(),
            )
            .bind(column(|e| e.actor_user_id.as_deref()))
            .bind(column(|e| e.subject_user_id.as_deref()))
            .bind(
                rows.iter()
                    .map(|(_, e, ..)| e.integration_id)
                    .collect::<Vec<_>>(),
            )
            .bind(column(|e| e.provider.as_deref()))
            .bind(column(|e| Some(e.action.as_str())))
            .bind(column(|e| Some(e.outcome.as_str())))
            .bind(column(|e| e.reason.as_deref()))
            .bind(column(|e| e.request_id.as_deref()))
            .bind(column(|e| e.client_ip.as_deref()))
            .bind(column(|e| e.user_agent.as_deref()))
            .bind(
                rows.iter()
                    .map(|(_, e, ..)| Json(&e.details))
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|(chain, ..)| *chain).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, _, seq, ..)| *seq).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|(.., prev, _)| prev.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|(.., hash)| hash.as_slice())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(self)
            .await?;
        Ok(inserted)
    }
}

impl InsertChainedRows for &mut sqlx::SqliteConnection {
    async fn insert_chained_rows(
        self,
        rows: &[ChainedRow<'_>],
    ) -> StorageResult<Vec<(i64, String, i64)>> {
        let mut inserted = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(SQLITE_INSERT_CHUNK) {
            let sql = multi_row_insert_sql(chunk.len());
            let mut query = sqlx::query_as::<_, (i64, String, i64)>(&sql);
            for (chain, event, seq, prev_hash, row_hash) in chunk {
                query = bind_audit_row!(query, event, *chain, *seq, prev_hash, row_hash);
            }
            inserted.extend(query.fetch_all(&mut *self).await?);
        }
        Ok(inserted)
    }
}

/// `INSERT … VALUES (…), (…) … RETURNING id, chain, chain_seq` for `rows` rows.
fn multi_row_insert_sql(rows: usize) -> String {
    let mut sql = format!("INSERT INTO oauth_audit_log ({INSERT_COLUMNS}) VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..INSERT_COLUMN_COUNT {
            if column > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "${}", row * INSERT_COLUMN_COUNT + column + 1);
        }
        sql.push(')');
    }
    sql.push_str(" RETURNING id, chain, chain_seq");
    sql
}

/// Rows per round trip when the storage layer walks rows inside a transaction.
const BATCH: i64 = 500;

/// The insert of a (chained or not) audit row, bound and ready for any executor.
macro_rules! insert_query {
    ($event:expr, $chain:expr, $seq:expr, $prev:expr, $hash:expr) => {
        bind_audit_row!(
            sqlx::query_scalar::<_, i64>(INSERT_SQL),
            $event,
            $chain,
            $seq,
            $prev,
            $hash
        )
    };
}

/// Runs `$body` inside a write transaction, bound to `$tx`, holding the chain locks of the
/// chains in `$lock` (a sorted slice); commits when the body completes (an early `return` or `?` rolls back).
/// The body is compiled once per driver.
macro_rules! with_write_tx {
    ($db:expr, $lock:expr, $tx:ident => $body:expr) => {
        match $db {
            Database::Postgres(pool) => {
                let locks: &[&str] = $lock;
                let mut $tx =
                    Box::pin(pool.begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")).await?;
                // Callers pass chains sorted: two transactions taking overlapping sets in the
                // same order cannot deadlock. One round trip for all of them.
                if !locks.is_empty() {
                    sqlx::query(PG_CHAIN_LOCKS_SQL)
                        .bind(locks)
                        .execute(&mut *$tx)
                        .await?;
                }
                let value = $body;
                $tx.commit().await?;
                value
            }
            Database::Sqlite(pool, gate) => {
                // One writer at a time: the immediate transaction is the (database-wide) lock.
                let _: &[&str] = $lock;
                let _turn = gate.enter().await;
                let mut $tx = Box::pin(pool.begin_with("BEGIN IMMEDIATE")).await?;
                let value = $body;
                $tx.commit().await?;
                value
            }
        }
    };
}

/// Runs `$body` inside a read-only transaction bound to `$tx` that sees one snapshot of the
/// database throughout (PostgreSQL REPEATABLE READ; SQLite in WAL mode keeps a read
/// transaction's snapshot until it ends).
macro_rules! with_read_tx {
    ($db:expr, $tx:ident => $body:expr) => {
        match $db {
            Database::Postgres(pool) => {
                let mut $tx =
                    Box::pin(pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
                        .await?;
                let value = $body;
                $tx.commit().await?;
                value
            }
            Database::Sqlite(pool, _) => {
                let mut $tx = Box::pin(pool.begin()).await?;
                let value = $body;
                $tx.commit().await?;
                value
            }
        }
    };
}

/// Appends `$event` after the head of `$chain`, inside a transaction holding the chain's
/// lock. Evaluates to `(id, seq, row_hash)` of the new row.
macro_rules! append_locked {
    ($tx:ident, $chain:expr, $event:expr, $hash:expr) => {{
        let chain: &str = $chain;
        let event: &NewAuditEvent = $event;
        let head: Option<(i64, Vec<u8>)> = sqlx::query_as(HEAD_SQL)
            .bind(chain)
            .fetch_optional(&mut *$tx)
            .await?;
        let (seq, prev_hash) = match head {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, ZERO_HASH.to_vec()),
        };
        let row_hash = ($hash)(
            &ChainLink {
                chain,
                seq,
                prev_hash: &prev_hash,
            },
            event,
        );
        let id = insert_query!(event, chain, seq, &prev_hash, &row_hash)
            .fetch_one(&mut *$tx)
            .await?;
        (id, seq, row_hash)
    }};
}

impl Database {
    /// Appends a row OUTSIDE every hash chain. Only for tests and imports of historical
    /// events: services write through `services::audit::record`, and `audit verify` reports
    /// unchained rows written after the chain's genesis as tampering.
    pub async fn append_audit_event(&self, event: &NewAuditEvent) -> StorageResult<i64> {
        let none: Option<&str> = None;
        let no_bytes: Option<Vec<u8>> = None;
        Ok(
            with_writer!(self, pool => insert_query!(event, none, None::<i64>, &no_bytes, &no_bytes)
            .fetch_one(pool)
            .await)?,
        )
    }

    /// Appends `events` (each with its chain), in order, in one transaction holding every
    /// chain's lock: the group commit of [`crate::services::audit_writer`]. Heads missing from
    /// `heads` are read; after the commit `heads` holds the new heads. Returns the row ids in
    /// the order of `events`.
    pub async fn append_chained_audit_events(
        &self,
        events: &[(String, NewAuditEvent)],
        hash: RowHasher<'_>,
        heads: &mut ChainHeads,
    ) -> StorageResult<Vec<i64>> {
        let mut chains: Vec<&str> = events.iter().map(|(chain, _)| chain.as_str()).collect();
        chains.sort_unstable();
        chains.dedup();
        let (ids, new_heads) = with_write_tx!(self, &chains, tx => {
            let mut batch_heads: HashMap<&str, (i64, Vec<u8>)> = HashMap::with_capacity(chains.len());
            for chain in &chains {
                let head = match heads.get(*chain) {
                    Some(head) => Some(head.clone()),
                    None => sqlx::query_as(HEAD_SQL).bind(*chain).fetch_optional(&mut *tx).await?,
                };
                batch_heads.insert(chain, head.unwrap_or((0, ZERO_HASH.to_vec())));
            }
            let mut rows = Vec::with_capacity(events.len());
            for (chain, event) in events {
                let (seq, prev_hash) = batch_heads
                    .get(chain.as_str())
                    .map(|(seq, hash)| (seq + 1, hash.clone()))
                    .unwrap_or((1, ZERO_HASH.to_vec()));
                let row_hash = hash(&ChainLink { chain, seq, prev_hash: &prev_hash }, event);
                batch_heads.insert(chain, (seq, row_hash.clone()));
                rows.push((chain.as_str(), event, seq, prev_hash, row_hash));
            }
            let mut ids_by_position: HashMap<(String, i64), i64> = HashMap::with_capacity(rows.len());
            for (id, chain, seq) in (&mut *tx).insert_chained_rows(&rows).await? {
                ids_by_position.insert((chain, seq), id);
            }
            // RETURNING gives no order guarantee: rows are matched by their chain position.
            let ids = rows
                .iter()
                .map(|(chain, _, seq, _, _)| {
                    ids_by_position.get(&((*chain).to_owned(), *seq)).copied().ok_or_else(|| {
                        StorageError::Corrupt(format!("no id returned for {chain}#{seq}"))
                    })
                })
                .collect::<StorageResult<Vec<i64>>>()?;
            let new_heads: Vec<(String, (i64, Vec<u8>))> = batch_heads
                .into_iter()
                .map(|(chain, head)| (chain.to_owned(), head))
                .collect();
            (ids, new_heads)
        });
        heads.extend(new_heads);
        Ok(ids)
    }

    /// The genesis row (seq 1 of the genesis chain), if the chain was started.
    pub async fn audit_genesis(&self) -> StorageResult<Option<ChainedAuditRow>> {
        let sql = format!(
            "SELECT id, {COLUMNS}, {CHAIN_COLUMNS} FROM oauth_audit_log \
             WHERE chain = $1 AND chain_seq = 1"
        );
        Ok(with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(GENESIS_CHAIN)
            .fetch_optional(pool)
            .await)?)
    }

    /// Starts the chains: appends `genesis` as seq 1 of the genesis chain unless a concurrent
    /// creator already did, then chains every row written before the chains existed (rows
    /// from before migration 0005), in id order, each into `chain_of(row)`. All in one
    /// transaction under the genesis chain's lock: no append can precede it, since appenders
    /// need the salt the genesis row carries. Returns the genesis row in place.
    pub async fn create_audit_genesis(
        &self,
        genesis: &NewAuditEvent,
        chain_of: ChainOf<'_>,
        hash: RowHasher<'_>,
    ) -> StorageResult<ChainedAuditRow> {
        let select_genesis = format!(
            "SELECT id, {COLUMNS}, {CHAIN_COLUMNS} FROM oauth_audit_log \
             WHERE chain = $1 AND chain_seq = 1"
        );
        let select_legacy = format!(
            "SELECT id, {COLUMNS} FROM oauth_audit_log WHERE chain IS NULL AND id > $1 \
             ORDER BY id LIMIT $2"
        );
        const ADOPT_SQL: &str = "UPDATE oauth_audit_log SET chain = $1, chain_seq = $2, \
            prev_hash = $3, row_hash = $4 WHERE id = $5";
        let row: ChainedAuditRow = with_write_tx!(self, &[GENESIS_CHAIN], tx => {
            let existing: Option<ChainedAuditRow> = sqlx::query_as(&select_genesis)
                .bind(GENESIS_CHAIN)
                .fetch_optional(&mut *tx)
                .await?;
            match existing {
                Some(row) => row,
                None => {
                    append_locked!(tx, GENESIS_CHAIN, genesis, hash);
                    let mut heads: HashMap<String, (i64, Vec<u8>)> = HashMap::new();
                    let mut after = 0_i64;
                    loop {
                        let legacy: Vec<AuditEvent> = sqlx::query_as(&select_legacy)
                            .bind(after)
                            .bind(BATCH)
                            .fetch_all(&mut *tx)
                            .await?;
                        if legacy.is_empty() {
                            break;
                        }
                        for row in &legacy {
                            after = row.id;
                            let event = row.to_new_event().ok_or_else(|| {
                                StorageError::Corrupt(format!(
                                    "audit row {} has an unknown outcome",
                                    row.id
                                ))
                            })?;
                            let chain = chain_of(&event);
                            let head = match heads.remove(&chain) {
                                Some(head) => Some(head),
                                None => sqlx::query_as(HEAD_SQL)
                                    .bind(&chain)
                                    .fetch_optional(&mut *tx)
                                    .await?,
                            };
                            let (seq, prev_hash) = match head {
                                Some((seq, hash)) => (seq + 1, hash),
                                None => (1, ZERO_HASH.to_vec()),
                            };
                            let row_hash = hash(
                                &ChainLink {
                                    chain: &chain,
                                    seq,
                                    prev_hash: &prev_hash,
                                },
                                &event,
                            );
                            sqlx::query(ADOPT_SQL)
                                .bind(&chain)
                                .bind(seq)
                                .bind(&prev_hash)
                                .bind(&row_hash)
                                .bind(row.id)
                                .execute(&mut *tx)
                                .await?;
                            heads.insert(chain, (seq, row_hash));
                        }
                    }
                    let created: Option<ChainedAuditRow> = sqlx::query_as(&select_genesis)
                        .bind(GENESIS_CHAIN)
                        .fetch_optional(&mut *tx)
                        .await?;
                    created.ok_or_else(|| {
                        StorageError::Corrupt("the audit genesis row vanished".to_owned())
                    })?
                }
            }
        });
        Ok(row)
    }

    /// Shows `walk` the whole log from one consistent snapshot (a concurrent prune or append
    /// cannot make a chain look broken half-way through): first the genesis row and the rows
    /// outside every chain, then every chained row in `(chain, chain_seq)` order, fetched
    /// `page` rows at a time (never the whole log in memory).
    pub async fn walk_audit_log(
        &self,
        page: u32,
        walk: &mut (dyn AuditWalk + Send),
    ) -> StorageResult<()> {
        let select = format!("SELECT id, {COLUMNS}, {CHAIN_COLUMNS} FROM oauth_audit_log");
        let genesis_sql = format!("{select} WHERE chain = $1 AND chain_seq = 1");
        const UNCHAINED_SQL: &str = "SELECT COUNT(*), MIN(id) FROM oauth_audit_log \
            WHERE chain IS NULL OR chain_seq IS NULL";
        // Two texts rather than "$1 OR ...": a generic plan must still be an index range scan.
        let first_sql = format!(
            "{select} WHERE chain IS NOT NULL AND chain_seq IS NOT NULL \
             ORDER BY chain, chain_seq LIMIT $1"
        );
        let next_sql = format!(
            "{select} WHERE chain_seq IS NOT NULL AND (chain, chain_seq) > ($1, $2) \
             ORDER BY chain, chain_seq LIMIT $3"
        );
        let limit = i64::from(page.max(1));
        with_read_tx!(self, tx => {
            let genesis: Option<ChainedAuditRow> = sqlx::query_as(&genesis_sql)
                .bind(GENESIS_CHAIN)
                .fetch_optional(&mut *tx)
                .await?;
            let (unchained, first_unchained): (i64, Option<i64>) = sqlx::query_as(UNCHAINED_SQL)
                .fetch_one(&mut *tx)
                .await?;
            walk.start(genesis.as_ref(), u64::try_from(unchained).unwrap_or(0), first_unchained);
            let mut after: Option<(String, i64)> = None;
            loop {
                let rows: Vec<ChainedAuditRow> = match &after {
                    None => sqlx::query_as(&first_sql)
                        .bind(limit)
                        .fetch_all(&mut *tx)
                        .await?,
                    Some((chain, seq)) => sqlx::query_as(&next_sql)
                        .bind(chain)
                        .bind(*seq)
                        .bind(limit)
                        .fetch_all(&mut *tx)
                        .await?,
                };
                for row in &rows {
                    walk.row(row);
                }
                let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
                after = match rows.last() {
                    Some(ChainedAuditRow {
                        chain: Some(chain),
                        chain_seq: Some(seq),
                        ..
                    }) if full => Some((chain.clone(), *seq)),
                    _ => break,
                };
            }
        });
        Ok(())
    }

    /// Chains holding events (not only checkpoints) older than `cutoff`, at most `limit`;
    /// never the genesis chain.
    pub async fn audit_chains_to_prune(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> StorageResult<Vec<String>> {
        const SQL: &str = "SELECT DISTINCT chain FROM oauth_audit_log WHERE occurred_at < $1 \
            AND chain IS NOT NULL AND chain <> $2 AND action <> $3 ORDER BY chain LIMIT $4";
        Ok(with_pool!(self, pool => sqlx::query_scalar(SQL)
            .bind(cutoff)
            .bind(GENESIS_CHAIN)
            .bind(CHECKPOINT_ACTION)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?)
    }

    /// Deletes the oldest rows of `chain` (the longest prefix older than `cutoff`) and appends
    /// the checkpoint row `checkpoint(range)` recording what was deleted, in one transaction
    /// under the chain's lock. Does nothing (returns `None`) for the genesis chain, or when the
    /// prefix holds nothing but earlier checkpoints (a quiet chain is not rewritten forever).
    pub async fn prune_audit_chain(
        &self,
        chain: &str,
        cutoff: DateTime<Utc>,
        checkpoint: &(dyn Fn(&PrunedRange) -> NewAuditEvent + Send + Sync),
        hash: RowHasher<'_>,
    ) -> StorageResult<Option<PrunedRange>> {
        if chain == GENESIS_CHAIN {
            return Ok(None);
        }
        const FIRST_KEPT_SQL: &str = "SELECT MIN(chain_seq) FROM oauth_audit_log \
            WHERE chain = $1 AND occurred_at >= $2";
        const COUNT_SQL: &str = "SELECT COUNT(*), COUNT(CASE WHEN action <> $3 THEN 1 END) \
            FROM oauth_audit_log WHERE chain = $1 AND chain_seq <= $2";
        const HASH_SQL: &str =
            "SELECT row_hash FROM oauth_audit_log WHERE chain = $1 AND chain_seq = $2";
        const DELETE_SQL: &str = "DELETE FROM oauth_audit_log WHERE chain = $1 AND chain_seq <= $2";
        let pruned = with_write_tx!(self, &[chain], tx => {
            let head: Option<(i64, Vec<u8>)> = sqlx::query_as(HEAD_SQL)
                .bind(chain)
                .fetch_optional(&mut *tx)
                .await?;
            let Some((head_seq, _)) = head else {
                return Ok(None);
            };
            let first_kept: Option<i64> = sqlx::query_scalar(FIRST_KEPT_SQL)
                .bind(chain)
                .bind(cutoff)
                .fetch_one(&mut *tx)
                .await?;
            // Only a prefix can go: a row older than the cutoff that follows a newer one
            // (clock skew between replicas) waits for it.
            let through_seq = first_kept.map_or(head_seq, |seq| seq - 1);
            let (rows, events): (i64, i64) = sqlx::query_as(COUNT_SQL)
                .bind(chain)
                .bind(through_seq)
                .bind(CHECKPOINT_ACTION)
                .fetch_one(&mut *tx)
                .await?;
            if events == 0 {
                return Ok(None);
            }
            let last_hash: Option<Vec<u8>> = sqlx::query_scalar(HASH_SQL)
                .bind(chain)
                .bind(through_seq)
                .fetch_optional(&mut *tx)
                .await?;
            let last_hash = last_hash.ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "audit chain {chain} has no row {through_seq}: not pruning a broken chain"
                ))
            })?;
            let range = PrunedRange {
                through_seq,
                last_hash,
                rows: u64::try_from(rows).unwrap_or(0),
            };
            // The checkpoint goes after the current head, before the prefix is deleted (the
            // head itself may be part of the prefix).
            append_locked!(tx, chain, &checkpoint(&range), hash);
            let deleted = sqlx::query(DELETE_SQL)
                .bind(chain)
                .bind(through_seq)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if deleted != range.rows {
                return Err(StorageError::Corrupt(format!(
                    "audit chain {chain} changed while locked: counted {} rows, deleted {deleted}",
                    range.rows
                )));
            }
            range
        });
        Ok(Some(pruned))
    }

    /// Replaces, in every row where `user_id` is the actor or the subject, that user id and
    /// the row's client IP and user agent by `pseudonym(value)`, in one transaction. Returns
    /// the number of rows changed. The service's pseudonyms keep every row hash valid.
    pub async fn pseudonymise_audit_user(
        &self,
        user_id: &str,
        pseudonym: &(dyn Fn(&str) -> String + Send + Sync),
    ) -> StorageResult<u64> {
        type Personal = (
            i64,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        const SELECT_SQL: &str = "SELECT id, actor_user_id, subject_user_id, client_ip, \
            user_agent FROM oauth_audit_log WHERE (actor_user_id = $1 OR subject_user_id = $1) \
            AND id > $2 ORDER BY id LIMIT $3";
        const UPDATE_SQL: &str = "UPDATE oauth_audit_log SET actor_user_id = $2, \
            subject_user_id = $3, client_ip = $4, user_agent = $5 WHERE id = $1";
        let replace = |value: Option<String>, only_if: Option<&str>| -> Option<String> {
            value.map(|value| match only_if {
                Some(user) if value != user => value,
                _ => pseudonym(&value),
            })
        };
        let changed = with_write_tx!(self, &[], tx => {
            let mut changed = 0_u64;
            let mut after = 0_i64;
            loop {
                let rows: Vec<Personal> = sqlx::query_as(SELECT_SQL)
                    .bind(user_id)
                    .bind(after)
                    .bind(BATCH)
                    .fetch_all(&mut *tx)
                    .await?;
                if rows.is_empty() {
                    break;
                }
                for (id, actor, subject, ip, agent) in rows {
                    after = id;
                    let before = (actor.clone(), subject.clone(), ip.clone(), agent.clone());
                    let after_row = (
                        replace(actor, Some(user_id)),
                        replace(subject, Some(user_id)),
                        replace(ip, None),
                        replace(agent, None),
                    );
                    if after_row == before {
                        continue;
                    }
                    sqlx::query(UPDATE_SQL)
                        .bind(id)
                        .bind(&after_row.0)
                        .bind(&after_row.1)
                        .bind(&after_row.2)
                        .bind(&after_row.3)
                        .execute(&mut *tx)
                        .await?;
                    changed += 1;
                }
            }
            changed
        });
        Ok(changed)
    }

    /// Events about `subject_user_id` (all users when `None`), oldest first.
    pub async fn list_audit_events(
        &self,
        subject_user_id: Option<&str>,
        page: Page<i64>,
    ) -> StorageResult<Paged<AuditEvent, i64>> {
        let filter = AuditFilter {
            subject_user_id: subject_user_id.map(str::to_owned),
            ..AuditFilter::default()
        };
        self.list_audit_events_filtered(&filter, page).await
    }

    /// Events matching `filter`, oldest (lowest id) first; the cursor is the last id.
    pub async fn list_audit_events_filtered(
        &self,
        filter: &AuditFilter,
        page: Page<i64>,
    ) -> StorageResult<Paged<AuditEvent, i64>> {
        let sql = format!(
            "SELECT id, {COLUMNS} FROM oauth_audit_log \
             WHERE ($1 IS NULL OR subject_user_id = $1) AND ($2 IS NULL OR integration_id = $2) \
             AND ($3 IS NULL OR action = $3) AND ($4 IS NULL OR occurred_at >= $4) \
             AND ($5 IS NULL OR occurred_at < $5) AND id > $6 ORDER BY id LIMIT $7"
        );
        let rows: Vec<AuditEvent> = with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(&filter.subject_user_id)
            .bind(filter.integration_id)
            .bind(&filter.action)
            .bind(filter.from)
            .bind(filter.to)
            .bind(page.after.unwrap_or(0))
            .bind(page.fetch_limit())
            .fetch_all(pool)
            .await)?;
        Ok(Paged::from_rows(rows, page.limit, |event| event.id))
    }

    /// Events about `user_id` or caused by them (a data export covers both), oldest first.
    pub async fn list_audit_events_involving(
        &self,
        user_id: &str,
        page: Page<i64>,
    ) -> StorageResult<Paged<AuditEvent, i64>> {
        let sql = format!(
            "SELECT id, {COLUMNS} FROM oauth_audit_log \
             WHERE (subject_user_id = $1 OR actor_user_id = $1) AND id > $2 ORDER BY id LIMIT $3"
        );
        let rows: Vec<AuditEvent> = with_pool!(self, pool => sqlx::query_as(&sql)
            .bind(user_id)
            .bind(page.after.unwrap_or(0))
            .bind(page.fetch_limit())
            .fetch_all(pool)
            .await)?;
        Ok(Paged::from_rows(rows, page.limit, |event| event.id))
    }
}
