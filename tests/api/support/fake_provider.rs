//! A fake OAuth 2.0 / OpenID Connect authorization server standing in for Google, YouTube,
//! Microsoft, Notion and a strict generic OIDC provider ("acme") in the integration tests.
//!
//! It is a real HTTP server (axum on `127.0.0.1:0`) so the service talks to it exactly as it
//! would to the real providers. Each provider's quirks follow
//! `/work/shared/reference/oauth-client-requirements.md` (cited below as "reference §…"):
//! response shapes, client authentication, refresh-token rotation, reuse detection and error
//! bodies. Tests steer it with consents (what the "user" does on the consent screen) and faults
//! (what the network or the provider does wrong), and inspect every request it received.

// Each test binary uses a different subset of this support module.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use url::Url;
use uuid::Uuid;

const SIGNING_KEY_PEM: &str = include_str!("../../fixtures/provider_ec_private.pem");
/// Not in the JWKS: ID tokens signed with it under the same `kid` must fail verification.
const WRONG_KEY_PEM: &str = include_str!("../../fixtures/jwt_ec_other_private.pem");
const JWKS_JSON: &str = include_str!("../../fixtures/provider_jwks.json");

/// The `kid` of the fake's signing key (tests/fixtures/provider_jwks.json).
pub const KID: &str = "fake-1";
/// The Microsoft `tid` used when a consent names none.
pub const DEFAULT_TENANT_ID: &str = "4f6c2b1e-8d3a-4e5f-9a7b-1c2d3e4f5a6b";
/// The subject of the consent given when no consent was queued for a provider.
pub const DEFAULT_SUBJECT: &str = "default-user";
/// The providers this fake serves, in `providers_toml()` order.
pub const PROVIDERS: [&str; 5] = ["google", "youtube", "microsoft", "notion", "acme"];

/// Authorization codes live 10 minutes (RFC 6749 §4.1.2 recommends at most that).
const CODE_LIFETIME_SECS: i64 = 600;

// ---------------------------------------------------------------------------------------------
// Public test API
// ---------------------------------------------------------------------------------------------

/// An endpoint of the fake, for counting, recording and faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Authorize,
    Token,
    Revoke,
    Userinfo,
    Jwks,
    Channels,
    Discovery,
}

/// What the user does on the provider's consent screen during one `/authorize` visit.
#[derive(Clone, Debug)]
pub struct Consent {
    /// Google/acme `sub`; Microsoft `oid`; Notion bot owner user id.
    pub subject: String,
    pub email: Option<String>,
    pub name: Option<String>,
    /// `None` grants everything requested; Google's granular consent lets users untick scopes.
    pub granted_scopes: Option<Vec<String>>,
    /// The user pressed "Cancel": the redirect carries `error=access_denied`.
    pub deny: bool,
    /// Microsoft `tid` (`None` = [`DEFAULT_TENANT_ID`]).
    pub tenant_id: Option<String>,
    /// Notion ids (`None` = derived from the subject, so a reconnect gets the same ones).
    pub bot_id: Option<String>,
    pub workspace_id: Option<String>,
    pub workspace_name: Option<String>,
    /// The YouTube channel (id "UC…", title) picked on the consent screen; `None` = no channel.
    pub channel: Option<(String, String)>,
    /// RFC 9207 `iss` in the authorization response. acme always sends its own issuer unless this
    /// overrides it; `Some("")` leaves `iss` out altogether (a missing-`iss` test).
    pub iss_in_response: Option<String>,
    /// Overrides the ID token `nonce` (bad-nonce tests).
    pub id_token_nonce: Option<String>,
    /// Signs the ID token with jwt_ec_other_private.pem under kid "fake-1" (bad signature).
    pub sign_with_wrong_key: bool,
}

impl Consent {
    /// A user who approves everything, with every identity detail derived from `subject`.
    pub fn user(subject: &str) -> Consent {
        let name = format!("User {subject}");
        Consent {
            subject: subject.to_owned(),
            email: Some(format!("{subject}@example.com")),
            name: Some(name.clone()),
            granted_scopes: None,
            deny: false,
            tenant_id: Some(DEFAULT_TENANT_ID.to_owned()),
            bot_id: Some(derived_uuid("bot", subject)),
            workspace_id: Some(derived_uuid("workspace", subject)),
            workspace_name: Some(format!("{name}'s Notion")),
            channel: Some((channel_id_for(subject), format!("{name}'s channel"))),
            iss_in_response: None,
            id_token_nonce: None,
            sign_with_wrong_key: false,
        }
    }

    /// A user who presses "Cancel" on the consent screen.
    pub fn denied(subject: &str) -> Consent {
        Consent {
            deny: true,
            ..Consent::user(subject)
        }
    }

    fn tenant(&self) -> String {
        self.tenant_id
            .clone()
            .unwrap_or_else(|| DEFAULT_TENANT_ID.to_owned())
    }

    fn bot_id(&self) -> String {
        self.bot_id
            .clone()
            .unwrap_or_else(|| derived_uuid("bot", &self.subject))
    }
}

/// Something going wrong on one request; faults are consumed one per request, in push order.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and body (JSON content type when the body parses as JSON).
    Status(u16, String),
    /// Wait, then handle the request normally.
    Latency(Duration),
    /// Never answer (the client's timeout fires).
    Hang,
    /// 200 with an HTML page instead of JSON (a proxy or captive portal).
    Malformed,
    /// 400 `invalid_grant`, shaped the way this provider shapes it.
    InvalidGrant,
    /// 200 `{"error":"invalid_grant",…}`: an error disguised as success (reference F6).
    ErrorIn200,
    /// 503 with `Retry-After: <seconds>` (RFC 7009 §2.2.1 asks revocation clients to retry).
    RetryAfter503(u64),
    /// Handle the request normally (a token request is answered, rotating refresh tokens),
    /// then wait before sending the answer: the provider's state changed, the client does not
    /// know yet.
    LatencyAfter(Duration),
    /// 200 JSON whose `Content-Length` promises more than this text; the connection closes
    /// after it (a proxy or provider dying mid-response).
    Truncated(String),
    /// 200 with a JSON-looking body of this many bytes: with `Content-Length` when
    /// `declared_length`, else chunked (the client only finds out by reading).
    Huge { bytes: usize, declared_length: bool },
    /// 400 `invalid_grant` whose `error_description` repeats every value of the request's body
    /// and its `Authorization` credentials (some servers echo the token they refuse:
    /// "Invalid refresh token: …").
    EchoSecrets,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub provider: String,
    pub endpoint: Endpoint,
    pub method: String,
    /// Header names are lower case.
    pub headers: Vec<(String, String)>,
    pub query: BTreeMap<String, String>,
    /// The form body, or the JSON body's top-level members flattened to strings.
    pub form: BTreeMap<String, String>,
    pub body_was_json: bool,
    /// When the request arrived (before any fault ran).
    pub at: Instant,
}

impl RecordedRequest {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// `grant_type` of a token request.
    pub fn grant_type(&self) -> Option<&str> {
        self.form.get("grant_type").map(String::as_str)
    }
}

/// Access or refresh token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Access,
    Refresh,
}

/// A token the fake issued, for tests that need the values the service holds.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub provider: String,
    pub subject: String,
    pub kind: TokenKind,
    pub token: String,
    pub active: bool,
    /// Spent by strict rotation (Notion, acme): replaying it revokes the grant.
    pub rotated: bool,
    pub issued_at: Instant,
}

