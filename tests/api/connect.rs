//! The connect flow end to end, against the fake authorization server: one full flow per
//! provider, and one test per security point, each checking that nothing is stored when
//! nothing should be.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::Duration;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;

use crate::support::fake_provider::{Consent, Endpoint, FakeProvider, Fault};
use crate::support::{count_rows, problem, spawn_app, spawn_with_fake, TestApp, RETURN_BASE};

const PUBLIC: &str = "https://oauth.example.test";

async fn authorize(app: &TestApp, user: &str, provider: &str, body: Value) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/api/v1/oauth/providers/{provider}/authorize")))
        .bearer_auth(app.token(user, &["user"]))
        .json(&body)
        .send()
        .await
        .expect("authorize request")
}

pub async fn authorization_url(app: &TestApp, user: &str, provider: &str, body: Value) -> String {
    let response = authorize(app, user, provider, body).await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let body: Value = response.json().await.expect("json");
    body["authorization_url"].as_str().expect("url").to_owned()
}

fn query(url: &str) -> std::collections::HashMap<String, String> {
    Url::parse(url)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect()
}

/// The fake redirects the browser to the public callback URL; send it to the test server.
pub fn to_service(app: &TestApp, location: &str) -> String {
    assert!(
        location.starts_with(PUBLIC),
        "callback goes to the public URL: {location}"
    );
    location.replacen(PUBLIC, &app.address, 1)
}

async fn callback(app: &TestApp, location: &str) -> (u16, Value) {
    let response = app
        .http
        .get(to_service(app, location))
        .header("accept", "application/json")
        .send()
        .await
        .expect("callback");
    let status = response.status().as_u16();
    (status, response.json().await.expect("callback json"))
}

/// A whole flow: consent at the fake as `consent`, then the callback; returns its JSON result.
pub async fn connect(
    app: &TestApp,
    fake: &FakeProvider,
    provider: &str,
    user: &str,
    consent: Consent,
    body: Value,
) -> (u16, Value) {
    fake.push_consent(provider, consent);
    let url = authorization_url(app, user, provider, body).await;
    let location = fake.authorize(&url).await;
    callback(app, &location).await
}

pub async fn integration(app: &TestApp, user: &str, result: &Value) -> Value {
    let id = result["integration_id"].as_str().expect("integration id");
    let response = app
        .get_as(&format!("/api/v1/oauth/integrations/{id}"), user, &["user"])
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

async fn assert_nothing_stored(app: &TestApp) {
    for table in ["oauth_integrations", "oauth_tokens", "oauth_consents"] {
        assert_eq!(
            count_rows(&app.db, table).await,
            0,
            "{table} must stay empty"
        );
    }
}

pub async fn stored_tokens(
    app: &TestApp,
    result: &Value,
    user: &str,
) -> oauth_manager::services::vault::TokenSet {
    let id = result["integration_id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    let sealed = app
        .db
        .get_tokens(id)
        .await
        .expect("read")
        .expect("tokens stored");
    app.state.services.vault.open(user, &sealed).expect("open")
}

#[tokio::test]
async fn google_full_flow_stores_an_encrypted_integration_keyed_on_sub() {
    let (app, fake) = spawn_with_fake().await;
    let (status, result) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-123"),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, result["oauth_status"].as_str()),
        (200, Some("success")),
        "{result}"
    );
    let view = integration(&app, "alice", &result).await;
    assert_eq!(view["provider_account_id"], "g-123");
    assert_eq!(view["account_email"], "g-123@example.com");
    assert_eq!(view["status"], "active");
    assert_eq!(
        view["granted_scopes"],
        json!(["email", "openid", "profile"])
    );
    let tokens = stored_tokens(&app, &result, "alice").await;
    let issued = fake.issued_tokens("google");
    let access = issued
        .iter()
        .find(|t| format!("{:?}", t.kind).contains("Access"))
        .expect("access token issued");
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&tokens.access_token),
        access.token
    );
    assert!(
        tokens.refresh_token.is_some(),
        "offline access + consent gives a refresh token"
    );
    assert!(tokens.expires_at.is_some());
    assert_eq!(count_rows(&app.db, "oauth_consents").await, 1);
    // The integration view never shows token material.
    assert!(!view.to_string().contains(&access.token));
}

