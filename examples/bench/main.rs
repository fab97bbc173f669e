//! Load benchmark of the token hand-out: the real service, in-process, against SQLite and/or
//! PostgreSQL, with the tests' fake authorization server standing in for Google.
//!
//! ```sh
//! cargo run --release --example bench -- [--seconds N] [--database sqlite|postgres|both]
//!     [--postgres-url URL] [--integrations N] [--connections N] [--storm N]
//!     [--provider-latency-ms N] [--rounds N] [--warmup N]
//! ```
//!
//! Per backend it starts the service exactly as `serve` does (configuration from environment
//! variables, `Application::build`, `Application::serve` on `127.0.0.1:0`), seeds integrations
//! through the storage and vault APIs, then measures:
//!
//! 1. `GET /healthz` and 2. `GET /api/v1/oauth/integrations/{id}/token` (service JWT, ids
//!    spread over the seeded integrations), each from `--connections` keep-alive HTTP/1.1
//!    connections for `--seconds` in total, alternating in `--rounds` slices;
//! 3. a refresh storm: `--storm` concurrent `GET …/token` on one integration whose token has
//!    expired, while the fake provider's token endpoint takes `--provider-latency-ms`.
//!
//! The report is a markdown table on stdout; progress goes to stderr. The load generator runs
//! in the same process (and on the same cores) as the service, so compare numbers of one run
//! with each other rather than with other machines. See BENCHMARKS.md.

#[path = "../../tests/api/support/fake_provider.rs"]
mod fake_provider;
mod fleet;
mod load;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use anyhow::{anyhow, bail, Context as _};
use axum::body::Bytes;
use chrono::{Duration, Utc};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rand::distributions::Alphanumeric;
use rand::Rng;
use reqwest::header::HeaderValue;
use reqwest::{StatusCode, Url};
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{oneshot, Barrier};
use tokio::task::JoinSet;
use uuid::Uuid;

use fake_provider::{Consent, Endpoint, FakeProvider, Fault};
use oauth_manager::app::Application;
use oauth_manager::clock::{Clock, SystemClock};
use oauth_manager::config::{Config, Env};
use oauth_manager::crypto::KeyMaterial;
use oauth_manager::http::AppState;
use oauth_manager::services::vault::{TokenOwner, TokenSet};
use oauth_manager::storage::integrations::{Integration, IntegrationStatus};
use oauth_manager::storage::Database;

/// `OAUTH_PUBLIC_URL` of the benchmarked service; the fake redirects the "browser" there.
const PUBLIC_URL: &str = "https://oauth.bench.test";
const PROVIDER: &str = "google";

const USAGE: &str = "usage: cargo run --release --example bench -- [options]

  --seconds N              length of each load phase (default 10)
  --rounds N               slices the /healthz and token phases alternate in (default 5)
  --warmup N               unrecorded warm-up before each load phase, seconds (default 1)
  --connections N          concurrent keep-alive connections (default 64)
  --integrations N         integrations seeded per backend (default 1000)
  --storm N                concurrent callers in the refresh storm (default 1000)
  --storm-rounds N         storms per backend, each on a newly connected integration; the
                           report shows the slowest (default 1)
  --provider-latency-ms N  latency of the fake token endpoint in the storm and the fleet
                           phase (default 50)
  --flows N                concurrent complete connect flows in the burst (default 1000)
  --fleet N                integrations the background refresher of a `serve` process
                           refreshes while serving (default 100000; 0 skips; needs
                           `cargo build --release` for target/release/oauth-manager)
  --refresh-concurrency N  OAUTH_REFRESH_CONCURRENCY of that process (default 128)
  --database B             sqlite, postgres or both (default: both when a PostgreSQL URL is
                           given by --postgres-url or TEST_DATABASE_URL, else sqlite)
  --postgres-url URL       PostgreSQL server; a fresh database is created and dropped

Environment: OAUTH_DATABASE_MAX_CONNECTIONS, OAUTH_MAX_CONCURRENT_REQUESTS,
OAUTH_MAX_CONNECTIONS and OAUTH_TOKEN_CACHE_SECONDS, when set, reach the benchmarked service; LD_PRELOAD and MALLOC_*/MIMALLOC_* also reach the fleet's `serve`.";

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres { server_url: String },
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }
}