/// The fake authorization server. Dropping it stops the server.
pub struct FakeProvider {
    shared: Arc<Shared>,
    browser: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeProvider {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> FakeProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake provider");
        let address = listener.local_addr().expect("fake provider address");
        let shared = Arc::new(Shared {
            base_url: format!("http://{address}"),
            signing_key: EncodingKey::from_ec_pem(SIGNING_KEY_PEM.as_bytes())
                .expect("provider_ec_private.pem"),
            wrong_key: EncodingKey::from_ec_pem(WRONG_KEY_PEM.as_bytes())
                .expect("jwt_ec_other_private.pem"),
            state: Mutex::new(Inner::default()),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fake provider server");
        });
        let browser = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("browser client");
        FakeProvider {
            shared,
            browser,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn client_id(&self, provider: &str) -> String {
        client_id(provider)
    }

    pub fn client_secret(&self, provider: &str) -> String {
        client_secret(provider)
    }

    /// The `iss` the fake puts in ID tokens (for Microsoft: of the default tenant).
    pub fn issuer(&self, provider: &str) -> String {
        self.shared.issuer(provider, DEFAULT_TENANT_ID)
    }

    /// Microsoft's pairwise `sub` for a user `oid` and this fake's Microsoft client.
    pub fn microsoft_sub(&self, oid: &str) -> String {
        pairwise_sub(oid, &client_id("microsoft"))
    }

    /// Content for OAUTH_PROVIDERS_FILE pointing every provider at this fake.
    pub fn providers_toml(&self) -> String {
        let base = &self.shared.base_url;
        let credentials = |provider: &str| {
            format!(
                "client_id = \"{}\"\nclient_secret = \"{}\"\n",
                client_id(provider),
                client_secret(provider)
            )
        };
        // YouTube is Google's authorization server with another client (reference §2 YouTube:
        // "Same Google OAuth"), so both share Google's issuer; the paths differ only so the
        // fake can tell them apart.
        let google_like = |provider: &str| {
            format!(
                "[providers.{provider}]\n\
                 authorization_url = \"{base}/{provider}/authorize\"\n\
                 token_url = \"{base}/{provider}/token\"\n\
                 revocation_url = \"{base}/{provider}/revoke\"\n\
                 userinfo_url = \"{base}/{provider}/userinfo\"\n\
                 jwks_url = \"{base}/{provider}/jwks\"\n\
                 issuer = \"{base}/google\"\n\
                 {}",
                credentials(provider)
            )
        };
        let mut toml = google_like("google");
        toml.push_str(&google_like("youtube"));
        toml.push_str(&format!("channels_url = \"{base}/youtube/v3/channels\"\n"));
        toml.push_str(&format!(
            "[providers.microsoft]\n\
             authorization_url = \"{base}/microsoft/common/oauth2/v2.0/authorize\"\n\
             token_url = \"{base}/microsoft/common/oauth2/v2.0/token\"\n\
             jwks_url = \"{base}/microsoft/common/discovery/v2.0/keys\"\n\
             issuer = \"{base}/microsoft/{{tenantid}}/v2.0\"\n\
             userinfo_url = \"{base}/microsoft/userinfo\"\n\
             {}",
            credentials("microsoft")
        ));
        toml.push_str(&format!(
            "[providers.notion]\n\
             authorization_url = \"{base}/notion/authorize\"\n\
             token_url = \"{base}/notion/token\"\n\
             revocation_url = \"{base}/notion/revoke\"\n\
             {}",
            credentials("notion")
        ));
        toml.push_str(&format!(
            "[providers.acme]\n\
             display_name = \"Acme\"\n\
             authorization_url = \"{base}/acme/authorize\"\n\
             token_url = \"{base}/acme/token\"\n\
             revocation_url = \"{base}/acme/revoke\"\n\
             userinfo_url = \"{base}/acme/userinfo\"\n\
             jwks_url = \"{base}/acme/jwks\"\n\
             issuer = \"{base}/acme\"\n\
             {}\
             token_auth_method = \"client_secret_basic\"\n\
             scopes = [\"openid\", \"email\", \"offline_access\"]\n\
             pkce = true\n\
             authorization_response_iss_parameter_supported = true\n",
            credentials("acme")
        ));
        toml
    }

    /// What the next visit of `/{provider}/authorize` does (a queue per provider; when it is
    /// empty, `Consent::user(DEFAULT_SUBJECT)`).
    pub fn push_consent(&self, provider: &str, consent: Consent) {
        self.shared
            .lock()
            .consents
            .entry(provider.to_owned())
            .or_default()
            .push_back(consent);
    }

    /// Restricts `provider` to pre-registered redirect URIs (exact match, RFC 9700 §4.1.3);
    /// until one is registered any absolute URI is accepted.
    pub fn register_redirect_uri(&self, provider: &str, redirect_uri: &str) {
        self.shared
            .lock()
            .redirect_uris
            .entry(provider.to_owned())
            .or_default()
            .push(redirect_uri.to_owned());
    }

    /// Drives a browser visit of the authorization URL (no redirect following) and returns the
    /// `Location` the fake redirects to. Panics when the fake shows an error page instead.
    pub async fn authorize(&self, authorization_url: &str) -> String {
        match self.try_authorize(authorization_url).await {
            Ok(location) => location,
            Err((status, body)) => {
                panic!("the fake provider did not redirect ({status}): {body}")
            }
        }
    }

    /// Like [`FakeProvider::authorize`], but returns an error page's status and body.
    pub async fn try_authorize(&self, authorization_url: &str) -> Result<String, (u16, String)> {
        assert!(
            authorization_url.starts_with(&self.shared.base_url),
            "{authorization_url} does not point at the fake provider {}",
            self.shared.base_url
        );
        let response = self
            .browser
            .get(authorization_url)
            .send()
            .await
            .expect("visit the authorization URL");
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(header::LOCATION)
                .expect("a redirect has a Location")
                .to_str()
                .expect("ASCII Location");
            return Ok(location.to_owned());
        }
        Err((status.as_u16(), response.text().await.unwrap_or_default()))
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// The requests received by one endpoint of one provider.
    pub fn requests_to(&self, provider: &str, endpoint: Endpoint) -> Vec<RecordedRequest> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|request| request.provider == provider && request.endpoint == endpoint)
            .cloned()
            .collect()
    }

    pub fn count(&self, provider: &str, endpoint: Endpoint) -> usize {
        self.count_where(|request| request.provider == provider && request.endpoint == endpoint)
    }

    /// Token requests of one provider with this `grant_type`.
    pub fn count_grant(&self, provider: &str, grant_type: &str) -> usize {
        self.count_where(|request| {
            request.provider == provider
                && request.endpoint == Endpoint::Token
                && request.grant_type() == Some(grant_type)
        })
    }

    /// Counts in place: the benchmark polls this while 100,000 requests are recorded, and
    /// copying them all on each poll took CPU from the service under test.
    fn count_where(&self, wanted: impl Fn(&RecordedRequest) -> bool) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|request| wanted(request))
            .count()
    }

    /// Queues a fault for the next request to (provider, endpoint); one is consumed per request.
    pub fn push_fault(&self, provider: &str, endpoint: Endpoint, fault: Fault) {
        self.shared
            .lock()
            .faults
            .entry((provider.to_owned(), endpoint))
            .or_default()
            .push_back(fault);
    }

    /// Adds `delay` to every request to (provider, endpoint) from now on (unlike a queued
    /// [`Fault::Latency`], which delays one request): a provider that is slow all the time.
    pub fn set_latency(&self, provider: &str, endpoint: Endpoint, delay: Duration) {
        self.shared
            .lock()
            .latencies
            .insert((provider.to_owned(), endpoint), delay);
    }

    /// Ends a standing latency set by [`FakeProvider::set_latency`].
    pub fn clear_latency(&self, provider: &str, endpoint: Endpoint) {
        self.shared
            .lock()
            .latencies
            .remove(&(provider.to_owned(), endpoint));
    }

    /// The most requests (any endpoint) this fake has handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.lock().max_in_flight
    }

    /// Time spent handling requests so far, summed over all requests (latency included):
    /// what a caller's time minus this is the caller's own overhead.
    pub fn handling_time(&self) -> Duration {
        self.shared.lock().handling_time
    }

    /// A grant as a completed code exchange with consent leaves it (refresh token included),
    /// for seeding many connections without running each flow. Returns the token response.
    pub fn mint_grant(&self, provider: &str, subject: &str, scopes: &[&str]) -> Value {
        let scopes: Vec<String> = scopes.iter().map(|scope| (*scope).to_owned()).collect();
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let grant = inner.grants.len();
        inner.grants.push(Grant {
            provider: provider.to_owned(),
            client_id: client_id(provider),
            consent: Consent::user(subject),
            scopes: scopes.clone(),
            revoked: false,
        });
        self.shared
            .issue(inner, Kind::of(provider), grant, &scopes, true, None)
    }

    /// Lifetime of access tokens issued from now on (`expires_in`, except for Notion, which
    /// never says: reference §2 Notion "AT lifetime is undocumented, with no expires_in").
    pub fn set_access_token_lifetime(&self, provider: &str, seconds: i64) {
        self.shared
            .lock()
            .lifetimes
            .insert(provider.to_owned(), seconds);
    }

    /// Makes every access token already issued for `provider` expire now (the provider ends a
    /// token early: reference R9 "tokens can die early, so treat a 401 as expiry").
    pub fn expire_access_tokens(&self, provider: &str) {
        let mut inner = self.shared.lock();
        let now = Utc::now();
        let grants: HashSet<usize> = inner
            .grants
            .iter()
            .enumerate()
            .filter(|(_, grant)| grant.provider == provider)
            .map(|(id, _)| id)
            .collect();
        for token in inner.tokens.values_mut() {
            if token.kind == TokenKind::Access && grants.contains(&token.grant) {
                token.expires_at = Some(now);
            }
        }
    }

    /// The user revoked the app's access at the provider (reference F10): every token of every
    /// grant of `subject` dies.
    pub fn revoke_all_grants(&self, provider: &str, subject: &str) {
        let mut inner = self.shared.lock();
        for grant in inner.grants.iter_mut() {
            if grant.provider == provider && grant.consent.subject == subject {
                grant.revoked = true;
            }
        }
        inner
            .consented
            .remove(&(client_id(provider), subject.to_owned()));
    }

    /// Whether an access or refresh token is still valid at the fake.
    pub fn is_token_active(&self, token: &str) -> bool {
        self.shared.lock().active(token, None).is_some()
    }

    /// Every token issued for `provider`, oldest first.
    pub fn issued_tokens(&self, provider: &str) -> Vec<IssuedToken> {
        let inner = self.shared.lock();
        inner
            .issued
            .iter()
            .filter_map(|value| {
                let token = &inner.tokens[value];
                let grant = &inner.grants[token.grant];
                (grant.provider == provider).then(|| IssuedToken {
                    provider: grant.provider.clone(),
                    subject: grant.consent.subject.clone(),
                    kind: token.kind,
                    token: value.clone(),
                    active: inner.active(value, None).is_some(),
                    rotated: token.rotated,
                    issued_at: token.issued_at,
                })
            })
            .collect()
    }

    /// Drops every queued fault (of every provider and endpoint).
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Every secret value this fake issued or was sent, named by kind, for leak tests: access,
    /// refresh and ID tokens, authorization codes, the PKCE verifiers of code exchanges, every
    /// client secret, and the credentials of `Authorization` headers it received.
    pub fn secrets(&self) -> Vec<(&'static str, String)> {
        let inner = self.shared.lock();
        let mut secrets = Vec::new();
        for value in &inner.issued {
            let kind = match inner.tokens[value].kind {
                TokenKind::Access => "access token",
                TokenKind::Refresh => "refresh token",
            };
            secrets.push((kind, value.clone()));
        }
        secrets.extend(
            inner
                .id_tokens
                .iter()
                .map(|token| ("ID token", token.clone())),
        );
        secrets.extend(
            inner
                .codes
                .keys()
                .map(|code| ("authorization code", code.clone())),
        );
        for request in &inner.requests {
            if let Some(verifier) = request.form.get("code_verifier") {
                secrets.push(("PKCE verifier", verifier.clone()));
            }
            if let Some((_, credentials)) = request
                .header("authorization")
                .and_then(|value| value.split_once(' '))
            {
                secrets.push(("Authorization header credentials", credentials.to_owned()));
            }
        }
        secrets.extend(
            PROVIDERS
                .iter()
                .map(|provider| ("client secret", client_secret(provider))),
        );
        secrets.sort();
        secrets.dedup();
        secrets
    }

    /// The JWKS the fake publishes (same key for every provider).
    pub fn jwks_json(&self) -> &'static str {
        JWKS_JSON
    }
}

