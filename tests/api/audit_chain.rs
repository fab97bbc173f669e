//! The tamper-evident audit log: hash chains per user, `audit verify`, retention with
//! checkpoints, pseudonymisation, filtered listing. Runs on SQLite and PostgreSQL.

use std::process::Command;

use chrono::Duration;
use serde_json::{json, Value};
use sqlx::types::Json;
use uuid::Uuid;

use oauth_manager::clock::Clock;
use oauth_manager::services::audit::{self, RequestContext, Salt, VerifyReport};
use oauth_manager::services::worker::{self, WorkerSettings};
use oauth_manager::services::Context;
use oauth_manager::storage::audit::{
    AuditEvent, AuditFilter, ChainLink, NewAuditEvent, Outcome, ZERO_HASH,
};
use oauth_manager::storage::{Page, Paged};

use crate::support::{raw, raw_scalar, spawn_app, spawn_app_with, TestApp};

const BIN: &str = env!("CARGO_BIN_EXE_oauth-manager");

fn ids(page: &Paged<AuditEvent, i64>) -> Vec<i64> {
    page.items.iter().map(|event| event.id).collect()
}

fn ctx(app: &TestApp) -> &Context {
    &app.state.services
}

/// An event by `actor` about `subject`, from that actor's browser.
fn event(app: &TestApp, action: &str, actor: Option<&str>, subject: Option<&str>) -> NewAuditEvent {
    let who = actor.unwrap_or("nobody");
    let request = RequestContext {
        request_id: Some(format!("req-{}", Uuid::new_v4().simple())),
        client_ip: Some(format!("198.51.100.{}", who.len())),
        user_agent: Some(format!("Browser-of-{who}/1.0")),
    };
    audit::event(
        action,
        Outcome::Success,
        actor,
        subject,
        &request,
        app.clock.now(),
    )
    .provider("google")
    .details(json!({"scopes": ["openid", "email"], "n": 1}))
}

async fn append(app: &TestApp, action: &str, actor: Option<&str>, subject: Option<&str>) -> i64 {
    audit::append(ctx(app), &event(app, action, actor, subject))
        .await
        .expect("append")
}

/// Appends `n` events by and about `user`; their ids, oldest first.
async fn history(app: &TestApp, user: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(append(app, &format!("action_{i}"), Some(user), Some(user)).await);
    }
    ids
}

async fn verify(app: &TestApp) -> VerifyReport {
    audit::verify(&app.db).await.expect("verify runs")
}

/// The id the report names as the first bad row, with the reason.
fn first_bad(report: &VerifyReport) -> (i64, String) {
    let problem = report
        .first_problem
        .as_ref()
        .unwrap_or_else(|| panic!("tampering went unnoticed: {report:?}"));
    (problem.row_id, problem.reason.clone())
}

fn assert_clean(report: &VerifyReport) {
    assert!(report.is_ok(), "{:?}", report.first_problem);
    assert_eq!(report.problems, 0);
}

async fn genesis_id(app: &TestApp) -> i64 {
    raw_scalar!(
        i64,
        &app.db,
        "SELECT id FROM oauth_audit_log WHERE chain = 'genesis' AND chain_seq = 1"
    )
}

