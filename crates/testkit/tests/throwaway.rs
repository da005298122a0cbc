//! The throwaway server as another local account or a killed test process meets it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// FND-15: the throwaway server trusts no connection. Without the superuser's password, or with
/// a wrong one, a local client is refused; the options and the URL the harness hands out carry
/// the password and connect; no `trust` line is left in its pg_hba.conf.
#[tokio::test]
async fn the_throwaway_server_refuses_every_connection_without_its_password() {
    let server = tokio::task::spawn_blocking(keel_testkit::PgServer::start_throwaway)
        .await
        .unwrap()
        .unwrap();
    let admin = server.admin_options();
    let bare = PgConnectOptions::new_without_pgpass()
        .host(admin.get_host())
        .port(admin.get_port())
        .username("postgres")
        .database("postgres");
    let refused = PgConnection::connect_with(&bare).await.unwrap_err();
    assert!(
        refused.to_string().contains("password"),
        "no password: {refused}"
    );
    let wrong = bare.clone().password("not-the-password");
    let refused = PgConnection::connect_with(&wrong).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("password authentication failed"),
        "a wrong password: {refused}"
    );

    let mut conn = PgConnection::connect(&server.url_for("postgres"))
        .await
        .unwrap();
    let trusting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method NOT IN ('scram-sha-256')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        trusting, 0,
        "every pg_hba.conf line asks for a SCRAM password"
    );
    conn.close().await.unwrap();
    // The password is in the URL, and not in the description printed for people.
    let url = server.url_for("postgres");
    let password = url
        .trim_start_matches("postgres://postgres:")
        .split('@')
        .next()
        .unwrap();
    assert!(password.len() >= 32, "the URL carries the password");
    assert!(!server.describe().contains(password));
}

const CHILD: &str = "KEEL_TESTKIT_START_AND_WAIT";

/// The run directories a process with `pid` made in the temp directory.
fn run_dirs_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("keel-pg-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// FND-14: a test process killed outright (SIGKILL) while `initdb` is still creating its
/// cluster leaves no directory behind: initdb runs under the supervisor, whose watcher stops it
/// and removes the directory when the process's lifeline closes.
///
/// The test runs itself as the process to kill: with `KEEL_TESTKIT_START_AND_WAIT` set, it
/// starts a throwaway server and waits to be killed.
#[test]
fn a_test_process_killed_during_initdb_leaves_no_directory_behind() {
    if std::env::var_os(CHILD).is_some() {
        let _server = keel_testkit::PgServer::start_throwaway().unwrap();
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_test_process_killed_during_initdb_leaves_no_directory_behind",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Kill it as soon as initdb has begun writing the cluster.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dir = loop {
        if let Some(dir) = run_dirs_of(pid)
            .into_iter()
            .find(|d| d.join("data").exists())
        {
            break dir;
        }
        assert!(Instant::now() < deadline, "the child never began initdb");
        std::thread::sleep(Duration::from_millis(5));
    };
    let still_initialising = !dir.join("data/PG_VERSION").exists();
    child.kill().unwrap();
    child.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    while dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !dir.exists(),
        "{} is left behind (killed during initdb: {still_initialising})",
        dir.display()
    );
}

const BOUNCER_CHILD: &str = "KEEL_TESTKIT_START_BOUNCER_AND_WAIT";

/// A throwaway PgBouncer of a test process killed outright (SIGKILL, no `Drop`) stops, and its
/// directory (which holds the server superuser's password) is removed: its watcher's lifeline
/// to the test process closes with it.
///
/// The test runs itself as the process to kill: with `KEEL_TESTKIT_START_BOUNCER_AND_WAIT`
/// set, it starts a server and a PgBouncer in front of it and waits to be killed.
#[test]
fn a_test_process_killed_outright_leaves_no_pooler_running() {
    if std::env::var_os(BOUNCER_CHILD).is_some() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let server = keel_testkit::PgServer::start_throwaway().unwrap();
            let _bouncer =
                keel_testkit::pgbouncer::Bouncer::start(&server.admin_options(), "postgres").await;
            std::thread::sleep(Duration::from_secs(600));
        });
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_test_process_killed_outright_leaves_no_pooler_running",
            "--test-threads=1",
        ])
        .env(BOUNCER_CHILD, "1")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("keel-pgbouncer-{}-", child.id());
    // Wait until the pooler runs and has written its pid.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (dir, pid) = loop {
        let found = std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .find_map(|e| {
                let pid = std::fs::read_to_string(e.path().join("pgbouncer.pid")).ok()?;
                Some((e.path(), pid.trim().parse::<u32>().ok()?))
            });
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the child never started PgBouncer"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let proc = PathBuf::from(format!("/proc/{pid}"));
    assert!(proc.exists(), "PgBouncer {pid} runs");
    child.kill().unwrap();
    child.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    while (proc.exists() || dir.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let running = proc.exists();
    if running {
        // Leave nothing behind whatever the outcome.
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    assert!(!running, "PgBouncer {pid} outlived the killed test process");
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

/// FND-15: the throwaway PgBouncer's password file and configuration (both carry the server
/// superuser's password) are readable by the account it runs as alone: its directory is 0700 and
/// its files 0600, and it still reaches the server through them.
#[tokio::test]
async fn the_throwaway_poolers_password_is_readable_by_its_own_account_alone() {
    use std::os::unix::fs::PermissionsExt as _;
    let server = tokio::task::spawn_blocking(keel_testkit::PgServer::start_throwaway)
        .await
        .unwrap()
        .unwrap();
    let bouncer =
        keel_testkit::pgbouncer::Bouncer::start(&server.admin_options(), "postgres").await;
    let mode = |name: &str| {
        std::fs::metadata(bouncer.dir().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700, "the directory");
    assert_eq!(mode("userlist.txt"), 0o600, "the password file");
    assert_eq!(mode("pgbouncer.ini"), 0o600, "the configuration");
    let mut conn = PgConnection::connect_with(&bouncer.options("session"))
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
}
