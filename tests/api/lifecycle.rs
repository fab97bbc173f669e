//! The token lifecycle: hand-out, single-flight refresh (in one process and across replicas),
//! rotation safety, failure classes, caller-reported rejection, unknown expiry, the background
//! worker, and disconnect with durable provider revocation.

use std::time::Duration as StdDuration;

use chrono::Duration;
use oauth_manager::clock::Clock;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

use crate::connect::{connect, stored_tokens};
use crate::support::fake_provider::{Consent, Endpoint, FakeProvider, Fault};
use crate::support::{count_rows, problem, spawn_with_fake, spawn_with_fake_and, TestApp};
use oauth_manager::services::worker::{self, WorkerSettings};

pub async fn connected(
    app: &TestApp,
    fake: &FakeProvider,
    provider: &str,
    subject: &str,
) -> String {
    let (status, result) = connect(
        app,
        fake,
        provider,
        "alice",
        Consent::user(subject),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    result["integration_id"].as_str().expect("id").to_owned()
}

/// `count` Google integrations connected now, then the clock moved 52 minutes on: their
/// one-hour tokens are inside the worker's 10-minute window.
async fn due_for_the_worker(
    app: &TestApp,
    fake: &FakeProvider,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        ids.push(connected(app, fake, "google", &format!("{prefix}-{n}")).await);
    }
    app.clock.advance(Duration::minutes(52));
    ids
}

pub async fn get_token(app: &TestApp, id: &str) -> reqwest::Response {
    app.get_as(
        &format!("/api/v1/oauth/integrations/{id}/token"),
        "backend",
        &["service"],
    )
    .await
}

async fn token_value(app: &TestApp, id: &str) -> String {
    let response = get_token(app, id).await;
    let status = response.status();
    if status != 200 {
        panic!("{status}: {}", response.text().await.unwrap_or_default());
    }
    let body: Value = response.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

async fn status_of(app: &TestApp, id: &str) -> String {
    let body: Value = app
        .get_as(
            &format!("/api/v1/oauth/integrations/{id}"),
            "alice",
            &["user"],
        )
        .await
        .json()
        .await
        .expect("json");
    body["status"].as_str().expect("status").to_owned()
}

#[tokio::test]
async fn a_valid_token_is_handed_out_without_refreshing_and_an_expiring_one_is_refreshed_first() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let response = get_token(&app, &id).await;
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["provider"], "google");
    assert_eq!(body["provider_account_id"], "g-1");
    assert!(body["expires_at"].as_str().is_some());
    let first = body["access_token"].as_str().expect("token").to_owned();
    assert_eq!(fake.count_grant("google", "refresh_token"), 0);
    // 1 h token, 5 min skew: at +56 min it is refreshed first.
    app.clock.advance(Duration::minutes(56));
    let second = token_value(&app, &id).await;
    assert_ne!(second, first);
    assert!(fake.is_token_active(&second));
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    // The refresh response had no refresh token (Google): the old one is kept, and works.
    let tokens = stored_tokens(&app, &json!({"integration_id": id}), "alice").await;
    assert!(fake.is_token_active(tokens.refresh_token.expect("kept").expose_secret()));
    assert_eq!(
        token_value(&app, &id).await,
        second,
        "fresh now: no second refresh"
    );
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
}

#[tokio::test]
async fn tokens_need_the_tokens_read_permission_and_are_never_someone_elses() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let path = format!("/api/v1/oauth/integrations/{id}/token");
    let (status, body) = problem(app.get_as(&path, "alice", &["user"]).await).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let app_own = app.get_as(&path, "alice", &[]).await;
    assert_eq!(app_own.status(), 403);
    assert_eq!(
        app.get_as(&path, "backend", &["service"]).await.status(),
        200
    );
    let (status, _) = problem(app.get(&path, &app.token("mallory", &["tokens-own"])).await).await;
    assert_eq!(status, 403, "unknown role grants nothing");
}