pub fn client_id(provider: &str) -> String {
    format!("{provider}-client-id")
}

pub fn client_secret(provider: &str) -> String {
    format!("{provider}-client-secret")
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// How a provider behaves; YouTube is Google.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Google,
    Microsoft,
    Notion,
    Acme,
}

impl Kind {
    fn of(provider: &str) -> Kind {
        match provider {
            "google" | "youtube" => Kind::Google,
            "microsoft" => Kind::Microsoft,
            "notion" => Kind::Notion,
            _ => Kind::Acme,
        }
    }

    fn default_lifetime(self) -> i64 {
        match self {
            Kind::Google | Kind::Microsoft => 3599,
            Kind::Notion | Kind::Acme => 3600,
        }
    }
}

struct Shared {
    base_url: String,
    signing_key: EncodingKey,
    wrong_key: EncodingKey,
    state: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    requests: Vec<RecordedRequest>,
    /// Standing latency per (provider, endpoint) ([`FakeProvider::set_latency`]).
    latencies: HashMap<(String, Endpoint), Duration>,
    handling_time: Duration,
    /// Requests being handled now, and the most there ever were at once.
    in_flight: usize,
    max_in_flight: usize,
    consents: HashMap<String, VecDeque<Consent>>,
    faults: HashMap<(String, Endpoint), VecDeque<Fault>>,
    lifetimes: HashMap<String, i64>,
    redirect_uris: HashMap<String, Vec<String>>,
    codes: HashMap<String, Code>,
    /// Indexed by grant id; never removed, only revoked.
    grants: Vec<Grant>,
    tokens: HashMap<String, Token>,
    /// Token values in issue order.
    issued: Vec<String>,
    /// ID tokens in issue order.
    id_tokens: Vec<String>,
    /// Google: (client id, subject) pairs that already hold a grant, so the next code exchange
    /// without `prompt=consent` gets no refresh token (reference §2 Google "Refresh tokens").
    consented: HashSet<(String, String)>,
}

/// An authorization code and everything it is bound to.
struct Code {
    provider: String,
    client_id: String,
    redirect_uri: String,
    code_challenge: Option<String>,
    scopes: Vec<String>,
    nonce: Option<String>,
    consent: Consent,
    access_type_offline: bool,
    prompt_consent: bool,
    issued_at: DateTime<Utc>,
    used: bool,
    /// The grant its exchange created, revoked if the code is replayed (RFC 6749 §4.1.2).
    grant: Option<usize>,
}

/// One authorization: the tokens of one code exchange and its refreshes.
struct Grant {
    provider: String,
    client_id: String,
    consent: Consent,
    scopes: Vec<String>,
    revoked: bool,
}

struct Token {
    grant: usize,
    kind: TokenKind,
    expires_at: Option<DateTime<Utc>>,
    revoked: bool,
    /// A refresh token already exchanged under strict rotation (Notion, acme): using it again
    /// is reuse and kills the grant.
    rotated: bool,
    issued_at: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking assertion elsewhere must not hide the state from the test's report.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn issuer(&self, provider: &str, tenant: &str) -> String {
        let base = &self.base_url;
        match Kind::of(provider) {
            // reference §2 YouTube: "Same Google OAuth".
            Kind::Google => format!("{base}/google"),
            // reference §2 Microsoft: the issuer embeds the user's tenant id.
            Kind::Microsoft => format!("{base}/microsoft/{tenant}/v2.0"),
            Kind::Notion | Kind::Acme => format!("{base}/{provider}"),
        }
    }
}

impl Inner {
    /// The grant of `token` if it is live (of `kind`, when given).
    fn active(&self, token: &str, kind: Option<TokenKind>) -> Option<usize> {
        let record = self.tokens.get(token)?;
        let live = !record.revoked
            && !record.rotated
            && !self.grants[record.grant].revoked
            && kind.is_none_or(|kind| kind == record.kind)
            && record.expires_at.is_none_or(|at| Utc::now() < at);
        live.then_some(record.grant)
    }

    fn lifetime(&self, provider: &str) -> i64 {
        self.lifetimes
            .get(provider)
            .copied()
            .unwrap_or_else(|| Kind::of(provider).default_lifetime())
    }

