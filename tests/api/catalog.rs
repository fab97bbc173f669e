//! The scope catalog in `oauth_scopes`, features, and progressive activation.

use serde_json::{json, Value};

use crate::connect::{connect, integration};
use crate::support::fake_provider::Consent;
use crate::support::{problem, spawn_app, spawn_with_fake};

async fn get_json(app: &crate::support::TestApp, path: &str, roles: &[&str]) -> Value {
    let response = app.get_as(path, "alice", roles).await;
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.expect("json")
}

fn entry<'a>(items: &'a Value, scope: &str) -> &'a Value {
    items["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|item| item["scope"] == scope)
        .unwrap_or_else(|| panic!("{scope} not in the catalog"))
}

#[tokio::test]
async fn the_built_in_catalog_is_seeded_with_words_sensitivity_and_features() {
    let app = spawn_app().await;
    let google = get_json(&app, "/api/v1/oauth/providers/google/scopes", &[]).await;
    let calendar = entry(&google, "https://www.googleapis.com/auth/calendar.readonly");
    assert_eq!(calendar["sensitivity"], "sensitive");
    assert_eq!(calendar["features"], json!(["calendar.read"]));
    assert!(calendar["description"]
        .as_str()
        .expect("words")
        .contains("calendars"));
    assert_eq!(
        entry(&google, "https://www.googleapis.com/auth/gmail.readonly")["sensitivity"],
        "restricted"
    );
    assert_eq!(entry(&google, "openid")["is_default"], true);
    for (provider, scope) in [
        ("microsoft", "Mail.Send"),
        ("microsoft", "Files.ReadWrite"),
        ("youtube", "https://www.googleapis.com/auth/youtube"),
        ("notion", "workspace"),
    ] {
        let catalog = get_json(
            &app,
            &format!("/api/v1/oauth/providers/{provider}/scopes"),
            &[],
        )
        .await;
        entry(&catalog, scope);
    }
    let notion = get_json(&app, "/api/v1/oauth/providers/notion/scopes", &[]).await;
    assert!(entry(&notion, "workspace")["description"]
        .as_str()
        .expect("words")
        .contains("integration"));
    let (status, body) = problem(
        app.get_as("/api/v1/oauth/providers/myspace/scopes", "alice", &[])
            .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_provider"))
    );
}