/// With `tokens:read` on their own data only, a user gets their own token and never another
/// user's: before the token is cached (the read path) and after (the cached path), answered as
/// if it did not exist, and the attempt audited.
#[tokio::test]
async fn a_user_who_may_read_own_tokens_never_gets_someone_else_s() {
    let (app, fake) = spawn_with_fake_and(&[(
        "OAUTH_ROLE_PERMISSIONS",
        r#"{"user": ["integrations:read", "integrations:write", "tokens:read"]}"#,
    )])
    .await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let path = format!("/api/v1/oauth/integrations/{id}/token");
    let (status, body) = problem(app.get_as(&path, "bob", &["user"]).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "cold"
    );
    let own = app.get_as(&path, "alice", &["user"]).await;
    assert_eq!(own.status(), 200, "her own");
    let (status, body) = problem(app.get_as(&path, "bob", &["user"]).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "cached"
    );
    let denied = crate::support::audit_events(&app, Some("alice"))
        .await
        .items
        .into_iter()
        .filter(|event| event.action == "access_denied")
        .filter(|event| event.actor_user_id.as_deref() == Some("bob"))
        .count();
    assert_eq!(denied, 2, "both attempts audited");
}

#[tokio::test]
async fn a_hundred_concurrent_callers_cause_exactly_one_refresh() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    app.clock.advance(Duration::minutes(59));
    fake.push_fault(
        "google",
        Endpoint::Token,
        Fault::Latency(StdDuration::from_millis(300)),
    );
    let handles: Vec<_> = (0..100).map(|_| spawn_token_call(&app, &id)).collect();
    let mut tokens = Vec::new();
    for handle in handles {
        tokens.push(handle.await.expect("task"));
    }
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    assert!(
        tokens.iter().all(|token| token == &tokens[0]),
        "everyone got the new token"
    );
    assert!(fake.is_token_active(&tokens[0]));
}

/// A concurrent `GET …/token` as the backend; resolves to the access token (asserting 200).
pub fn spawn_token_call(app: &TestApp, id: &str) -> tokio::task::JoinHandle<String> {
    let url = app.url(&format!("/api/v1/oauth/integrations/{id}/token"));
    let token = app.token("backend", &["service"]);
    let http = app.http.clone();
    tokio::spawn(async move {
        let response = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_owned()
    })
}

#[tokio::test]
async fn two_replicas_on_one_database_refresh_once() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "acme", "a-1").await;
    let other = app.sibling().await;
    for round in 1..=3 {
        // Seconds before expiry: nobody may hand out the old token meanwhile.
        app.clock
            .advance(Duration::minutes(59) + Duration::seconds(45));
        other.clock.set(app.clock.now());
        fake.push_fault(
            "acme",
            Endpoint::Token,
            Fault::Latency(StdDuration::from_millis(250)),
        );
        let handles: Vec<_> = (0..60)
            .map(|n| spawn_token_call(if n % 2 == 0 { &app } else { &other }, &id))
            .collect();
        let mut seen = Vec::new();
        for handle in handles {
            seen.push(handle.await.expect("task"));
        }
        assert!(
            seen.iter().all(|token| token == &seen[0]),
            "round {round}: both replicas hand out the same token"
        );
        // acme rotates refresh tokens strictly and revokes the grant on reuse: one refresh per
        // round, and the grant is still alive, so no old refresh token was ever replayed.
        assert_eq!(fake.count_grant("acme", "refresh_token"), round);
        let tokens = stored_tokens(&app, &json!({"integration_id": id}), "alice").await;
        assert!(
            fake.is_token_active(tokens.refresh_token.expect("rt").expose_secret()),
            "round {round}"
        );
    }
    assert_eq!(status_of(&app, &id).await, "active");
}

#[tokio::test]
async fn invalid_grant_means_reauth_required_and_stops_calling_the_provider() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    fake.revoke_all_grants("google", "g-1");
    app.clock.advance(Duration::minutes(59));
    let (status, body) = problem(get_token(&app, &id).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("reauth_required"))
    );
    assert!(body["detail"]
        .as_str()
        .expect("detail")
        .contains("connect flow"));
    assert_eq!(status_of(&app, &id).await, "needs_reauth");
    let calls = fake.count_grant("google", "refresh_token");
    let (status, _) = problem(get_token(&app, &id).await).await;
    assert_eq!(status, 409);
    assert_eq!(
        fake.count_grant("google", "refresh_token"),
        calls,
        "no provider call once needs_reauth"
    );
    let events = crate::support::audit_events(&app, Some("alice")).await;
    assert!(events.items.iter().any(|e| e.action == "reauth_required"));
}

#[tokio::test]
async fn an_error_inside_http_200_is_an_error() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    app.clock.advance(Duration::minutes(59));
    fake.push_fault("google", Endpoint::Token, Fault::ErrorIn200);
    let (status, body) = problem(get_token(&app, &id).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("reauth_required"))
    );
}

