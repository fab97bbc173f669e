//! Configuration from the environment (12-factor), validated once at start-up.
//!
//! Every error names the variable at fault. Secrets can also be given as a `*_FILE` twin
//! (`OAUTH_ENCRYPTION_KEY_FILE=/run/secrets/key`), as container platforms expect; setting
//! both the variable and its twin is an error rather than a silent precedence rule.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::auth::rbac::RoleMap;
use crate::crypto::KeyMaterial;
use crate::http::limits::RateLimitSettings;
use crate::providers::declared::{self, DeclaredProvider};
use crate::services::tokens::LifecycleSettings;
use crate::services::worker::WorkerSettings;
use crate::storage::PoolSettings;
use chrono::Duration;

pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8000";
pub const DEFAULT_PUBLIC_URL: &str = "http://localhost:8000";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://oauth-manager.db?mode=rwc";
const DEFAULT_JWT_LEEWAY_SECONDS: u64 = 30;
const MAX_JWT_LEEWAY_SECONDS: u64 = 300;
/// RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
const MIN_JWT_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var} is required: {hint}")]
    Missing { var: String, hint: String },
    #[error("{var} is invalid: {reason}")]
    Invalid { var: String, reason: String },
    #[error("{var} and {var}_FILE are both set; set only one of them")]
    Ambiguous { var: String },
    #[error("{var}_FILE: cannot read {path}: {reason}")]
    File {
        var: String,
        path: String,
        reason: String,
    },
}

impl ConfigError {
    pub fn invalid(var: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            var: var.to_owned(),
            reason: reason.into(),
        }
    }

    pub fn missing(var: &str, hint: impl Into<String>) -> Self {
        Self::Missing {
            var: var.to_owned(),
            hint: hint.into(),
        }
    }
}

/// Read access to environment variables; a closure so tests can pass a map.
pub struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Env<'a> {
    pub fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { lookup }
    }

    /// A plain variable; empty counts as unset.
    pub fn var(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|value| !value.trim().is_empty())
    }

    /// A secret variable or its `_FILE` twin (file content, trailing newline removed).
    pub fn secret(&self, name: &str) -> Result<Option<SecretString>, ConfigError> {
        let file_var = format!("{name}_FILE");
        match (self.var(name), self.var(&file_var)) {
            (Some(_), Some(_)) => Err(ConfigError::Ambiguous {
                var: name.to_owned(),
            }),
            (Some(value), None) => Ok(Some(SecretString::from(value))),
            (None, Some(path)) => read_secret_file(name, &path).map(Some),
            (None, None) => Ok(None),
        }
    }
}

