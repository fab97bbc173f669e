//! A fresh database per test: a SQLite file in a temporary folder, or, when
//! `TEST_DATABASE_URL` names a PostgreSQL server, a fresh schema in that database.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use uuid::Uuid;

use oauth_manager::storage::{Database, PoolSettings};

pub struct TestDatabase {
    /// The URL the service connects with.
    pub url: String,
    pub backend: &'static str,
    _dir: Option<tempfile::TempDir>,
}

pub fn postgres_server_url() -> Option<String> {
    std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
}

impl TestDatabase {
    pub async fn create() -> Self {
        match postgres_server_url() {
            Some(server) => Self::postgres_schema(&server).await,
            None => Self::sqlite_file(),
        }
    }

    fn sqlite_file() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
        Self {
            url,
            backend: "sqlite",
            _dir: Some(dir),
        }
    }

    async fn postgres_schema(server: &str) -> Self {
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let mut conn = PgConnectOptions::from_str(server)
            .expect("TEST_DATABASE_URL")
            .disable_statement_logging()
            .connect()
            .await
            .expect("connect to TEST_DATABASE_URL");
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut conn)
            .await
            .expect("create schema");
        conn.close().await.ok();
        let separator = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{separator}options=-c%20search_path%3D{schema}");
        Self {
            url,
            backend: "postgres",
            _dir: None,
        }
    }

    /// A database the test manages itself (e.g. a [`super::pg_cluster::PgCluster`]'s), used
    /// as it is: no schema of its own.
    pub fn at(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            backend: if url.starts_with("sqlite:") {
                "sqlite"
            } else {
                "postgres"
            },
            _dir: None,
        }
    }

    /// The same database, for a second app (the first owns any temporary files).
    pub fn alias(&self) -> TestDatabase {
        TestDatabase {
            url: self.url.clone(),
            backend: self.backend,
            _dir: None,
        }
    }

    pub async fn connect(&self) -> Database {
        Database::connect(&self.url, PoolSettings::default())
            .await
            .expect("connect")
    }
}
