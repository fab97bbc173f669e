//! Phases beyond the hand-out: complete connect flows (latency of authorize and of the
//! callback's own work, then a burst of concurrent flows), and a real `oauth-manager serve`
//! process refreshing a large fleet in the background while it serves hand-outs and connect
//! flows, with its resident memory sampled throughout.

use std::process::{Child, Command, Stdio};

use super::*;

/// Sequential flows timed for latency (one at a time: the service's own time, no queueing).
const LATENCY_SAMPLES: usize = 200;

#[derive(Debug, Default)]
pub struct Flows {
    /// `POST …/authorize`, one at a time.
    pub authorize: Measured,
    /// `GET …/callback` minus the time the fake provider spent answering it, one at a time.
    pub callback_overhead: Measured,
    /// The burst: concurrent complete flows (authorize → consent at the fake → callback).
    pub burst: Measured,
    pub burst_size: usize,
}

/// A completed connect flow and how long the service took for it.
pub struct TimedFlow {
    pub id: Uuid,
    pub authorize: StdDuration,
    /// The callback's time minus the time the fake provider spent answering it.
    pub callback_overhead: StdDuration,
}

/// One complete flow: authorize as `user`, consent at the fake as `subject`, callback.
pub async fn timed_flow(
    api: &Api,
    fake: &FakeProvider,
    client: &reqwest::Client,
    user: &str,
    subject: &str,
) -> anyhow::Result<TimedFlow> {
    fake.push_consent(PROVIDER, Consent::user(subject));
    let began = Instant::now();
    let response = client
        .post(api.url(&format!("/api/v1/oauth/providers/{PROVIDER}/authorize")))
        .bearer_auth(api.jwt(user, &["user"])?)
        .json(&json!({}))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    let authorize = began.elapsed();
    if status != StatusCode::OK {
        bail!("authorize answered {status}: {body}");
    }
    let authorization_url = body["authorization_url"]
        .as_str()
        .ok_or_else(|| anyhow!("no authorization_url in {body}"))?;
    let location = fake.authorize(authorization_url).await;
    let callback = location
        .strip_prefix(PUBLIC_URL)
        .ok_or_else(|| anyhow!("the fake redirected to {location}"))?;
    let provider_before = fake.handling_time();
    let began = Instant::now();
    let response = client
        .get(api.url(callback))
        .header("accept", "application/json")
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    let callback_time = began.elapsed();
    let id = body["integration_id"]
        .as_str()
        .ok_or_else(|| anyhow!("callback answered {status}: {body}"))?;
    let provider_time = fake.handling_time().saturating_sub(provider_before);
    Ok(TimedFlow {
        id: id.parse()?,
        authorize,
        callback_overhead: callback_time.saturating_sub(provider_time),
    })
}

pub async fn connect_flows(
    api: &Api,
    fake: &Arc<FakeProvider>,
    client: &reqwest::Client,
    burst_size: usize,
) -> anyhow::Result<Flows> {
    let mut flows = Flows {
        burst_size,
        ..Flows::default()
    };
    for n in 0..LATENCY_SAMPLES {
        let user = format!("latency-{n}");
        let flow = timed_flow(api, fake, client, &user, &format!("{user}-account")).await?;
        flows.authorize.latencies.push(nanos(flow.authorize));
        flows
            .callback_overhead
            .latencies
            .push(nanos(flow.callback_overhead));
    }
    flows.authorize.latencies.sort_unstable();
    flows.callback_overhead.latencies.sort_unstable();
    flows.burst = burst(api, fake, client, burst_size).await?;
    eprintln!(
        "  connect flows: authorize p99 {} ms, callback overhead p99 {} ms; burst of {}: {} errors{}, p99 {} ms, all done in {} ms",
        ms(flows.authorize.percentile(0.99)),
        ms(flows.callback_overhead.percentile(0.99)),
        burst_size,
        flows.burst.errors,
        flows
            .burst
            .first_error
            .as_deref()
            .map(|err| format!(" (first: {err})"))
            .unwrap_or_default(),
        ms(flows.burst.percentile(0.99)),
        ms(nanos(flows.burst.elapsed)),
    );
    Ok(flows)
}

