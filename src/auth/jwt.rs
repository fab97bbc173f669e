//! Verification of the host product's JWTs.
//!
//! Signature, issuer and audience are checked by `jsonwebtoken`; time claims (`exp`, `nbf`,
//! `iat`) are checked here against the injected clock so expiry is testable. The algorithm is
//! fixed by the configured key, never taken from the token: an HS256 token is refused when an
//! RSA/EC public key is configured (the classic "HS/RS swap"), and `alg: none` never verifies.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::rbac::{Principal, RoleMap};
use crate::clock::SharedClock;
use crate::config::{ConfigError, JwtKeySource, JwtSettings};
use crate::jwks::{JwksCache, JwksError};

/// Tokens longer than this are refused before any parsing (cheap protection).
const MAX_TOKEN_BYTES: usize = 8 * 1024;
const MAX_SUBJECT_CHARS: usize = 255;
/// A verified token is taken at its word again for this long (never past its `exp`), then
/// verified afresh: a backend sends the same token with every request, and verifying it
/// (base64, JSON, signature) was the largest part of a token hand-out's own CPU.
const REVERIFY_AFTER: Duration = Duration::seconds(60);
/// Verified tokens remembered at most (by digest; about 200 bytes each).
const MAX_REMEMBERED: u64 = 10_000;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
    Static {
        key: DecodingKey,
        algorithm: Algorithm,
    },
    /// Boxed: the cache (with its HTTP client and locks) dwarfs a static key.
    Jwks(Box<JwksCache>),
}

pub struct JwtVerifier {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    roles_claim: Vec<String>,
    leeway: Duration,
    role_map: RoleMap,
    clock: SharedClock,
    /// Tokens verified moments ago, by the SHA-256 of their text (the text itself is not
    /// kept). Only successes: failures are cheap to repeat and must not fill it.
    recent: moka::sync::Cache<[u8; 32], Arc<Remembered>>,
}

