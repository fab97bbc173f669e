//! Faults around the service: a provider that is slow, hangs, is down or answers garbage, and
//! a database that goes away under load and comes back. The service must stay responsive,
//! answer bounded problem+json errors, never blame the user's connection for an outage, and
//! recover by itself.
//!
//! Already covered elsewhere (not repeated here): a hanging Google token endpoint on refresh
//! (`lifecycle::a_provider_that_never_answers_times_out_into_a_503`), 503 and HTML-in-200 on
//! refresh (`lifecycle::transient_failures_keep_the_integration_and_serve_a_still_valid_token`),
//! an error inside HTTP 200 (`lifecycle::an_error_inside_http_200_is_an_error`), 500 / HTML-200 /
//! invalid_client at the callback (`connect::provider_errors_become_clear_errors_and_store_nothing`),
//! single flight under latency (`lifecycle::a_hundred_concurrent_callers_cause_exactly_one_refresh`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use chrono::Duration;
use oauth_manager::clock::Clock;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::connect::connect;
use crate::support::db::postgres_server_url;
use crate::support::fake_provider::{Consent, Endpoint, FakeProvider, Fault};
use crate::support::pg_cluster::PgCluster;
use crate::support::{
    count_rows, problem, providers_file, spawn_app_on, spawn_with_fake_and, spawn_with_fake_on,
    TestApp, TestDatabase, RETURN_BASE,
};

async fn connected(app: &TestApp, fake: &FakeProvider, provider: &str, subject: &str) -> String {
    let (status, result) = connect(
        app,
        fake,
        provider,
        "alice",
        Consent::user(subject),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    result["integration_id"].as_str().expect("id").to_owned()
}

fn token_path(id: &str) -> String {
    format!("/api/v1/oauth/integrations/{id}/token")
}

async fn get_token(app: &TestApp, id: &str) -> reqwest::Response {
    app.get_as(&token_path(id), "backend", &["service"]).await
}

async fn status_of(app: &TestApp, id: &str) -> String {
    let body: Value = app
        .get_as(
            &format!("/api/v1/oauth/integrations/{id}"),
            "alice",
            &["user"],
        )
        .await
        .json()
        .await
        .expect("json");
    body["status"].as_str().expect("status").to_owned()
}

/// A response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The problem's `code`, checking the problem+json shape.
    fn problem_code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let body = self.json();
        assert_eq!(body["status"], self.status);
        body["code"].as_str().expect("code").to_owned()
    }
}

