//! The priority lane: a one-thread runtime for the work a crowd of requests waits on.
//!
//! When many callers miss the token cache on the same integration at once (a refresh storm:
//! a thousand callers on one expired token), one of them loads the token and refreshes it
//! while the rest wait for its result. On the request runtime, every database and provider
//! round trip of that one caller would queue behind all the requests that arrived with it
//! (tokio runs woken tasks in the order they woke), so the provider would be called only after
//! the whole crowd had been read: 15–25 ms for a thousand requests on two cores
//! (BENCHMARKS.md). On a thread of its own, the loader goes on as soon as each answer arrives;
//! the operating system shares the cores between the two runtimes.
//!
//! The lane has its own outbound HTTP client and, on PostgreSQL, its own database pool: a
//! socket is driven by the runtime that opened it, which a crowded runtime does only every so
//! many tasks, so a connection opened by a request would take the lane's provider call or
//! query back onto the crowded runtime (with the request runtime's pool, PostgreSQL storms
//! called the provider 7–22 ms after their first request, BENCHMARKS.md).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{ServiceError, ServiceResult};
use crate::storage::Database;

pub struct Lane {
    /// `None` only while dropping.
    runtime: Option<Runtime>,
    handle: Handle,
    /// Outbound client whose connections live on the lane.
    pub http: reqwest::Client,
    /// The database through connections opened on the lane ([`Database::separate_pool`]).
    pub db: Database,
}

/// Connections of the lane's own PostgreSQL pool: loaders of different tokens at once (each
/// a few short queries) share them.
const LANE_DB_CONNECTIONS: u32 = 4;

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").finish_non_exhaustive()
    }
}

impl Lane {
    /// Starts the lane's thread; `http` must not have been used yet (see the module docs).
    /// The lane reaches `db` through a pool of its own.
    pub fn start(http: reqwest::Client, db: &Database) -> std::io::Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("oauth-lane")
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            http,
            db: db.separate_pool(LANE_DB_CONNECTIONS),
        })
    }

    /// Runs `work` on the lane and waits for its result. The work goes on if the caller goes
    /// away (a refresh the provider may already have answered must be stored).
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = ServiceResult<T>> + Send + 'static,
    ) -> ServiceResult<T> {
        self.handle
            .spawn(work)
            .await
            .map_err(|err| ServiceError::Internal(format!("lane task failed: {err}")))?
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its thread stops, which is not allowed on a runtime
        // thread (the last handle on the lane may even be dropped on the lane's own thread).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Callers waiting in memory for a token load or refresh under way (a crowd on one expired
/// token), and for [`ANSWERING`] after the last of them was woken, while their answers go out.
/// Background work that can wait holds back while there are any: the audit writer's hand-out
/// counts that fall due (up to a thousand rows a second under load) would otherwise be written
/// on the same cores, and on SQLite behind the same write lock, as the refresh the crowd waits
/// for and the crowd's answers (BENCHMARKS.md, sessions 16 and 17).
#[derive(Debug)]
pub struct Crowds {
    waiting: AtomicUsize,
    dispersed: Notify,
    /// When a caller was last woken, in nanoseconds after `since` (0: never).
    woken_at: AtomicU64,
    since: Instant,
    answering: Duration,
}

/// How long a crowd is still there after its last caller was woken: a thousand answers take
/// 30–60 ms to go out on two cores (BENCHMARKS.md, session 17).
pub const ANSWERING: Duration = Duration::from_millis(100);

impl Default for Crowds {
    fn default() -> Self {
        Self::new(ANSWERING)
    }
}

/// One caller's place in [`Crowds`], from the moment it waits until it is woken.
pub struct Waiting<'a>(&'a Crowds);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Before leaving: once the count is 0, the time must already say the answers go out.
        self.0.woken_at.store(self.0.nanos_now(), Ordering::Release);
        if self.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.dispersed.notify_waiters();
        }
    }
}

impl Crowds {
    /// Crowds that are there for `answering` after their last caller was woken.
    pub fn new(answering: Duration) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            dispersed: Notify::new(),
            woken_at: AtomicU64::new(0),
            since: Instant::now(),
            answering,
        }
    }

    pub fn wait(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(self)
    }

    /// Whether anyone is waiting now, or was woken less than `answering` ago.
    pub fn any(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0 || self.answering_until().is_some()
    }

    /// Completes once nobody is waiting, and the last caller was woken `answering` ago.
    pub async fn dispersed(&self) {
        loop {
            let dispersed = self.dispersed.notified();
            tokio::pin!(dispersed);
            // Registered before the look, so that the last caller leaving in between is seen.
            dispersed.as_mut().enable();
            if self.waiting.load(Ordering::Acquire) > 0 {
                dispersed.await;
                continue;
            }
            match self.answering_until() {
                // A crowd may gather again meanwhile: look again after.
                Some(until) => tokio::time::sleep_until(until).await,
                None => return,
            }
        }
    }

    /// Until when the last crowd's answers go out, if that is still to come.
    fn answering_until(&self) -> Option<Instant> {
        let woken_at = match self.woken_at.load(Ordering::Acquire) {
            0 => return None,
            nanos => self.since + Duration::from_nanos(nanos),
        };
        let until = woken_at + self.answering;
        (Instant::now() < until).then_some(until)
    }

    /// Now, in nanoseconds after `since`; never 0 (which means "never woken").
    fn nanos_now(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_lane_thread_and_the_lane_can_be_dropped_anywhere() {
        let db = Database::connect("sqlite::memory:", crate::storage::PoolSettings::default())
            .await
            .expect("database");
        let lane = std::sync::Arc::new(Lane::start(reqwest::Client::new(), &db).expect("lane"));
        let thread = lane
            .run(async { Ok(std::thread::current().name().map(str::to_owned)) })
            .await
            .expect("ran");
        assert_eq!(thread.as_deref(), Some("oauth-lane"));
        // The last handle dropped on the lane's own thread: shutting down must not panic.
        let (done, finished) = tokio::sync::oneshot::channel();
        let last = lane.clone();
        let handle = lane.handle.clone();
        drop(lane);
        handle.spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            drop(last);
            let _ = done.send(());
        });
        assert!(
            finished.await.is_ok(),
            "the lane's drop panicked on its thread"
        );
    }

    #[tokio::test]
    async fn a_crowd_is_there_until_its_answers_have_had_time_to_go_out() {
        let crowds = Crowds::new(Duration::from_millis(200));
        assert!(!crowds.any(), "no crowd yet");
        let (first, second) = (crowds.wait(), crowds.wait());
        drop(first);
        assert!(crowds.any(), "one caller still waits");
        let began = Instant::now();
        drop(second);
        assert!(crowds.any(), "its answers are still going out");
        crowds.dispersed().await;
        assert!(
            began.elapsed() >= Duration::from_millis(200),
            "dispersed early"
        );
        assert!(!crowds.any());
        // A crowd gathering while the last one's answers go out is waited for too.
        drop(crowds.wait());
        let dispersed = crowds.dispersed();
        tokio::pin!(dispersed);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), dispersed.as_mut())
                .await
                .is_err(),
            "dispersed while answering"
        );
        let again = crowds.wait();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), dispersed.as_mut())
                .await
                .is_err(),
            "dispersed while the new crowd waits"
        );
        let left = Instant::now();
        drop(again);
        let done = tokio::time::timeout(Duration::from_secs(5), dispersed).await;
        assert!(done.is_ok(), "never dispersed");
        assert!(
            left.elapsed() >= Duration::from_millis(200),
            "the new crowd's answers were not waited for"
        );
        assert!(!crowds.any());
    }
}