/// The outcome of a successful verification, and until when it stands.
struct Remembered {
    /// Shared with every request that presents the token: a clone is a reference count.
    principal: Arc<Principal>,
    /// `exp` plus leeway, or [`REVERIFY_AFTER`] past the verification if that comes first.
    until: DateTime<Utc>,
    /// The JWKS generation it was verified under (always 0 with a static key).
    key_generation: u64,
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
    pub fn new(
        settings: &JwtSettings,
        role_map: RoleMap,
        clock: SharedClock,
    ) -> Result<Self, ConfigError> {
        let keys = match &settings.key {
            Some(JwtKeySource::Secret(secret)) => Keys::Static {
                key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                algorithm: Algorithm::HS256,
            },
            Some(JwtKeySource::PublicKeyPem(pem)) => static_pem_key(pem)?,
            Some(JwtKeySource::JwksUrl(url)) => {
                Keys::Jwks(Box::new(JwksCache::new(url.clone()).map_err(|err| {
                    ConfigError::invalid("OAUTH_JWT_JWKS_URL", err.to_string())
                })?))
            }
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
            recent: moka::sync::Cache::builder()
                .max_capacity(MAX_REMEMBERED)
                .time_to_live(REVERIFY_AFTER.to_std().unwrap_or_default())
                .build(),
        })
    }

    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Read before verifying: a key set fetched meanwhile makes this outcome stale at once.
        let key_generation = self.key_generation();
        let now = self.clock.now();
        if let Some(remembered) = self.recent.get(&digest) {
            if remembered.key_generation == key_generation && now < remembered.until {
                return Ok(remembered.principal.clone());
            }
        }
        let (principal, expires) = self.verify_fully(token).await?;
        let principal = Arc::new(principal);
        let until = expires
            .checked_add_signed(self.leeway)
            .map_or(now, |end| end.min(now + REVERIFY_AFTER));
        let remembered = Remembered {
            principal: principal.clone(),
            until,
            key_generation,
        };
        self.recent.insert(digest, Arc::new(remembered));
        Ok(principal)
    }

    fn key_generation(&self) -> u64 {
        match &self.keys {
            Keys::Static { .. } => 0,
            Keys::Jwks(cache) => cache.generation(),
        }
    }

    /// Signature, claims and times checked; the principal and the token's `exp`.
    async fn verify_fully(&self, token: &str) -> Result<(Principal, DateTime<Utc>), AuthError> {
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        let (key, algorithm) = match &self.keys {
            Keys::Static { key, algorithm } => (key.clone(), *algorithm),
            Keys::Jwks(cache) => cache
                .key_for(header.kid.as_deref(), self.clock.now())
                .await
                .map_err(|err| match err {
                    JwksError::UnknownKey => AuthError::UnknownKey,
                    JwksError::Unavailable(reason) => AuthError::KeysUnavailable(reason),
                })?,
        };
        if header.alg != algorithm {
            return Err(AuthError::BadSignature);
        }
        let claims = decode::<Map<String, Value>>(token, &key, &self.validation(algorithm))
            .map_err(|err| match err.kind() {
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => {
                    AuthError::WrongAudience
                }
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => AuthError::Malformed,
                _ => AuthError::BadSignature,
            })?
            .claims;
        let expires = self.check_times(&claims)?;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            // `erased:` marks pseudonymised users in the audit log; no live caller may use it.
            // Control characters (NUL above all, which PostgreSQL text cannot hold) have no
            // place in a user id that is stored, logged and compared.
            .filter(|sub| {
                !sub.is_empty()
                    && sub.chars().count() <= MAX_SUBJECT_CHARS
                    && !sub.starts_with("erased:")
                    && !sub.chars().any(char::is_control)
            })
            .ok_or(AuthError::MissingSubject)?;
        let principal = Principal::new(subject, self.roles(&claims), &self.role_map);
        Ok((principal, expires))
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        // Time claims are checked against the injected clock in `check_times`.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.validate_aud = self.audience.is_some();
        // A configured issuer or audience must also be *present*: jsonwebtoken only compares
        // the claims it is told are required.
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        validation
    }

    /// The token's `exp`, once it and `nbf`/`iat` admit the token now.
    fn check_times(&self, claims: &Map<String, Value>) -> Result<DateTime<Utc>, AuthError> {
        let now = self.clock.now();
        let time = |name: &str| -> Result<Option<DateTime<Utc>>, AuthError> {
            match claims.get(name) {
                None => Ok(None),
                Some(value) => numeric_date(value).map(Some).ok_or(AuthError::Malformed),
            }
        };
        let expires = time("exp")?.ok_or(AuthError::MissingExpiry)?;
        // Checked: a validly signed token may carry dates at chrono's limits, where adding
        // the leeway would overflow (and panic) instead of answering.
        let shifted = |time: DateTime<Utc>, by: Duration| {
            time.checked_add_signed(by).ok_or(AuthError::Malformed)
        };
        if shifted(expires, self.leeway)? <= now {
            return Err(AuthError::Expired);
        }
        for name in ["nbf", "iat"] {
            if let Some(start) = time(name)? {
                if shifted(start, -self.leeway)? > now {
                    return Err(AuthError::NotYetValid);
                }
            }
        }
        Ok(expires)
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
        return Err(ConfigError::invalid(
            VAR,
            "holds a private key; give the public key",
        ));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok(Keys::Static {
            key,
            algorithm: Algorithm::RS256,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
        // jsonwebtoken takes an EC key on any curve here; a P-384 key would then fail every
        // ES256 token at run time, so it is refused at start-up instead.
        if !is_p256(&key) {
            return Err(ConfigError::invalid(
                VAR,
                "is an EC key on another curve than P-256; only ES256 (P-256) is supported",
            ));
        }
        return Ok(Keys::Static {
            key,
            algorithm: Algorithm::ES256,
        });
    }
    Err(ConfigError::invalid(
        VAR,
        "not a PEM-encoded RSA (RS256) or P-256 EC (ES256) public key",
    ))
}

/// Building jsonwebtoken's ES256 verifier parses the key as a P-256 point, which fails for any
/// other curve; the empty signature then merely does not verify.
fn is_p256(key: &DecodingKey) -> bool {
    jsonwebtoken::crypto::verify("", b"", key, Algorithm::ES256).is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use jsonwebtoken::{encode, EncodingKey, Header};
    use proptest::prelude::*;
    use secrecy::SecretString;
    use serde_json::json;

    use super::*;
    use crate::clock::{Clock, ManualClock};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const EC_P256_PUBLIC: &str = include_str!("../../tests/fixtures/jwt_ec_public.pem");
    const EC_P384_PUBLIC: &str = include_str!("../../tests/fixtures/jwt_ec384_public.pem");

    fn verifier(key: JwtKeySource) -> Result<JwtVerifier, ConfigError> {
        verifier_on(key, Arc::new(ManualClock::new(Utc::now())))
    }

    fn verifier_on(key: JwtKeySource, clock: Arc<ManualClock>) -> Result<JwtVerifier, ConfigError> {
        let settings = JwtSettings {
            key: Some(key),
            issuer: None,
            audience: None,
            roles_claim: "roles".to_owned(),
            leeway_seconds: 30,
        };
        JwtVerifier::new(&settings, RoleMap::default(), clock)
    }

    #[tokio::test]
    async fn a_token_verified_before_is_refused_once_it_expires() {
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let key = JwtKeySource::Secret(SecretString::from(SECRET));
        let verifier = verifier_on(key, clock.clone()).unwrap();
        let expires = clock.now().timestamp() + 20;
        let alice = sign(&json!({"sub": "alice", "exp": expires}));
        let bob = sign(&json!({"sub": "bob", "exp": expires + 3600}));
        for _ in 0..2 {
            assert_eq!(verifier.verify(&alice).await.unwrap().user_id, "alice");
            assert_eq!(verifier.verify(&bob).await.unwrap().user_id, "bob");
        }
        // Past exp plus the 30 s leeway; well within the minute a verification is remembered.
        clock.advance(Duration::seconds(51));
        assert_eq!(
            verifier.verify(&alice).await.err(),
            Some(AuthError::Expired)
        );
        assert_eq!(verifier.verify(&bob).await.unwrap().user_id, "bob");
    }

    fn sign(claims: &Value) -> String {
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    #[tokio::test]
    async fn time_claims_at_chronos_limits_are_malformed_not_a_panic() {
        let verifier = verifier(JwtKeySource::Secret(SecretString::from(SECRET))).unwrap();
        // ≈ 8.2e12 and -8.3e12: representable, but not once shifted by the leeway.
        let latest = DateTime::<Utc>::MAX_UTC.timestamp();
        let earliest = DateTime::<Utc>::MIN_UTC.timestamp();
        let valid_until = Utc::now().timestamp() + 3600;
        for claims in [
            json!({"sub": "alice", "exp": latest}),
            json!({"sub": "alice", "exp": valid_until, "nbf": earliest}),
            json!({"sub": "alice", "exp": valid_until, "iat": earliest}),
        ] {
            let result = verifier.verify(&sign(&claims)).await;
            assert_eq!(result.err(), Some(AuthError::Malformed), "{claims}");
        }
        let ordinary = json!({"sub": "alice", "exp": valid_until, "nbf": 0, "iat": 0});
        assert!(verifier.verify(&sign(&ordinary)).await.is_ok());
    }

    const RSA_PUBLIC: &str = include_str!("../../tests/fixtures/jwt_rsa_public.pem");
    const RSA_PRIVATE: &str = include_str!("../../tests/fixtures/jwt_rsa_private.pem");
    const EC_P256_PRIVATE: &str = include_str!("../../tests/fixtures/jwt_ec_private.pem");

    fn valid_claims() -> Value {
        json!({"sub": "alice", "roles": ["admin"], "exp": Utc::now().timestamp() + 3600})
    }

    fn sign_with(algorithm: Algorithm, key: &EncodingKey, kid: Option<&str>) -> String {
        let mut header = Header::new(algorithm);
        header.kid = kid.map(str::to_owned);
        encode(&header, &valid_claims(), key).unwrap()
    }

    fn unsigned(header: &Value) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(valid_claims().to_string())
        )
    }

    #[tokio::test]
    async fn the_configured_key_fixes_the_algorithm_whatever_the_token_says() {
        let hs = verifier(JwtKeySource::Secret(SecretString::from(SECRET))).unwrap();
        let rs = verifier(JwtKeySource::PublicKeyPem(RSA_PUBLIC.to_owned())).unwrap();
        let es = verifier(JwtKeySource::PublicKeyPem(EC_P256_PUBLIC.to_owned())).unwrap();
        let hs_token = sign_with(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            None,
        );
        let rs_token = sign_with(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
            None,
        );
        let es_token = sign_with(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(EC_P256_PRIVATE.as_bytes()).unwrap(),
            None,
        );
        // Each verifier takes its own algorithm...
        assert!(hs.verify(&hs_token).await.is_ok());
        assert!(rs.verify(&rs_token).await.is_ok());
        assert!(es.verify(&es_token).await.is_ok());
        // ...and nothing else: RS→HS and HS→RS swaps, EC for RSA and back.
        for (verifier, token) in [
            (&hs, &rs_token),
            (&hs, &es_token),
            (&rs, &hs_token),
            (&rs, &es_token),
            (&es, &hs_token),
            (&es, &rs_token),
        ] {
            assert_eq!(
                verifier.verify(token).await.err(),
                Some(AuthError::BadSignature)
            );
        }
        // The classic confusion: HS256 keyed with the public key's PEM text (and its bytes
        // without the trailing newline), for a service configured with that public key.
        for public in [RSA_PUBLIC, RSA_PUBLIC.trim_end()] {
            let forged = sign_with(
                Algorithm::HS256,
                &EncodingKey::from_secret(public.as_bytes()),
                None,
            );
            assert_eq!(
                rs.verify(&forged).await.err(),
                Some(AuthError::BadSignature)
            );
        }
        // `alg: none` (any spelling) and other unsigned or unknown algorithms.
        for alg in ["none", "None", "NONE", "nOnE", "", "HS0", "RS1"] {
            let token = unsigned(&json!({"alg": alg, "typ": "JWT"}));
            for verifier in [&hs, &rs, &es] {
                let result = verifier.verify(&token).await;
                assert!(
                    matches!(result, Err(AuthError::Malformed | AuthError::BadSignature)),
                    "alg {alg:?}: {result:?}"
                );
            }
        }
        // With a static key, a `kid`, `jku` or embedded `jwk` changes nothing: a token signed by
        // another key stays refused.
        let other_hs = sign_with(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret-another-secret-0123"),
            Some("../../../etc/passwd"),
        );
        assert_eq!(
            hs.verify(&other_hs).await.err(),
            Some(AuthError::BadSignature)
        );
    }

    #[tokio::test]
    async fn a_subject_with_control_characters_is_refused() {
        let verifier = verifier(JwtKeySource::Secret(SecretString::from(SECRET))).unwrap();
        let exp = Utc::now().timestamp() + 3600;
        for sub in ["al\u{0}ice", "alice\n", "\u{7f}", "a\tb"] {
            let token = sign(&json!({"sub": sub, "exp": exp}));
            assert_eq!(
                verifier.verify(&token).await.err(),
                Some(AuthError::MissingSubject),
                "{sub:?}"
            );
        }
        let fine = sign(&json!({"sub": "ålice@example.com|42", "exp": exp}));
        assert!(verifier.verify(&fine).await.is_ok());
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// base64url of arbitrary bytes, so generated tokens get past the segment split.
    fn segment() -> impl Strategy<Value = String> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|bytes| URL_SAFE_NO_PAD.encode(bytes))
    }

    /// A header that parses: a known or odd algorithm, maybe a `kid`, maybe junk members.
    fn header() -> impl Strategy<Value = String> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let alg = prop_oneof![
            Just("HS256".to_owned()),
            Just("RS256".to_owned()),
            Just("ES256".to_owned()),
            Just("none".to_owned()),
            ".{0,8}",
        ];
        (
            alg,
            proptest::option::of(".{0,40}"),
            proptest::option::of(".{0,20}"),
        )
            .prop_map(|(alg, kid, junk)| {
                let mut header = json!({"alg": alg, "typ": "JWT"});
                if let Some(kid) = kid {
                    header["kid"] = json!(kid);
                }
                if let Some(junk) = junk {
                    header["jku"] = json!(junk);
                }
                URL_SAFE_NO_PAD.encode(header.to_string())
            })
    }

    /// Claims that would be accepted if only the signature were right.
    fn payload() -> impl Strategy<Value = String> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        (".{0,20}", any::<i64>(), proptest::option::of(any::<f64>())).prop_map(|(sub, exp, nbf)| {
            let mut claims = json!({"sub": sub, "exp": exp, "roles": ["admin"]});
            if let Some(nbf) = nbf {
                claims["nbf"] = json!(nbf);
            }
            URL_SAFE_NO_PAD.encode(claims.to_string())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any text as a bearer token is an error, never a panic and never a principal.
        #[test]
        fn arbitrary_text_is_refused(token in ".{0,300}") {
            let verifier = verifier(JwtKeySource::Secret(SecretString::from(SECRET))).unwrap();
            prop_assert!(block_on(verifier.verify(&token)).is_err());
        }

        /// Arbitrary bytes (as the header would carry them, lossily decoded) are refused too.
        #[test]
        fn arbitrary_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let verifier = verifier(JwtKeySource::PublicKeyPem(RSA_PUBLIC.to_owned())).unwrap();
            let token = String::from_utf8_lossy(&bytes);
            prop_assert!(block_on(verifier.verify(&token)).is_err());
        }

        /// Three well-formed segments with a parseable header and plausible claims, but a
        /// signature nobody made: refused by every key type.
        #[test]
        fn well_formed_tokens_with_forged_signatures_are_refused(
            header in header(),
            payload in payload(),
            signature in segment(),
            key in 0..3usize,
        ) {
            let source = match key {
                0 => JwtKeySource::Secret(SecretString::from(SECRET)),
                1 => JwtKeySource::PublicKeyPem(RSA_PUBLIC.to_owned()),
                _ => JwtKeySource::PublicKeyPem(EC_P256_PUBLIC.to_owned()),
            };
            let verifier = verifier(source).unwrap();
            let token = format!("{header}.{payload}.{signature}");
            prop_assert!(block_on(verifier.verify(&token)).is_err());
        }
    }

    #[test]
    fn an_ec_key_on_another_curve_than_p256_is_refused_at_start_up() {
        assert!(verifier(JwtKeySource::PublicKeyPem(EC_P256_PUBLIC.to_owned())).is_ok());
        match verifier(JwtKeySource::PublicKeyPem(EC_P384_PUBLIC.to_owned())) {
            Err(ConfigError::Invalid { var, reason }) => {
                assert_eq!(var, "OAUTH_JWT_PUBLIC_KEY");
                assert!(reason.contains("P-256"), "{reason}");
            }
            other => panic!("a P-384 key must be refused, got {:?}", other.map(|_| ())),
        }
    }
}