/// Sends GET requests one after the other on a single HTTP/1.1 connection, so a test can tell
/// that an error did not cost the caller its (keep-alive) connection. `None` as the bearer
/// token sends none; `accept` is the Accept header.
async fn on_one_connection(
    app: &TestApp,
    requests: &[(String, Option<String>, &str)],
) -> Vec<RawResponse> {
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let mut responses = Vec::new();
    let mut buffer = Vec::new();
    for (path, token, accept) in requests {
        let authorization = token
            .as_ref()
            .map(|token| format!("Authorization: Bearer {token}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: {accept}\r\n{authorization}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("the connection is still open");
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let mut chunk = [0u8; 8192];
            let read = stream.read(&mut chunk).await.expect("read");
            assert!(read > 0, "the service closed the connection ({path})");
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .map(|(_, value)| value.parse().expect("length"))
            .expect("a Content-Length");
        buffer.drain(..head_end + 4);
        while buffer.len() < length {
            let mut chunk = [0u8; 8192];
            let read = stream.read(&mut chunk).await.expect("read");
            assert!(read > 0, "the body was cut off ({path})");
            buffer.extend_from_slice(&chunk[..read]);
        }
        let body = buffer.drain(..length).collect();
        responses.push(RawResponse {
            status,
            headers,
            body,
        });
    }
    responses
}

/// The fake's providers file with the token endpoints of `providers` pointing at a closed
/// port (connection refused: the provider is down).
fn providers_down(fake: &FakeProvider, providers: &[&str]) -> String {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let base = fake.base_url();
    let mut toml = fake.providers_toml();
    for provider in providers {
        toml = toml.replace(
            &format!("token_url = \"{base}/{provider}/token\""),
            &format!("token_url = \"http://{closed}/{provider}/token\""),
        );
    }
    toml
}

// ---------------------------------------------------------------------------------------------
// Provider faults
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_slow_provider_delays_only_the_refresh_waiting_for_it() {
    let (app, fake) = spawn_with_fake_and(&[("OAUTH_PROVIDER_TIMEOUT_SECONDS", "5")]).await;
    let slow = connected(&app, &fake, "google", "g-1").await;
    app.clock.advance(Duration::minutes(59));
    // Connected after the clock moved: its token is fresh.
    let fresh = connected(&app, &fake, "microsoft", "oid-1").await;
    let latency = StdDuration::from_millis(2500);
    fake.push_fault("google", Endpoint::Token, Fault::Latency(latency));
    let started = Instant::now();
    let waiting = {
        let (http, url, token) = (
            app.http.clone(),
            app.url(&token_path(&slow)),
            app.token("backend", &["service"]),
        );
        tokio::spawn(async move { http.get(url).bearer_auth(token).send().await })
    };
    while fake.count_grant("google", "refresh_token") == 0 {
        assert!(started.elapsed() < StdDuration::from_secs(5), "no refresh");
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    // While the provider takes its time, everyone else is answered promptly.
    for _ in 0..3 {
        let others = Instant::now();
        let health = app.http.get(app.url("/healthz")).send().await.expect("ok");
        assert_eq!(health.status(), 200);
        let list = app
            .get_as("/api/v1/oauth/integrations", "alice", &["user"])
            .await;
        assert_eq!(list.status(), 200);
        let other = get_token(&app, &fresh).await;
        assert_eq!(other.status(), 200);
        let took = others.elapsed();
        assert!(
            took < StdDuration::from_secs(1),
            "three requests took {took:?} during a slow refresh"
        );
        assert!(!waiting.is_finished(), "the slow refresh is still running");
    }
    let response = waiting.await.expect("task").expect("response");
    let waited = started.elapsed();
    assert_eq!(response.status(), 200);
    assert!(waited >= latency, "{waited:?}");
    let body: Value = response.json().await.expect("json");
    assert!(fake.is_token_active(body["access_token"].as_str().expect("token")));
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    eprintln!("slow provider: caller waited {waited:?} for a {latency:?} provider");
}

#[tokio::test]
async fn a_hanging_provider_is_cut_off_at_the_provider_timeout() {
    let (app, fake) = spawn_with_fake_and(&[
        ("OAUTH_PROVIDER_TIMEOUT_SECONDS", "2"),
        ("OAUTH_REFRESH_LEASE_SECONDS", "9"),
    ])
    .await;
    // acme rotates strictly, so a timed-out refresh is never retried in the same request.
    let id = connected(&app, &fake, "acme", "a-1").await;
    let original = {
        let body: Value = get_token(&app, &id).await.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_owned()
    };
    // Inside the refresh window, still valid: the hang costs the provider timeout, then the
    // still-valid token is served.
    app.clock.advance(Duration::minutes(56));
    fake.push_fault("acme", Endpoint::Token, Fault::Hang);
    let started = Instant::now();
    let response = get_token(&app, &id).await;
    let took = started.elapsed();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["access_token"], original.as_str());
    assert!(
        took >= StdDuration::from_secs(2) && took < StdDuration::from_millis(4500),
        "bounded by the 2 s provider timeout: {took:?}"
    );
    // Expired (and past the back-off): the hang becomes a 503 with Retry-After, as fast.
    app.clock.advance(Duration::minutes(10));
    fake.push_fault("acme", Endpoint::Token, Fault::Hang);
    let started = Instant::now();
    let response = get_token(&app, &id).await;
    let took = started.elapsed();
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    let (status, body) = problem(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("provider_unavailable"))
    );
    assert!(
        took >= StdDuration::from_secs(2) && took < StdDuration::from_millis(4500),
        "bounded by the 2 s provider timeout: {took:?}"
    );
    assert_eq!(fake.count_grant("acme", "refresh_token"), 2, "no retries");
    assert_eq!(status_of(&app, &id).await, "active");
    // During the back-off nobody waits on the provider again.
    let started = Instant::now();
    let (status, _) = problem(get_token(&app, &id).await).await;
    assert_eq!(status, 503);
    assert!(started.elapsed() < StdDuration::from_millis(500));
    assert_eq!(fake.count_grant("acme", "refresh_token"), 2);
}

#[tokio::test]
async fn a_hanging_token_exchange_fails_the_callback_at_the_provider_timeout() {
    let (app, fake) = spawn_with_fake_and(&[
        ("OAUTH_PROVIDER_TIMEOUT_SECONDS", "2"),
        ("OAUTH_REFRESH_LEASE_SECONDS", "9"),
    ])
    .await;
    fake.push_fault("google", Endpoint::Token, Fault::Hang);
    let started = Instant::now();
    let (status, result) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({}),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("provider_unavailable")),
        "{result}"
    );
    assert!(took < StdDuration::from_millis(4500), "{took:?}");
    assert_eq!(count_rows(&app.db, "oauth_integrations").await, 0);
}

