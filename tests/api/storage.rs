//! The repositories, run against whichever backend this test binary targets (CI: both).

use chrono::Duration;
use oauth_manager::clock::Clock;
use oauth_manager::storage::audit::{NewAuditEvent, Outcome};
use oauth_manager::storage::consents::Consent;
use oauth_manager::storage::integrations::{IntegrationFilter, NewConnection};
use oauth_manager::storage::scopes::ScopeEntry;
use oauth_manager::storage::state::PendingAuthorization;
use oauth_manager::storage::tokens::SealedTokens;
use oauth_manager::storage::{Page, StorageError};
use serde_json::json;
use sqlx::types::Json;
use uuid::Uuid;

use crate::support::spawn_app;

#[tokio::test]
async fn integrations_round_trip_exactly_and_are_unique_per_account() {
    let app = spawn_app().await;
    let stored = app.seed_integration("alice", "google").await;
    let read = app
        .db
        .get_integration(stored.id)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(
        read, stored,
        "timestamps, JSON and enums round-trip unchanged"
    );
    let mut duplicate = stored.clone();
    duplicate.id = Uuid::now_v7();
    let err = app
        .db
        .insert_integration(&duplicate)
        .await
        .expect_err("duplicate account");
    assert!(err.is_unique_violation(), "{err}");
    // The same account may belong to another user of the host product.
    duplicate.user_id = "bob".to_owned();
    app.db
        .insert_integration(&duplicate)
        .await
        .expect("another user");
    let page = app
        .db
        .list_integrations(
            &IntegrationFilter {
                user_id: Some("alice".into()),
                ..Default::default()
            },
            Page {
                after: None,
                limit: 10,
            },
        )
        .await
        .expect("list");
    assert_eq!(page.items.len(), 1);
    assert!(page.next.is_none());
}

/// A token row as the vault would write it (bytes stand in for ciphertext).
fn sealed(integration_id: Uuid, now: chrono::DateTime<chrono::Utc>) -> SealedTokens {
    SealedTokens {
        integration_id,
        key_id: "k1-test".into(),
        access_token: vec![1, 2, 3],
        refresh_token: None,
        id_token: None,
        token_type: "Bearer".into(),
        expires_at: Some(now + Duration::hours(1)),
        refresh_token_expires_at: None,
        generation: 0,
        created_at: now,
        updated_at: now,
        refresh_failures: 0,
        refresh_not_before: None,
    }
}

#[tokio::test]
async fn integrations_and_tokens_are_read_by_the_hundred_with_the_missing_left_out() {
    let app = spawn_app().await;
    let now = app.clock.now();
    let mut wanted = Vec::new();
    for n in 0..100 {
        let integration = app.seed_integration(&format!("user-{n}"), "google").await;
        if n % 2 == 0 {
            let tokens = SealedTokens {
                access_token: vec![n],
                expires_at: None,
                ..sealed(integration.id, now)
            };
            app.db.upsert_tokens(&tokens).await.expect("tokens");
        }
        wanted.push(integration.id);
    }
    let unknown = Uuid::now_v7();
    wanted.push(unknown);
    let integrations = app
        .db
        .get_integrations(&wanted)
        .await
        .expect("integrations");
    assert_eq!(
        integrations.len(),
        100,
        "more than one SQLite IN list, the unknown id left out"
    );
    assert!(integrations
        .iter()
        .all(|integration| integration.id != unknown));
    let tokens = app.db.get_tokens_of(&wanted).await.expect("tokens");
    assert_eq!(tokens.len(), 50);
    assert!(tokens.iter().all(|row| wanted
        .iter()
        .position(|id| *id == row.integration_id)
        .unwrap_or(1)
        % 2
        == 0));
    assert!(app.db.get_integrations(&[]).await.expect("none").is_empty());
}