fn read_secret_file(var: &str, path: &str) -> Result<SecretString, ConfigError> {
    let content = std::fs::read_to_string(path).map_err(|err| ConfigError::File {
        var: var.to_owned(),
        path: path.to_owned(),
        reason: err.to_string(),
    })?;
    // An empty file is a mistake (a secret not mounted yet), not an unset variable: blank
    // plain variables count as unset, but naming a file says a value was meant.
    if content.trim().is_empty() {
        return Err(ConfigError::invalid(
            &format!("{var}_FILE"),
            format!("{path} is empty"),
        ));
    }
    Ok(SecretString::from(
        content.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Where the verification key for callers' JWTs comes from.
#[derive(Debug, Clone)]
pub enum JwtKeySource {
    /// HS256 shared secret (`OAUTH_JWT_SECRET`).
    Secret(SecretString),
    /// RS256 or ES256 public key in PEM (`OAUTH_JWT_PUBLIC_KEY`).
    PublicKeyPem(String),
    /// A JWKS document (`OAUTH_JWT_JWKS_URL`), cached and refetched on an unknown `kid`.
    JwksUrl(Url),
}

#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub key: Option<JwtKeySource>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Claim holding the caller's roles; a dotted path reaches nested claims
    /// (`realm_access.roles` for Keycloak).
    pub roles_claim: String,
    pub leeway_seconds: u64,
}

/// The active data-encryption key and older keys that stay readable until rotated away.
#[derive(Debug, Clone)]
pub struct EncryptionKeys {
    pub active: KeyMaterial,
    pub old: Vec<KeyMaterial>,
}

/// Client credentials of a built-in provider, read from `{PREFIX}_CLIENT_ID` / `_SECRET`.
#[derive(Debug, Clone, Default)]
pub struct ClientCredentials {
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub public_url: Url,
    pub database_url: SecretString,
    /// `OAUTH_DATABASE_MAX_CONNECTIONS`: the connection pool's size.
    pub database_pool: PoolSettings,
    pub encryption: Option<EncryptionKeys>,
    pub jwt: JwtSettings,
    pub role_permissions: RoleMap,
    pub providers_file: Option<PathBuf>,
    pub allowed_return_urls: Vec<Url>,
    pub redis_url: Option<SecretString>,
    pub log_format: LogFormat,
    /// Built-in providers' credentials by environment prefix (`GOOGLE`, `MICROSOFT`, ...).
    pub client_credentials: HashMap<String, ClientCredentials>,
    /// Other provider settings read from the environment (`MICROSOFT_TENANT`, ...).
    pub provider_settings: HashMap<String, String>,
    /// Providers declared (or built-ins overridden) in `OAUTH_PROVIDERS_FILE`.
    pub declared_providers: Vec<DeclaredProvider>,
    /// `OAUTH_TRUST_PROXY_HEADERS`: take the client IP from `X-Forwarded-For` (behind a proxy
    /// that sets it; never when clients can reach the service directly).
    pub trust_proxy_headers: bool,
    /// Refresh timing (`OAUTH_REFRESH_SKEW_SECONDS`, `OAUTH_REFRESH_LEASE_SECONDS`).
    pub lifecycle: LifecycleSettings,
    /// `OAUTH_BACKGROUND_REFRESH` (default true): run the worker inside `serve`.
    pub background_refresh: bool,
    /// Worker timing (`OAUTH_REFRESH_INTERVAL_SECONDS`, `OAUTH_REFRESH_WINDOW_SECONDS`,
    /// `OAUTH_REFRESH_CONCURRENCY`).
    pub worker: WorkerSettings,
    /// `OAUTH_AUDIT_RETENTION_DAYS` (1–36500): the worker prunes older audit rows, leaving a
    /// checkpoint in each chain. Unset: audit rows are kept forever.
    pub audit_retention_days: Option<u32>,
    /// `OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS` (default 1; 0 writes a row per hand-out): token
    /// hand-outs alike within this window are one audit row with a count.
    pub audit_hand_out_window: std::time::Duration,
    /// Rate limits (`OAUTH_RATE_LIMIT_*`); shared through Redis when `REDIS_URL` is set.
    pub rate_limits: RateLimitSettings,
    /// `OAUTH_CORS_ALLOWED_ORIGINS`: exact origins (`https://app.example.com`, as browsers send
    /// them in `Origin`) whose pages may call the API. Empty: no CORS headers at all.
    pub cors_allowed_origins: Vec<String>,
    /// `OAUTH_METRICS_ADDR`: where `GET /metrics` (Prometheus) is served, on a listener of its
    /// own so it never reaches the public API. Unset: no metrics are collected.
    pub metrics_addr: Option<SocketAddr>,
    /// `OAUTH_MAX_CONCURRENT_REQUESTS` (default 256): API requests handled at once, counted
    /// apart for sign-ins (authorize and callback) and for everything else; more wait (within
    /// the request timeout) for one to finish. Bounds the memory of a burst (each request in
    /// progress holds its buffers and, in a callback, a provider connection); `/healthz` and
    /// `/readyz` are not counted.
    pub max_concurrent_requests: usize,
    /// `OAUTH_HTTP_IDLE_TIMEOUT_SECONDS` (default 75): how long a client connection may go
    /// without a complete request head, i.e. the keep-alive idle timeout and the bound on a
    /// client that sends its headers slowly. Above the 60 s upstream keep-alive of Nginx and of
    /// common load balancers, so that the proxy, not this service, closes an idle connection
    /// first (a proxy reusing a connection this side just closed fails that request).
    pub http_idle_timeout: std::time::Duration,
    /// `OAUTH_HTTP_KEEPALIVE_CONNECTIONS` (default 256): a client connection opened while this
    /// many are open gets an idle timeout of 5 s (or `http_idle_timeout`, if shorter), so that
    /// a burst of clients does not leave its idle connections' buffers held for the full
    /// timeout.
    pub http_keepalive_connections: usize,
    /// `OAUTH_MAX_CONNECTIONS` (default 1,024 with PostgreSQL, 512 with SQLite): client
    /// connections open at once. The next one waits for a place while every open connection
    /// closes after its next response (`Connection: close`). See `parse_max_connections`.
    pub http_max_connections: usize,
}

/// Environment prefixes whose `_CLIENT_ID` / `_CLIENT_SECRET` are read at start-up.
pub const PROVIDER_ENV_PREFIXES: &[&str] = &["GOOGLE", "MICROSOFT", "NOTION", "YOUTUBE"];
/// Further provider variables read at start-up.
pub const PROVIDER_SETTING_VARS: &[&str] = &["MICROSOFT_TENANT", "NOTION_VERSION"];

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let lookup = |name: &str| std::env::var(name).ok();
        Self::from_lookup(&Env::new(&lookup))
    }

    pub fn from_lookup(env: &Env<'_>) -> Result<Self, ConfigError> {
        let providers_file = env.var("OAUTH_PROVIDERS_FILE").map(PathBuf::from);
        let declared_providers = match &providers_file {
            Some(path) => declared::load(path, env)?,
            None => Vec::new(),
        };
        let database_url = parse_database_url(env)?;
        Ok(Self {
            listen_addr: parse_listen_addr(env)?,
            public_url: parse_public_url(env)?,
            database_pool: parse_pool(env, &database_url)?,
            http_max_connections: parse_max_connections(env, &database_url)?,
            database_url,
            encryption: parse_encryption_keys(env)?,
            jwt: parse_jwt(env)?,
            role_permissions: parse_role_map(env)?,
            providers_file,
            declared_providers,
            trust_proxy_headers: parse_bool(env, "OAUTH_TRUST_PROXY_HEADERS")?,
            lifecycle: parse_lifecycle(env)?,
            background_refresh: env.var("OAUTH_BACKGROUND_REFRESH").is_none()
                || parse_bool(env, "OAUTH_BACKGROUND_REFRESH")?,
            worker: parse_worker(env)?,
            audit_retention_days: parse_audit_retention(env)?,
            audit_hand_out_window: std::time::Duration::from_secs(
                parse_number(env, "OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS", 1, 0..=60)?.unsigned_abs(),
            ),
            rate_limits: parse_rate_limits(env)?,
            cors_allowed_origins: parse_cors_origins(env)?,
            metrics_addr: parse_metrics_addr(env)?,
            max_concurrent_requests: parse_count(
                env,
                "OAUTH_MAX_CONCURRENT_REQUESTS",
                256,
                1..=100_000,
            )?,
            http_idle_timeout: std::time::Duration::from_secs(
                parse_number(env, "OAUTH_HTTP_IDLE_TIMEOUT_SECONDS", 75, 1..=3600)?.unsigned_abs(),
            ),
            http_keepalive_connections: parse_count(
                env,
                "OAUTH_HTTP_KEEPALIVE_CONNECTIONS",
                256,
                1..=1_000_000,
            )?,
            allowed_return_urls: parse_return_urls(env)?,
            redis_url: parse_redis_url(env)?,
            log_format: parse_log_format(env)?,
            client_credentials: parse_client_credentials(env)?,
            provider_settings: PROVIDER_SETTING_VARS
                .iter()
                .filter_map(|name| env.var(name).map(|value| ((*name).to_owned(), value)))
                .collect(),
        })
    }

    /// The keys, or the error `serve` and `keys rotate` report when none is configured.
    pub fn encryption_keys(&self) -> Result<&EncryptionKeys, ConfigError> {
        self.encryption.as_ref().ok_or_else(|| {
            ConfigError::missing(
                "OAUTH_ENCRYPTION_KEY",
                "base64 of 32 random bytes (generate one with `oauth-manager keys generate`)",
            )
        })
    }

    /// Checks what `serve` needs beyond what every command needs.
    pub fn validate_for_serve(&self) -> Result<(), ConfigError> {
        self.encryption_keys()?;
        if self.jwt.key.is_none() {
            return Err(ConfigError::missing(
                "OAUTH_JWT_SECRET",
                "set one of OAUTH_JWT_SECRET (HS256), OAUTH_JWT_PUBLIC_KEY (RS256/ES256 PEM) \
                 or OAUTH_JWT_JWKS_URL so callers' JWTs can be verified",
            ));
        }
        Ok(())
    }

    pub fn is_postgres(&self) -> bool {
        is_postgres_url(self.database_url.expose_secret())
    }
}

pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn parse_listen_addr(env: &Env<'_>) -> Result<SocketAddr, ConfigError> {
    let raw = env
        .var("OAUTH_LISTEN_ADDR")
        .unwrap_or_else(|| DEFAULT_LISTEN_ADDR.to_owned());
    raw.parse().map_err(|_| {
        ConfigError::invalid(
            "OAUTH_LISTEN_ADDR",
            format!("{raw:?} is not an address:port such as 0.0.0.0:8000"),
        )
    })
}

fn parse_metrics_addr(env: &Env<'_>) -> Result<Option<SocketAddr>, ConfigError> {
    const VAR: &str = "OAUTH_METRICS_ADDR";
    env.var(VAR)
        .map(|raw| {
            raw.trim().parse().map_err(|_| {
                ConfigError::invalid(
                    VAR,
                    format!("{raw:?} is not an address:port such as 127.0.0.1:9100"),
                )
            })
        })
        .transpose()
}

fn parse_public_url(env: &Env<'_>) -> Result<Url, ConfigError> {
    const VAR: &str = "OAUTH_PUBLIC_URL";
    let raw = env
        .var(VAR)
        .unwrap_or_else(|| DEFAULT_PUBLIC_URL.to_owned());
    let url = Url::parse(raw.trim_end_matches('/'))
        .map_err(|err| ConfigError::invalid(VAR, format!("{raw:?} is not a URL: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ConfigError::invalid(
            VAR,
            "must be an http(s) URL with a host",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::invalid(
            VAR,
            "must not carry a query or fragment",
        ));
    }
    Ok(url)
}

/// `OAUTH_DATABASE_MAX_CONNECTIONS`; the default depends on the backend (see [`PoolSettings`]).
fn parse_pool(env: &Env<'_>, database_url: &SecretString) -> Result<PoolSettings, ConfigError> {
    let default = PoolSettings::default_for(database_url.expose_secret());
    let max = parse_number(
        env,
        "OAUTH_DATABASE_MAX_CONNECTIONS",
        i64::from(default.max_connections),
        1..=1000,
    )?;
    Ok(PoolSettings {
        max_connections: u32::try_from(max).unwrap_or(default.max_connections),
    })
}

/// `OAUTH_MAX_CONNECTIONS`: 1,024 with PostgreSQL, so that a crowd of 1,000 callers with a
/// connection each is read while the first of them waits (for a refresh, say) instead of half
/// of it connecting again after the answers; 512 with SQLite, whose page caches and connection
/// threads share the process's memory: a burst of 1,000 sign-ins on 1,024 connections took
/// its peak over 64 MB there, while PostgreSQL stayed under (BENCHMARKS.md, session 18).
fn parse_max_connections(env: &Env<'_>, database_url: &SecretString) -> Result<usize, ConfigError> {
    let default = if is_postgres_url(database_url.expose_secret()) {
        1024
    } else {
        512
    };
    parse_count(env, "OAUTH_MAX_CONNECTIONS", default, 1..=1_000_000)
}

fn parse_database_url(env: &Env<'_>) -> Result<SecretString, ConfigError> {
    let url = env
        .secret("DATABASE_URL")?
        .unwrap_or_else(|| SecretString::from(DEFAULT_DATABASE_URL));
    let raw = url.expose_secret();
    if is_in_memory_sqlite(raw) {
        return Err(ConfigError::invalid(
            "DATABASE_URL",
            "an in-memory SQLite database loses every row when its idle connections close; \
             use a file such as sqlite://oauth-manager.db?mode=rwc",
        ));
    }
    if raw.starts_with("sqlite:") || is_postgres_url(raw) {
        Ok(url)
    } else {
        Err(ConfigError::invalid(
            "DATABASE_URL",
            "must start with sqlite: or postgres:// (postgresql://)",
        ))
    }
}

/// `sqlite::memory:`, `sqlite://:memory:` or `mode=memory`, as sqlx reads them.
fn is_in_memory_sqlite(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return false;
    };
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (database, query) = rest.split_once('?').unwrap_or((rest, ""));
    database == ":memory:"
        || url::form_urlencoded::parse(query.as_bytes())
            .any(|(key, value)| key == "mode" && value == "memory")
}