    fn mint(&mut self, grant: usize, kind: TokenKind, value: String, lifetime: Option<i64>) {
        let expires_at = lifetime.map(|seconds| Utc::now() + chrono::Duration::seconds(seconds));
        self.tokens.insert(
            value.clone(),
            Token {
                grant,
                kind,
                expires_at,
                revoked: false,
                rotated: false,
                issued_at: Instant::now(),
            },
        );
        self.issued.push(value);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP front: routing, recording, faults
// ---------------------------------------------------------------------------------------------

struct Route {
    provider: String,
    endpoint: Endpoint,
}

fn parse_route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let route = |provider: &str, endpoint| {
        Some(Route {
            provider: provider.to_owned(),
            endpoint,
        })
    };
    match segments.as_slice() {
        ["youtube", "v3", "channels"] => route("youtube", Endpoint::Channels),
        ["acme", ".well-known", "openid-configuration"] => route("acme", Endpoint::Discovery),
        // Microsoft's real layout: /{tenant}/oauth2/v2.0/… with tenant common, organizations,
        // consumers or a tenant id (reference §2 Microsoft "Endpoints").
        ["microsoft", _tenant, "oauth2", "v2.0", "authorize"] => {
            route("microsoft", Endpoint::Authorize)
        }
        ["microsoft", _tenant, "oauth2", "v2.0", "token"] => route("microsoft", Endpoint::Token),
        ["microsoft", _tenant, "discovery", "v2.0", "keys"] => route("microsoft", Endpoint::Jwks),
        ["microsoft", _tenant, "v2.0", ".well-known", "openid-configuration"] => {
            route("microsoft", Endpoint::Discovery)
        }
        ["microsoft", "authorize" | "token" | "jwks"] => None,
        [provider, last] if PROVIDERS.contains(provider) => {
            let endpoint = match *last {
                "authorize" => Endpoint::Authorize,
                "token" => Endpoint::Token,
                "revoke" => Endpoint::Revoke,
                "userinfo" => Endpoint::Userinfo,
                "jwks" => Endpoint::Jwks,
                _ => return None,
            };
            route(provider, endpoint)
        }
        _ => None,
    }
}

/// Counts a request as in flight for as long as it lives (whichever way `handle` returns).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        let mut inner = shared.lock();
        inner.in_flight += 1;
        inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&shared);
    let Some(route) = parse_route(uri.path()) else {
        return (
            StatusCode::NOT_FOUND,
            "no such endpoint on the fake provider",
        )
            .into_response();
    };
    let body_was_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.to_ascii_lowercase().contains("json"));
    let form = if body_was_json {
        flatten_json(&body)
    } else {
        parse_pairs(&body)
    };
    let request = RecordedRequest {
        at: Instant::now(),
        provider: route.provider.clone(),
        endpoint: route.endpoint,
        method: method.as_str().to_owned(),
        headers: headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect(),
        query: parse_pairs(uri.query().unwrap_or_default().as_bytes()),
        form,
        body_was_json,
    };
    let began = Instant::now();
    let key = (route.provider.clone(), route.endpoint);
    let (fault, latency) = {
        let mut inner = shared.lock();
        inner.requests.push(request.clone());
        let fault = inner.faults.get_mut(&key).and_then(VecDeque::pop_front);
        (fault, inner.latencies.get(&key).copied())
    };
    if let Some(latency) = latency {
        tokio::time::sleep(latency).await;
    }
    if let Some(Fault::LatencyAfter(delay)) = fault {
        let response = shared.dispatch(&route, &request);
        tokio::time::sleep(delay).await;
        shared.lock().handling_time += began.elapsed();
        return response;
    }
    let response = match fault {
        Some(fault) => apply_fault(Kind::of(&route.provider), fault, &request).await,
        None => None,
    };
    let response = response.unwrap_or_else(|| shared.dispatch(&route, &request));
    shared.lock().handling_time += began.elapsed();
    response
}

/// A body of unknown length (chunked): hyper learns its end only by polling it.
fn unsized_body(bytes: impl Into<Bytes>) -> Body {
    Body::from_stream(Body::from(bytes.into()).into_data_stream())
}

/// The fault's response, or `None` to carry on with normal handling.
async fn apply_fault(kind: Kind, fault: Fault, request: &RecordedRequest) -> Option<Response> {
    Some(match fault {
        Fault::Status(status, body) => {
            let status = StatusCode::from_u16(status).expect("a valid HTTP status");
            let content_type = if serde_json::from_str::<Value>(&body).is_ok() {
                "application/json"
            } else if body.trim_start().starts_with('<') {
                "text/html"
            } else {
                "text/plain"
            };
            (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Fault::Latency(delay) => {
            tokio::time::sleep(delay).await;
            return None;
        }
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Fault::Malformed => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>Welcome to nginx!</h1>",
        )
            .into_response(),
        Fault::InvalidGrant => Reject::invalid_grant(kind, "refresh").into_response(kind),
        // reference F6: "HTTP 200 with {\"ok\":false,\"error\":…}", check for `error` whatever
        // the status.
        Fault::ErrorIn200 => json_response(
            StatusCode::OK,
            json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        ),
        Fault::EchoSecrets => {
            let mut echoed: Vec<String> = request.form.values().cloned().collect();
            echoed.extend(
                request
                    .header("authorization")
                    .and_then(|value| value.split_once(' '))
                    .map(|(_, credentials)| credentials.to_owned()),
            );
            json_response(
                StatusCode::BAD_REQUEST,
                json!({
                    "error": "invalid_grant",
                    "error_description": format!("Invalid request: {}", echoed.join(" ")),
                }),
            )
        }
        Fault::RetryAfter503(seconds) => {
            let mut response = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "temporarily_unavailable"}),
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds.to_string()).expect("digits"),
            );
            response
        }
        Fault::LatencyAfter(_) => return None,
        Fault::Truncated(partial) => {
            // A body of unknown length with a larger declared length: hyper sends the
            // header, runs out of body, and aborts the connection.
            let declared = partial.len() + 4096;
            let mut response = Response::new(unsized_body(partial));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(declared));
            response
        }
        Fault::Huge {
            bytes,
            declared_length,
        } => {
            let prefix = "{\"access_token\":\"";
            let mut text = String::with_capacity(bytes);
            text.push_str(prefix);
            text.extend(std::iter::repeat_n(
                'a',
                bytes.saturating_sub(prefix.len() + 2),
            ));
            text.push_str("\"}");
            let body = if declared_length {
                Body::from(text)
            } else {
                unsized_body(text)
            };
            let mut response = Response::new(body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    })
}