/// The refresh path reads a token row and its integration's status in one round trip: both as
/// stored now, and nothing for an integration without tokens.
#[tokio::test]
async fn a_token_row_is_read_with_its_integration_s_current_status() {
    use oauth_manager::storage::integrations::IntegrationStatus;
    let app = spawn_app().await;
    let now = app.clock.now();
    let integration = app.seed_integration("alice", "google").await;
    let id = integration.id;
    let read = |id| app.db.get_tokens_and_status(id);
    assert!(read(id).await.expect("read").is_none(), "no tokens yet");
    app.db
        .upsert_tokens(&sealed(id, now))
        .await
        .expect("tokens");
    let (tokens, status) = read(id).await.expect("read").expect("row");
    let alone = app.db.get_tokens(id).await.expect("read").expect("row");
    assert_eq!(tokens, alone, "the same row as get_tokens reads");
    assert_eq!(status, IntegrationStatus::Active);
    let later = now + Duration::seconds(1);
    let given_up = IntegrationStatus::NeedsReauth;
    let db = &app.db;
    db.set_integration_status(id, given_up, Some("invalid_grant"), later)
        .await
        .expect("status");
    let (_, status) = read(id).await.expect("read").expect("row");
    assert_eq!(status, given_up, "the status as it is now");
    let other = app.seed_integration("bob", "google").await;
    assert!(read(other.id).await.expect("read").is_none());
}

/// The hand-out's read: an integration and its token row together, each exactly as read alone
/// (both tables have `created_at` and `updated_at`: four different times here, none may take
/// another's place), the integration alone when it has no tokens, nothing for an unknown id.
#[tokio::test]
async fn an_integration_is_read_with_its_token_row_in_one_read() {
    use oauth_manager::storage::integrations::IntegrationStatus;
    let app = spawn_app().await;
    let seeded = app.seed_integration("alice", "google").await;
    let id = seeded.id;
    let read = |id| app.db.get_integration_with_tokens(id);
    let at = |seconds| app.clock.now() + Duration::seconds(seconds);
    let (alone, tokens) = read(id).await.expect("read").expect("integration");
    assert_eq!((alone, tokens), (seeded, None), "no tokens yet");
    let status = IntegrationStatus::Error;
    let db = &app.db;
    db.set_integration_status(id, status, Some("e"), at(3))
        .await
        .expect("status");
    // A token row is created at its first write and updated at each later one.
    for seconds in [5, 7] {
        let written = SealedTokens {
            updated_at: at(seconds),
            ..sealed(id, at(seconds))
        };
        db.upsert_tokens(&written).await.expect("tokens");
    }
    let (integration, tokens) = read(id).await.expect("read").expect("row");
    let integration_alone = db.get_integration(id).await.expect("read").expect("row");
    assert_eq!(integration, integration_alone, "the integration as stored");
    let tokens = tokens.expect("tokens");
    let tokens_alone = db.get_tokens(id).await.expect("read").expect("row");
    assert_eq!(tokens, tokens_alone, "the token row as stored");
    let times = [
        integration.created_at,
        integration.updated_at,
        tokens.created_at,
        tokens.updated_at,
    ];
    assert_eq!(times, [at(0), at(3), at(5), at(7)]);
    assert!(read(Uuid::now_v7()).await.expect("read").is_none());
}

#[tokio::test]
async fn token_writes_bump_the_generation_and_cascade_with_the_integration() {
    let app = spawn_app().await;
    let integration = app.seed_integration("alice", "google").await;
    let now = app.clock.now();
    let tokens = sealed(integration.id, now);
    assert_eq!(app.db.upsert_tokens(&tokens).await.expect("insert"), 1);
    assert_eq!(app.db.upsert_tokens(&tokens).await.expect("update"), 2);
    let read = app
        .db
        .get_tokens(integration.id)
        .await
        .expect("read")
        .expect("row");
    assert_eq!((read.generation, read.expires_at), (2, tokens.expires_at));
    assert!(
        !app.db
            .reseal_tokens(&read, 1)
            .await
            .expect("stale generation"),
        "optimistic check"
    );
    let sql = "DELETE FROM oauth_integrations WHERE id = $1";
    match &app.db {
        oauth_manager::storage::Database::Postgres(p) => sqlx::query(sql)
            .bind(integration.id)
            .execute(p)
            .await
            .map(|_| ()),
        oauth_manager::storage::Database::Sqlite(p, _) => sqlx::query(sql)
            .bind(integration.id)
            .execute(p)
            .await
            .map(|_| ()),
    }
    .expect("delete");
    assert!(
        app.db
            .get_tokens(integration.id)
            .await
            .expect("read")
            .is_none(),
        "tokens go with their integration"
    );
}

