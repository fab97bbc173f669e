//! Migrations: the six tables, exactly named, applied idempotently, with their indexes.

use crate::support::TestDatabase;
use oauth_manager::storage::Database;

const TABLES: [&str; 6] = [
    "oauth_audit_log",
    "oauth_consents",
    "oauth_integrations",
    "oauth_scopes",
    "oauth_state",
    "oauth_tokens",
];

async fn table_names(db: &Database) -> Vec<String> {
    match db {
        Database::Postgres(pool) => {
            sqlx::query_scalar(
                "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name LIKE 'oauth%' ORDER BY 1",
            )
            .fetch_all(pool)
            .await
        }
        Database::Sqlite(pool, _) => sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'oauth%' ORDER BY 1",
        )
        .fetch_all(pool)
        .await,
    }
    .expect("list tables")
}

#[tokio::test]
async fn migrating_twice_is_a_no_op_and_creates_exactly_the_six_tables() {
    let database = TestDatabase::create().await;
    let db = database.connect().await;
    db.migrate().await.expect("first run");
    db.migrate().await.expect("second run is a no-op");
    assert_eq!(table_names(&db).await, TABLES);
}

async fn index_names(db: &Database) -> Vec<String> {
    match db {
        Database::Postgres(pool) => {
            sqlx::query_scalar(
                "SELECT indexname::text FROM pg_indexes \
                 WHERE schemaname = current_schema() AND tablename LIKE 'oauth%' ORDER BY 1",
            )
            .fetch_all(pool)
            .await
        }
        Database::Sqlite(pool, _) => {
            sqlx::query_scalar(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name LIKE 'oauth%' \
             ORDER BY 1",
            )
            .fetch_all(pool)
            .await
        }
    }
    .expect("list indexes")
}

#[tokio::test]
async fn lookup_indexes_exist() {
    let database = TestDatabase::create().await;
    let db = database.connect().await;
    db.migrate().await.expect("migrate");
    let indexes = index_names(&db).await;
    for index in [
        "oauth_integrations_provider_account_idx",
        "oauth_state_integration_idx",
    ] {
        assert!(
            indexes.iter().any(|name| name == index),
            "{index} missing on {}: {indexes:?}",
            database.backend
        );
    }
}

#[tokio::test]
async fn foreign_keys_are_enforced() {
    let database = TestDatabase::create().await;
    let db = database.connect().await;
    db.migrate().await.expect("migrate");
    let sql = "INSERT INTO oauth_tokens (integration_id, key_id, access_token, token_type, created_at, updated_at) \
               VALUES ($1, 'k', $2, 'Bearer', $3, $3)";
    let now = chrono::Utc::now();
    let orphan = uuid::Uuid::now_v7();
    let result = match &db {
        Database::Postgres(pool) => sqlx::query(sql)
            .bind(orphan)
            .bind(vec![1u8])
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ()),
        Database::Sqlite(pool, _) => sqlx::query(sql)
            .bind(orphan)
            .bind(vec![1u8])
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ()),
    };
    let err = result.expect_err("a token row without its integration must be refused");
    assert!(
        err.as_database_error()
            .is_some_and(|e| e.is_foreign_key_violation()),
        "not a foreign-key violation: {err}"
    );
}
