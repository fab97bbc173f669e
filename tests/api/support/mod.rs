//! Test support: `spawn_app()` and helpers to mint JWTs and seed data.

pub mod db;
pub mod fake_provider;
pub mod pg_cluster;
pub mod process;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use uuid::Uuid;

use oauth_manager::app::Application;
use oauth_manager::clock::{Clock, ManualClock};
use oauth_manager::config::{Config, Env};
use oauth_manager::crypto::KeyMaterial;
use oauth_manager::http::AppState;
use oauth_manager::storage::integrations::{Integration, IntegrationStatus};
use oauth_manager::storage::Database;

pub use db::TestDatabase;

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A running service and everything a test needs to poke at it.
pub struct TestApp {
    pub address: String,
    pub http: reqwest::Client,
    pub state: AppState,
    pub db: Database,
    pub clock: ManualClock,
    pub database: TestDatabase,
    pub key: KeyMaterial,
    /// The variables this app was started with (a sibling replica reuses them).
    pub vars: Vec<(String, String)>,
    /// `http://…` of the metrics listener, when `OAUTH_METRICS_ADDR` was given.
    pub metrics_address: Option<String>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Builds the service configuration from environment-style variables, exactly as `serve` does.
pub fn config_from(vars: &HashMap<String, String>) -> Config {
    let lookup = |name: &str| vars.get(name).cloned();
    Config::from_lookup(&Env::new(&lookup)).expect("test configuration is valid")
}

/// The variables every test app starts with; `overrides` replace or add to them.
pub fn base_env(database_url: &str, key: &KeyMaterial) -> HashMap<String, String> {
    HashMap::from([
        ("DATABASE_URL".to_owned(), database_url.to_owned()),
        (
            "OAUTH_ENCRYPTION_KEY".to_owned(),
            key.to_base64().to_string(),
        ),
        ("OAUTH_JWT_SECRET".to_owned(), JWT_SECRET.to_owned()),
        (
            "OAUTH_PUBLIC_URL".to_owned(),
            "https://oauth.example.test".to_owned(),
        ),
        // Tests drive the worker explicitly (`worker::tick`), on the manual clock.
        ("OAUTH_BACKGROUND_REFRESH".to_owned(), "false".to_owned()),
        // Every test's connect flows come from 127.0.0.1; the rate-limit tests set their own.
        (
            "OAUTH_RATE_LIMIT_CONNECT_PER_MINUTE".to_owned(),
            "100000".to_owned(),
        ),
    ])
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts the service with extra environment variables (an empty value removes a variable).
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    let database = TestDatabase::create().await;
    spawn_app_on(database, &KeyMaterial::generate(), overrides).await
}

pub async fn spawn_app_on(
    database: TestDatabase,
    key: &KeyMaterial,
    overrides: &[(&str, &str)],
) -> TestApp {
    let mut env = base_env(&database.url, key);
    for (name, value) in overrides {
        if value.is_empty() {
            env.remove(*name);
        } else {
            env.insert((*name).to_owned(), (*value).to_owned());
        }
    }
    let clock = ManualClock::new(Utc::now());
    let application = Application::build(config_from(&env), Arc::new(clock.clone()))
        .await
        .expect("application starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    let metrics_address = application
        .metrics_addr()
        .map(|addr| format!("http://{addr}"));
    let state = application.state.clone();
    let server = tokio::spawn(async move {
        let _ = application.serve(listener, std::future::pending()).await;
    });
    TestApp {
        address,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client"),
        db: state.services.db.clone(),
        state,
        clock,
        database,
        key: key.clone(),
        vars: overrides
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        metrics_address,
        server,
    }
}

impl TestApp {
    /// A second replica on the same database, with the same key and settings but its own
    /// process-local state (locks, caches) and clock set to this app's time.
    pub async fn sibling(&self) -> TestApp {
        let vars: Vec<(&str, &str)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sibling = spawn_app_on(self.database.alias(), &self.key, &vars).await;
        sibling.clock.set(self.clock.now());
        sibling
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// An HS256 token for `user` with `roles`, valid for an hour on the app's clock.
    pub fn token(&self, user: &str, roles: &[&str]) -> String {
        let now = self.clock.now();
        sign_hs256(&json!({
            "sub": user,
            "roles": roles,
            "iat": now.timestamp(),
            "exp": (now + Duration::hours(1)).timestamp(),
        }))
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub async fn get_as(&self, path: &str, user: &str, roles: &[&str]) -> reqwest::Response {
        self.get(path, &self.token(user, roles)).await
    }

    /// Stores an active integration of `user` at `provider`, as a completed connect flow would.
    pub async fn seed_integration(&self, user: &str, provider: &str) -> Integration {
        let now = self.clock.now();
        let integration = Integration {
            id: Uuid::now_v7(),
            user_id: user.to_owned(),
            provider: provider.to_owned(),
            provider_account_id: format!("acct-{}", Uuid::new_v4()),
            account_email: Some(format!("{user}@example.com")),
            account_name: Some(user.to_owned()),
            account_metadata: json!({}),
            status: IntegrationStatus::Active,
            granted_scopes: vec!["openid".to_owned(), "email".to_owned()],
            requested_scopes: vec![
                "openid".to_owned(),
                "email".to_owned(),
                "calendar".to_owned(),
            ],
            created_at: now,
            updated_at: now,
            last_refreshed_at: None,
            last_error: None,
            last_error_at: None,
        };
        self.db
            .insert_integration(&integration)
            .await
            .expect("seed integration");
        integration
    }
}

pub fn sign_hs256(claims: &Value) -> String {
    sign_hs256_with(claims, JWT_SECRET.as_bytes())
}

pub fn sign_hs256_with(claims: &Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

pub fn sign_pem(
    claims: &Value,
    algorithm: Algorithm,
    private_pem: &str,
    kid: Option<&str>,
) -> String {
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem.as_bytes()),
        _ => EncodingKey::from_ec_pem(private_pem.as_bytes()),
    }
    .expect("private key");
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &key).expect("sign")
}

/// Standard claims valid at `now` for an hour.
pub fn claims(user: &str, roles: &[&str], now: DateTime<Utc>) -> Value {
    json!({
        "sub": user,
        "roles": roles,
        "iat": now.timestamp(),
        "exp": (now + Duration::hours(1)).timestamp(),
    })
}

pub async fn problem(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json", "status {status}");
    let body: Value = response.json().await.expect("problem body");
    assert_eq!(body["status"], status, "problem status mirrors HTTP status");
    assert!(
        body["code"].as_str().is_some_and(|c| !c.is_empty()),
        "stable code"
    );
    (status, body)
}

/// The return URL connect-flow tests allow.
pub const RETURN_BASE: &str = "https://app.example.test/settings";

/// A service whose built-in providers (and the declared `acme`) point at a fresh fake
/// authorization server.
pub async fn spawn_with_fake() -> (TestApp, fake_provider::FakeProvider) {
    spawn_with_fake_and(&[]).await
}

pub async fn spawn_with_fake_and(extra: &[(&str, &str)]) -> (TestApp, fake_provider::FakeProvider) {
    spawn_with_fake_on(TestDatabase::create().await, extra).await
}

/// [`spawn_with_fake_and`] on a given database.
pub async fn spawn_with_fake_on(
    database: TestDatabase,
    extra: &[(&str, &str)],
) -> (TestApp, fake_provider::FakeProvider) {
    let fake = fake_provider::FakeProvider::start().await;
    let path = providers_file(&fake.providers_toml());
    let mut vars = vec![
        ("OAUTH_PROVIDERS_FILE", path.as_str()),
        ("OAUTH_ALLOWED_RETURN_URLS", RETURN_BASE),
    ];
    vars.extend_from_slice(extra);
    let app = spawn_app_on(database, &KeyMaterial::generate(), &vars).await;
    (app, fake)
}

/// Writes an OAUTH_PROVIDERS_FILE and returns its path. Kept for the whole test run: sibling
/// replicas and `serve` processes read the same file.
pub fn providers_file(toml: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let path = dir.join("providers.toml");
    std::fs::write(&path, toml).expect("write providers file");
    path.to_string_lossy().into_owned()
}

/// Runs one statement with positional binds on whichever backend the app uses (tests only).
macro_rules! raw {
    ($db:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        match $db {
            oauth_manager::storage::Database::Postgres(pool) => sqlx::query($sql)
                $(.bind($bind))*.execute(pool).await.map(|done| done.rows_affected()),
            oauth_manager::storage::Database::Sqlite(pool, _) => sqlx::query($sql)
                $(.bind($bind))*.execute(pool).await.map(|done| done.rows_affected()),
        }
        .expect("raw SQL")
    };
}

/// One scalar from a query with positional binds.
macro_rules! raw_scalar {
    ($ty:ty, $db:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        match $db {
            oauth_manager::storage::Database::Postgres(pool) => sqlx::query_scalar::<_, $ty>($sql)
                $(.bind($bind))*.fetch_one(pool).await,
            oauth_manager::storage::Database::Sqlite(pool, _) => sqlx::query_scalar::<_, $ty>($sql)
                $(.bind($bind))*.fetch_one(pool).await,
        }
        .expect("raw SQL")
    };
}
pub(crate) use {raw, raw_scalar};

/// Counts rows of a table (tests only; the name is a constant of the test).
pub async fn count_rows(db: &Database, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    match db {
        Database::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
        Database::Sqlite(pool, _) => sqlx::query_scalar(&sql).fetch_one(pool).await,
    }
    .expect("count")
}

/// Every audit event about `subject` (all users with `None`), oldest first.
pub async fn audit_events(
    app: &TestApp,
    subject: Option<&str>,
) -> oauth_manager::storage::Paged<oauth_manager::storage::audit::AuditEvent, i64> {
    let page = oauth_manager::storage::Page {
        after: None,
        limit: 200,
    };
    // Hand-out events are written by the audit writer in the background.
    app.state.services.audit.flush().await;
    app.db
        .list_audit_events(subject, page)
        .await
        .expect("audit events")
}
