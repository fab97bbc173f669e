//! Secrets never reach the logs or the database in clear.
//!
//! A real `oauth-manager serve` process, with every crate (sqlx, hyper, reqwest, tower-http,
//! axum, ...) logging at `trace` and its background worker on, runs whole flows against the fake
//! provider: connect, a replayed callback, token hand-out, refresh (on demand, reported
//! rejection and the worker's), and disconnect with revocation. Then its captured stdout and
//! stderr, and the database (the SQLite files byte for byte with their -wal/-shm, or every row
//! of the six tables as text on PostgreSQL), are searched for every secret of the run: the
//! tokens, codes and PKCE verifiers the fake issued or received, the client secrets and
//! `Authorization` credentials, the `state` values, the callers' JWTs and the JWT secret, and
//! the encryption key.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use crate::support::fake_provider::{Consent, Endpoint, FakeProvider, Fault};
use crate::support::{spawn_with_fake, TestApp, JWT_SECRET};
use oauth_manager::storage::Database;

const BIN: &str = env!("CARGO_BIN_EXE_oauth-manager");
const PUBLIC: &str = "https://oauth.example.test";
const TABLES: [&str; 6] = [
    "oauth_integrations",
    "oauth_tokens",
    "oauth_scopes",
    "oauth_consents",
    "oauth_state",
    "oauth_audit_log",
];

/// A `serve` process logging everything at trace level into `log`.
struct TracedServer {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl TracedServer {
    fn start(app: &TestApp) -> TracedServer {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (name, value) in &app.vars {
            command.env(name, value);
        }
        command
            .env("DATABASE_URL", &app.database.url)
            .env("OAUTH_ENCRYPTION_KEY", app.key.to_base64().as_str())
            .env("OAUTH_JWT_SECRET", JWT_SECRET)
            .env("OAUTH_PUBLIC_URL", PUBLIC)
            .env("OAUTH_LISTEN_ADDR", "127.0.0.1:0")
            .env("OAUTH_BACKGROUND_REFRESH", "true")
            .env("OAUTH_REFRESH_INTERVAL_SECONDS", "1")
            .env("OAUTH_LOG_FORMAT", "json")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (sender, receiver) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let errors = std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let address = serde_json::from_slice::<Value>(&line)
                    .ok()
                    .and_then(|event| event["address"].as_str().map(str::to_owned));
                if let Some(address) = address {
                    let _ = sender.send(address);
                }
                sink.lock().expect("log").extend_from_slice(&line);
                line.clear();
            }
        });
        let mut stdout = child.stdout.take().expect("stdout");
        let sink = log.clone();
        let output = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(read) = stdout.read(&mut chunk) {
                if read == 0 {
                    break;
                }
                sink.lock().expect("log").extend_from_slice(&chunk[..read]);
            }
        });
        let address = receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("serve logs its address");
        TracedServer {
            child,
            base: format!("http://{address}"),
            log,
            readers: vec![errors, output],
        }
    }

    /// Stops the process and returns everything it wrote.
    fn stop(mut self) -> Vec<u8> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        std::mem::take(&mut *self.log.lock().expect("log"))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for TracedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Values a run handled that must never be written anywhere in clear.
#[derive(Default)]
struct Secrets(Vec<(String, Vec<u8>)>);

impl Secrets {
    fn add(&mut self, what: &str, value: impl AsRef<[u8]>) {
        let value = value.as_ref();
        assert!(value.len() >= 16, "{what} is too short to search for");
        self.0.push((what.to_owned(), value.to_vec()));
        // Also as it would appear in a URL query or a form body.
        let encoded: String = url::form_urlencoded::byte_serialize(value).collect();
        if encoded.as_bytes() != value {
            self.0
                .push((format!("{what} (form-encoded)"), encoded.into_bytes()));
        }
    }

