//! Throwaway Postgres for Keel's tests and demo.
//!
//! [`database`] gives each test its own freshly migrated database, on one server per test
//! process:
//!
//! - when `DATABASE_URL` is set, on that server (its role needs `CREATEDB`);
//! - otherwise on a throwaway server started from the machine's own PostgreSQL binaries
//!   (`$KEEL_PG_BINDIR`, `PATH`, or Debian's `/usr/lib/postgresql/<version>/bin`). As root it runs
//!   as the unprivileged `postgres` account. It stops, and its directory is deleted, when the
//!   test process exits.
//!
//! No Docker, no downloads. Without PostgreSQL binaries the test fails with a message saying how
//! to install them; it never silently skips.
//!
//! Each database is a copy of a template migrated once per server (named after
//! `keel_schema::fingerprint`), so a test pays for a `CREATE DATABASE … TEMPLATE`, not for the
//! migrations. It is dropped when the [`TestDatabase`] is dropped.
//!
//! ```no_run
//! # async fn demo() {
//! let db = keel_testkit::database().await;
//! sqlx::query("INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro')")
//!     .execute(db.pool())
//!     .await
//!     .unwrap();
//! # }
//! ```
//!
//! # From a service that embeds Keel
//!
//! A service may use the testkit as a dev-dependency too. [`database`] holds Keel's migrations
//! only; [`database_with`] holds Keel's and then the service's own (`sqlx::migrate!()`), copied
//! from a template migrated once per server, and [`TestDatabase::team_id`] returns a typed
//! `keel_audit::TeamId`. To test the migrators themselves, start from [`empty_database`] and run
//! both (they keep separate bookkeeping, so either order works):
//!
//! ```no_run
//! # async fn demo() -> Result<(), sqlx::migrate::MigrateError> {
//! # let service_migrator = sqlx::migrate::Migrator::DEFAULT;
//! let db = keel_testkit::empty_database().await;
//! service_migrator.run(db.pool()).await?; // the service's `sqlx::migrate!()`
//! keel_schema::migrate(db.pool()).await?;
//! # Ok(()) }
//! ```
//!
//! That pays for the migrations on every test rather than once per template.

pub mod http;
pub mod pgbouncer;
mod roles;
mod server;

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use keel_audit::TeamId;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

pub use roles::{RoleSplitDatabase, role_split_database, try_role_split_database};
pub use server::{PgServer, RestartableServer, ThrowawayOptions, find_bin_dir, quote_ident};

/// Why the harness could not give a test its database.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found in $KEEL_PG_BINDIR, on PATH \
         or under /usr/lib/postgresql/<version>/bin. Install them with Debian's `postgresql` \
         package (`apt-get install postgresql`), point KEEL_PG_BINDIR at the directory holding \
         them, or set DATABASE_URL to a server whose role may CREATE DATABASE."
    )]
    NoBinaries,
    /// Running as root without an unprivileged account to run the server as.
    #[error(
        "running as root, which PostgreSQL refuses, and there is no unprivileged `postgres` \
         account to run the server as. Install Debian's `postgresql` package (it creates the \
         account), create the account, or set DATABASE_URL."
    )]
    NoUnprivilegedUser,
    /// `DATABASE_URL` is not a valid Postgres URL. The value is not shown.
    #[error("DATABASE_URL is not a valid postgres:// URL (its value is not shown)")]
    BadDatabaseUrl,
    /// `initdb` failed.
    #[error("initdb failed:\n{0}")]
    Initdb(String),
    /// The server exited while starting.
    #[error("the throwaway PostgreSQL server exited while starting; its log ends:\n{0}")]
    ServerExited(String),
    /// `pg_ctl` failed to start or stop a [`RestartableServer`].
    #[error("pg_ctl {0}")]
    PgCtl(String),
    /// The server did not accept connections in time.
    #[error(
        "the throwaway PostgreSQL server did not accept connections in time; its log ends:\n{0}"
    )]
    StartTimeout(String),
    /// A file-system or process error.
    #[error("could not {what}: {source}")]
    Io {
        /// What was being attempted.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A database operation failed.
    #[error("could not {what}: {source}")]
    Database {
        /// What was being attempted.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the migrations failed.
    #[error("could not migrate the template database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// An earlier attempt in this process failed; the same failure applies.
    #[error("{0}")]
    Earlier(String),
}

impl HarnessError {
    fn io(what: &'static str, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }
    fn database(what: &'static str, source: sqlx::Error) -> Self {
        Self::Database { what, source }
    }
}

/// Runs a future to completion on a private runtime in a helper thread, so it works whether or
/// not the caller is inside a Tokio runtime.
fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(future))
            })
            .join()
    })
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    .unwrap_or_else(|e| panic!("could not build a Tokio runtime for the test harness: {e}"))
}

