//! Rate limits: per user and per client IP, the tighter connect limit, limits shared between
//! replicas through Redis, and a Redis outage degrading to in-process limits and recovering;
//! the bound on API requests handled at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::support::{problem, spawn_app_with, spawn_with_fake_and, TestApp};

/// The Redis the shared-limit tests use (`TEST_REDIS_URL`, default the local one).
fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix of this test's own: tests run in parallel against one Redis.
fn unique_prefix() -> String {
    format!("oauth-manager-test:{}:", uuid::Uuid::new_v4())
}

async fn providers(app: &TestApp, token: Option<&str>) -> reqwest::Response {
    let request = app.http.get(app.url("/api/v1/oauth/providers"));
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    request.send().await.expect("request")
}

/// Asserts a 429 `rate_limited` with a `Retry-After` of 1..=`max` seconds; returns it.
async fn assert_limited(response: reqwest::Response, max: u64) -> u64 {
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    let (status, body) = problem(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
    assert!(
        (1..=max).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    retry_after
}

#[tokio::test]
async fn a_client_ip_over_its_limit_gets_429_with_retry_after_and_probes_stay_open() {
    let app = spawn_app_with(&[("OAUTH_RATE_LIMIT_PER_MINUTE", "3")]).await;
    // Without a valid token, requests count against the address: garbage tokens included.
    for token in [None, Some("not-a-jwt"), None] {
        assert_eq!(providers(&app, token).await.status(), 401);
    }
    // 3 per minute: the next one is possible in 20 s.
    assert_limited(providers(&app, None).await, 20).await;
    assert_limited(providers(&app, Some("garbage")).await, 20).await;
    let unknown = app.http.get(app.url("/nowhere")).send().await.expect("404");
    assert_limited(unknown, 20).await;
    for probe in ["/healthz", "/readyz", "/healthz", "/readyz"] {
        let response = app.http.get(app.url(probe)).send().await.expect("probe");
        assert_eq!(response.status(), 200, "{probe} is never limited");
    }
    // An authenticated user is counted on their own, not by the address they share.
    let alice = app.token("alice", &["user"]);
    assert_eq!(providers(&app, Some(&alice)).await.status(), 200);
}

#[tokio::test]
async fn one_user_over_the_limit_does_not_limit_another() {
    let app = spawn_app_with(&[("OAUTH_RATE_LIMIT_PER_MINUTE", "3")]).await;
    let alice = app.token("alice", &["user"]);
    let bob = app.token("bob", &["user"]);
    for _ in 0..3 {
        assert_eq!(providers(&app, Some(&alice)).await.status(), 200);
    }
    assert_limited(providers(&app, Some(&alice)).await, 20).await;
    // Another token of the same user shares the user's bucket.
    let alice_again = app.token("alice", &["admin"]);
    assert_limited(providers(&app, Some(&alice_again)).await, 20).await;
    // Bob, from the same address, is untouched.
    for _ in 0..3 {
        assert_eq!(providers(&app, Some(&bob)).await.status(), 200);
    }
    assert_limited(providers(&app, Some(&bob)).await, 20).await;
}

#[tokio::test]
async fn the_connect_routes_have_a_tighter_limit_of_their_own() {
    let (app, _fake) = spawn_with_fake_and(&[
        ("OAUTH_RATE_LIMIT_PER_MINUTE", "50"),
        ("OAUTH_RATE_LIMIT_CONNECT_PER_MINUTE", "2"),
    ])
    .await;
    let alice = app.token("alice", &["user"]);
    let authorize = || {
        app.http
            .post(app.url("/api/v1/oauth/providers/google/authorize"))
            .bearer_auth(&alice)
            .json(&json!({}))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(authorize().await.expect("authorize").status(), 200);
    }
    // 2 per minute: the next authorization can start in 30 s.
    assert_limited(authorize().await.expect("authorize"), 30).await;
    // The general limit is separate: alice can still list her integrations.
    let listed = app.get("/api/v1/oauth/integrations", &alice).await;
    assert_eq!(listed.status(), 200);
    // The callback carries no JWT: limited per address.
    let callback = || {
        app.http
            .get(app.url("/api/v1/oauth/callback/google?state=forged&code=c"))
            .header("accept", "application/json")
            .send()
    };
    for _ in 0..2 {
        assert_eq!(callback().await.expect("callback").status(), 400);
    }
    assert_limited(callback().await.expect("callback"), 30).await;
}

#[tokio::test]
async fn replicas_share_their_limits_through_redis() {
    let prefix = unique_prefix();
    let url = redis_url();
    let app = spawn_app_with(&[
        ("REDIS_URL", url.as_str()),
        ("OAUTH_RATE_LIMIT_REDIS_PREFIX", prefix.as_str()),
        ("OAUTH_RATE_LIMIT_PER_MINUTE", "4"),
    ])
    .await;
    let other = app.sibling().await;
    let alice = app.token("alice", &["user"]);
    for replica in [&app, &other, &app, &other] {
        assert_eq!(providers(replica, Some(&alice)).await.status(), 200);
    }
    // Four in all: each replica alone would still allow two more.
    assert_limited(providers(&app, Some(&alice)).await, 15).await;
    assert_limited(providers(&other, Some(&alice)).await, 15).await;
    for replica in [&app, &other] {
        let limiter = replica.state.limiter.as_ref().expect("limiter");
        assert!(limiter.is_shared());
        assert_eq!(limiter.redis_outages(), 0);
    }
    assert!(redis_keys(&url, &prefix)
        .await
        .contains(&format!("{prefix}general:user:alice")));
}

#[tokio::test]
async fn with_redis_down_the_service_answers_and_limits_in_process_warning_once() {
    let logs = CapturedLogs::start();
    let app = spawn_app_with(&[
        // Nothing listens on port 1: connection refused.
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("OAUTH_RATE_LIMIT_PER_MINUTE", "3"),
    ])
    .await;
    let started = Instant::now();
    let alice = app.token("alice", &["user"]);
    for _ in 0..3 {
        assert_eq!(providers(&app, Some(&alice)).await.status(), 200);
    }
    assert_limited(providers(&app, Some(&alice)).await, 20).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "Redis being down never makes requests wait"
    );
    let limiter = app.state.limiter.as_ref().expect("limiter");
    assert!(!limiter.is_shared());
    assert_eq!(limiter.redis_outages(), 1, "one outage");
    assert_eq!(
        logs.count("Redis is unavailable"),
        1,
        "warned once, not per request:\n{}",
        logs.text()
    );
}

#[tokio::test]
async fn after_a_redis_outage_limits_are_shared_again() {
    let logs = CapturedLogs::start();
    let url = redis_url();
    let target = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = Proxy::start(&target).await;
    let prefix = unique_prefix();
    let proxied = format!("redis://{}", proxy.address);
    let app = spawn_app_with(&[
        ("REDIS_URL", proxied.as_str()),
        ("OAUTH_RATE_LIMIT_REDIS_PREFIX", prefix.as_str()),
        ("OAUTH_RATE_LIMIT_PER_MINUTE", "3"),
    ])
    .await;
    let limiter = app.state.limiter.clone().expect("limiter");
    let token = |user: &str| app.token(user, &["user"]);
    assert_eq!(providers(&app, Some(&token("alice"))).await.status(), 200);
    assert!(limiter.is_shared());

    proxy.set_up(false);
    // Redis is gone: the service keeps answering, limiting in-process (a fresh bucket of 3).
    for _ in 0..3 {
        assert_eq!(providers(&app, Some(&token("alice"))).await.status(), 200);
    }
    assert_limited(providers(&app, Some(&token("alice"))).await, 20).await;
    assert!(!limiter.is_shared());
    assert_eq!(limiter.redis_outages(), 1);

    proxy.set_up(true);
    // One request per second tries Redis again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(providers(&app, Some(&token("carol"))).await.status(), 200);
    assert!(limiter.is_shared(), "back on Redis");
    assert!(redis_keys(&url, &prefix)
        .await
        .contains(&format!("{prefix}general:user:carol")));
    assert_eq!(limiter.redis_outages(), 1);
    assert_eq!(logs.count("Redis is unavailable"), 1, "{}", logs.text());
    assert_eq!(logs.count("Redis answers again"), 1, "{}", logs.text());
}

#[tokio::test]
async fn a_redis_that_never_answers_costs_each_request_at_most_its_deadline() {
    let proxy = Proxy::start("127.0.0.1:9").await;
    proxy.silent.store(true, Ordering::SeqCst);
    let redis = format!("redis://{}", proxy.address);
    let app = spawn_app_with(&[
        ("REDIS_URL", redis.as_str()),
        ("OAUTH_RATE_LIMIT_PER_MINUTE", "3"),
    ])
    .await;
    let alice = app.token("alice", &["user"]);
    let timed = || async {
        let started = Instant::now();
        let response = providers(&app, Some(&alice)).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        response
    };
    for _ in 0..3 {
        assert_eq!(timed().await.status(), 200);
    }
    assert_limited(timed().await, 20).await;
    // Another attempt after the retry interval: it too gives up within its deadline.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_limited(timed().await, 20).await;
    let limiter = app.state.limiter.as_ref().expect("limiter");
    assert!(!limiter.is_shared());
    assert_eq!(limiter.redis_outages(), 1);
}

async fn redis_keys(url: &str, prefix: &str) -> Vec<String> {
    let client = redis::Client::open(url).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("the tests need Redis (TEST_REDIS_URL, default redis://127.0.0.1:6379)");
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
        .expect("KEYS")
}

/// A TCP proxy in front of Redis that can be switched off (dropping every connection, and each
/// new one at once) and on again, or made to swallow connections without ever answering.
struct Proxy {
    address: SocketAddr,
    up: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let up = Arc::new(AtomicBool::new(true));
        let silent = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::<AbortHandle>::new()));
        let target = target.to_owned();
        let accept = tokio::spawn({
            let up = up.clone();
            let silent = silent.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue;
                    }
                    let target = target.clone();
                    let silent = silent.load(Ordering::SeqCst);
                    let task = tokio::spawn(async move {
                        if silent {
                            // Read everything, answer nothing, never close.
                            let _ = tokio::io::copy(&mut inbound, &mut tokio::io::sink()).await;
                            std::future::pending::<()>().await;
                        }
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().expect("lock").push(task.abort_handle());
                }
            }
        });
        Self {
            address,
            up,
            silent,
            connections,
            accept,
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for connection in self.connections.lock().expect("lock").drain(..) {
                connection.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.accept.abort();
    }
}

