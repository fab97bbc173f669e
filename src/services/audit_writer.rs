//! Group commit for the audit log.
//!
//! Every audit event of a process goes through one writer task, which appends whatever has
//! queued up since its last write in one transaction (each chain's lock taken once, each
//! chain's head read once). A token hand-out then costs no database write of its own, and
//! under load hundreds of events share one commit.
//!
//! Three ways in: [`AuditWriter::append`] waits until the event is committed (every event that
//! changes something: connect, refresh, disconnect, consent, denials …),
//! [`AuditWriter::queue`] waits only for room in the queue (an event about state that a crash
//! may lose too: `authorize_started`, whose pending sign-in PostgreSQL commits without waiting
//! for the flush), and [`AuditWriter::count_hand_out`] waits for nothing (`token_handed_out`,
//! the one event per read on the hot path). Hand-outs alike are coalesced for `OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS` into
//! one row that counts them ([`super::audit_tally`]), counted by the caller under a short lock
//! in a tally the task shares: no message and no wake-up of the task per hand-out (that was
//! about 5 % of a hand-out's CPU, BENCHMARKS.md). The queue and the open counts are bounded, so a
//! slow database slows callers down instead of growing memory;
//! [`AuditWriter::flush`] waits until everything queued before it is written, open counts
//! included (graceful shutdown, and readers of the log that must see their own writes). What a
//! hard crash can lose is therefore limited to the hand-out records of the last moments (one
//! window, or with a window of zero one batch: at most [`LINGER`] plus one commit; plus
//! [`HOLD_AT_MOST`] during a crowd).
//!
//! Hand-out counts are the one write that can wait (with a window of zero, hand-outs are rows
//! of their own and never held): while callers wait in memory for a token load or refresh
//! ([`Crowds`]), those that fall due are held back until every caller has been woken with the
//! result and its answer has had time to go out, for at most [`HOLD_AT_MOST`] between two
//! passes that write every count due, and a write of many stops before its next transaction
//! of [`COUNTS_PER_COMMIT`]. A second's hand-outs to a thousand integrations fall due as a
//! thousand rows at once; written during a refresh storm they delayed the refresh by up to
//! 25 ms (on SQLite behind the write lock, on PostgreSQL on a busy server; BENCHMARKS.md). Each
//! pass writes the events someone queued before the counts, so in a chain a count row (about
//! the last window) may follow a later event; the chain's order is the order of writing, as it
//! always was for counts.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::audit::{chain_key, row_hash, salt_of, Salt};
use super::audit_tally::Tally;
use super::lane::Crowds;
use super::{ServiceError, ServiceResult};
use crate::clock::SharedClock;
use crate::storage::audit::{ChainHeads, ChainLink, NewAuditEvent};
use crate::storage::Database;

/// Events queued before callers wait for room.
const QUEUE_CAPACITY: usize = 8192;
/// Events per transaction. Bounded because PostgreSQL takes one advisory lock per chain.
const MAX_BATCH: usize = 256;
/// Open hand-out counts at most; past this many they are all written at once.
const MAX_OPEN_COUNTS: usize = 8192;
/// Open counts past which a hand-out that would open one more is queued instead (and so waits
/// for room, like every other event) while the task writes the ones open.
const MAX_OPEN_COUNTS_AT_ALL: usize = 2 * MAX_OPEN_COUNTS;
/// With a hand-out window of zero, how long a batch of only hand-out rows (nobody waits for
/// their commit) waits for more to share its commit. Each commit costs the database a log flush, so under a stream of
/// hand-outs this turns hundreds of small commits per second into a few dozen full ones. An
/// awaited append or a flush ends the wait at once, so it delays no caller.
const LINGER: Duration = Duration::from_millis(20);
/// How long hand-out counts that fell due are held back while callers wait for a token load
/// or refresh ([`Crowds`]): at most this long between two passes that write every count due,
/// so crowds one after the other share it. A crowd waits for one provider call (at least the
/// provider's latency); anything longer than that is not a crowd worth making the log wait for.
pub const HOLD_AT_MOST: Duration = Duration::from_millis(250);
/// Hand-out counts per transaction. Before each the writer looks whether a crowd has begun
/// waiting, and on SQLite a refresh's writes get the write lock after at most one (~1,000
/// counts fall due at once after a second of hand-outs to a thousand integrations). Small,
/// because with the cores busy with a crowd a transaction of 64 took up to 20 ms.
const COUNTS_PER_COMMIT: usize = 32;