    /// Every secret found in `haystack` (also as lower-case hex when `hex` is set: PostgreSQL
    /// renders bytea so).
    fn found_in(&self, haystack: &[u8], hex: bool) -> Vec<String> {
        let mut found = Vec::new();
        for (what, value) in &self.0 {
            let hexed: Vec<u8> = value
                .iter()
                .flat_map(|byte| format!("{byte:02x}").into_bytes())
                .collect();
            if contains(haystack, value) || (hex && contains(haystack, &hexed)) {
                found.push(format!("{what}: {}", String::from_utf8_lossy(value)));
            }
        }
        found
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// One provider's whole life cycle through the traced server; returns the `state` it used.
async fn full_flow(
    server: &TracedServer,
    app: &TestApp,
    fake: &FakeProvider,
    provider: &str,
    refreshes: bool,
) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let user = app.token("alice", &["user"]);
    let backend = app.token("backend", &["service"]);
    fake.push_consent(provider, Consent::user(&format!("{provider}-subject")));
    let started: Value = http
        .post(server.url(&format!("/api/v1/oauth/providers/{provider}/authorize")))
        .bearer_auth(&user)
        .json(&json!({}))
        .send()
        .await
        .expect("authorize")
        .json()
        .await
        .expect("authorize json");
    let url = started["authorization_url"].as_str().expect("url");
    let location = fake.authorize(url).await;
    assert!(location.starts_with(PUBLIC), "{location}");
    let callback = location.replacen(PUBLIC, &server.base, 1);
    let result: Value = http
        .get(&callback)
        .header("accept", "application/json")
        .send()
        .await
        .expect("callback")
        .json()
        .await
        .expect("callback json");
    assert_eq!(result["oauth_status"], "success", "{provider}: {result}");
    let id = result["integration_id"].as_str().expect("id").to_owned();
    // A replayed callback carries the same code and state again.
    let replay = http
        .get(&callback)
        .header("accept", "application/json")
        .send()
        .await
        .expect("replay");
    assert_eq!(replay.status(), 200, "a replay reports the first result");

    let token_url = server.url(&format!("/api/v1/oauth/integrations/{id}/token"));
    let hand_out = || async {
        let response = http
            .get(&token_url)
            .bearer_auth(&backend)
            .send()
            .await
            .expect("token");
        assert_eq!(response.status(), 200, "{provider}");
        let body: Value = response.json().await.expect("token json");
        body["access_token"].as_str().expect("token").to_owned()
    };
    let first = hand_out().await;
    if refreshes {
        // The fake's tokens live 2 s: the worker refreshes them, and so does the hand-out.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let second = hand_out().await;
        assert_ne!(first, second, "{provider}: the token was refreshed");
        let refreshed = http
            .post(server.url(&format!("/api/v1/oauth/integrations/{id}/refresh")))
            .bearer_auth(&backend)
            .json(&json!({"rejected_access_token": second}))
            .send()
            .await
            .expect("refresh");
        assert_eq!(refreshed.status(), 200, "{provider}");
    }
    let disconnected = http
        .delete(server.url(&format!("/api/v1/oauth/integrations/{id}")))
        .bearer_auth(&user)
        .send()
        .await
        .expect("disconnect");
    assert_eq!(disconnected.status(), 200, "{provider}");
    started["state"].as_str().expect("state").to_owned()
}

/// Failures whose provider answers repeat the secrets of the request (`Fault::EchoSecrets`): a
/// code exchange, a refresh and a revocation. Returns the states used and the response bodies
/// the service sent back.
async fn failing_flows(
    server: &TracedServer,
    app: &TestApp,
    fake: &FakeProvider,
) -> (Vec<String>, Vec<u8>) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let user = app.token("carol", &["user"]);
    let backend = app.token("backend", &["service"]);
    let mut states = Vec::new();
    let mut responses = Vec::new();
    let connect = |provider: &'static str| {
        let (http, user) = (http.clone(), user.clone());
        async move {
            fake.push_consent(provider, Consent::user(&format!("{provider}-carol")));
            let started: Value = http
                .post(server.url(&format!("/api/v1/oauth/providers/{provider}/authorize")))
                .bearer_auth(&user)
                .json(&json!({}))
                .send()
                .await
                .expect("authorize")
                .json()
                .await
                .expect("authorize json");
            let location = fake
                .authorize(started["authorization_url"].as_str().expect("url"))
                .await;
            let response = http
                .get(location.replacen(PUBLIC, &server.base, 1))
                .header("accept", "application/json")
                .send()
                .await
                .expect("callback");
            let status = response.status().as_u16();
            let body = response.bytes().await.expect("body").to_vec();
            let state = started["state"].as_str().expect("state").to_owned();
            (status, body, state)
        }
    };

    // The code exchange fails; the provider repeats the code, verifier and client secret.
    fake.push_fault("google", Endpoint::Token, Fault::EchoSecrets);
    let (status, body, state) = connect("google").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    states.push(state);
    responses.extend(body);

    // A refresh fails; the provider repeats the refresh token and the client credentials.
    let (status, body, state) = connect("acme").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    states.push(state);
    let id = serde_json::from_slice::<Value>(&body).expect("json")["integration_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // Whoever refreshes first, the worker or the hand-out, meets the failure.
    for _ in 0..3 {
        fake.push_fault("acme", Endpoint::Token, Fault::EchoSecrets);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let response = http
        .get(server.url(&format!("/api/v1/oauth/integrations/{id}/token")))
        .bearer_auth(&backend)
        .send()
        .await
        .expect("token");
    assert_eq!(response.status(), 409, "reauth_required");
    responses.extend(response.bytes().await.expect("body"));
    let view = http
        .get(server.url(&format!("/api/v1/oauth/integrations/{id}")))
        .bearer_auth(&user)
        .send()
        .await
        .expect("integration");
    responses.extend(view.bytes().await.expect("body"));

    // A revocation fails; the provider repeats the token and the client credentials.
    let (status, body, state) = connect("notion").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    states.push(state);
    let id = serde_json::from_slice::<Value>(&body).expect("json")["integration_id"]
        .as_str()
        .expect("id")
        .to_owned();
    fake.push_fault("notion", Endpoint::Revoke, Fault::EchoSecrets);
    let response = http
        .delete(server.url(&format!("/api/v1/oauth/integrations/{id}")))
        .bearer_auth(&user)
        .send()
        .await
        .expect("disconnect");
    assert_eq!(response.status(), 200);
    responses.extend(response.bytes().await.expect("body"));
    (states, responses)
}

/// The database's content as bytes: the SQLite files, or every row of every table as text.
async fn database_bytes(app: &TestApp) -> (Vec<u8>, bool) {
    match &app.db {
        Database::Sqlite(..) => {
            let path = app
                .database
                .url
                .trim_start_matches("sqlite://")
                .split('?')
                .next()
                .expect("path")
                .to_owned();
            let mut bytes = Vec::new();
            for suffix in ["", "-wal", "-shm", "-journal"] {
                if let Ok(content) = std::fs::read(format!("{path}{suffix}")) {
                    bytes.extend_from_slice(&content);
                }
            }
            assert!(bytes.len() > 4096, "the SQLite database was read");
            (bytes, false)
        }
        Database::Postgres(pool) => {
            let mut bytes = Vec::new();
            for table in TABLES {
                let rows: Vec<String> =
                    sqlx::query_scalar(&format!("SELECT CAST(t AS text) FROM {table} t"))
                        .fetch_all(pool)
                        .await
                        .expect("dump");
                for row in rows {
                    bytes.extend_from_slice(row.as_bytes());
                    bytes.push(b'\n');
                }
            }
            (bytes, true)
        }
    }
}

#[tokio::test]
async fn no_secret_reaches_the_logs_at_trace_level_or_the_database_in_clear() {
    let (app, fake) = spawn_with_fake().await;
    // Google: OIDC, PKCE, secret in the form body; acme: Basic client authentication, strict
    // rotation, RFC 9207 `iss`; Notion: JSON body, no expiry, no PKCE.
    fake.set_access_token_lifetime("google", 2);
    fake.set_access_token_lifetime("acme", 2);
    let server = TracedServer::start(&app);
    let mut states = Vec::new();
    for (provider, refreshes) in [("google", true), ("acme", true), ("notion", false)] {
        states.push(full_flow(&server, &app, &fake, provider, refreshes).await);
    }
    let (failing_states, responses) = failing_flows(&server, &app, &fake).await;
    states.extend(failing_states);
    // Give the worker a tick on what is left (revocations done, nothing due).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let log = server.stop();

    let mut secrets = Secrets::default();
    let issued = fake.secrets();
    for kind in [
        "access token",
        "refresh token",
        "ID token",
        "authorization code",
        "PKCE verifier",
        "client secret",
        "Authorization header credentials",
    ] {
        assert!(
            issued.iter().any(|(what, _)| *what == kind),
            "the run handled at least one {kind}"
        );
    }
    for (what, value) in &issued {
        secrets.add(what, value);
    }
    for state in &states {
        secrets.add("state", state);
    }
    let key = app.key.to_base64();
    secrets.add("encryption key", key.as_bytes());
    secrets.add(
        "encryption key (raw bytes)",
        STANDARD.decode(key.as_bytes()).expect("key"),
    );
    secrets.add("JWT secret", JWT_SECRET);
    secrets.add("caller JWT", app.token("alice", &["user"]));
    secrets.add("caller JWT", app.token("backend", &["service"]));

    // The capture is real: trace events of the service and its dependencies are in it.
    let text = String::from_utf8_lossy(&log);
    for expected in [
        "\"level\":\"TRACE\"",
        "oauth_tokens",
        "/api/v1/oauth/integrations/",
    ] {
        assert!(text.contains(expected), "the log holds {expected}");
    }
    let mut leaks = Vec::new();
    for leaked in secrets.found_in(&log, false) {
        leaks.push(format!("in the logs: {leaked}"));
    }
    let (stored, hex) = database_bytes(&app).await;
    for leaked in secrets.found_in(&stored, hex) {
        leaks.push(format!("in the database: {leaked}"));
    }
    // What the failures told callers: never a refresh token, verifier or client credential
    // (the browser that brought the code and state back may see those again).
    let mut told = Secrets::default();
    for (what, value) in &issued {
        if !matches!(*what, "authorization code" | "access token") {
            told.add(what, value);
        }
    }
    for leaked in told.found_in(&responses, false) {
        leaks.push(format!("in a response: {leaked}"));
    }
    assert!(
        leaks.is_empty(),
        "secrets leaked ({} log bytes searched): {leaks:#?}",
        log.len()
    );
}
