//! Group commit for the audit log.
//!
//! Every audit event of a process goes through one writer task, which appends whatever has
//! queued up since its last write in one transaction (each chain's lock taken once, each
//! chain's head read once). A token hand-out then costs no database write of its own, and
//! under load hundreds of events share one commit.
//!
//! Two ways in: [`AuditWriter::append`] waits until the event is committed (every event that
//! changes something: connect, refresh, disconnect, consent, denials …), and
//! [`AuditWriter::enqueue`] only waits for room in the queue (`token_handed_out`, the one event
//! per read on the hot path). The queue is bounded, so a slow database slows callers down
//! instead of growing memory; [`AuditWriter::flush`] waits until everything queued before it is
//! written (graceful shutdown, and readers of the log that must see their own writes). What a
//! hard crash can lose is therefore limited to the hand-out records of the last moments
//! (one batch, typically a few milliseconds).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::audit::{chain_key, row_hash, salt_of, Salt};
use super::{ServiceError, ServiceResult};
use crate::clock::SharedClock;
use crate::storage::audit::{ChainHeads, ChainLink, NewAuditEvent};
use crate::storage::Database;

/// Events queued before callers wait for room.
const QUEUE_CAPACITY: usize = 8192;
/// Events per transaction. Bounded because PostgreSQL takes one advisory lock per chain.
const MAX_BATCH: usize = 256;

type Ack = oneshot::Sender<Result<i64, String>>;

enum Message {
    Append(Box<NewAuditEvent>, Option<Ack>),
    Flush(oneshot::Sender<()>),
}

/// The process's audit writer; clones share the queue. The task starts on first use, on the
/// runtime of its first caller, and ends when the last clone is dropped.
#[derive(Debug, Clone, Default)]
pub struct AuditWriter {
    queue: Arc<OnceLock<mpsc::Sender<Message>>>,
}

/// What the writer task needs: the chains' salt, the database and the clock (for the salt's
/// genesis row on a fresh database).
pub struct WriterDeps {
    pub db: Database,
    pub salt: Arc<tokio::sync::OnceCell<Salt>>,
    pub clock: SharedClock,
}

impl AuditWriter {
    /// Appends `event` and waits until it is committed; returns its row id.
    pub async fn append(
        &self,
        deps: impl FnOnce() -> WriterDeps,
        event: NewAuditEvent,
    ) -> ServiceResult<i64> {
        let (ack, done) = oneshot::channel();
        self.send(deps, Message::Append(Box::new(event), Some(ack)))
            .await?;
        done.await
            .map_err(|_| stopped())?
            .map_err(|err| ServiceError::Internal(format!("audit write failed: {err}")))
    }

    /// Queues `event` without waiting for its commit (it is written within one batch).
    pub async fn enqueue(
        &self,
        deps: impl FnOnce() -> WriterDeps,
        event: NewAuditEvent,
    ) -> ServiceResult<()> {
        self.send(deps, Message::Append(Box::new(event), None))
            .await
    }

    /// Waits until every event queued before this call has been written (or failed).
    pub async fn flush(&self) {
        let Some(queue) = self.queue.get() else {
            return;
        };
        let (ack, done) = oneshot::channel();
        if queue.send(Message::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    async fn send(&self, deps: impl FnOnce() -> WriterDeps, message: Message) -> ServiceResult<()> {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
            tokio::spawn(run(receiver, deps()));
            sender
        });
        queue.send(message).await.map_err(|_| stopped())
    }
}

fn stopped() -> ServiceError {
    ServiceError::Internal("the audit writer stopped".to_owned())
}

/// Chain heads are remembered between batches for at most this long: pruning (which appends
/// a checkpoint) only ever touches rows far older than that, and any other writer's append
/// is caught by the unique index anyway.
const HEADS_KEPT_FOR: Duration = Duration::from_secs(30);
/// Heads remembered at most (one entry per recently active user).
const HEADS_KEPT_AT_MOST: usize = 50_000;

async fn run(mut receiver: mpsc::Receiver<Message>, deps: WriterDeps) {
    let mut messages = Vec::with_capacity(MAX_BATCH);
    let mut heads = ChainHeads::new();
    let mut heads_since = Instant::now();
    while receiver.recv_many(&mut messages, MAX_BATCH).await > 0 {
        if heads_since.elapsed() > HEADS_KEPT_FOR || heads.len() > HEADS_KEPT_AT_MOST {
            heads.clear();
            heads_since = Instant::now();
        }
        write_batch(&deps, &mut heads, std::mem::take(&mut messages)).await;
    }
}

/// Writes the appends of `messages` in one transaction, then answers everyone: appenders with
/// their row id (or the error), flushes once everything before them is written.
async fn write_batch(deps: &WriterDeps, heads: &mut ChainHeads, messages: Vec<Message>) {
    let mut events = Vec::with_capacity(messages.len());
    let mut acks = Vec::with_capacity(messages.len());
    let mut flushes = Vec::new();
    for message in messages {
        match message {
            Message::Append(event, ack) => {
                events.push(*event);
                acks.push(ack);
            }
            Message::Flush(ack) => flushes.push(ack),
        }
    }
    if !events.is_empty() {
        let result = commit(deps, heads, events).await;
        if let Err(err) = &result {
            tracing::error!(error = %err, events = acks.len(), "audit events could not be written");
        }
        for (index, ack) in acks.into_iter().enumerate() {
            if let Some(ack) = ack {
                let answer = match &result {
                    Ok(ids) => ids
                        .get(index)
                        .copied()
                        .ok_or_else(|| "no row id".to_owned()),
                    Err(err) => Err(err.clone()),
                };
                let _ = ack.send(answer);
            }
        }
    }
    for flush in flushes {
        let _ = flush.send(());
    }
}

async fn commit(
    deps: &WriterDeps,
    heads: &mut ChainHeads,
    events: Vec<NewAuditEvent>,
) -> Result<Vec<i64>, String> {
    let salt = salt_of(&deps.salt, &deps.db, deps.clock.now())
        .await
        .map_err(|err| err.to_string())?;
    let chained: Vec<(String, NewAuditEvent)> = events
        .into_iter()
        .map(|mut event| {
            // Stored exactly as hashed: PostgreSQL keeps microseconds (and would round).
            event.occurred_at = crate::clock::truncate(event.occurred_at);
            (chain_key(&salt, event.subject_user_id.as_deref()), event)
        })
        .collect();
    let hasher =
        move |link: &ChainLink<'_>, event: &NewAuditEvent| row_hash(&salt, link, event).to_vec();
    let first = deps
        .db
        .append_chained_audit_events(&chained, &hasher, heads)
        .await;
    match first {
        Ok(ids) => Ok(ids),
        // Another writer (a replica, pruning) moved a chain on: read the heads afresh, once.
        Err(err) if err.is_unique_violation() => {
            heads.clear();
            deps.db
                .append_chained_audit_events(&chained, &hasher, heads)
                .await
                .map_err(|err| err.to_string())
        }
        Err(err) => {
            heads.clear();
            Err(err.to_string())
        }
    }
}
