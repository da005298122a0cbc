//! A throwaway PostgreSQL cluster a test may stop and start without disturbing other tests,
//! run with `pg_ctl` from the machine's binaries (as `postgres` when the tests run as root) and
//! removed when dropped.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// A throwaway cluster the test may stop and start.
pub struct Cluster {
    dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let bin = keel_testkit::find_bin_dir().expect("PostgreSQL binaries");
        let program = bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    pub fn start_new() -> Self {
        let uid = Command::new("id").arg("-u").output().expect("id -u");
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("keel-chaos-{nanos}"));
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            let chown = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(chown.success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            dir,
            port,
            as_postgres,
        };
        let initdb = cluster
            .command("initdb")
            .arg("-D")
            .arg(cluster.dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            initdb.status.success(),
            "{}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        cluster.pg_ctl(&["start", "-w"]);
        cluster
    }

    fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-p {} -k {} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=250",
            self.port,
            self.dir.display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-l"])
            .arg(self.dir.join("server.log"))
            .args(["-o", &options])
            .args(args)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (fast shutdown: sessions are disconnected) and waits until it is down.
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w"]);
    }

    /// Starts the stopped server again and waits until it accepts connections.
    pub fn start(&self) {
        self.pg_ctl(&["start", "-w"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/keel", self.port)
    }

    /// A new cluster whose `keel` database the runner binary has migrated, as an operator would.
    pub async fn start_migrated() -> Self {
        let cluster = Self::start_new();
        let admin = connect(&format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            cluster.port
        ))
        .await;
        sqlx::query("CREATE DATABASE keel")
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let migrate = Command::new(env!("CARGO_BIN_EXE_keel-propagation-runner"))
            .arg("migrate")
            .env("DATABASE_URL", cluster.url())
            .output()
            .unwrap();
        assert!(
            migrate.status.success(),
            "{}",
            String::from_utf8_lossy(&migrate.stderr)
        );
        cluster
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A pool on `url`, retrying for up to 10 s while the server comes up.
pub async fn connect(url: &str) -> PgPool {
    for _ in 0..100 {
        if let Ok(pool) = PgPoolOptions::new().max_connections(4).connect(url).await {
            return pool;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not connect to {url}");
}
