//! Authentication of callers: every 401 case, each key source, algorithm confusion.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use axum::http::StatusCode;
use axum::routing::get;
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use oauth_manager::clock::Clock;
use serde_json::{json, Value};

use crate::support::{
    claims, problem, sign_hs256, sign_hs256_with, sign_pem, spawn_app, spawn_app_with, TestApp,
};

const PROVIDERS: &str = "/api/v1/oauth/providers";
const RSA_PRIVATE: &str = include_str!("../fixtures/jwt_rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("../fixtures/jwt_rsa_public.pem");
const EC_PRIVATE: &str = include_str!("../fixtures/jwt_ec_private.pem");
const EC_PUBLIC: &str = include_str!("../fixtures/jwt_ec_public.pem");
const EC_OTHER_PRIVATE: &str = include_str!("../fixtures/jwt_ec_other_private.pem");
const JWKS: &str = include_str!("../fixtures/jwks.json");

async fn assert_unauthorized(response: reqwest::Response, expected_code: &str) {
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (status, body) = problem(response).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], expected_code, "{body}");
    assert!(
        challenge.starts_with("Bearer"),
        "WWW-Authenticate: {challenge:?}"
    );
    if expected_code != "missing_token" {
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    }
}

#[tokio::test]
async fn missing_or_non_bearer_credentials_get_401_with_a_bare_challenge() {
    let app = spawn_app().await;
    let response = app
        .http
        .get(app.url(PROVIDERS))
        .send()
        .await
        .expect("request");
    assert_unauthorized(response, "missing_token").await;
    let basic = app
        .http
        .get(app.url(PROVIDERS))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .expect("request");
    assert_unauthorized(basic, "missing_token").await;
    let empty = app
        .http
        .get(app.url(PROVIDERS))
        .header("authorization", "Bearer ")
        .send()
        .await
        .expect("request");
    assert_unauthorized(empty, "missing_token").await;
}

#[tokio::test]
async fn malformed_forged_and_incomplete_tokens_get_401() {
    let app = spawn_app().await;
    let now = app.clock.now();
    let mut no_exp = claims("alice", &["user"], now);
    no_exp.as_object_mut().expect("object").remove("exp");
    let mut no_sub = claims("alice", &["user"], now);
    no_sub.as_object_mut().expect("object").remove("sub");
    let cases = [
        ("not.a.jwt".to_owned(), "invalid_token"),
        ("garbage".to_owned(), "invalid_token"),
        (
            sign_hs256_with(
                &claims("alice", &["admin"], now),
                b"another-secret-another-secret-0123",
            ),
            "invalid_token",
        ),
        (sign_hs256(&no_exp), "invalid_token"),
        (sign_hs256(&no_sub), "invalid_token"),
        (
            sign_hs256(&json!({"sub": "", "exp": now.timestamp() + 60})),
            "invalid_token",
        ),
        ("x".repeat(9000), "invalid_token"),
    ];
    for (token, code) in cases {
        assert_unauthorized(app.get(PROVIDERS, &token).await, code).await;
    }
}

#[tokio::test]
async fn alg_none_is_rejected() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let app = spawn_app().await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims("alice", &["admin"], app.clock.now()).to_string());
    for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
        assert_unauthorized(app.get(PROVIDERS, &token).await, "invalid_token").await;
    }
}

