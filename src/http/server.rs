//! The accept loop: what `axum::serve` does, plus the idle timeout and the connection limit it
//! cannot set.
//!
//! Every client connection costs hyper about 16–24 KiB of buffers for as long as it stays open
//! (BENCHMARKS.md, sessions 7 and 8), and under `axum::serve` a connection that never sends
//! (another request on a keep-alive connection, or the rest of a slowly sent header) stayed
//! open for ever. Here hyper's header-read timeout is set: a connection without a complete
//! request head for `idle_timeout` is closed, whether it is idle between requests or trickling
//! its headers in. Requests in progress are not limited by it (the 30 s request timeout is).
//! And at most `max_connections` are open, which bounds the buffers a flood of connections can
//! hold (see [`ConnectionSettings::max_connections`]).
//!
//! Half-close mode: while a request is being handled, hyper does not read the connection to
//! notice that the client went away. A handler therefore runs to its end even when the browser
//! or the proxy in front hangs up: a callback cut off after its code exchange would otherwise
//! lose the user's grant (the code is single-use, the sign-in state already consumed). That
//! read would also have reserved a second 8 KiB buffer per connection, while the first one is
//! still held by the request's headers: 7–8 MiB under a burst of 1,000 connections
//! (BENCHMARKS.md, session 9). Every handler is bounded by the request timeout all the same.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tower::ServiceExt;

/// The idle timeout of a connection opened while `keepalive_connections` or more are open.
pub const BUSY_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many client connections may be open, and for how long they may stay idle.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    /// `OAUTH_HTTP_IDLE_TIMEOUT_SECONDS`.
    pub idle_timeout: Duration,
    /// `OAUTH_HTTP_KEEPALIVE_CONNECTIONS`: a connection opened while this many are open is
    /// closed after [`BUSY_IDLE_TIMEOUT`] without a request instead. After a burst of
    /// simultaneous clients, their idle keep-alive connections would otherwise hold ~19 KiB of
    /// hyper's buffers each for the whole idle timeout (BENCHMARKS.md, session 9); Nginx, short
    /// of connections, closes idle keep-alive ones likewise.
    pub keepalive_connections: usize,
    /// `OAUTH_MAX_CONNECTIONS`: connections open at once. A client that connects while this
    /// many are open waits for a place (none is refused), and for each waiting client one
    /// open connection closes after its next response, which says `Connection: close`. Idle
    /// connections are not cut (a client may be sending on one); they make room at their idle
    /// timeout. Each open connection holds its buffers. More connections than requests the
    /// service handles at once still shorten a crowd that asks at once and then waits (for a
    /// refresh, say): their requests are read meanwhile (BENCHMARKS.md, sessions 12 and 18).
    pub max_connections: usize,
}

/// The listen backlog asked for; Linux caps it at `net.core.somaxconn` (4096 by default).
/// Clients beyond `max_connections` wait in it: with tokio's default of 128, a crowd of them
/// overflowed it and their connection attempts were retried by TCP a second later
/// (BENCHMARKS.md, session 12).
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with [`LISTEN_BACKLOG`], as `TcpListener::bind` otherwise makes it
/// (address reuse on Unix, so a restart need not wait for old connections' `TIME_WAIT`).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `router` on `listener` until `shutdown` completes, then waits for the connections
/// to finish their requests (idle ones are closed at once), as `axum::serve` with graceful
/// shutdown does. Handlers see the peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ConnectionSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let open_files = raise_open_files_limit(settings.max_connections);
    let calm = http1(settings.idle_timeout);
    let busy = http1(settings.idle_timeout.min(BUSY_IDLE_TIMEOUT));
    let max_waiting = waiting_room(open_files, settings.max_connections);
    let mut slots = ConnectionSlots::new(settings.max_connections, max_waiting);
    tokio::pin!(shutdown);
    loop {
        let (slot, stream, peer) = tokio::select! {
            next = slots.next_connection(&listener) => match next {
                Some(next) => next,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let builder = if slots.open() > settings.keepalive_connections {
            &busy
        } else {
            &calm
        };
        let place = slot.place.clone();
        let router = router
            .clone()
            .map_request(move |mut request: axum::http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            })
            .map_response(move |response| place.close_if_room_wanted(response));
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
        tokio::spawn(serve_connection(connection, slot, peer));
    }
    drop(listener);
    slots.close_all().await;
}

