//! Token encryption at rest, through the real storage: round trip, ciphertext-only columns,
//! tampering, swapped rows and columns, key rotation.

use std::sync::Arc;

use oauth_manager::clock::Clock;
use oauth_manager::crypto::{CryptoError, KeyMaterial, Keyring};
use oauth_manager::services::keys;
use oauth_manager::services::vault::{pkce_verifier_aad, TokenOwner, TokenSet, TokenVault};
use oauth_manager::storage::state::PendingAuthorization;
use oauth_manager::storage::Database;
use secrecy::{ExposeSecret, SecretString};
use sqlx::types::Json;
use uuid::Uuid;

use crate::support::{spawn_app, spawn_app_on, TestApp, TestDatabase};

fn token_set(tag: &str) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(format!("access-{tag}-plaintext")),
        refresh_token: Some(SecretString::from(format!("refresh-{tag}-plaintext"))),
        id_token: Some(SecretString::from(format!("idtoken-{tag}-plaintext"))),
        token_type: "Bearer".to_owned(),
        expires_at: None,
        refresh_token_expires_at: None,
    }
}

/// Seals a token set for a new integration of `user` and stores it; the access token reads
/// `access-{tag}-plaintext`. Also used by the CLI tests.
pub(crate) async fn store(app: &TestApp, user: &str, tag: &str) -> (Uuid, String) {
    let integration = app.seed_integration(user, "google").await;
    let owner = TokenOwner {
        integration_id: integration.id,
        user_id: user,
    };
    let sealed = app
        .state
        .services
        .vault
        .seal(owner, &token_set(tag), app.clock.now())
        .expect("seal");
    app.db.upsert_tokens(&sealed).await.expect("store");
    (integration.id, user.to_owned())
}

async fn copy_column(db: &Database, column_from: &str, from: Uuid, column_to: &str, to: Uuid) {
    let sql = format!(
        "UPDATE oauth_tokens SET {column_to} = (SELECT {column_from} FROM oauth_tokens WHERE integration_id = $1) WHERE integration_id = $2"
    );
    crate::support::raw!(db, &sql, from, to);
}

#[tokio::test]
async fn tokens_round_trip_and_the_table_holds_only_ciphertext() {
    let app = spawn_app().await;
    let (id, user) = store(&app, "alice", "a").await;
    let sealed = app.db.get_tokens(id).await.expect("read").expect("row");
    assert_eq!(
        sealed.key_id,
        app.state.services.vault.keyring().active_key_id()
    );
    let opened = app.state.services.vault.open(&user, &sealed).expect("open");
    assert_eq!(opened.access_token.expose_secret(), "access-a-plaintext");
    assert_eq!(
        opened.refresh_token.expect("refresh").expose_secret(),
        "refresh-a-plaintext"
    );
    for column in [
        &sealed.access_token,
        sealed.refresh_token.as_ref().expect("rt"),
        sealed.id_token.as_ref().expect("id"),
    ] {
        assert!(
            !column.windows(9).any(|w| w == b"plaintext"),
            "plaintext stored"
        );
    }
    // And nowhere in the SQLite file either (PostgreSQL is covered by the column check).
    if app.database.backend == "sqlite" {
        app.db.close().await;
        let path = app
            .database
            .url
            .trim_start_matches("sqlite://")
            .trim_end_matches("?mode=rwc");
        for file in [path.to_owned(), format!("{path}-wal")] {
            if let Ok(bytes) = std::fs::read(&file) {
                assert!(
                    !bytes.windows(9).any(|w| w == b"plaintext"),
                    "plaintext in {file}"
                );
            }
        }
    }
}

#[tokio::test]
async fn tampered_ciphertext_does_not_open() {
    let app = spawn_app().await;
    let (id, user) = store(&app, "alice", "a").await;
    let mut sealed = app.db.get_tokens(id).await.expect("read").expect("row");
    let last = sealed.access_token.len() - 1;
    sealed.access_token[last] ^= 0x80;
    let generation = sealed.generation;
    assert!(app
        .db
        .reseal_tokens(&sealed, generation)
        .await
        .expect("write"));
    let stored = app.db.get_tokens(id).await.expect("read").expect("row");
    assert_eq!(
        app.state
            .services
            .vault
            .open(&user, &stored)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(CryptoError::Authentication.to_string())
    );
}

