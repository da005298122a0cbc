//! The console in a real browser: headless Chromium driven over WebDriver (chromedriver)
//! against a live console and a real Postgres. Signs in, requeues a dead letter and finds its
//! audit row, reviews the orphan list, pages through the audit trail, and sees a form without
//! its CSRF token and a form without a session refused. A screenshot of each page is saved
//! under `$CARGO_TARGET_DIR/console-screenshots/` (default `target/console-screenshots/`).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`KEEL_CHROMIUM` and `KEEL_CHROMEDRIVER`
//! override their paths); `bash .ci/run browser` installs them and runs this target.

#[allow(dead_code)]
#[path = "../it/app.rs"]
mod app;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

/// chromedriver on a free local port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

async fn driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let binary = std::env::var("KEEL_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_owned());
    let child = Command::new(&binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("could not start {binary} (install Debian's chromium-driver, or run `bash .ci/run browser`): {e}")
        });
    let profile = std::env::temp_dir().join(format!("keel-console-chromium-{port}"));
    let driver = Driver {
        child,
        port,
        profile,
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return driver;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(driver);
    panic!("chromedriver did not listen on port {port}");
}

async fn browser(driver: &Driver) -> Client {
    let chromium =
        std::env::var("KEEL_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000",
                format!("--user-data-dir={}", driver.profile.display()),
            ]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
}

async fn source(client: &Client) -> String {
    client.source().await.unwrap()
}

async fn path(client: &Client) -> String {
    client.current_url().await.unwrap().path().to_owned()
}