#[tokio::test]
async fn transient_failures_keep_the_integration_and_serve_a_still_valid_token() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let original = token_value(&app, &id).await;
    // Inside the skew window but not expired: the old token is still good.
    app.clock.advance(Duration::minutes(56));
    for _ in 0..2 {
        fake.push_fault("google", Endpoint::Token, Fault::Status(503, "down".into()));
    }
    assert_eq!(token_value(&app, &id).await, original);
    let view: Value = app
        .get_as(
            &format!("/api/v1/oauth/integrations/{id}"),
            "alice",
            &["user"],
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(view["status"], "active");
    assert!(view["last_error"]
        .as_str()
        .expect("error")
        .contains("refresh failed"));

    // Expired and the provider answers garbage: 503 with Retry-After, still active.
    app.clock.advance(Duration::minutes(10));
    // A garbage body is not retried in-request (only fast 5xx/network failures are).
    fake.push_fault("google", Endpoint::Token, Fault::Malformed);
    let response = get_token(&app, &id).await;
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = problem(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("provider_unavailable"))
    );
    assert_eq!(status_of(&app, &id).await, "active");
    // Callers are not sent to the provider again during the back-off (30 s, doubling: 60 s ± 20 % now).
    let (status, _) = problem(get_token(&app, &id).await).await;
    assert_eq!(status, 503);
    // ...and once it has passed, the provider has recovered: the next call refreshes.
    app.clock.advance(Duration::seconds(80));
    let fresh = token_value(&app, &id).await;
    assert_ne!(fresh, original);
}

#[tokio::test]
async fn invalid_client_is_our_misconfiguration_not_the_users() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    app.clock.advance(Duration::minutes(61));
    fake.push_fault(
        "google",
        Endpoint::Token,
        Fault::Status(
            401,
            r#"{"error":"invalid_client","error_description":"Unauthorized"}"#.into(),
        ),
    );
    let (status, body) = problem(get_token(&app, &id).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (502, Some("provider_misconfigured"))
    );
    assert_eq!(
        status_of(&app, &id).await,
        "active",
        "users' integrations are never marked broken for it"
    );
}

#[tokio::test]
async fn a_reported_rejection_refreshes_once_however_many_callers_report_it() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let rejected = token_value(&app, &id).await;
    app.clock.advance(Duration::seconds(30));
    let refresh = |body: Value| {
        let url = app.url(&format!("/api/v1/oauth/integrations/{id}/refresh"));
        let token = app.token("backend", &["service"]);
        let http = app.http.clone();
        async move {
            http.post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("refresh")
        }
    };
    let body = json!({"rejected_access_token": rejected});
    let (a, b, c) = tokio::join!(
        refresh(body.clone()),
        refresh(body.clone()),
        refresh(body.clone())
    );
    let mut fresh = Vec::new();
    for response in [a, b, c] {
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        fresh.push(
            body["token"]["access_token"]
                .as_str()
                .expect("token for a tokens:read caller")
                .to_owned(),
        );
    }
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    assert!(fresh
        .iter()
        .all(|token| token == &fresh[0] && token != &rejected));
    // The owner may refresh too, but does not see the token without tokens:read.
    app.clock.advance(Duration::seconds(30));
    let response = app
        .http
        .post(app.url(&format!("/api/v1/oauth/integrations/{id}/refresh")))
        .bearer_auth(app.token("alice", &["user"]))
        .send()
        .await
        .expect("refresh");
    let body: Value = response.json().await.expect("json");
    assert!(body["token"].is_null());
    assert_eq!(body["integration"]["id"], id.as_str());
}

#[tokio::test]
async fn unknown_expiry_is_never_refreshed_until_a_rejection_and_notion_rotation_is_kept() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "notion", "n-1").await;
    let response: Value = get_token(&app, &id).await.json().await.expect("json");
    assert!(response["expires_at"].is_null(), "Notion gives no expiry");
    let first = response["access_token"].as_str().expect("token").to_owned();
    app.clock.advance(Duration::days(400));
    assert_eq!(token_value(&app, &id).await, first);
    assert_eq!(
        fake.count_grant("notion", "refresh_token"),
        0,
        "never refreshed on a guess"
    );
    let before = stored_tokens(&app, &json!({"integration_id": id}), "alice")
        .await
        .refresh_token
        .expect("rt");
    let response = app
        .http
        .post(app.url(&format!("/api/v1/oauth/integrations/{id}/refresh")))
        .bearer_auth(app.token("backend", &["service"]))
        .json(&json!({"rejected_access_token": first}))
        .send()
        .await
        .expect("refresh");
    assert_eq!(response.status(), 200);
    let after = stored_tokens(&app, &json!({"integration_id": id}), "alice")
        .await
        .refresh_token
        .expect("rt");
    assert_ne!(
        after.expose_secret(),
        before.expose_secret(),
        "the rotated refresh token is stored"
    );
    assert!(fake.is_token_active(after.expose_secret()));
    assert_eq!(fake.count_grant("notion", "refresh_token"), 1);
}

