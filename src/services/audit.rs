//! The audit log: who did what to which integration, from where, with what outcome. Never
//! token values. A failed audit write is logged loudly but does not undo the action.
//!
//! # Tamper evidence: hash chains
//!
//! Every row carries `row_hash`, a SHA-256 over its contents, its position and the hash of the
//! row before it (`prev_hash`), so that editing, deleting, inserting or reordering rows breaks
//! the chain and [`verify`] (`oauth-manager audit verify`) names the first bad row.
//!
//! **One chain per subject user**, not one for the whole log. A single global chain makes
//! every append of the whole deployment read the same head under the same lock: one writer at
//! a time, across every replica. With a chain per user (the user whose data the event is
//! about; events about nobody go to the `system` chain), appends for different users take
//! different locks and proceed in parallel, while each user's history is still protected
//! against edits, deletions and reordering. Verification walks every chain. What per-user
//! chains give up is an order *between* users' events; the log never promised one (ids and
//! timestamps still order rows, they are just not hash-protected across chains).
//!
//! **The hash** is SHA-256 over a JSON array (unambiguous: every field is typed and escaped,
//! objects are serialised with sorted keys): a format tag, chain, chain_seq, occurred_at
//! (RFC 3339, microseconds), digest(actor), digest(subject), integration_id, provider, action,
//! outcome, reason, request_id, digest(client_ip), digest(user_agent), details, and
//! hex(prev_hash) (32 zero bytes for the first row of a chain).
//!
//! **Personal fields enter the hash only as digests**: `digest(v)` is `hex(sha256(salt || v))`,
//! or, for a value that is already a pseudonym `erased:<64 hex>`, that hex itself. A chain's
//! key is `digest(subject)`. Erasure ([`pseudonymise_user`]) replaces a value `v` by
//! [`pseudonym`]`(v) = "erased:" + digest(v)`: the digest, hence every hash and chain key, is
//! unchanged, and every chain still verifies. `details` are hashed verbatim, so they must never
//! hold personal data (they cannot be pseudonymised later). A pseudonym is not anonymous: the
//! salt is in the database, so whoever can read it can test a guessed user id against it.
//!
//! **The salt** (32 random bytes) lives in the genesis row: `chain = "genesis"`, `chain_seq = 1`,
//! action `audit_genesis`, details `{"salt": hex}`. It is created on the first audit write
//! (concurrent creators across replicas are serialised by the genesis chain's lock and the
//! unique index; the loser re-reads) and then cached in the [`Context`]. The same transaction
//! chains the rows written before the chains existed (before migration 0005), in id order.
//!
//! **Retention** (`OAUTH_AUDIT_RETENTION_DAYS`): the background worker deletes, per chain, the
//! longest prefix of rows older than the cutoff and, in the same transaction under the chain's
//! lock, appends a checkpoint row (action `audit_pruned`, details `{"pruned_through_seq": n,
//! "last_pruned_hash": hex}`) to that chain. A chain whose first row has `chain_seq` > 1 is
//! accepted only when a checkpoint in the same chain names exactly the seq before it and that
//! row's `prev_hash`. The genesis chain is never pruned.
//!
//! # What verification proves, and what it cannot
//!
//! The hashes are not keyed: anyone who can write the database can also recompute every hash
//! after an edit (the salt is in the database too). The chains therefore detect edits,
//! deletions and reordering made without recomputing the chain (manual fixes, buggy
//! migrations, restores of partial backups, an attacker who does not know the scheme), and,
//! once the chain heads printed by `audit verify` are kept somewhere the database's writers
//! cannot reach (a ticket, a log shipper, a WORM bucket), any rewrite of history up to those
//! heads: a recomputed chain ends in a different head. A hash chain alone can NOT detect the
//! truncation of the newest rows of a chain, nor the deletion of a whole chain (all of one
//! user's events): what remains is a valid, shorter chain. Only comparing the heads with
//! anchored copies reveals those.
//!
//! Rows written outside the chains (by [`Database::append_audit_event`], or by a replica still
//! running a version from before the chains during a rolling upgrade) are reported as
//! problems; upgrade every replica together.

use std::sync::Arc;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use rand::RngCore;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use uuid::Uuid;