/// A pending authorization of alice's, for Google, under the state hash `[hash; 32]`.
fn pending_authorization(hash: u8, now: chrono::DateTime<chrono::Utc>) -> PendingAuthorization {
    PendingAuthorization {
        id: Uuid::now_v7(),
        state_hash: vec![hash; 32],
        user_id: "alice".into(),
        provider: "google".into(),
        redirect_uri: "https://example.test/cb".into(),
        requested_scopes: Json(vec!["openid".into()]),
        integration_id: None,
        return_to: None,
        key_id: "k".into(),
        pkce_verifier: None,
        nonce: Some("n".into()),
        client_ip: None,
        user_agent: None,
        created_at: now,
        expires_at: now + Duration::minutes(10),
        used_at: None,
        result_integration_id: None,
        result_error: None,
    }
}

#[tokio::test]
async fn a_pending_authorization_is_consumed_exactly_once_under_concurrency() {
    let app = spawn_app().await;
    let now = app.clock.now();
    let pending = pending_authorization(7, now);
    app.db
        .insert_pending_authorization(&pending)
        .await
        .expect("insert");
    let attempts = (0..16).map(|_| {
        let db = app.db.clone();
        tokio::spawn(async move {
            db.consume_pending_authorization(&[7; 32], now)
                .await
                .expect("consume")
        })
    });
    let mut winners = 0;
    for attempt in attempts {
        if attempt.await.expect("task").is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "state is single-use");
    assert_eq!(
        app.db
            .purge_pending_authorizations(now + Duration::minutes(11))
            .await
            .expect("purge"),
        1
    );
}

/// A consent of alice's to Google, not yet bound to an integration.
fn consent_to_google(now: chrono::DateTime<chrono::Utc>) -> Consent {
    Consent {
        id: Uuid::now_v7(),
        user_id: "alice".into(),
        provider: "google".into(),
        integration_id: None,
        scopes_granted: Json(vec!["openid".into()]),
        scopes_denied: Json(vec!["calendar".into()]),
        descriptions_shown: Json(json!([{"scope": "openid", "description": "Sign in"}])),
        client_ip: Some("203.0.113.9".into()),
        user_agent: Some("test".into()),
        granted_at: now,
        withdrawn_at: None,
    }
}

/// The result a replayed callback of `pending` would find.
async fn recorded_result(
    db: &oauth_manager::storage::Database,
    pending: &PendingAuthorization,
) -> Option<Uuid> {
    db.find_pending_authorization(&pending.state_hash)
        .await
        .expect("read")
        .expect("pending row")
        .result_integration_id
}

/// Alice's Google account `account`, connected as `pending` completes.
fn connection_of<'a>(
    account: &'a str,
    metadata: &'a serde_json::Value,
    granted: &'a [String],
    requested: &'a [String],
    pending: &PendingAuthorization,
    now: chrono::DateTime<chrono::Utc>,
) -> NewConnection<'a> {
    NewConnection {
        proposed_id: Uuid::now_v7(),
        user_id: "alice",
        provider: "google",
        provider_account_id: account,
        account_email: Some("alice@example.test"),
        account_name: None,
        account_metadata: metadata,
        granted_scopes: granted,
        requested_scopes: requested,
        now,
        authorization_id: pending.id,
    }
}

