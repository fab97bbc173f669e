//! Real `oauth-manager serve` processes on a test app's database, key and providers, for
//! tests that kill them (SIGKILL) and start them again.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{TestApp, JWT_SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_oauth-manager");

/// A running `serve` process; dropping it kills it (SIGKILL).
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl Server {
    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `serve` on the test app's database, key and providers, and waits for its address.
pub fn start_server(app: &TestApp) -> Server {
    start_server_with(app, &[])
}

/// [`start_server`] with extra (or overriding) environment variables.
pub fn start_server_with(app: &TestApp, extra: &[(&str, &str)]) -> Server {
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (name, value) in &app.vars {
        command.env(name, value);
    }
    command
        .env("DATABASE_URL", &app.database.url)
        .env("OAUTH_ENCRYPTION_KEY", app.key.to_base64().as_str())
        .env("OAUTH_JWT_SECRET", JWT_SECRET)
        .env("OAUTH_PUBLIC_URL", "https://oauth.example.test")
        .env("OAUTH_LISTEN_ADDR", "127.0.0.1:0")
        .env("OAUTH_BACKGROUND_REFRESH", "false")
        // Load tests drive many connect flows from one address.
        .env("OAUTH_RATE_LIMIT_CONNECT_PER_MINUTE", "100000")
        .env("OAUTH_REFRESH_LEASE_SECONDS", "9")
        .env("OAUTH_PROVIDER_TIMEOUT_SECONDS", "2")
        .env("OAUTH_LOG_FORMAT", "json");
    for (name, value) in extra {
        command.env(name, value);
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn serve");
    let stderr = child.stderr.take().expect("stderr");
    let (sender, receiver) = std::sync::mpsc::channel();
    // Keep draining the log for the child's whole life (echoed with OAUTH_TEST_SERVER_LOG=1).
    let echo = std::env::var_os("OAUTH_TEST_SERVER_LOG").is_some();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if echo {
                eprintln!("{line}");
            }
            let address = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|event| event["address"].as_str().map(str::to_owned));
            if let Some(address) = address {
                let _ = sender.send(address);
            }
        }
    });
    let address = receiver
        .recv_timeout(Duration::from_secs(30))
        .expect("serve logs its address");
    Server {
        child,
        base: format!("http://{address}"),
    }
}
