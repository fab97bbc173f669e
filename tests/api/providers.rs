//! `GET /api/v1/oauth/providers`.

use serde_json::Value;

use crate::support::{spawn_app, spawn_app_with};

async fn providers(app: &crate::support::TestApp) -> Vec<Value> {
    providers_as(app, &["admin"]).await
}

async fn providers_as(app: &crate::support::TestApp, roles: &[&str]) -> Vec<Value> {
    let body: Value = app
        .get_as("/api/v1/oauth/providers", "alice", roles)
        .await
        .json()
        .await
        .expect("json");
    body["items"].as_array().expect("items").clone()
}

#[tokio::test]
async fn the_four_built_ins_are_listed_unconfigured_by_default() {
    let app = spawn_app().await;
    let items = providers(&app).await;
    let names: Vec<&str> = items
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["google", "microsoft", "notion", "youtube"]);
    for item in &items {
        assert_eq!(item["configured"], false);
        assert_eq!(
            item["missing_variables"].as_array().expect("missing").len(),
            2
        );
    }
    let notion = &items[2];
    assert_eq!(notion["display_name"], "Notion");
    assert_eq!(notion["supports_pkce"], false);
    assert_eq!(
        notion["redirect_uri"],
        "https://oauth.example.test/api/v1/oauth/callback/notion"
    );
    assert_eq!(
        items[1]["supports_revocation"], false,
        "Microsoft has no revocation endpoint"
    );
}

#[tokio::test]
async fn configured_follows_the_environment_and_never_shows_secrets() {
    let app = spawn_app_with(&[
        ("GOOGLE_CLIENT_ID", "google-id.apps.googleusercontent.com"),
        ("GOOGLE_CLIENT_SECRET", "GOCSPX-very-secret"),
        ("MICROSOFT_CLIENT_ID", "ms-id"),
    ])
    .await;
    let items = providers(&app).await;
    let by_name = |name: &str| {
        items
            .iter()
            .find(|p| p["name"] == name)
            .expect("listed")
            .clone()
    };
    assert_eq!(by_name("google")["configured"], true);
    assert_eq!(
        by_name("youtube")["configured"],
        true,
        "YouTube falls back to Google's client"
    );
    let microsoft = by_name("microsoft");
    assert_eq!(microsoft["configured"], false);
    assert_eq!(
        microsoft["missing_variables"],
        serde_json::json!(["MICROSOFT_CLIENT_SECRET"])
    );
    let text = Value::Array(items).to_string();
    assert!(!text.contains("GOCSPX-very-secret"));
}

#[tokio::test]
async fn only_admins_see_which_variables_are_missing() {
    let app = spawn_app().await;
    for item in providers_as(&app, &["user"]).await {
        assert!(item.get("missing_variables").is_none(), "{item}");
        assert_eq!(item["configured"], false);
    }
}