#[tokio::test]
async fn callers_piling_up_on_a_hanging_provider_cause_one_provider_request() {
    let (app, fake) = spawn_with_fake_and(&[
        ("OAUTH_PROVIDER_TIMEOUT_SECONDS", "2"),
        ("OAUTH_REFRESH_LEASE_SECONDS", "9"),
    ])
    .await;
    let id = connected(&app, &fake, "acme", "a-1").await;
    app.clock.advance(Duration::minutes(61));
    fake.push_fault("acme", Endpoint::Token, Fault::Hang);
    let started = Instant::now();
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let (http, url, token) = (
                app.http.clone(),
                app.url(&token_path(&id)),
                app.token("backend", &["service"]),
            );
            tokio::spawn(async move {
                let response = http
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("response");
                let retry_after = response.headers().contains_key("retry-after");
                (response.status().as_u16(), retry_after, started.elapsed())
            })
        })
        .collect();
    // Meanwhile the service answers everything else.
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    let health = Instant::now();
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("ok")
            .status(),
        200
    );
    assert!(health.elapsed() < StdDuration::from_secs(1));
    // Bounded by one provider timeout plus the callers' own (serialised) bookkeeping, not by
    // one timeout per caller (50 × 2 s); generous for a loaded test machine.
    let mut slowest = StdDuration::ZERO;
    for caller in callers {
        let (status, retry_after, took) = caller.await.expect("task");
        assert_eq!((status, retry_after), (503, true));
        slowest = slowest.max(took);
    }
    assert!(slowest < StdDuration::from_secs(8), "{slowest:?}");
    eprintln!(
        "50 callers on a hanging provider (2 s timeout): all answered 503 within {slowest:?}"
    );
    assert_eq!(
        fake.count_grant("acme", "refresh_token"),
        1,
        "one provider request however many callers wait"
    );
    assert_eq!(status_of(&app, &id).await, "active");
}

#[tokio::test]
async fn a_provider_that_is_down_answers_503_at_once_and_keeps_the_integration() {
    let (app, fake) = spawn_with_fake_and(&[]).await;
    let google = connected(&app, &fake, "google", "g-1").await;
    let acme = connected(&app, &fake, "acme", "a-1").await;
    let integrations = count_rows(&app.db, "oauth_integrations").await;
    // A replica on the same database whose providers' token endpoints refuse connections.
    let path = providers_file(&providers_down(&fake, &["google", "acme"]));
    let down = spawn_app_on(
        app.database.alias(),
        &app.key,
        &[
            ("OAUTH_PROVIDERS_FILE", path.as_str()),
            ("OAUTH_ALLOWED_RETURN_URLS", RETURN_BASE),
        ],
    )
    .await;
    down.clock.set(app.clock.now() + Duration::minutes(61));
    for id in [&google, &acme] {
        let started = Instant::now();
        let response = get_token(&down, id).await;
        let took = started.elapsed();
        assert!(response.headers().contains_key("retry-after"));
        let (status, body) = problem(response).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (503, Some("provider_unavailable")),
            "{body}"
        );
        assert!(took < StdDuration::from_millis(1500), "{took:?}");
        assert_eq!(status_of(&down, id).await, "active", "not needs_reauth");
    }
    // Connecting while the token endpoint is down: a clear error, nothing stored.
    let started = Instant::now();
    let (status, result) = connect(
        &down,
        &fake,
        "google",
        "alice",
        Consent::user("g-2"),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("provider_unavailable")),
        "{result}"
    );
    assert!(started.elapsed() < StdDuration::from_secs(2));
    assert_eq!(
        count_rows(&app.db, "oauth_integrations").await,
        integrations
    );
    // The provider is back (the first replica reaches it): after the back-off the failed
    // attempts set, the same integrations refresh.
    app.clock.set(down.clock.now() + Duration::minutes(2));
    for id in [&google, &acme] {
        assert_eq!(get_token(&app, id).await.status(), 200);
    }
}