#[tokio::test]
async fn google_authorization_request_and_code_exchange_are_rfc_9700_shaped() {
    let (app, fake) = spawn_with_fake().await;
    let first = authorization_url(&app, "alice", "google", json!({})).await;
    let second = authorization_url(&app, "alice", "google", json!({})).await;
    let (q1, q2) = (query(&first), query(&second));
    assert_eq!(q1["response_type"], "code");
    assert_eq!(q1["code_challenge_method"], "S256");
    assert_eq!(q1["access_type"], "offline");
    assert_eq!(q1["include_granted_scopes"], "true");
    assert_eq!(q1["prompt"], "consent", "no refresh token held yet");
    assert_eq!(
        q1["redirect_uri"],
        format!("{PUBLIC}/api/v1/oauth/callback/google")
    );
    assert!(q1["state"].len() >= 43, "state carries at least 256 bits");
    assert_ne!(q1["state"], q2["state"]);
    assert_ne!(
        q1["code_challenge"], q2["code_challenge"],
        "fresh PKCE per request"
    );
    assert_ne!(q1["nonce"], q2["nonce"]);
    assert!(!first.contains("response_type=token"), "no implicit flow");

    fake.push_consent("google", Consent::user("g-1"));
    let location = fake.authorize(&first).await;
    let (status, _) = callback(&app, &location).await;
    assert_eq!(status, 200);
    let token_requests = fake.requests_to("google", Endpoint::Token);
    assert_eq!(token_requests.len(), 1);
    let request = &token_requests[0];
    assert!(!request.body_was_json, "form-encoded (RFC 6749 §4.1.3)");
    assert_eq!(request.form["grant_type"], "authorization_code");
    assert_eq!(
        request.form["redirect_uri"], q1["redirect_uri"],
        "identical redirect_uri"
    );
    let verifier = &request.form["code_verifier"];
    assert!(verifier.len() >= 43);
    assert_eq!(
        URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())),
        q1["code_challenge"]
    );
    assert_eq!(
        request.form["client_secret"],
        fake.client_secret("google"),
        "client_secret_post"
    );
    assert!(
        request.header("authorization").is_none(),
        "exactly one client authentication method"
    );
}

