//! Rate limits: per authenticated user, and per client IP for everything else.
//!
//! **Who is counted.** A request carrying a valid JWT counts against its user (`sub`); any other
//! request — no token, a bad one, the provider callback, an unknown path — against its client IP
//! (the peer, or the trusted proxy's `X-Forwarded-For` hop, exactly as the audit log sees it;
//! IPv6 clients by their /64, which one machine usually holds whole). Not both: the host
//! product's backend fetches tokens for all its users from one address, and an address-wide
//! limit would throttle the whole product, while a per-user limit throttles only the user who
//! floods. A bad token counts against the address, so sending garbage does not escape the limit.
//!
//! **Verified once.** The limiter needs the user before any handler runs, so it verifies the
//! bearer token itself and leaves the outcome in the request's extensions, where the
//! `Authenticated` extractor takes it instead of verifying again (`extract::verify_once`).
//!
//! **Classes.** `POST …/providers/{provider}/authorize` and `GET …/callback/{provider}` have a
//! tighter limit of their own: each starts or finishes a provider round trip and writes rows.
//! Everything else shares the general limit. `/healthz` and `/readyz` are never limited (probes
//! must not fail because of traffic), and `/metrics` has a listener of its own.
//!
//! **Algorithm.** GCRA, a token bucket kept as one timestamp per key: `limit` requests at once,
//! then one every `60 s / limit`. The same arithmetic runs in-process (`gcra`) and, with
//! `REDIS_URL`, as an atomic Lua script on Redis (on Redis's clock, so replicas' clocks don't
//! matter), which makes the limits shared across replicas.
//!
//! **Redis failing.** Every Redis call has a 100 ms deadline. A failure switches this process to
//! its in-process buckets (a warning, once per outage), and one request per second tries Redis
//! again; the service never fails or waits because of Redis. During an outage each replica
//! allows the full limit on its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use redis::aio::MultiplexedConnection;
use secrecy::{ExposeSecret, SecretString};

use super::error::ApiError;
use super::extract::{client_ip, verify_once};
use super::AppState;
use crate::config::ConfigError;

/// Limits are per minute.
const PERIOD_MICROS: u64 = 60_000_000;
/// Deadline of one Redis call: a limiter that waits on Redis would make Redis a hard dependency.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// Connecting includes the handshake (TLS for `rediss://`); only the one request that tries pays.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// How often a process whose Redis failed tries it again.
const REDIS_RETRY: Duration = Duration::from_secs(1);
/// Keys the in-process buckets hold at most (~100 bytes each).
const MAX_LOCAL_KEYS: usize = 100_000;
/// The in-process buckets drop idle keys at most this often when they are full.
const SWEEP_MICROS: u64 = 1_000_000;

/// The GCRA step of `gcra`, atomically on Redis, on Redis's clock. KEYS[1]: the bucket;
/// ARGV: interval and tolerance in microseconds. Returns 0 (allowed) or the wait in µs.
const GCRA_SCRIPT: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local next_tat = tat + interval
if next_tat - now > tolerance then
  return next_tat - now - tolerance
end
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000))
return 0
";

/// `OAUTH_RATE_LIMIT_*` (see the README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Requests per minute per user (or per IP without a valid JWT) on general routes.
    pub per_minute: u32,
    /// Requests per minute per user / IP on the connect routes (authorize, callback).
    pub connect_per_minute: u32,
    /// Prefix of the Redis keys, so several deployments can share one Redis.
    pub redis_prefix: String,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            per_minute: 600,
            connect_per_minute: 30,
            redis_prefix: "oauth-manager:ratelimit:".to_owned(),
        }
    }
}

/// Which limit a route falls under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    General,
    Connect,
}

