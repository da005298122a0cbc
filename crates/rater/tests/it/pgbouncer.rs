//! The rater behind a real PgBouncer (Debian's `pgbouncer` package): in transaction pooling it
//! refuses at start, naming the fix, and leaves nothing held; in session pooling it works.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use keel_rater::postgres::{RaterError, RunRequest, run};
use keel_rater::{BillingEvent, RaterExit, resolve_window};
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const H0: OffsetDateTime = datetime!(2026-11-20 00:00 UTC);
const NOW: OffsetDateTime = datetime!(2026-11-21 12:30 UTC);
const INSTALL: &str = "PgBouncer is needed for this test and was not found (looked for \
    `pgbouncer` in /usr/sbin and on PATH). Install Debian's package: \
    `apt-get update && apt-get install -y pgbouncer`";

fn pgbouncer_binary() -> PathBuf {
    let mut candidates = vec![PathBuf::from("/usr/sbin/pgbouncer")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("pgbouncer")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{INSTALL}"))
}

/// The uid and gid of the `postgres` account, to run PgBouncer as when we are root.
fn postgres_account() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A throwaway PgBouncer, killed (by its own pid) and its directory removed when dropped.
///
/// It authenticates its clients (SCRAM, against a userlist holding the server's superuser and
/// its password) and logs in to the server with that password: nothing on the machine reaches
/// the database through it without the password (FND-15).
struct Bouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
    password: String,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bouncer {
    /// Starts PgBouncer in front of `server` with two aliases for `database`: `tx` in
    /// transaction pooling and `session` in session pooling.
    async fn start(server: &PgConnectOptions, database: &str) -> Bouncer {
        let binary = pgbouncer_binary();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir =
            std::env::temp_dir().join(format!("keel-pgbouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o777);
        let url = server.to_url_lossy();
        let password = url
            .password()
            .expect("the throwaway server's options carry its password")
            .to_owned();
        let userlist = dir.join("userlist.txt");
        std::fs::write(&userlist, format!("\"postgres\" \"{password}\"\n")).unwrap();
        set_mode(&userlist, 0o644);
        let backend = format!(
            "host=127.0.0.1 port={} dbname={database} user=postgres password={password}",
            server.get_port()
        );
        let config = format!(
            "[databases]\n\
             tx = {backend} pool_mode=transaction\n\
             session = {backend} pool_mode=session\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {userlist}\n\
             default_pool_size = 4\n\
             ignore_startup_parameters = extra_float_digits,search_path\n\
             logfile = {log}\n\
             pidfile = {pid}\n",
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
            userlist = userlist.display(),
        );
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(&ini, config).unwrap();
        set_mode(&ini, 0o644);
        let mut command = Command::new(binary);
        command
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            let (uid, gid) = postgres_account()
                .expect("running as root without a `postgres` account to run PgBouncer as");
            command.uid(uid).gid(gid);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL} ({e})"));
        let bouncer = Bouncer {
            child,
            dir,
            port,
            password,
        };
        bouncer.wait_until_ready().await;
        bouncer
    }

    fn options(&self, alias: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .password(&self.password)
            .database(alias)
    }

    async fn wait_until_ready(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default();
        panic!("PgBouncer did not start; its log:\n{log}");
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn request() -> RunRequest {
    RunRequest {
        window: resolve_window(Some(H0), Some(H0 + Duration::hours(3)), NOW, false)
            .unwrap()
            .0,
        explicit: false,
        dry_run: false,
        now: NOW,
    }
}

/// RATER-H5b: behind PgBouncer in transaction mode the lock landed on a pooled backend, the
/// unlock on another, and every run failed on prepared statements. Now the rater refuses at
/// start with the fix, leaves no lock behind, and works in session pooling and directly.
#[tokio::test]
async fn behind_pgbouncer_transaction_pooling_the_rater_refuses_and_session_pooling_works() {
    let db = keel_testkit::database().await;
    sqlx::query(
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('requests', '2020-01-01Z', 0.001)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let event = BillingEvent::new(
        "e1",
        "acme",
        "requests",
        Decimal::TEN,
        H0 + Duration::minutes(5),
        NOW,
    )
    .unwrap();
    keel_rater::postgres::record_event(&mut db.pool().acquire().await.unwrap(), &event)
        .await
        .unwrap();
    let bouncer = Bouncer::start(&db.connect_options(), db.name()).await;
    let without_password = PgConnectOptions::new_without_pgpass()
        .host("127.0.0.1")
        .port(bouncer.port)
        .username("postgres")
        .database("session");
    assert!(
        sqlx::PgConnection::connect_with(&without_password)
            .await
            .is_err(),
        "PgBouncer lets a client in without the password"
    );

    let tx_options = bouncer.options("tx");
    let tx_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(tx_options.clone());
    let refused = run(&tx_pool, &tx_options, request()).await;
    let err = refused.expect_err("a transaction-pooled rater must refuse");
    assert!(matches!(err, RaterError::PoolerDetected), "{err}");
    let message = err.to_string();
    assert!(message.contains("pool_mode = transaction"), "{message}");
    assert!(message.contains("KEEL_RATER_DIRECT_URL"), "{message}");
    tx_pool.close().await;

    // Only this test's database: other tests' migrations hold locks in theirs meanwhile.
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        held, 0,
        "the refused run left its lock held behind the pooler"
    );
    let rated: i64 = sqlx::query_scalar("SELECT count(*) FROM rated_usage")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rated, 0);

    let session_options = bouncer.options("session");
    let session_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(session_options.clone());
    let outcome = run(&session_pool, &session_options, request())
        .await
        .unwrap();
    assert_eq!(outcome.exit, RaterExit::Clean);
    assert_eq!(outcome.report.unwrap().inserted.count, 1);
    session_pool.close().await;
}
