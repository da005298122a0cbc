//! Shared glue for Keel's binaries, kept in one place so no binary copies it.
//!
//! - [`cli`]: clap parsing with Keel's exit codes (usage errors exit 64, never 2), the flags every
//!   binary takes (`--database-url`/`DATABASE_URL`, `--log-format text|json`), and a
//!   [`DatabaseUrl`] that never prints its password.
//! - [`telemetry`]: tracing initialisation from `RUST_LOG`, text or JSON.
//! - [`http`]: the `/metrics` (OpenMetrics or Prometheus text), `/healthz` and `/readyz`
//!   listener, with `keel_build_info` and the [`process`] families on every scrape.
//! - [`shutdown`]: a token cancelled on SIGTERM or SIGINT.
//! - [`supervise`]: background tasks whose death before shutdown stops the process (exit 1).
//! - [`migrate`]: the `migrate` subcommand.
//! - [`run`]: runs a binary's async main, logging an error and exiting 1 if it fails.
//!
//! A binary's `main` is a few lines:
//!
//! ```no_run
//! use clap::{Parser, Subcommand};
//! use keel_service::cli::{DatabaseArgs, LogArgs};
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     log: LogArgs,
//!     #[command(subcommand)]
//!     command: Command,
//! }
//!
//! #[derive(Subcommand)]
//! enum Command {
//!     /// Apply the embedded migrations.
//!     Migrate(keel_service::MigrateArgs),
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     let cli: Cli = keel_service::cli::parse();
//!     keel_service::run(&cli.log, async move {
//!         match cli.command {
//!             Command::Migrate(db) => keel_service::migrate(&db).await,
//!         }
//!     })
//! }
//! ```

/// The README's code, compiled as doctests so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub mod cli;
pub mod http;
pub mod process;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;
pub mod text;

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};

pub use cli::{DatabaseArgs, DatabaseUrl, EXIT_USAGE, LogArgs, LogFormat, MigrateArgs};

/// Exit code for an error (configuration, database, I/O).
pub const EXIT_ERROR: u8 = 1;

/// Initialises tracing, runs `main` on a multi-threaded Tokio runtime, and turns its outcome into
/// the process exit code: `Ok(code)` as is, `Err` logged at ERROR with its causes and exit 1.
pub fn run<F>(log: &LogArgs, main: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<ExitCode>>,
{
    if let Err(e) = telemetry::init(log.log_format) {
        eprintln!("could not initialise logging: {e}");
        return ExitCode::from(EXIT_ERROR);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "could not start the async runtime");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(main) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = error_chain(&e), "failed");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// An error and its causes on one line, `outer: cause: root`, leaving out a cause whose text
/// its parent already shows (drivers often repeat their source in their own message).
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut shown = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !previous.is_empty() && previous.contains(&text) {
            continue;
        }
        if !shown.is_empty() {
            shown.push_str(": ");
        }
        shown.push_str(&text);
        previous = text;
    }
    shown
}

/// Connects a pool to the database, naming the application in `pg_stat_activity`.
///
/// The first connection is made directly, not through the pool, so a refused connection, a
/// failed login or a missing database is reported at once with its cause instead of as a pool
/// timeout.
///
/// A role that could bypass the audit trail's triggers (its owner, or a superuser) is logged at
/// WARN: serve as the application role `migrate --app-role` granted.
pub async fn connect(
    db: &DatabaseArgs,
    application_name: &str,
    max_connections: u32,
) -> anyhow::Result<PgPool> {
    connect_checked(db, application_name, max_connections, true).await
}