#[tokio::test]
async fn microsoft_accounts_are_keyed_on_tenant_and_object_id() {
    let (app, fake) = spawn_with_fake().await;
    let (status, result) = connect(
        &app,
        &fake,
        "microsoft",
        "alice",
        Consent::user("oid-42"),
        json!({"features": ["calendar.read"]}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    let view = integration(&app, "alice", &result).await;
    let tenant = crate::support::fake_provider::DEFAULT_TENANT_ID;
    assert_eq!(view["provider_account_id"], format!("{tenant}.oid-42"));
    assert_eq!(view["account"]["tenant_id"], tenant);
    let granted: Vec<String> =
        serde_json::from_value(view["granted_scopes"].clone()).expect("scopes");
    assert!(
        granted.contains(&"Calendars.Read".to_owned())
            && granted.contains(&"offline_access".to_owned()),
        "{granted:?}"
    );
    assert_eq!(view["missing_scopes"], json!([]));
    let url_scope = &fake.requests_to("microsoft", Endpoint::Authorize)[0].query["scope"];
    assert!(
        url_scope.contains("offline_access"),
        "offline_access is always requested"
    );
    assert!(stored_tokens(&app, &result, "alice")
        .await
        .refresh_token
        .is_some());
}

#[tokio::test]
async fn notion_uses_basic_auth_a_json_body_and_keys_on_the_bot() {
    let (app, fake) = spawn_with_fake().await;
    let (status, result) = connect(
        &app,
        &fake,
        "notion",
        "alice",
        Consent::user("n-7"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    let authorize = &fake.requests_to("notion", Endpoint::Authorize)[0];
    assert_eq!(authorize.query["owner"], "user");
    assert!(
        !authorize.query.contains_key("code_challenge"),
        "Notion does not support PKCE"
    );
    assert!(
        !authorize.query.contains_key("scope"),
        "Notion has no OAuth scopes"
    );
    let token = &fake.requests_to("notion", Endpoint::Token)[0];
    assert!(token.body_was_json);
    assert!(token
        .header("authorization")
        .is_some_and(|v| v.starts_with("Basic ")));
    assert!(token.header("notion-version").is_some());
    assert!(!token.form.contains_key("client_secret"));
    let view = integration(&app, "alice", &result).await;
    assert_eq!(view["granted_scopes"], json!(["workspace"]));
    assert!(view["account"]["workspace_name"].as_str().is_some());
    assert_eq!(view["account_email"], "n-7@example.com");
    let tokens = stored_tokens(&app, &result, "alice").await;
    assert!(
        tokens.expires_at.is_none(),
        "Notion sends no expires_in: expiry unknown"
    );
    assert!(tokens.refresh_token.is_some());
}

#[tokio::test]
async fn youtube_connects_a_channel_and_refuses_accounts_without_one() {
    let (app, fake) = spawn_with_fake().await;
    let mut consent = Consent::user("y-1");
    consent.channel = Some(("UCabcdefghijklmnopqrstuv".into(), "Cat videos".into()));
    let (status, result) = connect(&app, &fake, "youtube", "alice", consent, json!({})).await;
    assert_eq!(status, 200, "{result}");
    let view = integration(&app, "alice", &result).await;
    assert_eq!(view["provider_account_id"], "y-1:UCabcdefghijklmnopqrstuv");
    assert_eq!(view["account"]["channel_title"], "Cat videos");
    let authorize = &fake.requests_to("youtube", Endpoint::Authorize)[0];
    assert_eq!(authorize.query["prompt"], "select_account consent");

    let mut no_channel = Consent::user("y-2");
    no_channel.channel = None;
    let (status, result) = connect(&app, &fake, "youtube", "bob", no_channel, json!({})).await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("no_youtube_channel"))
    );
    assert_eq!(
        count_rows(&app.db, "oauth_integrations").await,
        1,
        "only the first connection"
    );
}

#[tokio::test]
async fn a_declared_oidc_provider_works_and_its_iss_parameter_is_required() {
    let (app, fake) = spawn_with_fake().await;
    let (status, result) = connect(
        &app,
        &fake,
        "acme",
        "alice",
        Consent::user("a-1"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    let view = integration(&app, "alice", &result).await;
    assert_eq!(
        view["provider_account_id"],
        format!("{}#a-1", fake.issuer("acme"))
    );
    let token = &fake.requests_to("acme", Endpoint::Token)[0];
    assert!(
        token
            .header("authorization")
            .is_some_and(|v| v.starts_with("Basic ")),
        "client_secret_basic"
    );

    let mut without_iss = Consent::user("a-2");
    without_iss.iss_in_response = Some(String::new());
    let (status, result) = connect(&app, &fake, "acme", "bob", without_iss, json!({})).await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("issuer_missing"))
    );
    assert_eq!(
        fake.count("acme", Endpoint::Token),
        1,
        "no code exchange after an iss failure"
    );
}

#[tokio::test]
async fn a_replayed_callback_changes_nothing_and_exchanges_no_second_code() {
    let (app, fake) = spawn_with_fake().await;
    fake.push_consent("google", Consent::user("g-1"));
    let url = authorization_url(&app, "alice", "google", json!({})).await;
    let location = fake.authorize(&url).await;
    let (_, first) = callback(&app, &location).await;
    let (status, again) = callback(&app, &location).await;
    assert_eq!(status, 200);
    assert_eq!(
        again["integration_id"], first["integration_id"],
        "the first result, shown again"
    );
    assert_eq!(fake.count("google", Endpoint::Token), 1);
    assert_eq!(count_rows(&app.db, "oauth_integrations").await, 1);

    // Concurrent duplicates: exactly one exchange.
    fake.push_consent("google", Consent::user("g-2"));
    let url = authorization_url(&app, "bob", "google", json!({})).await;
    let location = fake.authorize(&url).await;
    let (a, b) = tokio::join!(callback(&app, &location), callback(&app, &location));
    assert!(a.0 == 200 || b.0 == 200);
    assert_eq!(fake.count("google", Endpoint::Token), 2);
}

#[tokio::test]
async fn an_unknown_or_missing_state_is_refused_without_storing() {
    let (app, fake) = spawn_with_fake().await;
    for path in [
        "/api/v1/oauth/callback/google?code=abc&state=forged-state",
        "/api/v1/oauth/callback/google?code=abc",
    ] {
        let (status, result) = callback(&app, &format!("{PUBLIC}{path}")).await;
        assert_eq!(
            (status, result["error"].as_str()),
            (400, Some("invalid_state"))
        );
    }
    assert_eq!(fake.count("google", Endpoint::Token), 0);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn an_expired_state_is_refused_without_storing() {
    let (app, fake) = spawn_with_fake().await;
    fake.push_consent("google", Consent::user("g-1"));
    let url = authorization_url(&app, "alice", "google", json!({})).await;
    let location = fake.authorize(&url).await;
    app.clock.advance(Duration::minutes(11));
    let (status, result) = callback(&app, &location).await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("state_expired"))
    );
    assert_eq!(fake.count("google", Endpoint::Token), 0);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_state_is_bound_to_its_provider_and_user() {
    let (app, fake) = spawn_with_fake().await;
    fake.push_consent("google", Consent::user("g-1"));
    let url = authorization_url(&app, "alice", "google", json!({})).await;
    let location = fake.authorize(&url).await;
    // The same code and state delivered to another provider's callback.
    let elsewhere = location.replace("/callback/google", "/callback/microsoft");
    let (status, result) = callback(&app, &elsewhere).await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("provider_mismatch"))
    );
    assert_eq!(
        fake.count("google", Endpoint::Token) + fake.count("microsoft", Endpoint::Token),
        0,
        "the code went nowhere"
    );
    assert_nothing_stored(&app).await;

    // Alice's integration cannot be the target of Bob's incremental authorization.
    let (_, result) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({}),
    )
    .await;
    let id = result["integration_id"].as_str().expect("id");
    let (status, body) =
        problem(authorize(&app, "bob", "google", json!({"integration_id": id})).await).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
}