#[tokio::test]
async fn the_background_worker_refreshes_each_due_integration_once_across_two_workers() {
    let (app, fake) = spawn_with_fake().await;
    let ids = due_for_the_worker(&app, &fake, "g", 6).await;
    let other = app.sibling().await;
    other.clock.set(app.clock.now());
    fake.push_fault(
        "google",
        Endpoint::Token,
        Fault::Latency(StdDuration::from_millis(100)),
    );
    let settings = WorkerSettings {
        concurrency_per_provider: 2,
        ..WorkerSettings::default()
    };
    let (a, b) = tokio::join!(
        worker::tick(&app.state.services, &settings),
        worker::tick(&other.state.services, &settings)
    );
    assert_eq!(a.refreshed + b.refreshed, 6, "{a:?} {b:?}");
    assert_eq!(
        fake.count_grant("google", "refresh_token"),
        6,
        "each integration exactly once"
    );
    // Nothing is due any more; the on-demand path finds fresh tokens.
    let again = worker::tick(&app.state.services, &settings).await;
    assert_eq!(again.refreshed, 0);
    for id in &ids {
        token_value(&app, id).await;
    }
    assert_eq!(fake.count_grant("google", "refresh_token"), 6);
}

#[tokio::test]
async fn a_tick_claims_at_most_its_bound_and_says_more_is_due() {
    let (app, fake) = spawn_with_fake().await;
    due_for_the_worker(&app, &fake, "b", 5).await;
    let settings = WorkerSettings {
        batch: 2,
        claims_per_tick: 3,
        ..WorkerSettings::default()
    };
    // A bound of 0 claims nothing and does not ask for the next tick at once (no busy loop).
    let none = WorkerSettings {
        claims_per_tick: 0,
        ..settings
    };
    let idle = worker::tick(&app.state.services, &none).await;
    assert_eq!((idle.refreshed, idle.more_due), (0, false), "{idle:?}");
    let first = worker::tick(&app.state.services, &settings).await;
    assert_eq!((first.refreshed, first.more_due), (3, true), "{first:?}");
    let second = worker::tick(&app.state.services, &settings).await;
    assert_eq!(
        (second.refreshed, second.more_due),
        (2, false),
        "{second:?}"
    );
    let third = worker::tick(&app.state.services, &settings).await;
    assert_eq!(third, worker::TickReport::default());
    assert_eq!(
        fake.count_grant("google", "refresh_token"),
        5,
        "each integration exactly once"
    );
}

#[tokio::test]
async fn a_worker_whose_tick_stopped_at_its_bound_ticks_again_without_its_pause() {
    let (app, fake) = spawn_with_fake().await;
    due_for_the_worker(&app, &fake, "r", 5).await;
    let settings = WorkerSettings {
        interval: Duration::hours(1),
        batch: 2,
        claims_per_tick: 2,
        ..WorkerSettings::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker::run(
        app.state.services.clone(),
        settings,
        async move {
            let _ = stopped.await;
        },
    ));
    // Three ticks of at most two claims each, none an hour after the other.
    for _ in 0..200 {
        if fake.count_grant("google", "refresh_token") == 5 {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(25)).await;
    }
    assert_eq!(fake.count_grant("google", "refresh_token"), 5);
    let _ = stop.send(());
    let finished = tokio::time::timeout(StdDuration::from_secs(5), running).await;
    assert!(
        finished.is_ok(),
        "the worker stops when asked, pausing or not"
    );
}

