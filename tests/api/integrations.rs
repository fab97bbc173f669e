//! RBAC on the integrations routes: each role, cross-user 404, listing scope, pagination.

use serde_json::Value;

use crate::support::{audit_events, problem, spawn_app, spawn_app_with};

const LIST: &str = "/api/v1/oauth/integrations";

async fn ids(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test]
async fn a_user_sees_only_their_own_integrations() {
    let app = spawn_app().await;
    let alice = app.seed_integration("alice", "google").await;
    let bob = app.seed_integration("bob", "google").await;
    assert_eq!(
        ids(app.get_as(LIST, "alice", &["user"]).await).await,
        [alice.id.to_string()]
    );
    let own = app
        .get_as(&format!("{LIST}/{}", alice.id), "alice", &["user"])
        .await;
    assert_eq!(own.status(), 200);
    // Someone else's object is "not found", exactly like a missing one: no existence oracle.
    let (status, theirs) = problem(
        app.get_as(&format!("{LIST}/{}", bob.id), "alice", &["user"])
            .await,
    )
    .await;
    let (_, missing) = problem(
        app.get_as(
            &format!("{LIST}/{}", uuid::Uuid::now_v7()),
            "alice",
            &["user"],
        )
        .await,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(theirs, missing);
    // Asking for another user's list needs a role that reaches every user.
    let (status, body) = problem(
        app.get_as(&format!("{LIST}?user_id=bob"), "alice", &["user"])
            .await,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    // … and the refused attempt is in bob's audit trail, like every other 403.
    let denied: Vec<_> = audit_events(&app, Some("bob"))
        .await
        .items
        .into_iter()
        .filter(|event| event.action == "authorization_denied")
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].actor_user_id.as_deref(), Some("alice"));
    assert_eq!(denied[0].reason.as_deref(), Some("integrations_list"));
    assert_eq!(
        ids(app
            .get_as(&format!("{LIST}?user_id=alice"), "alice", &["user"])
            .await)
        .await,
        [alice.id.to_string()]
    );
}

#[tokio::test]
async fn service_and_admin_reach_every_user() {
    let app = spawn_app().await;
    let alice = app.seed_integration("alice", "google").await;
    let bob = app.seed_integration("bob", "notion").await;
    for role in ["service", "admin"] {
        assert_eq!(
            ids(app
                .get_as(&format!("{LIST}?user_id=bob"), "backend", &[role])
                .await)
            .await,
            [bob.id.to_string()],
            "{role}"
        );
        let all = ids(app.get_as(LIST, "backend", &[role]).await).await;
        assert_eq!(all, [alice.id.to_string(), bob.id.to_string()], "{role}");
        let one = app
            .get_as(&format!("{LIST}/{}", alice.id), "backend", &[role])
            .await;
        assert_eq!(one.status(), 200, "{role}");
    }
}

#[tokio::test]
async fn callers_without_the_permission_get_403() {
    let app = spawn_app().await;
    let integration = app.seed_integration("alice", "google").await;
    for roles in [&[][..], &["guest"][..]] {
        let (status, body) = problem(app.get_as(LIST, "alice", roles).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("forbidden")),
            "{roles:?}"
        );
        let (status, _) = problem(
            app.get_as(&format!("{LIST}/{}", integration.id), "alice", roles)
                .await,
        )
        .await;
        assert_eq!(status, 403);
        // Authentication alone is enough for the provider list.
        assert_eq!(
            app.get_as("/api/v1/oauth/providers", "alice", roles)
                .await
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn the_role_map_is_configurable() {
    let app = spawn_app_with(&[(
        "OAUTH_ROLE_PERMISSIONS",
        r#"{"auditor": ["integrations:read@any"], "user": []}"#,
    )])
    .await;
    let bob = app.seed_integration("bob", "google").await;
    assert_eq!(
        ids(app.get_as(LIST, "eve", &["auditor"]).await).await,
        [bob.id.to_string()]
    );
    assert_eq!(app.get_as(LIST, "bob", &["user"]).await.status(), 403);
}

#[tokio::test]
async fn listing_filters_and_paginates_with_opaque_cursors() {
    let app = spawn_app().await;
    let mut expected = Vec::new();
    for provider in ["google", "notion", "google", "microsoft", "google"] {
        expected.push((
            app.seed_integration("alice", provider).await.id.to_string(),
            provider,
        ));
    }
    let google: Vec<String> = expected
        .iter()
        .filter(|(_, p)| *p == "google")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        ids(app
            .get_as(&format!("{LIST}?provider=google"), "alice", &["user"])
            .await)
        .await,
        google
    );
    assert!(ids(app
        .get_as(&format!("{LIST}?status=revoked"), "alice", &["user"])
        .await)
    .await
    .is_empty());

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("{LIST}?limit=2&cursor={c}"),
            None => format!("{LIST}?limit=2"),
        };
        let body: Value = app
            .get_as(&path, "alice", &["user"])
            .await
            .json()
            .await
            .expect("json");
        let page: Vec<String> = body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_owned())
            .collect();
        assert!(page.len() <= 2);
        seen.extend(page);
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let all: Vec<String> = expected.into_iter().map(|(id, _)| id).collect();
    assert_eq!(seen, all);
}

#[tokio::test]
async fn bad_query_input_is_a_400_problem() {
    let app = spawn_app().await;
    for (query, code) in [
        ("?limit=0", "invalid_limit"),
        ("?limit=5000", "invalid_limit"),
        ("?limit=abc", "invalid_query"),
        ("?cursor=not-a-cursor", "invalid_cursor"),
        ("?status=sleeping", "invalid_query"),
        ("?colour=blue", "invalid_query"),
    ] {
        let (status, body) = problem(
            app.get_as(&format!("{LIST}{query}"), "alice", &["user"])
                .await,
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some(code)),
            "{query}"
        );
    }
    let (status, body) = problem(
        app.get_as(&format!("{LIST}/not-a-uuid"), "alice", &["user"])
            .await,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_path")));
}

#[tokio::test]
async fn integration_views_show_missing_scopes_and_no_token_fields() {
    let app = spawn_app().await;
    let integration = app.seed_integration("alice", "google").await;
    let body: Value = app
        .get_as(&format!("{LIST}/{}", integration.id), "alice", &["user"])
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["missing_scopes"], serde_json::json!(["calendar"]));
    assert_eq!(body["status"], "active");
    let text = body.to_string();
    for forbidden in ["access_token", "refresh_token", "id_token", "key_id"] {
        assert!(!text.contains(forbidden), "{forbidden} in {text}");
    }
}
