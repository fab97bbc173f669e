//! A throw-away PostgreSQL cluster that a test starts, stops and restarts itself (database
//! restart tests must never touch the machine's shared server).
//!
//! `initdb` goes into a temporary directory; the server listens on a free loopback port with
//! its socket in that directory. PostgreSQL refuses to run as root, so when the tests run as
//! root every command runs as `postgres` through `runuser` (the directory is handed over to
//! it). The binaries are found in `OAUTH_TEST_PG_BINDIR`, else the newest
//! `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`, else `PATH`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    /// `postgres://postgres@127.0.0.1:PORT/oauth`
    pub url: String,
}

impl PgCluster {
    /// Creates and starts a cluster with a database `oauth`; `Err` says why it cannot (no
    /// PostgreSQL server binaries here), so the caller can skip loudly.
    pub async fn start() -> Result<PgCluster, String> {
        let bin = find_bin_dir().ok_or(
            "no PostgreSQL server binaries (initdb, pg_ctl) found: set OAUTH_TEST_PG_BINDIR",
        )?;
        let as_postgres = running_as_root();
        let dir = tempfile::tempdir().map_err(|err| format!("tempdir: {err}"))?;
        if as_postgres {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .status()
                .map_err(|err| format!("chown: {err}"))?;
            if !status.success() {
                return Err("cannot hand the cluster directory to the postgres user".to_owned());
            }
        }
        let port = free_port();
        let cluster = PgCluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/oauth"),
            bin,
            dir,
            port,
            as_postgres,
        };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "--no-locale",
                "-E",
                "UTF8",
            ],
        )?;
        cluster.start_server()?;
        let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .map_err(|err| format!("connect to the new cluster: {err}"))?;
        sqlx::query("CREATE DATABASE oauth")
            .execute(&mut conn)
            .await
            .map_err(|err| format!("create database: {err}"))?;
        Ok(cluster)
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<Output, String> {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|err| format!("{}: {err}", program.display()))?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(format!(
                "{tool} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    pub fn start_server(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-o", &options, "-l", &log, "-w", "-t", "30", "start",
            ],
        )
        .map(|_| ())
    }

    /// `pg_ctl stop -m immediate`: every backend is killed at once, as in a crash; the next
    /// start runs crash recovery.
    pub fn stop_immediate(&self) -> Result<(), String> {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            .map(|_| ())
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("OAUTH_TEST_PG_BINDIR").map(PathBuf::from) {
        return has_tools(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_tools(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|dir| has_tools(dir)) {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_tools(dir))
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").port()
}