async fn connect_checked(
    db: &DatabaseArgs,
    application_name: &str,
    max_connections: u32,
    check_role: bool,
) -> anyhow::Result<PgPool> {
    const CONTEXT: &str = "could not connect to the database (check --database-url / DATABASE_URL)";
    let options = db
        .database_url
        .connect_options()?
        .application_name(application_name);
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        PgConnection::connect_with(&options),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer within 10 s"))
    .context(CONTEXT)?
    .context(CONTEXT)?;
    let mut first = first;
    if check_role {
        warn_unless_least_privilege(&mut first, "serving").await;
    }
    first.close().await.context(CONTEXT)?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

/// The `migrate` subcommand: applies every embedded migration that is not applied yet, then,
/// with `--app-role`, grants that role least privilege (`keel_schema::roles::grant_app_role`).
///
/// Run it as the schema's owner; the binaries serve as the application role.
pub async fn migrate(args: &MigrateArgs) -> anyhow::Result<ExitCode> {
    let pool = connect_checked(&args.db, "keel-migrate", 1, false).await?;
    keel_schema::migrate(&pool)
        .await
        .context("could not apply the migrations")?;
    tracing::info!(
        version = keel_schema::latest_version(),
        "schema is up to date"
    );
    let mut conn = pool.acquire().await.context("could not connect")?;
    if let Some(role) = &args.app_role {
        keel_schema::roles::grant_app_role(&mut conn, role)
            .await
            .context("could not grant the application role")?;
        tracing::info!(app_role = %role, "application role granted least privilege");
    } else {
        tracing::info!(
            "no --app-role: no application role was granted; serving as the role that ran \
             migrate lets it bypass the audit trail's append-only triggers"
        );
    }
    drop(conn);
    pool.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Logs a warning when the connected role could bypass the audit trail's append-only triggers
/// (it owns `audit_events` or is a superuser). A check that cannot run is ignored.
pub async fn warn_unless_least_privilege(conn: &mut PgConnection, context: &'static str) {
    use keel_schema::roles::RuntimeRole;
    match keel_schema::roles::runtime_role(conn).await {
        Ok(RuntimeRole::Owner) => tracing::warn!(
            context,
            "the connected role owns audit_events and could disable its append-only triggers; \
             serve as a separate application role (migrate --app-role)"
        ),
        Ok(RuntimeRole::Superuser) => tracing::warn!(
            context,
            "the connected role is a superuser and could bypass the audit trail's triggers; \
             serve as a separate application role (migrate --app-role)"
        ),
        Ok(RuntimeRole::LeastPrivilege | RuntimeRole::Unmigrated) | Err(_) => {}
    }
}

/// An error that is only its message, for tests that need an error value.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TestError(pub(crate) &'static str);

#[cfg(test)]
impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
impl std::error::Error for TestError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrate_applies_the_schema_and_is_idempotent() {
        let db = keel_testkit::empty_database().await;
        let args = MigrateArgs::from(DatabaseArgs {
            database_url: DatabaseUrl::new(db.url()),
        });
        migrate(&args).await.unwrap();
        migrate(&args).await.unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        for table in keel_schema::CONTRACT_TABLES {
            assert!(
                tables.iter().any(|t| t == table),
                "{table} missing after migrate"
            );
        }
    }

    /// FND-1: `migrate --app-role`, run as the owner, leaves the application role unable to
    /// touch the audit trail's triggers and able to do its work; run again, it changes nothing.
    #[tokio::test]
    async fn migrate_as_the_owner_grants_the_app_role_least_privilege() {
        let db = keel_testkit::role_split_database().await;
        let args = MigrateArgs {
            db: DatabaseArgs {
                database_url: DatabaseUrl::new(db.owner_url()),
            },
            app_role: Some(db.app_role().clone()),
        };
        migrate(&args).await.unwrap();
        let err = sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER ALL")
            .execute(db.app())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("must be owner"), "{err}");
        sqlx::query("INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro')")
            .execute(db.app())
            .await
            .unwrap();
        let mut app = db.app().acquire().await.unwrap();
        assert_eq!(
            keel_schema::roles::runtime_role(&mut app).await.unwrap(),
            keel_schema::roles::RuntimeRole::LeastPrivilege
        );
    }

    #[tokio::test]
    async fn a_bad_database_url_fails_without_showing_it() {
        let args = MigrateArgs::from(DatabaseArgs {
            database_url: DatabaseUrl::new("postgres://app:s3cr3t@127.0.0.1:1/none"),
        });
        let err = migrate(&args).await.unwrap_err();
        let shown = format!("{err:#}");
        assert!(shown.contains("could not connect"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    /// OPS-13: a refused connection names its cause (not "pool timed out").
    #[tokio::test]
    async fn a_refused_connection_names_its_cause() {
        let args = DatabaseArgs {
            database_url: DatabaseUrl::new("postgres://app:s3cr3t@127.0.0.1:1/none"),
        };
        let err = connect(&args, "keel-test", 1).await.unwrap_err();
        let shown = error_chain(&err);
        assert!(shown.to_lowercase().contains("refused"), "{shown}");
        assert!(!shown.contains("timed out"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    /// OPS-13: a failed login and a missing database say so once, not twice.
    #[tokio::test]
    async fn login_and_missing_database_errors_are_shown_once() {
        let db = keel_testkit::empty_database().await;
        let mut url = db.url();
        let slash = url.rfind('/').unwrap();
        url.replace_range(slash + 1.., "no_such_database");
        let args = DatabaseArgs {
            database_url: DatabaseUrl::new(url),
        };
        let err = connect(&args, "keel-test", 1).await.unwrap_err();
        let shown = error_chain(&err);
        assert_eq!(
            shown.matches("no_such_database").count(),
            1,
            "the cause is repeated: {shown}"
        );
    }

    #[test]
    fn the_error_chain_skips_causes_their_parent_repeats() {
        #[derive(Debug)]
        struct Outer(TestError);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "error returned from database: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = anyhow::Error::new(Outer(TestError("password authentication failed")))
            .context("could not connect");
        assert_eq!(
            error_chain(&err),
            "could not connect: error returned from database: password authentication failed"
        );
        let plain = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(error_chain(&plain), "top: middle: root");
    }
}