struct Shared {
    server: PgServer,
    template: String,
}

/// The process-wide server with its migrated template, started on first use.
fn shared() -> Result<&'static Shared, HarnessError> {
    static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let server = PgServer::from_env().map_err(|e| e.to_string())?;
            let template = block_on(migrated_template(&server)).map_err(|e| e.to_string())?;
            Ok(Shared { server, template })
        })
        .as_ref()
        .map_err(|message| HarnessError::Earlier(message.clone()))
}

/// Creates (once per server and schema version) a database holding the migrated schema.
async fn migrated_template(server: &PgServer) -> Result<String, HarnessError> {
    let name = format!("keel_tpl_{}", keel_schema::fingerprint());
    template(server, &name, &[]).await
}

/// FNV-1a (64 bit) of Keel's schema fingerprint and each migrator's migrations, in order: names
/// the template holding all of them.
fn fingerprint_with(migrators: &[&Migrator]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(keel_schema::fingerprint().as_bytes());
    for migrator in migrators {
        feed(b"|");
        for migration in migrator.iter() {
            feed(&migration.version.to_le_bytes());
            feed(&migration.checksum);
        }
    }
    format!("{hash:016x}")
}

/// Creates (once per server) the database `name` holding Keel's migrations and then each of
/// `migrators`' in order.
async fn template(
    server: &PgServer,
    name: &str,
    migrators: &[&Migrator],
) -> Result<String, HarnessError> {
    let mut admin = server.connect_admin().await?;
    // Serialize template creation across concurrent test processes sharing a server.
    admin
        .execute("SELECT pg_advisory_lock(hashtext('keel-testkit-template'))")
        .await
        .map_err(|e| HarnessError::database("lock the template", e))?;
    let built = build_template(server, &mut admin, name, migrators).await;
    admin
        .execute("SELECT pg_advisory_unlock(hashtext('keel-testkit-template'))")
        .await
        .map_err(|e| HarnessError::database("unlock the template", e))?;
    built.map(|()| name.to_owned())
}

async fn build_template(
    server: &PgServer,
    admin: &mut sqlx::PgConnection,
    name: &str,
    migrators: &[&Migrator],
) -> Result<(), HarnessError> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut *admin)
            .await
            .map_err(|e| HarnessError::database("look up the template", e))?;
    if exists {
        return Ok(());
    }
    // Build under a temporary name and rename, so a half-migrated template is never used.
    let building = format!("{name}_building_{}", std::process::id());
    server.drop_database(&building).await?;
    server.create_database(&building, None).await?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(server.options_for(&building))
        .await
        .map_err(|e| HarnessError::database("connect to the template", e))?;
    keel_schema::migrate(&pool).await?;
    for migrator in migrators {
        migrator.run(&pool).await?;
    }
    pool.close().await;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(&building),
            quote_ident(name)
        )))
        .await
        .map_err(|e| HarnessError::database("publish the template", e))?;
    Ok(())
}

/// A database of its own for one test, dropped with it.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    pool: PgPool,
    server: &'static PgServer,
}