#[derive(Debug, Clone)]
struct Options {
    seconds: u64,
    rounds: u32,
    warmup: u64,
    connections: usize,
    integrations: usize,
    storm: usize,
    storm_rounds: usize,
    provider_latency: StdDuration,
    /// Concurrent complete connect flows in the burst.
    flows: usize,
    /// Integrations the background refresher refreshes in the fleet phase (0: skip it).
    fleet: usize,
    /// `OAUTH_REFRESH_CONCURRENCY` of the fleet phase's `serve` process.
    refresh_concurrency: usize,
    backends: Vec<Backend>,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut seconds = 10;
    let mut rounds = 5;
    let mut warmup = 1;
    let mut connections = 64;
    let mut integrations = 1000;
    let mut storm = 1000;
    let mut storm_rounds = 1;
    let mut latency_ms = 50;
    let mut flows = 1000;
    let mut fleet = 100_000;
    let mut refresh_concurrency = 128;
    let mut database: Option<String> = None;
    let mut postgres_url: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        if name == "--help" || name == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || -> anyhow::Result<String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| anyhow!("{name} needs a value\n\n{USAGE}"))
        };
        let number = |text: String| -> anyhow::Result<u64> {
            text.parse()
                .with_context(|| format!("{name}: not a number: {text:?}"))
        };
        match name.as_str() {
            "--seconds" => seconds = number(value()?)?.max(1),
            "--rounds" => rounds = u32::try_from(number(value()?)?.clamp(1, 1000))?,
            "--warmup" => warmup = number(value()?)?,
            "--connections" => connections = usize::try_from(number(value()?)?.max(1))?,
            "--integrations" => integrations = usize::try_from(number(value()?)?.max(1))?,
            "--storm" => storm = usize::try_from(number(value()?)?.max(1))?,
            "--storm-rounds" => storm_rounds = usize::try_from(number(value()?)?.clamp(1, 1000))?,
            "--provider-latency-ms" => latency_ms = number(value()?)?,
            "--flows" => flows = usize::try_from(number(value()?)?.max(1))?,
            "--fleet" => fleet = usize::try_from(number(value()?)?)?,
            "--refresh-concurrency" => {
                refresh_concurrency = usize::try_from(number(value()?)?.clamp(1, 1024))?;
            }
            "--database" => database = Some(value()?),
            "--postgres-url" => postgres_url = Some(value()?),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    let postgres_url = postgres_url.or_else(|| {
        std::env::var("TEST_DATABASE_URL")
            .ok()
            .filter(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
    });
    let postgres = || -> anyhow::Result<Backend> {
        let server_url = postgres_url
            .clone()
            .ok_or_else(|| anyhow!("PostgreSQL needs --postgres-url URL (or TEST_DATABASE_URL)"))?;
        Ok(Backend::Postgres { server_url })
    };
    let backends = match database.as_deref() {
        Some("sqlite") => vec![Backend::Sqlite],
        Some("postgres") => vec![postgres()?],
        Some("both") => vec![Backend::Sqlite, postgres()?],
        None if postgres_url.is_some() => vec![Backend::Sqlite, postgres()?],
        None => vec![Backend::Sqlite],
        Some(other) => bail!("--database: expected sqlite, postgres or both, got {other:?}"),
    };
    Ok(Options {
        seconds,
        rounds,
        warmup,
        connections,
        integrations,
        storm,
        storm_rounds,
        provider_latency: StdDuration::from_millis(latency_ms),
        flows,
        fleet,
        refresh_concurrency,
        backends,
    })
}

// ---------------------------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------------------------

/// A database created for one run, dropped (PostgreSQL) or deleted (SQLite) afterwards.
enum Provisioned {
    Sqlite {
        url: String,
        _dir: tempfile::TempDir,
    },
    Postgres {
        url: String,
        server_url: String,
        name: String,
    },
}

impl Provisioned {
    async fn create(backend: &Backend) -> anyhow::Result<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("bench.db").display()
                );
                Ok(Provisioned::Sqlite { url, _dir: dir })
            }
            Backend::Postgres { server_url } => {
                let name = bench_database_name();
                let mut conn = admin_connection(server_url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .with_context(|| format!("create database {name}"))?;
                conn.close().await.ok();
                let mut url = Url::parse(server_url).context("--postgres-url")?;
                url.set_path(&format!("/{name}"));
                Ok(Provisioned::Postgres {
                    url: url.to_string(),
                    server_url: server_url.clone(),
                    name,
                })
            }
        }
    }

    fn url(&self) -> &str {
        match self {
            Provisioned::Sqlite { url, .. } | Provisioned::Postgres { url, .. } => url,
        }
    }

    async fn destroy(self) -> anyhow::Result<()> {
        if let Provisioned::Postgres {
            server_url, name, ..
        } = self
        {
            let mut conn = admin_connection(&server_url).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .with_context(|| format!("drop database {name}"))?;
            conn.close().await.ok();
            eprintln!("  dropped database {name}");
        }
        Ok(())
    }
}

/// A connection to the server URL for CREATE/DROP DATABASE (which may be slow: a checkpoint).
async fn admin_connection(server_url: &str) -> anyhow::Result<sqlx::PgConnection> {
    let options = sqlx::postgres::PgConnectOptions::from_str(server_url)
        .with_context(|| format!("PostgreSQL URL {server_url}"))?
        .disable_statement_logging();
    options
        .connect()
        .await
        .with_context(|| format!("connect to {server_url}"))
}

async fn server_version(db: &Database) -> String {
    let version = match db {
        Database::Postgres(pool) => {
            sqlx::query_scalar::<_, String>("SHOW server_version")
                .fetch_one(pool)
                .await
        }
        Database::Sqlite(pool, _) => {
            sqlx::query_scalar::<_, String>("SELECT sqlite_version()")
                .fetch_one(pool)
                .await
        }
    };
    match version {
        // "15.4 (Debian 15.4-1)" → "15.4"
        Ok(version) => version
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
        Err(err) => format!("unknown ({err})"),
    }
}

// ---------------------------------------------------------------------------------------------
// The service under test
// ---------------------------------------------------------------------------------------------

struct Service {
    api: Api,
    state: AppState,
    /// The environment the service was configured from (for `serve` child processes).
    vars: HashMap<String, String>,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _providers_dir: tempfile::TempDir,
    /// The service's own runtime (declared last: dropped after the rest).
    _runtime: OwnRuntime,
}

/// The service and the fake provider each run on a runtime of their own (the service with as
/// many worker threads as `serve` has): the load generator's tasks must not queue in the same
/// scheduler as theirs. In a shared one, a request waits behind every generator task runnable
/// when it arrived, and the fake's answer after its latency waits behind them too, which a real
/// client on its own process, or a provider on its own machine, does not cause.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn start(name: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Self(Some(runtime)))
    }

    fn handle(&self) -> anyhow::Result<&tokio::runtime::Handle> {
        self.0
            .as_ref()
            .map(tokio::runtime::Runtime::handle)
            .ok_or_else(|| anyhow!("a bench runtime is gone"))
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside the bench's own runtime.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Builds the configuration from environment-style variables, as `serve` (and the tests'
/// `config_from`) do.
fn config_from(vars: &HashMap<String, String>) -> anyhow::Result<Config> {
    let lookup = |name: &str| vars.get(name).cloned();
    Config::from_lookup(&Env::new(&lookup)).map_err(|err| anyhow!("configuration: {err}"))
}

fn random_string(length: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(length)
        .map(char::from)
        .collect()
}

/// Service settings a run may set in its own environment (for A/B runs): they reach the
/// in-process service and the fleet phase's `serve` process.
const PASSED_SETTINGS: &[&str] = &[
    "OAUTH_DATABASE_MAX_CONNECTIONS",
    "OAUTH_MAX_CONCURRENT_REQUESTS",
    "OAUTH_MAX_CONNECTIONS",
    "OAUTH_TOKEN_CACHE_SECONDS",
];

async fn start_service(database_url: &str, fake: &FakeProvider) -> anyhow::Result<Service> {
    let providers_dir = tempfile::tempdir()?;
    let providers_file = providers_dir.path().join("providers.toml");
    std::fs::write(&providers_file, fake.providers_toml())?;
    let jwt_secret = random_string(48);
    let mut vars = HashMap::from([
        ("DATABASE_URL".to_owned(), database_url.to_owned()),
        (
            "OAUTH_ENCRYPTION_KEY".to_owned(),
            KeyMaterial::generate().to_base64().to_string(),
        ),
        ("OAUTH_JWT_SECRET".to_owned(), jwt_secret.clone()),
        ("OAUTH_PUBLIC_URL".to_owned(), PUBLIC_URL.to_owned()),
        ("OAUTH_BACKGROUND_REFRESH".to_owned(), "false".to_owned()),
        // Throughput is the point here: one benchmark user would hit the per-user limit.
        ("OAUTH_RATE_LIMIT_ENABLED".to_owned(), "false".to_owned()),
        (
            "OAUTH_PROVIDERS_FILE".to_owned(),
            providers_file.to_string_lossy().into_owned(),
        ),
    ]);
    let passed = PASSED_SETTINGS
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), std::env::var(name).ok()?)));
    vars.extend(passed);
    let config = config_from(&vars)?;
    let runtime = OwnRuntime::start("service")?;
    let (stop, stopped) = oneshot::channel::<()>();
    let (address, state, server) = runtime
        .handle()?
        .spawn(async move {
            let application = Application::build(config, Arc::new(SystemClock))
                .await
                .map_err(|err| anyhow!("the service does not start: {err}"))?;
            let listener = oauth_manager::http::server::listen(([127, 0, 0, 1], 0).into())?;
            let address = format!("http://{}", listener.local_addr()?);
            let state = application.state.clone();
            let server = tokio::spawn(application.serve(listener, async {
                let _ = stopped.await;
            }));
            Ok::<_, anyhow::Error>((address, state, server))
        })
        .await??;
    Ok(Service {
        _runtime: runtime,
        api: Api {
            address,
            jwt_secret,
        },
        state,
        vars,
        stop,
        server,
        _providers_dir: providers_dir,
    })
}

