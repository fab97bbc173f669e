//! Business rules: no SQL, no HTTP types. Every operation on a user's data takes an
//! [`Actor`](crate::auth::rbac::Actor) proving the caller's permission.
//!
//! **Future sizes.** An `async fn` is as large as its largest state, all of its life: a
//! callback that awaits its provider for 50 ms and then stores what it got holds the storing's
//! state (a transaction, the consent, the audit event) during the whole wait, for each of the
//! hundreds of sign-ins a burst has in progress. Where a step's state is much larger than the
//! wait before it, the step is awaited through `Box::pin`, so that it takes its memory only
//! while it runs (BENCHMARKS.md, session 11). Storage does the same for transactions.

pub mod audit;
pub mod audit_log;
pub mod audit_tally;
pub mod audit_writer;
pub mod catalog;
pub mod consents;
pub mod disconnect;
pub mod flow;
pub mod integrations;
pub mod keys;
pub mod lane;
pub mod privacy;
pub mod refresh_commits;
pub mod token_cache;
pub mod tokens;
pub mod vault;
pub mod worker;

use std::sync::Arc;

use url::Url;

use crate::auth::rbac::Forbidden;
use crate::clock::SharedClock;
use crate::crypto::CryptoError;
use crate::providers::ProviderRegistry;
use crate::storage::{Database, StorageError};
use vault::TokenVault;

/// What the services need: storage, providers, the vault, outbound HTTP and the clock.
#[derive(Debug, Clone)]
pub struct Context {
    pub db: Database,
    pub providers: Arc<ProviderRegistry>,
    pub vault: TokenVault,
    /// Outbound client for providers: timeouts, no redirects followed.
    pub http: reqwest::Client,
    pub clock: SharedClock,
    /// `OAUTH_PUBLIC_URL`: the base of redirect URIs.
    pub public_url: Url,
    /// `OAUTH_ALLOWED_RETURN_URLS`.
    pub allowed_return_urls: Arc<Vec<Url>>,
    pub lifecycle: tokens::LifecycleSettings,
    /// In-process single-flight locks, one per integration being refreshed.
    pub flights: Arc<tokens::Flights>,
    /// This process's name on refresh leases: every lease and worker claim it takes is owned
    /// by `{instance_id}:…` ([`Context::new_lease`]).
    pub instance_id: Arc<str>,
    /// Audit hash chains: the cached digest salt, the retention period and the writer.
    pub audit: audit::AuditChains,
    /// Recently handed-out tokens (`OAUTH_TOKEN_CACHE_SECONDS`).
    pub tokens_cache: token_cache::TokenCache,
    /// Where a token that many callers wait for is loaded and refreshed ([`lane`]).
    pub lane: Arc<lane::Lane>,
    /// Refreshed tokens committed together ([`refresh_commits`]).
    pub refresh_commits: Arc<refresh_commits::RefreshCommits>,
}

impl Context {
    /// A new lease owner of this process, `{instance_id}:{kind}{uuid}`: nobody else can
    /// release or re-take it.
    pub fn new_lease(&self, kind: &str) -> String {
        format!("{}{kind}{}", self.own_leases(), uuid::Uuid::new_v4())
    }

    /// The owner prefix every lease of this process starts with.
    pub fn own_leases(&self) -> String {
        format!("{}:", self.instance_id)
    }

    /// This context for work on the [`lane`]: provider calls and queries go through the
    /// lane's own connections.
    pub fn for_lane(&self) -> Context {
        Context {
            http: self.lane.http.clone(),
            db: self.lane.db.clone(),
            ..self.clone()
        }
    }

    /// The redirect URI registered at a provider: `{OAUTH_PUBLIC_URL}/api/v1/oauth/callback/{name}`.
    pub fn redirect_uri(&self, provider: &str) -> String {
        let base = self.public_url.as_str().trim_end_matches('/');
        format!("{base}/api/v1/oauth/callback/{provider}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Absent, or owned by someone the caller may not see (the two are indistinguishable).
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    #[error("unknown provider {0:?}")]
    UnknownProvider(String),
    #[error("provider {provider} is not configured: set {}", missing.join(", "))]
    ProviderNotConfigured {
        provider: String,
        missing: Vec<String>,
    },
    #[error("{detail}")]
    InvalidInput { code: &'static str, detail: String },
    #[error("the {provider} connection must be authorized again (run the connect flow)")]
    ReauthRequired { provider: String },
    #[error("the integration was disconnected")]
    IntegrationRevoked,
    #[error("{detail}")]
    ProviderUnavailable {
        detail: String,
        retry_after_seconds: u64,
    },
    #[error("the {provider} provider rejected this service's client credentials")]
    ProviderMisconfigured { provider: String },
    #[error(
        "the provider issued no refresh token for this integration, so it cannot be refreshed"
    )]
    RefreshUnavailable,
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl ServiceError {
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidInput {
            code,
            detail: detail.into(),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
