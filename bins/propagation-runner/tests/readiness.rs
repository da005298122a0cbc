//! PROP-16: the running `keel-propagation-runner` says when it cannot work. With its database
//! stopped, `/readyz` answers 503 (so a load balancer or rollout stops counting on it), the
//! maintenance gauge goes to 0 and the queue gauges are cleared rather than left at their last
//! value, while `/healthz` stays 200 (the process is alive and reconnects by itself); with the
//! database back, all of them recover without a restart.
//!
//! The test runs its own PostgreSQL cluster, which it stops and starts.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cluster::Cluster;

mod cluster;

/// The runner under test; killed when dropped, so a failed assertion leaves no process behind.
struct Runner(Child);

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One `GET path` against the runner's listener: the status code and the body, or `None` when
/// nothing answered.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The value of the unlabelled gauge `name` in the runner's `/metrics`.
async fn gauge(port: u16, name: &str) -> Option<f64> {
    let (_, text) = get(port, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `probe` every 200 ms for up to 90 s until it returns true; panics naming `what`
/// otherwise.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..450 {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("gave up waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_database_is_down_and_recovers_when_it_is_back() {
    let cluster = Cluster::start_migrated().await;
    let url = cluster.url();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let runner = Runner(
        Command::new(env!("CARGO_BIN_EXE_keel-propagation-runner"))
            .arg("run")
            .env("DATABASE_URL", &url)
            .env("KEEL_WORKER_ID", "readiness")
            .env("KEEL_LISTEN", format!("127.0.0.1:{port}"))
            .env("KEEL_KUBERNETES", "disabled")
            .env("KEEL_POLL_SECONDS", "1")
            .env("KEEL_RECONCILE_SECONDS", "0")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start keel-propagation-runner"),
    );

    eventually("/readyz answers 200 with the database up", || async {
        matches!(get(port, "/readyz").await, Some((200, _)))
    })
    .await;
    eventually(
        "the maintenance gauge is 1 with the database up",
        || async { gauge(port, "instant_propagation_maintenance_up").await == Some(1.0) },
    )
    .await;

    let (_, text) = get(port, "/metrics").await.expect("the runner answers");
    assert!(
        text.contains("instant_propagation_due_rows{kind=\"tier_elevation\"} 0"),
        "{text}"
    );

    cluster.stop();
    eventually("/readyz fails with the database down", || async {
        matches!(get(port, "/readyz").await, Some((503, _)))
    })
    .await;
    let (status, body) = get(port, "/readyz").await.expect("the runner answers");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("not reachable")
            && !body.contains("127.0.0.1")
            && !body.contains("postgres@"),
        "the reason is given and names no address: {body}"
    );
    // Alive, though not ready: the process is not restarted for an outage it rides out.
    let (status, _) = get(port, "/healthz").await.expect("the runner answers");
    assert_eq!(status, 200);
    // The queue gauges cannot be read: they are marked stale rather than left to look current.
    eventually(
        "the maintenance gauge marks the queue gauges stale",
        || async { gauge(port, "instant_propagation_maintenance_up").await == Some(0.0) },
    )
    .await;
    let (_, text) = get(port, "/metrics").await.expect("the runner answers");
    assert!(
        !text.contains("instant_propagation_due_rows{"),
        "a queue gauge kept a value it could not refresh: {text}"
    );
    assert_eq!(
        gauge(port, "keel_ready").await,
        Some(0.0),
        "keel_ready follows /readyz"
    );

    cluster.start();
    eventually(
        "/readyz answers 200 again with the database back",
        || async { matches!(get(port, "/readyz").await, Some((200, _))) },
    )
    .await;
    eventually("the maintenance gauge is 1 again", || async {
        gauge(port, "instant_propagation_maintenance_up").await == Some(1.0)
    })
    .await;
    let (_, text) = get(port, "/metrics").await.expect("the runner answers");
    assert!(
        text.contains("instant_propagation_due_rows{kind=\"tier_elevation\"} 0"),
        "the queue gauges are back: {text}"
    );
    drop(runner);
}
