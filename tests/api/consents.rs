//! Consent records and withdrawal.

use serde_json::{json, Value};

use crate::connect::connect;
use crate::support::fake_provider::{Consent, Endpoint};
use crate::support::{count_rows, problem, spawn_with_fake};

#[tokio::test]
async fn users_see_their_own_consents_and_admins_anyones() {
    let (app, fake) = spawn_with_fake().await;
    connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({"features": ["calendar.read"]}),
    )
    .await;
    let mine: Value = app
        .get_as("/api/v1/oauth/consents", "alice", &["user"])
        .await
        .json()
        .await
        .expect("json");
    let consent = &mine["items"][0];
    assert_eq!(consent["provider"], "google");
    assert!(consent["scopes_granted"]
        .as_array()
        .expect("granted")
        .contains(&json!("https://www.googleapis.com/auth/calendar.readonly")));
    assert_eq!(consent["scopes_denied"], json!([]));
    assert!(consent["descriptions_shown"]
        .as_array()
        .expect("shown")
        .iter()
        .any(|d| d["description"].as_str().is_some()));
    assert!(
        consent["client_ip"].as_str().is_some(),
        "the authorizing browser's address"
    );
    let bobs: Value = app
        .get_as("/api/v1/oauth/consents", "bob", &["user"])
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(bobs["items"], json!([]));
    let (status, _) = problem(
        app.get_as("/api/v1/oauth/consents?user_id=alice", "bob", &["user"])
            .await,
    )
    .await;
    assert_eq!(status, 403);
    let admin: Value = app
        .get_as("/api/v1/oauth/consents?user_id=alice", "root", &["admin"])
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(admin["items"].as_array().expect("items").len(), 1);
}

#[tokio::test]
async fn withdrawing_a_consent_disconnects_its_integration() {
    let (app, fake) = spawn_with_fake().await;
    let (_, result) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({}),
    )
    .await;
    let id = result["integration_id"].as_str().expect("id").to_owned();
    let mine: Value = app
        .get_as("/api/v1/oauth/consents", "alice", &["user"])
        .await
        .json()
        .await
        .expect("json");
    let consent_id = mine["items"][0]["id"]
        .as_str()
        .expect("consent id")
        .to_owned();
    let withdraw = |user: &str| {
        let request = app
            .http
            .post(app.url(&format!("/api/v1/oauth/consents/{consent_id}/withdraw")))
            .bearer_auth(app.token(user, &["user"]));
        async move { request.send().await.expect("withdraw") }
    };
    assert_eq!(
        withdraw("bob").await.status(),
        404,
        "someone else's consent"
    );
    let response = withdraw("alice").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert!(body["consent"]["withdrawn_at"].as_str().is_some());
    assert_eq!(body["integration_disconnected"], "revoked");
    assert_eq!(fake.count("google", Endpoint::Revoke), 1);
    assert_eq!(count_rows(&app.db, "oauth_tokens").await, 0);
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
    assert_eq!(view["status"], "revoked");
    // Idempotent: the consent stays withdrawn and nothing is revoked twice.
    let again: Value = withdraw("alice").await.json().await.expect("json");
    assert!(again["integration_disconnected"].is_null());
    assert_eq!(fake.count("google", Endpoint::Revoke), 1);
    let events = crate::support::audit_events(&app, Some("alice")).await;
    assert_eq!(
        events
            .items
            .iter()
            .filter(|e| e.action == "consent_withdrawn")
            .count(),
        1
    );
}

#[tokio::test]
async fn withdrawing_an_old_consent_after_a_reconnect_changes_nothing_and_only_admins_list_others()
{
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
    let mine: Value = app
        .get_as("/api/v1/oauth/consents", "alice", &["user"])
        .await
        .json()
        .await
        .expect("json");
    let old = mine["items"][0]["id"].as_str().expect("consent").to_owned();
    let withdraw = |id: String| {
        let request = app
            .http
            .post(app.url(&format!("/api/v1/oauth/consents/{id}/withdraw")))
            .bearer_auth(app.token("alice", &["user"]));
        async move {
            request
                .send()
                .await
                .expect("withdraw")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    assert_eq!(
        withdraw(old.clone()).await["integration_disconnected"],
        "revoked"
    );
    let (_, again) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({}),
    )
    .await;
    assert_eq!(again["integration_id"], first["integration_id"]);
    let body = withdraw(old).await;
    assert!(body["integration_disconnected"].is_null(), "{body}");
    let id = again["integration_id"].as_str().expect("id");
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
    assert_eq!(
        view["status"], "active",
        "the reconnected integration stays"
    );
    // Consent records hold browsers' addresses: a service may not list other users'.
    let (status, _) = problem(
        app.get_as(
            "/api/v1/oauth/consents?user_id=alice",
            "backend",
            &["service"],
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
}
