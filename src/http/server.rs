//! The accept loop: what `axum::serve` does, plus the idle timeout it cannot set.
//!
//! Every client connection costs hyper about 16–24 KiB of buffers for as long as it stays open
//! (BENCHMARKS.md, sessions 7 and 8), and under `axum::serve` a connection that never sends
//! (another request on a keep-alive connection, or the rest of a slowly sent header) stayed
//! open for ever. Here hyper's header-read timeout is set: a connection without a complete
//! request head for `idle_timeout` is closed, whether it is idle between requests or trickling
//! its headers in. Requests in progress are not limited by it (the 30 s request timeout is).
//!
//! Half-close mode: while a request is being handled, hyper does not read the connection to
//! notice that the client went away. A handler therefore runs to its end even when the browser
//! or the proxy in front hangs up: a callback cut off after its code exchange would otherwise
//! lose the user's grant (the code is single-use, the sign-in state already consumed). That
//! read would also have reserved a second 8 KiB buffer per connection, while the first one is
//! still held by the request's headers: 7–8 MiB under a burst of 1,000 connections
//! (BENCHMARKS.md, session 9). Every handler is bounded by the request timeout all the same.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// The idle timeout of a connection opened while `keepalive_connections` or more are open.
pub const BUSY_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long client connections may stay idle.
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
    let calm = http1(settings.idle_timeout);
    let busy = http1(settings.idle_timeout.min(BUSY_IDLE_TIMEOUT));
    let open = Arc::new(AtomicUsize::new(0));
    let connections = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        let counted = OpenConnection::count(&open);
        let builder = if counted.others >= settings.keepalive_connections {
            &busy
        } else {
            &calm
        };
        let router =
            router
                .clone()
                .map_request(move |mut request: axum::http::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                });
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            let _counted = counted;
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
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

/// One open connection in the count, for as long as this lives.
struct OpenConnection {
    open: Arc<AtomicUsize>,
    /// Connections that were open when this one was counted.
    others: usize,
}

impl OpenConnection {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        let others = open.fetch_add(1, Ordering::Relaxed);
        Self {
            open: open.clone(),
            others,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
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