async fn tamper_pkce_verifier(app: &TestApp) {
    use oauth_manager::services::vault::pkce_verifier_aad;
    use oauth_manager::storage::Database;
    let wrong =
        secrecy::SecretString::from("wrong-verifier-wrong-verifier-wrong-verifier".to_owned());
    let rows: Vec<(uuid::Uuid, String)> = match &app.db {
        Database::Postgres(pool) => {
            sqlx::query_as("SELECT id, user_id FROM oauth_state")
                .fetch_all(pool)
                .await
        }
        Database::Sqlite(pool, _) => {
            sqlx::query_as("SELECT id, user_id FROM oauth_state")
                .fetch_all(pool)
                .await
        }
    }
    .expect("states");
    for (id, user) in rows {
        let row = id.to_string();
        let keyring = app.state.services.vault.keyring();
        let sealed = keyring
            .seal(&wrong, pkce_verifier_aad(&row, &user))
            .expect("seal");
        let sql = "UPDATE oauth_state SET pkce_verifier = $1 WHERE id = $2";
        crate::support::raw!(&app.db, sql, sealed, id);
    }
}

#[tokio::test]
async fn a_wrong_pkce_verifier_fails_the_exchange_and_stores_nothing() {
    let (app, fake) = spawn_with_fake().await;
    fake.push_consent("google", Consent::user("g-1"));
    let url = authorization_url(&app, "alice", "google", json!({})).await;
    let location = fake.authorize(&url).await;
    tamper_pkce_verifier(&app).await;
    let (status, result) = callback(&app, &location).await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("token_exchange_failed")),
        "{result}"
    );
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn id_token_nonce_signature_and_issuer_are_checked_before_any_identity_is_trusted() {
    let (app, fake) = spawn_with_fake().await;
    let mut bad_nonce = Consent::user("g-1");
    bad_nonce.id_token_nonce = Some("attacker-nonce".into());
    let (status, result) = connect(&app, &fake, "google", "alice", bad_nonce, json!({})).await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("id_token_nonce_mismatch"))
    );

    let mut forged = Consent::user("g-1");
    forged.sign_with_wrong_key = true;
    let (status, result) = connect(&app, &fake, "google", "alice", forged, json!({})).await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("id_token_bad_signature"))
    );

    // Mix-up: a Google-started flow whose response claims Microsoft's issuer.
    let mut mixed_up = Consent::user("g-1");
    mixed_up.iss_in_response = Some("https://login.microsoftonline.com/common/v2.0".into());
    let tokens_before = fake.count("google", Endpoint::Token);
    let (status, result) = connect(&app, &fake, "google", "alice", mixed_up, json!({})).await;
    assert_eq!(
        (status, result["error"].as_str()),
        (400, Some("issuer_mismatch"))
    );
    assert_eq!(
        fake.count("google", Endpoint::Token),
        tokens_before,
        "no code exchange on a mix-up"
    );
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn provider_errors_become_clear_errors_and_store_nothing() {
    let (app, fake) = spawn_with_fake().await;
    let cases = [
        (Fault::ErrorIn200, "token_exchange_failed"),
        (Fault::InvalidGrant, "token_exchange_failed"),
        (Fault::Status(500, "oops".into()), "provider_unavailable"),
        (Fault::Malformed, "invalid_provider_response"),
        (
            Fault::Status(401, r#"{"error":"invalid_client"}"#.into()),
            "provider_misconfigured",
        ),
    ];
    for (fault, code) in cases {
        fake.push_fault("google", Endpoint::Token, fault);
        let (status, result) = connect(
            &app,
            &fake,
            "google",
            "alice",
            Consent::user("g-1"),
            json!({}),
        )
        .await;
        assert_eq!(
            (status, result["error"].as_str()),
            (400, Some(code)),
            "{result}"
        );
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_user_who_denies_consent_is_sent_back_with_access_denied() {
    let (app, fake) = spawn_with_fake().await;
    fake.push_consent("google", Consent::denied("g-1"));
    let return_to = format!("{RETURN_BASE}/integrations?tab=google");
    let url = authorization_url(&app, "alice", "google", json!({"return_to": return_to})).await;
    let location = fake.authorize(&url).await;
    let response = app
        .http
        .get(to_service(&app, &location))
        .send()
        .await
        .expect("callback");
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["referrer-policy"], "no-referrer");
    let back = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    assert!(back.starts_with(&return_to), "{back}");
    let params = query(&back);
    assert_eq!(params["tab"], "google", "the caller's own query is kept");
    assert_eq!(params["oauth_status"], "error");
    assert_eq!(params["error"], "access_denied");
    assert_eq!(params["provider"], "google");
    assert_eq!(fake.count("google", Endpoint::Token), 0);
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn success_redirects_to_return_to_with_the_integration_id() {
    let (app, fake) = spawn_with_fake().await;
    fake.push_consent("google", Consent::user("g-1"));
    let url = authorization_url(&app, "alice", "google", json!({"return_to": RETURN_BASE})).await;
    let location = fake.authorize(&url).await;
    let response = app
        .http
        .get(to_service(&app, &location))
        .send()
        .await
        .expect("callback");
    assert_eq!(response.status(), 303);
    let params = query(response.headers()["location"].to_str().expect("location"));
    assert_eq!(params["oauth_status"], "success");
    assert!(params["integration_id"].parse::<uuid::Uuid>().is_ok());
}

#[tokio::test]
async fn return_to_outside_the_allowlist_is_refused_at_authorize_time() {
    let (app, _fake) = spawn_with_fake().await;
    for bad in [
        "https://evil.example/steal",
        "https://app.example.test/settingsX",
        "https://app.example.test.evil.example/settings",
    ] {
        let (status, body) =
            problem(authorize(&app, "alice", "google", json!({"return_to": bad})).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("return_to_not_allowed")),
            "{bad}"
        );
    }
    assert_eq!(
        count_rows(&app.db, "oauth_state").await,
        0,
        "no pending authorization recorded"
    );
}

#[tokio::test]
async fn without_return_to_the_callback_answers_a_popup_page() {
    let (app, fake) = spawn_with_fake().await;
    fake.push_consent("google", Consent::user("g-1"));
    let url = authorization_url(&app, "alice", "google", json!({})).await;
    let location = fake.authorize(&url).await;
    let response = app
        .http
        .get(to_service(&app, &location))
        .send()
        .await
        .expect("callback");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert!(headers["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/html"));
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["cache-control"], "no-store");
    let csp = headers["content-security-policy"].to_str().expect("csp");
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    let page = response.text().await.expect("page");
    assert!(page.contains("The account is connected"));
    assert!(page.contains("window.opener.postMessage"));
    assert!(
        page.contains("https://app.example.test"),
        "posted to the allowed origin only"
    );
    assert!(!page.contains("\"*\""));
}

#[tokio::test]
async fn authorize_validates_provider_features_and_scopes() {
    let (app, _fake) = spawn_with_fake().await;
    let (status, body) = problem(authorize(&app, "alice", "myspace", json!({})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_provider"))
    );
    let (status, body) =
        problem(authorize(&app, "alice", "google", json!({"features": ["teleport"]})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("unknown_feature"))
    );
    assert!(body["detail"]
        .as_str()
        .expect("detail")
        .contains("teleport"));
    let (status, body) = problem(
        authorize(
            &app,
            "alice",
            "google",
            json!({"scopes": ["https://mail.google.com/"]}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("unknown_scope"))
    );
    assert!(body["detail"]
        .as_str()
        .expect("detail")
        .contains("https://mail.google.com/"));
    let (status, body) =
        problem(authorize(&app, "alice", "google", json!({"colour": "blue"})).await).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_body")));
    let ok: Value = authorize(
        &app,
        "alice",
        "google",
        json!({"features": ["calendar.read"]}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert!(ok["scopes"]
        .as_array()
        .expect("scopes")
        .contains(&json!("https://www.googleapis.com/auth/calendar.readonly")));
    // Reading needs no write permission, connecting does.
    let read_only = app
        .http
        .post(app.url("/api/v1/oauth/providers/google/authorize"))
        .bearer_auth(app.token("alice", &["service"]))
        .send()
        .await
        .expect("request");
    assert_eq!(read_only.status(), 403);
}

#[tokio::test]
async fn an_unconfigured_provider_answers_409_naming_the_variables() {
    let app = spawn_app().await;
    let (status, body) = problem(authorize(&app, "alice", "microsoft", json!({})).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("provider_not_configured"))
    );
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("MICROSOFT_CLIENT_ID") && detail.contains("MICROSOFT_CLIENT_SECRET"),
        "{detail}"
    );
}

#[tokio::test]
async fn granular_consent_records_the_granted_subset_and_the_denied_rest() {
    let (app, fake) = spawn_with_fake().await;
    let calendar = "https://www.googleapis.com/auth/calendar.readonly".to_owned();
    let mut consent = Consent::user("g-1");
    consent.granted_scopes = Some(vec!["openid".into(), "email".into(), "profile".into()]);
    let (_, result) = connect(
        &app,
        &fake,
        "google",
        "alice",
        consent,
        json!({"features": ["calendar.read"]}),
    )
    .await;
    let view = integration(&app, "alice", &result).await;
    assert_eq!(view["missing_scopes"], json!([calendar]));
    assert!(!view["granted_scopes"]
        .as_array()
        .expect("granted")
        .contains(&json!(calendar)));
    let consents = app
        .db
        .list_consents(
            Some("alice"),
            oauth_manager::storage::Page {
                after: None,
                limit: 10,
            },
        )
        .await
        .expect("consents");
    assert_eq!(consents.items[0].scopes_denied.0, vec![calendar]);
}

#[tokio::test]
async fn reconnecting_updates_the_same_integration_and_another_account_adds_one() {
    let (app, fake) = spawn_with_fake().await;
    let (_, first) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({}),
    )
    .await;
    let refresh_before = stored_tokens(&app, &first, "alice")
        .await
        .refresh_token
        .expect("refresh token");
    // Incremental authorization: Google is asked only for what is missing, no prompt=consent
    // (a refresh token is held), and merges into the same integration.
    let id = first["integration_id"].as_str().expect("id");
    let (_, again) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({"integration_id": id, "features": ["calendar.read"]}),
    )
    .await;
    assert_eq!(again["integration_id"], first["integration_id"]);
    let request = fake
        .requests_to("google", Endpoint::Authorize)
        .pop()
        .expect("second authorize");
    assert!(
        !request.query.contains_key("prompt"),
        "no forced consent while a refresh token is held"
    );
    let view = integration(&app, "alice", &again).await;
    assert!(view["granted_scopes"]
        .as_array()
        .expect("granted")
        .contains(&json!("https://www.googleapis.com/auth/calendar.readonly")));
    assert!(
        view["granted_scopes"]
            .as_array()
            .expect("granted")
            .contains(&json!("email")),
        "earlier grants kept"
    );
    // Google sent no new refresh token this time: the old one is kept, never lost.
    let refresh_after = stored_tokens(&app, &again, "alice")
        .await
        .refresh_token
        .expect("refresh token kept");
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&refresh_after),
        secrecy::ExposeSecret::expose_secret(&refresh_before)
    );

    // Same user, another Google account: a second integration, not an overwrite (F11).
    let (_, other) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-2"),
        json!({"integration_id": id}),
    )
    .await;
    assert_ne!(other["integration_id"], first["integration_id"]);
    assert_eq!(count_rows(&app.db, "oauth_integrations").await, 2);
}