/// Descriptors the service may hold besides its client connections: outbound connections to
/// providers (256 sign-ins and 128 background refreshes at once by default) and to the
/// database, listeners, files.
const OTHER_DESCRIPTORS: u64 = 1024;

/// Raises the soft open-files limit to the hard one, as servers commonly do: every open or
/// waiting client connection is a file descriptor, and the usual soft limit (1,024) is below
/// what the default connection limit may need. Past the limit, accepting and outbound
/// connections fail. Warns if the limit stays below what `max_connections` may need (with
/// [`MIN_WAITING`] clients waiting). Returns the limit now in force, if known.
fn raise_open_files_limit(max_connections: usize) -> Option<u64> {
    let clients = u64::try_from(max_connections.saturating_add(MIN_WAITING)).unwrap_or(u64::MAX);
    let wanted = clients.saturating_add(OTHER_DESCRIPTORS);
    let raised = rlimit::increase_nofile_limit(u64::MAX);
    match &raised {
        Ok(limit) if *limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open-files limit is below what OAUTH_MAX_CONNECTIONS may need: raise it \
             (ulimit -n, systemd LimitNOFILE=) or lower OAUTH_MAX_CONNECTIONS"
        ),
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(err) => tracing::warn!(error = %err, "the open-files limit could not be raised"),
    }
    raised.ok()
}

/// How many clients may wait for a place in the accept loop: what the open-files limit leaves
/// after the open connections and [`OTHER_DESCRIPTORS`], between [`MIN_WAITING`] and
/// [`MAX_WAITING`]; [`MIN_WAITING`] when the limit is unknown.
fn waiting_room(open_files: Option<u64>, max_connections: usize) -> usize {
    let Some(limit) = open_files else {
        return MIN_WAITING;
    };
    let reserved = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(OTHER_DESCRIPTORS);
    let spare = usize::try_from(limit.saturating_sub(reserved)).unwrap_or(usize::MAX);
    spare.clamp(MIN_WAITING, MAX_WAITING)
}

/// HTTP/1.1 only, as under `axum::serve` with axum's default features.
fn http1(idle_timeout: Duration) -> Builder {
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .half_close(true);
    builder
}

/// Drives one connection until it ends; at shutdown lets it finish the request in progress
/// first (an idle one closes at once). Gives its slot back at the end.
async fn serve_connection<C>(connection: C, mut slot: Slot, peer: SocketAddr)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = slot.shutdown.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = ended {
        tracing::debug!(error = %err, %peer, "connection ended with an error");
    }
}

/// Clients accepted while every place was taken wait in the accept loop, at most this many
/// (as many as the listen backlog holds), each with a socket and nothing of hyper's yet;
/// further ones wait in the listen backlog. Only the clients accepted are counted as waiting,
/// and each response closes its connection only while a counted client waits: with at most
/// 256 counted, a crowd's answers could all go out before the rest of the crowd had been
/// taken in from the backlog, and those clients then waited for an idle connection's timeout
/// (5 s under load) although the connections they needed had just answered (BENCHMARKS.md,
/// session 14).
const MAX_WAITING: usize = LISTEN_BACKLOG as usize;
/// Clients that may wait in the accept loop whatever the open-files limit.
const MIN_WAITING: usize = 256;

/// The open connections: at most their number at once; the clients waiting for a place; the
/// signal that the service shuts down.
struct ConnectionSlots {
    max: usize,
    /// Clients accepted to wait, at most ([`waiting_room`]).
    max_waiting: usize,
    free: Arc<Semaphore>,
    /// In the order they came; only the accept loop touches it.
    waiting: VecDeque<(TcpStream, SocketAddr)>,
    room: Arc<Room>,
    shutdown: watch::Sender<()>,
}

