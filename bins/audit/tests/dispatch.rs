//! `keel-audit dispatch` as deployed, against a real webhook receiver: every customer
//! notification reaches the receiver exactly once per event id (it deduplicates by id), with a
//! valid signature, across a receiver that answers 503, a dispatcher killed with SIGKILL
//! mid-run, and a receiver that is down (connection refused) for a while.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, KeyInit as _, Mac as _};
use keel_audit::notify::DISPATCHED_KINDS;
use keel_audit::postgres::insert;
use keel_audit::{Actor, AuditEvent, AuditKind, ResourceId, TeamId};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const KEY: &[u8] = b"the receiver's shared key, 32+ bytes long";
const URL_TOKEN: &str = "hook-token-5b1d0c";

#[derive(Default)]
struct Receiver {
    /// Answer 503 to everything.
    unavailable: bool,
    /// Requests answered 503.
    refused: u64,
    /// Requests whose signature did not verify (answered 401).
    bad_signatures: u64,
    /// Requests accepted but already seen (the receiver deduplicates them).
    duplicates: u64,
    /// A duplicate whose body differs from the first delivery.
    changed_duplicates: u64,
    /// Accepted notifications by event id: the body.
    accepted: BTreeMap<String, serde_json::Value>,
    /// Accept the next new notification, then hold the answer back (the dispatcher is killed
    /// meanwhile: delivered, but the reply is lost).
    hold_next: bool,
    /// The event id accepted and held.
    held: Option<String>,
}

fn signature_holds(headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(timestamp), Some(signature)) = (header("keel-timestamp"), header("keel-signature"))
    else {
        return false;
    };
    // Computed here from the documented scheme, not with the dispatcher's own code.
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    signature == format!("v1={expected}")
}

async fn hook(
    State(state): State<Arc<Mutex<Receiver>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    // Slow enough that a SIGKILL lands between deliveries.
    tokio::time::sleep(Duration::from_millis(15)).await;
    let hold = {
        let mut state = state.lock().unwrap();
        if state.unavailable {
            state.refused += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        if !signature_holds(&headers, &body) {
            state.bad_signatures += 1;
            return StatusCode::UNAUTHORIZED;
        }
        accept(&mut state, &headers, &body)
    };
    if hold {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    StatusCode::NO_CONTENT
}

/// Records an accepted request; whether to hold its answer back.
fn accept(state: &mut Receiver, headers: &HeaderMap, body: &[u8]) -> bool {
    let id = headers
        .get("keel-event-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    match state.accepted.get(&id) {
        Some(first) => {
            let changed = *first != json;
            state.duplicates += 1;
            if changed {
                state.changed_duplicates += 1;
            }
        }
        None => {
            state.accepted.insert(id.clone(), json);
            if std::mem::take(&mut state.hold_next) {
                state.held = Some(id);
                return true;
            }
        }
    }
    false
}

/// Serves the receiver on `addr` until the returned token is cancelled.
async fn serve(addr: SocketAddr, state: Arc<Mutex<Receiver>>) -> (SocketAddr, CancellationToken) {
    serve_router(
        addr,
        axum::Router::new()
            .route("/hook", post(hook))
            .with_state(state),
    )
    .await
}

/// Serves `router` on `addr` until the returned token is cancelled.
async fn serve_router(addr: SocketAddr, router: axum::Router) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let bound = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
            .unwrap();
    });
    (bound, stop)
}

fn dispatcher(
    app_url: &str,
    hook: SocketAddr,
    key_file: &std::path::Path,
    log: &std::path::Path,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_keel-audit"))
        .args([
            "dispatch",
            "--listen",
            "127.0.0.1:0",
            "--batch",
            "4",
            "--poll-ms",
            "20",
            "--base-backoff-ms",
            "20",
            "--max-backoff-secs",
            "1",
            "--max-attempts",
            "10000",
            "--request-timeout-secs",
            "2",
        ])
        .env("DATABASE_URL", app_url)
        .env(
            "KEEL_AUDIT_WEBHOOK_URL",
            format!("http://{hook}/hook?token={URL_TOKEN}"),
        )
        .env("KEEL_AUDIT_NOTIFY_KEY_FILE", key_file)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits (up to a minute) until `done` holds; the message names what never happened.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

async fn customer_events(app: &mut sqlx::PgConnection, from: u32, count: u32) -> Vec<i64> {
    let mut ids = Vec::new();
    for n in from..from + count {
        let kind = DISPATCHED_KINDS[n as usize % DISPATCHED_KINDS.len()];
        let event = AuditEvent::new(
            kind,
            Actor::system(),
            time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(n.into()),
        )
        .team(TeamId::new_random())
        .resource(ResourceId::new_random())
        .attr("n", n.to_string())
        .unwrap();
        ids.push(insert(&mut *app, &event).await.unwrap().0);
        // Operator kinds in between are not notifications.
        let other = AuditEvent::new(
            AuditKind::ProvisionTeardownFailed,
            Actor::system(),
            time::OffsetDateTime::UNIX_EPOCH,
        );
        insert(&mut *app, &other).await.unwrap();
    }
    ids
}

/// A scratch directory of this process (`name-<pid>`) holding the signing key file: both paths.
fn scratch_with_key(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, [KEY, b"\n"].concat()).unwrap();
    (dir, key_file)
}