#[tokio::test]
async fn a_fresh_log_with_several_users_verifies_with_one_chain_per_user() {
    let app = spawn_app().await;
    assert_clean(&verify(&app).await);
    for round in 0..3 {
        for user in ["alice", "bob", "carol"] {
            append(&app, &format!("round_{round}"), Some(user), Some(user)).await;
        }
    }
    append(&app, "catalog_updated", Some("admin"), None).await;
    // An admin acting on alice's data extends alice's chain, not the admin's.
    append(&app, "integration_listed", Some("admin"), Some("alice")).await;

    let report = verify(&app).await;
    assert_clean(&report);
    assert_eq!(report.rows, 12, "11 events and the genesis row");
    assert_eq!(report.chains, 5, "genesis, system, alice, bob, carol");
    let mut seqs: Vec<i64> = report.heads.iter().map(|head| head.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 1, 3, 3, 4]);
    assert!(report
        .heads
        .iter()
        .all(|head| head.hash.len() == 64 && head.hash != "0".repeat(64)));
    assert!(
        report
            .heads
            .iter()
            .all(|head| !head.chain.contains("alice")),
        "chain keys are digests, not user ids"
    );

    // The rows still read as before, through the old listing.
    let alice = app
        .db
        .list_audit_events(
            Some("alice"),
            Page {
                after: None,
                limit: 10,
            },
        )
        .await
        .expect("list");
    assert_eq!(alice.items.len(), 4);

    // No retention configured: the worker never prunes, however old the rows.
    app.clock.advance(Duration::days(4000));
    let tick = worker::tick(ctx(&app), &WorkerSettings::default()).await;
    assert_eq!(tick.audit_rows_pruned, 0);
    assert_eq!(verify(&app).await.rows, 12);
}

#[tokio::test]
async fn an_edited_row_is_named() {
    let app = spawn_app().await;
    let alice = history(&app, "alice", 4).await;
    let bob = history(&app, "bob", 2).await;
    // A plain column, and (in a later row) a personal one that enters the hash as a digest.
    raw!(
        &app.db,
        "UPDATE oauth_audit_log SET provider = 'evil' WHERE id = $1",
        alice[2]
    );
    raw!(
        &app.db,
        "UPDATE oauth_audit_log SET client_ip = '10.0.0.1' WHERE id = $1",
        bob[1]
    );
    let report = verify(&app).await;
    let (row, reason) = first_bad(&report);
    assert_eq!(row, alice[2], "{reason}");
    assert!(reason.contains("edited"), "{reason}");
    assert_eq!(
        report.problems, 2,
        "each edited row, and nothing else: {report:?}"
    );

    // Editing the details (JSON) is caught as well.
    let app = spawn_app().await;
    let alice = history(&app, "alice", 3).await;
    raw!(
        &app.db,
        "UPDATE oauth_audit_log SET details = $1 WHERE id = $2",
        Json(json!({"scopes": ["openid"], "n": 1})),
        alice[1]
    );
    assert_eq!(first_bad(&verify(&app).await).0, alice[1]);
}

#[tokio::test]
async fn a_deleted_middle_row_is_named_by_its_successor() {
    let app = spawn_app().await;
    let alice = history(&app, "alice", 4).await;
    history(&app, "bob", 2).await;
    raw!(
        &app.db,
        "DELETE FROM oauth_audit_log WHERE id = $1",
        alice[1]
    );
    let report = verify(&app).await;
    let (row, reason) = first_bad(&report);
    assert_eq!(row, alice[2], "{reason}");
    assert!(reason.contains("deleted"), "{reason}");
}

#[tokio::test]
async fn a_reordered_pair_is_named() {
    let app = spawn_app().await;
    let alice = history(&app, "alice", 4).await;
    // Swap the positions of the second and third rows (via a free seq: the index is unique).
    let seq_of = |id: i64| {
        let db = app.db.clone();
        async move {
            raw_scalar!(
                i64,
                &db,
                "SELECT chain_seq FROM oauth_audit_log WHERE id = $1",
                id
            )
        }
    };
    let (second, third) = (seq_of(alice[1]).await, seq_of(alice[2]).await);
    let set_seq = "UPDATE oauth_audit_log SET chain_seq = $1 WHERE id = $2";
    raw!(&app.db, set_seq, -1_i64, alice[1]);
    raw!(&app.db, set_seq, second, alice[2]);
    raw!(&app.db, set_seq, third, alice[1]);
    let report = verify(&app).await;
    let (row, reason) = first_bad(&report);
    assert_eq!(row, alice[1], "the lower id of the pair: {reason}");

    // Swapping the contents instead (keeping the positions) is caught too.
    let app = spawn_app().await;
    let alice = history(&app, "alice", 4).await;
    let swap = "UPDATE oauth_audit_log SET action = $1 WHERE id = $2";
    raw!(&app.db, swap, "action_2", alice[1]);
    raw!(&app.db, swap, "action_1", alice[2]);
    assert_eq!(first_bad(&verify(&app).await).0, alice[1]);
}