impl TestDatabase {
    /// A pool (up to 10 connections) on this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The database's name, unique on its server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection options for this database, e.g. for a dedicated connection.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.server.options_for(&self.name)
    }

    /// A `postgres://` URL for this database, for a binary's `--database-url`.
    pub fn url(&self) -> String {
        self.server.url_for(&self.name)
    }

    /// The server this database lives on.
    pub fn server(&self) -> &'static PgServer {
        self.server
    }

    /// How many advisory locks are held in this database (only this one's: other tests'
    /// migrations hold locks in theirs meanwhile), for tests that a lock was released.
    ///
    /// # Panics
    ///
    /// When the count fails: the test fails loudly.
    pub async fn advisory_locks_held(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("keel-testkit: could not count advisory locks: {e}"))
    }

    /// Inserts a team at `tier` and returns its id as a typed [`TeamId`].
    ///
    /// # Panics
    ///
    /// When the insert fails: the test fails loudly.
    pub async fn team_id(&self, tier: &str) -> TeamId {
        TeamId::from_uuid(self.team(tier).await)
    }

    /// Inserts a team at `tier` and returns its id as a raw UUID ([`TestDatabase::team_id`]
    /// returns it typed).
    ///
    /// # Panics
    ///
    /// When the insert fails: the test fails loudly.
    pub async fn team(&self, tier: &str) -> sqlx::types::Uuid {
        sqlx::query_scalar(
            "INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), $1) RETURNING id",
        )
        .bind(tier)
        .fetch_one(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("keel-testkit: could not insert a team: {e}"))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server, std::mem::take(&mut self.name));
        if name.is_empty() {
            // Taken by an owner that drops it itself (a role-split database).
            return;
        }
        // Best effort: a failed drop leaves a database behind on the server, never a failed test.
        finish_soon(async move {
            let _ = server.drop_database(&name).await;
        });
    }
}

/// How long a drop waits for its clean-up before it lets it finish on its own.
const CLEAN_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `clean_up` on a thread of its own and waits for it at most [`CLEAN_UP_WAIT`] (it always
/// takes milliseconds, unless the server makes it wait).
///
/// A test's runtime may still hold a connection half way through signing in (a task the test
/// aborted, dropped only when the runtime next runs). `DROP DATABASE` waits until every backend
/// on the server has answered a barrier, and one still signing in answers only once its client
/// goes away or `authentication_timeout` (a minute) passes. Waiting for the clean-up without end
/// kept that runtime from ever dropping its client: every test dropping a database, and every
/// `DROP DATABASE` a test made, stalled for the minute.
fn finish_soon(clean_up: impl Future<Output = ()> + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        block_on(clean_up);
        let _ = done.send(());
    });
    let _ = finished.recv_timeout(CLEAN_UP_WAIT);
}

fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("keel_test_{}_{n}_{nanos:x}", std::process::id())
}

async fn open(template: Option<&str>) -> Result<TestDatabase, HarnessError> {
    let shared = shared()?;
    open_from(shared, template.map(|_| shared.template.clone())).await
}

async fn open_from(
    shared: &'static Shared,
    template: Option<String>,
) -> Result<TestDatabase, HarnessError> {
    let name = unique_name();
    shared
        .server
        .create_database(&name, template.as_deref())
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect_with(shared.server.options_for(&name))
        .await
        .map_err(|e| HarnessError::database("connect to the test database", e))?;
    Ok(TestDatabase {
        name,
        pool,
        server: &shared.server,
    })
}

/// A fresh database with every migration applied, or why there can't be one.
pub async fn try_database() -> Result<TestDatabase, HarnessError> {
    open(Some("migrated")).await
}

/// A fresh database with every migration applied.
///
/// # Panics
///
/// When no server can be had; the message says how to install PostgreSQL. This is the test
/// failing loudly, never skipping.
pub async fn database() -> TestDatabase {
    try_database()
        .await
        .unwrap_or_else(|e| panic!("keel-testkit: no Postgres for this test: {e}"))
}

