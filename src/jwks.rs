//! A cached JSON Web Key Set: the host product's JWT keys (`OAUTH_JWT_JWKS_URL`) and OpenID
//! providers' ID-token keys. Refetched when stale or when a token names an unknown `kid`
//! (key rotation), but at most once per cooldown, failed attempts included, so neither forged
//! kids nor an unreachable provider make us hammer (and every request wait on) the identity
//! provider; a stale key is used while the provider is unreachable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};
use url::Url;

/// A cached JWKS is refetched after this long even when every `kid` is known.
const JWKS_TTL: Duration = Duration::minutes(10);
/// An unknown `kid` refetches the JWKS at most this often.
const JWKS_REFETCH_COOLDOWN: Duration = Duration::seconds(10);
const JWKS_HTTP_TIMEOUT: StdDuration = StdDuration::from_secs(5);
const MAX_JWKS_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("no key with that kid")]
    UnknownKey,
    #[error("the key set could not be fetched: {0}")]
    Unavailable(String),
}

struct Fetched {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    at: DateTime<Utc>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

pub struct JwksCache {
    url: Url,
    http: reqwest::Client,
    cached: RwLock<Option<Fetched>>,
    /// Serializes fetches and remembers the last one, successful or not: the cooldown starts
    /// at every attempt, so an unreachable provider is not asked again on every request.
    fetching: Mutex<Option<Attempt>>,
    /// Counts the key sets fetched: what was verified with an earlier one is verified again.
    generation: AtomicU64,
}

/// The last fetch attempt: when, and why it failed (`None` when it succeeded).
struct Attempt {
    at: DateTime<Utc>,
    failure: Option<String>,
}

impl Attempt {
    /// What a caller whose key is not cached is told until the next attempt.
    fn error(&self) -> JwksError {
        match &self.failure {
            Some(reason) => JwksError::Unavailable(reason.clone()),
            None => JwksError::UnknownKey,
        }
    }
}

impl JwksCache {
    pub fn new(url: Url) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(JWKS_HTTP_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            url,
            http,
            cached: RwLock::new(None),
            fetching: Mutex::new(None),
            generation: AtomicU64::new(0),
        })
    }

    /// The key named `kid` (or the only key, when the token names none).
    pub async fn key_for(
        &self,
        kid: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(DecodingKey, Algorithm), JwksError> {
        if let Some(found) = self.lookup(kid, now, false).await {
            return Ok(found);
        }
        let mut last_attempt = self.fetching.lock().await;
        // Another request may have refreshed the cache while we waited for the lock.
        if let Some(found) = self.lookup(kid, now, false).await {
            return Ok(found);
        }
        // Within the cooldown of the last attempt, successful or not, answer from what we
        // have without asking the provider again.
        let due = last_attempt
            .as_ref()
            .is_none_or(|attempt| now - attempt.at >= JWKS_REFETCH_COOLDOWN);
        if due {
            let failure = self.refresh(now).await.err();
            *last_attempt = Some(Attempt { at: now, failure });
        }
        // A stale key still beats refusing every caller while the IdP is down.
        let found = self.lookup(kid, now, true).await;
        found.ok_or_else(|| {
            last_attempt
                .as_ref()
                .map_or(JwksError::UnknownKey, Attempt::error)
        })
    }

    /// Fetches the key set and replaces the cached one; a failure keeps the cached keys.
    async fn refresh(&self, now: DateTime<Utc>) -> Result<(), String> {
        match self.fetch().await {
            Ok(keys) => {
                *self.cached.write().await = Some(Fetched { keys, at: now });
                self.generation.fetch_add(1, Ordering::Release);
                Ok(())
            }
            Err(err) => {
                tracing::warn!(error = %err, url = %self.url, "JWKS fetch failed");
                Err(err)
            }
        }
    }

    /// Changes whenever a key set is fetched (keys may have been withdrawn).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    async fn lookup(
        &self,
        kid: Option<&str>,
        now: DateTime<Utc>,
        allow_stale: bool,
    ) -> Option<(DecodingKey, Algorithm)> {
        let cached = self.cached.read().await;
        let fetched = cached.as_ref()?;
        if !allow_stale && now - fetched.at >= JWKS_TTL {
            return None;
        }
        match kid {
            Some(kid) => fetched.keys.get(kid).cloned(),
            None if fetched.keys.len() == 1 => fetched.keys.values().next().cloned(),
            None => None,
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
        let response = self
            .http
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|err| err.without_url().to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        parse_jwks(&read_limited(response, MAX_JWKS_BYTES, "JWKS document too large").await?)
    }
}

/// The body, refused (`too_large`) as soon as it exceeds `max` bytes: a hostile or broken
/// endpoint must not make us buffer an unbounded document.
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    max: usize,
    too_large: &str,
) -> Result<Vec<u8>, String> {
    if response
        .content_length()
        .is_some_and(|declared| declared > max as u64)
    {
        return Err(too_large.to_owned());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| err.without_url().to_string())?
    {
        if body.len() + chunk.len() > max {
            return Err(too_large.to_owned());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Parses a JWKS document, keeping signature keys of asymmetric algorithms only.
pub fn parse_jwks(body: &[u8]) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
    let document: Value =
        serde_json::from_slice(body).map_err(|err| format!("JWKS is not JSON: {err}"))?;
    let keys = document
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no keys array")?;
    Ok(keys
        .iter()
        .filter_map(|jwk| {
            let kid = jwk.get("kid").and_then(Value::as_str).unwrap_or_default();
            jwk_to_key(jwk).map(|key| (kid.to_owned(), key))
        })
        .collect())
}

fn jwk_to_key(jwk: &Value) -> Option<(DecodingKey, Algorithm)> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if field("use").is_some_and(|usage| usage != "sig") {
        return None;
    }
    let declared: Option<Algorithm> = field("alg").and_then(|alg| alg.parse().ok());
    match (field("kty")?, field("crv")) {
        ("RSA", _) => {
            let algorithm = declared.filter(|alg| {
                matches!(
                    alg,
                    Algorithm::RS256
                        | Algorithm::RS384
                        | Algorithm::RS512
                        | Algorithm::PS256
                        | Algorithm::PS384
                        | Algorithm::PS512
                )
            });
            let key = DecodingKey::from_rsa_components(field("n")?, field("e")?).ok()?;
            Some((key, algorithm.unwrap_or(Algorithm::RS256)))
        }
        ("EC", Some(curve)) => {
            let algorithm = match curve {
                "P-256" => Algorithm::ES256,
                "P-384" => Algorithm::ES384,
                _ => return None,
            };
            let key = DecodingKey::from_ec_components(field("x")?, field("y")?).ok()?;
            Some((key, algorithm))
        }
        ("OKP", Some("Ed25519")) => {
            let key = DecodingKey::from_ed_components(field("x")?).ok()?;
            Some((key, Algorithm::EdDSA))
        }
        // Symmetric ("oct") keys in a JWKS would enable algorithm confusion: ignored.
        _ => None,
    }
}
