//! The hand-out's fast path: the in-process token cache (bounded staleness, local changes seen
//! at once) and the audit writer's group commit (no event lost, chains intact, erasure covers
//! events still queued).

use std::time::Duration as StdDuration;

use serde_json::Value;

use crate::lifecycle::{connected, disconnect, get_token};
use oauth_manager::storage::audit::AuditEvent;
use oauth_manager::storage::Database;

use crate::support::{audit_events, problem, spawn_with_fake_and, TestApp};

async fn hand_out_status(app: &TestApp, id: &str) -> u16 {
    get_token(app, id).await.status().as_u16()
}

#[tokio::test]
async fn a_disconnect_takes_effect_at_once_here_and_within_the_cache_ttl_on_other_replicas() {
    let (app, fake) = spawn_with_fake_and(&[("OAUTH_TOKEN_CACHE_SECONDS", "1")]).await;
    let other = app.sibling().await;
    let here = connected(&app, &fake, "google", "g-1").await;
    let there = connected(&app, &fake, "google", "g-2").await;
    assert_eq!(hand_out_status(&app, &here).await, 200);
    assert_eq!(hand_out_status(&app, &there).await, 200);

    // This replica disconnects: its own cache forgets at once.
    disconnect(&app, &here).await;
    assert_eq!(hand_out_status(&app, &here).await, 409);

    // Another replica disconnects: this one may answer from memory until its entry expires,
    // never longer.
    disconnect(&other, &there).await;
    assert_eq!(
        hand_out_status(&app, &there).await,
        200,
        "served from this replica's cache (the documented staleness bound)"
    );
    tokio::time::sleep(StdDuration::from_millis(1200)).await;
    let (status, body) = problem(
        app.get_as(
            &format!("/api/v1/oauth/integrations/{there}/token"),
            "backend",
            &["service"],
        )
        .await,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "integration_revoked");
}

#[tokio::test]
async fn with_the_cache_off_every_hand_out_reads_the_database() {
    let (app, fake) = spawn_with_fake_and(&[("OAUTH_TOKEN_CACHE_SECONDS", "0")]).await;
    let other = app.sibling().await;
    let id = connected(&app, &fake, "google", "g-1").await;
    assert_eq!(hand_out_status(&app, &id).await, 200);
    disconnect(&other, &id).await;
    assert_eq!(hand_out_status(&app, &id).await, 409);
}

#[tokio::test]
async fn a_cached_token_is_only_handed_to_callers_who_may_read_it() {
    let (app, fake) = spawn_with_fake_and(&[]).await;
    let id = connected(&app, &fake, "google", "g-1").await;
    assert_eq!(hand_out_status(&app, &id).await, 200, "now cached");
    let (status, _) = problem(
        app.get_as(
            &format!("/api/v1/oauth/integrations/{id}/token"),
            "mallory",
            &["user"],
        )
        .await,
    )
    .await;
    assert!(status == 403 || status == 404, "{status}");
    let mine = app
        .get_as(
            &format!("/api/v1/oauth/integrations/{id}/token"),
            "alice",
            &["user", "backend"],
        )
        .await;
    // Whatever the owner's roles allow, the cache never widens it.
    let owner_status = mine.status().as_u16();
    assert!(
        [200, 403].contains(&owner_status),
        "the owner gets what the roles allow: {owner_status}"
    );
}

/// 64 concurrent hand-outs by one backend; the hand-out rows written for them.
async fn hand_out_rows_of_64_concurrent(app: &TestApp, id: &str) -> Vec<AuditEvent> {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (http, url, token) = (
            app.http.clone(),
            app.url(&format!("/api/v1/oauth/integrations/{id}/token")),
            app.token("backend", &["service"]),
        );
        calls.spawn(async move {
            let response = http.get(url).bearer_auth(token).send().await;
            response.expect("hand-out").status().as_u16()
        });
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.expect("task"), 200);
    }
    let events = audit_events(app, Some("alice")).await;
    let report = oauth_manager::services::audit::verify(&app.db)
        .await
        .expect("verify");
    assert!(report.is_ok(), "{:?}", report.first_problem);
    events
        .items
        .into_iter()
        .filter(|event| event.action == "token_handed_out")
        .collect()
}