type Ack = oneshot::Sender<Result<i64, String>>;

/// An event queued by [`AuditWriter::enqueue`], to be committed.
#[derive(Debug)]
pub struct Appended(oneshot::Receiver<Result<i64, String>>);

impl Appended {
    /// Waits until the event is committed; returns its row id.
    pub async fn committed(self) -> ServiceResult<i64> {
        self.0
            .await
            .map_err(|_| stopped())?
            .map_err(|err| ServiceError::Internal(format!("audit write failed: {err}")))
    }
}

enum Message {
    Append(Box<NewAuditEvent>, Ack),
    /// An event nobody waits for, written in order with the others.
    Queued(Box<NewAuditEvent>),
    /// A hand-out: a row of its own with a window of zero, else one that found too many
    /// counts open (counted by the task).
    Count(Box<NewAuditEvent>),
    Flush(oneshot::Sender<()>),
}

/// Open hand-out counts, shared by the callers that count and the task that writes them.
#[derive(Debug)]
struct Counts {
    tally: Mutex<Tally>,
    window: Duration,
    /// Wakes the task when a count opens while none was open (it may be asleep with no due
    /// time), or when too many are open.
    opened: Notify,
}

impl Counts {
    fn new(window: Duration) -> Self {
        Self {
            tally: Mutex::new(Tally::new(window)),
            window,
            opened: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tally> {
        // The tally is consistent after every call: a panic elsewhere leaves nothing half-done.
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `event`; gives it back when it would open a count past
    /// [`MAX_OPEN_COUNTS_AT_ALL`].
    fn add(&self, event: NewAuditEvent) -> Option<NewAuditEvent> {
        let (first, open) = {
            let mut tally = self.lock();
            if tally.len() >= MAX_OPEN_COUNTS_AT_ALL {
                return Some(event);
            }
            let was_empty = tally.is_empty();
            let opened = tally.add(event, Instant::now());
            (opened && was_empty, tally.len())
        };
        if first || open > MAX_OPEN_COUNTS {
            self.opened.notify_one();
        }
        None
    }

    fn next_due(&self) -> Option<Instant> {
        self.lock().next_due()
    }
}

/// The task's way in, made on first use.
#[derive(Debug)]
struct Running {
    queue: mpsc::Sender<Message>,
    counts: Arc<Counts>,
}

impl Running {
    async fn send(&self, message: Message) -> ServiceResult<()> {
        self.queue.send(message).await.map_err(|_| stopped())
    }
}

/// The process's audit writer; clones share the queue. The task starts on first use, on the
/// runtime the writer was made on (else its first caller's), and ends when the last clone is
/// dropped.
#[derive(Debug, Clone, Default)]
pub struct AuditWriter {
    running: Arc<OnceLock<Running>>,
    /// Where the task runs: not on the refresh lane, whose caller may happen to be first.
    home: Option<tokio::runtime::Handle>,
}

/// What the writer task needs: the chains' salt, the database, the clock (for the salt's
/// genesis row on a fresh database) and the hand-out window.
pub struct WriterDeps {
    pub db: Database,
    pub salt: Arc<tokio::sync::OnceCell<Salt>>,
    pub clock: SharedClock,
    pub hand_out_window: Duration,
    /// Callers waiting for a token, and being answered: due hand-out counts are held back for
    /// them, for at most `hold_at_most` ([`HOLD_AT_MOST`]).
    pub crowds: Arc<Crowds>,
    pub hold_at_most: Duration,
}

impl AuditWriter {
    /// A writer whose task will run on the current runtime, whoever uses it first.
    pub fn on_current_runtime() -> Self {
        Self {
            running: Arc::default(),
            home: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Appends `event` and waits until it is committed; returns its row id.
    pub async fn append(
        &self,
        deps: impl FnOnce() -> WriterDeps,
        event: NewAuditEvent,
    ) -> ServiceResult<i64> {
        self.enqueue(deps, event).await?.committed().await
    }

    /// Queues `event` to be appended (waiting only for room in the queue); the commit is
    /// waited for with [`Appended::committed`]. A flush from now on writes it.
    pub async fn enqueue(
        &self,
        deps: impl FnOnce() -> WriterDeps,
        event: NewAuditEvent,
    ) -> ServiceResult<Appended> {
        let (ack, done) = oneshot::channel();
        self.send(deps, Message::Append(Box::new(event), ack))
            .await?;
        Ok(Appended(done))
    }

    /// Queues `event` to be written in order with every other event, without waiting for its
    /// commit (only for room in the queue). A failed write is logged by the task.
    pub async fn queue(
        &self,
        deps: impl FnOnce() -> WriterDeps,
        event: NewAuditEvent,
    ) -> ServiceResult<()> {
        self.send(deps, Message::Queued(Box::new(event))).await
    }

    /// Records the hand-out `event` without waiting for its commit: it is counted with
    /// hand-outs alike and written when its window ends (queued for a row of its own with a
    /// window of zero).
    pub async fn count_hand_out(
        &self,
        deps: impl FnOnce() -> WriterDeps,
        event: NewAuditEvent,
    ) -> ServiceResult<()> {
        let running = self.running(deps);
        let event = if running.counts.window.is_zero() {
            event
        } else {
            match running.counts.add(event) {
                None => return Ok(()),
                Some(too_many_open) => too_many_open,
            }
        };
        running.send(Message::Count(Box::new(event))).await
    }

    /// Waits until every event queued before this call has been written (or failed).
    pub async fn flush(&self) {
        let Some(running) = self.running.get() else {
            return;
        };
        let (ack, done) = oneshot::channel();
        if running.queue.send(Message::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    async fn send(&self, deps: impl FnOnce() -> WriterDeps, message: Message) -> ServiceResult<()> {
        self.running(deps).send(message).await
    }

    /// The task's way in, starting the task on first use.
    fn running(&self, deps: impl FnOnce() -> WriterDeps) -> &Running {
        self.running.get_or_init(|| {
            let deps = deps();
            let counts = Arc::new(Counts::new(deps.hand_out_window));
            let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
            let task = run(receiver, deps, counts.clone());
            match &self.home {
                Some(home) => drop(home.spawn(task)),
                None => drop(tokio::spawn(task)),
            }
            Running {
                queue: sender,
                counts,
            }
        })
    }
}

fn stopped() -> ServiceError {
    ServiceError::Internal("the audit writer stopped".to_owned())
}

/// Chain heads are remembered between batches for at most this long: pruning (which appends
/// a checkpoint) only ever touches rows far older than that, and any other writer's append
/// is caught by the unique index anyway.
const HEADS_KEPT_FOR: Duration = Duration::from_secs(30);
/// Heads remembered at most (one entry per recently active user, ~180 bytes each). A head
/// saves a query only for a user with more events to come soon: the background refresher,
/// writing one event for each of thousands of users a second, would otherwise fill 50,000
/// entries (9 MB) that are never read again (BENCHMARKS.md, session 9). Past this many the
/// heads are dropped, table and all, and read afresh as needed.
const HEADS_KEPT_AT_MOST: usize = 4_096;

async fn run(mut receiver: mpsc::Receiver<Message>, deps: WriterDeps, counts: Arc<Counts>) {
    let mut messages = Vec::with_capacity(MAX_BATCH);
    let mut heads = ChainHeads::new();
    let mut heads_since = Instant::now();
    let mut hold = Hold::default();
    loop {
        let holding = hold.until(&deps);
        let open = receive(
            &mut receiver,
            &mut messages,
            &counts,
            !hold.counts.is_empty(),
            holding,
            &deps.crowds,
        )
        .await;
        // Counted hand-outs wait in the tally anyway; only a row per hand-out needs company.
        if !messages.is_empty() && counts.window.is_zero() {
            linger(&mut receiver, &mut messages).await;
        }
        if heads_since.elapsed() > HEADS_KEPT_FOR || heads.len() > HEADS_KEPT_AT_MOST {
            // Not `clear()`: that keeps the table's memory.
            heads = ChainHeads::new();
            heads_since = Instant::now();
        }
        let holding = hold.until(&deps).is_some();
        let batch = Batch::of(
            std::mem::take(&mut messages),
            &counts,
            &mut hold,
            !open,
            holding,
        );
        write_batch(&deps, &mut heads, &mut hold, batch).await;
        if !holding {
            hold.wrote();
        }
        if !open {
            return;
        }
    }
}

/// Due hand-out counts held back for crowds ([`Crowds`]), and since when the writer has held
/// counts back without catching up.
#[derive(Default)]
struct Hold {
    since: Option<Instant>,
    counts: Vec<NewAuditEvent>,
}

impl Hold {
    /// Until when due counts are held back now: `None` when there is no crowd (nobody waits,
    /// and no crowd's answers are going out), or counts have been held back for
    /// [`WriterDeps::hold_at_most`] since the writer last caught up.
    fn until(&mut self, deps: &WriterDeps) -> Option<Instant> {
        if !deps.crowds.any() {
            return None;
        }
        let until = *self.since.get_or_insert_with(Instant::now) + deps.hold_at_most;
        (Instant::now() < until).then_some(until)
    }

    /// After a pass that took the counts due: when it wrote them all, the next crowd may
    /// hold counts back for the whole [`WriterDeps::hold_at_most`] again.
    fn wrote(&mut self) {
        if self.counts.is_empty() {
            self.since = None;
        }
    }
}

/// Waits for messages, a count opening while none was open, or counts to be due: the oldest
/// open count to fall due, or, `holding` them, the crowd to disperse or the hold to end.
/// False once every sender is gone.
async fn receive(
    receiver: &mut mpsc::Receiver<Message>,
    messages: &mut Vec<Message>,
    counts: &Counts,
    held: bool,
    holding: Option<Instant>,
    crowds: &Crowds,
) -> bool {
    // A count opened after `next_due` was read has left a permit here: nothing is missed.
    let opened = counts.opened.notified();
    // Counts held back before are due as soon as the hold ends.
    let due = if held {
        Some(Instant::now())
    } else {
        counts.next_due()
    };
    let received = receiver.recv_many(messages, MAX_BATCH);
    let fall_due = async {
        match (due, holding) {
            (Some(_), Some(until)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(until.into()) => {}
                    () = crowds.dispersed() => {}
                }
            }
            (Some(due), None) => tokio::time::sleep_until(due.into()).await,
            (None, _) => std::future::pending().await,
        }
    };
    tokio::select! {
        count = received => count > 0,
        () = opened => true,
        () = fall_due => true,
    }
}

/// What one pass writes: events of their own and whom to answer, then hand-out counts.
struct Batch {
    /// Appended and queued events (and hand-outs with a window of zero), in order.
    events: Vec<NewAuditEvent>,
    acks: Vec<Option<Ack>>,
    /// Counts held back before, then those due now.
    counts: Vec<NewAuditEvent>,
    /// Whether writing the counts may stop for a crowd: not on a flush, on shutdown, or with
    /// too many open (the bound on memory).
    may_hold: bool,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Batch {
    /// Sorts `messages` into a batch with the counts due (none while `holding` them back);
    /// everything open is taken on a flush, on shutdown (`closing`) or when too much is open.
    fn of(
        messages: Vec<Message>,
        counts: &Counts,
        hold: &mut Hold,
        closing: bool,
        holding: bool,
    ) -> Self {
        let mut events = Vec::with_capacity(messages.len());
        let mut acks = Vec::with_capacity(messages.len());
        let mut flushes = Vec::new();
        let window_is_zero = counts.window.is_zero();
        let now = Instant::now();
        let mut tally = counts.lock();
        for message in messages {
            match message {
                Message::Append(event, ack) => {
                    events.push(*event);
                    acks.push(Some(ack));
                }
                Message::Count(event) if !window_is_zero => {
                    tally.add(*event, now);
                }
                // Written as rows of their own, in order; nobody waits for them.
                Message::Queued(event) | Message::Count(event) => {
                    events.push(*event);
                    acks.push(None);
                }
                Message::Flush(ack) => flushes.push(ack),
            }
        }
        let too_many = tally.len() + hold.counts.len() > MAX_OPEN_COUNTS;
        let take_all = closing || !flushes.is_empty() || too_many;
        let mut counts = Vec::new();
        if take_all || !holding {
            counts = std::mem::take(&mut hold.counts);
            counts.append(&mut if take_all {
                tally.take_all()
            } else {
                tally.take_due(now)
            });
        }
        Self {
            events,
            acks,
            counts,
            may_hold: !take_all,
            flushes,
        }
    }
}

/// Lets a batch of queued events gather more for up to [`LINGER`], unless it is full or
/// someone waits for it.
async fn linger(receiver: &mut mpsc::Receiver<Message>, messages: &mut Vec<Message>) {
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut checked = 0;
    while messages.len() < MAX_BATCH && !messages[checked..].iter().any(Message::is_awaited) {
        checked = messages.len();
        let room = MAX_BATCH - messages.len();
        match tokio::time::timeout_at(deadline, receiver.recv_many(messages, room)).await {
            Ok(received) if received > 0 => {}
            _ => return,
        }
    }
}

impl Message {
    fn is_awaited(&self) -> bool {
        match self {
            Message::Append(..) => true,
            Message::Queued(_) | Message::Count(_) => false,
            Message::Flush(_) => true,
        }
    }
}

/// Writes the batch, then answers its flushes.
async fn write_batch(deps: &WriterDeps, heads: &mut ChainHeads, hold: &mut Hold, batch: Batch) {
    let Batch {
        events,
        acks,
        counts,
        may_hold,
        flushes,
    } = batch;
    write_answered(deps, heads, events, acks).await;
    write_counts(deps, heads, hold, counts, may_hold).await;
    for flush in flushes {
        let _ = flush.send(());
    }
}

/// Writes `events` (one transaction per [`MAX_BATCH`]) and answers each appender with its row
/// id (or the error).
async fn write_answered(
    deps: &WriterDeps,
    heads: &mut ChainHeads,
    mut events: Vec<NewAuditEvent>,
    acks: Vec<Option<Ack>>,
) {
    let mut acks = acks.into_iter();
    while !events.is_empty() {
        let rest = events.split_off(events.len().min(MAX_BATCH));
        let written = events.len();
        let result = commit(deps, heads, std::mem::replace(&mut events, rest)).await;
        if let Err(err) = &result {
            tracing::error!(error = %err, events = written, "audit events could not be written");
        }
        for (index, ack) in acks.by_ref().take(written).enumerate() {
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
}

/// Writes hand-out counts, [`COUNTS_PER_COMMIT`] to a transaction; once a crowd waits (the
/// events before them may have taken a while, and so may each transaction), the rest are held
/// back for it, unless not `may_hold`.
async fn write_counts(
    deps: &WriterDeps,
    heads: &mut ChainHeads,
    hold: &mut Hold,
    counts: Vec<NewAuditEvent>,
    may_hold: bool,
) {
    let mut counts = counts.into_iter().peekable();
    while counts.peek().is_some() {
        if may_hold && hold.until(deps).is_some() {
            hold.counts.extend(counts);
            return;
        }
        let chunk: Vec<NewAuditEvent> = counts.by_ref().take(COUNTS_PER_COMMIT).collect();
        let written = chunk.len();
        if let Err(err) = commit(deps, heads, chunk).await {
            tracing::error!(error = %err, events = written, "audit events could not be written");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::services::audit::{event, RequestContext};
    use crate::storage::audit::Outcome;
    use crate::storage::{Page, PoolSettings};

    async fn database() -> Database {
        let db = Database::connect("sqlite::memory:", PoolSettings::default())
            .await
            .expect("database");
        db.migrate().await.expect("migrated");
        db
    }

    fn deps(db: &Database, crowds: &Arc<Crowds>, hold_at_most: Duration) -> WriterDeps {
        WriterDeps {
            db: db.clone(),
            salt: Arc::default(),
            clock: Arc::new(SystemClock),
            hand_out_window: Duration::from_millis(50),
            crowds: crowds.clone(),
            hold_at_most,
        }
    }

    fn audited(action: &str, user: &str) -> NewAuditEvent {
        let (user, client) = (Some(user), RequestContext::default());
        event(
            action,
            Outcome::Success,
            user,
            user,
            &client,
            chrono::Utc::now(),
        )
    }

    fn hand_out(user: &str) -> NewAuditEvent {
        audited("token_handed_out", user)
    }

    async fn rows(db: &Database, action: &str) -> usize {
        let page = Page {
            after: None,
            limit: 1000,
        };
        let listed = db.list_audit_events(None, page).await.expect("listed");
        listed
            .items
            .iter()
            .filter(|row| row.action == action)
            .count()
    }

    /// Polls for up to 5 s until `action` has `expected` rows.
    async fn eventually(db: &Database, action: &str, expected: usize) -> bool {
        for _ in 0..100 {
            if rows(db, action).await == expected {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// A writer on a fresh database, and the crowds it holds counts back for.
    struct Fixture {
        db: Database,
        crowds: Arc<Crowds>,
        writer: AuditWriter,
        hold_at_most: Duration,
    }

    impl Fixture {
        async fn new(hold_at_most: Duration) -> Self {
            Self {
                db: database().await,
                crowds: Arc::new(Crowds::new(Duration::ZERO)),
                writer: AuditWriter::on_current_runtime(),
                hold_at_most,
            }
        }

        fn deps(&self) -> WriterDeps {
            deps(&self.db, &self.crowds, self.hold_at_most)
        }

        async fn count_hand_out(&self) {
            let counted = self
                .writer
                .count_hand_out(|| self.deps(), hand_out("alice"));
            counted.await.expect("counted");
        }

        async fn hand_out_rows(&self) -> usize {
            rows(&self.db, "token_handed_out").await
        }
    }

    #[tokio::test]
    async fn due_counts_wait_while_a_crowd_waits_but_appends_do_not() {
        let fixture = Fixture::new(Duration::from_secs(30)).await;
        let waiting = fixture.crowds.wait();
        fixture.count_hand_out().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(fixture.hand_out_rows().await, 0, "written for a crowd");
        let consent = audited("consent_recorded", "bob");
        let appended = fixture.writer.append(|| fixture.deps(), consent);
        let id = tokio::time::timeout(Duration::from_secs(5), appended).await;
        assert!(
            matches!(id, Ok(Ok(_))),
            "an append waited for the crowd: {id:?}"
        );
        assert_eq!(fixture.hand_out_rows().await, 0, "written with the append");
        drop(waiting);
        assert!(
            eventually(&fixture.db, "token_handed_out", 1).await,
            "not written once the crowd left"
        );
    }

    #[tokio::test]
    async fn due_counts_wait_while_a_woken_crowd_is_answered() {
        let mut fixture = Fixture::new(Duration::from_secs(30)).await;
        fixture.crowds = Arc::new(Crowds::new(Duration::from_millis(1500)));
        let waiting = fixture.crowds.wait();
        fixture.count_hand_out().await;
        drop(waiting);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            fixture.hand_out_rows().await,
            0,
            "written while the crowd's answers go out"
        );
        assert!(
            eventually(&fixture.db, "token_handed_out", 1).await,
            "not written once the answers went out"
        );
    }

    #[tokio::test]
    async fn a_crowd_holds_due_counts_back_for_a_bounded_time() {
        let fixture = Fixture::new(Duration::from_millis(600)).await;
        let _waiting = fixture.crowds.wait();
        fixture.count_hand_out().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fixture.hand_out_rows().await, 0, "not held back");
        assert!(
            eventually(&fixture.db, "token_handed_out", 1).await,
            "held back for good"
        );
    }

    #[tokio::test]
    async fn a_flush_writes_the_counts_held_back() {
        let fixture = Fixture::new(Duration::from_secs(30)).await;
        let _waiting = fixture.crowds.wait();
        fixture.count_hand_out().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        fixture.writer.flush().await;
        assert_eq!(fixture.hand_out_rows().await, 1);
    }

    #[tokio::test]
    async fn crowds_one_after_the_other_share_one_hold_until_the_writer_catches_up() {
        let db = database().await;
        let crowds = Arc::new(Crowds::new(Duration::ZERO));
        let deps = deps(&db, &crowds, Duration::from_millis(200));
        let mut hold = Hold::default();
        let first = crowds.wait();
        assert!(hold.until(&deps).is_some());
        drop(first);
        assert!(hold.until(&deps).is_none(), "held with nobody waiting");
        // A pass that took the counts due but held some back for a crowd that came meanwhile.
        hold.counts.push(hand_out("alice"));
        hold.wrote();
        let _second = crowds.wait();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            hold.until(&deps).is_none(),
            "the second crowd held for longer"
        );
        // Caught up: the next crowd may hold counts back again.
        hold.counts.clear();
        hold.wrote();
        assert!(hold.until(&deps).is_some());
    }

    #[test]
    fn a_flush_shutdown_or_too_many_counts_takes_the_held_counts_and_may_not_hold() {
        let counts = Counts::new(Duration::from_millis(50));
        let held = || Hold {
            counts: (0..3).map(|n| hand_out(&format!("user-{n}"))).collect(),
            ..Hold::default()
        };
        let (flush, _flushed) = oneshot::channel();
        let mut hold = held();
        let batch = Batch::of(vec![Message::Flush(flush)], &counts, &mut hold, false, true);
        assert_eq!((batch.counts.len(), batch.may_hold), (3, false));
        assert!(hold.counts.is_empty());
        let mut hold = held();
        let batch = Batch::of(Vec::new(), &counts, &mut hold, true, true);
        assert_eq!((batch.counts.len(), batch.may_hold), (3, false));
        // While holding, without any of these, nothing is taken and the held counts stay.
        let mut hold = held();
        let batch = Batch::of(Vec::new(), &counts, &mut hold, false, true);
        assert_eq!((batch.counts.len(), hold.counts.len()), (0, 3));
        hold.counts = (0..=MAX_OPEN_COUNTS)
            .map(|n| hand_out(&format!("user-{n}")))
            .collect();
        let batch = Batch::of(Vec::new(), &counts, &mut hold, false, true);
        assert_eq!(batch.counts.len(), MAX_OPEN_COUNTS + 1);
        assert!(!batch.may_hold, "too many counts held back");
    }

    #[tokio::test]
    async fn writing_counts_stops_at_a_transaction_boundary_while_a_crowd_waits() {
        let db = database().await;
        let crowds = Arc::new(Crowds::new(Duration::ZERO));
        let deps = deps(&db, &crowds, Duration::from_secs(30));
        let counts = || {
            (0..200)
                .map(|n| hand_out(&format!("user-{n}")))
                .collect::<Vec<_>>()
        };
        let (mut heads, mut hold) = (ChainHeads::new(), Hold::default());
        let waiting = crowds.wait();
        write_counts(&deps, &mut heads, &mut hold, counts(), true).await;
        assert_eq!(rows(&db, "token_handed_out").await, 0);
        assert_eq!(hold.counts.len(), 200);
        // Not on a flush or at shutdown.
        write_counts(&deps, &mut heads, &mut hold, counts(), false).await;
        assert_eq!(rows(&db, "token_handed_out").await, 200);
        // Once the crowd is gone, the next pass takes the held ones first.
        drop(waiting);
        let counts = Counts::new(deps.hand_out_window);
        let batch = Batch::of(Vec::new(), &counts, &mut hold, false, false);
        assert_eq!(batch.counts.len(), 200);
        assert!(hold.counts.is_empty());
    }
}