/// The URL may carry a password: errors name the variable, never the value.
fn parse_redis_url(env: &Env<'_>) -> Result<Option<SecretString>, ConfigError> {
    const VAR: &str = "REDIS_URL";
    let Some(url) = env.secret(VAR)? else {
        return Ok(None);
    };
    match Url::parse(url.expose_secret()) {
        Ok(parsed) if matches!(parsed.scheme(), "redis" | "rediss") => Ok(Some(url)),
        Ok(_) => Err(ConfigError::invalid(
            VAR,
            "must be a redis:// or rediss:// URL",
        )),
        Err(err) => Err(ConfigError::invalid(VAR, format!("is not a URL: {err}"))),
    }
}

/// Decodes base64 (standard or URL-safe, padding optional) into a 32-byte key.
pub fn decode_key(var: &str, encoded: &str) -> Result<KeyMaterial, ConfigError> {
    let trimmed = encoded.trim().trim_end_matches('=');
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|_| ConfigError::invalid(var, "not valid base64"))?;
    KeyMaterial::from_slice(&bytes).ok_or_else(|| {
        ConfigError::invalid(
            var,
            format!("must decode to exactly 32 bytes, got {}", bytes.len()),
        )
    })
}

fn parse_encryption_keys(env: &Env<'_>) -> Result<Option<EncryptionKeys>, ConfigError> {
    const ACTIVE: &str = "OAUTH_ENCRYPTION_KEY";
    const OLD: &str = "OAUTH_ENCRYPTION_OLD_KEYS";
    let old = match env.secret(OLD)? {
        Some(list) => list
            .expose_secret()
            .split([',', '\n'])
            .filter(|item| !item.trim().is_empty())
            .map(|item| decode_key(OLD, item))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let Some(active) = env.secret(ACTIVE)? else {
        if !old.is_empty() {
            return Err(ConfigError::missing(ACTIVE, "old keys need an active key"));
        }
        return Ok(None);
    };
    let active = decode_key(ACTIVE, active.expose_secret())?;
    Ok(Some(EncryptionKeys { active, old }))
}

fn parse_jwt(env: &Env<'_>) -> Result<JwtSettings, ConfigError> {
    let secret = env.secret("OAUTH_JWT_SECRET")?;
    let pem = env
        .secret("OAUTH_JWT_PUBLIC_KEY")?
        // A PEM squeezed into one line of an env file often carries literal "\n".
        .map(|pem| pem.expose_secret().replace("\\n", "\n"));
    let jwks = env.var("OAUTH_JWT_JWKS_URL");
    let key = match (secret, pem, jwks) {
        (None, None, None) => None,
        (Some(secret), None, None) => Some(validate_jwt_secret(secret)?),
        (None, Some(pem), None) => Some(JwtKeySource::PublicKeyPem(pem)),
        (None, None, Some(url)) => Some(JwtKeySource::JwksUrl(parse_outbound_url(
            "OAUTH_JWT_JWKS_URL",
            &url,
        )?)),
        _ => {
            return Err(ConfigError::invalid(
                "OAUTH_JWT_SECRET",
                "set only one of OAUTH_JWT_SECRET, OAUTH_JWT_PUBLIC_KEY, OAUTH_JWT_JWKS_URL",
            ))
        }
    };
    Ok(JwtSettings {
        key,
        issuer: env.var("OAUTH_JWT_ISSUER"),
        audience: env.var("OAUTH_JWT_AUDIENCE"),
        roles_claim: env
            .var("OAUTH_JWT_ROLES_CLAIM")
            .unwrap_or_else(|| "roles".to_owned()),
        leeway_seconds: parse_leeway(env)?,
    })
}

fn validate_jwt_secret(secret: SecretString) -> Result<JwtKeySource, ConfigError> {
    if secret.expose_secret().len() < MIN_JWT_SECRET_BYTES {
        return Err(ConfigError::invalid(
            "OAUTH_JWT_SECRET",
            format!("must be at least {MIN_JWT_SECRET_BYTES} bytes long for HS256"),
        ));
    }
    Ok(JwtKeySource::Secret(secret))
}

fn parse_leeway(env: &Env<'_>) -> Result<u64, ConfigError> {
    const VAR: &str = "OAUTH_JWT_LEEWAY_SECONDS";
    let Some(raw) = env.var(VAR) else {
        return Ok(DEFAULT_JWT_LEEWAY_SECONDS);
    };
    match raw.trim().parse::<u64>() {
        Ok(seconds) if seconds <= MAX_JWT_LEEWAY_SECONDS => Ok(seconds),
        _ => Err(ConfigError::invalid(
            VAR,
            format!("must be a whole number of seconds from 0 to {MAX_JWT_LEEWAY_SECONDS}"),
        )),
    }
}

/// Outbound endpoints must use TLS, except on loopback for local testing.
pub fn parse_outbound_url(var: &str, raw: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw).map_err(|err| ConfigError::invalid(var, err.to_string()))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        _ => Err(ConfigError::invalid(
            var,
            "must be an https:// URL (http:// is accepted only for loopback addresses)",
        )),
    }
}

pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn parse_role_map(env: &Env<'_>) -> Result<RoleMap, ConfigError> {
    const VAR: &str = "OAUTH_ROLE_PERMISSIONS";
    match env.var(VAR) {
        Some(json) => RoleMap::from_json(&json).map_err(|reason| ConfigError::invalid(VAR, reason)),
        None => Ok(RoleMap::default()),
    }
}

fn parse_return_urls(env: &Env<'_>) -> Result<Vec<Url>, ConfigError> {
    const VAR: &str = "OAUTH_ALLOWED_RETURN_URLS";
    let Some(raw) = env.var(VAR) else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let url = Url::parse(item)
                .map_err(|err| ConfigError::invalid(VAR, format!("{item:?}: {err}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError::invalid(
                    VAR,
                    format!("{item:?} must be an absolute http(s) URL"),
                ));
            }
            Ok(url)
        })
        .collect()
}

/// Exact origins for CORS. `*` is refused: any web page could then script the API with a
/// token it got hold of (and the allowlist is the only thing CORS adds over no CORS at all).
/// Each entry is normalised as browsers serialise `Origin` (lower-case host, no default port).
fn parse_cors_origins(env: &Env<'_>) -> Result<Vec<String>, ConfigError> {
    const VAR: &str = "OAUTH_CORS_ALLOWED_ORIGINS";
    let Some(raw) = env.var(VAR) else {
        return Ok(Vec::new());
    };
    let mut origins = Vec::new();
    for item in raw
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        if item == "*" {
            return Err(ConfigError::invalid(
                VAR,
                "\"*\" is not accepted: list the exact origins (scheme://host[:port]) of the \
                 web applications that call this API",
            ));
        }
        let url = Url::parse(item)
            .map_err(|err| ConfigError::invalid(VAR, format!("{item:?}: {err}")))?;
        let origin_only = url.path() == "/"
            && url.query().is_none()
            && url.fragment().is_none()
            && url.username().is_empty()
            && url.password().is_none();
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || !origin_only {
            return Err(ConfigError::invalid(
                VAR,
                format!("{item:?} must be an origin: http(s)://host[:port], without a path"),
            ));
        }
        let origin = url.origin().ascii_serialization();
        if !origins.contains(&origin) {
            origins.push(origin);
        }
    }
    Ok(origins)
}

fn parse_rate_limits(env: &Env<'_>) -> Result<RateLimitSettings, ConfigError> {
    const PREFIX: &str = "OAUTH_RATE_LIMIT_REDIS_PREFIX";
    let defaults = RateLimitSettings::default();
    let per_minute = |var: &str, default: u32| -> Result<u32, ConfigError> {
        let value = parse_number(env, var, i64::from(default), 1..=1_000_000)?;
        Ok(u32::try_from(value).unwrap_or(default))
    };
    let redis_prefix = match env.var(PREFIX) {
        None => defaults.redis_prefix.clone(),
        Some(prefix)
            if prefix.len() <= 100 && prefix.bytes().all(|byte| byte.is_ascii_graphic()) =>
        {
            prefix
        }
        Some(_) => {
            return Err(ConfigError::invalid(
                PREFIX,
                "must be at most 100 printable ASCII characters without spaces",
            ))
        }
    };
    Ok(RateLimitSettings {
        enabled: env.var("OAUTH_RATE_LIMIT_ENABLED").is_none()
            || parse_bool(env, "OAUTH_RATE_LIMIT_ENABLED")?,
        per_minute: per_minute("OAUTH_RATE_LIMIT_PER_MINUTE", defaults.per_minute)?,
        connect_per_minute: per_minute(
            "OAUTH_RATE_LIMIT_CONNECT_PER_MINUTE",
            defaults.connect_per_minute,
        )?,
        redis_prefix,
    })
}