use super::audit_writer::{Appended, AuditWriter, WriterDeps};
use super::{Context, ServiceResult};
use crate::storage::audit::{
    AuditWalk, ChainLink, ChainedAuditRow, NewAuditEvent, Outcome, PrunedRange, CHECKPOINT_ACTION,
    GENESIS_ACTION, GENESIS_CHAIN, HASH_LEN, SYSTEM_CHAIN, ZERO_HASH,
};
use crate::storage::{Database, StorageError};

/// Prefix of a pseudonymised value.
pub const ERASED_PREFIX: &str = "erased:";
/// First element of every hashed array: a new hash format gets a new tag.
const HASH_FORMAT: &str = "oauth-manager/audit-row/v1";
/// Rows per page when verifying.
const VERIFY_PAGE: u32 = 1000;
/// Chains pruned per worker tick (the rest wait for the next tick).
const PRUNE_CHAINS_PER_TICK: u32 = 500;

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

/// The digest salt of a deployment's audit chains (kept in the genesis row). Not a secret
/// key, but not printed either: with it, pseudonyms can be tested against guessed user ids.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Salt([u8; HASH_LEN]);

impl Salt {
    pub fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
        Self(bytes)
    }

    fn generate() -> Self {
        let mut bytes = [0_u8; HASH_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    fn from_hex(value: &str) -> Option<Self> {
        let bytes = decode_hex(value)?;
        Some(Self(bytes.try_into().ok()?))
    }

    fn to_hex(self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Debug for Salt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Salt(..)")
    }
}

/// Per-process audit chain state, shared by every clone of the services [`Context`]: the salt,
/// read (or created) on first use, and the retention period.
#[derive(Debug, Clone, Default)]
pub struct AuditChains {
    salt: Arc<OnceCell<Salt>>,
    retention: Option<Duration>,
    hand_out_window: std::time::Duration,
    writer: AuditWriter,
}

impl AuditChains {
    /// `retention_days`: `OAUTH_AUDIT_RETENTION_DAYS` (keep everything when `None`);
    /// `hand_out_window`: `OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS` (see [`super::audit_tally`]).
    pub fn new(retention_days: Option<u32>, hand_out_window: std::time::Duration) -> Self {
        Self {
            salt: Arc::default(),
            retention: retention_days.map(|days| Duration::days(i64::from(days))),
            hand_out_window,
            writer: AuditWriter::on_current_runtime(),
        }
    }

    pub fn retention(&self) -> Option<Duration> {
        self.retention
    }

    /// Waits until every event recorded so far is written (see [`AuditWriter::flush`]).
    pub async fn flush(&self) {
        self.writer.flush().await;
    }
}

/// `hex(sha256(salt || value))`, or the digest a pseudonym `erased:<digest>` already carries.
pub fn digest(salt: &Salt, value: &str) -> String {
    if let Some(rest) = value.strip_prefix(ERASED_PREFIX) {
        if is_digest(rest) {
            return rest.to_owned();
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(salt.0);
    hasher.update(value.as_bytes());
    hex(&hasher.finalize())
}

/// What erasure writes in place of `value`: `erased:` + [`digest`]. Hashes and chain keys
/// computed from the original value stay valid; pseudonymising a pseudonym changes nothing.
pub fn pseudonym(salt: &Salt, value: &str) -> String {
    format!("{ERASED_PREFIX}{}", digest(salt, value))
}

/// The chain an event about `subject` belongs to: the subject's digest, or `system`.
pub fn chain_key(salt: &Salt, subject: Option<&str>) -> String {
    subject.map_or_else(|| SYSTEM_CHAIN.to_owned(), |subject| digest(salt, subject))
}

/// The hash of `event` stored at `link` (see the module documentation for the fields).
pub fn row_hash(salt: &Salt, link: &ChainLink<'_>, event: &NewAuditEvent) -> [u8; HASH_LEN] {
    let personal = |value: &Option<String>| match value {
        Some(value) => Value::String(digest(salt, value)),
        None => Value::Null,
    };
    let fields = Value::Array(vec![
        json!(HASH_FORMAT),
        json!(link.chain),
        json!(link.seq),
        json!(event
            .occurred_at
            .to_rfc3339_opts(SecondsFormat::Micros, true)),
        personal(&event.actor_user_id),
        personal(&event.subject_user_id),
        json!(event.integration_id.map(|id| id.hyphenated().to_string())),
        json!(event.provider),
        json!(event.action),
        json!(event.outcome.as_str()),
        json!(event.reason),
        json!(event.request_id),
        personal(&event.client_ip),
        personal(&event.user_agent),
        event.details.clone(),
        json!(hex(link.prev_hash)),
    ]);
    let mut canonical = String::new();
    write_canonical(&fields, &mut canonical);
    Sha256::digest(canonical.as_bytes()).into()
}

/// Appends `event` to the audit log and waits for its commit. The one way services write audit
/// events; a failure is logged at error level and does not fail the caller.
pub async fn record(ctx: &Context, event: &NewAuditEvent) {
    record_ahead(ctx, event).await.committed().await;
}

/// [`record`] in two steps, for an event that must be queued before anyone learns of what it
/// records (from then on a flush, a graceful shutdown's too, writes it) while its commit is
/// waited for only after: queues `event` now; [`RecordAhead::committed`] waits.
pub async fn record_ahead<'a>(ctx: &Context, event: &'a NewAuditEvent) -> RecordAhead<'a> {
    RecordAhead {
        action: &event.action,
        appended: ctx
            .audit
            .writer
            .enqueue(|| writer_deps(ctx), event.clone())
            .await,
    }
}

/// An event queued by [`record_ahead`].
pub struct RecordAhead<'a> {
    action: &'a str,
    appended: ServiceResult<Appended>,
}