#[tokio::test]
async fn a_forged_salt_is_detected_even_with_a_recomputed_genesis_hash() {
    let app = spawn_app().await;
    let alice = history(&app, "alice", 2).await;
    let genesis = genesis_id(&app).await;
    assert!(genesis < alice[0], "the genesis row comes first");
    let forged = Salt::from_bytes([0x42; 32]);
    let forged_hex = "42".repeat(32);
    raw!(
        &app.db,
        "UPDATE oauth_audit_log SET details = $1 WHERE id = $2",
        Json(json!({ "salt": forged_hex })),
        genesis
    );
    let (row, _) = first_bad(&verify(&app).await);
    assert_eq!(row, genesis, "the genesis row no longer matches its hash");

    // A forger who also recomputes the genesis row's hash breaks every other row instead.
    let row = app
        .db
        .audit_genesis()
        .await
        .expect("read")
        .expect("genesis");
    let event = row.event.to_new_event().expect("event");
    let hash = audit::row_hash(
        &forged,
        &ChainLink {
            chain: "genesis",
            seq: 1,
            prev_hash: &ZERO_HASH,
        },
        &event,
    );
    raw!(
        &app.db,
        "UPDATE oauth_audit_log SET row_hash = $1 WHERE id = $2",
        hash.to_vec(),
        genesis
    );
    let report = verify(&app).await;
    let (row, reason) = first_bad(&report);
    assert_eq!(row, alice[0], "{reason}");
    assert!(report.problems >= 2, "{report:?}");
}

#[tokio::test]
async fn rows_written_outside_the_chains_are_reported() {
    let app = spawn_app().await;
    history(&app, "alice", 2).await;
    let stray = app
        .db
        .append_audit_event(&event(&app, "forged", Some("mallory"), Some("alice")))
        .await
        .expect("raw insert");
    let report = verify(&app).await;
    let (row, reason) = first_bad(&report);
    assert_eq!(row, stray, "{reason}");
    assert_eq!(report.rows, 4);
}