/// Garbage a token endpoint can send, and the callback error it must become.
fn garbage() -> Vec<(&'static str, Fault, &'static str)> {
    vec![
        (
            "500 with an HTML page",
            Fault::Status(
                500,
                "<html><body><h1>500 Internal Server Error</h1></body></html>".into(),
            ),
            "provider_unavailable",
        ),
        (
            "200 with JSON cut short (well framed)",
            Fault::Status(200, r#"{"access_token": "ya29.abc", "expires_in"#.into()),
            "invalid_provider_response",
        ),
        (
            "200 with an empty body",
            Fault::Status(200, String::new()),
            "invalid_provider_response",
        ),
        (
            "connection closed mid-body",
            Fault::Truncated(r#"{"access_token": "ya29.abc"#.into()),
            "provider_unavailable",
        ),
        (
            "2 MiB body with Content-Length",
            Fault::Huge {
                bytes: 2 * 1024 * 1024,
                declared_length: true,
            },
            "invalid_provider_response",
        ),
        (
            "16 MiB chunked body",
            Fault::Huge {
                bytes: 16 * 1024 * 1024,
                declared_length: false,
            },
            "invalid_provider_response",
        ),
    ]
}

#[tokio::test]
async fn garbage_from_the_token_endpoint_fails_the_callback_cleanly() {
    let (app, fake) = spawn_with_fake_and(&[]).await;
    for (what, fault, code) in garbage() {
        fake.push_fault("google", Endpoint::Token, fault);
        fake.push_consent("google", Consent::user("g-1"));
        let response = app
            .http
            .post(app.url("/api/v1/oauth/providers/google/authorize"))
            .bearer_auth(app.token("alice", &["user"]))
            .json(&json!({}))
            .send()
            .await
            .expect("authorize");
        let body: Value = response.json().await.expect("json");
        let location = fake
            .authorize(body["authorization_url"].as_str().expect("url"))
            .await;
        let callback = location.replacen("https://oauth.example.test", "", 1);
        let started = Instant::now();
        let responses = on_one_connection(
            &app,
            &[
                (callback, None, "application/json"),
                ("/healthz".to_owned(), None, "*/*"),
            ],
        )
        .await;
        let took = started.elapsed();
        let result = responses[0].json();
        assert_eq!(
            (responses[0].status, result["error"].as_str()),
            (400, Some(code)),
            "{what}: {result}"
        );
        assert_eq!(responses[1].status, 200, "{what}: connection kept");
        assert!(took < StdDuration::from_secs(3), "{what}: {took:?}");
    }
    for table in ["oauth_integrations", "oauth_tokens", "oauth_consents"] {
        assert_eq!(count_rows(&app.db, table).await, 0, "{table}");
    }
}

#[tokio::test]
async fn garbage_from_the_token_endpoint_fails_a_refresh_with_a_503_and_keeps_the_integration() {
    let (app, fake) = spawn_with_fake_and(&[]).await;
    // acme: no in-request retry, so each fault is what the caller meets.
    let id = connected(&app, &fake, "acme", "a-1").await;
    app.clock.advance(Duration::minutes(61));
    for (what, fault, _) in garbage() {
        fake.push_fault("acme", Endpoint::Token, fault);
        let token = app.token("backend", &["service"]);
        let started = Instant::now();
        let responses = on_one_connection(
            &app,
            &[
                (token_path(&id), Some(token), "application/json"),
                ("/healthz".to_owned(), None, "*/*"),
            ],
        )
        .await;
        let took = started.elapsed();
        assert_eq!(
            (responses[0].status, responses[0].problem_code().as_str()),
            (503, "provider_unavailable"),
            "{what}"
        );
        assert!(responses[0].header("retry-after").is_some(), "{what}");
        assert_eq!(responses[1].status, 200, "{what}: connection kept");
        assert!(took < StdDuration::from_secs(3), "{what}: {took:?}");
        assert_eq!(status_of(&app, &id).await, "active", "{what}");
        // Past the back-off (at most 30 min) for the next fault.
        app.clock.advance(Duration::minutes(31));
    }
    // The provider behaves again: the very same refresh token still works.
    let response = get_token(&app, &id).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert!(fake.is_token_active(body["access_token"].as_str().expect("token")));
}

// ---------------------------------------------------------------------------------------------
// Database faults
// ---------------------------------------------------------------------------------------------

/// How long a request waits for a pooled connection (storage::ACQUIRE_TIMEOUT).
const ACQUIRE_TIMEOUT: StdDuration = StdDuration::from_secs(5);
/// /readyz answers within 2 s (+ scheduling slack).
const READY_TIMEOUT: StdDuration = StdDuration::from_millis(2500);

/// A PostgreSQL cluster of the test's own, for tests that stop or terminate their server: in
/// the PostgreSQL pass only (which has the server binaries). `None`, said on stderr, skips the
/// test.
async fn private_cluster(test: &str) -> Option<PgCluster> {
    if postgres_server_url().is_none() {
        eprintln!(
            "SKIPPED {test}: it runs in the PostgreSQL pass (TEST_DATABASE_URL=postgres://…)"
        );
        return None;
    }
    match PgCluster::start().await {
        Ok(cluster) => Some(cluster),
        Err(why) => {
            eprintln!(
                "\n********\nSKIPPED {test}: cannot start a private PostgreSQL cluster: {why}\n********\n"
            );
            None
        }
    }
}

/// The service, with the fake provider, on a private cluster of its own (see
/// [`private_cluster`]); `None` when the test is skipped.
async fn app_on_private_cluster(test: &str) -> Option<(PgCluster, TestApp, FakeProvider)> {
    let cluster = private_cluster(test).await?;
    let (app, fake) = spawn_with_fake_on(TestDatabase::at(&cluster.url), &[]).await;
    Some((cluster, app, fake))
}

/// One request of the load.
#[derive(Debug, Clone)]
struct Sample {
    what: &'static str,
    started: Instant,
    took: StdDuration,
    status: u16,
    /// The problem's code (`-` for a success, `?` when the body was not problem+json).
    code: String,
    retry_after: bool,
}

#[tokio::test]
async fn a_database_restart_under_load_fails_fast_and_recovers_by_itself() {
    // A PostgreSQL behaviour, tested in the PostgreSQL pass only (which also has the server
    // binaries); the cluster is the test's own, never TEST_DATABASE_URL's server.
    let Some((cluster, app, fake)) =
        app_on_private_cluster("a_database_restart_under_load_fails_fast_and_recovers_by_itself")
            .await
    else {
        return;
    };
    let ids = [
        connected(&app, &fake, "google", "g-1").await,
        connected(&app, &fake, "microsoft", "oid-1").await,
    ];
    let app = Arc::new(app);
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..6)
        .map(|worker| {
            let (app, samples, stop, ids) =
                (app.clone(), samples.clone(), stop.clone(), ids.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let backend = app.token("backend", &["service"]);
                let alice = app.token("alice", &["user"]);
                let mut round = worker;
                while !stop.load(Ordering::Relaxed) {
                    let (what, path, token) = match round % 4 {
                        0 => ("token", token_path(&ids[0]), &backend),
                        1 => ("token", token_path(&ids[1]), &backend),
                        2 => ("list", "/api/v1/oauth/integrations".to_owned(), &alice),
                        _ => ("readyz", "/readyz".to_owned(), &alice),
                    };
                    round += 1;
                    let started = Instant::now();
                    let response = client
                        .get(app.url(&path))
                        .bearer_auth(token)
                        .send()
                        .await
                        .expect("the service always answers");
                    let status = response.status().as_u16();
                    let retry_after = response.headers().contains_key("retry-after");
                    let is_problem = response
                        .headers()
                        .get("content-type")
                        .is_some_and(|value| value == "application/problem+json");
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    let code = match (status, is_problem) {
                        (200, _) => "-".to_owned(),
                        (_, true) => body["code"].as_str().unwrap_or("?").to_owned(),
                        _ => "?".to_owned(),
                    };
                    samples.lock().expect("samples").push(Sample {
                        what,
                        started,
                        took: started.elapsed(),
                        status,
                        code,
                        retry_after,
                    });
                    tokio::time::sleep(StdDuration::from_millis(20)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(StdDuration::from_secs(1)).await;
    // Requests in flight when the server goes: a lock holds their queries until the stop.
    let mut locker = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.url)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut locker)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE oauth_integrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("lock");
    let in_flight = {
        let app = app.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let response = app
                .get_as("/api/v1/oauth/integrations", "alice", &["user"])
                .await;
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            (status, body, started.elapsed())
        })
    };
    tokio::time::sleep(StdDuration::from_millis(500)).await;
    assert!(!in_flight.is_finished(), "the request waits on the lock");
    let stopped = Instant::now();
    cluster.stop_immediate().expect("pg_ctl stop");
    let stop_took = stopped.elapsed();
    drop(locker);
    let (status, body, took) = in_flight.await.expect("task");
    assert!(
        status == 503 && body.contains("database_unavailable"),
        "a query cut off by the shutdown: {status} {body}"
    );
    assert!(took < StdDuration::from_secs(2), "{took:?}");
    tokio::time::sleep(StdDuration::from_secs(8)).await;
    let restarting = Instant::now();
    cluster.start_server().expect("pg_ctl start");
    let started_again = Instant::now();
    // Recovery: the first successful token hand-out after the server accepts connections.
    let recovered = loop {
        let done: Vec<Sample> = samples.lock().expect("samples").clone();
        let ok = done
            .iter()
            .filter(|s| s.what == "token" && s.started >= started_again && s.status == 200)
            .map(|s| s.started + s.took)
            .min();
        if let Some(at) = ok {
            break at;
        }
        assert!(
            started_again.elapsed() < StdDuration::from_secs(15),
            "no recovery within 15 s of the database coming back: {:?}\n{}",
            done.iter().rev().take(8).collect::<Vec<_>>(),
            cluster.log()
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    };
    tokio::time::sleep(StdDuration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.expect("load task");
    }
    let samples = samples.lock().expect("samples").clone();
    let report = |filter: &dyn Fn(&Sample) -> bool| -> Vec<String> {
        samples
            .iter()
            .filter(|s| filter(s))
            .map(|s| {
                format!(
                    "{} at +{:?}: {} {} in {:?}",
                    s.what,
                    s.started.saturating_duration_since(stopped),
                    s.status,
                    s.code,
                    s.took
                )
            })
            .collect()
    };

    // Healthy before.
    let before = report(&|s| s.started + s.took < stopped && s.status != 200);
    assert!(before.is_empty(), "failures before the stop: {before:?}");
    // Only successes and 503 database_unavailable (with Retry-After), never a 500 or a hang.
    let wrong = report(&|s| {
        !(s.status == 200 || (s.status == 503 && s.code == "database_unavailable" && s.retry_after))
    });
    assert!(wrong.is_empty(), "unexpected answers: {wrong:#?}");
    let slow = report(&|s| s.took > ACQUIRE_TIMEOUT + StdDuration::from_millis(1500));
    assert!(
        slow.is_empty(),
        "answers slower than the acquire timeout: {slow:#?}"
    );
    // While the database is down, every request fails (fast), /readyz included.
    let down = |s: &Sample| s.started >= stopped + stop_took && s.started + s.took < restarting;
    let succeeded = report(&|s| down(s) && s.status == 200);
    assert!(
        succeeded.is_empty(),
        "answered 200 without a database: {succeeded:?}"
    );
    let failed: Vec<&Sample> = samples.iter().filter(|s| down(s)).collect();
    assert!(failed.len() >= 6, "load while down: {}", failed.len());
    let readiness = report(&|s| down(s) && s.what == "readyz" && s.took > READY_TIMEOUT);
    assert!(
        readiness.is_empty(),
        "/readyz slower than 2 s: {readiness:?}"
    );
    assert!(failed.iter().any(|s| s.what == "readyz"));
    // Back without a restart of the service: everything after recovery succeeds.
    let after = report(&|s| s.started > recovered && s.status != 200);
    assert!(after.is_empty(), "failures after recovery: {after:?}");
    assert!(samples
        .iter()
        .any(|s| s.started > recovered && s.what == "readyz"));
    // Writes too: a refresh stores rotated tokens in the restarted database.
    app.clock.advance(Duration::minutes(59));
    let response = get_token(&app, &ids[1]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(fake.count_grant("microsoft", "refresh_token"), 1);

    let mut latencies: Vec<StdDuration> = failed.iter().map(|s| s.took).collect();
    latencies.sort();
    eprintln!(
        "database restart: pg_ctl stop took {stop_took:?}; {} requests while down, 503 in {:?} \
         (median) .. {:?} (max); pg_ctl start took {:?}; first success {:?} after it returned; \
         {} requests in all",
        failed.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        started_again - restarting,
        recovered.saturating_duration_since(started_again),
        samples.len()
    );
}

#[tokio::test]
async fn a_query_whose_session_the_server_terminates_answers_503() {
    let Some((cluster, app, _fake)) =
        app_on_private_cluster("a_query_whose_session_the_server_terminates_answers_503").await
    else {
        return;
    };
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.url)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut admin)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE oauth_integrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut admin)
        .await
        .expect("lock");
    let app = Arc::new(app);
    let in_flight = {
        let app = app.clone();
        tokio::spawn(async move {
            let response = app
                .get_as("/api/v1/oauth/integrations", "alice", &["user"])
                .await;
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        })
    };
    tokio::time::sleep(StdDuration::from_millis(500)).await;
    // What a fast shutdown, a failover or an operator does to sessions: SQLSTATE 57P01.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND datname = 'oauth'",
    )
    .execute(&mut admin)
    .await
    .expect("terminate");
    let (status, body) = in_flight.await.expect("task");
    assert!(
        status == 503 && body.contains("database_unavailable"),
        "{status} {body}"
    );
}