impl RecordAhead<'_> {
    /// Waits for the event's commit; a failure is logged, as [`record`] logs it.
    pub async fn committed(self) {
        let written = match self.appended {
            Ok(appended) => appended.committed().await.map(|_| ()),
            Err(err) => Err(err),
        };
        if let Err(err) = written {
            tracing::error!(error = %err, action = %self.action, "audit event could not be written");
        }
    }
}

/// Queues `event` without waiting for its commit, for an event about state that a crash may
/// lose as well (a pending sign-in, committed without waiting for the flush on PostgreSQL): its
/// record would say something happened that left nothing behind. Written in order with the
/// rest; a failure is logged by the writer.
pub async fn record_queued(ctx: &Context, event: NewAuditEvent) {
    if let Err(err) = ctx.audit.writer.queue(|| writer_deps(ctx), event).await {
        tracing::error!(error = %err, "audit event could not be queued");
    }
}

/// Queues a token hand-out record without waiting for its commit: the one event on the hot
/// path, coalesced with hand-outs alike (see [`super::audit_writer`] for what a crash can lose).
pub async fn record_hand_out(ctx: &Context, event: NewAuditEvent) {
    if let Err(err) = ctx
        .audit
        .writer
        .count_hand_out(|| writer_deps(ctx), event)
        .await
    {
        tracing::error!(error = %err, "audit event could not be queued");
    }
}

fn writer_deps(ctx: &Context) -> WriterDeps {
    WriterDeps {
        db: ctx.db.clone(),
        salt: ctx.audit.salt.clone(),
        clock: ctx.clock.clone(),
        hand_out_window: ctx.audit.hand_out_window,
        crowds: ctx.flights.crowds(),
        hold_at_most: super::audit_writer::HOLD_AT_MOST,
    }
}

/// Records a refused attempt on someone else's data (403, or 404 on their object).
pub async fn denied(
    ctx: &Context,
    actor: &str,
    subject: Option<&str>,
    attempted: &str,
    client: &RequestContext,
) {
    let event = event(
        "authorization_denied",
        Outcome::Denied,
        Some(actor),
        subject,
        client,
        ctx.clock.now(),
    )
    .reason(attempted);
    record(ctx, &event).await;
}

/// Appends `event` to its chain and returns the row id (for callers that must know).
pub async fn append(ctx: &Context, event: &NewAuditEvent) -> ServiceResult<i64> {
    ctx.audit
        .writer
        .append(|| writer_deps(ctx), event.clone())
        .await
}

/// The deployment's salt: cached, else read from the genesis row, else created with it.
async fn salt(ctx: &Context) -> ServiceResult<Salt> {
    salt_of(&ctx.audit.salt, &ctx.db, ctx.clock.now()).await
}

pub(super) async fn salt_of(
    cell: &OnceCell<Salt>,
    db: &Database,
    now: DateTime<Utc>,
) -> ServiceResult<Salt> {
    let salt = cell
        .get_or_try_init(|| load_or_create_salt(db, now))
        .await?;
    Ok(*salt)
}