/// Where a service listens and how to mint callers' JWTs for it.
#[derive(Debug, Clone)]
struct Api {
    address: String,
    jwt_secret: String,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// An HS256 bearer token for `user` with `roles`, valid for a day.
    fn jwt(&self, user: &str, roles: &[&str]) -> anyhow::Result<String> {
        let now = Utc::now();
        let claims = json!({
            "sub": user,
            "roles": roles,
            "iat": now.timestamp(),
            "exp": (now + Duration::days(1)).timestamp(),
        });
        Ok(encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(self.jwt_secret.as_bytes()),
        )?)
    }
}

impl Service {
    fn url(&self, path: &str) -> String {
        self.api.url(path)
    }

    fn db(&self) -> &Database {
        &self.state.services.db
    }

    fn jwt(&self, user: &str, roles: &[&str]) -> anyhow::Result<String> {
        self.api.jwt(user, roles)
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(StdDuration::from_secs(35), self.server).await {
            Ok(joined) => joined??,
            Err(_) => eprintln!("  warning: the service did not shut down within 35 s"),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Seeding
// ---------------------------------------------------------------------------------------------

/// Stores `count` active Google integrations, each with a sealed token set valid for an hour
/// (as a completed connect flow would); returns their ids.
async fn seed(service: &Service, count: usize) -> anyhow::Result<Vec<Uuid>> {
    const WORKERS: usize = 8;
    let mut tasks = JoinSet::new();
    for worker in 0..WORKERS {
        let db = service.db().clone();
        let vault = service.state.services.vault.clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for n in (worker..count).step_by(WORKERS) {
                let now = SystemClock.now();
                let user = format!("user-{}", n % 250);
                let integration = Integration {
                    id: Uuid::now_v7(),
                    user_id: user.clone(),
                    provider: PROVIDER.to_owned(),
                    provider_account_id: format!("acct-{n}"),
                    account_email: Some(format!("{user}+{n}@example.com")),
                    account_name: Some(user.clone()),
                    account_metadata: json!({}),
                    status: IntegrationStatus::Active,
                    granted_scopes: vec!["openid".to_owned(), "email".to_owned()],
                    requested_scopes: vec!["openid".to_owned(), "email".to_owned()],
                    created_at: now,
                    updated_at: now,
                    last_refreshed_at: None,
                    last_error: None,
                    last_error_at: None,
                };
                db.insert_integration(&integration).await?;
                let tokens = TokenSet {
                    access_token: SecretString::from(format!(
                        "ya29.bench-access-{n}-{}",
                        random_string(96)
                    )),
                    refresh_token: Some(SecretString::from(format!(
                        "1//bench-refresh-{n}-{}",
                        random_string(64)
                    ))),
                    id_token: None,
                    token_type: "Bearer".to_owned(),
                    expires_at: Some(now + Duration::hours(1)),
                    refresh_token_expires_at: None,
                };
                let owner = TokenOwner {
                    integration_id: integration.id,
                    user_id: &user,
                };
                let sealed = vault.seal(owner, &tokens, now)?;
                db.upsert_tokens(&sealed).await?;
                ids.push(integration.id);
            }
            anyhow::Ok(ids)
        });
    }
    let mut ids = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        ids.extend(done??);
    }
    ids.sort();
    Ok(ids)
}

// ---------------------------------------------------------------------------------------------
// Load phases
// ---------------------------------------------------------------------------------------------

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(StdDuration::from_secs(120))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(StdDuration::from_secs(60))
        .build()?)
}

/// Latencies (nanoseconds, sorted) and errors of one phase.
#[derive(Debug, Default, Clone)]
struct Measured {
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: StdDuration,
    cpu: Option<CpuUsage>,
}

/// Where the machine's CPU time went during a phase (from /proc/stat and /proc/*/stat), in
/// cores: the load generator runs on the same cores as the service, so a phase is only
/// comparable with another if "other" stayed near zero.
#[derive(Debug, Clone, Copy)]
struct CpuUsage {
    /// Cores busy, all processes.
    busy: f64,
    /// This process: service + load generator + fake provider.
    bench: f64,
    /// PostgreSQL: the server's own processes and the backends serving the benchmark's
    /// database (backends of other databases count as "other").
    postgres: f64,
}

#[derive(Debug, Clone, Copy)]
struct CpuSample {
    busy: u64,
    total: u64,
    bench: u64,
    postgres: u64,
}

/// The database this run created (`oauth_manager_bench_<pid>`), to attribute PostgreSQL
/// backends.
fn bench_database_name() -> String {
    format!("oauth_manager_bench_{}", std::process::id())
}

/// Whether a `postgres` process works for this benchmark: a server process (postmaster,
/// WAL writer, checkpointer, …), or a client backend of the benchmark's database. PostgreSQL
/// shows "postgres: 15/main: user database 127.0.0.1(port) state" as a backend's command line.
fn serves_this_benchmark(pid_dir: &std::path::Path) -> bool {
    let Ok(cmdline) = std::fs::read(pid_dir.join("cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    let client_backend =
        cmdline.contains("127.0.0.1(") || cmdline.contains("::1(") || cmdline.contains("[local]");
    !client_backend || cmdline.contains(&bench_database_name())
}

/// utime + stime (clock ticks) and the command name of a /proc/{pid}/stat file.
fn process_ticks(path: &std::path::Path) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `tail` starts at field 3.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name, ticks))
}

