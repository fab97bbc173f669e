//! The `oauth-manager` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use oauth_manager::app::{self, Application};
use oauth_manager::clock::{SharedClock, SystemClock};
use oauth_manager::config::{Config, Env};
use oauth_manager::crypto::KeyMaterial;
use oauth_manager::services::{audit, keys, vault::TokenVault, worker};
use oauth_manager::storage::Database;
use oauth_manager::{dev, telemetry};

#[derive(Debug, Parser)]
#[command(name = "oauth-manager", version, about = "Self-hosted OAuth token vault", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP service (the default). Applies pending migrations first.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run only the background worker (token refresh, pending revocations, purging), for
    /// deployments that scale it separately from `serve` (then set OAUTH_BACKGROUND_REFRESH=false there).
    Worker,
    /// Local development: SQLite, generated keys, printed bearer tokens. NOT for production.
    Dev {
        /// Where the development key and JWT secret are kept.
        #[arg(long, default_value = dev::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Encryption key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the audit log's hash chains (DATABASE_URL; no keys needed). Prints a JSON report
    /// with every chain's head (keep them elsewhere: only they reveal truncated chains); exits
    /// non-zero, naming the first bad row, when the log was tampered with.
    Verify,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Print a fresh key for OAUTH_ENCRYPTION_KEY (base64 of 32 random bytes).
    Generate,
    /// Re-encrypt every stored secret under the active key (OAUTH_ENCRYPTION_KEY).
    Rotate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("oauth-manager: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("oauth-manager: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    match command {
        Command::Serve => serve(load_config()?, clock).await,
        Command::Migrate => {
            let config = load_config()?;
            let db = app::open_database(&config).await?;
            println!("migrations applied ({})", db.backend());
            Ok(())
        }
        Command::Dev { dir } => run_dev(&dir, clock).await,
        Command::Worker => {
            let mut config = load_config()?;
            let services = app::build_services(&mut config, clock).await?;
            let metrics = app::MetricsEndpoint::bind(&config)
                .await?
                .map(app::MetricsEndpoint::spawn);
            tracing::info!("background worker running");
            worker::run(services, config.worker, app::shutdown_signal()).await;
            if let Some(metrics) = metrics {
                metrics.abort();
            }
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Generate,
        } => {
            println!("{}", KeyMaterial::generate().to_base64().as_str());
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let config = load_config()?;
            // Read-only: no migrations, no genesis row, no keys.
            let db = Database::connect(config.database_url.expose_secret(), config.database_pool)
                .await
                .context("cannot connect to DATABASE_URL")?;
            let report = audit::verify(&db)
                .await
                .context("cannot read the audit log (run `oauth-manager migrate` first?)")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            match &report.first_problem {
                None => Ok(()),
                Some(problem) => anyhow::bail!(
                    "audit log verification failed: row {}: {} ({} problem(s) in total)",
                    problem.row_id,
                    problem.reason,
                    report.problems
                ),
            }
        }
        Command::Keys {
            command: KeysCommand::Rotate,
        } => {
            let config = load_config()?;
            let vault = TokenVault::new(Arc::new(app::keyring(&config)?));
            let db = app::open_database(&config).await?;
            let report = keys::rotate(&db, &vault, clock.now()).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

fn load_config() -> anyhow::Result<Config> {
    let config = Config::from_env()?;
    telemetry::init(config.log_format);
    Ok(config)
}

async fn serve(config: Config, clock: SharedClock) -> anyhow::Result<()> {
    let addr = config.listen_addr;
    let application = Application::build(config, clock).await?;
    let listener = oauth_manager::http::server::listen(addr)
        .with_context(|| format!("cannot listen on {addr} (OAUTH_LISTEN_ADDR)"))?;
    tracing::info!(address = %listener.local_addr()?, "oauth-manager listening");
    application.serve(listener, app::shutdown_signal()).await?;
    Ok(())
}

async fn run_dev(dir: &std::path::Path, clock: SharedClock) -> anyhow::Result<()> {
    // dev must never touch a real deployment's database, whatever the shell exports.
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.starts_with("sqlite:") {
            anyhow::bail!(
                "dev runs on SQLite only; unset DATABASE_URL (it names another database)"
            );
        }
    }
    let secrets = dev::DevSecrets::load_or_create(dir)
        .with_context(|| format!("cannot prepare the development folder {}", dir.display()))?;
    let listen =
        std::env::var("OAUTH_LISTEN_ADDR").unwrap_or_else(|_| dev::DEV_LISTEN_ADDR.to_owned());
    let public_url =
        std::env::var("OAUTH_PUBLIC_URL").unwrap_or_else(|_| format!("http://{listen}"));
    // Dev overrides the key and JWT settings; everything else still comes from the environment.
    let lookup = |name: &str| match name {
        "OAUTH_ENCRYPTION_KEY" => Some(secrets.encryption_key.expose_secret().to_owned()),
        "OAUTH_JWT_SECRET" => Some(secrets.jwt_secret.expose_secret().to_owned()),
        "OAUTH_ENCRYPTION_KEY_FILE"
        | "OAUTH_JWT_SECRET_FILE"
        | "OAUTH_JWT_PUBLIC_KEY"
        | "OAUTH_JWT_PUBLIC_KEY_FILE"
        | "OAUTH_JWT_JWKS_URL"
        | "OAUTH_JWT_ISSUER"
        | "OAUTH_JWT_AUDIENCE"
        | "OAUTH_ROLE_PERMISSIONS"
        | "OAUTH_JWT_ROLES_CLAIM" => None,
        "OAUTH_LISTEN_ADDR" => Some(listen.clone()),
        "OAUTH_PUBLIC_URL" => Some(public_url.clone()),
        "OAUTH_LOG_FORMAT" => std::env::var(name)
            .ok()
            .or_else(|| Some("pretty".to_owned())),
        _ => std::env::var(name).ok(),
    };
    let config = Config::from_lookup(&Env::new(&lookup))?;
    telemetry::init(config.log_format);
    let addr = config.listen_addr;
    if !addr.ip().is_loopback() {
        eprintln!(
            "WARNING: dev is listening on {addr}, reachable from other machines, and prints \
             tokens that grant access to everything it stores."
        );
    }
    let application = Application::build(config, clock.clone()).await?;
    let listener = oauth_manager::http::server::listen(addr)
        .with_context(|| format!("cannot listen on {addr} (set OAUTH_LISTEN_ADDR)"))?;
    let base = format!("http://{}", listener.local_addr()?);
    let user_token = secrets.mint_token("dev-user", &["user"], clock.now())?;
    let admin_token = secrets.mint_token("dev-admin", &["admin"], clock.now())?;
    eprintln!("{}", dev::BANNER);
    println!("oauth-manager (dev) listening on {base}");
    println!("development folder: {}", secrets.dir.display());
    println!("database: {}", application.state.services.db.backend());
    println!();
    println!("user token (sub=dev-user, roles=[user], 12 h):\n{user_token}");
    println!();
    println!("admin token (sub=dev-admin, roles=[admin], 12 h):\n{admin_token}");
    println!();
    println!("try:");
    println!("  curl -s -H 'Authorization: Bearer {user_token}' {base}/api/v1/oauth/providers");
    println!("  curl -s -H 'Authorization: Bearer {user_token}' {base}/api/v1/oauth/integrations");
    application.serve(listener, app::shutdown_signal()).await?;
    Ok(())
}
