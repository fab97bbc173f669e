//! Data export and erasure; audit isolation; denied access is audited.

use serde_json::{json, Value};

use crate::connect::connect;
use crate::support::fake_provider::{Consent, Endpoint};
use crate::support::{count_rows, problem, spawn_with_fake, TestApp};
use oauth_manager::storage::Database;

async fn audit_rows_mentioning(app: &TestApp, needle: &str) -> i64 {
    let sql = "SELECT COUNT(*) FROM oauth_audit_log WHERE actor_user_id = $1 OR subject_user_id = $1 \
               OR client_ip = $1 OR user_agent LIKE '%' || $1 || '%' OR details LIKE '%' || $1 || '%'";
    let pg_sql = sql.replace("details LIKE", "details::text LIKE");
    match &app.db {
        Database::Postgres(pool) => {
            sqlx::query_scalar(&pg_sql)
                .bind(needle)
                .fetch_one(pool)
                .await
        }
        Database::Sqlite(pool, _) => sqlx::query_scalar(sql).bind(needle).fetch_one(pool).await,
    }
    .expect("count")
}

#[tokio::test]
async fn an_export_holds_everything_about_the_user_and_no_secret() {
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
    connect(
        &app,
        &fake,
        "notion",
        "alice",
        Consent::user("n-1"),
        json!({}),
    )
    .await;
    connect(
        &app,
        &fake,
        "google",
        "bob",
        Consent::user("g-2"),
        json!({}),
    )
    .await;
    let response = app
        .get_as("/api/v1/oauth/users/alice/export", "alice", &[])
        .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    let export: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        export["integrations"]
            .as_array()
            .expect("integrations")
            .len(),
        2
    );
    assert_eq!(export["consents"].as_array().expect("consents").len(), 2);
    assert!(export["audit_events"]
        .as_array()
        .expect("events")
        .iter()
        .all(|e| e["subject_user_id"] == "alice"));
    assert!(!text.contains("g-2"), "nothing of bob's");
    for provider in ["google", "notion"] {
        for token in fake.issued_tokens(provider) {
            assert!(!text.contains(&token.token), "a token value in the export");
        }
    }
    let (status, _) = problem(
        app.get_as("/api/v1/oauth/users/alice/export", "bob", &["user"])
            .await,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        app.get_as("/api/v1/oauth/users/alice/export", "root", &["admin"])
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn erasure_revokes_deletes_and_pseudonymises_while_the_chain_still_verifies() {
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
    connect(
        &app,
        &fake,
        "notion",
        "alice",
        Consent::user("n-1"),
        json!({}),
    )
    .await;
    connect(
        &app,
        &fake,
        "google",
        "bob",
        Consent::user("g-2"),
        json!({}),
    )
    .await;
    // A pending authorization of alice's too.
    app.http
        .post(app.url("/api/v1/oauth/providers/google/authorize"))
        .bearer_auth(app.token("alice", &["user"]))
        .send()
        .await
        .expect("authorize");
    assert!(audit_rows_mentioning(&app, "alice").await > 0);
    let (status, _) = problem(
        app.http
            .delete(app.url("/api/v1/oauth/users/alice"))
            .bearer_auth(app.token("bob", &["user"]))
            .send()
            .await
            .expect("delete"),
    )
    .await;
    assert_eq!(status, 403, "only the user or an admin");
    let response = app
        .http
        .delete(app.url("/api/v1/oauth/users/alice"))
        .bearer_auth(app.token("alice", &[]))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["integrations_deleted"], 2);
    assert_eq!(body["provider_revocations_confirmed"], 2);
    assert_eq!(
        fake.count("google", Endpoint::Revoke) + fake.count("notion", Endpoint::Revoke),
        2
    );
    for (table, remaining) in [
        ("oauth_integrations", 1),
        ("oauth_tokens", 1),
        ("oauth_consents", 1),
        ("oauth_state", 1),
    ] {
        assert_eq!(
            count_rows(&app.db, table).await,
            remaining,
            "{table}: only bob's rows stay"
        );
    }
    let alice_states: i64 = match &app.db {
        Database::Postgres(pool) => {
            sqlx::query_scalar("SELECT COUNT(*) FROM oauth_state WHERE user_id = 'alice'")
                .fetch_one(pool)
                .await
        }
        Database::Sqlite(pool, _) => {
            sqlx::query_scalar("SELECT COUNT(*) FROM oauth_state WHERE user_id = 'alice'")
                .fetch_one(pool)
                .await
        }
    }
    .expect("count");
    assert_eq!(alice_states, 0, "alice's pending authorizations are gone");
    assert_eq!(
        audit_rows_mentioning(&app, "alice").await,
        0,
        "no audit row names alice any more"
    );
    assert!(
        count_rows(&app.db, "oauth_audit_log").await > 0,
        "audit rows are kept"
    );
    let report = oauth_manager::services::audit::verify(&app.db)
        .await
        .expect("verify");
    assert!(report.first_problem.is_none(), "{:?}", report.first_problem);
}