#[tokio::test]
async fn features_list_which_providers_serve_them_with_minimal_scopes() {
    let app = spawn_app().await;
    let features = get_json(&app, "/api/v1/oauth/features", &[]).await;
    let feature = |name: &str| {
        features["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|f| f["feature"] == name)
            .cloned()
            .expect(name)
    };
    assert_eq!(
        feature("calendar.read")["providers"],
        json!({"google": ["https://www.googleapis.com/auth/calendar.readonly"], "microsoft": ["Calendars.Read"]})
    );
    assert_eq!(
        feature("email.send")["providers"]["microsoft"],
        json!(["Mail.Send"])
    );
    assert_eq!(
        feature("youtube.read")["providers"],
        json!({"youtube": ["https://www.googleapis.com/auth/youtube.readonly"]})
    );
    assert_eq!(
        feature("workspace")["providers"],
        json!({"notion": ["workspace"]})
    );
}

#[tokio::test]
async fn admins_extend_the_catalog_and_their_edits_survive_a_restart() {
    let (app, fake) = spawn_with_fake().await;
    let body = json!({
        "scope": "https://www.googleapis.com/auth/tasks",
        "description": "Create, edit and delete your tasks",
        "sensitivity": "sensitive",
        "features": ["tasks"],
    });
    let post = |roles: &'static [&'static str], body: Value| {
        let request = app
            .http
            .post(app.url("/api/v1/oauth/providers/google/scopes"))
            .bearer_auth(app.token("alice", roles))
            .json(&body);
        async move { request.send().await.expect("request") }
    };
    let (status, _) = problem(post(&["user"], body.clone()).await).await;
    assert_eq!(status, 403);
    assert_eq!(post(&["admin"], body).await.status(), 200);
    let edit = json!({"scope": "openid", "description": "Sign in with Google (edited)", "sensitivity": "basic", "features": ["profile"]});
    assert_eq!(post(&["admin"], edit).await.status(), 200);
    let (status, body) = problem(
        post(
            &["admin"],
            json!({"scope": "has space", "description": "x", "sensitivity": "basic"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_scope"))
    );

    // The new feature can be requested at once.
    let (status, result) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({"features": ["tasks"]}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    let view = integration(&app, "alice", &result).await;
    assert!(view["granted_scopes"]
        .as_array()
        .expect("granted")
        .contains(&json!("https://www.googleapis.com/auth/tasks")));

    // A restart re-seeds the catalog without undoing the admin's edit.
    let restarted = app.sibling().await;
    let google = get_json(&restarted, "/api/v1/oauth/providers/google/scopes", &[]).await;
    assert_eq!(
        entry(&google, "openid")["description"],
        "Sign in with Google (edited)"
    );
    let events = crate::support::audit_events(&app, None).await;
    assert!(events
        .items
        .iter()
        .any(|e| e.action == "catalog_updated" && e.actor_user_id.as_deref() == Some("alice")));
    assert!(events
        .items
        .iter()
        .any(|e| e.action == "authorization_denied" && e.reason.as_deref() == Some("admin")));
}

#[tokio::test]
async fn an_integration_reports_enabled_features_and_what_the_others_need() {
    let (app, fake) = spawn_with_fake().await;
    let (_, result) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({"features": ["calendar.read"]}),
    )
    .await;
    let id = result["integration_id"].as_str().expect("id");
    let features = get_json(
        &app,
        &format!("/api/v1/oauth/integrations/{id}/features"),
        &["user"],
    )
    .await;
    let enabled: Vec<String> =
        serde_json::from_value(features["enabled"].clone()).expect("enabled");
    assert!(
        enabled.contains(&"calendar.read".to_owned()) && enabled.contains(&"profile".to_owned())
    );
    assert_eq!(
        features["available"]["calendar.write"],
        json!(["https://www.googleapis.com/auth/calendar"])
    );
    assert_eq!(
        features["available"]["email.send"],
        json!(["https://www.googleapis.com/auth/gmail.send"])
    );
    assert!(features["available"].get("calendar.read").is_none());

    // Progressive activation: ask for the missing feature on the same integration. Google is
    // asked for the defaults and what is missing, not for what is held already.
    let url = {
        let response = app
            .http
            .post(app.url("/api/v1/oauth/providers/google/authorize"))
            .bearer_auth(app.token("alice", &["user"]))
            .json(&json!({"integration_id": id, "features": ["calendar.read", "calendar.write"]}))
            .send()
            .await
            .expect("authorize");
        let body: Value = response.json().await.expect("json");
        body["authorization_url"].as_str().expect("url").to_owned()
    };
    let scope: String = url::Url::parse(&url)
        .expect("url")
        .query_pairs()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.into_owned())
        .expect("scope");
    let mut asked: Vec<&str> = scope.split(' ').collect();
    asked.sort_unstable();
    assert_eq!(
        asked,
        [
            "email",
            "https://www.googleapis.com/auth/calendar",
            "openid",
            "profile"
        ]
    );
    let (_, again) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({"integration_id": id, "features": ["calendar.write"]}),
    )
    .await;
    assert_eq!(again["integration_id"], result["integration_id"]);
    let features = get_json(
        &app,
        &format!("/api/v1/oauth/integrations/{id}/features"),
        &["user"],
    )
    .await;
    assert!(features["enabled"]
        .as_array()
        .expect("enabled")
        .contains(&json!("calendar.write")));
    // Someone else's integration: 404 like a missing one.
    let response = app
        .get_as(
            &format!("/api/v1/oauth/integrations/{id}/features"),
            "bob",
            &["user"],
        )
        .await;
    assert_eq!(response.status(), 404);
}