#[tokio::test]
async fn a_saved_connection_records_its_authorization_result_in_its_own_transaction() {
    let app = spawn_app().await;
    let now = app.clock.now();
    let metadata = json!({"issuer": "https://accounts.google.com"});
    let openid = ["openid".to_owned()];
    let calendar = ["calendar".to_owned()];
    let connection = |pending: &PendingAuthorization, requested| {
        connection_of("g-1", &metadata, &openid, requested, pending, now)
    };
    let first = pending_authorization(1, now);
    app.db
        .insert_pending_authorization(&first)
        .await
        .expect("insert");

    // A save that fails half-way records no result either.
    let refused = app
        .db
        .save_connection(
            &connection(&first, &openid),
            |_, _| Err(StorageError::Corrupt("sealing refused".into())),
            &mut consent_to_google(now),
        )
        .await;
    assert!(refused.is_err());
    assert_eq!(recorded_result(&app.db, &first).await, None);
    assert_eq!(
        app.db
            .list_integrations(
                &IntegrationFilter::default(),
                Page {
                    after: None,
                    limit: 5
                }
            )
            .await
            .expect("list")
            .items,
        []
    );

    let saved = app
        .db
        .save_connection(
            &connection(&first, &openid),
            |id, previous| {
                assert!(previous.is_none(), "a new integration has no tokens yet");
                Ok(sealed(id, now))
            },
            &mut consent_to_google(now),
        )
        .await
        .expect("save");
    assert!(saved.created);
    assert_eq!(
        recorded_result(&app.db, &first).await,
        Some(saved.integration.id)
    );
    let stored = app
        .db
        .get_integration(saved.integration.id)
        .await
        .expect("read");
    assert_eq!(
        stored.as_ref(),
        Some(&saved.integration),
        "the row as stored"
    );

    // Connecting the same account again: the same row, its tokens offered to the sealer.
    let second = pending_authorization(2, now);
    app.db
        .insert_pending_authorization(&second)
        .await
        .expect("insert");
    let again = app
        .db
        .save_connection(
            &connection(&second, &calendar),
            |id, previous| {
                assert_eq!(previous.map(|tokens| tokens.integration_id), Some(id));
                Ok(sealed(id, now))
            },
            &mut consent_to_google(now),
        )
        .await
        .expect("save again");
    assert!(!again.created);
    assert_eq!(again.integration.id, saved.integration.id);
    assert_eq!(again.integration.requested_scopes, ["calendar", "openid"]);
    assert_eq!(
        recorded_result(&app.db, &second).await,
        Some(saved.integration.id)
    );
}

#[tokio::test]
async fn concurrent_first_connections_of_one_account_save_one_integration() {
    let app = spawn_app().await;
    let now = app.clock.now();
    for round in 0..5u8 {
        let account = format!("g-{round}");
        let saves: Vec<_> = (0..8u8)
            .map(|n| {
                let (db, account) = (app.db.clone(), account.clone());
                tokio::spawn(async move {
                    let pending = pending_authorization(round * 8 + n, now);
                    db.insert_pending_authorization(&pending)
                        .await
                        .expect("insert");
                    let (metadata, openid) = (json!({}), ["openid".to_owned()]);
                    let connection =
                        connection_of(&account, &metadata, &openid, &openid, &pending, now);
                    let seal = |id, _: Option<&SealedTokens>| Ok(sealed(id, now));
                    let saved = db
                        .save_connection(&connection, seal, &mut consent_to_google(now))
                        .await;
                    (saved.map_err(|err| err.to_string()), pending)
                })
            })
            .collect();
        let mut ids = std::collections::HashSet::new();
        let mut created = 0;
        for save in saves {
            let (saved, pending) = save.await.expect("task");
            let saved = saved.expect("every callback of the account saves");
            ids.insert(saved.integration.id);
            created += usize::from(saved.created);
            assert_eq!(
                recorded_result(&app.db, &pending).await,
                Some(saved.integration.id)
            );
        }
        assert_eq!((ids.len(), created), (1, 1), "round {round}");
    }
}