/// A click on a submit button or a link only starts a navigation, which WebDriver need not have
/// begun when the click returns: poll, boundedly (10 s), until the page at the current URL
/// satisfies `done`, and return that URL (path and query) and the page source. On timeout the
/// last page is returned, so the caller's assertion shows what the browser had.
async fn settled(client: &Client, done: impl Fn(&str, &str) -> bool) -> (String, String) {
    let mut last = (String::new(), String::new());
    for _ in 0..200 {
        let url = client.current_url().await.unwrap();
        let at = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let page = source(client).await;
        if done(&at, &page) {
            return (at, page);
        }
        last = (at, page);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_works_the_console_in_a_real_browser() {
    let app = app::spawn_with(25).await;
    let base = format!("http://{}", app.addr);
    // Data for every page: two dead letters, an orphan candidate, a rater run, 60 audit rows.
    let (resource, token, first) = app.dead_letter("dial tcp: connection refused").await;
    let (_, _, second) = app.dead_letter("pod not found").await;
    let digest = "fedcba9876543210".repeat(3);
    sqlx::query(
        "WITH recorded AS (INSERT INTO orphan_sweep_recorded (inventory, last_period) \
                           VALUES ('postgres', 10) ON CONFLICT DO NOTHING) \
         INSERT INTO orphan_sighting_runs (inventory, key, first_seen, reclaimable_since, reclaimable_period) \
         VALUES ('postgres', $1, now() - interval '3 days', now() - interval '2 days', 7)",
    )
    .bind(format!("database:{digest}"))
    .execute(app.db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO rater_runs (started_at, finished_at, window_start, window_end, explicit_window, inserted, updated, deleted, anomalies, exit_code) \
         VALUES (now() - interval '1 hour', now() - interval '59 minutes', now() - interval '3 hours', now() - interval '2 hours', false, 120, 3, 0, 0, 0)",
    )
    .execute(app.db.pool())
    .await
    .unwrap();
    let team = app.db.team_id("pro").await;
    for i in 0..60 {
        let event = keel_audit::AuditEvent::new(
            keel_audit::AuditKind::TeamTierChanged,
            keel_audit::Actor::parse("operator:seed").unwrap(),
            time::OffsetDateTime::now_utc(),
        )
        .team(team)
        .attr("n", i.to_string())
        .unwrap();
        let mut conn = app.db.pool().acquire().await.unwrap();
        keel_audit::postgres::insert(&mut conn, &event)
            .await
            .unwrap();
    }

    let driver = driver().await;
    let client = browser(&driver).await;

    // Signed out: any page leads to the sign-in form.
    client.goto(&format!("{base}/dead-letters")).await.unwrap();
    assert_eq!(path(&client).await, "/sign-in");
    shot(&client, "sign-in").await;
    client
        .find(Locator::Css("input[name=key]"))
        .await
        .unwrap()
        .send_keys(&app.key)
        .await
        .unwrap();
    client
        .find(Locator::Css("form[action='/sign-in'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let (at, overview) = settled(&client, |at, page| {
        at == "/" && page.contains("Propagation queue")
    })
    .await;
    assert_eq!(at, "/", "{overview}");
    assert!(overview.contains("Propagation queue"), "{overview}");
    assert!(
        overview.contains("resource_not_reachable"),
        "dead letters by bucket"
    );
    shot(&client, "overview").await;

    // Dead letters: requeue one, land on its audit row.
    client.goto(&format!("{base}/dead-letters")).await.unwrap();
    shot(&client, "dead-letters").await;
    client
        .goto(&format!("{base}/dead-letters/{first}"))
        .await
        .unwrap();
    shot(&client, "dead-letter").await;
    client
        .find(Locator::Css(
            "form[action='/dead-letters/requeue'] input[name=reason]",
        ))
        .await
        .unwrap()
        .send_keys("quota service restored")
        .await
        .unwrap();
    client
        .find(Locator::Css("form[action='/dead-letters/requeue'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let (at, _) = settled(&client, |at, _| at.starts_with("/audit")).await;
    assert!(at.starts_with("/audit"), "{at}");
    let wanted = format!("propagation_id={first}");
    let mut trail = source(&client).await;
    for _ in 0..100 {
        if trail.contains(&wanted) {
            break;
        }
        // The trail shows a row once every older transaction on the server has ended.
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.refresh().await.unwrap();
        trail = source(&client).await;
    }
    assert!(
        trail.contains("propagation.requeued") && trail.contains(&wanted),
        "{trail}"
    );
    assert!(trail.contains(&app.actor()), "the operator is the actor");
    assert!(
        trail.contains("quota service restored"),
        "the operator's reason is recorded"
    );
    shot(&client, "requeued-audit-row").await;
    assert_eq!(app.status_of(first).await, "pending");

    // Orphan review.
    client.goto(&format!("{base}/orphans")).await.unwrap();
    let review = source(&client).await;
    assert!(review.contains(&digest), "{review}");
    assert!(review.contains("yes, when armed"), "{review}");
    shot(&client, "orphans").await;

    // Rater runs and a resource's timeline (token masked).
    client.goto(&format!("{base}/rater-runs")).await.unwrap();
    assert!(source(&client).await.contains("rows of this run"));
    shot(&client, "rater-runs").await;
    client
        .goto(&format!("{base}/resources/{resource}"))
        .await
        .unwrap();
    let timeline = source(&client).await;
    assert!(!timeline.contains(&token), "the token is masked");
    assert!(timeline.contains("propagation.requeued"));
    shot(&client, "resource").await;

    // The audit trail, page by page through the team's 60 rows (25 a page).
    client
        .goto(&format!("{base}/audit?team={team}"))
        .await
        .unwrap();
    shot(&client, "audit").await;
    let mut pages = 1;
    while let Ok(next) = client.find(Locator::Id("next")).await {
        let before = client.current_url().await.unwrap().to_string();
        next.click().await.unwrap();
        let (at, _) = settled(&client, |at, page| {
            !before.ends_with(at) && page.contains("</main>")
        })
        .await;
        assert!(!before.ends_with(&at), "the next page did not load: {at}");
        pages += 1;
        assert!(pages <= 5, "the trail does not end");
    }
    let last = source(&client).await;
    assert!(last.contains("<code>n=59</code>"), "{last}");
    assert!(last.contains("End of the trail"));
    assert_eq!(pages, 3);
    shot(&client, "audit-last-page").await;

    // A form whose CSRF token was removed is refused, and changes nothing.
    client.goto(&format!("{base}/dead-letters")).await.unwrap();
    client
        .execute(
            "const f = document.getElementById('requeue-filtered'); \
             f.querySelector('input[name=reason]').value = 'retry all'; \
             f.querySelector('input[name=csrf]').remove(); f.submit();",
            vec![],
        )
        .await
        .unwrap();
    // `submit()` navigates without waiting for the page: wait for it, boundedly.
    let mut refused = source(&client).await;
    for _ in 0..100 {
        if refused.contains("Refused") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        refused = source(&client).await;
    }
    assert!(refused.contains("CSRF token is missing"), "{refused}");
    shot(&client, "refused-without-csrf").await;
    assert_eq!(app.status_of(second).await, "dead_lettered");

    // A form submitted after the session cookie is gone is refused too.
    client.goto(&format!("{base}/dead-letters")).await.unwrap();
    client.delete_all_cookies().await.unwrap();
    client
        .find(Locator::Css("#requeue-filtered input[name=reason]"))
        .await
        .unwrap()
        .send_keys("retry all")
        .await
        .unwrap();
    client
        .find(Locator::Css("#requeue-filtered button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let (_, refused) = settled(&client, |_, page| page.contains("No live session")).await;
    assert!(refused.contains("No live session"), "{refused}");
    shot(&client, "refused-without-session").await;
    assert_eq!(app.status_of(second).await, "dead_lettered");
    client.goto(&format!("{base}/")).await.unwrap();
    let (at, _) = settled(&client, |at, _| at == "/sign-in").await;
    assert_eq!(at, "/sign-in");

    client.close().await.unwrap();
}
