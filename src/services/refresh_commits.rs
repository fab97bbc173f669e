//! Refreshed tokens committed together (group commit).
//!
//! Every refresh ends with one write: the new tokens and the integration's
//! `last_refreshed_at`. When many refreshes end at once (the background refresher keeps up to
//! `OAUTH_REFRESH_CONCURRENCY` of them in flight), one transaction per refresh is what bounds
//! the rate: SQLite writes one transaction at a time and each commit appends every page it
//! touched to the WAL (the tokens' expiry index pages, which all refreshed rows move to, again
//! and again); PostgreSQL waits for a WAL flush per commit. So a refresh that finds others
//! committing queues its tokens, and whoever commits next takes everything queued into one
//! transaction.
//!
//! On PostgreSQL a batch is one statement over arrays (one round trip); on SQLite, one
//! statement per row in one transaction.
//!
//! What a caller is told is exactly what happened to its own row: its generation, or `None`
//! when the row is gone. A batch that fails is rolled back whole and each of its refreshes is
//! then committed alone, so one refresh's error is never reported to another.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use tokio::sync::oneshot::{self, error::TryRecvError};

use crate::storage::tokens::SealedTokens;
use crate::storage::{Database, StorageResult};

/// Per process; see the module documentation.
#[derive(Debug, Default)]
pub struct RefreshCommits {
    queued: Mutex<Vec<Queued>>,
    /// Held by whoever is committing a batch; the next holder takes what queued meanwhile.
    turn: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Queued {
    tokens: SealedTokens,
    /// The row's new generation, sent once the batch holding it committed.
    done: oneshot::Sender<Option<i64>>,
}

/// At most this many refreshes per transaction: a batch holds SQLite's single writer for its
/// whole length, and other writers (sign-ins, the audit log) wait behind it.
const MAX_BATCH: usize = 64;

impl RefreshCommits {
    /// Stores refreshed tokens, alone or with others queued at the same time, and returns the
    /// row's new generation (`None`: the integration was disconnected meanwhile).
    pub async fn store(&self, db: &Database, tokens: &SealedTokens) -> StorageResult<Option<i64>> {
        let (done, mut outcome) = oneshot::channel();
        self.queue().push(Queued {
            tokens: tokens.clone(),
            done,
        });
        let _turn = tokio::select! {
            biased;
            // Committed by someone else's turn while this caller waited for its own.
            sent = &mut outcome => return match sent {
                Ok(generation) => Ok(generation),
                Err(_) => db.store_refreshed_tokens(tokens).await,
            },
            turn = self.turn.lock() => turn,
        };
        // This caller's tokens are still queued (or were just answered): commit from the front
        // until they are. They must not stay queued after it returns, or a later turn would
        // write them over whatever the row holds by then.
        loop {
            match outcome.try_recv() {
                Ok(generation) => return Ok(generation),
                // Their batch failed and so did their commit alone: again, for its error.
                Err(TryRecvError::Closed) => return db.store_refreshed_tokens(tokens).await,
                Err(TryRecvError::Empty) => self.commit_queued(db).await,
            }
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits up to [`MAX_BATCH`] queued refreshes, from the front, in one transaction; if
    /// that fails, each alone. A refresh whose commit failed is told nothing (its sender is
    /// dropped): its caller commits it again itself and sees the error.
    async fn commit_queued(&self, db: &Database) {
        let batch: Vec<Queued> = {
            let mut queued = self.queue();
            // One row per integration in a batch (a single statement may update a row once):
            // the batch ends before a second one. A refresh holds its integration's lock, so
            // this is a safeguard, not a case that occurs.
            let mut ids = HashSet::new();
            let take = queued
                .iter()
                .take(MAX_BATCH)
                .take_while(|queued| ids.insert(queued.tokens.integration_id))
                .count();
            queued.drain(..take).collect()
        };
        let rows: Vec<&SealedTokens> = batch.iter().map(|queued| &queued.tokens).collect();
        match db.store_refreshed_tokens_together(&rows).await {
            Ok(generations) => {
                for (queued, generation) in batch.into_iter().zip(generations) {
                    let _ = queued.done.send(generation);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, rows = rows.len(), "committing refreshed tokens together failed; committing them one by one");
                for queued in batch {
                    if let Ok(generation) = db.store_refreshed_tokens(&queued.tokens).await {
                        let _ = queued.done.send(generation);
                    }
                }
            }
        }
    }
}