#[tokio::test]
async fn consents_scopes_and_audit_events_are_stored_and_listed() {
    let app = spawn_app().await;
    let now = app.clock.now();
    let consent = consent_to_google(now);
    app.db.insert_consent(&consent).await.expect("consent");
    let listed = app
        .db
        .list_consents(
            Some("alice"),
            Page {
                after: None,
                limit: 5,
            },
        )
        .await
        .expect("list");
    assert_eq!(listed.items, [consent]);

    let entry = ScopeEntry {
        provider: "google".into(),
        scope: "openid".into(),
        description: "Sign in".into(),
        sensitivity: "basic".into(),
        features: Json(vec!["profile".into()]),
        is_default: true,
        created_at: now,
        updated_at: now,
    };
    app.db.upsert_scope(&entry).await.expect("scope");
    app.db
        .upsert_scope(&ScopeEntry {
            description: "Sign in with Google".into(),
            ..entry.clone()
        })
        .await
        .expect("update");
    let scopes = app.db.list_scopes("google").await.expect("scopes");
    let openid: Vec<_> = scopes.iter().filter(|s| s.scope == "openid").collect();
    assert_eq!(openid.len(), 1, "upsert replaces, never duplicates");
    assert_eq!(openid[0].description, "Sign in with Google");

    for action in ["authorize_started", "callback"] {
        app.db
            .append_audit_event(&NewAuditEvent {
                occurred_at: now,
                actor_user_id: Some("alice".into()),
                subject_user_id: Some("alice".into()),
                integration_id: None,
                provider: Some("google".into()),
                action: action.into(),
                outcome: Outcome::Success,
                reason: None,
                request_id: None,
                client_ip: None,
                user_agent: None,
                details: json!({}),
            })
            .await
            .expect("audit");
    }
    let events = app
        .db
        .list_audit_events(
            Some("alice"),
            Page {
                after: None,
                limit: 1,
            },
        )
        .await
        .expect("audit list");
    assert_eq!(events.items[0].action, "authorize_started");
    let rest = app
        .db
        .list_audit_events(
            Some("alice"),
            Page {
                after: events.next,
                limit: 10,
            },
        )
        .await
        .expect("next page");
    assert_eq!(rest.items[0].action, "callback");
    assert!(app
        .db
        .list_audit_events(
            Some("bob"),
            Page {
                after: None,
                limit: 10
            }
        )
        .await
        .expect("bob")
        .items
        .is_empty());
}