/// How many waiting clients still need an open connection to close for them.
///
/// Each response marked `Connection: close` promises its place to one waiting client, so
/// a crowd of N waiting clients closes N connections, not every open one (which made every
/// client of a full service connect again: BENCHMARKS.md, session 13).
#[derive(Default)]
struct Room {
    /// Waiting clients without a promised place.
    wanted: AtomicUsize,
}

impl Room {
    /// Takes one wanted place, if any: the caller's connection closes to make it.
    fn promise(&self) -> bool {
        self.wanted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |wanted| {
                wanted.checked_sub(1)
            })
            .is_ok()
    }
}

/// One open connection's place; given back when this is dropped.
struct Slot {
    place: Arc<Place>,
    _permit: OwnedSemaphorePermit,
    shutdown: watch::Receiver<()>,
}

/// What a connection's responses and its end share.
struct Place {
    room: Arc<Room>,
    /// This connection's place is promised to a waiting client (its last response said
    /// `Connection: close`).
    promised: AtomicBool,
}

impl Place {
    /// `Connection: close` on the response when a client waits for a place: the client learns
    /// from the response itself that the connection ends, so nothing it sends next is lost
    /// (closing an idle keep-alive connection instead races with the client's next request on
    /// it, which then fails: hundreds of failed sign-ins in a burst of 1,000, BENCHMARKS.md
    /// session 12).
    fn close_if_room_wanted(
        &self,
        mut response: axum::response::Response,
    ) -> axum::response::Response {
        if !self.promised.load(Ordering::Acquire) && self.room.promise() {
            self.promised.store(true, Ordering::Release);
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl Drop for Slot {
    /// A connection that ends unasked (its client closed it, its idle timeout) gives its
    /// place to a waiting client that was counted as wanting one: one fewer must close. (The
    /// permit is released after this, when the fields drop.)
    fn drop(&mut self) {
        if !self.place.promised.load(Ordering::Acquire) {
            self.place.room.promise();
        }
    }
}

impl ConnectionSlots {
    fn new(max: usize, max_waiting: usize) -> Self {
        Self {
            max,
            max_waiting,
            free: Arc::new(Semaphore::new(max)),
            waiting: VecDeque::new(),
            room: Arc::default(),
            shutdown: watch::Sender::new(()),
        }
    }

    /// Connections open now.
    fn open(&self) -> usize {
        self.max.saturating_sub(self.free.available_permits())
    }

    /// The next connection and its slot: the first waiting client's once a place is free,
    /// else a newly accepted one. A client that finds every place taken waits, and one open
    /// connection closes after its next response to make room for it. Cancel-safe: the
    /// waiting clients stay in `self`.
    async fn next_connection(
        &mut self,
        listener: &TcpListener,
    ) -> Option<(Slot, TcpStream, SocketAddr)> {
        loop {
            if self.waiting.is_empty() {
                let (stream, peer) = accept(listener).await;
                match self.free.clone().try_acquire_owned() {
                    Ok(permit) => return Some((self.slot(permit), stream, peer)),
                    Err(TryAcquireError::Closed) => return None,
                    Err(TryAcquireError::NoPermits) => self.wait(stream, peer),
                }
                continue;
            }
            let room_to_wait = self.waiting.len() < self.max_waiting;
            tokio::select! {
                biased;
                permit = self.free.clone().acquire_owned() => {
                    let permit = permit.ok()?;
                    if let Some((stream, peer)) = self.waiting.pop_front() {
                        return Some((self.slot(permit), stream, peer));
                    }
                }
                (stream, peer) = accept(listener), if room_to_wait => self.wait(stream, peer),
            }
        }
    }

    fn wait(&mut self, stream: TcpStream, peer: SocketAddr) {
        tracing::debug!(
            open = self.max,
            waiting = self.waiting.len() + 1,
            "connection limit reached: one open connection closes after its next response"
        );
        crate::metrics::connection_limit_wait();
        self.waiting.push_back((stream, peer));
        self.room.wanted.fetch_add(1, Ordering::AcqRel);
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            place: Arc::new(Place {
                room: self.room.clone(),
                promised: AtomicBool::new(false),
            }),
            _permit: permit,
            shutdown: self.shutdown.subscribe(),
        }
    }

    /// Asks every connection to close after its request in progress (idle ones at once) and
    /// waits until all are closed. Clients still waiting for a place are closed unserved.
    async fn close_all(&mut self) {
        self.waiting.clear();
        self.shutdown.send_replace(());
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.free.acquire_many(all).await;
    }
}

/// The next connection. Errors that concern one connection only are skipped; others (out of
/// file descriptors, say) are logged and retried after a second, as `axum::serve` does.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "TCP_NODELAY not set");
                }
                return (stream, peer);
            }
            Err(err) if is_connection_error(&err) => {}
            Err(err) => {
                tracing::error!(error = %err, "accepting a connection failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soft open-files limit is raised to the hard one before serving.
    #[test]
    fn serving_raises_the_open_files_limit_to_the_hard_one() {
        let (_, hard) = rlimit::Resource::NOFILE.get().expect("limits");
        // One below, not lower: tests running alongside hold many sockets.
        rlimit::Resource::NOFILE
            .set(hard - 1, hard)
            .expect("lower the soft limit");
        raise_open_files_limit(512);
        assert_eq!(
            rlimit::Resource::NOFILE.get().expect("limits"),
            (hard, hard)
        );
    }

    /// The clients that may wait in the accept loop: what the open-files limit leaves, within
    /// bounds.
    #[test]
    fn the_waiting_room_is_what_the_open_files_limit_leaves() {
        assert_eq!(waiting_room(Some(1_048_576), 512), MAX_WAITING);
        assert_eq!(waiting_room(Some(3_000), 512), 3_000 - 512 - 1_024);
        assert_eq!(waiting_room(Some(1_024), 512), MIN_WAITING);
        assert_eq!(waiting_room(None, 512), MIN_WAITING);
    }

    /// Every client that connects while the places are taken is accepted and counted as
    /// waiting, not only the first 256: an uncounted one could find that the answers which
    /// would have closed connections for it had all gone out, and wait for an idle
    /// connection's timeout (BENCHMARKS.md, session 14).
    #[tokio::test]
    async fn every_client_beyond_the_limit_is_counted_as_waiting() {
        const CROWD: usize = 300;
        let listener = listen(([127, 0, 0, 1], 0).into()).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut clients = Vec::with_capacity(CROWD + 1);
        for _ in 0..=CROWD {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut slots = ConnectionSlots::new(1, MAX_WAITING);
        let first = slots
            .next_connection(&listener)
            .await
            .expect("the one place");
        // No place frees: each call accepts the clients that wait, until it is cut off.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while slots.waiting.len() < CROWD && tokio::time::Instant::now() < deadline {
            let next =
                tokio::time::timeout(Duration::from_millis(50), slots.next_connection(&listener));
            assert!(next.await.is_err(), "no place was free");
        }
        assert_eq!(slots.waiting.len(), CROWD);
        assert_eq!(slots.room.wanted.load(Ordering::Acquire), CROWD);
        drop((first, clients));
    }

    /// Clients beyond the connection limit wait in the listen backlog. With tokio's default of
    /// 128 those beyond it lose their handshake and TCP retries it only a second later.
    #[tokio::test]
    async fn the_listen_backlog_holds_hundreds_of_waiting_clients() {
        let listener = listen(([127, 0, 0, 1], 0).into()).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let clients: Vec<_> = (0..600)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(
                    Duration::from_millis(900),
                    TcpStream::connect(addr),
                ))
            })
            .collect();
        let mut connected = Vec::new();
        for client in clients {
            if let Ok(Ok(Ok(stream))) = client.await {
                connected.push(stream);
            }
        }
        // Nothing was accepted: all 600 wait in the backlog.
        assert_eq!(connected.len(), 600);
        drop(listener);
    }
}