#[tokio::test]
async fn ciphertext_moved_to_another_row_or_column_does_not_open() {
    let app = spawn_app().await;
    let (alice_id, _) = store(&app, "alice", "a").await;
    let (bob_id, bob) = store(&app, "bob", "b").await;
    // Alice's access token copied into Bob's row: same key, other row and owner.
    copy_column(&app.db, "access_token", alice_id, "access_token", bob_id).await;
    let stolen = app.db.get_tokens(bob_id).await.expect("read").expect("row");
    let err = app
        .state
        .services
        .vault
        .open(&bob, &stolen)
        .map(|_| ())
        .expect_err("swapped row must not decrypt");
    assert_eq!(err, CryptoError::Authentication);
    // Bob's own refresh token moved into his access-token column.
    let (carol_id, carol) = store(&app, "carol", "c").await;
    copy_column(&app.db, "refresh_token", carol_id, "access_token", carol_id).await;
    let shuffled = app
        .db
        .get_tokens(carol_id)
        .await
        .expect("read")
        .expect("row");
    let err = app
        .state
        .services
        .vault
        .open(&carol, &shuffled)
        .map(|_| ())
        .expect_err("swapped column must not decrypt");
    assert_eq!(err, CryptoError::Authentication);
    // The untouched row still opens.
    let alice = app
        .db
        .get_tokens(alice_id)
        .await
        .expect("read")
        .expect("row");
    assert!(app.state.services.vault.open("alice", &alice).is_ok());
}

async fn seed_pending_authorization(app: &TestApp, user: &str) -> Uuid {
    let id = Uuid::now_v7();
    let now = app.clock.now();
    let verifier = SecretString::from("verifier-plaintext-0123456789".to_owned());
    let state_id = id.to_string();
    let sealed = app
        .state
        .services
        .vault
        .keyring()
        .seal(&verifier, pkce_verifier_aad(&state_id, user))
        .expect("seal");
    let pending = PendingAuthorization {
        id,
        state_hash: id.as_bytes().to_vec(),
        user_id: user.to_owned(),
        provider: "google".to_owned(),
        redirect_uri: "https://oauth.example.test/api/v1/oauth/callback/google".to_owned(),
        requested_scopes: Json(vec!["openid".to_owned()]),
        integration_id: None,
        return_to: None,
        key_id: app
            .state
            .services
            .vault
            .keyring()
            .active_key_id()
            .to_owned(),
        pkce_verifier: Some(sealed),
        nonce: None,
        client_ip: None,
        user_agent: None,
        created_at: now,
        expires_at: now + chrono::Duration::minutes(10),
        used_at: None,
        result_integration_id: None,
        result_error: None,
    };
    app.db
        .insert_pending_authorization(&pending)
        .await
        .expect("insert state");
    id
}

#[tokio::test]
async fn rotation_reseals_everything_under_the_active_key() {
    let old_key = KeyMaterial::generate();
    let database = TestDatabase::create().await;
    let url = database.url.clone();
    let before = spawn_app_on(database, &old_key, &[]).await;
    let mut rows = Vec::new();
    for user in ["alice", "bob", "carol"] {
        rows.push(store(&before, user, user).await);
    }
    let state_id = seed_pending_authorization(&before, "alice").await;

    // Restart with a new active key, the old one kept readable.
    let new_key = KeyMaterial::generate();
    let db = Database::connect(&url, Default::default())
        .await
        .expect("connect");
    let keyring = Keyring::new(&new_key, std::slice::from_ref(&old_key)).expect("keyring");
    let vault = TokenVault::new(Arc::new(keyring));
    let report = keys::rotate(&db, &vault, before.clock.now())
        .await
        .expect("rotate");
    assert_eq!(report.tokens_resealed, 3);
    assert_eq!(report.pending_authorizations_resealed, 1);
    assert_eq!(
        keys::rotate(&db, &vault, before.clock.now())
            .await
            .expect("again")
            .tokens_resealed,
        0,
        "idempotent"
    );

    // The old key can now be dropped: everything opens with the new key alone.
    let only_new = TokenVault::new(Arc::new(Keyring::new(&new_key, &[]).expect("keyring")));
    for (id, user) in &rows {
        let sealed = db.get_tokens(*id).await.expect("read").expect("row");
        assert_eq!(sealed.key_id, new_key.key_id());
        let tokens = only_new
            .open(user, &sealed)
            .expect("opens under the new key");
        assert_eq!(
            tokens.access_token.expose_secret(),
            format!("access-{user}-plaintext")
        );
    }
    let pending = db
        .find_pending_authorization(state_id.as_bytes())
        .await
        .expect("read")
        .expect("row");
    let aad_id = state_id.to_string();
    let verifier = only_new
        .keyring()
        .open(
            &pending.key_id,
            pending.pkce_verifier.as_deref().expect("verifier"),
            pkce_verifier_aad(&aad_id, "alice"),
        )
        .expect("verifier re-sealed");
    assert_eq!(verifier.expose_secret(), "verifier-plaintext-0123456789");
}

#[tokio::test]
async fn a_missing_old_key_is_reported_by_its_id() {
    let app = spawn_app().await;
    let (id, user) = store(&app, "alice", "a").await;
    let sealed = app.db.get_tokens(id).await.expect("read").expect("row");
    let stranger = TokenVault::new(Arc::new(
        Keyring::new(&KeyMaterial::generate(), &[]).expect("ring"),
    ));
    let err = stranger
        .open(&user, &sealed)
        .map(|_| ())
        .expect_err("unknown key");
    assert_eq!(err, CryptoError::UnknownKey(sealed.key_id.clone()));
    assert!(err.to_string().contains("OAUTH_ENCRYPTION_OLD_KEYS"));
}
