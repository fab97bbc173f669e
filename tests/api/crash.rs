//! Crash safety: a real `oauth-manager serve` process killed with SIGKILL in the middle of a
//! refresh leaves a connection that a restarted process refreshes.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::connect::connect;
use crate::support::fake_provider::{Consent, Endpoint, Fault};
use crate::support::process::{start_server, Server};
use crate::support::{spawn_with_fake, TestApp};

async fn get_token(app: &TestApp, server: &Server, id: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!(
            "{}/api/v1/oauth/integrations/{id}/token",
            server.base
        ))
        .bearer_auth(app.token("backend", &["service"]))
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn kill_9_mid_refresh_then_restart_leaves_a_working_connection() {
    // Google keeps its refresh token; Microsoft rotates it but keeps the old one valid.
    for (provider, subject) in [("google", "g-1"), ("microsoft", "oid-1")] {
        kill_9_mid_refresh(provider, subject).await;
    }
}

async fn kill_9_mid_refresh(provider: &str, subject: &str) {
    let (app, fake) = spawn_with_fake().await;
    // Tokens that expire in real time, for the real process's clock.
    fake.set_access_token_lifetime(provider, 2);
    let (_, result) = connect(
        &app,
        &fake,
        provider,
        "alice",
        Consent::user(subject),
        json!({}),
    )
    .await;
    let id = result["integration_id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let server = start_server(&app);
    fake.push_fault(
        provider,
        Endpoint::Token,
        Fault::Latency(Duration::from_secs(3)),
    );
    let pending = {
        let (app_token, url) = (
            app.token("backend", &["service"]),
            format!("{}/api/v1/oauth/integrations/{id}/token", server.base),
        );
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(app_token)
                .send()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.count_grant(provider, "refresh_token") == 0 {
        assert!(
            Instant::now() < deadline,
            "the refresh never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(server); // SIGKILL while the provider is still answering
    assert!(
        pending.await.expect("task").is_err(),
        "the caller saw the process die"
    );

    let restarted = start_server(&app);
    let response = get_token(&app, &restarted, &id).await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let body: Value = get_token(&app, &restarted, &id)
        .await
        .json()
        .await
        .expect("json");
    let token = body["access_token"].as_str().expect("token");
    assert!(
        fake.is_token_active(token),
        "the handed-out token works at the provider"
    );
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
}

#[tokio::test]
async fn two_serve_processes_on_one_database_refresh_once() {
    let (app, fake) = spawn_with_fake().await;
    // acme rotates refresh tokens strictly and revokes the grant when an old one is replayed.
    fake.set_access_token_lifetime("acme", 2);
    let (_, result) = connect(
        &app,
        &fake,
        "acme",
        "alice",
        Consent::user("a-1"),
        json!({}),
    )
    .await;
    let id = result["integration_id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let servers = [start_server(&app), start_server(&app)];
    fake.push_fault(
        "acme",
        Endpoint::Token,
        Fault::Latency(Duration::from_millis(300)),
    );
    let token = app.token("backend", &["service"]);
    let mut calls = Vec::new();
    for n in 0..40 {
        let url = format!(
            "{}/api/v1/oauth/integrations/{id}/token",
            servers[n % 2].base
        );
        let token = token.clone();
        calls.push(tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
        }));
    }
    for call in calls {
        assert_eq!(call.await.expect("task").expect("response").status(), 200);
    }
    assert_eq!(
        fake.count_grant("acme", "refresh_token"),
        1,
        "one refresh across both processes"
    );
    let body: Value = get_token(&app, &servers[1], &id)
        .await
        .json()
        .await
        .expect("json");
    assert!(
        fake.is_token_active(body["access_token"].as_str().expect("token")),
        "the grant is alive"
    );
}