#[tokio::test]
async fn looking_at_someone_elses_integration_is_a_404_and_is_audited() {
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
    let id = result["integration_id"].as_str().expect("id");
    let response = app
        .get_as(
            &format!("/api/v1/oauth/integrations/{id}"),
            "mallory",
            &["user"],
        )
        .await;
    assert_eq!(response.status(), 404);
    let response = app
        .get_as(
            &format!("/api/v1/oauth/integrations/{id}/token"),
            "mallory",
            &["user"],
        )
        .await;
    assert_eq!(response.status(), 403, "no tokens:read at all");
    let events = crate::support::audit_events(&app, Some("alice")).await;
    let denied: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.action == "access_denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].actor_user_id.as_deref(), Some("mallory"));
    assert_eq!(denied[0].outcome, "denied");
}

#[tokio::test]
async fn users_see_only_their_own_audit_events_and_admins_filter_all() {
    let (app, fake) = spawn_with_fake().await;
    let (_, alice) = connect(
        &app,
        &fake,
        "google",
        "alice",
        Consent::user("g-1"),
        json!({}),
    )
    .await;
    connect(
        &app,
        &fake,
        "google",
        "bob",
        Consent::user("g-2"),
        json!({}),
    )
    .await;
    let events = |user: &str, roles: &[&str], query: &str| {
        let request = app
            .http
            .get(app.url(&format!("/api/v1/oauth/audit{query}")))
            .bearer_auth(app.token(user, roles));
        async move { request.send().await.expect("audit") }
    };
    let mine: Value = events("alice", &["user"], "")
        .await
        .json()
        .await
        .expect("json");
    let items = mine["items"].as_array().expect("items");
    assert!(!items.is_empty());
    assert!(
        items.iter().all(|e| e["subject_user_id"] == "alice"),
        "{mine}"
    );
    let (status, _) = problem(events("alice", &["user"], "?user_id=bob").await).await;
    assert_eq!(status, 403);
    let bobs: Value = events("root", &["admin"], "?user_id=bob&action=callback")
        .await
        .json()
        .await
        .expect("json");
    let items = bobs["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["subject_user_id"], "bob");
    let id = alice["integration_id"].as_str().expect("id");
    let by_integration: Value = events("root", &["admin"], &format!("?integration_id={id}"))
        .await
        .json()
        .await
        .expect("json");
    assert!(by_integration["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|e| e["integration_id"] == id));
    let paged: Value = events("root", &["admin"], "?limit=1")
        .await
        .json()
        .await
        .expect("json");
    let cursor = paged["next_cursor"].as_str().expect("more pages");
    let next: Value = events("root", &["admin"], &format!("?limit=1&cursor={cursor}"))
        .await
        .json()
        .await
        .expect("json");
    assert!(next["items"][0]["id"].as_i64() > paged["items"][0]["id"].as_i64());
    let (status, body) = problem(events("root", &["admin"], "?cursor=zzz").await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_cursor"))
    );
}

#[tokio::test]
async fn users_do_not_see_who_else_acted_on_their_data_but_admins_do() {
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
    let id = result["integration_id"].as_str().expect("id");
    app.get_as(
        &format!("/api/v1/oauth/integrations/{id}"),
        "mallory",
        &["user"],
    )
    .await;
    let find = |body: &Value| {
        body["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|e| e["action"] == "access_denied")
            .cloned()
            .expect("denied event")
    };
    let mine: Value = app
        .get_as("/api/v1/oauth/audit", "alice", &["user"])
        .await
        .json()
        .await
        .expect("json");
    let seen_by_alice = find(&mine);
    assert_eq!(seen_by_alice["actor_user_id"], "redacted");
    assert!(seen_by_alice["client_ip"].is_null() && seen_by_alice["user_agent"].is_null());
    let all: Value = app
        .get_as("/api/v1/oauth/audit?user_id=alice", "root", &["admin"])
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(find(&all)["actor_user_id"], "mallory");
    // The export of alice's data redacts mallory too; mallory's own export includes the attempt.
    let export = app
        .get_as("/api/v1/oauth/users/alice/export", "alice", &[])
        .await
        .text()
        .await
        .expect("export");
    assert!(!export.contains("mallory"));
    let theirs: Value = app
        .get_as("/api/v1/oauth/users/mallory/export", "mallory", &[])
        .await
        .json()
        .await
        .expect("json");
    assert!(theirs["audit_events"]
        .as_array()
        .expect("events")
        .iter()
        .any(|e| e["action"] == "access_denied"));
}

#[tokio::test]
async fn refused_exports_erasures_and_audit_reads_are_audited() {
    let (app, _fake) = spawn_with_fake().await;
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/oauth/users/alice/export"),
        (reqwest::Method::DELETE, "/api/v1/oauth/users/alice"),
        (reqwest::Method::GET, "/api/v1/oauth/audit?user_id=alice"),
        (reqwest::Method::GET, "/api/v1/oauth/consents?user_id=alice"),
    ] {
        let response = app
            .http
            .request(method, app.url(path))
            .bearer_auth(app.token("mallory", &["service"]))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 403, "{path}");
    }
    let events = crate::support::audit_events(&app, Some("alice")).await;
    let denied = events
        .items
        .iter()
        .filter(|e| {
            e.action == "authorization_denied" && e.actor_user_id.as_deref() == Some("mallory")
        })
        .count();
    assert_eq!(denied, 4);
}

#[tokio::test]
async fn a_self_erasure_keeps_no_address_or_user_agent_of_the_user() {
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
    let response = app
        .http
        .delete(app.url("/api/v1/oauth/users/alice"))
        .header("user-agent", "alices-unique-browser/1.0")
        .bearer_auth(app.token("alice", &[]))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 200);
    assert_eq!(
        audit_rows_mentioning(&app, "alices-unique-browser").await,
        0
    );
    let all = crate::support::audit_events(&app, None).await;
    let erased = all
        .items
        .iter()
        .find(|e| e.action == "user_erased")
        .expect("erasure recorded");
    assert!(
        erased.client_ip.is_none() && erased.user_agent.is_none() && erased.actor_user_id.is_none()
    );
}

#[tokio::test]
async fn nobody_reads_the_audit_salt_through_the_api_not_even_an_admin() {
    let (app, _fake) = spawn_with_fake().await;
    let genesis = app
        .db
        .audit_genesis()
        .await
        .expect("genesis")
        .expect("started at migration");
    let salt = genesis.event.details.0["salt"]
        .as_str()
        .expect("the genesis row carries the salt")
        .to_owned();
    let listed: Value = app
        .get_as(
            "/api/v1/oauth/audit?action=audit_genesis",
            "root",
            &["admin"],
        )
        .await
        .json()
        .await
        .expect("json");
    let items = listed["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{listed}");
    assert_eq!(items[0]["details"]["salt"], "redacted");
    assert!(!listed.to_string().contains(&salt));
}