impl Shared {
    fn dispatch(&self, route: &Route, request: &RecordedRequest) -> Response {
        let kind = Kind::of(&route.provider);
        let expected_methods: &[&str] = match route.endpoint {
            Endpoint::Token | Endpoint::Revoke => &["POST"],
            // OIDC Core §5.3.1: the UserInfo endpoint takes GET and POST.
            Endpoint::Userinfo => &["GET", "POST"],
            _ => &["GET"],
        };
        if !expected_methods.contains(&request.method.as_str()) {
            return StatusCode::METHOD_NOT_ALLOWED.into_response();
        }
        match route.endpoint {
            Endpoint::Authorize => self.authorize(&route.provider, request),
            Endpoint::Token => self.token(&route.provider, request),
            // reference §2 Microsoft: "There is no revocation_endpoint".
            Endpoint::Revoke if kind == Kind::Microsoft => StatusCode::NOT_FOUND.into_response(),
            Endpoint::Revoke => self.revoke(&route.provider, request),
            // Notion is plain OAuth 2.0: no ID tokens, no UserInfo.
            Endpoint::Userinfo | Endpoint::Jwks if kind == Kind::Notion => {
                StatusCode::NOT_FOUND.into_response()
            }
            Endpoint::Userinfo => self.userinfo(&route.provider, request),
            Endpoint::Jwks => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                JWKS_JSON,
            )
                .into_response(),
            Endpoint::Channels => self.channels(request),
            Endpoint::Discovery => self.discovery(&route.provider),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /authorize
// ---------------------------------------------------------------------------------------------

impl Shared {
    fn authorize(&self, provider: &str, request: &RecordedRequest) -> Response {
        let kind = Kind::of(provider);
        let query = &request.query;
        let param = |name: &str| query.get(name).map(String::as_str);

        // RFC 6749 §4.1.2.1: with a bad client_id or redirect_uri the AS must NOT redirect; it
        // shows the user an error page.
        if param("client_id") != Some(client_id(provider).as_str()) {
            return error_page("invalid_client", "The OAuth client was not found.");
        }
        let Some(redirect_uri) = param("redirect_uri") else {
            return error_page(
                "invalid_request",
                "Missing required parameter: redirect_uri",
            );
        };
        let Ok(redirect) = Url::parse(redirect_uri) else {
            return error_page(
                "invalid_request",
                "Invalid parameter value for redirect_uri",
            );
        };
        let mut inner = self.lock();
        if let Some(registered) = inner.redirect_uris.get(provider) {
            if !registered.iter().any(|uri| uri == redirect_uri) {
                return error_page(
                    "redirect_uri_mismatch",
                    "The redirect URI is not registered.",
                );
            }
        }
        // Google has no default scope: a missing one is an error page, not a redirect.
        if kind == Kind::Google && param("scope").is_none() {
            return error_page("invalid_request", "Missing required parameter: scope");
        }

        let consent = inner
            .consents
            .get_mut(provider)
            .and_then(VecDeque::pop_front)
            .unwrap_or_else(|| Consent::user(DEFAULT_SUBJECT));
        // RFC 9207: acme advertises `authorization_response_iss_parameter_supported`, so it
        // always sends `iss`; the others only when a test injects one (mix-up tests, R4).
        let iss = match &consent.iss_in_response {
            Some(iss) if iss.is_empty() => None,
            Some(iss) => Some(iss.clone()),
            None if kind == Kind::Acme => Some(self.issuer(provider, "")),
            None => None,
        };
        let state = param("state").map(str::to_owned);
        let respond = |mut params: Vec<(&str, String)>| {
            if let Some(state) = &state {
                params.push(("state", state.clone()));
            }
            if let Some(iss) = &iss {
                params.push(("iss", iss.clone()));
            }
            redirect_to(&redirect, &params)
        };
        let error = |error: &str, description: &str| {
            let mut params = vec![
                ("error", error.to_owned()),
                ("error_description", description.to_owned()),
            ];
            if kind == Kind::Microsoft && error == "access_denied" {
                // Microsoft tells a cancelled consent apart with a subcode.
                params.push(("error_subcode", "cancel".to_owned()));
            }
            respond(params)
        };

        if param("response_type") != Some("code") {
            // reference R1: code flow only.
            return error(
                "unsupported_response_type",
                "Only response_type=code is supported.",
            );
        }
        // reference §2 Notion "Authorize": owner=user is part of the required request.
        if kind == Kind::Notion && param("owner") != Some("user") {
            return error("invalid_request", "owner must be \"user\".");
        }
        if kind == Kind::Microsoft && param("scope").is_none() {
            return error(
                "invalid_request",
                "AADSTS900144: The request body must contain the following parameter: 'scope'.",
            );
        }
        // reference §2 Notion "PKCE: reportedly unsupported": Notion ignores the parameters,
        // so it never checks a verifier either.
        let code_challenge = if kind == Kind::Notion {
            None
        } else {
            param("code_challenge").map(str::to_owned)
        };
        if let Some(challenge) = &code_challenge {
            // RFC 7636 §4.3: a missing method means `plain`, which reference R2 forbids.
            if param("code_challenge_method") != Some("S256") {
                return error(
                    "invalid_request",
                    "Only code_challenge_method=S256 is supported.",
                );
            }
            // RFC 7636 §4.2: BASE64URL(SHA256(verifier)) is always 43 characters.
            if challenge.len() != 43 || URL_SAFE_NO_PAD.decode(challenge).is_err() {
                return error("invalid_request", "Invalid code_challenge.");
            }
        } else if kind == Kind::Acme {
            // acme is strict OAuth 2.1 (§4.1.1): PKCE is mandatory.
            return error("invalid_request", "code_challenge is required.");
        }
        if consent.deny {
            return error("access_denied", "The user denied the request.");
        }

        let requested: Vec<String> = param("scope")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        // reference §2 Google "Granular consent lets users untick scopes".
        let scopes = consent.granted_scopes.clone().unwrap_or(requested);
        let prompt = param("prompt").unwrap_or_default();
        let code = match kind {
            Kind::Google => format!("4/0{}", random(60)),
            Kind::Microsoft => format!("1.A{}", random(80)),
            Kind::Notion => Uuid::new_v4().to_string(),
            Kind::Acme => random(32),
        };
        inner.codes.insert(
            code.clone(),
            Code {
                provider: provider.to_owned(),
                client_id: client_id(provider),
                redirect_uri: redirect_uri.to_owned(),
                code_challenge,
                scopes: scopes.clone(),
                nonce: param("nonce").map(str::to_owned),
                consent,
                access_type_offline: param("access_type") == Some("offline"),
                prompt_consent: prompt.split_whitespace().any(|p| p == "consent"),
                issued_at: Utc::now(),
                used: false,
                grant: None,
            },
        );
        drop(inner);

        let mut params = vec![("code", code)];
        match kind {
            // Google's callback carries extra parameters a client must ignore (reference R6).
            Kind::Google => {
                params.push(("scope", scopes.join(" ")));
                params.push(("authuser", "0".to_owned()));
                let shown = if prompt.is_empty() { "none" } else { prompt };
                params.push(("prompt", shown.to_owned()));
            }
            Kind::Microsoft => params.push(("session_state", Uuid::new_v4().to_string())),
            Kind::Notion | Kind::Acme => {}
        }
        respond(params)
    }
}

// ---------------------------------------------------------------------------------------------
// /token
// ---------------------------------------------------------------------------------------------

/// A token-endpoint error, rendered in the provider's own shape.
struct Reject {
    status: u16,
    error: &'static str,
    description: String,
    /// Microsoft's AADSTS code (reference §2 Microsoft "Errors": classify on `error_codes[]`).
    aadsts: u32,
}

impl Reject {
    fn new(status: u16, error: &'static str, description: &str, aadsts: u32) -> Reject {
        Reject {
            status,
            error,
            description: description.to_owned(),
            aadsts,
        }
    }

    fn invalid_request(description: &str) -> Reject {
        Reject::new(400, "invalid_request", description, 9002313)
    }

    /// `invalid_grant` as each provider words it; `what` is "code" or "refresh".
    fn invalid_grant(kind: Kind, what: &str) -> Reject {
        match (kind, what) {
            // Google's wording (reference §2 Google "Causes of invalid_grant").
            (Kind::Google, "code") => Reject::new(400, "invalid_grant", "Bad Request", 0),
            (Kind::Google, _) => Reject::new(
                400,
                "invalid_grant",
                "Token has been expired or revoked.",
                0,
            ),
            (Kind::Microsoft, _) => Reject::new(
                400,
                "invalid_grant",
                "The provided authorization code or refresh token has expired due to inactivity. \
                 Send a new interactive authorization request for this user and resource.",
                70008,
            ),
            (_, "code") => Reject::new(
                400,
                "invalid_grant",
                "The authorization code is invalid, expired or already used.",
                0,
            ),
            _ => Reject::new(
                400,
                "invalid_grant",
                "The refresh token is invalid, expired or revoked.",
                0,
            ),
        }
    }

    fn invalid_client(kind: Kind) -> Reject {
        let description = match kind {
            Kind::Google => "Unauthorized",
            Kind::Microsoft => {
                "Invalid client secret provided. Ensure the secret being sent in \
                                the request is the client secret value, not the client secret ID."
            }
            Kind::Notion | Kind::Acme => "Client authentication failed.",
        };
        Reject::new(401, "invalid_client", description, 7000215)
    }

    fn into_response(self, kind: Kind) -> Response {
        let status = StatusCode::from_u16(self.status).expect("a valid HTTP status");
        let body = match kind {
            // reference §2 Microsoft "Errors": AADSTS-prefixed text plus error_codes[] and ids.
            Kind::Microsoft => {
                let trace_id = Uuid::new_v4().to_string();
                let correlation_id = Uuid::new_v4().to_string();
                let timestamp = Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
                json!({
                    "error": self.error,
                    "error_description": format!(
                        "AADSTS{}: {} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}",
                        self.aadsts, self.description
                    ),
                    "error_codes": [self.aadsts],
                    "timestamp": timestamp,
                    "trace_id": trace_id,
                    "correlation_id": correlation_id,
                    "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.aadsts),
                })
            }
            Kind::Notion => json!({
                "error": self.error,
                "error_description": self.description,
                "request_id": Uuid::new_v4().to_string(),
            }),
            Kind::Google | Kind::Acme => {
                json!({"error": self.error, "error_description": self.description})
            }
        };
        let mut response = no_store(json_response(status, body));
        // RFC 6749 §5.2: a 401 invalid_client names the scheme the client should use.
        if status == StatusCode::UNAUTHORIZED && matches!(kind, Kind::Acme | Kind::Notion) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"oauth\""),
            );
        }
        response
    }
}

/// Notion's API-level error shape (not the OAuth one) for a missing `Notion-Version`.
fn notion_missing_version() -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({
            "object": "error",
            "status": 400,
            "code": "missing_version",
            "message": "Notion-Version header failed validation: Notion-Version header should be defined, instead was `undefined`.",
            "request_id": Uuid::new_v4().to_string(),
        }),
    )
}

/// Checks the client's credentials the way `provider` accepts them.
fn authenticate_client(
    kind: Kind,
    provider: &str,
    request: &RecordedRequest,
) -> Result<(), Reject> {
    let basic = request.header("authorization").and_then(|value| {
        let (scheme, credentials) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("basic")
            .then(|| credentials.trim().to_owned())
    });
    let post_secret = request.form.get("client_secret");
    // RFC 6749 §2.3: "The client MUST NOT use more than one authentication method in each
    // request" (reference R7).
    if basic.is_some() && post_secret.is_some() {
        return Err(Reject::invalid_request(
            "The client used more than one authentication method.",
        ));
    }
    let (id, secret) = if let Some(credentials) = basic {
        parse_basic(&credentials).ok_or_else(|| Reject::invalid_client(kind))?
    } else if let Some(secret) = post_secret {
        // reference §2 Notion "Token: HTTP Basic"; acme is declared client_secret_basic only.
        if matches!(kind, Kind::Notion | Kind::Acme) {
            return Err(Reject::invalid_client(kind));
        }
        let id = request.form.get("client_id").cloned().unwrap_or_default();
        (id, secret.clone())
    } else {
        return Err(Reject::invalid_client(kind));
    };
    if id == client_id(provider) && secret == client_secret(provider) {
        Ok(())
    } else {
        Err(Reject::invalid_client(kind))
    }
}