impl CpuSample {
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4)?;
        let bench = process_ticks(std::path::Path::new("/proc/self/stat"))?.1;
        let postgres = std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter_map(|entry| {
                let (name, ticks) = process_ticks(&entry.path().join("stat"))?;
                (name == "postgres" && serves_this_benchmark(&entry.path())).then_some(ticks)
            })
            .sum();
        Some(Self {
            busy: total - idle,
            total,
            bench,
            postgres,
        })
    }

    fn since(self, start: Self) -> Option<CpuUsage> {
        let total = self.total.checked_sub(start.total)? as f64;
        if total <= 0.0 {
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let in_cores = |ticks: u64| ticks as f64 / total * cores;
        Some(CpuUsage {
            busy: in_cores(self.busy.checked_sub(start.busy)?),
            bench: in_cores(self.bench.checked_sub(start.bench)?),
            // Backends that exited in between make this a slight underestimate.
            postgres: in_cores(self.postgres.saturating_sub(start.postgres)),
        })
    }
}

impl Measured {
    fn requests(&self) -> usize {
        self.latencies.len()
    }

    fn per_second(&self) -> f64 {
        let ok = self.requests() as f64 - self.errors as f64;
        ok / self.elapsed.as_secs_f64()
    }

    /// Nearest-rank percentile, nanoseconds.
    fn percentile(&self, q: f64) -> u64 {
        if self.latencies.is_empty() {
            return 0;
        }
        let rank = (q * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }

    fn max(&self) -> u64 {
        self.latencies.last().copied().unwrap_or(0)
    }
}

/// What a response must look like to count as a success.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Healthz,
    Token,
}

fn check(expect: Expect, status: StatusCode, body: &[u8]) -> Result<(), String> {
    let ok = status == StatusCode::OK
        && match expect {
            Expect::Healthz => true,
            Expect::Token => body
                .windows(b"\"access_token\"".len())
                .any(|window| window == b"\"access_token\""),
        };
    if ok {
        Ok(())
    } else {
        let body = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        Err(format!("HTTP {status}: {body}"))
    }
}

/// `connections` tasks, each on a connection of its own looping over `urls` (task `t` takes
/// `t`, `t + connections`, …) until `duration` has passed; every request's latency is
/// recorded. A connection that fails is opened again.
async fn closed_loop(
    urls: &[Url],
    auth: Option<HeaderValue>,
    expect: Expect,
    connections: usize,
    duration: StdDuration,
) -> Measured {
    let target = match load::Target::of(urls) {
        Ok(target) => Arc::new(target),
        Err(err) => {
            return Measured {
                errors: 1,
                first_error: Some(err),
                ..Measured::default()
            }
        }
    };
    let cpu_start = CpuSample::now();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for task in 0..connections {
        let (target, auth) = (target.clone(), auth.clone());
        tasks.spawn(async move {
            let mut measured = Measured {
                latencies: Vec::with_capacity(1 << 14),
                ..Measured::default()
            };
            let mut connection = None;
            let mut next = task;
            while Instant::now() < deadline {
                let path = &target.paths[next % target.paths.len()];
                next += connections;
                let began = Instant::now();
                let result = request_on(&mut connection, &target, path, auth.as_ref())
                    .await
                    .and_then(|(status, body)| check(expect, status, &body));
                measured.latencies.push(nanos(began.elapsed()));
                if let Err(err) = result {
                    measured.errors += 1;
                    measured.first_error.get_or_insert(err);
                }
            }
            measured
        });
    }
    let mut total = Measured::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(part) => {
                total.latencies.extend(part.latencies);
                total.errors += part.errors;
                if total.first_error.is_none() {
                    total.first_error = part.first_error;
                }
            }
            Err(err) => {
                total.errors += 1;
                total.first_error.get_or_insert(format!("load task: {err}"));
            }
        }
    }
    total.close(cpu_start, start.elapsed())
}

/// One request on `connection`, opening it first if there is none; a connection that failed,
/// or that the service closes after this response, is dropped (the next request opens a new
/// one).
async fn request_on(
    connection: &mut Option<load::Connection>,
    target: &load::Target,
    path: &hyper::Uri,
    auth: Option<&HeaderValue>,
) -> Result<(StatusCode, Bytes), String> {
    let open = match connection {
        Some(open) => open,
        None => connection.insert(load::Connection::open(target.address).await?),
    };
    let result = open.get(target, path, auth).await;
    if result.is_err() || open.is_closing() {
        *connection = None;
    }
    result
}