pub async fn disconnect(app: &TestApp, id: &str) -> Value {
    let response = app
        .http
        .delete(app.url(&format!("/api/v1/oauth/integrations/{id}")))
        .bearer_auth(app.token("alice", &["user"]))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

#[tokio::test]
async fn disconnect_revokes_at_the_provider_and_forgets_the_tokens() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let refresh = stored_tokens(&app, &json!({"integration_id": id}), "alice")
        .await
        .refresh_token
        .expect("rt");
    let body = disconnect(&app, &id).await;
    assert_eq!(body["provider_revocation"], "revoked");
    assert_eq!(body["status"], "revoked");
    let revoke = &fake.requests_to("google", Endpoint::Revoke)[0];
    assert_eq!(
        revoke.form["token"],
        refresh.expose_secret(),
        "the refresh token is revoked (RFC 7009)"
    );
    assert!(!fake.is_token_active(refresh.expose_secret()));
    assert_eq!(count_rows(&app.db, "oauth_tokens").await, 0);
    assert_eq!(status_of(&app, &id).await, "revoked");
    let (status, body) = problem(get_token(&app, &id).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("integration_revoked"))
    );
    // Idempotent.
    assert_eq!(
        disconnect(&app, &id).await["provider_revocation"],
        "nothing_to_revoke"
    );
    // Someone else's integration: 404.
    let other = app
        .http
        .delete(app.url(&format!("/api/v1/oauth/integrations/{id}")))
        .bearer_auth(app.token("bob", &["user"]))
        .send()
        .await
        .expect("delete");
    assert_eq!(other.status(), 404);
}

#[tokio::test]
async fn microsoft_has_no_revocation_and_says_so() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "microsoft", "oid-1").await;
    let body = disconnect(&app, &id).await;
    assert_eq!(body["provider_revocation"], "not_supported");
    assert!(body["note"]
        .as_str()
        .expect("note")
        .contains("no token revocation"));
    assert_eq!(count_rows(&app.db, "oauth_tokens").await, 0);
}

#[tokio::test]
async fn a_revocation_the_provider_cannot_take_now_survives_a_restart_and_is_retried() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "notion", "n-1").await;
    fake.push_fault("notion", Endpoint::Revoke, Fault::RetryAfter503(60));
    let body = disconnect(&app, &id).await;
    assert_eq!(body["provider_revocation"], "pending");
    assert!(body["retry_at"].as_str().is_some());
    assert_eq!(
        status_of(&app, &id).await,
        "revoked",
        "the local disconnect happened at once"
    );
    assert_eq!(
        count_rows(&app.db, "oauth_tokens").await,
        1,
        "kept only to revoke it later"
    );
    let (status, _) = problem(get_token(&app, &id).await).await;
    assert_eq!(status, 409, "a queued token is never handed out");
    // A new process (restart) picks the queue up from the database once Retry-After passed.
    let restarted = app.sibling().await;
    let settings = WorkerSettings::default();
    assert_eq!(
        worker::tick(&restarted.state.services, &settings)
            .await
            .revocations_attempted,
        0,
        "not before Retry-After"
    );
    restarted.clock.advance(Duration::seconds(61));
    assert_eq!(
        worker::tick(&restarted.state.services, &settings)
            .await
            .revocations_attempted,
        1
    );
    assert_eq!(fake.count("notion", Endpoint::Revoke), 2);
    assert_eq!(count_rows(&app.db, "oauth_tokens").await, 0);
}

#[tokio::test]
async fn a_caller_that_goes_away_mid_refresh_does_not_lose_a_rotated_token() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "acme", "a-1").await;
    app.clock
        .advance(Duration::minutes(59) + Duration::seconds(45));
    fake.push_fault(
        "acme",
        Endpoint::Token,
        Fault::Latency(StdDuration::from_millis(800)),
    );
    let impatient = reqwest::Client::builder()
        .timeout(StdDuration::from_millis(200))
        .build()
        .expect("client");
    let gone = impatient
        .get(app.url(&format!("/api/v1/oauth/integrations/{id}/token")))
        .bearer_auth(app.token("backend", &["service"]))
        .send()
        .await;
    assert!(gone.is_err(), "the caller gave up");
    tokio::time::sleep(StdDuration::from_millis(1500)).await;
    // The refresh finished anyway and its rotated refresh token was stored (acme revokes the
    // grant if an old refresh token is ever replayed).
    assert_eq!(fake.count_grant("acme", "refresh_token"), 1);
    let stored = stored_tokens(&app, &json!({"integration_id": id}), "alice").await;
    assert!(fake.is_token_active(stored.refresh_token.expect("rt").expose_secret()));
    let token = token_value(&app, &id).await;
    assert!(fake.is_token_active(&token));
    assert_eq!(
        fake.count_grant("acme", "refresh_token"),
        1,
        "no second refresh"
    );
}