fn kill_9(child: &mut Child) {
    // Child::kill sends SIGKILL on Unix: no shutdown path runs.
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_notification_reaches_the_receiver_once_per_event_id_across_sigkill_and_outage() {
    let db = keel_testkit::role_split_database().await;
    let (dir, key_file) = scratch_with_key("keel-dispatch");
    let (log1, log2) = (dir.join("dispatch-1.log"), dir.join("dispatch-2.log"));
    let mut app = db.app().acquire().await.unwrap();
    let mut expected: BTreeSet<i64> = customer_events(&mut app, 0, 24).await.into_iter().collect();

    // The receiver answers 503 at first.
    let state = Arc::new(Mutex::new(Receiver {
        unavailable: true,
        ..Receiver::default()
    }));
    let (addr, _first_server) = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&state)).await;
    let mut first = dispatcher(&db.app_url(), addr, &key_file, &log1);
    wait_until("the dispatcher meets the 503s", || {
        state.lock().unwrap().refused >= 6
    })
    .await;
    state.lock().unwrap().unavailable = false;
    wait_until("some notifications get through", || {
        state.lock().unwrap().accepted.len() >= 6
    })
    .await;
    // Killed while the receiver holds an accepted notification's answer: delivered, never
    // recorded, so it is delivered again under the same event id.
    state.lock().unwrap().hold_next = true;
    wait_until("the receiver holds an answer", || {
        state.lock().unwrap().held.is_some()
    })
    .await;
    kill_9(&mut first);
    let accepted_at_kill = state.lock().unwrap().accepted.len();
    assert!(
        accepted_at_kill < expected.len(),
        "the SIGKILL must land mid-run ({accepted_at_kill} of {} delivered)",
        expected.len()
    );

    // More notifications while no dispatcher runs; then the receiver goes down entirely.
    expected.extend(customer_events(&mut app, 24, 12).await);
    _first_server.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = dispatcher(&db.app_url(), addr, &key_file, &log2);
    let owner = db.owner().clone();
    let mut refused_connections = 0i64;
    for _ in 0..3000 {
        refused_connections = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events \
             WHERE kind = 'notification.retrying' AND attributes->>'outcome' = 'connect'",
        )
        .fetch_one(&owner)
        .await
        .unwrap();
        if refused_connections >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused_connections >= 3,
        "the dispatcher never met the outage"
    );
    let (_second_server_addr, second_server) = serve(addr, Arc::clone(&state)).await;
    let total = expected.len();
    wait_until("every notification is delivered", || {
        state.lock().unwrap().accepted.len() >= total
    })
    .await;
    let mut delivered_rows = 0i64;
    for _ in 0..3000 {
        delivered_rows = sqlx::query_scalar(
            "SELECT count(*) FROM notification_deliveries WHERE state = 'delivered'",
        )
        .fetch_one(&owner)
        .await
        .unwrap();
        if delivered_rows == total as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill_9(&mut second);
    second_server.cancel();
    assert_eq!(delivered_rows, total as i64);

    let (bad_signatures, duplicates, changed_duplicates, accepted) = {
        let receiver = state.lock().unwrap();
        (
            receiver.bad_signatures,
            receiver.duplicates,
            receiver.changed_duplicates,
            receiver.accepted.clone(),
        )
    };
    assert_eq!(bad_signatures, 0, "every request is signed with the key");
    assert!(
        duplicates >= 1,
        "the notification whose reply was lost is delivered again"
    );
    assert_eq!(
        changed_duplicates, 0,
        "a redelivery carries the same notification"
    );
    // Exactly once per event id: one accepted event id per customer audit row, no other.
    let carried: BTreeSet<i64> = accepted
        .values()
        .map(|body| body["audit_id"].as_i64().unwrap())
        .collect();
    assert_eq!(accepted.len(), total);
    assert_eq!(carried, expected);
    for (id, body) in &accepted {
        assert_eq!(body["id"], id.as_str());
        let kind: AuditKind = body["kind"].as_str().unwrap().parse().unwrap();
        assert!(DISPATCHED_KINDS.contains(&kind));
    }
    let stored: BTreeSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM notification_deliveries")
            .fetch_all(&owner)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    assert_eq!(stored, accepted.keys().cloned().collect());
    // Each delivery audited once, naming its event id.
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT attributes->>'event_id' FROM audit_events WHERE kind = 'notification.delivered'",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(audited.len(), total);
    assert_eq!(audited.into_iter().collect::<BTreeSet<_>>(), stored);

    // Neither the key nor the URL's token reached a row or a log line.
    let leaked: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM audit_events WHERE attributes::text LIKE '%' || $1 || '%' \
                 OR attributes::text LIKE '%' || $2 || '%') \
              + (SELECT count(*) FROM notification_deliveries WHERE payload::text LIKE '%' || $1 || '%' \
                 OR payload::text LIKE '%' || $2 || '%' OR coalesce(last_outcome, '') LIKE '%' || $1 || '%')",
    )
    .bind(URL_TOKEN)
    .bind(std::str::from_utf8(&KEY[..16]).unwrap())
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
    for log in [&log1, &log2] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            text.contains("dispatching customer notifications"),
            "{text}"
        );
        assert!(
            !text.contains(URL_TOKEN),
            "the webhook URL leaked into {}",
            log.display()
        );
        assert!(!text.contains(std::str::from_utf8(&KEY[..16]).unwrap()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A receiver that answers every request 429 with `Retry-After: 3600`, counting them.
async fn throttle(
    State(seen): State<Arc<Mutex<u64>>>,
) -> (StatusCode, [(&'static str, &'static str); 1]) {
    *seen.lock().unwrap() += 1;
    (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3600")])
}

/// A receiver that asks to be left alone (429 with `Retry-After`) is: the dispatcher posts
/// nothing more, not the rest of its batch and not the same notification after its own short
/// backoff, until the wait is over (here the dispatcher's longest backoff, one second, caps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_answers_429_with_retry_after_gets_no_request_before_the_wait() {
    let db = keel_testkit::role_split_database().await;
    let (dir, key_file) = scratch_with_key("keel-dispatch-429");
    let log = dir.join("dispatch.log");
    let mut app = db.app().acquire().await.unwrap();
    customer_events(&mut app, 0, 3).await;

    let seen = Arc::new(Mutex::new(0u64));
    let (addr, stop) = serve_router(
        "127.0.0.1:0".parse().unwrap(),
        axum::Router::new()
            .route("/hook", post(throttle))
            .with_state(Arc::clone(&seen)),
    )
    .await;
    let mut child = dispatcher(&db.app_url(), addr, &key_file, &log);
    wait_until("the first request", || *seen.lock().unwrap() >= 1).await;
    // Well inside the one-second wait; without it the batch's other two notifications and
    // the first one's 20 ms backoff would have made more requests by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        *seen.lock().unwrap(),
        1,
        "a request was made during the wait"
    );
    wait_until("a request after the wait", || *seen.lock().unwrap() >= 2).await;
    kill_9(&mut child);
    stop.cancel();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("Retry-After"), "{logged}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `keel-audit dispatch --once` against `database_url` (nothing is due, so nothing is
/// posted): its exit status and what it wrote to stderr.
fn dispatch_once(database_url: &str, key_file: &std::path::Path) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_keel-audit"))
        .args(["dispatch", "--once", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", database_url)
        .env("KEEL_AUDIT_WEBHOOK_URL", "http://127.0.0.1:9/hook")
        .env("KEEL_AUDIT_NOTIFY_KEY_FILE", key_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Behind a transaction-pooling PgBouncer the dispatcher's session lock would keep no second
/// dispatcher out (both would post every notification) and would stay held on a pooled backend:
/// the dispatcher refuses at start, naming the fix, and leaves no lock held. Through a
/// session-mode pool it dispatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_transaction_pooling_the_dispatcher_refuses_and_session_pooling_dispatches() {
    let db = keel_testkit::database().await;
    let bouncer = keel_testkit::pgbouncer::Bouncer::start(&db.connect_options(), db.name()).await;
    let (dir, key_file) = scratch_with_key("keel-dispatch-pooler");

    let (code, stderr) = dispatch_once(&bouncer.url("tx"), &key_file);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("pool_mode = transaction"), "{stderr}");
    assert!(
        !stderr.contains(bouncer.password()),
        "the password reached the output"
    );
    let held = db.advisory_locks_held().await;
    assert_eq!(
        held, 0,
        "the refused dispatcher left its lock held behind the pooler"
    );

    let (code, stderr) = dispatch_once(&bouncer.url("session"), &key_file);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