fn nanos(duration: StdDuration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One kind of request of the throughput phase.
struct Load {
    label: &'static str,
    urls: Arc<Vec<Url>>,
    auth: Option<HeaderValue>,
    expect: Expect,
}

impl Load {
    async fn run(&self, connections: usize, duration: StdDuration) -> Measured {
        closed_loop(
            &self.urls,
            self.auth.clone(),
            self.expect,
            connections,
            duration,
        )
        .await
    }
}

impl Measured {
    /// Adds another slice of the same phase (latencies are re-sorted by [`Measured::finish`]).
    fn absorb(&mut self, part: Measured) {
        let (mine, theirs) = (self.elapsed.as_secs_f64(), part.elapsed.as_secs_f64());
        self.cpu = match (self.cpu, part.cpu) {
            (Some(a), Some(b)) if mine + theirs > 0.0 => {
                let mix = |x: f64, y: f64| (x * mine + y * theirs) / (mine + theirs);
                Some(CpuUsage {
                    busy: mix(a.busy, b.busy),
                    bench: mix(a.bench, b.bench),
                    postgres: mix(a.postgres, b.postgres),
                })
            }
            (None, theirs) if self.latencies.is_empty() => theirs,
            (mine, _) => mine,
        };
        self.latencies.extend(part.latencies);
        self.errors += part.errors;
        if self.first_error.is_none() {
            self.first_error = part.first_error;
        }
        self.elapsed += part.elapsed;
    }

    fn finish(mut self) -> Self {
        self.latencies.sort_unstable();
        self
    }

    /// Ends a phase that began at `cpu_start` and took `elapsed`: its CPU use, its latencies
    /// sorted.
    fn close(mut self, cpu_start: Option<CpuSample>, elapsed: StdDuration) -> Self {
        self.elapsed = elapsed;
        self.cpu = cpu_start
            .zip(CpuSample::now())
            .and_then(|(start, end)| end.since(start));
        self.finish()
    }
}

/// Runs the loads in alternating slices (`--rounds` of each, `--seconds` in total per load),
/// so that a machine getting slower or faster during the run (other tenants, frequency) moves
/// every load alike and their ratio stays meaningful.
async fn alternate(loads: &[Load], options: &Options) -> Vec<Measured> {
    if options.warmup > 0 {
        for load in loads {
            load.run(options.connections, StdDuration::from_secs(options.warmup))
                .await;
        }
    }
    let slice = StdDuration::from_secs(options.seconds) / options.rounds;
    let mut totals: Vec<Measured> = loads.iter().map(|_| Measured::default()).collect();
    for _ in 0..options.rounds {
        for (load, total) in loads.iter().zip(totals.iter_mut()) {
            total.absorb(load.run(options.connections, slice).await);
        }
    }
    let totals: Vec<Measured> = totals.into_iter().map(Measured::finish).collect();
    for (load, measured) in loads.iter().zip(&totals) {
        eprintln!(
            "  {}: {:.0} req/s, p50 {} ms, p99 {} ms, max {} ms, CPU cores busy = bench + postgres + other: {}, {} errors{}",
            load.label,
            measured.per_second(),
            ms(measured.percentile(0.50)),
            ms(measured.percentile(0.99)),
            ms(measured.max()),
            cpu(measured),
            measured.errors,
            measured
                .first_error
                .as_deref()
                .map(|err| format!(" (first: {err})"))
                .unwrap_or_default(),
        );
    }
    totals
}

// ---------------------------------------------------------------------------------------------
// Refresh storm
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Storm {
    callers: usize,
    provider_latency: StdDuration,
    provider_refreshes: usize,
    distinct_tokens: usize,
    measured: Measured,
    /// From the release of the callers to the provider's receipt of the refresh request.
    provider_called_after: Option<StdDuration>,
    /// From the release of the callers to the first answer.
    first_answer_after: StdDuration,
    /// The same crowd on `/healthz` right after: what answering 1,000 callers at once costs
    /// here without any refresh (connections, HTTP, the load generator's own share).
    floor: Measured,
}

impl Storm {
    fn over_provider_latency(&self) -> i64 {
        i64::try_from(self.measured.max()).unwrap_or(i64::MAX)
            - i64::try_from(nanos(self.provider_latency)).unwrap_or(0)
    }

    /// The last caller's latency beyond the provider's and beyond the `/healthz` crowd's last:
    /// what the refresh itself (waits, hand-outs, single flight) adds to the floor.
    fn over_floor(&self) -> i64 {
        self.over_provider_latency() - i64::try_from(self.floor.max()).unwrap_or(i64::MAX)
    }

    fn met(&self) -> bool {
        self.provider_refreshes == 1
            && self.measured.errors == 0
            && self.over_provider_latency() <= 50_000_000
    }
}

/// The `access_token` of a hand-out's JSON body.
fn access_token(body: &[u8]) -> Result<String, String> {
    let value: Value = serde_json::from_slice(body).map_err(|err| err.to_string())?;
    Ok(value["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// Turns a profiler on or off around the storm: `BENCH_PERF_CTL` names the control FIFO of
/// `perf record --control fifo:PATH --delay=-1` (profile the storm alone, not its set-up).
fn profiler(command: &str) {
    if let Some(path) = std::env::var_os("BENCH_PERF_CTL") {
        if let Err(err) = std::fs::write(&path, format!("{command}\n")) {
            eprintln!("  warning: {command} the profiler: {err}");
        }
    }
}

/// Connects one Google account through the service's HTTP API against the fake (authorize,
/// consent at the fake, callback), so the stored refresh token is one the fake accepts.
async fn connect_through_the_fake(
    service: &Api,
    fake: &FakeProvider,
    client: &reqwest::Client,
    user: &str,
    subject: &str,
) -> anyhow::Result<Uuid> {
    Ok(fleet::timed_flow(service, fake, client, user, subject)
        .await?
        .id)
}

/// Rewrites the stored token set as issued an hour ago and expired a minute ago (same refresh
/// token), through the storage and vault APIs.
async fn expire(service: &Service, id: Uuid) -> anyhow::Result<()> {
    let db = service.db();
    let vault = &service.state.services.vault;
    let integration = db
        .get_integration(id)
        .await?
        .ok_or_else(|| anyhow!("integration {id} not stored"))?;
    let sealed = db
        .get_tokens(id)
        .await?
        .ok_or_else(|| anyhow!("no tokens for {id}"))?;
    let mut tokens = vault.open(&integration.user_id, &sealed)?;
    if tokens.refresh_token.is_none() {
        bail!("the connect flow stored no refresh token");
    }
    let now = SystemClock.now();
    tokens.expires_at = Some(now - Duration::minutes(1));
    let owner = TokenOwner {
        integration_id: id,
        user_id: &integration.user_id,
    };
    let resealed = vault.seal(owner, &tokens, now - Duration::minutes(61))?;
    db.upsert_tokens(&resealed).await?;
    Ok(())
}

/// A crowd of callers, each on a connection of its own, opened before they are released
/// together: the storm measures the service, not TCP set-up.
struct Crowd {
    /// `paths[0]`: what the crowd asks for when released; `paths[1]`: `/healthz`.
    target: Arc<load::Target>,
    connections: Vec<Option<load::Connection>>,
}

/// What a released crowd saw.
struct Released {
    measured: Measured,
    /// The first caller's request.
    released: Instant,
    /// From the first request to the first answer.
    first_answer_after: StdDuration,
    /// Each caller's body (or error).
    answers: Vec<Result<Bytes, String>>,
}

/// Opens `callers` connections to `work`'s server, each used once for `/healthz`.
async fn open_crowd(service: &Service, work: Url, callers: usize) -> anyhow::Result<Crowd> {
    let healthz = Url::parse(&service.url("/healthz"))?;
    let target = Arc::new(load::Target::of(&[work, healthz]).map_err(|err| anyhow!(err))?);
    let mut warm = JoinSet::new();
    let gate = Arc::new(Barrier::new(callers));
    for _ in 0..callers {
        let (target, gate) = (target.clone(), gate.clone());
        warm.spawn(async move {
            let mut connection = Some(load::Connection::open(target.address).await?);
            gate.wait().await;
            let (status, body) =
                request_on(&mut connection, &target, &target.paths[1], None).await?;
            check(Expect::Healthz, status, &body)?;
            // Beyond the service's connection limit a caller's connection closes after the
            // warm-up: it connects again when released, as a real client would.
            Ok::<_, String>(connection)
        });
    }
    let mut connections = Vec::with_capacity(callers);
    while let Some(done) = warm.join_next().await {
        match done? {
            Ok(connection) => connections.push(connection),
            Err(err) => eprintln!("  warning: crowd warm-up request failed: {err}"),
        }
    }
    Ok(Crowd {
        target,
        connections,
    })
}

/// Releases the crowd at once, each caller sending `GET paths[0]` once and timing its own call.
async fn release(
    crowd: Crowd,
    auth: Option<HeaderValue>,
    expect: Expect,
) -> anyhow::Result<Released> {
    let Crowd {
        target,
        connections,
    } = crowd;
    let callers = connections.len();
    let gate = Arc::new(Barrier::new(callers + 1));
    let mut tasks = JoinSet::new();
    for mut connection in connections {
        let (target, auth, gate) = (target.clone(), auth.clone(), gate.clone());
        tasks.spawn(async move {
            gate.wait().await;
            let began = Instant::now();
            let result = request_on(&mut connection, &target, &target.paths[0], auth.as_ref())
                .await
                .and_then(|(status, body)| {
                    check(expect, status, &body)?;
                    Ok(body)
                });
            let latency = began.elapsed();
            let answered = Instant::now();
            // The body is read and the connection closed after the storm: parsing 1,000
            // bodies, 999 closes and the service's teardown of their connections would
            // otherwise compete with the answers still due (a real caller has its own CPU).
            (began, latency, answered, result, connection)
        });
    }
    let cpu_start = CpuSample::now();
    gate.wait().await;
    // The storm begins with its first request (this task may be woken after some callers).
    let mut released = Instant::now();
    let mut measured = Measured::default();
    let mut first_answer = None::<Instant>;
    let mut answers = Vec::with_capacity(callers);
    let mut open = Vec::with_capacity(callers);
    while let Some(done) = tasks.join_next().await {
        let (began, latency, answered, result, connection) = done?;
        released = released.min(began);
        first_answer = Some(first_answer.map_or(answered, |first| first.min(answered)));
        measured.latencies.push(nanos(latency));
        answers.push(result);
        open.push(connection);
    }
    let wall = released.elapsed();
    drop(open);
    Ok(Released {
        measured: measured.close(cpu_start, wall),
        released,
        first_answer_after: first_answer.map_or(StdDuration::ZERO, |first| first - released),
        answers,
    })
}

/// The floor under the storm: the same crowd, opened and released the same way, on the
/// service's cheapest route (`/healthz`: no authentication, no database, no refresh).
async fn healthz_crowd(service: &Service, callers: usize) -> anyhow::Result<Measured> {
    let healthz = Url::parse(&service.url("/healthz"))?;
    let crowd = open_crowd(service, healthz, callers).await?;
    let mut released = release(crowd, None, Expect::Healthz).await?;
    for answer in &released.answers {
        if let Err(err) = answer {
            released.measured.errors += 1;
            released.measured.first_error.get_or_insert(err.clone());
        }
    }
    Ok(released.measured)
}

async fn refresh_storm(
    service: &Service,
    fake: &FakeProvider,
    client: &reqwest::Client,
    options: &Options,
    round: usize,
) -> anyhow::Result<Storm> {
    let subject = format!("storm-subject-{round}");
    let id = connect_through_the_fake(&service.api, fake, client, "storm-user", &subject).await?;
    expire(service, id).await?;
    let callers = options.storm;
    let url = Url::parse(&service.url(&format!("/api/v1/oauth/integrations/{id}/token")))?;
    let crowd = open_crowd(service, url, callers).await?;
    let before = fake.count_grant(PROVIDER, "refresh_token");
    fake.push_fault(
        PROVIDER,
        Endpoint::Token,
        Fault::Latency(options.provider_latency),
    );
    let auth = HeaderValue::from_str(&format!(
        "Bearer {}",
        service.jwt("bench-backend", &["service"])?
    ))?;
    profiler("enable");
    let storm = release(crowd, Some(auth), Expect::Token).await;
    profiler("disable");
    let Released {
        mut measured,
        released,
        first_answer_after,
        answers,
    } = storm?;
    let mut tokens = HashSet::new();
    for result in answers {
        match result.and_then(|body| access_token(&body)) {
            Ok(token) => {
                tokens.insert(token);
            }
            Err(err) => {
                measured.errors += 1;
                measured.first_error.get_or_insert(err);
            }
        }
    }
    let provider_called_after = fake
        .requests_to(PROVIDER, Endpoint::Token)
        .iter()
        .filter(|request| request.at >= released)
        .map(|request| request.at - released)
        .min();
    let floor = healthz_crowd(service, callers).await?;
    let storm = Storm {
        provider_called_after,
        first_answer_after,
        callers,
        provider_latency: options.provider_latency,
        provider_refreshes: fake.count_grant(PROVIDER, "refresh_token") - before,
        distinct_tokens: tokens.len(),
        measured,
        floor,
    };
    eprintln!(
        "  refresh storm: {} provider refresh(es), {} distinct token(s), {} errors{}, p50 {} ms, p99 {} ms, max {} ms; provider called after {} ms, first answer after {} ms, last after {} ms; {}; the same crowd on /healthz: p50 {} ms, max {} ms, {} errors",
        storm.provider_refreshes,
        storm.distinct_tokens,
        storm.measured.errors,
        storm
            .measured
            .first_error
            .as_deref()
            .map(|err| format!(" (first: {err})"))
            .unwrap_or_default(),
        ms(storm.measured.percentile(0.50)),
        ms(storm.measured.percentile(0.99)),
        ms(storm.measured.max()),
        storm
            .provider_called_after
            .map_or_else(|| "-".to_owned(), |after| ms(nanos(after))),
        ms(nanos(storm.first_answer_after)),
        ms(nanos(storm.measured.elapsed)),
        cpu(&storm.measured),
        ms(storm.floor.percentile(0.50)),
        ms(storm.floor.max()),
        storm.floor.errors,
    );
    Ok(storm)
}

// ---------------------------------------------------------------------------------------------
// One backend
// ---------------------------------------------------------------------------------------------

struct BackendResult {
    backend: &'static str,
    version: String,
    /// The service's `OAUTH_MAX_CONNECTIONS` in effect (its default depends on the backend).
    max_connections: usize,
    healthz: Measured,
    token: Measured,
    storm: Storm,
    flows: fleet::Flows,
    fleet: Option<fleet::Fleet>,
}

async fn run_backend(backend: &Backend, options: &Options) -> anyhow::Result<BackendResult> {
    eprintln!("== {} ==", backend.name());
    let database = Provisioned::create(backend).await?;
    let outcome = run_on(backend, database.url(), options).await;
    let destroyed = database.destroy().await;
    let result = outcome?;
    destroyed?;
    Ok(result)
}

async fn run_on(
    backend: &Backend,
    database_url: &str,
    options: &Options,
) -> anyhow::Result<BackendResult> {
    // Declared first, dropped last: the fake serves until everything that calls it is gone.
    let fake_runtime = OwnRuntime::start("fake-provider")?;
    let fake = Arc::new(fake_runtime.handle()?.spawn(FakeProvider::start()).await?);
    let service = start_service(database_url, &fake).await?;
    let version = server_version(service.db()).await;
    let max_connections = config_from(&service.vars)?.http_max_connections;
    let started = Instant::now();
    let ids = seed(&service, options.integrations).await?;
    eprintln!(
        "  seeded {} integrations in {:.1} s ({} {version})",
        ids.len(),
        started.elapsed().as_secs_f64(),
        backend.name()
    );
    let client = http_client()?;
    let token_urls = ids
        .iter()
        .map(|id| Url::parse(&service.url(&format!("/api/v1/oauth/integrations/{id}/token"))))
        .collect::<Result<Vec<_>, _>>()?;
    let auth = HeaderValue::from_str(&format!(
        "Bearer {}",
        service.jwt("bench-backend", &["service"])?
    ))?;
    let loads = [
        Load {
            label: "GET /healthz",
            urls: Arc::new(vec![Url::parse(&service.url("/healthz"))?]),
            auth: None,
            expect: Expect::Healthz,
        },
        Load {
            label: "GET …/token",
            urls: Arc::new(token_urls),
            auth: Some(auth),
            expect: Expect::Token,
        },
    ];
    let mut measured = alternate(&loads, options).await.into_iter();
    let healthz = measured.next().unwrap_or_default();
    let token = measured.next().unwrap_or_default();
    let mut storm = refresh_storm(&service, &fake, &client, options, 0).await?;
    for round in 1..options.storm_rounds {
        let next = refresh_storm(&service, &fake, &client, options, round).await?;
        if next.over_provider_latency() > storm.over_provider_latency() {
            storm = next;
        }
    }
    let flows = fleet::connect_flows(&service.api, &fake, &client, options.flows).await?;
    drop(client);
    let fleet = if options.fleet > 0 {
        Some(fleet::fleet(service, &fake, &ids, options).await?)
    } else {
        service.stop().await?;
        None
    };
    Ok(BackendResult {
        backend: backend.name(),
        version,
        max_connections,
        healthz,
        token,
        storm,
        flows,
        fleet,
    })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn ms(nanos: u64) -> String {
    format!("{:.2}", nanos as f64 / 1e6)
}

fn signed_ms(nanos: i64) -> String {
    format!("{:+.2}", nanos as f64 / 1e6)
}

fn cpu(measured: &Measured) -> String {
    measured.cpu.map_or_else(
        || "n/a".to_owned(),
        |cpu| {
            let other = (cpu.busy - cpu.bench - cpu.postgres).max(0.0);
            format!(
                "{:.2} = {:.2} + {:.2} + {:.2}",
                cpu.busy, cpu.bench, cpu.postgres, other
            )
        },
    )
}

/// `git describe --always --dirty` of the crate's checkout, when it is one.
/// `BENCH_SOURCE_REVISION` overrides it (for a `git archive` snapshot).
fn source_revision() -> String {
    if let Some(revision) = std::env::var("BENCH_SOURCE_REVISION")
        .ok()
        .filter(|revision| !revision.is_empty())
    {
        return revision;
    }
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|revision| revision.trim().to_owned())
        .filter(|revision| !revision.is_empty())
        .unwrap_or_else(|| "unknown (not a git checkout)".to_owned())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn fleet_cell(result: &BackendResult, cell: impl Fn(&fleet::Fleet) -> String) -> String {
    result
        .fleet
        .as_ref()
        .map_or_else(|| "skipped".to_owned(), cell)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

fn report(options: &Options, results: &[BackendResult]) -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let profile = if cfg!(debug_assertions) {
        "debug (not meaningful: use --release)"
    } else {
        "release"
    };
    let mut out = String::new();
    let _ = writeln!(out, "### oauth-manager benchmark\n");
    let _ = writeln!(
        out,
        "- Machine: {cores} cores (nproc), {}; service, load generator, fake provider and \
         PostgreSQL share them",
        cpu_model()
    );
    let _ = writeln!(out, "- Date: {}", Utc::now().format("%Y-%m-%d %H:%M UTC"));
    let _ = writeln!(
        out,
        "- Build: {profile}; oauth-manager {} at {}",
        env!("CARGO_PKG_VERSION"),
        source_revision()
    );
    let _ = writeln!(
        out,
        "- Load: {} keep-alive HTTP/1.1 connections; `/healthz` and `…/token` {} s each, \
         alternating in {} slices, after {} s warm-up each; {} seeded integrations; storm: {} \
         concurrent callers, provider latency {} ms\n",
        options.connections,
        options.seconds,
        options.rounds,
        options.warmup,
        options.integrations,
        options.storm,
        options.provider_latency.as_millis()
    );
    let mut header = String::from("| Metric |");
    let mut rule = String::from("|---|");
    for result in results {
        let _ = write!(header, " {} {} |", result.backend, result.version);
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    let mut row = |name: &str, cell: &dyn Fn(&BackendResult) -> String| {
        let mut line = format!("| {name} |");
        for result in results {
            let _ = write!(line, " {} |", cell(result));
        }
        let _ = writeln!(out, "{line}");
    };
    let latencies = |m: &Measured| {
        format!(
            "{} / {} / {}",
            ms(m.percentile(0.50)),
            ms(m.percentile(0.99)),
            ms(m.max())
        )
    };
    row("client connection limit (`OAUTH_MAX_CONNECTIONS`)", &|r| {
        r.max_connections.to_string()
    });
    row("`/healthz` requests/s", &|r| {
        format!("{:.0}", r.healthz.per_second())
    });
    row("`/healthz` p50 / p99 / max (ms)", &|r| {
        latencies(&r.healthz)
    });
    row("`/healthz` requests / errors", &|r| {
        format!("{} / {}", r.healthz.requests(), r.healthz.errors)
    });
    row(
        "`/healthz` CPU cores: busy = bench + postgres + other",
        &|r| cpu(&r.healthz),
    );
    row("`…/token` requests/s", &|r| {
        format!("{:.0}", r.token.per_second())
    });
    row("`…/token` p50 / p99 / max (ms)", &|r| latencies(&r.token));
    row("`…/token` requests / errors", &|r| {
        format!("{} / {}", r.token.requests(), r.token.errors)
    });
    row(
        "`…/token` CPU cores: busy = bench + postgres + other",
        &|r| cpu(&r.token),
    );
    row("token / healthz throughput", &|r| {
        format!(
            "{:.1} %",
            100.0 * r.token.per_second() / r.healthz.per_second().max(1e-9)
        )
    });
    row("target: ratio ≥ 50 %", &|r| {
        verdict(r.token.per_second() >= 0.5 * r.healthz.per_second()).to_owned()
    });
    row("target: token p99 < 10 ms", &|r| {
        verdict(r.token.percentile(0.99) < 10_000_000).to_owned()
    });
    row("storm: provider refreshes", &|r| {
        r.storm.provider_refreshes.to_string()
    });
    row("storm: distinct tokens handed out", &|r| {
        r.storm.distinct_tokens.to_string()
    });
    row("storm: callers / errors", &|r| {
        format!("{} / {}", r.storm.callers, r.storm.measured.errors)
    });
    row("storm: caller p50 / p99 / max (ms)", &|r| {
        latencies(&r.storm.measured)
    });
    row("storm: last answer after (ms)", &|r| {
        ms(nanos(r.storm.measured.elapsed))
    });
    row("storm: CPU cores: busy = bench + postgres + other", &|r| {
        cpu(&r.storm.measured)
    });
    row("storm: max − provider latency (ms)", &|r| {
        signed_ms(r.storm.over_provider_latency())
    });
    row(
        "storm's crowd on /healthz: p50 / p99 / max (ms), errors",
        &|r| format!("{}, {}", latencies(&r.storm.floor), r.storm.floor.errors),
    );
    row(
        "storm: max − provider latency − /healthz crowd max (ms)",
        &|r| signed_ms(r.storm.over_floor()),
    );
    row("target: 1 refresh, all within provider + 50 ms", &|r| {
        verdict(r.storm.met()).to_owned()
    });
    row("authorize p50 / p99 / max (ms), one at a time", &|r| {
        latencies(&r.flows.authorize)
    });
    row("target: authorize p99 < 5 ms", &|r| {
        verdict(r.flows.authorize.percentile(0.99) < 5_000_000).to_owned()
    });
    row("callback minus provider time p50 / p99 / max (ms)", &|r| {
        latencies(&r.flows.callback_overhead)
    });
    row("target: callback overhead p99 < 10 ms", &|r| {
        verdict(r.flows.callback_overhead.percentile(0.99) < 10_000_000).to_owned()
    });
    row("connect burst: flows / errors / all done (ms)", &|r| {
        format!(
            "{} / {} / {}",
            r.flows.burst_size,
            r.flows.burst.errors,
            ms(nanos(r.flows.burst.elapsed))
        )
    });
    row("target: 1,000 concurrent flows, zero errors", &|r| {
        verdict(r.flows.burst_size >= 1000 && r.flows.burst.errors == 0).to_owned()
    });
    row("fleet: integrations / refresh concurrency", &|r| {
        fleet_cell(r, |f| format!("{} / {}", f.integrations, f.concurrency))
    });
    row("fleet: provider refreshes / refreshed once / twice", &|r| {
        fleet_cell(r, |f| {
            format!(
                "{} / {} / {}",
                f.refreshes, f.refreshed_once, f.refreshed_twice
            )
        })
    });
    row("fleet: refreshes/s (wall s)", &|r| {
        fleet_cell(r, |f| {
            format!(
                "{:.0} ({:.1})",
                f.per_second(),
                f.refresh_wall.as_secs_f64()
            )
        })
    });
    row("fleet: last refresh before the first expiry (s)", &|r| {
        fleet_cell(r, |f| f.margin_before_expiry.num_seconds().to_string())
    });
    row("target: all before expiry, ≥ 1,000/s, none twice", &|r| {
        fleet_cell(r, |f| verdict(f.met_refresh()).to_owned())
    });
    row("fleet: hand-outs meanwhile req/s, p99 (ms), errors", &|r| {
        fleet_cell(r, |f| {
            format!(
                "{:.0}, {}, {}",
                f.hand_outs.per_second(),
                ms(f.hand_outs.percentile(0.99)),
                f.hand_outs.errors
            )
        })
    });
    row("fleet: connect flows meanwhile / errors", &|r| {
        fleet_cell(r, |f| {
            format!("{} / {}", f.flows.requests(), f.flows.errors)
        })
    });
    row(
        "fleet: `serve` peak RSS (VmHWM) / by the end of the burst / max sampled after it (MiB)",
        &|r| {
            fleet_cell(r, |f| {
                format!(
                    "{:.1} / {:.1} / {:.1}",
                    f.peak_rss_kib as f64 / 1024.0,
                    f.burst_peak_rss_kib as f64 / 1024.0,
                    f.max_sampled_rss_kib as f64 / 1024.0
                )
            })
        },
    );
    row("target: RSS < 64 MB with the fleet stored", &|r| {
        fleet_cell(r, |f| {
            verdict(f.peak_rss_kib * 1024 < 64_000_000).to_owned()
        })
    });
    let errors: Vec<String> = results
        .iter()
        .flat_map(|r| {
            [
                ("/healthz", &r.healthz),
                ("…/token", &r.token),
                ("storm", &r.storm.measured),
            ]
            .into_iter()
            .filter_map(move |(phase, m)| {
                m.first_error
                    .as_ref()
                    .map(|err| format!("- {} {phase}: first error: {err}", r.backend))
            })
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\n{}", errors.join("\n"));
    }
    out
}

// ---------------------------------------------------------------------------------------------

fn init_logging() {
    // Quiet: warnings and errors only (`OAUTH_LOG` overrides), no per-request access log.
    let filter = std::env::var("OAUTH_LOG")
        .ok()
        .and_then(|directives| tracing_subscriber::EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let options = parse_args()?;
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; run with --release for meaningful numbers");
    }
    let mut results = Vec::new();
    for backend in &options.backends {
        results.push(run_backend(backend, &options).await?);
    }
    println!("{}", report(&options, &results));
    Ok(())
}
