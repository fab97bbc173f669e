//! The `oauth-manager` binary: configuration errors, migrate, keys, dev, graceful shutdown.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use oauth_manager::crypto::{KeyMaterial, Keyring};
use oauth_manager::services::vault::TokenVault;
use oauth_manager::storage::Database;
use secrecy::ExposeSecret;

use crate::encryption::store;
use crate::support::{spawn_app_on, TestDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_oauth-manager");
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn command(dir: &std::path::Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

#[test]
fn a_bad_variable_stops_start_up_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (vec![("OAUTH_LISTEN_ADDR", "nonsense")], "OAUTH_LISTEN_ADDR"),
        (vec![], "OAUTH_ENCRYPTION_KEY"),
        (vec![("OAUTH_ENCRYPTION_KEY", KEY)], "OAUTH_JWT_SECRET"),
        (
            vec![
                ("OAUTH_ENCRYPTION_KEY", "c2hvcnQ="),
                ("OAUTH_JWT_SECRET", SECRET),
            ],
            "OAUTH_ENCRYPTION_KEY",
        ),
        (
            vec![
                ("OAUTH_ENCRYPTION_KEY", KEY),
                ("OAUTH_JWT_SECRET", SECRET),
                ("MICROSOFT_TENANT", "a b"),
            ],
            "MICROSOFT_TENANT",
        ),
    ];
    for (vars, named) in cases {
        let output = command(dir.path())
            .args(["serve"])
            .envs(vars.clone())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{vars:?} must fail");
        assert!(
            stderr.contains(named),
            "{vars:?}: stderr does not name {named}: {stderr}"
        );
        assert!(!stderr.contains(KEY), "the key value leaked: {stderr}");
    }
}

#[tokio::test]
async fn migrate_applies_and_is_idempotent() {
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    for _ in 0..2 {
        let output = command(dir.path())
            .arg("migrate")
            .env("DATABASE_URL", &database.url)
            .output()
            .expect("run");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn keys_generate_prints_a_usable_key() {
    let output = Command::new(BIN)
        .args(["keys", "generate"])
        .output()
        .expect("run");
    let key = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        oauth_manager::config::decode_key("k", &key).is_ok(),
        "{key}"
    );
}

#[tokio::test]
async fn keys_rotate_reseals_stored_tokens_under_the_new_key() {
    let (old_key, new_key) = (KeyMaterial::generate(), KeyMaterial::generate());
    let database = TestDatabase::create().await;
    let url = database.url.clone();
    let app = spawn_app_on(database, &old_key, &[]).await;
    let (id, user) = store(&app, "alice", "alice").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut rotate = command(dir.path());
    rotate
        .args(["keys", "rotate"])
        .env("DATABASE_URL", &url)
        .env("OAUTH_ENCRYPTION_KEY", new_key.to_base64().as_str())
        .env("OAUTH_ENCRYPTION_OLD_KEYS", old_key.to_base64().as_str());
    let output = tokio::task::spawn_blocking(move || rotate.output())
        .await
        .expect("join")
        .expect("run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("JSON report");
    assert_eq!(report["tokens_resealed"], 1, "{report}");

    // The old key can go: the row opens with the new key alone.
    let db = Database::connect(&url, Default::default())
        .await
        .expect("connect");
    let sealed = db.get_tokens(id).await.expect("read").expect("row");
    assert_eq!(sealed.key_id, new_key.key_id());
    let only_new = TokenVault::new(Arc::new(Keyring::new(&new_key, &[]).expect("keyring")));
    let tokens = only_new
        .open(&user, &sealed)
        .expect("opens under the new key");
    assert_eq!(
        tokens.access_token.expose_secret(),
        "access-alice-plaintext"
    );
}

/// Kills the child if a test fails half-way.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn dev_prints_a_working_token_and_sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Running(
        command(dir.path())
            .args(["dev", "--dir", "devfolder"])
            .env("OAUTH_LISTEN_ADDR", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dev"),
    );
    // Drain stdout on a thread for the child's whole life: a closed pipe would kill it at its
    // next println.
    let stdout = child.0.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let lines: Vec<String> = tokio::task::spawn_blocking(move || {
        receiver
            .iter()
            .take_while(|line| !line.starts_with("  curl"))
            .collect()
    })
    .await
    .expect("read");
    let base = lines[0].rsplit(' ').next().expect("address").to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{lines:?}");
    let token_line = lines
        .iter()
        .position(|l| l.starts_with("user token"))
        .expect("token heading")
        + 1;
    let token = &lines[token_line];
    let response = reqwest::Client::new()
        .get(format!("{base}/api/v1/oauth/providers"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["items"].as_array().expect("items").len(), 4);
    assert!(
        dir.path().join("oauth-manager.db").exists(),
        "SQLite file in the working directory"
    );
    let status = terminate(&mut child.0);
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(stderr.contains("NOT FOR PRODUCTION"));
}