#[tokio::test]
async fn refresh_now_without_a_refresh_token_changes_nothing() {
    let (app, fake) = spawn_with_fake().await;
    let mut consent = Consent::user("a-1");
    consent.granted_scopes = Some(vec!["openid".into(), "email".into()]); // no offline_access
    let (status, result) = connect(&app, &fake, "acme", "alice", consent, json!({})).await;
    assert_eq!(status, 200, "{result}");
    let id = result["integration_id"].as_str().expect("id");
    app.clock.advance(Duration::seconds(30));
    let response = app
        .http
        .post(app.url(&format!("/api/v1/oauth/integrations/{id}/refresh")))
        .bearer_auth(app.token("alice", &["user"]))
        .send()
        .await
        .expect("refresh");
    let (status, body) = problem(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("refresh_unavailable"))
    );
    assert_eq!(status_of(&app, id).await, "active");
}

#[tokio::test]
async fn a_backend_with_only_tokens_read_can_report_a_rejected_token() {
    let (app, fake) = crate::support::spawn_with_fake_and(&[(
        "OAUTH_ROLE_PERMISSIONS",
        r#"{"user": ["integrations:read", "integrations:write"], "backend": ["tokens:read@any"]}"#,
    )])
    .await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let rejected = {
        let response = app
            .get_as(
                &format!("/api/v1/oauth/integrations/{id}/token"),
                "svc",
                &["backend"],
            )
            .await;
        let body: Value = response.json().await.expect("json");
        body["access_token"].as_str().expect("token").to_owned()
    };
    app.clock.advance(Duration::seconds(30));
    let response = app
        .http
        .post(app.url(&format!("/api/v1/oauth/integrations/{id}/refresh")))
        .bearer_auth(app.token("svc", &["backend"]))
        .json(&json!({"rejected_access_token": rejected}))
        .send()
        .await
        .expect("refresh");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_ne!(
        body["token"]["access_token"].as_str().expect("token"),
        rejected
    );
}

#[tokio::test]
async fn many_callers_meeting_invalid_grant_cause_one_provider_call() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    fake.revoke_all_grants("google", "g-1");
    app.clock.advance(Duration::minutes(61));
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let (http, url, token) = (
                app.http.clone(),
                app.url(&format!("/api/v1/oauth/integrations/{id}/token")),
                app.token("backend", &["service"]),
            );
            tokio::spawn(async move {
                http.get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("request")
                    .status()
            })
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.await.expect("task"), 409);
    }
    assert_eq!(
        fake.count_grant("google", "refresh_token"),
        1,
        "the dead refresh token is tried once"
    );
    let events = crate::support::audit_events(&app, Some("alice")).await;
    assert_eq!(
        events
            .items
            .iter()
            .filter(|e| e.action == "reauth_required")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_provider_that_never_answers_times_out_into_a_503() {
    let (app, fake) = crate::support::spawn_with_fake_and(&[
        ("OAUTH_PROVIDER_TIMEOUT_SECONDS", "1"),
        ("OAUTH_REFRESH_LEASE_SECONDS", "7"),
    ])
    .await;
    let id = connected(&app, &fake, "google", "g-1").await;
    app.clock.advance(Duration::minutes(61));
    // Google's refresh token survives a lost answer, so one quick retry is allowed: both hang.
    fake.push_fault("google", Endpoint::Token, Fault::Hang);
    fake.push_fault("google", Endpoint::Token, Fault::Hang);
    let started = std::time::Instant::now();
    let (status, body) = problem(get_token(&app, &id).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("provider_unavailable"))
    );
    assert!(
        started.elapsed() < StdDuration::from_secs(5),
        "bounded by the provider timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(status_of(&app, &id).await, "active");
}

#[tokio::test]
async fn the_worker_refreshes_short_lived_tokens_half_way_not_on_every_tick() {
    let (app, fake) = spawn_with_fake().await;
    fake.set_access_token_lifetime("google", 120);
    let _id = connected(&app, &fake, "google", "g-1").await;
    let settings = WorkerSettings::default(); // 10 min window, much longer than the token
    app.clock.advance(Duration::seconds(10));
    let early = worker::tick(&app.state.services, &settings).await;
    assert_eq!((early.refreshed, early.not_due), (0, 1), "{early:?}");
    let again = worker::tick(&app.state.services, &settings).await;
    assert_eq!(
        again.not_due + again.refreshed,
        0,
        "deferred until due: {again:?}"
    );
    app.clock.advance(Duration::seconds(55));
    let due = worker::tick(&app.state.services, &settings).await;
    assert_eq!(due.refreshed, 1, "{due:?}");
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
}

#[tokio::test]
async fn reconnecting_while_a_revocation_is_queued_keeps_the_new_tokens() {
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "notion", "n-1").await;
    fake.push_fault("notion", Endpoint::Revoke, Fault::RetryAfter503(60));
    assert_eq!(
        disconnect(&app, &id).await["provider_revocation"],
        "pending"
    );
    let again = connected(&app, &fake, "notion", "n-1").await;
    assert_eq!(again, id, "the same account reactivates its integration");
    app.clock.advance(Duration::seconds(61));
    let report = worker::tick(&app.state.services, &WorkerSettings::default()).await;
    assert_eq!(
        report.revocations_attempted, 0,
        "the reconnect superseded the queued revocation"
    );
    let token = token_value(&app, &id).await;
    assert!(fake.is_token_active(&token));
    assert_eq!(status_of(&app, &id).await, "active");
}