#[tokio::test]
async fn the_audit_log_records_the_flow_without_secrets() {
    let (app, fake) = spawn_with_fake().await;
    connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({}),
    )
    .await;
    fake.push_consent("google", Consent::denied("g-1"));
    let url = authorization_url(&app, "alice", "google", json!({})).await;
    let location = fake.authorize(&url).await;
    callback(&app, &location).await;
    let events = crate::support::audit_events(&app, Some("alice")).await;
    let summary: Vec<(String, String, Option<String>)> = events
        .items
        .iter()
        .map(|e| (e.action.clone(), e.outcome.clone(), e.reason.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("authorize_started".into(), "success".into(), None),
            ("callback".into(), "success".into(), None),
            ("authorize_started".into(), "success".into(), None),
            (
                "callback".into(),
                "failure".into(),
                Some("access_denied".into())
            ),
        ]
    );
    let all = format!("{:?}", events.items);
    for token in fake.issued_tokens("google") {
        assert!(
            !all.contains(&token.token),
            "a token value reached the audit log"
        );
    }
}

/// A sign-in's start is audited without waiting for the audit commit (the pending row it
/// records is itself committed without waiting for the flush on PostgreSQL), yet recorded, in
/// order, once the log is read. On PostgreSQL the audit table is locked meanwhile, so an
/// authorize that waited for its record could not answer until the lock was let go.
#[tokio::test]
async fn authorize_answers_without_waiting_for_its_audit_commit() {
    let (app, fake) = spawn_with_fake().await;
    let lock = match &app.db {
        oauth_manager::storage::Database::Postgres(pool) => {
            let mut lock = pool.begin().await.expect("begin");
            sqlx::query("LOCK TABLE oauth_audit_log IN EXCLUSIVE MODE")
                .execute(&mut *lock)
                .await
                .expect("lock the audit log");
            Some(lock)
        }
        oauth_manager::storage::Database::Sqlite(..) => None,
    };
    fake.push_consent("google", Consent::user("g-1"));
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        authorization_url(&app, "alice", "google", json!({})),
    )
    .await;
    if let Some(lock) = lock {
        lock.rollback().await.expect("let the audit log go");
    }
    let url = answered.expect("authorize answered while its audit record could not be written");
    let location = fake.authorize(&url).await;
    assert_eq!(callback(&app, &location).await.0, 200);
    let events = crate::support::audit_events(&app, Some("alice")).await;
    let actions: Vec<&str> = events.items.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["authorize_started", "callback"]);
}
