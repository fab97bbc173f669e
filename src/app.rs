//! Wiring: configuration → keyring, database, verifier, providers → router.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;

use crate::auth::jwt::JwtVerifier;
use crate::clock::SharedClock;
use crate::config::{Config, ConfigError};
use crate::crypto::{CryptoError, Keyring};
use crate::http::limits::RateLimiter;
use crate::http::{self, AppState};
use crate::providers::{discovery, ProviderRegistry};
use crate::services::vault::TokenVault;
use crate::services::{worker, Context};
use crate::storage::{Database, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("encryption keys: {0}")]
    Crypto(#[from] CryptoError),
    #[error("database: {0}")]
    Storage(#[from] StorageError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot build the outbound HTTP client: {0}")]
    Http(String),
    #[error("audit log: {0}")]
    Audit(String),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("cannot listen on {addr} (OAUTH_METRICS_ADDR): {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Builds the keyring from the configured keys.
pub fn keyring(config: &Config) -> Result<Keyring, StartupError> {
    let keys = config.encryption_keys()?;
    Keyring::new(&keys.active, &keys.old).map_err(|err| match err {
        // Only the configuration can repeat a key: name the variable to fix.
        CryptoError::DuplicateKey => ConfigError::invalid(
            "OAUTH_ENCRYPTION_OLD_KEYS",
            "repeats the active key or another old key",
        )
        .into(),
        other => other.into(),
    })
}

/// Connects to the configured database and applies pending migrations.
pub async fn open_database(config: &Config) -> Result<Database, StartupError> {
    let db = Database::connect(config.database_url.expose_secret(), config.database_pool).await?;
    db.migrate().await?;
    // The scope catalog is seeded with the schema, so every command sees the same catalog.
    let now = crate::clock::truncate(chrono::Utc::now());
    crate::services::catalog::seed(&db, config, now).await?;
    crate::services::audit::ensure_genesis(&db, now)
        .await
        .map_err(|err| StartupError::Audit(err.to_string()))?;
    Ok(db)
}

/// A ready-to-serve application.
pub struct Application {
    pub state: AppState,
    metrics: Option<MetricsEndpoint>,
}

/// `GET /metrics` on `OAUTH_METRICS_ADDR`, bound at start-up so that a taken port stops the
/// process instead of silently serving no metrics.
pub struct MetricsEndpoint {
    listener: TcpListener,
    handle: PrometheusHandle,
}

impl MetricsEndpoint {
    /// Installs the recorder and binds the listener; `None` when metrics are not configured.
    pub async fn bind(config: &Config) -> Result<Option<Self>, StartupError> {
        let Some(addr) = config.metrics_addr else {
            return Ok(None);
        };
        let handle = crate::metrics::install().map_err(StartupError::Metrics)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::MetricsListen { addr, source })?;
        Ok(Some(Self { listener, handle }))
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the returned task is aborted.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tracing::info!(address = ?self.listener.local_addr().ok(), "metrics listening");
        tokio::spawn(http::metrics::serve(self.listener, self.handle))
    }
}

/// Everything the services need, from the configuration: keyring, providers (after OIDC
/// discovery), database (migrated), outbound HTTP client. Used by `serve` and `worker`.
pub async fn build_services(
    config: &mut Config,
    clock: SharedClock,
) -> Result<Context, StartupError> {
    let keyring = Arc::new(keyring(config)?);
    let timeout = config
        .lifecycle
        .provider_timeout
        .to_std()
        .unwrap_or(crate::oauth::TOTAL_TIMEOUT);
    // As many idle connections per provider as the background refresher uses at once.
    let idle_per_host = config.worker.concurrency_per_provider;
    let client = || {
        crate::oauth::http_client_with(timeout, idle_per_host)
            .map_err(|err| StartupError::Http(err.to_string()))
    };
    let http = client()?;
    for declared in config
        .declared_providers
        .iter_mut()
        .filter(|d| d.needs_discovery())
    {
        discovery::complete(declared, &http).await;
    }
    let providers = Arc::new(ProviderRegistry::from_config(config)?);
    let db = open_database(config).await?;
    let lane = crate::services::lane::Lane::start(client()?, &db)
        .map_err(|err| StartupError::Http(format!("the refresh lane does not start: {err}")))?;
    tracing::info!(
        backend = db.backend(),
        key_id = keyring.active_key_id(),
        "storage ready"
    );
    Ok(Context {
        db,
        providers,
        vault: TokenVault::new(keyring),
        http,
        clock,
        public_url: config.public_url.clone(),
        allowed_return_urls: Arc::new(config.allowed_return_urls.clone()),
        lifecycle: config.lifecycle,
        flights: Arc::default(),
        instance_id: uuid::Uuid::new_v4().to_string().into(),
        audit: crate::services::audit::AuditChains::new(
            config.audit_retention_days,
            config.audit_hand_out_window,
        ),
        tokens_cache: crate::services::token_cache::TokenCache::new(config.lifecycle.token_cache),
        lane: Arc::new(lane),
        refresh_commits: Arc::default(),
    })
}

impl Application {
    pub async fn build(mut config: Config, clock: SharedClock) -> Result<Self, StartupError> {
        config.validate_for_serve()?;
        let verifier = Arc::new(JwtVerifier::new(
            &config.jwt,
            config.role_permissions.clone(),
            clock.clone(),
        )?);
        let services = build_services(&mut config, clock).await?;
        let limiter = if config.rate_limits.enabled {
            let limiter = RateLimiter::new(&config.rate_limits, config.redis_url.as_ref())?;
            limiter.connect().await;
            Some(Arc::new(limiter))
        } else {
            None
        };
        let metrics = MetricsEndpoint::bind(&config).await?;
        Ok(Self {
            state: AppState::new(http::SharedState {
                config: Arc::new(config),
                verifier,
                services,
                limiter,
            }),
            metrics,
        })
    }

    /// Where `GET /metrics` is served, when `OAUTH_METRICS_ADDR` is set.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|metrics| metrics.local_addr().ok())
    }

    pub fn router(&self) -> Router {
        http::router(self.state.clone())
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish. Runs the
    /// background worker alongside unless `OAUTH_BACKGROUND_REFRESH=false`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        let metrics = self.metrics.map(MetricsEndpoint::spawn);
        let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
        let background = self.state.config.background_refresh.then(|| {
            let services = self.state.services.clone();
            let settings = self.state.config.worker;
            tokio::spawn(worker::run(services, settings, async {
                let _ = worker_stopped.await;
            }))
        });
        let connections = http::server::ConnectionSettings {
            idle_timeout: self.state.config.http_idle_timeout,
            keepalive_connections: self.state.config.http_keepalive_connections,
            max_connections: self.state.config.http_max_connections,
        };
        http::server::serve(listener, router, connections, shutdown).await;
        let _ = stop_worker.send(());
        if let Some(background) = background {
            let _ = background.await;
        }
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        self.state.services.audit.flush().await;
        self.state.services.db.close().await;
        self.state.services.lane.db.close().await;
        Ok(())
    }
}

/// Completes on SIGTERM (orchestrators) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const OTHER: &str = "HxseHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=";

    fn keyring_with_old_keys(old: &str) -> Result<Keyring, StartupError> {
        let lookup = |name: &str| match name {
            "OAUTH_ENCRYPTION_KEY" => Some(KEY.to_owned()),
            "OAUTH_ENCRYPTION_OLD_KEYS" => Some(old.to_owned()),
            _ => None,
        };
        keyring(&Config::from_lookup(&Env::new(&lookup)).unwrap())
    }

    #[test]
    fn a_repeated_key_is_a_configuration_error_naming_the_old_keys() {
        assert!(keyring_with_old_keys(OTHER).is_ok());
        for old in [KEY.to_owned(), format!("{OTHER},{OTHER}")] {
            match keyring_with_old_keys(&old) {
                Err(StartupError::Config(ConfigError::Invalid { var, reason })) => {
                    assert_eq!(var, "OAUTH_ENCRYPTION_OLD_KEYS");
                    assert!(!reason.contains(KEY) && !reason.contains(OTHER));
                }
                other => panic!("expected a configuration error, got {other:?}"),
            }
        }
    }
}