/// A hand-out refused for the integration's state (given up, its tokens still stored) or for
/// want of tokens (an active integration without a token row) answers `reauth_required` and is
/// audited as a failure, as a served one is audited as a success.
#[tokio::test]
async fn a_refused_hand_out_is_audited_as_a_failure() {
    use oauth_manager::clock::Clock;
    use oauth_manager::storage::integrations::IntegrationStatus;
    let (app, fake) = spawn_with_fake_and(&[]).await;
    let given_up = connected(&app, &fake, "google", "g-1").await;
    let uuid = given_up.parse().expect("uuid");
    let now = app.clock.now();
    let status = IntegrationStatus::NeedsReauth;
    app.db
        .set_integration_status(uuid, status, Some("invalid_grant"), now)
        .await
        .expect("status");
    assert!(app.db.get_tokens(uuid).await.expect("read").is_some());
    let without_tokens = app.seed_integration("alice", "google").await.id.to_string();
    for id in [&given_up, &without_tokens] {
        let (status, body) = problem(get_token(&app, id).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("reauth_required")),
            "{id}"
        );
    }
    let events = audit_events(&app, Some("alice")).await.items;
    for id in [&given_up, &without_tokens] {
        let refused: Vec<&AuditEvent> = events
            .iter()
            .filter(|event| event.action == "token_handed_out" && event.outcome == "failure")
            .filter(|event| event.integration_id.map(|uuid| uuid.to_string()).as_ref() == Some(id))
            .collect();
        assert_eq!(refused.len(), 1, "{id}: {refused:?}");
    }
}