/// Creates the audit log's genesis row if missing (adopting rows written before the chains
/// existed), so `audit verify` passes on a freshly migrated or upgraded database.
pub async fn ensure_genesis(db: &Database, now: DateTime<Utc>) -> ServiceResult<()> {
    load_or_create_salt(db, now).await.map(|_| ())
}

async fn load_or_create_salt(db: &Database, now: DateTime<Utc>) -> ServiceResult<Salt> {
    if let Some(row) = db.audit_genesis().await? {
        return Ok(genesis_salt(&row)?);
    }
    let salt = Salt::generate();
    let genesis = NewAuditEvent {
        occurred_at: crate::clock::truncate(now),
        actor_user_id: None,
        subject_user_id: None,
        integration_id: None,
        provider: None,
        action: GENESIS_ACTION.to_owned(),
        outcome: Outcome::Success,
        reason: None,
        request_id: None,
        client_ip: None,
        user_agent: None,
        details: json!({ "salt": salt.to_hex() }),
    };
    let chain_of = move |event: &NewAuditEvent| chain_key(&salt, event.subject_user_id.as_deref());
    let hasher =
        move |link: &ChainLink<'_>, event: &NewAuditEvent| row_hash(&salt, link, event).to_vec();
    // Whoever created the genesis row (this call, or a concurrent replica), its salt wins.
    let row = match db.create_audit_genesis(&genesis, &chain_of, &hasher).await {
        Ok(row) => row,
        Err(err) if err.is_unique_violation() => db
            .audit_genesis()
            .await?
            .ok_or_else(|| StorageError::Corrupt("the audit genesis row vanished".to_owned()))?,
        Err(err) => return Err(err.into()),
    };
    Ok(genesis_salt(&row)?)
}

fn genesis_salt(row: &ChainedAuditRow) -> Result<Salt, StorageError> {
    if row.event.action != GENESIS_ACTION {
        return Err(StorageError::Corrupt(format!(
            "audit row {} sits at the genesis position but is not the genesis row",
            row.event.id
        )));
    }
    row.event
        .details
        .0
        .get("salt")
        .and_then(Value::as_str)
        .and_then(Salt::from_hex)
        .ok_or_else(|| {
            StorageError::Corrupt(format!(
                "the audit genesis row {} carries no valid salt",
                row.event.id
            ))
        })
}

/// Replaces the user's id (as actor or subject) and the client IP and user agent of every
/// audit row about or by them with pseudonyms (see the module documentation); the chains still
/// verify. Returns the number of rows changed; running it again changes nothing.
pub async fn pseudonymise_user(ctx: &Context, user_id: &str) -> ServiceResult<u64> {
    let salt = salt(ctx).await?;
    let replace = move |value: &str| pseudonym(&salt, value);
    Ok(ctx.db.pseudonymise_audit_user(user_id, &replace).await?)
}

/// Prunes by the configured retention (`OAUTH_AUDIT_RETENTION_DAYS`); nothing when unset.
/// Returns the number of rows deleted (checkpoints appended are not counted).
pub async fn prune_expired(ctx: &Context) -> ServiceResult<u64> {
    match ctx.audit.retention {
        Some(retention) => prune(ctx, ctx.clock.now() - retention).await,
        None => Ok(0),
    }
}