impl RouteClass {
    /// The class of a request by its matched route template; `None`: not limited.
    fn of(method: &Method, route: Option<&str>) -> Option<Self> {
        match route {
            Some("/healthz" | "/readyz") => None,
            Some("/api/v1/oauth/providers/{provider}/authorize") if method == Method::POST => {
                Some(Self::Connect)
            }
            Some("/api/v1/oauth/callback/{provider}") => Some(Self::Connect),
            _ => Some(Self::General),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::General => "general",
            Self::Connect => "connect",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited { retry_after: Duration },
}

/// The limiter of one process: in-process buckets, and Redis when configured.
pub struct RateLimiter {
    settings: RateLimitSettings,
    local: LocalBuckets,
    shared: Option<SharedBuckets>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("settings", &self.settings)
            .field("redis", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter for `settings`, shared through Redis when `redis_url` is given. Nothing is
    /// connected yet: see [`Self::connect`].
    pub fn new(
        settings: &RateLimitSettings,
        redis_url: Option<&SecretString>,
    ) -> Result<Self, ConfigError> {
        let shared = redis_url
            .map(|url| {
                // The URL may carry a password: the error names the variable, never the value.
                let client = redis::Client::open(url.expose_secret())
                    .map_err(|_| ConfigError::invalid("REDIS_URL", "is not a usable Redis URL"))?;
                Ok::<_, ConfigError>(SharedBuckets::new(client, &settings.redis_prefix))
            })
            .transpose()?;
        Ok(Self {
            settings: settings.clone(),
            local: LocalBuckets::new(MAX_LOCAL_KEYS),
            shared,
        })
    }

    /// Connects to Redis ahead of the first request; a Redis that is down is logged and
    /// retried later, never an error.
    pub async fn connect(&self) {
        if let Some(shared) = &self.shared {
            let _ = shared.connection().await;
        }
    }

    /// Counts one request of `class` against `key` (`user:…` or `ip:…`).
    pub async fn check(&self, class: RouteClass, key: &str) -> Decision {
        let limit = match class {
            RouteClass::General => self.settings.per_minute,
            RouteClass::Connect => self.settings.connect_per_minute,
        };
        let key = format!("{}:{key}", class.as_str());
        if let Some(shared) = &self.shared {
            if let Some(decision) = shared.check(&key, limit).await {
                return decision;
            }
        }
        self.local.check(&key, limit)
    }

    /// Whether the limits are currently shared through Redis (false without Redis, or while
    /// it is failing).
    pub fn is_shared(&self) -> bool {
        self.shared.as_ref().is_some_and(SharedBuckets::is_up)
    }

    /// How many Redis outages this process has seen (each logged once).
    pub fn redis_outages(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |shared| shared.outages.load(Ordering::Relaxed))
    }
}

/// Middleware: answers 429 `rate_limited` with `Retry-After` once the caller's bucket is empty.
pub async fn limit_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(limiter) = state.limiter.clone() else {
        return next.run(request).await;
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let Some(class) = RouteClass::of(request.method(), route) else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    // Both steps are boxed: they end before the handler starts, and inline they would size
    // this future, which lives as long as the handler, by their own largest states (JWKS
    // fetches, Redis connections): 3 KiB instead of 1.
    let user = Box::pin(verify_once(
        &parts.headers,
        &mut parts.extensions,
        &state.verifier,
    ))
    .await
    .ok()
    .map(|principal| principal.user_id.clone());
    let (key, by) = match user {
        Some(user) => (format!("user:{user}"), "user"),
        None => {
            let ip = client_ip(
                &parts.headers,
                &parts.extensions,
                state.config.trust_proxy_headers,
            );
            // Without a peer address (a server not started with connect info) all such
            // requests share one bucket rather than escaping the limit.
            let ip = ip.map_or_else(|| "unknown".to_owned(), ip_key);
            (format!("ip:{ip}"), "ip")
        }
    };
    if let Decision::Limited { retry_after } = Box::pin(limiter.check(class, &key)).await {
        crate::metrics::rate_limited(class.as_str(), by);
        return ApiError::rate_limited(retry_after_seconds(retry_after)).into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

/// Whole seconds, rounded up: retrying after `Retry-After` must succeed.
fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The bucket of an address: IPv4 as is, IPv6 by its /64 (one host or site gets a whole /64,
/// so counting single IPv6 addresses would let one machine rotate through billions of keys).
fn ip_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// One step of GCRA (the generic cell rate algorithm): a token bucket kept as one timestamp,
/// the "theoretical arrival time" `tat` at which the bucket is full again. Each request moves
/// it `interval` (= period / limit) later; a request that would move it more than
/// `limit × interval` ahead of now is refused, and could pass once that excess has elapsed.
/// Times in microseconds. Returns the new `tat`, or how long to wait.
fn gcra(tat: Option<u64>, now: u64, limit: u32) -> Result<u64, u64> {
    let (interval, tolerance) = gcra_parameters(limit);
    let next = tat.unwrap_or(now).max(now) + interval;
    let ahead = next - now;
    if ahead > tolerance {
        Err(ahead - tolerance)
    } else {
        Ok(next)
    }
}

/// `(interval, tolerance)` in microseconds for `limit` requests per minute.
fn gcra_parameters(limit: u32) -> (u64, u64) {
    let limit = u64::from(limit.max(1));
    let interval = PERIOD_MICROS / limit;
    (interval, interval * limit)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// In-process buckets: key → `tat`, bounded. A key whose `tat` has passed is a full bucket,
/// the same as no entry, so idle keys are dropped whenever room is needed.
struct LocalBuckets {
    epoch: Instant,
    capacity: usize,
    state: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    tats: HashMap<String, u64>,
    swept_at: Option<u64>,
}

impl LocalBuckets {
    fn new(capacity: usize) -> Self {
        Self {
            epoch: Instant::now(),
            capacity,
            state: Mutex::default(),
        }
    }

    fn check(&self, key: &str, limit: u32) -> Decision {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.check_at(key, limit, now)
    }

    fn check_at(&self, key: &str, limit: u32, now: u64) -> Decision {
        let mut state = lock(&self.state);
        let tat = state.tats.get(key).copied();
        if tat.is_none() && !state.make_room(now, self.capacity) {
            // Memory stays bounded. More distinct active keys than this within a minute is a
            // distributed flood that per-key limits cannot stop anyway; refusing every new
            // caller would turn it into an outage for everyone, so the newcomer passes.
            return Decision::Allowed;
        }
        match gcra(tat, now, limit) {
            Ok(next) => {
                match state.tats.get_mut(key) {
                    Some(slot) => *slot = next,
                    None => {
                        state.tats.insert(key.to_owned(), next);
                    }
                }
                Decision::Allowed
            }
            Err(wait) => Decision::Limited {
                retry_after: Duration::from_micros(wait),
            },
        }
    }
}

impl LocalState {
    /// Room for one more key, dropping idle keys first (at most once per `SWEEP_MICROS`, so a
    /// flood of new keys cannot make every request scan the map).
    fn make_room(&mut self, now: u64, capacity: usize) -> bool {
        if self.tats.len() < capacity {
            return true;
        }
        let due = self
            .swept_at
            .is_none_or(|at| now.saturating_sub(at) >= SWEEP_MICROS);
        if due {
            self.tats.retain(|_, tat| *tat > now);
            self.swept_at = Some(now);
            if self.tats.len() >= capacity {
                tracing::warn!(
                    keys = self.tats.len(),
                    "the in-process rate limiter is full of active keys; new callers pass unlimited"
                );
            }
        }
        self.tats.len() < capacity
    }
}

/// Buckets on Redis, with the state of the connection.
struct SharedBuckets {
    client: redis::Client,
    prefix: String,
    script: redis::Script,
    connection: Mutex<Option<MultiplexedConnection>>,
    /// When the next attempt to connect may start (one request per `REDIS_RETRY` tries).
    retry_at: Mutex<Option<Instant>>,
    /// Redis failed and has not answered since: warned once, not per request.
    down: AtomicBool,
    outages: AtomicU64,
}

impl SharedBuckets {
    fn new(client: redis::Client, prefix: &str) -> Self {
        Self {
            client,
            prefix: prefix.to_owned(),
            script: redis::Script::new(GCRA_SCRIPT),
            connection: Mutex::new(None),
            retry_at: Mutex::new(None),
            down: AtomicBool::new(false),
            outages: AtomicU64::new(0),
        }
    }

    /// The decision, or `None` when Redis cannot give one in time.
    async fn check(&self, key: &str, limit: u32) -> Option<Decision> {
        let mut connection = self.connection().await?;
        let (interval, tolerance) = gcra_parameters(limit);
        let mut invocation = self.script.key(format!("{}{key}", self.prefix));
        invocation.arg(interval).arg(tolerance);
        let call = invocation.invoke_async::<u64>(&mut connection);
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(Ok(wait)) => {
                self.answered();
                Some(match wait {
                    0 => Decision::Allowed,
                    wait => Decision::Limited {
                        retry_after: Duration::from_micros(wait),
                    },
                })
            }
            Ok(Err(err)) => {
                self.failed(&err);
                None
            }
            Err(_) => {
                self.failed(&"no answer within 100 ms");
                None
            }
        }
    }

    /// The open connection, or a new one if it is time to try; `None` meanwhile.
    async fn connection(&self) -> Option<MultiplexedConnection> {
        if let Some(connection) = lock(&self.connection).clone() {
            return Some(connection);
        }
        {
            let mut retry_at = lock(&self.retry_at);
            let now = Instant::now();
            if retry_at.is_some_and(|at| at > now) {
                return None;
            }
            // This request tries; concurrent ones use the in-process buckets until it is done.
            *retry_at = Some(now + REDIS_RETRY);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(REDIS_CONNECT_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT);
        // Boxed: connecting is rare, and inline it would double the size of every check.
        let connect = Box::pin(
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        );
        match tokio::time::timeout(REDIS_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(connection)) => {
                *lock(&self.connection) = Some(connection.clone());
                Some(connection)
            }
            Ok(Err(err)) => {
                self.failed(&err);
                None
            }
            Err(_) => {
                self.failed(&"no connection within 250 ms");
                None
            }
        }
    }

    fn is_up(&self) -> bool {
        !self.down.load(Ordering::Relaxed) && lock(&self.connection).is_some()
    }

    fn answered(&self) {
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("Redis answers again: rate limits are shared across replicas again");
        }
    }

    fn failed(&self, error: &dyn std::fmt::Display) {
        *lock(&self.connection) = None;
        *lock(&self.retry_at) = Some(Instant::now() + REDIS_RETRY);
        if self.down.swap(true, Ordering::Relaxed) {
            tracing::debug!(error = %error, "Redis still unavailable for rate limits");
        } else {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %error,
                "Redis is unavailable: rate limits are enforced per process until it answers again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000;

    #[test]
    fn a_bucket_allows_its_limit_at_once_then_one_per_interval() {
        let buckets = LocalBuckets::new(16);
        for _ in 0..3 {
            assert_eq!(buckets.check_at("k", 3, 0), Decision::Allowed);
        }
        // 3 per minute: the next one is possible 20 s later.
        assert_eq!(
            buckets.check_at("k", 3, 0),
            Decision::Limited {
                retry_after: Duration::from_secs(20)
            }
        );
        assert_eq!(
            buckets.check_at("k", 3, 5 * SECOND),
            Decision::Limited {
                retry_after: Duration::from_secs(15)
            }
        );
        assert_eq!(buckets.check_at("k", 3, 20 * SECOND), Decision::Allowed);
        assert!(matches!(
            buckets.check_at("k", 3, 20 * SECOND),
            Decision::Limited { .. }
        ));
        // Other keys have buckets of their own.
        assert_eq!(buckets.check_at("other", 3, 20 * SECOND), Decision::Allowed);
    }

    #[test]
    fn a_refused_request_costs_nothing() {
        let buckets = LocalBuckets::new(16);
        assert_eq!(buckets.check_at("k", 1, 0), Decision::Allowed);
        for _ in 0..10 {
            assert!(matches!(
                buckets.check_at("k", 1, SECOND),
                Decision::Limited { .. }
            ));
        }
        assert_eq!(buckets.check_at("k", 1, 60 * SECOND), Decision::Allowed);
    }

    #[test]
    fn memory_is_bounded_and_idle_keys_make_room() {
        let buckets = LocalBuckets::new(2);
        assert_eq!(buckets.check_at("a", 1, 0), Decision::Allowed);
        assert_eq!(buckets.check_at("b", 1, 0), Decision::Allowed);
        // Full of active keys: a newcomer passes untracked, the tracked ones stay limited.
        assert_eq!(buckets.check_at("c", 1, 0), Decision::Allowed);
        assert_eq!(buckets.check_at("c", 1, 0), Decision::Allowed);
        assert!(matches!(
            buckets.check_at("a", 1, 0),
            Decision::Limited { .. }
        ));
        assert_eq!(lock(&buckets.state).tats.len(), 2);
        // A minute later both are idle and give way.
        assert_eq!(buckets.check_at("c", 1, 61 * SECOND), Decision::Allowed);
        assert!(matches!(
            buckets.check_at("c", 1, 61 * SECOND),
            Decision::Limited { .. }
        ));
        assert_eq!(lock(&buckets.state).tats.len(), 1);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(20)), 20);
        assert_eq!(retry_after_seconds(Duration::from_millis(20_001)), 21);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let key = |ip: &str| ip_key(ip.parse().expect("ip"));
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn connect_routes_have_their_own_class_and_probes_none() {
        let authorize = Some("/api/v1/oauth/providers/{provider}/authorize");
        let callback = Some("/api/v1/oauth/callback/{provider}");
        assert_eq!(
            RouteClass::of(&Method::POST, authorize),
            Some(RouteClass::Connect)
        );
        assert_eq!(
            RouteClass::of(&Method::GET, callback),
            Some(RouteClass::Connect)
        );
        assert_eq!(
            RouteClass::of(&Method::GET, Some("/api/v1/oauth/integrations")),
            Some(RouteClass::General)
        );
        assert_eq!(
            RouteClass::of(&Method::GET, None),
            Some(RouteClass::General)
        );
        assert_eq!(RouteClass::of(&Method::GET, Some("/healthz")), None);
        assert_eq!(RouteClass::of(&Method::GET, Some("/readyz")), None);
    }
}