/// The worker claims due rows in batches, then refreshes each under this process's lock of
/// the integration. A hand-out or a disconnect holding that lock meanwhile must not wait for
/// the claim: it is this process's own, and nothing refreshes under it while the lock is held.
/// (Each waited for the other before: the hand-out answered 503 after 20 s, and a disconnect
/// waited out the lease; the trace-level secrets test met it on PostgreSQL.)
#[tokio::test]
async fn this_process_s_own_worker_claim_blocks_neither_its_hand_out_nor_its_disconnect() {
    let (app, fake) = spawn_with_fake().await;
    let ctx = &app.state.services;
    let id = connected(&app, &fake, "google", "g-1").await;
    let claim = format!("{}:tick-test", ctx.instance_id);
    let claim_all = || async {
        let now = app.clock.now();
        let due = now + Duration::minutes(10);
        let until = now + ctx.lifecycle.lease;
        let claimed = app
            .db
            .claim_due_refreshes(&claim, now, due, until, 10)
            .await;
        assert_eq!(claimed.expect("claim").len(), 1);
    };
    let bounded = StdDuration::from_secs(10);
    // Expired: the hand-out must refresh, not wait for the claim.
    app.clock.advance(Duration::minutes(61));
    claim_all().await;
    let response = tokio::time::timeout(bounded, get_token(&app, &id))
        .await
        .expect("the hand-out waited for its own process's claim");
    assert_eq!(response.status(), 200);
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    app.clock.advance(Duration::minutes(61));
    claim_all().await;
    tokio::time::timeout(bounded, disconnect(&app, &id))
        .await
        .expect("the disconnect waited for its own process's claim");
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
}