/// A refresher gets the lease only while the row is as it read it: this is what lets a
/// refresher skip reading the row again after taking the lease (and the storm's leader reach
/// the provider sooner). Each refusal below would otherwise refresh a token someone else
/// already refreshed, or one whose integration was given up or disconnected.
#[tokio::test]
async fn a_refresh_lease_is_granted_only_on_the_row_as_it_was_read() {
    use oauth_manager::storage::integrations::IntegrationStatus;
    use oauth_manager::storage::tokens::LeaseCheck;
    let app = spawn_app().await;
    let now = app.clock.now();
    let until = now + Duration::seconds(60);
    let integration = app.seed_integration("alice", "google").await;
    let id = integration.id;
    let generation = app
        .db
        .upsert_tokens(&sealed(id, now))
        .await
        .expect("tokens");
    let seen = LeaseCheck {
        generation,
        now,
        honour_backoff: true,
        ours: "this-process:",
    };
    let stale = LeaseCheck {
        generation: generation - 1,
        ..seen
    };
    let lease = |check| app.db.lease_unchanged_tokens(id, "taker", check, until);
    assert!(!lease(stale).await.expect("lease"), "another generation");
    assert!(lease(seen).await.expect("lease"), "unchanged: granted");
    assert!(!lease(seen).await.expect("lease"), "held by someone");
    // A lease of this process (owner prefix `ours`) counts as free: the caller holds this
    // process's lock of the integration.
    let own = LeaseCheck {
        ours: "tak",
        ..seen
    };
    let db = &app.db;
    let taken = db.lease_unchanged_tokens(id, "taker", own, until).await;
    assert!(taken.expect("lease"), "one of this process's own");
    let taken = db.try_lease_tokens(id, "taker", "tak", now, until).await;
    assert!(taken.expect("lease"), "likewise for a disconnect");
    let taken = db.try_lease_tokens(id, "other", "oth", now, until).await;
    assert!(!taken.expect("lease"), "someone else's");
    app.db
        .release_token_lease(id, "taker")
        .await
        .expect("release");

    app.db
        .defer_refresh(id, now + Duration::minutes(5))
        .await
        .expect("back off");
    assert!(!lease(seen).await.expect("lease"), "backing off");
    let forced = LeaseCheck {
        honour_backoff: false,
        ..seen
    };
    assert!(
        lease(forced).await.expect("lease"),
        "a forced refresh ignores the back-off"
    );
    app.db
        .release_token_lease(id, "taker")
        .await
        .expect("release");
    app.db.defer_refresh(id, now).await.expect("due again");

    // The worker's claim is kept by its refresh on the same conditions, when it is held
    // long enough...
    assert!(lease(seen).await.expect("lease"), "claimed");
    let holds = |check, held_until| app.db.holds_unchanged_lease(id, "taker", check, held_until);
    assert!(holds(seen, until).await.expect("read"), "held to its end");
    let later = until + Duration::seconds(1);
    assert!(
        !holds(seen, later).await.expect("read"),
        "not held that long"
    );
    assert!(
        !holds(stale, until).await.expect("read"),
        "another generation"
    );
    let others = app.db.holds_unchanged_lease(id, "other", seen, until).await;
    assert!(!others.expect("read"), "held by someone else");
    app.db
        .defer_refresh(id, now + Duration::minutes(5))
        .await
        .expect("back off");
    assert!(!holds(seen, until).await.expect("read"), "backing off");
    assert!(holds(forced, until).await.expect("read"), "forced");
    app.db.defer_refresh(id, now).await.expect("due again");
    // ... and otherwise passes to a lease of the refresh's own.
    let transfer = |check| {
        app.db
            .transfer_token_lease(id, "taker", "refresh", check, until)
    };
    assert!(
        !transfer(stale).await.expect("transfer"),
        "another generation"
    );
    assert!(
        transfer(seen).await.expect("transfer"),
        "unchanged: handed over"
    );
    assert!(
        !transfer(seen).await.expect("transfer"),
        "the claim is no longer held"
    );
    assert!(!holds(seen, until).await.expect("read"), "handed over");
    app.db
        .release_token_lease(id, "refresh")
        .await
        .expect("release");

    app.db
        .set_integration_status(id, IntegrationStatus::NeedsReauth, Some("test"), now)
        .await
        .expect("give up");
    assert!(!lease(seen).await.expect("lease"), "given up");
    app.db
        .set_integration_status(id, IntegrationStatus::Error, Some("test"), now)
        .await
        .expect("error");
    assert!(
        lease(seen).await.expect("lease"),
        "in error: still refreshable"
    );
    app.db
        .release_token_lease(id, "taker")
        .await
        .expect("release");

    app.db
        .disconnect_integration(id, true, now)
        .await
        .expect("disconnect");
    assert!(!lease(seen).await.expect("lease"), "disconnected");
}

