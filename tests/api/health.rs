//! Health, readiness, request ids, fallbacks, the OpenAPI document.

use reqwest::header::HeaderValue;
use serde_json::Value;

use crate::support::{problem, spawn_app};

#[tokio::test]
async fn healthz_and_readyz_answer_without_authentication() {
    let app = spawn_app().await;
    let health = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("request");
    assert_eq!(health.status(), 200);
    let ready = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("request");
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<Value>().await.expect("json")["status"],
        "ready"
    );
}

#[tokio::test]
async fn readyz_reports_503_when_the_database_is_gone() {
    let app = spawn_app().await;
    app.db.close().await;
    let response = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("request");
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = problem(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("database_unavailable"))
    );
    // Liveness does not depend on the database.
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("request")
            .status(),
        200
    );
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_keeps_a_given_one() {
    let app = spawn_app().await;
    let generated = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("request");
    let id = generated
        .headers()
        .get("x-request-id")
        .expect("request id")
        .to_str()
        .expect("ascii");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let given = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .expect("request");
    assert_eq!(given.headers()["x-request-id"], "trace-me-42");
}

#[tokio::test]
async fn an_unusable_request_id_is_replaced_by_a_fresh_one() {
    let app = spawn_app().await;
    // A newline cannot even reach the service (HTTP forbids it in a header value); these can.
    let unusable = [
        HeaderValue::from_str(&"a".repeat(300)).expect("header"),
        HeaderValue::from_static("forged\" level=\"error"),
        HeaderValue::from_static("tab\there"),
        HeaderValue::from_bytes("caf\u{e9}".as_bytes()).expect("header"),
    ];
    for given in unusable {
        let response = app
            .http
            .get(app.url("/healthz"))
            .header("x-request-id", given.clone())
            .send()
            .await
            .expect("request");
        let id = response.headers()["x-request-id"].to_str().expect("ascii");
        assert!(
            uuid::Uuid::parse_str(id).is_ok(),
            "{given:?} was kept as {id:?}"
        );
    }
    let longest = "a1._:-".repeat(21) + "ab";
    let kept = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", &longest)
        .send()
        .await
        .expect("request");
    assert_eq!(kept.headers()["x-request-id"], longest.as_str());
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = spawn_app().await;
    let (status, body) = problem(
        app.http
            .get(app.url("/nope"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = problem(
        app.http
            .delete(app.url("/healthz"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
}

#[tokio::test]
async fn api_responses_are_never_cached() {
    let app = spawn_app().await;
    let response = app
        .get_as("/api/v1/oauth/providers", "alice", &["user"])
        .await;
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let app = spawn_app().await;
    assert_eq!(
        app.http
            .get(app.url("/api/v1/oauth/openapi.json"))
            .send()
            .await
            .expect("request")
            .status(),
        401
    );
    let doc: Value = app
        .get_as("/api/v1/oauth/openapi.json", "alice", &[])
        .await
        .json()
        .await
        .expect("json");
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    let paths = doc["paths"].as_object().expect("paths");
    for route in [
        "/healthz",
        "/readyz",
        "/api/v1/oauth/openapi.json",
        "/api/v1/oauth/providers",
        "/api/v1/oauth/integrations",
        "/api/v1/oauth/integrations/{id}",
        "/api/v1/oauth/integrations/{id}/token",
        "/api/v1/oauth/integrations/{id}/refresh",
        "/api/v1/oauth/providers/{provider}/authorize",
        "/api/v1/oauth/callback/{provider}",
        "/api/v1/oauth/providers/{provider}/scopes",
        "/api/v1/oauth/features",
        "/api/v1/oauth/integrations/{id}/features",
        "/api/v1/oauth/consents",
        "/api/v1/oauth/consents/{id}/withdraw",
        "/api/v1/oauth/audit",
        "/api/v1/oauth/users/{user_id}/export",
        "/api/v1/oauth/users/{user_id}",
    ] {
        assert!(
            paths.contains_key(route),
            "{route} missing from the OpenAPI document"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}