#[tokio::test]
async fn rows_from_before_the_chains_are_chained_by_the_genesis() {
    // A database migrated from before 0005: its rows have no chain columns, and no genesis
    // row exists until the service starts on it.
    let database = crate::support::TestDatabase::create().await;
    let db = database.connect().await;
    db.migrate().await.expect("migrate");
    let now = chrono::Utc::now();
    let client = oauth_manager::services::audit::RequestContext::default();
    let mut legacy = Vec::new();
    for user in ["alice", "bob", "alice"] {
        let row = oauth_manager::services::audit::event(
            "legacy",
            oauth_manager::storage::audit::Outcome::Success,
            Some(user),
            Some(user),
            &client,
            now,
        );
        legacy.push(db.append_audit_event(&row).await.expect("legacy row"));
    }
    db.close().await;
    // Start-up (migration) creates the genesis row and adopts the legacy rows.
    let app = crate::support::spawn_app_on(
        database,
        &oauth_manager::crypto::KeyMaterial::generate(),
        &[],
    )
    .await;
    assert!(genesis_id(&app).await > legacy[2]);
    assert_clean(&verify(&app).await);
    let first_new = append(&app, "after_upgrade", Some("alice"), Some("alice")).await;
    let report = verify(&app).await;
    assert_clean(&report);
    assert_eq!(report.rows, 5);
    let seq = raw_scalar!(
        i64,
        &app.db,
        "SELECT chain_seq FROM oauth_audit_log WHERE id = $1",
        first_new
    );
    assert_eq!(seq, 3, "alice's two legacy rows come first in her chain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_from_two_replicas_keep_every_chain_contiguous() {
    let app = spawn_app().await;
    // A second replica (its own salt cache) on the same, still empty, database: the two race
    // to create the genesis row as well.
    let other = app.sibling().await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let replica = if i % 2 == 0 {
            ctx(&app).clone()
        } else {
            ctx(&other).clone()
        };
        // The first 50 all extend alice's chain; the next 50 spread over five users.
        let user = if i < 50 {
            "alice".to_owned()
        } else {
            format!("user-{}", i % 5)
        };
        let event = event(&app, &format!("concurrent_{i}"), Some(&user), Some(&user));
        tasks.spawn(async move { audit::append(&replica, &event).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task")
            .expect("append succeeds under contention");
    }
    let report = verify(&app).await;
    assert_clean(&report);
    assert_eq!(report.rows, 101, "100 events and one genesis row");
    assert_eq!(report.chains, 7, "genesis, alice and five users");
    let alice = app
        .db
        .list_audit_events(
            Some("alice"),
            Page {
                after: None,
                limit: 100,
            },
        )
        .await
        .expect("list");
    assert_eq!(alice.items.len(), 50);
    // verify checked contiguity; the heads confirm no row went missing.
    let total: i64 = report.heads.iter().map(|head| head.seq).sum();
    assert_eq!(total, 101);
    assert!(report.heads.iter().any(|head| head.seq == 50));
    // Small pages (crossing chain boundaries mid-page) read the same log the same way.
    for page in [1, 7, 50] {
        let paged = audit::verify_in_pages(&app.db, page).await.expect("verify");
        assert_eq!(paged, report, "page size {page}");
    }
}

#[tokio::test]
async fn retention_prunes_behind_checkpoints_and_later_deletions_are_still_caught() {
    let app = spawn_app_with(&[("OAUTH_AUDIT_RETENTION_DAYS", "30")]).await;
    let settings = WorkerSettings::default();
    let start = app.clock.now();
    let alice = history(&app, "alice", 4).await;
    history(&app, "bob", 2).await;
    append(&app, "catalog_updated", Some("admin"), None).await;
    app.clock.set(start + Duration::days(20));
    let recent = history(&app, "alice", 3).await;

    // Day 31: everything from day 0 goes, each pruned chain gets a checkpoint.
    app.clock.set(start + Duration::days(31));
    let tick = worker::tick(ctx(&app), &settings).await;
    assert_eq!(tick.audit_rows_pruned, 7);
    for id in &alice {
        let left = raw_scalar!(
            i64,
            &app.db,
            "SELECT COUNT(*) FROM oauth_audit_log WHERE id = $1",
            *id
        );
        assert_eq!(left, 0);
    }
    let report = verify(&app).await;
    assert_clean(&report);
    assert_eq!(
        report.rows,
        1 + 3 + 3,
        "genesis, alice's recent rows, three checkpoints"
    );
    let checkpoint: Value = raw_scalar!(
        Json<Value>,
        &app.db,
        "SELECT details FROM oauth_audit_log WHERE action = 'audit_pruned' AND chain_seq = 8"
    )
    .0;
    assert_eq!(checkpoint["pruned_through_seq"], 4, "{checkpoint}");
    assert_eq!(checkpoint["rows_pruned"], 4, "{checkpoint}");

    // Nothing more is due: a quiet chain holding only a checkpoint is not rewritten.
    app.clock.set(start + Duration::days(45));
    assert_eq!(
        worker::tick(ctx(&app), &settings).await.audit_rows_pruned,
        0
    );
    assert_eq!(verify(&app).await.rows, 7);

    // Day 52: alice's day-20 rows go; the day-31 checkpoint and a day-40 row stay.
    app.clock.set(start + Duration::days(40));
    let late = append(&app, "late", Some("alice"), Some("alice")).await;
    app.clock.set(start + Duration::days(52));
    assert_eq!(
        worker::tick(ctx(&app), &settings).await.audit_rows_pruned,
        3
    );
    let report = verify(&app).await;
    assert_clean(&report);
    assert_eq!(
        report.rows,
        1 + 3 + 2,
        "genesis; alice: checkpoint, row, checkpoint; bob and system checkpoints"
    );
    assert!(recent.iter().all(|id| *id < late));

    // Deleting the oldest remaining row is not mistaken for pruning.
    let oldest_alice = raw_scalar!(
        i64,
        &app.db,
        "SELECT MIN(id) FROM oauth_audit_log WHERE chain IN \
         (SELECT chain FROM oauth_audit_log WHERE id = $1)",
        late
    );
    assert_ne!(oldest_alice, late, "the day-31 checkpoint is still there");
    raw!(
        &app.db,
        "DELETE FROM oauth_audit_log WHERE id = $1",
        oldest_alice
    );
    let (row, reason) = first_bad(&verify(&app).await);
    assert_eq!(row, late, "{reason}");
    assert!(reason.contains("deleted"), "{reason}");
}

#[tokio::test]
async fn pseudonymising_a_user_keeps_the_chains_and_leaves_no_trace() {
    let app = spawn_app().await;
    let user = "alice-7f3c9";
    let mut hers = Vec::new();
    hers.push(append(&app, "authorize_started", Some(user), Some(user)).await);
    hers.push(append(&app, "integration_listed", Some("admin"), Some(user)).await);
    hers.push(append(&app, "forbidden", Some(user), Some("bob")).await);
    hers.push(append(&app, "catalog_updated", Some(user), None).await);
    let bobs = append(&app, "authorize_started", Some("bob"), Some("bob")).await;
    assert_clean(&verify(&app).await);

    let changed = audit::pseudonymise_user(ctx(&app), user)
        .await
        .expect("pseudonymise");
    assert_eq!(changed, 4);
    assert_clean(&verify(&app).await);

    let traces = raw_scalar!(
        i64,
        &app.db,
        "SELECT COUNT(*) FROM oauth_audit_log WHERE actor_user_id LIKE $1 \
         OR subject_user_id LIKE $1 OR client_ip = $2 OR user_agent LIKE $1 \
         OR CAST(details AS TEXT) LIKE $1",
        "%alice%",
        format!("198.51.100.{}", user.len()),
    );
    assert_eq!(traces, 0, "no trace of the user in any audit row");
    for id in &hers {
        let actor: Option<String> = raw_scalar!(
            Option<String>,
            &app.db,
            "SELECT actor_user_id FROM oauth_audit_log WHERE id = $1",
            *id
        );
        let agent: Option<String> = raw_scalar!(
            Option<String>,
            &app.db,
            "SELECT user_agent FROM oauth_audit_log WHERE id = $1",
            *id
        );
        assert!(agent.is_some_and(|agent| agent.starts_with("erased:")));
        assert!(actor.is_some_and(|actor| actor == "admin" || actor.starts_with("erased:")));
    }
    let bob: String = raw_scalar!(
        String,
        &app.db,
        "SELECT user_agent FROM oauth_audit_log WHERE id = $1",
        bobs
    );
    assert_eq!(bob, "Browser-of-bob/1.0", "other users' rows are untouched");
    let listed = app
        .db
        .list_audit_events(
            Some(user),
            Page {
                after: None,
                limit: 10,
            },
        )
        .await
        .expect("list");
    assert!(listed.items.is_empty());

    // Idempotent, and the chain goes on.
    assert_eq!(
        audit::pseudonymise_user(ctx(&app), user)
            .await
            .expect("again"),
        0
    );
    append(&app, "user_erased", Some("admin"), None).await;
    assert_clean(&verify(&app).await);
}

#[tokio::test]
async fn audit_verify_command_passes_a_good_log_and_names_a_tampered_row() {
    let app = spawn_app().await;
    history(&app, "alice", 3).await;
    let bob = history(&app, "bob", 3).await;
    let run = |url: String| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new(BIN);
        command
            .args(["audit", "verify"])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url);
        tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("run")
    };

    let output = run(app.database.url.clone()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["first_problem"], Value::Null, "{report}");
    assert_eq!(report["rows"], 7);
    assert_eq!(
        report["heads"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );

    raw!(
        &app.db,
        "UPDATE oauth_audit_log SET outcome = 'denied' WHERE id = $1",
        bob[1]
    );
    let output = run(app.database.url.clone()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "tampering must fail: {stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["first_problem"]["row_id"], bob[1], "{report}");
    assert!(stderr.contains(&format!("row {}", bob[1])), "{stderr}");
}

#[tokio::test]
async fn listing_filters_by_subject_integration_action_and_time() {
    let app = spawn_app().await;
    let start = app.clock.now();
    let integration = Uuid::now_v7();
    append(&app, "authorize_started", Some("alice"), Some("alice")).await;
    app.clock.advance(Duration::hours(1));
    let with_integration = audit::append(
        ctx(&app),
        &event(&app, "token_handed_out", Some("svc"), Some("alice")).integration(Some(integration)),
    )
    .await
    .expect("append");
    app.clock.advance(Duration::hours(1));
    let bobs = append(&app, "token_handed_out", Some("bob"), Some("bob")).await;

    let list = |filter: AuditFilter, limit: u32, after: Option<i64>| {
        let db = app.db.clone();
        async move {
            db.list_audit_events_filtered(&filter, Page { after, limit })
                .await
                .expect("list")
        }
    };
    let by_integration = list(
        AuditFilter {
            integration_id: Some(integration),
            ..AuditFilter::default()
        },
        10,
        None,
    )
    .await;
    assert_eq!(ids(&by_integration), [with_integration]);
    let handed_out = list(
        AuditFilter {
            action: Some("token_handed_out".into()),
            ..AuditFilter::default()
        },
        1,
        None,
    )
    .await;
    assert_eq!(ids(&handed_out), [with_integration]);
    let next = list(
        AuditFilter {
            action: Some("token_handed_out".into()),
            ..AuditFilter::default()
        },
        1,
        handed_out.next,
    )
    .await;
    assert_eq!(ids(&next), [bobs]);
    assert!(next.next.is_none());
    let window = list(
        AuditFilter {
            from: Some(start + Duration::minutes(30)),
            to: Some(start + Duration::hours(2)),
            ..AuditFilter::default()
        },
        10,
        None,
    )
    .await;
    assert_eq!(
        ids(&window),
        [with_integration],
        "from inclusive, to exclusive"
    );
    let alices = list(
        AuditFilter {
            subject_user_id: Some("alice".into()),
            action: Some("token_handed_out".into()),
            ..AuditFilter::default()
        },
        10,
        None,
    )
    .await;
    assert_eq!(ids(&alices), [with_integration]);
}

#[tokio::test]
async fn a_writer_whose_remembered_head_another_replica_moved_on_appends_after_it() {
    let app = spawn_app().await;
    let other = app.sibling().await;
    // Each writer remembers alice's head after its own append; the other moves it on meanwhile.
    let mut ids = Vec::new();
    for round in 0..3 {
        ids.push(append(&app, &format!("here_{round}"), Some("alice"), Some("alice")).await);
        ids.push(
            append(
                &other,
                &format!("there_{round}"),
                Some("alice"),
                Some("alice"),
            )
            .await,
        );
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 6, "every append got its own row: {ids:?}");
    let report = verify(&app).await;
    assert_clean(&report);
    let alice = report
        .heads
        .iter()
        .map(|head| head.seq)
        .max()
        .expect("heads");
    assert_eq!(alice, 6, "six contiguous rows in alice's chain");
}