/// Log lines of this test: the test runs on one thread (`#[tokio::test]`), and so does the
/// server it starts, so a thread-local subscriber sees the service's events.
pub struct CapturedLogs {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl CapturedLogs {
    pub fn start() -> Self {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let buffer = buffer.clone();
            move || Writer(buffer.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("oauth_manager=debug")
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        Self {
            buffer,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().expect("lock")).into_owned()
    }

    /// Lines above debug level containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.text()
            .lines()
            .filter(|line| !line.contains("DEBUG") && line.contains(needle))
            .count()
    }
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn api_requests_beyond_the_concurrency_limit_wait_their_turn() {
    use crate::lifecycle::{connected, spawn_token_call};
    use crate::support::fake_provider::Endpoint;

    let (app, fake) = spawn_with_fake_and(&[("OAUTH_MAX_CONCURRENT_REQUESTS", "2")]).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(connected(&app, &fake, "google", &format!("g-{n}")).await);
    }
    // Every token is due: each hand-out refreshes at the (slow) provider while it is counted.
    app.clock.advance(chrono::Duration::minutes(59));
    fake.set_latency("google", Endpoint::Token, Duration::from_millis(200));
    let calls: Vec<_> = ids.iter().map(|id| spawn_token_call(&app, id)).collect();
    for call in calls {
        call.await.expect("answered 200 after waiting");
    }
    assert_eq!(fake.count_grant("google", "refresh_token"), 6);
    assert_eq!(fake.max_in_flight(), 2, "two at a time, never more");
}

#[tokio::test]
async fn a_sign_in_waiting_for_its_provider_does_not_hold_up_token_hand_outs() {
    use crate::lifecycle::{connected, get_token};
    use crate::support::fake_provider::Endpoint;

    let (app, fake) = spawn_with_fake_and(&[("OAUTH_MAX_CONCURRENT_REQUESTS", "1")]).await;
    let id = connected(&app, &fake, "google", "g-1").await;
    fake.set_latency("google", Endpoint::Token, Duration::from_secs(2));
    let signed_in = AtomicBool::new(false);
    let sign_in = async {
        connected(&app, &fake, "google", "g-2").await;
        signed_in.store(true, Ordering::SeqCst);
    };
    let hand_out = async {
        // Once its callback has reached the provider (and holds the one sign-in permit).
        while fake.count_grant("google", "authorization_code") < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = get_token(&app, &id).await.status();
        (status, signed_in.load(Ordering::SeqCst))
    };
    // `connected` asserts that the sign-in succeeds, once its provider answers.
    let ((), (hand_out_status, sign_in_was_done)) = tokio::join!(sign_in, hand_out);
    assert_eq!(hand_out_status, 200);
    assert!(!sign_in_was_done, "answered while the sign-in waited");
}