/// Pooled connections are handed out without a ping when they were in use moments ago
/// (`storage::PING_IF_IDLE_FOR`, 1 s); one idle for longer is pinged first. So connections the
/// server closed while the pool held them idle (a restart, an idle timeout, a failover) are
/// replaced: the next request succeeds instead of failing on a dead connection.
#[tokio::test]
async fn connections_the_server_closed_while_idle_are_replaced_not_used() {
    let Some((cluster, app, _fake)) =
        app_on_private_cluster("connections_the_server_closed_while_idle_are_replaced_not_used")
            .await
    else {
        return;
    };
    let list = || app.get_as("/api/v1/oauth/integrations", "alice", &["user"]);
    assert_eq!(list().await.status(), 200);
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.url)
        .await
        .expect("connect");
    let terminated: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND datname = 'oauth') AS gone",
    )
    .fetch_one(&mut admin)
    .await
    .expect("terminate");
    assert!(terminated > 0, "the pool held no connection to close");
    // Past the window in which a connection is handed out unchecked.
    tokio::time::sleep(StdDuration::from_millis(1200)).await;
    for round in 0..3 {
        let response = list().await;
        let status = response.status();
        assert_eq!(status, 200, "round {round}: {:?}", response.text().await);
    }
}

#[tokio::test]
async fn a_locked_sqlite_database_answers_503_after_the_busy_timeout() {
    let (app, _fake) = spawn_with_fake_and(&[]).await;
    if app.database.backend != "sqlite" {
        eprintln!(
            "SKIPPED a_locked_sqlite_database_answers_503_after_the_busy_timeout: SQLite pass only"
        );
        return;
    }
    // Another process holds the write lock (a stuck `sqlite3` shell, a backup tool).
    let mut other = <sqlx::SqliteConnection as sqlx::Connection>::connect(&app.database.url)
        .await
        .expect("connect");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .expect("lock");
    let started = Instant::now();
    // Starting a connect flow writes its pending state.
    let response = app
        .http
        .post(app.url("/api/v1/oauth/providers/google/authorize"))
        .bearer_auth(app.token("alice", &["user"]))
        .json(&json!({}))
        .send()
        .await
        .expect("response");
    let took = started.elapsed();
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = problem(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("database_unavailable"))
    );
    assert!(
        took < StdDuration::from_secs(7),
        "busy timeout 5 s: {took:?}"
    );
    // Reads go on meanwhile (WAL), and writes resume once the lock is gone.
    assert_eq!(
        app.get_as("/api/v1/oauth/integrations", "alice", &["user"])
            .await
            .status(),
        200
    );
    sqlx::query("ROLLBACK")
        .execute(&mut other)
        .await
        .expect("unlock");
    let response = app
        .http
        .post(app.url("/api/v1/oauth/providers/google/authorize"))
        .bearer_auth(app.token("alice", &["user"]))
        .json(&json!({}))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
}
