//! Verification of the host product's JWTs.
//!
//! Signature, issuer and audience are checked by `jsonwebtoken`; time claims (`exp`, `nbf`,
//! `iat`) are checked here against the injected clock so expiry is testable. The algorithm is
//! fixed by the configured key, never taken from the token: an HS256 token is refused when an
//! RSA/EC public key is configured (the classic "HS/RS swap"), and `alg: none` never verifies.

use std::collections::HashMap;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, RwLock};
use url::Url;

use super::rbac::{Principal, RoleMap};
use crate::clock::SharedClock;
use crate::config::{ConfigError, JwtKeySource, JwtSettings};

/// Tokens longer than this are refused before any parsing (cheap protection).
const MAX_TOKEN_BYTES: usize = 8 * 1024;
const MAX_SUBJECT_CHARS: usize = 255;
/// A cached JWKS is refetched after this long even when every `kid` is known.
const JWKS_TTL: Duration = Duration::minutes(10);
/// An unknown `kid` refetches the JWKS at most this often, so forged kids cannot make us
/// hammer the identity provider.
const JWKS_REFETCH_COOLDOWN: Duration = Duration::seconds(10);
const JWKS_HTTP_TIMEOUT: StdDuration = StdDuration::from_secs(5);
const MAX_JWKS_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token was sent")]
    Missing,
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    #[error("the token's signature or algorithm is not accepted")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token lacks an exp claim")]
    MissingExpiry,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token has no usable sub claim")]
    MissingSubject,
    #[error("the token's signing key is unknown")]
    UnknownKey,
    #[error("the signing keys could not be fetched: {0}")]
    KeysUnavailable(String),
}

enum Keys {
    Static { key: DecodingKey, algorithm: Algorithm },
    Jwks(JwksCache),
}

pub struct JwtVerifier {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    roles_claim: Vec<String>,
    leeway: Duration,
    role_map: RoleMap,
    clock: SharedClock,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn new(settings: &JwtSettings, role_map: RoleMap, clock: SharedClock) -> Result<Self, ConfigError> {
        let keys = match &settings.key {
            Some(JwtKeySource::Secret(secret)) => Keys::Static {
                key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                algorithm: Algorithm::HS256,
            },
            Some(JwtKeySource::PublicKeyPem(pem)) => static_pem_key(pem)?,
            Some(JwtKeySource::JwksUrl(url)) => Keys::Jwks(JwksCache::new(url.clone())?),
            None => {
                return Err(ConfigError::missing(
                    "OAUTH_JWT_SECRET",
                    "one of OAUTH_JWT_SECRET, OAUTH_JWT_PUBLIC_KEY, OAUTH_JWT_JWKS_URL",
                ))
            }
        };
        Ok(Self {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            roles_claim: settings.roles_claim.split('.').map(str::to_owned).collect(),
            leeway: Duration::seconds(i64::try_from(settings.leeway_seconds).unwrap_or(0)),
            role_map,
            clock,
        })
    }

    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        let (key, algorithm) = match &self.keys {
            Keys::Static { key, algorithm } => (key.clone(), *algorithm),
            Keys::Jwks(cache) => cache.key_for(header.kid.as_deref(), &self.clock).await?,
        };
        if header.alg != algorithm {
            return Err(AuthError::BadSignature);
        }
        let claims = decode::<Map<String, Value>>(token, &key, &self.validation(algorithm))
            .map_err(|err| match err.kind() {
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                    AuthError::Malformed
                }
                _ => AuthError::BadSignature,
            })?
            .claims;
        self.check_times(&claims)?;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|sub| !sub.is_empty() && sub.chars().count() <= MAX_SUBJECT_CHARS)
            .ok_or(AuthError::MissingSubject)?;
        Ok(Principal::new(subject, self.roles(&claims), &self.role_map))
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        // Time claims are checked against the injected clock in `check_times`.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.validate_aud = self.audience.is_some();
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        validation
    }

    fn check_times(&self, claims: &Map<String, Value>) -> Result<(), AuthError> {
        let now = self.clock.now();
        let time = |name: &str| -> Result<Option<DateTime<Utc>>, AuthError> {
            match claims.get(name) {
                None => Ok(None),
                Some(value) => numeric_date(value).map(Some).ok_or(AuthError::Malformed),
            }
        };
        let expires = time("exp")?.ok_or(AuthError::MissingExpiry)?;
        if expires + self.leeway <= now {
            return Err(AuthError::Expired);
        }
        if let Some(not_before) = time("nbf")? {
            if not_before - self.leeway > now {
                return Err(AuthError::NotYetValid);
            }
        }
        if let Some(issued) = time("iat")? {
            if issued - self.leeway > now {
                return Err(AuthError::NotYetValid);
            }
        }
        Ok(())
    }

    /// Roles from the configured claim: an array of strings, or one space-separated string.
    fn roles(&self, claims: &Map<String, Value>) -> Vec<String> {
        let mut value = None;
        let mut current = claims;
        for (index, segment) in self.roles_claim.iter().enumerate() {
            let Some(found) = current.get(segment) else {
                return Vec::new();
            };
            if index + 1 == self.roles_claim.len() {
                value = Some(found);
            } else if let Some(object) = found.as_object() {
                current = object;
            } else {
                return Vec::new();
            }
        }
        match value {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(Value::String(text)) => text.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }
}