/// Refreshes that end together share one transaction (`RefreshCommits`); each caller still
/// learns what happened to its own row, whatever else was in the batch: its new generation,
/// or `None` for an integration disconnected meanwhile. More callers than one batch holds, so
/// some turns commit others' tokens and some callers find theirs committed already.
#[tokio::test]
async fn refreshed_tokens_committed_together_each_get_their_own_outcome() {
    use oauth_manager::services::refresh_commits::RefreshCommits;
    let app = spawn_app().await;
    let now = app.clock.now();
    let mut rows = Vec::new();
    for n in 0..150_i64 {
        let id = app.seed_integration("alice", "google").await.id;
        // Generations 1 to 3, so an answer meant for another row shows.
        let mut generation = 0;
        for _ in 0..=n % 3 {
            generation = app
                .db
                .upsert_tokens(&sealed(id, now))
                .await
                .expect("tokens");
        }
        rows.push((id, generation));
    }
    let gone = rows[77].0;
    app.db.delete_tokens(gone).await.expect("delete");

    let commits = std::sync::Arc::new(RefreshCommits::default());
    let later = now + Duration::minutes(30);
    let stores = rows.iter().map(|(id, _)| {
        let (commits, db) = (commits.clone(), app.db.clone());
        let mut refreshed = sealed(*id, later);
        refreshed.access_token = id.as_bytes().to_vec();
        tokio::spawn(async move { commits.store(&db, &refreshed).await })
    });
    let stores: Vec<_> = stores.collect();
    for ((id, generation), store) in rows.iter().zip(stores) {
        let outcome = store.await.expect("task").expect("stored");
        if *id == gone {
            assert_eq!(outcome, None, "disconnected meanwhile");
            continue;
        }
        assert_eq!(outcome, Some(generation + 1), "{id}");
        let stored = app.db.get_tokens(*id).await.expect("read").expect("row");
        assert_eq!(stored.access_token, id.as_bytes().to_vec());
        assert_eq!(stored.generation, generation + 1);
    }
}

/// Makes the database refuse any update of a token row to `key_id = 'refused'` (a stand-in
/// for a row the database rejects; tests only).
async fn refuse_key_id_refused(db: &oauth_manager::storage::Database) {
    use oauth_manager::storage::Database;
    let statements: &[&str] = match db {
        Database::Postgres(_) => &[
            "CREATE FUNCTION refuse_key() RETURNS trigger AS $$ BEGIN \
             IF NEW.key_id = 'refused' THEN RAISE EXCEPTION 'refused by the test'; END IF; \
             RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_key BEFORE UPDATE ON oauth_tokens \
             FOR EACH ROW EXECUTE FUNCTION refuse_key()",
        ],
        Database::Sqlite(..) => &["CREATE TRIGGER refuse_key BEFORE UPDATE ON oauth_tokens \
             WHEN NEW.key_id = 'refused' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"],
    };
    for sql in statements {
        crate::support::raw!(db, sql);
    }
}

/// A shared commit that fails is retried row by row: the one row the database refuses gets
/// its error, and every refresh that was in a batch with it is still stored and told so.
#[tokio::test]
async fn one_refused_row_fails_only_its_own_refresh_among_those_committed_together() {
    use oauth_manager::services::refresh_commits::RefreshCommits;
    let app = spawn_app().await;
    let now = app.clock.now();
    refuse_key_id_refused(&app.db).await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        let id = app.seed_integration("alice", "google").await.id;
        app.db
            .upsert_tokens(&sealed(id, now))
            .await
            .expect("tokens");
        ids.push(id);
    }
    let refused = ids[17];
    let commits = std::sync::Arc::new(RefreshCommits::default());
    let stores: Vec<_> = ids
        .iter()
        .map(|id| {
            let (commits, db) = (commits.clone(), app.db.clone());
            let mut refreshed = sealed(*id, now + Duration::minutes(30));
            if *id == refused {
                refreshed.key_id = "refused".into();
            }
            tokio::spawn(async move { commits.store(&db, &refreshed).await })
        })
        .collect();
    for (id, store) in ids.iter().zip(stores) {
        let outcome = store.await.expect("task");
        if *id == refused {
            assert!(outcome.is_err(), "the refused row fails: {outcome:?}");
            continue;
        }
        assert_eq!(outcome.expect("stored"), Some(2), "{id}");
        let stored = app.db.get_tokens(*id).await.expect("read").expect("row");
        assert_eq!(stored.generation, 2);
    }
    let kept = app
        .db
        .get_tokens(refused)
        .await
        .expect("read")
        .expect("row");
    assert_eq!((kept.generation, kept.key_id.as_str()), (1, "k1-test"));
}