/// Claims one due integration as a worker tick does, and reads it as the tick does after the
/// claim; `lease_for` sets how long the claim lasts.
async fn claimed_as_a_tick(
    app: &TestApp,
    id: &str,
    lease_for: Duration,
) -> (
    String,
    oauth_manager::storage::integrations::Integration,
    oauth_manager::storage::tokens::SealedTokens,
) {
    let ctx = &app.state.services;
    let claim = ctx.new_lease("tick-");
    let now = app.clock.now();
    let window = WorkerSettings::default().window;
    let claimed = app
        .db
        .claim_due_refreshes(&claim, now, now + window, now + lease_for, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let uuid = claimed[0];
    assert_eq!(uuid.to_string(), id);
    let integration = app.db.get_integrations(&[uuid]).await.expect("read");
    let sealed = app.db.get_tokens(uuid).await.expect("read").expect("row");
    let integration = integration.into_iter().next().expect("integration");
    (claim, integration, sealed)
}

/// The worker's refresh keeps the tick's claim as its lease without writing it again, so it
/// must still see, before calling the provider, a row changed since the tick read it: here a
/// reconnect that gave the integration new tokens. Refreshing from the tick's read would
/// overwrite them with tokens of the old grant.
#[tokio::test]
async fn the_worker_does_not_refresh_a_row_reconnected_since_its_claim() {
    use oauth_manager::services::tokens::refresh_claimed;
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    app.clock.advance(Duration::minutes(55));
    let (claim, integration, sealed) = claimed_as_a_tick(&app, &id, Duration::seconds(60)).await;
    let reconnected = connected(&app, &fake, "google", "g-1").await;
    assert_eq!(reconnected, id, "the same integration");
    let fresh = stored_tokens(&app, &json!({"integration_id": id}), "alice")
        .await
        .refresh_token
        .expect("rt");

    let window = WorkerSettings::default().window;
    let ctx = &app.state.services;
    let refreshed = refresh_claimed(ctx, &integration, sealed, window, &claim).await;
    assert!(!refreshed.expect("no error"), "nothing to refresh");
    assert_eq!(fake.count_grant("google", "refresh_token"), 0);
    let kept = stored_tokens(&app, &json!({"integration_id": id}), "alice")
        .await
        .refresh_token
        .expect("rt");
    assert_eq!(kept.expose_secret(), fresh.expose_secret());
}

/// A claim kept as the lease must outlast the refresh. One about to end (the tick took long
/// to reach this row) is renewed first, and the refresh still happens exactly once.
#[tokio::test]
async fn the_worker_renews_a_claim_too_short_for_a_refresh_and_refreshes_once() {
    use oauth_manager::services::tokens::refresh_claimed;
    let (app, fake) = spawn_with_fake().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    app.clock.advance(Duration::minutes(55));
    let ctx = &app.state.services;
    let short = ctx.lifecycle.longest_refresh() - Duration::seconds(1);
    let (claim, integration, sealed) = claimed_as_a_tick(&app, &id, short).await;
    let window = WorkerSettings::default().window;
    let refreshed = refresh_claimed(ctx, &integration, sealed, window, &claim).await;
    assert!(refreshed.expect("no error"), "refreshed");
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    // The lease is gone with the refresh: the next tick finds nothing due.
    let again = worker::tick(ctx, &WorkerSettings::default()).await;
    assert_eq!((again.refreshed, again.not_due), (0, 0), "{again:?}");
}

/// The background refresher renews a cached token that is in use, and adds none for an
/// integration nobody asked for: at thousands of refreshes a second it would otherwise crowd
/// the tokens in use out of the cache's 4,096 entries.
#[tokio::test]
async fn the_worker_renews_cached_tokens_in_use_and_caches_no_others() {
    let (app, fake) = spawn_with_fake().await;
    let in_use = connected(&app, &fake, "google", "g-1").await;
    let unused = connected(&app, &fake, "google", "g-2").await;
    let cache = &app.state.services.tokens_cache;
    let (in_use, unused) = (
        uuid::Uuid::parse_str(&in_use).expect("id"),
        uuid::Uuid::parse_str(&unused).expect("id"),
    );
    cache.forget(unused);
    assert_eq!(get_token(&app, &in_use.to_string()).await.status(), 200);
    let before = cache.get(in_use).expect("cached by the hand-out");
    let before = before.tokens.access_token.expose_secret().to_owned();

    app.clock.advance(Duration::minutes(55));
    let due = worker::tick(&app.state.services, &WorkerSettings::default()).await;
    assert_eq!(due.refreshed, 2, "{due:?}");
    let renewed = cache.get(in_use).expect("still cached");
    assert_ne!(renewed.tokens.access_token.expose_secret(), before);
    assert_eq!(
        renewed.tokens.access_token.expose_secret(),
        stored_tokens(&app, &json!({ "integration_id": in_use }), "alice")
            .await
            .access_token
            .expose_secret(),
        "the cache holds what was stored"
    );
    assert!(cache.get(unused).is_none(), "not in use: not cached");
}

/// No step holds one pooled connection while it waits for another: with a pool of one, such a
/// step would wait for itself until the acquire timeout. SQLite's default pool is only 2
/// (BENCHMARKS.md, session 12), so this keeps a step from needing more than the pool has.
#[tokio::test]
async fn every_step_works_with_a_single_database_connection() {
    let (app, fake) = spawn_with_fake_and(&[("OAUTH_DATABASE_MAX_CONNECTIONS", "1")]).await;
    let bounded = StdDuration::from_secs(20);
    let id = tokio::time::timeout(bounded, connected(&app, &fake, "google", "g-1"))
        .await
        .expect("the connect flow waited for a connection");
    app.clock.advance(Duration::minutes(61));
    let callers: Vec<_> = (0..8).map(|_| spawn_token_call(&app, &id)).collect();
    for caller in callers {
        tokio::time::timeout(bounded, caller)
            .await
            .expect("a hand-out waited for a connection")
            .expect("task");
    }
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    app.clock.advance(Duration::minutes(52));
    let tick = tokio::time::timeout(
        bounded,
        worker::tick(&app.state.services, &WorkerSettings::default()),
    )
    .await
    .expect("the worker waited for a connection");
    assert_eq!(tick.refreshed, 1, "{tick:?}");
    let body = tokio::time::timeout(bounded, disconnect(&app, &id))
        .await
        .expect("the disconnect waited for a connection");
    assert_eq!(body["provider_revocation"], "revoked");
}