/// RFC 6749 §2.3.1: id and secret are form-urlencoded before base64.
fn parse_basic(credentials: &str) -> Option<(String, String)> {
    let decoded = String::from_utf8(STANDARD.decode(credentials).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |value: &str| {
        url::form_urlencoded::parse(format!("v={value}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

impl Shared {
    fn token(&self, provider: &str, request: &RecordedRequest) -> Response {
        let kind = Kind::of(provider);
        match kind {
            // reference §2 Notion "Token": a Notion-Version header and a JSON body.
            Kind::Notion => {
                if request.header("notion-version").is_none() {
                    return notion_missing_version();
                }
                if !request.body_was_json {
                    return Reject::invalid_request("The request body must be JSON.")
                        .into_response(kind);
                }
            }
            // RFC 6749 §4.1.3: application/x-www-form-urlencoded.
            Kind::Microsoft | Kind::Acme => {
                if request.body_was_json {
                    return Reject::invalid_request(
                        "The request body must be application/x-www-form-urlencoded.",
                    )
                    .into_response(kind);
                }
            }
            // Google's token endpoint also takes JSON bodies, so it stays lenient here; tests
            // assert `body_was_json` to hold the service to R7.
            Kind::Google => {}
        }
        if let Err(reject) = authenticate_client(kind, provider, request) {
            return reject.into_response(kind);
        }
        let result = match request.grant_type() {
            Some("authorization_code") => self.exchange_code(kind, provider, request),
            Some("refresh_token") => self.refresh(kind, provider, request),
            Some(_) => Err(Reject::new(
                400,
                "unsupported_grant_type",
                "Unsupported grant type.",
                70003,
            )),
            None => Err(Reject::invalid_request(
                "The request body must contain the following parameter: 'grant_type'.",
            )),
        };
        match result {
            Ok(body) => no_store(json_response(StatusCode::OK, body)),
            Err(reject) => reject.into_response(kind),
        }
    }

    fn exchange_code(
        &self,
        kind: Kind,
        provider: &str,
        request: &RecordedRequest,
    ) -> Result<Value, Reject> {
        let form = &request.form;
        let Some(code_value) = form.get("code") else {
            return Err(Reject::invalid_request("Missing required parameter: code"));
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(code) = inner.codes.get_mut(code_value) else {
            return Err(Reject::invalid_grant(kind, "code"));
        };
        if code.provider != provider || code.client_id != client_id(provider) {
            return Err(Reject::invalid_grant(kind, "code"));
        }
        if code.used {
            // RFC 6749 §4.1.2: a replayed code SHOULD revoke the tokens issued from it.
            let replayed_grant = code.grant;
            if let Some(grant) = replayed_grant {
                inner.grants[grant].revoked = true;
            }
            return Err(match kind {
                Kind::Microsoft => Reject::new(
                    400,
                    "invalid_grant",
                    "OAuth2 Authorization code was already redeemed, please retry with a new \
                     valid code or use an existing refresh token.",
                    54005,
                ),
                _ => Reject::invalid_grant(kind, "code"),
            });
        }
        if Utc::now() - code.issued_at > chrono::Duration::seconds(CODE_LIFETIME_SECS) {
            return Err(Reject::invalid_grant(kind, "code"));
        }
        // RFC 6749 §4.1.3: redirect_uri must be identical to the authorization request's.
        if form.get("redirect_uri") != Some(&code.redirect_uri) {
            return Err(match kind {
                // Google names this error itself.
                Kind::Google => Reject::new(400, "redirect_uri_mismatch", "Bad Request", 0),
                _ => Reject::new(
                    400,
                    "invalid_grant",
                    "The redirect URI does not match the one of the authorization request.",
                    50011,
                ),
            });
        }
        let verifier = form.get("code_verifier");
        match (&code.code_challenge, verifier) {
            (Some(_), None) => {
                return Err(Reject::new(
                    400,
                    "invalid_grant",
                    "Missing code verifier.",
                    50148,
                ))
            }
            (Some(challenge), Some(verifier)) => {
                let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
                // RFC 7636 §4.1: 43 to 128 characters.
                if !(43..=128).contains(&verifier.len()) || &computed != challenge {
                    return Err(Reject::new(
                        400,
                        "invalid_grant",
                        "Invalid code verifier.",
                        50148,
                    ));
                }
            }
            // RFC 9700 §2.1.1 / OAuth 2.1 §4.1.3: a verifier for a code issued without a
            // challenge is a PKCE downgrade; strict acme refuses it.
            (None, Some(_)) if kind == Kind::Acme => {
                return Err(Reject::invalid_grant(kind, "code"));
            }
            (None, _) => {}
        }

        code.used = true;
        let scopes = code.scopes.clone();
        let consent = code.consent.clone();
        let nonce = consent
            .id_token_nonce
            .clone()
            .or_else(|| code.nonce.clone());
        let offline = code.access_type_offline;
        let prompt_consent = code.prompt_consent;
        let client = code.client_id.clone();

        let with_refresh = match kind {
            // reference §2 Google "Refresh tokens": access_type=offline yields an RT only on the
            // first code exchange for a grant, or with prompt=consent.
            Kind::Google => {
                let key = (client.clone(), consent.subject.clone());
                let first = !inner.consented.contains(&key);
                inner.consented.insert(key);
                offline && (prompt_consent || first)
            }
            // reference §2 Microsoft "Scopes": offline_access is required to get an RT;
            // OIDC Core §11 says the same for acme.
            Kind::Microsoft | Kind::Acme => scopes.iter().any(|scope| scope == "offline_access"),
            Kind::Notion => {
                // reference §2 Notion: every (re)authorization mints a fresh pair and
                // "Reconnecting can invalidate the older RT" (composio#3606): the fake does.
                let bot_id = consent.bot_id();
                for grant in inner.grants.iter_mut() {
                    if grant.provider == provider && grant.consent.bot_id() == bot_id {
                        grant.revoked = true;
                    }
                }
                true
            }
        };
        let grant = inner.grants.len();
        inner.grants.push(Grant {
            provider: provider.to_owned(),
            client_id: client,
            consent,
            scopes: scopes.clone(),
            revoked: false,
        });
        if let Some(code) = inner.codes.get_mut(code_value) {
            code.grant = Some(grant);
        }
        Ok(self.issue(inner, kind, grant, &scopes, with_refresh, nonce))
    }

    fn refresh(
        &self,
        kind: Kind,
        provider: &str,
        request: &RecordedRequest,
    ) -> Result<Value, Reject> {
        let Some(refresh_token) = request.form.get("refresh_token") else {
            return Err(Reject::invalid_request(
                "Missing required parameter: refresh_token",
            ));
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(record) = inner.tokens.get(refresh_token) else {
            return Err(Reject::invalid_grant(kind, "refresh"));
        };
        let grant_id = record.grant;
        let grant = &inner.grants[grant_id];
        if record.kind != TokenKind::Refresh
            || grant.provider != provider
            || grant.client_id != client_id(provider)
        {
            return Err(Reject::invalid_grant(kind, "refresh"));
        }
        if record.rotated {
            // Strict rotation with reuse detection (reference F1: "reuse detection can revoke
            // the token family"; §2 Notion; RFC 9700 §4.14.2): the replay kills the whole grant,
            // the newest refresh token included.
            inner.grants[grant_id].revoked = true;
            return Err(Reject::invalid_grant(kind, "refresh"));
        }
        if inner
            .active(refresh_token, Some(TokenKind::Refresh))
            .is_none()
        {
            return Err(Reject::invalid_grant(kind, "refresh"));
        }
        let granted = inner.grants[grant_id].scopes.clone();
        // RFC 6749 §6: a refresh may narrow the scope but never widen it (reference R11).
        let scopes = match request.form.get("scope") {
            Some(scope) => {
                let asked: Vec<String> = scope.split_whitespace().map(str::to_owned).collect();
                // Microsoft refresh tokens are multi-resource, so it does not check.
                if kind != Kind::Microsoft && asked.iter().any(|scope| !granted.contains(scope)) {
                    return Err(Reject::new(
                        400,
                        "invalid_scope",
                        "The requested scope exceeds the granted scope.",
                        70011,
                    ));
                }
                asked
            }
            None => granted,
        };
        let with_refresh = match kind {
            // reference §2 Google: refresh responses omit refresh_token; the old one stays valid.
            Kind::Google => false,
            // reference §2 Microsoft: RTs "replace themselves with a fresh token upon every use
            // … doesn't revoke old refresh tokens": the old one is left untouched.
            Kind::Microsoft => true,
            // Strict rotation: the old one is spent.
            Kind::Notion | Kind::Acme => {
                if let Some(record) = inner.tokens.get_mut(refresh_token) {
                    record.rotated = true;
                }
                true
            }
        };
        // OIDC Core §12.2: a refreshed ID token carries no nonce.
        Ok(self.issue(inner, kind, grant_id, &scopes, with_refresh, None))
    }

    /// Mints the tokens of one token response for `grant` and renders the provider's body.
    fn issue(
        &self,
        inner: &mut Inner,
        kind: Kind,
        grant_id: usize,
        scopes: &[String],
        with_refresh: bool,
        nonce: Option<String>,
    ) -> Value {
        let provider = inner.grants[grant_id].provider.clone();
        let lifetime = inner.lifetime(&provider);
        let access_token = match kind {
            Kind::Google => format!("ya29.{}", random(120)),
            Kind::Microsoft => format!("EwB{}", random(120)),
            // reference §2 Notion: `ntn_` access tokens, `nrt_` refresh tokens.
            Kind::Notion => format!("ntn_{}", random(46)),
            Kind::Acme => format!("acme_at_{}", random(40)),
        };
        inner.mint(
            grant_id,
            TokenKind::Access,
            access_token.clone(),
            Some(lifetime),
        );
        let refresh_token = with_refresh.then(|| {
            let value = match kind {
                Kind::Google => format!("1//{}", random(100)),
                Kind::Microsoft => format!("1.A{}", random(120)),
                Kind::Notion => format!("nrt_{}", random(46)),
                Kind::Acme => format!("acme_rt_{}", random(40)),
            };
            inner.mint(grant_id, TokenKind::Refresh, value.clone(), None);
            value
        });
        let grant = &inner.grants[grant_id];
        let id_token = (kind != Kind::Notion && scopes.iter().any(|scope| scope == "openid"))
            .then(|| self.id_token(kind, grant, scopes, nonce.as_deref(), &access_token));
        inner.id_tokens.extend(id_token.clone());
        let scope = scopes.join(" ");

        let mut body = match kind {
            Kind::Google => json!({
                "access_token": access_token,
                "expires_in": lifetime,
                "scope": scope,
                "token_type": "Bearer",
            }),
            Kind::Microsoft => json!({
                "token_type": "Bearer",
                "scope": scope,
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": access_token,
            }),
            // reference §2 Notion "Response": no scopes, no expires_in, lower-case "bearer".
            Kind::Notion => {
                let consent = &grant.consent;
                json!({
                    "access_token": access_token,
                    "token_type": "bearer",
                    "bot_id": consent.bot_id(),
                    "workspace_id": consent.workspace_id.clone()
                        .unwrap_or_else(|| derived_uuid("workspace", &consent.subject)),
                    "workspace_name": consent.workspace_name.clone(),
                    "workspace_icon": Value::Null,
                    "owner": {
                        "type": "user",
                        "user": {
                            "object": "user",
                            "id": consent.subject,
                            "name": consent.name,
                            "avatar_url": Value::Null,
                            "type": "person",
                            "person": {"email": consent.email},
                        },
                    },
                    "duplicated_template_id": Value::Null,
                    "request_id": Uuid::new_v4().to_string(),
                })
            }
            Kind::Acme => json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": scope,
            }),
        };
        let object = body.as_object_mut().expect("a JSON object");
        if let Some(refresh_token) = refresh_token {
            object.insert("refresh_token".to_owned(), Value::String(refresh_token));
        }
        if let Some(id_token) = id_token {
            object.insert("id_token".to_owned(), Value::String(id_token));
        }
        body
    }

    fn id_token(
        &self,
        kind: Kind,
        grant: &Grant,
        scopes: &[String],
        nonce: Option<&str>,
        access_token: &str,
    ) -> String {
        let consent = &grant.consent;
        let now = Utc::now().timestamp();
        let mut claims = Map::new();
        let mut set = |name: &str, value: Value| {
            claims.insert(name.to_owned(), value);
        };
        let tenant = consent.tenant();
        set("iss", json!(self.issuer(&grant.provider, &tenant)));
        set("aud", json!(grant.client_id));
        set("iat", json!(now));
        set("exp", json!(now + 3600));
        match kind {
            Kind::Microsoft => {
                // reference §2 Microsoft "Claims": `sub` is pairwise per app; tid+oid is the key.
                set(
                    "sub",
                    json!(pairwise_sub(&consent.subject, &grant.client_id)),
                );
                set("oid", json!(consent.subject));
                set("tid", json!(tenant));
                set("ver", json!("2.0"));
                set("nbf", json!(now));
                if let Some(email) = &consent.email {
                    set("preferred_username", json!(email));
                }
            }
            _ => {
                set("sub", json!(consent.subject));
                set("azp", json!(grant.client_id));
                // OIDC Core §3.3.2.11: left half of SHA-256 of the access token.
                let digest = Sha256::digest(access_token.as_bytes());
                set("at_hash", json!(URL_SAFE_NO_PAD.encode(&digest[..16])));
            }
        }
        // Claims follow the granted scopes (OIDC Core §5.4).
        if has_scope(scopes, "email") {
            if let Some(email) = &consent.email {
                set("email", json!(email));
                if kind != Kind::Microsoft {
                    set("email_verified", json!(true));
                }
            }
        }
        if has_scope(scopes, "profile") || kind == Kind::Microsoft {
            if let Some(name) = &consent.name {
                set("name", json!(name));
            }
        }
        if let Some(nonce) = nonce {
            set("nonce", json!(nonce));
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(KID.to_owned());
        let key = if consent.sign_with_wrong_key {
            &self.wrong_key
        } else {
            &self.signing_key
        };
        jsonwebtoken::encode(&header, &Value::Object(claims), key).expect("sign the ID token")
    }
}

// ---------------------------------------------------------------------------------------------
// /revoke, /userinfo, /youtube/v3/channels, discovery
// ---------------------------------------------------------------------------------------------

impl Shared {
    fn revoke(&self, provider: &str, request: &RecordedRequest) -> Response {
        let kind = Kind::of(provider);
        match kind {
            Kind::Notion => {
                if request.header("notion-version").is_none() {
                    return notion_missing_version();
                }
                if !request.body_was_json {
                    return Reject::invalid_request("The request body must be JSON.")
                        .into_response(kind);
                }
            }
            Kind::Acme if request.body_was_json => {
                return Reject::invalid_request("RFC 7009 §2.1: a form-encoded body.")
                    .into_response(kind);
            }
            _ => {}
        }
        // Google's revocation endpoint needs no client authentication; the others do.
        if kind != Kind::Google {
            if let Err(reject) = authenticate_client(kind, provider, request) {
                return reject.into_response(kind);
            }
        }
        // Google documents `?token=` in the query string as well as the form body.
        let token = request
            .form
            .get("token")
            .or_else(|| request.query.get("token"));
        let Some(token) = token else {
            return Reject::invalid_request("Missing required parameter: token")
                .into_response(kind);
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        let grant = inner.active(token, None);
        match kind {
            Kind::Google => {
                let Some(grant) = grant.filter(|&id| Kind::of(&inner.grants[id].provider) == kind)
                else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "invalid_token", "error_description": "Token expired or revoked"}),
                    );
                };
                // reference §2 Google "Revocation: revoking either token revokes the grant": the
                // user's authorization of that client disappears with all its tokens.
                let client = inner.grants[grant].client_id.clone();
                let subject = inner.grants[grant].consent.subject.clone();
                for grant in inner.grants.iter_mut() {
                    if grant.client_id == client && grant.consent.subject == subject {
                        grant.revoked = true;
                    }
                }
                inner.consented.remove(&(client, subject));
                json_response(StatusCode::OK, json!({}))
            }
            // Revoking a Notion token removes the connection (its whole grant).
            Kind::Notion => {
                if let Some(grant) = grant.filter(|&id| inner.grants[id].provider == provider) {
                    inner.grants[grant].revoked = true;
                }
                json_response(StatusCode::OK, json!({}))
            }
            // RFC 7009 §2.1: revoking a refresh token SHOULD revoke the grant's access tokens;
            // revoking an access token revokes just it. §2.2: 200 even for unknown tokens.
            _ => {
                if let Some(grant) = grant.filter(|&id| inner.grants[id].provider == provider) {
                    let record = inner.tokens.get_mut(token).expect("an active token exists");
                    if record.kind == TokenKind::Refresh {
                        inner.grants[grant].revoked = true;
                    } else {
                        record.revoked = true;
                    }
                }
                StatusCode::OK.into_response()
            }
        }
    }

    /// The grant behind the request's bearer token, if live and usable at `provider`.
    fn bearer_grant(&self, provider: &str, request: &RecordedRequest) -> Option<usize> {
        let value = request.header("authorization")?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let inner = self.lock();
        let grant = inner.active(token.trim(), Some(TokenKind::Access))?;
        let issued_by = &inner.grants[grant].provider;
        // Google and YouTube are one authorization server (reference §2 YouTube).
        let usable = issued_by == provider
            || (Kind::of(provider) == Kind::Google && Kind::of(issued_by) == Kind::Google);
        usable.then_some(grant)
    }

    fn userinfo(&self, provider: &str, request: &RecordedRequest) -> Response {
        let kind = Kind::of(provider);
        let Some(grant) = self.bearer_grant(provider, request) else {
            // RFC 6750 §3.1 / OIDC Core §5.3.3.
            let mut response = match kind {
                Kind::Microsoft => json_response(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": {"code": "InvalidAuthenticationToken", "message": "Access token has expired or is not yet valid."}}),
                ),
                Kind::Google => json_response(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "invalid_request", "error_description": "Invalid Credentials"}),
                ),
                _ => json_response(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "invalid_token", "error_description": "The access token is invalid."}),
                ),
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            return response;
        };
        let inner = self.lock();
        let grant = &inner.grants[grant];
        let consent = &grant.consent;
        let mut claims = Map::new();
        // OIDC Core §5.3.2: the same `sub` as the ID token (pairwise for Microsoft).
        let sub = if kind == Kind::Microsoft {
            pairwise_sub(&consent.subject, &grant.client_id)
        } else {
            consent.subject.clone()
        };
        claims.insert("sub".to_owned(), json!(sub));
        if has_scope(&grant.scopes, "email") {
            if let Some(email) = &consent.email {
                claims.insert("email".to_owned(), json!(email));
                if kind != Kind::Microsoft {
                    claims.insert("email_verified".to_owned(), json!(true));
                }
            }
        }
        if has_scope(&grant.scopes, "profile") || kind == Kind::Microsoft {
            if let Some(name) = &consent.name {
                claims.insert("name".to_owned(), json!(name));
            }
        }
        json_response(StatusCode::OK, Value::Object(claims))
    }

    /// YouTube Data API `channels.list` (reference §2 YouTube "Identity").
    fn channels(&self, request: &RecordedRequest) -> Response {
        let Some(grant) = self.bearer_grant("youtube", request) else {
            return youtube_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, \
                 login cookie or other valid authentication credential.",
                "authError",
                "UNAUTHENTICATED",
            );
        };
        let inner = self.lock();
        let grant = &inner.grants[grant];
        let readable = grant.scopes.iter().any(|scope| {
            let short = scope.rsplit('/').next().unwrap_or(scope);
            matches!(short, "youtube" | "youtube.readonly" | "youtube.force-ssl")
        });
        if !readable {
            return youtube_error(
                403,
                "Request had insufficient authentication scopes.",
                "insufficientPermissions",
                "PERMISSION_DENIED",
            );
        }
        let Some(part) = request.query.get("part") else {
            return youtube_error(
                400,
                "Required parameter: part",
                "required",
                "INVALID_ARGUMENT",
            );
        };
        if request.query.get("mine").map(String::as_str) != Some("true") {
            return youtube_error(
                400,
                "No filter selected. Expected one of: mine, id, forUsername, managedByMe, \
                 categoryId, forHandle",
                "missingRequiredParameter",
                "INVALID_ARGUMENT",
            );
        }
        let parts: Vec<&str> = part.split(',').map(str::trim).collect();
        // Only the channel picked on the consent screen; none → empty `items`.
        let items: Vec<Value> = grant
            .consent
            .channel
            .iter()
            .map(|(id, title)| {
                let mut item = json!({"kind": "youtube#channel", "etag": random(27), "id": id});
                if parts.contains(&"snippet") {
                    item["snippet"] = json!({
                        "title": title,
                        "description": "",
                        "publishedAt": "2015-05-01T12:00:00Z",
                    });
                }
                item
            })
            .collect();
        json_response(
            StatusCode::OK,
            json!({
                "kind": "youtube#channelListResponse",
                "etag": random(27),
                "pageInfo": {"totalResults": items.len(), "resultsPerPage": 5},
                "items": items,
            }),
        )
    }

    fn discovery(&self, provider: &str) -> Response {
        let base = &self.base_url;
        let document = if provider == "acme" {
            json!({
                "issuer": format!("{base}/acme"),
                "authorization_endpoint": format!("{base}/acme/authorize"),
                "token_endpoint": format!("{base}/acme/token"),
                "revocation_endpoint": format!("{base}/acme/revoke"),
                "userinfo_endpoint": format!("{base}/acme/userinfo"),
                "jwks_uri": format!("{base}/acme/jwks"),
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "scopes_supported": ["openid", "email", "profile", "offline_access"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                "revocation_endpoint_auth_methods_supported": ["client_secret_basic"],
                "authorization_response_iss_parameter_supported": true,
            })
        } else {
            // reference §2 Microsoft "Discovery quirks": the `common` issuer is a template, and
            // there is no revocation_endpoint nor code_challenge_methods_supported.
            json!({
                "issuer": format!("{base}/microsoft/{{tenantid}}/v2.0"),
                "authorization_endpoint": format!("{base}/microsoft/common/oauth2/v2.0/authorize"),
                "token_endpoint": format!("{base}/microsoft/common/oauth2/v2.0/token"),
                "userinfo_endpoint": format!("{base}/microsoft/userinfo"),
                "jwks_uri": format!("{base}/microsoft/common/discovery/v2.0/keys"),
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
            })
        };
        json_response(StatusCode::OK, document)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Google's API error envelope, as the YouTube Data API sends it.
fn youtube_error(status: u16, message: &str, reason: &str, code_name: &str) -> Response {
    let status = StatusCode::from_u16(status).expect("a valid HTTP status");
    let mut response = json_response(
        status,
        json!({
            "error": {
                "code": status.as_u16(),
                "message": message,
                "errors": [{"message": message, "domain": "global", "reason": reason}],
                "status": code_name,
            }
        }),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(
                "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
            ),
        );
    }
    response
}

/// What a provider shows the user instead of redirecting (RFC 6749 §4.1.2.1).
fn error_page(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        format!("<html><body><h1>Error 400: {error}</h1><p>{description}</p></body></html>"),
    )
        .into_response()
}