#[tokio::test]
async fn concurrent_hand_outs_alike_are_counted_in_one_row_in_intact_chains() {
    let (app, fake) = spawn_with_fake_and(&[]).await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let rows = hand_out_rows_of_64_concurrent(&app, &id).await;
    // Usually one row; two if the 1 s window ended while the calls were under way.
    assert!(
        (1..=2).contains(&rows.len()),
        "{} rows for 64 hand-outs",
        rows.len()
    );
    let counted: u64 = rows
        .iter()
        .map(|row| row.details["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(counted, 64, "every hand-out is counted");
    for row in &rows {
        assert_eq!(row.actor_user_id.as_deref(), Some("backend"), "to whom");
        assert!(row.details["last_at"].is_string());
        assert!(!row.details["request_ids"]
            .as_array()
            .expect("ids")
            .is_empty());
    }
}

/// Counts are made where the hand-out happens, without a message to the writer: the writer
/// must still wake and write each one when its window ends, with nobody flushing.
#[tokio::test]
async fn counted_hand_outs_are_written_when_their_window_ends_without_a_flush() {
    let (app, fake) = spawn_with_fake_and(&[]).await;
    let id = connected(&app, &fake, "google", "g-1").await;
    for round in 0..2 {
        let url = app.url(&format!("/api/v1/oauth/integrations/{id}/token"));
        for _ in 0..3 {
            let response = app
                .http
                .get(&url)
                .bearer_auth(app.token("backend", &["service"]))
                .send()
                .await
                .expect("hand-out");
            assert_eq!(response.status(), 200);
        }
        let page = oauth_manager::storage::Page {
            after: None,
            limit: 200,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let counted = loop {
            let events = app
                .db
                .list_audit_events(Some("alice"), page)
                .await
                .expect("audit events");
            let counted: u64 = events
                .items
                .iter()
                .filter(|event| event.action == "token_handed_out")
                .map(|event| event.details["count"].as_u64().expect("count"))
                .sum();
            if counted == 3 * (round + 1) || std::time::Instant::now() > deadline {
                break counted;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        // The second round opens a count after the first was written: the writer was
        // asleep with nothing due and must be woken again.
        assert_eq!(counted, 3 * (round + 1), "round {round}");
    }
}

#[tokio::test]
async fn with_a_window_of_zero_every_concurrent_hand_out_has_a_row_of_its_own() {
    let (app, fake) = spawn_with_fake_and(&[("OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS", "0")]).await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let rows = hand_out_rows_of_64_concurrent(&app, &id).await;
    assert_eq!(rows.len(), 64);
    assert!(rows.iter().all(|row| row.details.get("count").is_none()));
    let request_ids: std::collections::HashSet<_> =
        rows.iter().map(|row| row.request_id.clone()).collect();
    assert_eq!(request_ids.len(), 64, "one row per request");
}

#[tokio::test]
async fn erasure_also_pseudonymises_hand_out_events_still_queued() {
    erasure_covers_unwritten_hand_outs("0", 100).await;
}

#[tokio::test]
async fn erasure_also_pseudonymises_hand_out_counts_still_open() {
    erasure_covers_unwritten_hand_outs("60", 1).await;
}

/// 100 hand-outs, then alice's erasure at once: no row may still name her, and at least
/// `rows` rows were pseudonymised (a row each with a window of zero, one count otherwise).
async fn erasure_covers_unwritten_hand_outs(window_seconds: &str, rows: u64) {
    let (app, fake) =
        spawn_with_fake_and(&[("OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS", window_seconds)]).await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (http, url, token) = (
            app.http.clone(),
            app.url(&format!("/api/v1/oauth/integrations/{id}/token")),
            app.token("backend", &["service"]),
        );
        calls.spawn(async move { http.get(url).bearer_auth(token).send().await });
    }
    while calls.join_next().await.is_some() {}
    let response = app
        .http
        .delete(app.url("/api/v1/oauth/users/alice"))
        .bearer_auth(app.token("root", &["admin"]))
        .send()
        .await
        .expect("erase");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert!(body["audit_rows_pseudonymised"].as_u64().unwrap_or(0) >= rows);
    let events = audit_events(&app, Some("alice")).await;
    assert!(
        events.items.is_empty(),
        "no audit row names alice after erasure: {:?}",
        events.items.first().map(|event| &event.action)
    );
}

/// The loader of a token that a crowd waits for works on the lane, through connections the
/// lane opened: a socket is woken by the runtime that opened it, and a crowded request runtime
/// looks at its sockets only every so many tasks (PostgreSQL storms called the provider
/// 7–22 ms late, BENCHMARKS.md). Here the request runtime does not run at all while the lane
/// queries: with the request runtime's PostgreSQL connections the query never returns.
/// PostgreSQL only: SQLite's connections answer from threads of their own, and the lane shares
/// the process's pool of two with everyone else (stuck here, a task of the request runtime
/// may hold both).
#[tokio::test]
async fn the_lane_queries_the_database_while_the_request_runtime_is_stuck() {
    let (app, _fake) = spawn_with_fake_and(&[]).await;
    if !matches!(app.db, Database::Postgres(_)) {
        return;
    }
    let services = app.state.services.clone();
    let (answer, answered) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let on_lane = services.for_lane();
        let pinged = runtime.block_on(
            services
                .lane
                .run(async move { on_lane.db.ping().await.map_err(Into::into) }),
        );
        let _ = answer.send(pinged.map_err(|err| err.to_string()));
    });
    // Blocks the request runtime's one thread (this test's) until the lane has answered.
    let pinged = answered.recv_timeout(StdDuration::from_secs(10));
    assert_eq!(
        pinged,
        Ok(Ok(())),
        "the lane's query waited for the request runtime"
    );
}

/// A caller that refreshes an expired token answers as soon as the new token is stored, as
/// the callers waiting for it do, not only once the refresh's audit record is committed too:
/// in a storm that made it the last of a thousand answers (BENCHMARKS.md, session 15). The
/// record is still written. PostgreSQL only: there the audit writer waits for the chain's
/// lock, which this test holds; SQLite's equivalent, the process's write gate, is one the
/// token's own commit needs as well.
#[tokio::test]
async fn a_refreshing_caller_does_not_wait_for_the_refresh_audit_record() {
    let (app, fake) = spawn_with_fake_and(&[]).await;
    let Database::Postgres(pool) = &app.db else {
        return;
    };
    let id = connected(&app, &fake, "google", "g-1").await;
    let chain: String = sqlx::query_scalar(
        "SELECT chain FROM oauth_audit_log WHERE integration_id = $1::uuid LIMIT 1",
    )
    .bind(&id)
    .fetch_one(pool)
    .await
    .expect("the connect's audit chain");
    app.clock.advance(chrono::Duration::minutes(59));

    let mut holder = pool.begin().await.expect("transaction");
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(&chain)
        .execute(&mut *holder)
        .await
        .expect("the chain's lock");
    let answer = tokio::time::timeout(StdDuration::from_secs(5), get_token(&app, &id)).await;
    let status = answer.map(|response| response.status().as_u16());
    assert_eq!(status, Ok(200), "the hand-out waited for the audit record");
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);

    holder.rollback().await.expect("released");
    let refreshed = audit_events(&app, None)
        .await
        .items
        .into_iter()
        .filter(|event: &AuditEvent| event.action == "token_refreshed")
        .count();
    assert_eq!(refreshed, 1, "the refresh is audited all the same");
}