#[tokio::test]
async fn expiry_and_not_before_follow_the_injected_clock_with_leeway() {
    let app = spawn_app().await;
    let now = app.clock.now();
    let token = sign_hs256(
        &json!({"sub": "alice", "roles": ["user"], "exp": (now + Duration::seconds(60)).timestamp()}),
    );
    assert_eq!(app.get(PROVIDERS, &token).await.status(), 200);
    // 60 s to expiry + 30 s leeway: still fine at +80 s, refused at +100 s.
    app.clock.advance(Duration::seconds(80));
    assert_eq!(app.get(PROVIDERS, &token).await.status(), 200);
    app.clock.advance(Duration::seconds(20));
    assert_unauthorized(app.get(PROVIDERS, &token).await, "token_expired").await;

    let now = app.clock.now();
    let future = sign_hs256(&json!({
        "sub": "alice", "exp": (now + Duration::hours(2)).timestamp(),
        "nbf": (now + Duration::hours(1)).timestamp(),
    }));
    assert_unauthorized(app.get(PROVIDERS, &future).await, "invalid_token").await;
    let issued_in_future = sign_hs256(&json!({
        "sub": "alice", "exp": (now + Duration::hours(2)).timestamp(),
        "iat": (now + Duration::minutes(10)).timestamp(),
    }));
    assert_unauthorized(app.get(PROVIDERS, &issued_in_future).await, "invalid_token").await;
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_when_configured() {
    let app = spawn_app_with(&[
        ("OAUTH_JWT_ISSUER", "https://auth.example.test"),
        ("OAUTH_JWT_AUDIENCE", "oauth-manager"),
    ])
    .await;
    let now = app.clock.now();
    let with = |iss: &str, aud: Value| {
        let mut c = claims("alice", &["user"], now);
        c["iss"] = json!(iss);
        c["aud"] = aud;
        sign_hs256(&c)
    };
    let good = with("https://auth.example.test", json!("oauth-manager"));
    assert_eq!(app.get(PROVIDERS, &good).await.status(), 200);
    let listed = with(
        "https://auth.example.test",
        json!(["other", "oauth-manager"]),
    );
    assert_eq!(app.get(PROVIDERS, &listed).await.status(), 200);
    let wrong_aud = with("https://auth.example.test", json!("another-service"));
    assert_unauthorized(app.get(PROVIDERS, &wrong_aud).await, "invalid_token").await;
    let wrong_iss = with("https://evil.example.test", json!("oauth-manager"));
    assert_unauthorized(app.get(PROVIDERS, &wrong_iss).await, "invalid_token").await;
    let no_aud = sign_hs256(&claims("alice", &["user"], now));
    assert_unauthorized(app.get(PROVIDERS, &no_aud).await, "invalid_token").await;
}

#[tokio::test]
async fn rs256_and_es256_public_keys_verify_and_refuse_algorithm_swaps() {
    for (public, private, algorithm) in [
        (RSA_PUBLIC, RSA_PRIVATE, Algorithm::RS256),
        (EC_PUBLIC, EC_PRIVATE, Algorithm::ES256),
    ] {
        let app =
            spawn_app_with(&[("OAUTH_JWT_SECRET", ""), ("OAUTH_JWT_PUBLIC_KEY", public)]).await;
        let now = app.clock.now();
        let good = sign_pem(&claims("alice", &["user"], now), algorithm, private, None);
        assert_eq!(
            app.get(PROVIDERS, &good).await.status(),
            200,
            "{algorithm:?}"
        );
        // HS/RS confusion: an HS256 token whose HMAC key is the public key's PEM text.
        let swapped = sign_hs256_with(&claims("alice", &["admin"], now), public.as_bytes());
        assert_unauthorized(app.get(PROVIDERS, &swapped).await, "invalid_token").await;
        let hs = sign_hs256(&claims("alice", &["admin"], now));
        assert_unauthorized(app.get(PROVIDERS, &hs).await, "invalid_token").await;
    }
}

/// A JWKS endpoint whose document the test can replace (key rotation at the IdP); an empty
/// document answers 503 (the IdP is down). Returns the URL and the number of fetches served.
async fn serve_jwks(document: Arc<RwLock<String>>) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let router = axum::Router::new().route(
        "/jwks",
        get(move || {
            let document = document.clone();
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let body = document.read().expect("lock").clone();
                let status = if body.is_empty() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                (status, body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await.ok() });
    (url, hits)
}

#[tokio::test]
async fn jwks_keys_verify_and_an_unknown_kid_triggers_a_refetch() {
    let full: Value = serde_json::from_str(JWKS).expect("jwks");
    let only_rsa = json!({"keys": [full["keys"][1].clone()]});
    let document = Arc::new(RwLock::new(only_rsa.to_string()));
    let (url, _) = serve_jwks(document.clone()).await;
    let app = spawn_app_with(&[("OAUTH_JWT_SECRET", ""), ("OAUTH_JWT_JWKS_URL", &url)]).await;
    let now = app.clock.now();
    let rsa = alice_user(now, Algorithm::RS256, RSA_PRIVATE, Some("rsa-1"));
    assert_eq!(app.get(PROVIDERS, &rsa).await.status(), 200);

    // The IdP rotates in a new EC key: a token naming it must trigger a refetch.
    let ec = alice_user(now, Algorithm::ES256, EC_PRIVATE, Some("ec-1"));
    *document.write().expect("lock") = full.to_string();
    app.clock.advance(Duration::seconds(11));
    assert_eq!(app.get(PROVIDERS, &ec).await.status(), 200);

    let forged = alice_user(now, Algorithm::ES256, EC_OTHER_PRIVATE, Some("ec-1"));
    assert_unauthorized(app.get(PROVIDERS, &forged).await, "invalid_token").await;
    let unknown = alice_user(now, Algorithm::ES256, EC_PRIVATE, Some("nope"));
    assert_unauthorized(app.get(PROVIDERS, &unknown).await, "invalid_token").await;
    // An RSA key announced as RS256 must not verify a token claiming another algorithm, even
    // when the token names that key (the kid is what gets it past the key lookup).
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".to_owned());
    let hs = encode(
        &header,
        &claims("alice", &["admin"], now),
        &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
    )
    .expect("sign");
    assert_unauthorized(app.get(PROVIDERS, &hs).await, "invalid_token").await;
}

#[tokio::test]
async fn a_key_withdrawn_from_the_jwks_stops_verifying_tokens_verified_moments_ago() {
    let full: Value = serde_json::from_str(JWKS).expect("jwks");
    let (app, document, _) = jwks_app(&full.to_string()).await;
    let now = app.clock.now();
    let rsa = alice_user(now, Algorithm::RS256, RSA_PRIVATE, Some("rsa-1"));
    assert_eq!(app.get(PROVIDERS, &rsa).await.status(), 200);
    assert_eq!(app.get(PROVIDERS, &rsa).await.status(), 200);

    // The IdP withdraws the RSA key; a token naming an unknown kid makes the service refetch.
    let without_rsa = json!({"keys": [full["keys"][0].clone()]});
    *document.write().expect("lock") = without_rsa.to_string();
    app.clock.advance(Duration::seconds(11));
    let unknown = alice_user(now, Algorithm::ES256, EC_PRIVATE, Some("nope"));
    assert_unauthorized(app.get(PROVIDERS, &unknown).await, "invalid_token").await;
    // Verified 11 s ago, but under a key set that is gone.
    assert_unauthorized(app.get(PROVIDERS, &rsa).await, "invalid_token").await;
}

/// A token for `alice` with the `user` role, signed by `key` and naming `kid`.
fn alice_user(now: DateTime<Utc>, algorithm: Algorithm, key: &str, kid: Option<&str>) -> String {
    sign_pem(&claims("alice", &["user"], now), algorithm, key, kid)
}

/// A JWKS app whose IdP serves `document` (empty: down), with the fetch counter.
async fn jwks_app(document: &str) -> (TestApp, Arc<RwLock<String>>, Arc<AtomicUsize>) {
    let document = Arc::new(RwLock::new(document.to_owned()));
    let (url, hits) = serve_jwks(document.clone()).await;
    let app = spawn_app_with(&[("OAUTH_JWT_SECRET", ""), ("OAUTH_JWT_JWKS_URL", &url)]).await;
    (app, document, hits)
}

#[tokio::test]
async fn a_known_kid_is_served_from_the_cache_without_refetching() {
    let (app, _, hits) = jwks_app(JWKS).await;
    let token = sign_pem(
        &claims("alice", &["user"], app.clock.now()),
        Algorithm::RS256,
        RSA_PRIVATE,
        Some("rsa-1"),
    );
    for _ in 0..3 {
        assert_eq!(app.get(PROVIDERS, &token).await.status(), 200);
        // Past the unknown-kid cooldown, within the cache's lifetime.
        app.clock.advance(Duration::seconds(20));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "one fetch for all requests");
}

#[tokio::test]
async fn a_failing_jwks_endpoint_is_asked_once_per_cooldown() {
    let (app, document, hits) = jwks_app("").await;
    let token = sign_pem(
        &claims("alice", &["user"], app.clock.now()),
        Algorithm::RS256,
        RSA_PRIVATE,
        Some("rsa-1"),
    );
    for _ in 0..5 {
        let (status, body) = problem(app.get(PROVIDERS, &token).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (503, Some("jwks_unavailable"))
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "failures start the cooldown too"
    );
    // The IdP recovers: the next attempt after the cooldown succeeds.
    *document.write().expect("lock") = JWKS.to_owned();
    app.clock.advance(Duration::seconds(11));
    assert_eq!(app.get(PROVIDERS, &token).await.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // Down again once the cache is stale: the stale key keeps serving, one attempt per
    // cooldown, and an unknown kid is refused without another fetch.
    *document.write().expect("lock") = String::new();
    app.clock.advance(Duration::minutes(11));
    let token = sign_pem(
        &claims("alice", &["user"], app.clock.now()),
        Algorithm::RS256,
        RSA_PRIVATE,
        Some("rsa-1"),
    );
    for _ in 0..3 {
        assert_eq!(app.get(PROVIDERS, &token).await.status(), 200);
    }
    let unknown = sign_pem(
        &claims("alice", &["user"], app.clock.now()),
        Algorithm::ES256,
        EC_PRIVATE,
        Some("nope"),
    );
    let (status, _) = problem(app.get(PROVIDERS, &unknown).await).await;
    assert_eq!(status, 503);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_oversized_jwks_document_is_refused() {
    let padding = "x".repeat(300 * 1024);
    let (app, _, _) = jwks_app(&format!(r#"{{"keys": [], "padding": "{padding}"}}"#)).await;
    let token = sign_pem(
        &claims("alice", &["user"], app.clock.now()),
        Algorithm::RS256,
        RSA_PRIVATE,
        Some("rsa-1"),
    );
    let (status, body) = problem(app.get(PROVIDERS, &token).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("jwks_unavailable"))
    );
}

#[tokio::test]
async fn unreachable_jwks_is_a_503_not_a_401() {
    let app = spawn_app_with(&[
        ("OAUTH_JWT_SECRET", ""),
        ("OAUTH_JWT_JWKS_URL", "http://127.0.0.1:9/jwks"),
    ])
    .await;
    let token = sign_pem(
        &claims("alice", &["user"], app.clock.now()),
        Algorithm::ES256,
        EC_PRIVATE,
        Some("ec-1"),
    );
    let (status, body) = problem(app.get(PROVIDERS, &token).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("jwks_unavailable"))
    );
}

#[tokio::test]
async fn roles_come_from_the_configured_claim_path() {
    let app = spawn_app_with(&[("OAUTH_JWT_ROLES_CLAIM", "realm_access.roles")]).await;
    let now = app.clock.now();
    let mut nested = claims("alice", &[], now);
    nested["realm_access"] = json!({"roles": ["user"]});
    assert_eq!(
        app.get("/api/v1/oauth/integrations", &sign_hs256(&nested))
            .await
            .status(),
        200
    );
    // The default claim is ignored when another is configured.
    let flat = sign_hs256(&claims("alice", &["user"], now));
    assert_eq!(
        app.get("/api/v1/oauth/integrations", &flat).await.status(),
        403
    );
}

/// Keys or key locations the token names itself (`jwk`, `jku`, `x5u`) are never used, and an
/// odd `kid` is just an unknown key; `alg: none` and HS256 keyed with a public key fail against
/// JWKS keys as against a static one.
#[tokio::test]
async fn keys_named_by_the_token_itself_are_never_trusted() {
    use jsonwebtoken::jwk::Jwk;
    let (app, _, hits) = jwks_app(JWKS).await;
    let (attacker_jwks, attacker_hits) = serve_jwks(Arc::new(RwLock::new(JWKS.to_owned()))).await;
    let now = app.clock.now();
    let attacker_key = EncodingKey::from_ec_pem(EC_OTHER_PRIVATE.as_bytes()).expect("key");
    let forged = |kid: Option<&str>, embed: bool| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        header.jku = Some(attacker_jwks.clone());
        header.x5u = Some(attacker_jwks.clone());
        if embed {
            header.jwk =
                Some(Jwk::from_encoding_key(&attacker_key, Algorithm::ES256).expect("jwk"));
        }
        encode(&header, &claims("alice", &["admin"], now), &attacker_key).expect("sign")
    };
    for (kid, embed) in [
        (Some("ec-1"), true),
        (Some("ec-1"), false),
        (None, true),
        (Some("../../../../etc/passwd"), true),
        (Some(&"k".repeat(5000)), false),
    ] {
        let response = app.get(PROVIDERS, &forged(kid, embed)).await;
        assert_unauthorized(response, "invalid_token").await;
    }
    assert_eq!(
        attacker_hits.load(Ordering::SeqCst),
        0,
        "a URL named by the token is never fetched"
    );
    assert!(hits.load(Ordering::SeqCst) >= 1, "the configured JWKS is");

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let body = URL_SAFE_NO_PAD.encode(claims("alice", &["admin"], now).to_string());
    for header in [
        json!({"alg": "none", "kid": "rsa-1"}),
        json!({"alg": "none"}),
        json!({"alg": "RS256", "kid": "rsa-1"}),
    ] {
        let header = URL_SAFE_NO_PAD.encode(header.to_string());
        for token in [format!("{header}.{body}."), format!("{header}.{body}.AAAA")] {
            assert_unauthorized(app.get(PROVIDERS, &token).await, "invalid_token").await;
        }
    }
    let static_rsa = spawn_app_with(&[
        ("OAUTH_JWT_SECRET", ""),
        ("OAUTH_JWT_PUBLIC_KEY", RSA_PUBLIC),
    ])
    .await;
    let none = format!(
        "{}.{body}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT"}).to_string())
    );
    assert_unauthorized(static_rsa.get(PROVIDERS, &none).await, "invalid_token").await;
    // An RS256 token for a service configured with an HS256 secret.
    let rs = sign_pem(
        &claims("alice", &["admin"], now),
        Algorithm::RS256,
        RSA_PRIVATE,
        None,
    );
    assert_unauthorized(spawn_app().await.get(PROVIDERS, &rs).await, "invalid_token").await;
}