/// A whole number within `range`, or `default` when unset.
fn parse_number(
    env: &Env<'_>,
    var: &str,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64, ConfigError> {
    let Some(raw) = env.var(var) else {
        return Ok(default);
    };
    match raw.trim().parse::<i64>() {
        Ok(value) if range.contains(&value) => Ok(value),
        _ => Err(ConfigError::invalid(
            var,
            format!(
                "must be a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// [`parse_number`] for a count: bounds that fit a `usize` (at most 1,000,000 here).
fn parse_count(
    env: &Env<'_>,
    var: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<usize, ConfigError> {
    let range = i64::from(*range.start())..=i64::from(*range.end());
    let value = parse_number(env, var, i64::from(default), range)?;
    // In range, so non-negative and at most u32::MAX: the conversion cannot fail.
    Ok(usize::try_from(value).unwrap_or(0))
}

fn parse_lifecycle(env: &Env<'_>) -> Result<LifecycleSettings, ConfigError> {
    let defaults = LifecycleSettings::default();
    let settings = LifecycleSettings {
        refresh_skew: Duration::seconds(parse_number(
            env,
            "OAUTH_REFRESH_SKEW_SECONDS",
            defaults.refresh_skew.num_seconds(),
            0..=3600,
        )?),
        lease: Duration::seconds(parse_number(
            env,
            "OAUTH_REFRESH_LEASE_SECONDS",
            defaults.lease.num_seconds(),
            5..=600,
        )?),
        provider_timeout: Duration::seconds(parse_number(
            env,
            "OAUTH_PROVIDER_TIMEOUT_SECONDS",
            defaults.provider_timeout.num_seconds(),
            1..=120,
        )?),
        token_cache: Duration::seconds(parse_number(
            env,
            "OAUTH_TOKEN_CACHE_SECONDS",
            defaults.token_cache.num_seconds(),
            0..=60,
        )?),
        ..defaults
    };
    // A refresh (a provider call, possibly one quick retry) must end before its lease does,
    // or another replica could refresh with the same refresh token.
    let needed = settings.longest_refresh();
    if settings.lease < needed {
        return Err(ConfigError::invalid(
            "OAUTH_REFRESH_LEASE_SECONDS",
            format!(
                "must be at least {} (twice OAUTH_PROVIDER_TIMEOUT_SECONDS plus 5)",
                needed.num_seconds()
            ),
        ));
    }
    Ok(settings)
}

fn parse_worker(env: &Env<'_>) -> Result<WorkerSettings, ConfigError> {
    let defaults = WorkerSettings::default();
    let concurrency = parse_number(env, "OAUTH_REFRESH_CONCURRENCY", 64, 1..=1024)?;
    Ok(WorkerSettings {
        interval: Duration::seconds(parse_number(
            env,
            "OAUTH_REFRESH_INTERVAL_SECONDS",
            defaults.interval.num_seconds(),
            1..=3600,
        )?),
        window: Duration::seconds(parse_number(
            env,
            "OAUTH_REFRESH_WINDOW_SECONDS",
            defaults.window.num_seconds(),
            10..=86_400,
        )?),
        concurrency_per_provider: usize::try_from(concurrency).unwrap_or(64),
        ..defaults
    })
}

fn parse_audit_retention(env: &Env<'_>) -> Result<Option<u32>, ConfigError> {
    const VAR: &str = "OAUTH_AUDIT_RETENTION_DAYS";
    if env.var(VAR).is_none() {
        return Ok(None);
    }
    let days = parse_number(env, VAR, 0, 1..=36_500)?;
    Ok(u32::try_from(days).ok())
}

fn parse_bool(env: &Env<'_>, var: &str) -> Result<bool, ConfigError> {
    match env
        .var(var)
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("false" | "0" | "no") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some(other) => Err(ConfigError::invalid(
            var,
            format!("{other:?} is not true or false"),
        )),
    }
}

fn parse_log_format(env: &Env<'_>) -> Result<LogFormat, ConfigError> {
    match env.var("OAUTH_LOG_FORMAT").as_deref() {
        None | Some("json") => Ok(LogFormat::Json),
        Some("pretty") => Ok(LogFormat::Pretty),
        Some(other) => Err(ConfigError::invalid(
            "OAUTH_LOG_FORMAT",
            format!("{other:?} is neither json nor pretty"),
        )),
    }
}

fn parse_client_credentials(
    env: &Env<'_>,
) -> Result<HashMap<String, ClientCredentials>, ConfigError> {
    PROVIDER_ENV_PREFIXES
        .iter()
        .map(|prefix| {
            let credentials = ClientCredentials {
                client_id: env.var(&format!("{prefix}_CLIENT_ID")),
                client_secret: env.secret(&format!("{prefix}_CLIENT_SECRET"))?,
            };
            Ok(((*prefix).to_owned(), credentials))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| map.get(name).cloned();
        Config::from_lookup(&Env::new(&lookup))
    }

    fn invalid_var(result: Result<Config, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { var, .. }) | Err(ConfigError::Missing { var, .. }) => var,
            other => panic!("expected an invalid/missing variable, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_documentation() {
        let config = load(&[]).expect("defaults load");
        assert_eq!(config.listen_addr.to_string(), DEFAULT_LISTEN_ADDR);
        assert_eq!(config.public_url.as_str(), "http://localhost:8000/");
        assert_eq!(config.database_url.expose_secret(), DEFAULT_DATABASE_URL);
        assert!(config.encryption.is_none());
        assert_eq!(config.jwt.roles_claim, "roles");
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(!config.is_postgres());
        let limits = &config.rate_limits;
        assert!(limits.enabled);
        assert_eq!((limits.per_minute, limits.connect_per_minute), (600, 30));
        assert_eq!(limits.redis_prefix, "oauth-manager:ratelimit:");
        assert!(
            config.cors_allowed_origins.is_empty(),
            "CORS is off by default"
        );
        assert!(config.metrics_addr.is_none(), "metrics are off by default");
    }

    #[test]
    fn the_pool_hand_out_window_and_request_bound_have_defaults_and_can_be_set() {
        let sqlite = load(&[]).expect("defaults");
        assert_eq!(sqlite.database_pool.max_connections, 2);
        assert_eq!(sqlite.max_concurrent_requests, 256);
        assert_eq!(sqlite.http_idle_timeout, std::time::Duration::from_secs(75));
        assert_eq!(sqlite.http_keepalive_connections, 256);
        assert_eq!(sqlite.http_max_connections, 512);
        assert_eq!(
            sqlite.audit_hand_out_window,
            std::time::Duration::from_secs(1)
        );
        let postgres = load(&[("DATABASE_URL", "postgres://db.internal/oauth")]).expect("pg");
        assert_eq!(postgres.database_pool.max_connections, 16);
        assert_eq!(postgres.http_max_connections, 1024);
        let postgres_tuned = load(&[
            ("DATABASE_URL", "postgres://db.internal/oauth"),
            ("OAUTH_MAX_CONNECTIONS", "600"),
        ])
        .expect("pg tuned");
        assert_eq!(postgres_tuned.http_max_connections, 600);
        let tuned = load(&[
            ("OAUTH_DATABASE_MAX_CONNECTIONS", "32"),
            ("OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS", "0"),
            ("OAUTH_MAX_CONCURRENT_REQUESTS", "1000"),
            ("OAUTH_HTTP_IDLE_TIMEOUT_SECONDS", "5"),
            ("OAUTH_HTTP_KEEPALIVE_CONNECTIONS", "10"),
            ("OAUTH_MAX_CONNECTIONS", "2000"),
        ])
        .expect("tuned");
        assert_eq!(tuned.http_idle_timeout, std::time::Duration::from_secs(5));
        assert_eq!(tuned.http_keepalive_connections, 10);
        assert_eq!(tuned.http_max_connections, 2000);
        assert_eq!(tuned.database_pool.max_connections, 32);
        assert!(tuned.audit_hand_out_window.is_zero());
        assert_eq!(tuned.max_concurrent_requests, 1000);
        for (var, value) in [
            ("OAUTH_DATABASE_MAX_CONNECTIONS", "0"),
            ("OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS", "61"),
            ("OAUTH_MAX_CONCURRENT_REQUESTS", "0"),
            ("OAUTH_HTTP_IDLE_TIMEOUT_SECONDS", "0"),
            ("OAUTH_HTTP_KEEPALIVE_CONNECTIONS", "0"),
            ("OAUTH_MAX_CONNECTIONS", "0"),
        ] {
            assert_eq!(invalid_var(load(&[(var, value)])), var);
        }
    }

    #[test]
    fn rate_limits_can_be_tuned_or_switched_off() {
        let config = load(&[
            ("OAUTH_RATE_LIMIT_ENABLED", "false"),
            ("OAUTH_RATE_LIMIT_PER_MINUTE", "1200"),
            ("OAUTH_RATE_LIMIT_CONNECT_PER_MINUTE", "10"),
            ("OAUTH_RATE_LIMIT_REDIS_PREFIX", "staging:rl:"),
        ])
        .expect("loads");
        let limits = &config.rate_limits;
        assert!(!limits.enabled);
        assert_eq!((limits.per_minute, limits.connect_per_minute), (1200, 10));
        assert_eq!(limits.redis_prefix, "staging:rl:");
    }

    #[test]
    fn cors_origins_are_normalised_as_browsers_send_them() {
        let config = load(&[(
            "OAUTH_CORS_ALLOWED_ORIGINS",
            "https://App.Example.com/, http://localhost:3000 ,https://app.example.com:443",
        )])
        .expect("loads");
        assert_eq!(
            config.cors_allowed_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
    }

    #[test]
    fn the_metrics_listener_is_opt_in() {
        let config = load(&[("OAUTH_METRICS_ADDR", "127.0.0.1:9100")]).expect("loads");
        assert_eq!(
            config.metrics_addr.map(|addr| addr.to_string()).as_deref(),
            Some("127.0.0.1:9100")
        );
    }

    #[test]
    fn each_bad_variable_is_named_in_the_error() {
        let cases: &[(&str, &str)] = &[
            ("OAUTH_LISTEN_ADDR", "not-an-address"),
            ("OAUTH_PUBLIC_URL", "ftp://example.com"),
            ("DATABASE_URL", "mysql://localhost/db"),
            ("OAUTH_ENCRYPTION_KEY", "c2hvcnQ="),
            ("OAUTH_ENCRYPTION_KEY", "%%% not base64"),
            ("OAUTH_JWT_SECRET", "too-short"),
            ("OAUTH_JWT_JWKS_URL", "http://idp.example.com/jwks"),
            ("OAUTH_JWT_LEEWAY_SECONDS", "9999"),
            ("OAUTH_ROLE_PERMISSIONS", "{\"user\": [\"fly\"]}"),
            ("OAUTH_ALLOWED_RETURN_URLS", "not a url"),
            ("OAUTH_LOG_FORMAT", "xml"),
            ("OAUTH_TRUST_PROXY_HEADERS", "maybe"),
            ("OAUTH_REFRESH_LEASE_SECONDS", "1"),
            ("OAUTH_REFRESH_LEASE_SECONDS", "20"),
            ("OAUTH_PROVIDER_TIMEOUT_SECONDS", "0"),
            ("OAUTH_REFRESH_SKEW_SECONDS", "-5"),
            ("OAUTH_BACKGROUND_REFRESH", "sometimes"),
            ("OAUTH_REFRESH_CONCURRENCY", "0"),
            ("OAUTH_AUDIT_RETENTION_DAYS", "0"),
            ("OAUTH_AUDIT_RETENTION_DAYS", "36501"),
            ("OAUTH_AUDIT_RETENTION_DAYS", "a year"),
            ("OAUTH_PROVIDERS_FILE", "/nonexistent/providers.toml"),
            ("REDIS_URL", "http://cache.internal:6379"),
            ("REDIS_URL", "cache.internal:6379"),
            ("DATABASE_URL", "sqlite::memory:"),
            ("DATABASE_URL", "sqlite://:memory:"),
            ("DATABASE_URL", "sqlite://oauth.db?mode=memory&cache=shared"),
            ("OAUTH_RATE_LIMIT_ENABLED", "perhaps"),
            ("OAUTH_RATE_LIMIT_PER_MINUTE", "0"),
            ("OAUTH_RATE_LIMIT_PER_MINUTE", "lots"),
            ("OAUTH_RATE_LIMIT_CONNECT_PER_MINUTE", "-1"),
            ("OAUTH_RATE_LIMIT_CONNECT_PER_MINUTE", "1000001"),
            ("OAUTH_RATE_LIMIT_REDIS_PREFIX", "has space"),
            ("OAUTH_CORS_ALLOWED_ORIGINS", "*"),
            (
                "OAUTH_CORS_ALLOWED_ORIGINS",
                "https://app.example.com/settings",
            ),
            ("OAUTH_CORS_ALLOWED_ORIGINS", "https://app.example.com?x=1"),
            ("OAUTH_CORS_ALLOWED_ORIGINS", "https://user@app.example.com"),
            ("OAUTH_CORS_ALLOWED_ORIGINS", "app.example.com"),
            ("OAUTH_CORS_ALLOWED_ORIGINS", "ftp://app.example.com"),
            ("OAUTH_METRICS_ADDR", "9100"),
        ];
        for (var, value) in cases {
            assert_eq!(&invalid_var(load(&[(var, value)])), var, "value {value:?}");
        }
    }

    #[test]
    fn serve_requires_a_key_and_a_jwt_verifier() {
        let err = load(&[]).expect("loads").validate_for_serve();
        assert!(
            matches!(err, Err(ConfigError::Missing { var, .. }) if var == "OAUTH_ENCRYPTION_KEY")
        );
        let config = load(&[("OAUTH_ENCRYPTION_KEY", KEY)]).expect("loads");
        let err = config.validate_for_serve();
        assert!(matches!(err, Err(ConfigError::Missing { var, .. }) if var == "OAUTH_JWT_SECRET"));
        let config = load(&[
            ("OAUTH_ENCRYPTION_KEY", KEY),
            ("OAUTH_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        ])
        .expect("loads");
        assert!(config.validate_for_serve().is_ok());
    }

    #[test]
    fn secrets_can_come_from_a_file_twin_but_not_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{KEY}\n")).expect("write");
        let path = path.to_string_lossy().into_owned();
        let config = load(&[("OAUTH_ENCRYPTION_KEY_FILE", &path)]).expect("loads");
        assert!(config.encryption.is_some());
        let both = load(&[
            ("OAUTH_ENCRYPTION_KEY_FILE", &path),
            ("OAUTH_ENCRYPTION_KEY", KEY),
        ]);
        assert!(
            matches!(both, Err(ConfigError::Ambiguous { var }) if var == "OAUTH_ENCRYPTION_KEY")
        );
        let missing = load(&[("OAUTH_ENCRYPTION_KEY_FILE", "/nonexistent/key")]);
        assert!(
            matches!(missing, Err(ConfigError::File { var, .. }) if var == "OAUTH_ENCRYPTION_KEY")
        );
    }

    #[test]
    fn only_one_jwt_key_source_is_accepted() {
        let result = load(&[
            ("OAUTH_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("OAUTH_JWT_JWKS_URL", "https://idp.example.com/jwks"),
        ]);
        assert_eq!(invalid_var(result), "OAUTH_JWT_SECRET");
    }

    #[test]
    fn loopback_http_is_allowed_for_jwks() {
        let config = load(&[("OAUTH_JWT_JWKS_URL", "http://127.0.0.1:9/jwks")]).expect("loads");
        assert!(matches!(config.jwt.key, Some(JwtKeySource::JwksUrl(_))));
    }

    #[test]
    fn error_messages_never_echo_secret_values() {
        let secret = "short-secret-value";
        let err = load(&[("OAUTH_JWT_SECRET", secret)]).expect_err("too short");
        assert!(!err.to_string().contains(secret));
        let debug = format!(
            "{:?}",
            load(&[("OAUTH_ENCRYPTION_KEY", KEY)]).expect("loads")
        );
        assert!(!debug.contains(KEY), "Debug output leaked the key");
        for redis in ["http://:hunter2@cache:6379", "hunter2 is not a url"] {
            let err = load(&[("REDIS_URL", redis)]).expect_err("not a redis URL");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn redis_urls_need_the_redis_or_rediss_scheme() {
        for url in [
            "redis://:secret@cache:6379/0",
            "rediss://cache.internal:6380",
        ] {
            let config = load(&[("REDIS_URL", url)]).expect("loads");
            let loaded = config.redis_url.as_ref().map(ExposeSecret::expose_secret);
            assert_eq!(loaded, Some(url));
        }
        assert!(load(&[("REDIS_URL", " ")])
            .expect("blank is unset")
            .redis_url
            .is_none());
    }

    #[test]
    fn an_empty_secret_file_is_an_error_naming_the_file_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty");
        std::fs::write(&path, " \n\n").expect("write");
        let path = path.to_string_lossy().into_owned();
        for var in ["OAUTH_ENCRYPTION_KEY", "REDIS_URL", "DATABASE_URL"] {
            let file_var = format!("{var}_FILE");
            assert_eq!(invalid_var(load(&[(&file_var, &path)])), file_var);
        }
    }

    #[test]
    fn file_backed_sqlite_urls_are_accepted() {
        for url in [
            "sqlite://oauth.db?mode=rwc",
            "sqlite:data/oauth.db",
            "sqlite://memory.db",
        ] {
            let config = load(&[("DATABASE_URL", url)]).expect("loads");
            assert_eq!(config.database_url.expose_secret(), url);
        }
    }
}