fn redirect_to(redirect: &Url, params: &[(&str, String)]) -> Response {
    let mut location = redirect.clone();
    {
        let mut pairs = location.query_pairs_mut();
        for (name, value) in params {
            pairs.append_pair(name, value);
        }
    }
    (
        StatusCode::FOUND,
        [(header::LOCATION, location.to_string())],
    )
        .into_response()
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

/// RFC 6749 §5.1: token responses are not cached.
fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn parse_pairs(bytes: &[u8]) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(bytes).into_owned().collect()
}

fn flatten_json(bytes: &[u8]) -> BTreeMap<String, String> {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(bytes) else {
        return BTreeMap::new();
    };
    object
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(text) => (key, text),
            other => (key, other.to_string()),
        })
        .collect()
}

/// Whether `scopes` holds an OIDC scope, also in Google's URL spelling
/// (`https://www.googleapis.com/auth/userinfo.email`).
fn has_scope(scopes: &[String], scope: &str) -> bool {
    let url_suffix = format!("/userinfo.{scope}");
    scopes
        .iter()
        .any(|granted| granted == scope || granted.ends_with(&url_suffix))
}

fn random(length: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(length)
        .map(char::from)
        .collect()
}

fn derived_uuid(salt: &str, seed: &str) -> String {
    let digest = Sha256::digest(format!("{salt}:{seed}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// "UC" followed by 22 characters, like a real channel id.
fn channel_id_for(subject: &str) -> String {
    let digest = Sha256::digest(format!("channel:{subject}").as_bytes());
    format!("UC{}", &URL_SAFE_NO_PAD.encode(digest)[..22])
}

/// A stable pairwise identifier per (user, application), like Microsoft's `sub`.
fn pairwise_sub(oid: &str, client_id: &str) -> String {
    let digest = Sha256::digest(format!("pairwise:{oid}:{client_id}").as_bytes());
    URL_SAFE_NO_PAD.encode(digest)[..43].to_owned()
}