/// Deletes, chain by chain, the rows older than `cutoff` (the longest such prefix of each
/// chain) and appends a checkpoint to each pruned chain. A chain that fails is logged and
/// skipped; the others are still pruned.
pub async fn prune(ctx: &Context, cutoff: DateTime<Utc>) -> ServiceResult<u64> {
    let chains = ctx
        .db
        .audit_chains_to_prune(cutoff, PRUNE_CHAINS_PER_TICK)
        .await?;
    if chains.is_empty() {
        return Ok(0);
    }
    let salt = salt(ctx).await?;
    let now = crate::clock::truncate(ctx.clock.now());
    let checkpoint = move |range: &PrunedRange| NewAuditEvent {
        occurred_at: now,
        actor_user_id: None,
        subject_user_id: None,
        integration_id: None,
        provider: None,
        action: CHECKPOINT_ACTION.to_owned(),
        outcome: Outcome::Success,
        reason: None,
        request_id: None,
        client_ip: None,
        user_agent: None,
        details: json!({
            "pruned_through_seq": range.through_seq,
            "last_pruned_hash": hex(&range.last_hash),
            "rows_pruned": range.rows,
            "cutoff": cutoff.to_rfc3339_opts(SecondsFormat::Micros, true),
        }),
    };
    let hasher =
        move |link: &ChainLink<'_>, event: &NewAuditEvent| row_hash(&salt, link, event).to_vec();
    let mut pruned = 0;
    for chain in chains {
        match ctx
            .db
            .prune_audit_chain(&chain, cutoff, &checkpoint, &hasher)
            .await
        {
            Ok(Some(range)) => pruned += range.rows,
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, %chain, "pruning an audit chain failed"),
        }
    }
    Ok(pruned)
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Rows examined (all rows of the log).
    pub rows: u64,
    /// Chains found, the genesis chain included.
    pub chains: u64,
    /// Problems found (a broken row can count more than once).
    pub problems: u64,
    /// The bad row with the lowest id, and why it is bad.
    pub first_problem: Option<Problem>,
    /// The last row of every chain. Keep them outside the database: a later run whose heads
    /// do not extend these reveals truncated or rewritten chains, which hashes alone cannot.
    pub heads: Vec<ChainHead>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.first_problem.is_none()
    }

    fn flag(&mut self, row_id: i64, reason: String) {
        self.problems += 1;
        if self
            .first_problem
            .as_ref()
            .is_none_or(|first| row_id < first.row_id)
        {
            self.first_problem = Some(Problem { row_id, reason });
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub row_id: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainHead {
    pub chain: String,
    pub seq: i64,
    /// Hex of the head row's `row_hash`.
    pub hash: String,
}

/// Checks every chain of the log, page by page (never the whole log in memory): contiguous
/// positions, `prev_hash` links, recomputed hashes, chain membership, the genesis row and the
/// pruning checkpoints. Needs only the database (no keys). See the module documentation for
/// what a clean report does and does not prove.
pub async fn verify(db: &Database) -> ServiceResult<VerifyReport> {
    verify_in_pages(db, VERIFY_PAGE).await
}

/// [`verify`], reading `page` rows per round trip (the report does not depend on it).
pub async fn verify_in_pages(db: &Database, page: u32) -> ServiceResult<VerifyReport> {
    let mut walk = Walk::default();
    db.walk_audit_log(page, &mut walk).await?;
    walk.finish_chain();
    let mut report = walk.report;
    if !walk.has_genesis {
        if let Some(id) = walk.lowest_id {
            report.flag(
                id,
                "the genesis row (chain \"genesis\", seq 1) is missing: no salt to check hashes \
                 with"
                    .to_owned(),
            );
        }
    }
    Ok(report)
}

/// The state of a walk through the chains, in (chain, seq) order.
#[derive(Default)]
struct Walk {
    salt: Option<Salt>,
    has_genesis: bool,
    report: VerifyReport,
    current: Option<ChainState>,
    lowest_id: Option<i64>,
}

impl AuditWalk for Walk {
    fn start(
        &mut self,
        genesis: Option<&ChainedAuditRow>,
        unchained: u64,
        first_unchained: Option<i64>,
    ) {
        if let Some(row) = genesis {
            self.has_genesis = true;
            match genesis_salt(row) {
                Ok(salt) => self.salt = Some(salt),
                Err(err) => self.report.flag(row.event.id, err.to_string()),
            }
        }
        self.report.rows += unchained;
        if let Some(id) = first_unchained {
            self.report.flag(
                id,
                "row is outside every hash chain (inserted behind the service's back, or its \
                 chain columns were cleared)"
                    .to_owned(),
            );
        }
    }

    fn row(&mut self, row: &ChainedAuditRow) {
        self.check(row);
    }
}

struct ChainState {
    chain: String,
    first_id: i64,
    first_seq: i64,
    first_prev: Vec<u8>,
    /// A chain starting after seq 1 needs a matching checkpoint.
    start_accounted: bool,
    last_seq: i64,
    last_hash: Vec<u8>,
}

impl Walk {
    fn check(&mut self, row: &ChainedAuditRow) {
        let (Some(chain), Some(seq)) = (row.chain.as_deref(), row.chain_seq) else {
            return;
        };
        let id = row.event.id;
        self.report.rows += 1;
        self.lowest_id = Some(self.lowest_id.map_or(id, |lowest| lowest.min(id)));
        let prev = row.prev_hash.clone().unwrap_or_default();
        let stored_hash = row.row_hash.clone().unwrap_or_default();
        let mut problem: Option<String> = None;
        if prev.len() != HASH_LEN || stored_hash.len() != HASH_LEN {
            problem = Some("prev_hash or row_hash is missing or not 32 bytes".to_owned());
        }

        // Position: contiguous seqs and prev_hash links.
        let continues = self
            .current
            .as_ref()
            .is_some_and(|state| state.chain == chain);
        if !continues {
            self.finish_chain();
            let start_accounted = seq == 1;
            if seq == 1 && prev != ZERO_HASH {
                problem.get_or_insert_with(|| {
                    "first row of its chain but prev_hash is not 32 zero bytes".to_owned()
                });
            }
            if seq != 1 && chain == GENESIS_CHAIN {
                problem.get_or_insert_with(|| "the genesis chain must start at seq 1".to_owned());
            }
            self.current = Some(ChainState {
                chain: chain.to_owned(),
                first_id: id,
                first_seq: seq,
                first_prev: prev.clone(),
                start_accounted: start_accounted || chain == GENESIS_CHAIN,
                last_seq: seq,
                last_hash: stored_hash.clone(),
            });
        } else if let Some(state) = self.current.as_mut() {
            if seq != state.last_seq + 1 {
                problem.get_or_insert_with(|| {
                    format!(
                        "seq {seq} follows seq {} in its chain: rows were deleted or reordered",
                        state.last_seq
                    )
                });
            } else if prev != state.last_hash {
                problem.get_or_insert_with(|| {
                    format!(
                        "prev_hash does not match the row_hash of seq {}: rows were replaced or \
                         reordered",
                        state.last_seq
                    )
                });
            }
            state.last_seq = seq;
            state.last_hash = stored_hash.clone();
        }

        // Contents: the recomputed hash and the chain the row belongs in.
        let event = row.event.to_new_event();
        match (&self.salt, &event) {
            (_, None) => {
                problem.get_or_insert_with(|| format!("unknown outcome {:?}", row.event.outcome));
            }
            (Some(salt), Some(event)) => {
                let link = ChainLink {
                    chain,
                    seq,
                    prev_hash: &prev,
                };
                if row_hash(salt, &link, event).as_slice() != stored_hash.as_slice() {
                    problem.get_or_insert_with(|| {
                        "row_hash does not match the row's contents: the row was edited".to_owned()
                    });
                }
                let checkpoint = event.action == CHECKPOINT_ACTION
                    && event.subject_user_id.is_none()
                    && chain != GENESIS_CHAIN;
                let expected = if chain == GENESIS_CHAIN && event.subject_user_id.is_none() {
                    GENESIS_CHAIN.to_owned()
                } else {
                    chain_key(salt, event.subject_user_id.as_deref())
                };
                if !checkpoint && expected != chain {
                    problem.get_or_insert_with(|| {
                        "the row's subject does not belong to the chain it sits in".to_owned()
                    });
                }
            }
            (None, Some(_)) => {}
        }

        // The genesis chain holds the genesis row only, and nothing else claims to be one.
        let action = row.event.action.as_str();
        if chain == GENESIS_CHAIN && (seq != 1 || action != GENESIS_ACTION) {
            problem.get_or_insert_with(|| {
                "the genesis chain holds nothing but the genesis row".to_owned()
            });
        } else if chain != GENESIS_CHAIN && action == GENESIS_ACTION {
            problem.get_or_insert_with(|| "a genesis row outside the genesis chain".to_owned());
        }

        if action == CHECKPOINT_ACTION && chain != GENESIS_CHAIN {
            if let Some(reason) = self.checkpoint(&row.event.details.0) {
                problem.get_or_insert(reason);
            }
        }
        if let Some(reason) = problem {
            self.report.flag(id, reason);
        }
    }

    /// Matches a checkpoint against the start of the current chain; a problem if malformed or
    /// if it claims rows that are still there were pruned.
    fn checkpoint(&mut self, details: &Value) -> Option<String> {
        let state = self.current.as_mut()?;
        let through = details.get("pruned_through_seq").and_then(Value::as_i64);
        let hash = details
            .get("last_pruned_hash")
            .and_then(Value::as_str)
            .and_then(decode_hex);
        let (Some(through), Some(hash)) = (through, hash) else {
            return Some("malformed pruning checkpoint".to_owned());
        };
        if through >= state.first_seq {
            return Some(format!(
                "checkpoint says rows through seq {through} were pruned, but seq {} is still \
                 there",
                state.first_seq
            ));
        }
        if through == state.first_seq - 1 && hash == state.first_prev {
            state.start_accounted = true;
        }
        None
    }

    fn finish_chain(&mut self) {
        let Some(state) = self.current.take() else {
            return;
        };
        self.report.chains += 1;
        if !state.start_accounted {
            self.report.flag(
                state.first_id,
                format!(
                    "its chain starts at seq {} but no checkpoint records pruning through seq {} \
                     with this row's prev_hash: older rows were deleted",
                    state.first_seq,
                    state.first_seq - 1
                ),
            );
        }
        self.report.heads.push(ChainHead {
            chain: state.chain,
            seq: state.last_seq,
            hash: hex(&state.last_hash),
        });
    }
}

/// JSON with object keys sorted at every level, whatever order the value was built or read in
/// (PostgreSQL's JSONB reorders keys; serde_json may preserve insertion order).
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (index, (key, value)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn is_digest(value: &str) -> bool {
    value.len() == 2 * HASH_LEN
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

fn decode_hex(value: &str) -> Option<Vec<u8>> {
    if value.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    value
        .as_bytes()
        .chunks(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn salt() -> Salt {
        Salt::from_bytes([7; HASH_LEN])
    }

    fn sample() -> NewAuditEvent {
        event(
            "token_handed_out",
            Outcome::Success,
            Some("alice"),
            Some("alice"),
            &RequestContext {
                request_id: Some("req-1".into()),
                client_ip: Some("203.0.113.9".into()),
                user_agent: Some("curl/8".into()),
            },
            DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
        )
        .details(json!({"b": 1, "a": {"z": [1, 2], "y": null}}))
    }

    #[test]
    fn pseudonyms_keep_digests_and_are_idempotent() {
        let salt = salt();
        let erased = pseudonym(&salt, "alice");
        assert!(erased.starts_with(ERASED_PREFIX));
        assert_eq!(digest(&salt, &erased), digest(&salt, "alice"));
        assert_eq!(pseudonym(&salt, &erased), erased);
        assert_ne!(
            digest(&salt, "alice"),
            digest(&Salt::from_bytes([8; 32]), "alice")
        );
        // Only a real pseudonym is taken at its word: no steering into reserved chains.
        assert_ne!(chain_key(&salt, Some("erased:genesis")), GENESIS_CHAIN);
        assert_eq!(chain_key(&salt, None), SYSTEM_CHAIN);
    }

    #[test]
    fn the_hash_survives_erasure_and_key_order_but_not_edits() {
        let salt = salt();
        let link = ChainLink {
            chain: "c",
            seq: 3,
            prev_hash: &[1; 32],
        };
        let original = sample();
        let hash = row_hash(&salt, &link, &original);
        let mut erased = original.clone();
        for field in [
            &mut erased.actor_user_id,
            &mut erased.subject_user_id,
            &mut erased.client_ip,
            &mut erased.user_agent,
        ] {
            *field = field.as_deref().map(|v| pseudonym(&salt, v));
        }
        assert_eq!(row_hash(&salt, &link, &erased), hash);
        let reordered = original
            .clone()
            .details(serde_json::from_str(r#"{"a": {"y": null, "z": [1, 2]}, "b": 1}"#).unwrap());
        assert_eq!(row_hash(&salt, &link, &reordered), hash);
        let mut edited = original.clone();
        edited.reason = Some("x".into());
        assert_ne!(row_hash(&salt, &link, &edited), hash);
        let moved = ChainLink { seq: 4, ..link };
        assert_ne!(row_hash(&salt, &moved, &original), hash);
        // A value cannot slide into its neighbour: the array keeps fields apart.
        let mut shifted = original.clone();
        shifted.reason = Some("req-1".into());
        shifted.request_id = None;
        assert_ne!(row_hash(&salt, &link, &shifted), hash);
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_hex(&hex(&bytes)), Some(bytes));
        assert_eq!(decode_hex("0g"), None);
        assert_eq!(decode_hex("abc"), None);
        let salt = salt();
        assert_eq!(Salt::from_hex(&salt.to_hex()), Some(salt));
        assert_eq!(format!("{salt:?}"), "Salt(..)");
    }
}