fn numeric_date(value: &Value) -> Option<DateTime<Utc>> {
    let seconds = value.as_f64()?;
    if !seconds.is_finite() {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)]
    DateTime::from_timestamp(seconds.floor() as i64, 0)
}

fn static_pem_key(pem: &str) -> Result<Keys, ConfigError> {
    const VAR: &str = "OAUTH_JWT_PUBLIC_KEY";
    if pem.contains("PRIVATE KEY") {
        return Err(ConfigError::invalid(VAR, "holds a private key; give the public key"));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok(Keys::Static { key, algorithm: Algorithm::RS256 });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
        return Ok(Keys::Static { key, algorithm: Algorithm::ES256 });
    }
    Err(ConfigError::invalid(
        VAR,
        "not a PEM-encoded RSA (RS256) or P-256 EC (ES256) public key",
    ))
}

struct Fetched {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    at: DateTime<Utc>,
}

struct JwksCache {
    url: Url,
    http: reqwest::Client,
    cached: RwLock<Option<Fetched>>,
    fetching: Mutex<()>,
}

impl JwksCache {
    fn new(url: Url) -> Result<Self, ConfigError> {
        let http = reqwest::Client::builder()
            .timeout(JWKS_HTTP_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| ConfigError::invalid("OAUTH_JWT_JWKS_URL", err.to_string()))?;
        Ok(Self {
            url,
            http,
            cached: RwLock::new(None),
            fetching: Mutex::new(()),
        })
    }

    async fn key_for(
        &self,
        kid: Option<&str>,
        clock: &SharedClock,
    ) -> Result<(DecodingKey, Algorithm), AuthError> {
        if let Some(found) = self.lookup(kid, clock, false).await {
            return Ok(found);
        }
        let _guard = self.fetching.lock().await;
        // Another request may have refreshed the cache while we waited for the lock.
        if let Some(found) = self.lookup(kid, clock, false).await {
            return Ok(found);
        }
        let may_fetch = match self.cached.read().await.as_ref() {
            None => true,
            Some(fetched) => clock.now() - fetched.at >= JWKS_REFETCH_COOLDOWN,
        };
        if may_fetch {
            match self.fetch().await {
                Ok(keys) => {
                    *self.cached.write().await = Some(Fetched { keys, at: clock.now() });
                }
                Err(err) => {
                    tracing::warn!(error = %err, url = %self.url, "JWKS fetch failed");
                    // A stale key still beats refusing every caller while the IdP is down.
                    return self
                        .lookup(kid, clock, true)
                        .await
                        .ok_or(AuthError::KeysUnavailable(err));
                }
            }
        }
        self.lookup(kid, clock, true).await.ok_or(AuthError::UnknownKey)
    }

    async fn lookup(
        &self,
        kid: Option<&str>,
        clock: &SharedClock,
        allow_stale: bool,
    ) -> Option<(DecodingKey, Algorithm)> {
        let cached = self.cached.read().await;
        let fetched = cached.as_ref()?;
        if !allow_stale && clock.now() - fetched.at >= JWKS_TTL {
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
        let body = response.bytes().await.map_err(|err| err.without_url().to_string())?;
        if body.len() > MAX_JWKS_BYTES {
            return Err("JWKS document too large".to_owned());
        }
        parse_jwks(&body)
    }
}

/// Parses a JWKS document, keeping signature keys of asymmetric algorithms only.
pub fn parse_jwks(body: &[u8]) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
    let document: Value = serde_json::from_slice(body).map_err(|err| format!("JWKS is not JSON: {err}"))?;
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
                    Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512
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
