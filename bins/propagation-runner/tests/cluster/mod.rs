//! A throwaway PostgreSQL cluster a test may stop and start without disturbing other tests,
//! run with `pg_ctl` by keel-testkit (as `postgres` when the tests run as root) and
//! removed when dropped.

use std::process::Command;
use std::time::Duration;

use keel_testkit::RestartableServer;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// A throwaway cluster the test may stop and start, holding the runner's `keel` database.
pub struct Cluster(RestartableServer);

impl Cluster {
    /// Stops the server (fast shutdown: sessions are disconnected) and waits until it is down.
    pub fn stop(&self) {
        self.0.stop().unwrap();
    }

    /// Starts the stopped server again and waits until it accepts connections.
    pub fn start(&self) {
        self.0.start_again().unwrap();
    }

    pub fn url(&self) -> String {
        self.0.url_for("keel")
    }

    /// A new cluster whose `keel` database the runner binary has migrated, as an operator would.
    pub async fn start_migrated() -> Self {
        let cluster = Self(RestartableServer::start().unwrap());
        let admin = connect(&cluster.0.url_for("postgres")).await;
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