/// A fresh database with every migration applied, on `server` (for example one started with
/// [`PgServer::start_throwaway_with`] to test what a server logs). The migrations run directly
/// (no shared template).
///
/// # Panics
///
/// As [`database`].
pub async fn database_on(server: &'static PgServer) -> TestDatabase {
    let name = unique_name();
    let opened = async {
        server.create_database(&name, None).await?;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_with(server.options_for(&name))
            .await
            .map_err(|e| HarnessError::database("connect to the test database", e))?;
        keel_schema::migrate(&pool).await?;
        Ok::<_, HarnessError>(pool)
    };
    let pool = opened
        .await
        .unwrap_or_else(|e| panic!("keel-testkit: no Postgres for this test: {e}"));
    TestDatabase { name, pool, server }
}

/// A fresh database holding Keel's migrations and then each of `migrators`' (a service's own
/// `sqlx::migrate!()`), or why there can't be one. Like [`database`], each is a copy of a
/// template migrated once per server, named after the fingerprint of all the migrations.
pub async fn try_database_with(migrators: &[&Migrator]) -> Result<TestDatabase, HarnessError> {
    let shared = shared()?;
    let name = format!("keel_tpl_{}", fingerprint_with(migrators));
    let template = template(&shared.server, &name, migrators).await?;
    open_from(shared, Some(template)).await
}

/// A fresh database holding Keel's migrations and then each of `migrators'` (a service's own
/// `sqlx::migrate!()`), copied from a template migrated once per server.
///
/// ```no_run
/// # async fn demo() {
/// # static SERVICE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;
/// let db = keel_testkit::database_with(&[&SERVICE_MIGRATOR]).await;
/// let team = db.team_id("pro").await;
/// # let _ = team;
/// # }
/// ```
///
/// # Panics
///
/// As [`database`].
pub async fn database_with(migrators: &[&Migrator]) -> TestDatabase {
    try_database_with(migrators)
        .await
        .unwrap_or_else(|e| panic!("keel-testkit: no Postgres for this test: {e}"))
}

/// The SQLSTATE of a statement the server refused (`"23514"` for a CHECK), or `None` for an
/// error that did not come from the server.
pub fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|code| code.into_owned())
}

/// A fresh, empty database (no migrations), e.g. to test the migrations themselves.
///
/// # Panics
///
/// As [`database`].
pub async fn empty_database() -> TestDatabase {
    open(None)
        .await
        .unwrap_or_else(|e| panic!("keel-testkit: no Postgres for this test: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_test_database_is_its_own_and_dropped_afterwards() {
        let a = database().await;
        let b = database().await;
        assert_ne!(a.name(), b.name());
        sqlx::query("INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro')")
            .execute(a.pool())
            .await
            .unwrap();
        let count = |db: &TestDatabase| {
            let pool = db.pool().clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM teams")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(count(&a).await, 1);
        assert_eq!(
            count(&b).await,
            0,
            "a write in one test's database leaks into another's"
        );

        let (server, name) = (a.server(), a.name().to_owned());
        drop(a);
        let mut admin = server.connect_admin().await.unwrap();
        let still_there: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        assert!(!still_there, "the test database outlived its TestDatabase");
    }

    #[tokio::test]
    async fn test_databases_arrive_migrated_and_empty_ones_do_not() {
        let migrated = database().await;
        let version: Option<i64> = sqlx::query_scalar(keel_schema::APPLIED_VERSION_SQL)
            .fetch_one(migrated.pool())
            .await
            .unwrap();
        assert_eq!(version, Some(keel_schema::latest_version()));

        let empty = empty_database().await;
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(empty.pool())
        .await
        .unwrap();
        assert_eq!(tables, 0);
    }

    #[test]
    fn identifiers_are_quoted_not_interpolated() {
        assert_eq!(quote_ident("keel_test_1"), "\"keel_test_1\"");
        assert_eq!(
            quote_ident("a\"; DROP DATABASE x; --"),
            "\"a\"\"; DROP DATABASE x; --\""
        );
    }
}