/// `size` complete flows released at once.
async fn burst(
    api: &Api,
    fake: &Arc<FakeProvider>,
    client: &reqwest::Client,
    size: usize,
) -> anyhow::Result<Measured> {
    let gate = Arc::new(Barrier::new(size + 1));
    let mut tasks = JoinSet::new();
    let burst_id = Uuid::new_v4().simple().to_string();
    for n in 0..size {
        let (api, fake, client, gate) = (api.clone(), fake.clone(), client.clone(), gate.clone());
        let user = format!("burst-{burst_id}-{n}");
        tasks.spawn(async move {
            gate.wait().await;
            let began = Instant::now();
            let subject = format!("{user}-account");
            let result = timed_flow(&api, &fake, &client, &user, &subject).await;
            (began.elapsed(), result.map(|_| ()))
        });
    }
    let cpu_start = CpuSample::now();
    gate.wait().await;
    let released = Instant::now();
    let mut measured = Measured::default();
    while let Some(done) = tasks.join_next().await {
        let (latency, result) = done?;
        measured.latencies.push(nanos(latency));
        if let Err(err) = result {
            measured.errors += 1;
            measured.first_error.get_or_insert(format!("{err:#}"));
        }
    }
    Ok(measured.close(cpu_start, released.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// The fleet: background refresh and memory of a real `serve` process
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct Fleet {
    pub integrations: usize,
    pub concurrency: usize,
    /// Refresh requests the fake received for the fleet.
    pub refreshes: usize,
    /// Seeded integrations refreshed exactly once / more than once (from the stored
    /// generations).
    pub refreshed_once: i64,
    pub refreshed_twice: i64,
    /// From the child's start until the last seeded integration was refreshed.
    pub refresh_wall: StdDuration,
    /// How long before the earliest seeded expiry the last refresh landed (negative: late).
    pub margin_before_expiry: Duration,
    /// Hand-outs served by the child meanwhile.
    pub hand_outs: Measured,
    /// Connect flows completed against the child meanwhile.
    pub flows: Measured,
    /// Peak resident memory of the child (VmHWM): over the whole phase, and when the burst of
    /// connect flows had ended; the highest VmRSS sampled after the burst.
    pub peak_rss_kib: u64,
    pub burst_peak_rss_kib: u64,
    pub max_sampled_rss_kib: u64,
}

impl Fleet {
    pub fn per_second(&self) -> f64 {
        self.refreshes as f64 / self.refresh_wall.as_secs_f64().max(1e-9)
    }

    pub fn met_refresh(&self) -> bool {
        self.refreshed_once == i64::try_from(self.integrations).unwrap_or(i64::MAX)
            && self.refreshed_twice == 0
            && self.per_second() >= 1000.0
            && self.margin_before_expiry > Duration::zero()
    }
}

/// A `serve` child process, killed when dropped.
struct ServeProcess {
    child: Child,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_binary() -> anyhow::Result<std::path::PathBuf> {
    // target/release/examples/bench → target/release/oauth-manager
    let exe = std::env::current_exe()?;
    let binary = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|dir| dir.join("oauth-manager"))
        .ok_or_else(|| anyhow!("cannot locate the target directory from {}", exe.display()))?;
    if !binary.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release`)",
            binary.display()
        );
    }
    Ok(binary)
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn free_port() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}

async fn start_serve(service: &Service, concurrency: usize) -> anyhow::Result<(ServeProcess, Api)> {
    let port = free_port().await?;
    let mut command = Command::new(serve_binary()?);
    command
        .arg("serve")
        .env_clear()
        .envs(&service.vars)
        .env("OAUTH_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("OAUTH_BACKGROUND_REFRESH", "true")
        .env("OAUTH_REFRESH_INTERVAL_SECONDS", "1")
        .env("OAUTH_REFRESH_CONCURRENCY", concurrency.to_string())
        .env("RUST_LOG", "warn")
        .env("OAUTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // Allocator, pool and request-bound settings under test pass through (e.g. MALLOC_ARENA_MAX, or another
    // allocator by LD_PRELOAD and its MIMALLOC_/MALLOC_CONF settings).
    for (name, value) in std::env::vars() {
        let allocator = ["MALLOC_", "MIMALLOC_", "LD_PRELOAD"];
        let passed = allocator.iter().chain(super::PASSED_SETTINGS);
        if passed.into_iter().any(|prefix| name.starts_with(prefix)) {
            command.env(name, value);
        }
    }
    let child = ServeProcess {
        child: command.spawn()?,
    };
    let api = Api {
        address: format!("http://127.0.0.1:{port}"),
        jwt_secret: service.api.jwt_secret.clone(),
    };
    let client = http_client()?;
    let deadline = Instant::now() + StdDuration::from_secs(30);
    loop {
        let ready = client.get(api.url("/readyz")).send().await;
        if ready.is_ok_and(|response| response.status().is_success()) {
            return Ok((child, api));
        }
        if Instant::now() > deadline {
            bail!("the serve process did not become ready within 30 s");
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
}

/// Seeds `count` Google integrations whose stored tokens the fake honours, stored 55 minutes
/// ago and expiring in `expires_in`: all due for the background refresher at once.
async fn seed_fleet(
    service: &Service,
    fake: &Arc<FakeProvider>,
    count: usize,
    expires_in: Duration,
) -> anyhow::Result<chrono::DateTime<Utc>> {
    const WORKERS: usize = 8;
    let now = SystemClock.now();
    let expires_at = now + expires_in;
    let mut tasks = JoinSet::new();
    for worker in 0..WORKERS {
        let db = service.db().clone();
        let vault = service.state.services.vault.clone();
        let fake = fake.clone();
        tasks.spawn(async move {
            for n in (worker..count).step_by(WORKERS) {
                let user = format!("fleet-user-{}", n % 5000);
                // No `openid`: the fake would sign an ID token for every refresh, which is the
                // provider's CPU, not the service's (a refreshed ID token is not validated).
                let scopes = ["https://www.googleapis.com/auth/gmail.readonly"];
                let minted = fake.mint_grant(PROVIDER, &format!("fleet-{n}"), &scopes);
                let text = |name: &str| minted[name].as_str().map(str::to_owned);
                let integration = Integration {
                    id: Uuid::now_v7(),
                    user_id: user.clone(),
                    provider: PROVIDER.to_owned(),
                    provider_account_id: format!("fleet-{n}"),
                    account_email: None,
                    account_name: None,
                    account_metadata: json!({}),
                    status: IntegrationStatus::Active,
                    granted_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    requested_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    created_at: now,
                    updated_at: now,
                    last_refreshed_at: None,
                    last_error: None,
                    last_error_at: None,
                };
                db.insert_integration(&integration).await?;
                let tokens = TokenSet {
                    access_token: SecretString::from(
                        text("access_token").ok_or_else(|| anyhow!("no access token"))?,
                    ),
                    refresh_token: text("refresh_token").map(SecretString::from),
                    id_token: None,
                    token_type: "Bearer".to_owned(),
                    expires_at: Some(expires_at),
                    refresh_token_expires_at: None,
                };
                let owner = TokenOwner {
                    integration_id: integration.id,
                    user_id: &user,
                };
                let sealed = vault.seal(owner, &tokens, now - Duration::minutes(55))?;
                db.upsert_tokens(&sealed).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    // PostgreSQL's autovacuum analyses a table about a minute after a bulk load. Until then
    // the planner takes the 100,000 integrations just seeded for a few hundred, and each claim
    // of due refreshes visits every active integration instead of walking the tokens' expiry
    // index (seen in session 7: the claim on the CPU in half of all samples of active queries).
    // A deployment grows gradually and autovacuum keeps its statistics current; analyse now,
    // as after any bulk load. SQLite keeps no statistics unless asked (the claim's plan there
    // is fixed by its join order), so it is left as the service would find it.
    if let Database::Postgres(pool) = service.db() {
        sqlx::query("ANALYZE oauth_integrations, oauth_tokens")
            .execute(pool)
            .await?;
    }
    Ok(expires_at)
}

async fn generations(db: &Database) -> anyhow::Result<(i64, i64)> {
    const SQL: &str = "SELECT \
        COALESCE(SUM(CASE WHEN t.generation = 2 THEN 1 ELSE 0 END), 0), \
        COALESCE(SUM(CASE WHEN t.generation > 2 THEN 1 ELSE 0 END), 0) \
        FROM oauth_tokens t JOIN oauth_integrations i ON i.id = t.integration_id \
        WHERE i.provider_account_id LIKE 'fleet-%'";
    let row: (i64, i64) = match db {
        Database::Postgres(pool) => sqlx::query_as(SQL).fetch_one(pool).await?,
        Database::Sqlite(pool, _) => sqlx::query_as(SQL).fetch_one(pool).await?,
    };
    Ok(row)
}

/// Seeds the fleet, starts `serve` with the background refresher on (the in-process service,
/// which has it off, stays idle and is stopped at the end), and while it refreshes the fleet puts hand-outs (`connections` closed loops
/// over `hand_out_ids`) and connect flows on it; samples its memory every 100 ms.
pub async fn fleet(
    service: Service,
    fake: &Arc<FakeProvider>,
    hand_out_ids: &[Uuid],
    options: &Options,
) -> anyhow::Result<Fleet> {
    let count = options.fleet;
    let seeded = Instant::now();
    let expires_at = seed_fleet(&service, fake, count, Duration::minutes(5)).await?;
    eprintln!(
        "  fleet: seeded {count} integrations due for refresh in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    let db = service.db().clone();
    let vars_service = service;
    fake.set_latency(PROVIDER, Endpoint::Token, options.provider_latency);
    let before = fake.count_grant(PROVIDER, "refresh_token");
    let started = Instant::now();
    let (child, api) = start_serve(&vars_service, options.refresh_concurrency).await?;
    let pid = child.child.id();
    let client = http_client()?;
    let token_urls = Arc::new(
        hand_out_ids
            .iter()
            .map(|id| Url::parse(&api.url(&format!("/api/v1/oauth/integrations/{id}/token"))))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let auth = HeaderValue::from_str(&format!(
        "Bearer {}",
        api.jwt("bench-backend", &["service"])?
    ))?;

    let mut fleet = Fleet {
        integrations: count,
        concurrency: options.refresh_concurrency,
        ..Fleet::default()
    };
    let load_for = StdDuration::from_secs(options.seconds);
    let hand_outs = {
        let (urls, auth) = (token_urls.clone(), auth.clone());
        let connections = options.connections;
        tokio::spawn(async move {
            closed_loop(&urls, Some(auth), Expect::Token, connections, load_for).await
        })
    };
    let flows = burst(&api, fake, &client, options.flows).await?;
    fleet.burst_peak_rss_kib = rss_kib(pid, "VmHWM:").unwrap_or(0);
    let deadline = Instant::now() + StdDuration::from_secs(600);
    loop {
        if let Some(rss) = rss_kib(pid, "VmRSS:") {
            fleet.max_sampled_rss_kib = fleet.max_sampled_rss_kib.max(rss);
        }
        let done = fake.count_grant(PROVIDER, "refresh_token") - before;
        if done >= count || Instant::now() > deadline {
            fleet.refresh_wall = started.elapsed();
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    let finished_at = SystemClock.now();
    fleet.hand_outs = hand_outs.await?;
    fleet.flows = flows;
    // Let the last commits land before counting generations.
    tokio::time::sleep(StdDuration::from_millis(500)).await;
    fleet.peak_rss_kib = rss_kib(pid, "VmHWM:").unwrap_or(0);
    fleet.refreshes = fake.count_grant(PROVIDER, "refresh_token") - before;
    let (once, twice) = generations(&db).await?;
    fleet.refreshed_once = once;
    fleet.refreshed_twice = twice;
    fleet.margin_before_expiry = expires_at - finished_at;
    fake.clear_latency(PROVIDER, Endpoint::Token);
    drop(child);
    eprintln!(
        "  fleet: {} refreshes in {:.1} s = {:.0}/s; once {} / twice {}; {} s before expiry; hand-outs {:.0}/s (p99 {} ms, {} errors); flows {} errors; peak RSS {} MiB ({} MiB by the end of the burst, {} MiB after it)",
        fleet.refreshes,
        fleet.refresh_wall.as_secs_f64(),
        fleet.per_second(),
        fleet.refreshed_once,
        fleet.refreshed_twice,
        fleet.margin_before_expiry.num_seconds(),
        fleet.hand_outs.per_second(),
        ms(fleet.hand_outs.percentile(0.99)),
        fleet.hand_outs.errors,
        fleet.flows.errors,
        fleet.peak_rss_kib / 1024,
        fleet.burst_peak_rss_kib / 1024,
        fleet.max_sampled_rss_kib / 1024,
    );
    vars_service.stop().await?;
    Ok(fleet)
}
