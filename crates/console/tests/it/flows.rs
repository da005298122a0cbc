//! Sign-in, refusals, pages and actions.

use keel_audit::Actor;
use keel_provision::TokenDigest;

use crate::app::{self, App};

async fn sessions(app: &App) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM provision_api.console_sessions")
        .fetch_one(app.db.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_operator_key_signs_in_with_a_strict_http_only_cookie_and_an_audit_row() {
    let mut app = app::spawn().await;
    let form = app.get("/sign-in").await;
    assert_eq!(form.status, 200);
    let csrf = form.csrf();
    let key = app.key.clone();
    let reply = app
        .post("/sign-in", &[("key", &key), ("csrf", &csrf)])
        .await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(reply.header("location"), Some("/"));
    let session = reply
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("keel_console_session="))
        .expect("a session cookie")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session.contains(attribute), "{session}");
    }
    // Not in the cookie's stored form: only its digest is kept.
    let value = session
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provision_api.console_sessions WHERE encode(id_sha256, 'escape') LIKE '%' || $1 || '%'",
    )
    .bind(&value)
    .fetch_one(app.db.pool())
    .await
    .unwrap();
    assert_eq!(stored, 0);
    let signed_in = app.audit_rows("console.signed_in").await;
    assert_eq!(signed_in.len(), 1);
    assert_eq!(signed_in[0].0, app.actor());
    assert_eq!(signed_in[0].1["key_id"], app.key_id.as_str());
    assert!(!signed_in[0].1.to_string().contains(&app.key));
    let overview = app.get("/").await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview.body.contains("Propagation queue"));
}

#[tokio::test]
async fn the_sign_in_is_refused_without_its_csrf_token_or_with_a_wrong_or_team_key() {
    let mut app = app::spawn().await;
    let key = app.key.clone();
    // No sign-in cookie at all (a cross-site form post).
    let reply = app
        .post("/sign-in", &[("key", &key), ("csrf", "forged")])
        .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    // A cookie, but a field that does not match it.
    let _ = app.get("/sign-in").await;
    let reply = app
        .post("/sign-in", &[("key", &key), ("csrf", "forged")])
        .await;
    assert_eq!(reply.status, 403);
    let reply = app.post("/sign-in", &[("key", &key)]).await;
    assert_eq!(reply.status, 403);
    // A wrong key.
    let csrf = app.get("/sign-in").await.csrf();
    let wrong = format!("{}x", &key[..key.len() - 1]);
    let reply = app
        .post("/sign-in", &[("key", &wrong), ("csrf", &csrf)])
        .await;
    assert_eq!(reply.status, 401);
    // A team's key.
    let team = app.db.team_id("pro").await;
    let (_, team_key) = keel_provision_http::keys::create(
        app.db.pool(),
        keel_provision_http::keys::Scope::Team(team),
        "",
        Actor::parse("operator:setup").unwrap(),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    let csrf = app.get("/sign-in").await.csrf();
    let reply = app
        .post("/sign-in", &[("key", team_key.expose()), ("csrf", &csrf)])
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(sessions(&app).await, 0);
    assert!(app.audit_rows("console.signed_in").await.is_empty());
}

/// A second session cookie beside the real one (a sibling site can set one for the parent
/// domain) names no session: pages send to the sign-in and actions are refused, whichever of the
/// two comes first. A sign-in whose token cookie is doubled that way is refused too.
#[tokio::test]
async fn a_cookie_sent_twice_with_different_values_names_no_session() {
    let mut app = app::spawn().await;
    let (_, _, id) = app.dead_letter("connection refused").await;
    let csrf = app.sign_in().await;
    assert_eq!(app.get("/").await.status, 200);
    let tossed = "Cookie: keel_console_session=tossed\r\n";
    let page = app.send_with("GET", "/", None, tossed).await;
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(page.header("location"), Some("/sign-in"));
    let id_text = id.to_string();
    let form = [
        ("id", id_text.as_str()),
        ("reason", "retry"),
        ("csrf", csrf.as_str()),
    ];
    let action = app
        .send_with("POST", "/dead-letters/requeue", Some(&form[..]), tossed)
        .await;
    assert_eq!(action.status, 401, "{}", action.body);
    assert_eq!(app.status_of(id).await, "dead_lettered");
    assert!(app.audit_rows("propagation.requeued").await.is_empty());
    // The real session alone still works.
    assert_eq!(app.get("/").await.status, 200);

    let sign_in_form = app.get("/sign-in").await.csrf();
    let key = app.key.clone();
    let doubled = app
        .send_with(
            "POST",
            "/sign-in",
            Some(&[("key", key.as_str()), ("csrf", sign_in_form.as_str())][..]),
            "Cookie: keel_console_sign_in=chosen-elsewhere\r\n",
        )
        .await;
    assert_eq!(doubled.status, 403, "{}", doubled.body);
}

#[tokio::test]
async fn pages_without_a_session_send_to_the_sign_in_and_actions_are_refused_changing_nothing() {
    let mut app = app::spawn().await;
    let (_, _, id) = app.dead_letter("connection refused").await;
    for path in [
        "/",
        "/dead-letters",
        "/orphans",
        "/rater-runs",
        "/audit",
        "/dead-letters/1",
    ] {
        let reply = app.get(path).await;
        assert_eq!(reply.status, 303, "{path}");
        assert_eq!(reply.header("location"), Some("/sign-in"), "{path}");
    }
    let id_text = id.to_string();
    let reply = app
        .post(
            "/dead-letters/requeue",
            &[("id", &id_text), ("reason", "retry"), ("csrf", "x")],
        )
        .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let digest = "ab".repeat(24);
    for path in ["/orphans/protect", "/orphans/unprotect", "/sign-out"] {
        let reply = app
            .post(
                path,
                &[("digest", &digest), ("reason", "hold"), ("csrf", "x")],
            )
            .await;
        assert_eq!(reply.status, 401, "{path}");
    }
    assert_eq!(app.status_of(id).await, "dead_lettered");
    assert!(app.audit_rows("propagation.requeued").await.is_empty());
    assert!(
        app.audit_rows("resource.reclaim_protected")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn an_action_without_its_csrf_token_or_with_another_is_refused_changing_nothing() {
    let mut app = app::spawn().await;
    let (_, _, id) = app.dead_letter("connection refused").await;
    let csrf = app.sign_in().await;
    let id_text = id.to_string();
    let reply = app
        .post(
            "/dead-letters/requeue",
            &[("id", &id_text), ("reason", "retry")],
        )
        .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    // Another token: the real one with its last character changed (never to itself).
    let other = if csrf.ends_with('A') { 'B' } else { 'A' };
    let forged = format!("{}{other}", &csrf[..csrf.len() - 1]);
    let reply = app
        .post(
            "/dead-letters/requeue",
            &[("id", &id_text), ("csrf", &forged)],
        )
        .await;
    assert_eq!(reply.status, 403);
    let digest = "cd".repeat(24);
    let reply = app
        .post(
            "/orphans/protect",
            &[("digest", &digest), ("reason", "hold")],
        )
        .await;
    assert_eq!(reply.status, 403);
    let reply = app.post("/sign-out", &[]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(app.status_of(id).await, "dead_lettered");
    assert!(app.audit_rows("propagation.requeued").await.is_empty());
    assert!(
        app.audit_rows("resource.reclaim_protected")
            .await
            .is_empty()
    );
    // Still signed in: the refusal did not end the session.
    assert_eq!(app.get("/").await.status, 200);
}

#[tokio::test]
async fn a_console_requeue_writes_the_same_audit_row_as_the_cli_with_the_operator_as_actor() {
    let mut app = app::spawn().await;
    let (_, _, by_console) = app.dead_letter("connection refused").await;
    let (_, _, by_cli) = app.dead_letter("connection refused").await;
    let csrf = app.sign_in().await;
    let page = app.get("/dead-letters").await;
    assert!(
        page.body
            .contains(&format!("href=\"/dead-letters/{by_console}\""))
    );
    let id_text = by_console.to_string();
    // A requeue without a reason is refused and changes nothing.
    for blank in [None, Some("   ")] {
        let mut fields = vec![("id", id_text.as_str()), ("csrf", csrf.as_str())];
        fields.extend(blank.map(|r| ("reason", r)));
        let reply = app.post("/dead-letters/requeue", &fields).await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert!(reply.body.contains("requeue reason"), "{}", reply.body);
    }
    assert_eq!(app.status_of(by_console).await, "dead_lettered");
    let reply = app
        .post(
            "/dead-letters/requeue",
            &[
                ("id", &id_text),
                ("reason", "quota service restored"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    // The trail lists rows in commit order, once every older transaction on the server has
    // ended (other tests' transactions included): wait for the row, boundedly.
    let location = reply.header("location").unwrap().to_owned();
    let wanted = format!("propagation_id={by_console}");
    let mut trail = app.get(&location).await;
    for _ in 0..100 {
        if trail.body.contains(&wanted) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        trail = app.get(&location).await;
    }
    assert_eq!(trail.status, 200);
    assert!(
        trail.body.contains("propagation.requeued"),
        "{}",
        trail.body
    );
    assert!(trail.body.contains(&wanted), "{}", trail.body);
    assert_eq!(app.status_of(by_console).await, "pending");
    assert_eq!(app.status_of(by_cli).await, "dead_lettered");

    // The CLI's path (`keel-propagation-runner dead-letters requeue`): the same function.
    let store = keel_propagation::postgres::PgPropagationStore::new(app.db.pool().clone());
    let operator = Actor::parse(&app.actor()).unwrap();
    store
        .requeue(
            keel_propagation::postgres::RequeueTarget::One(keel_propagation::PropagationId(by_cli)),
            &operator,
            &keel_propagation::postgres::RequeueReason::parse("quota service restored").unwrap(),
            store.db_now().await.unwrap(),
        )
        .await
        .unwrap();
    let rows = app.audit_rows("propagation.requeued").await;
    assert_eq!(rows.len(), 2);
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(rows[0].0, rows[1].0, "the same actor");
    assert_eq!(keys(&rows[0].1), keys(&rows[1].1), "the same attributes");
    assert_eq!(rows[0].1["propagation_id"], by_console.to_string().as_str());
    assert_eq!(rows[0].1["previous_attempts"], "5");
    assert_eq!(rows[0].1["reason"], rows[1].1["reason"], "the same reason");
}

#[tokio::test]
async fn a_filtered_requeue_rearms_only_the_dead_letters_of_its_bucket() {
    let mut app = app::spawn().await;
    let (_, _, refused) = app.dead_letter("dial tcp: connection refused").await;
    let (_, _, other) = app.dead_letter("the applier returned something odd").await;
    let csrf = app.sign_in().await;
    let page = app.get("/dead-letters?bucket=resource_not_reachable").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .contains(&format!("href=\"/dead-letters/{refused}\""))
    );
    assert!(
        !page
            .body
            .contains(&format!("href=\"/dead-letters/{other}\""))
    );
    let reply = app
        .post(
            "/dead-letters/requeue",
            &[
                ("bucket", "resource_not_reachable"),
                ("reason", "network fixed"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(app.status_of(refused).await, "pending");
    assert_eq!(app.status_of(other).await, "dead_lettered");
    let bad = app.get("/dead-letters?bucket=nonsense").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("unknown bucket"));
}

/// The bucket filter reads past newer dead letters of other buckets: a matching dead letter
/// behind a thousand newer ones of another bucket is listed, and "Requeue all" re-arms it.
#[tokio::test]
async fn a_filtered_requeue_reaches_a_match_behind_a_thousand_newer_dead_letters() {
    let mut app = app::spawn().await;
    let (_, _, refused) = app.dead_letter("dial tcp: connection refused").await;
    sqlx::query(
        "INSERT INTO pending_propagations \
           (kind, team_id, resource_id, resource_type, payload, status, attempts, last_error, dead_lettered_at) \
         SELECT 'tier_elevation', gen_random_uuid(), gen_random_uuid(), 'postgres', \
                '{\"target_tier\":\"pro\"}', 'dead_lettered', 5, 'the applier returned something odd', \
                now() - make_interval(secs => g) \
         FROM generate_series(1, 1005) g",
    )
    .execute(app.db.pool())
    .await
    .unwrap();
    let csrf = app.sign_in().await;
    let page = app.get("/dead-letters?bucket=resource_not_reachable").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .contains(&format!("href=\"/dead-letters/{refused}\"")),
        "{}",
        page.body
    );
    let reply = app
        .post(
            "/dead-letters/requeue",
            &[
                ("bucket", "resource_not_reachable"),
                ("reason", "network fixed"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(app.status_of(refused).await, "pending");
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pending_propagations WHERE status = 'dead_lettered'",
    )
    .fetch_one(app.db.pool())
    .await
    .unwrap();
    assert_eq!(others, 1005, "only the matching one was requeued");
}

/// A hand-made dead letter whose audit row cannot be written (its kind reads as a connection
/// URL, which the audit trail refuses) is left dead-lettered on its own: "Requeue all" still
/// re-arms every other dead letter it matches, and the page says some were left.
#[tokio::test]
async fn a_filtered_requeue_rearms_the_others_past_a_dead_letter_it_cannot_audit() {
    let mut app = app::spawn().await;
    let (_, _, first) = app.dead_letter("dial tcp: connection refused").await;
    let (_, _, foreign) = app.dead_letter("dial tcp: connection refused").await;
    let (_, _, last) = app.dead_letter("dial tcp: connection refused").await;
    sqlx::query("UPDATE pending_propagations SET kind = 'postgres://u:pw@h/x' WHERE id = $1")
        .bind(foreign)
        .execute(app.db.pool())
        .await
        .unwrap();
    let csrf = app.sign_in().await;
    let reply = app
        .post(
            "/dead-letters/requeue",
            &[
                ("bucket", "resource_not_reachable"),
                ("reason", "network fixed"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert!(
        reply
            .header("location")
            .is_some_and(|l| l.ends_with("note=unrecordable")),
        "{:?}",
        reply.header("location")
    );
    assert_eq!(app.status_of(first).await, "pending");
    assert_eq!(app.status_of(last).await, "pending");
    assert_eq!(app.status_of(foreign).await, "dead_lettered");
    let rows = app.audit_rows("propagation.requeued").await;
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.1["propagation_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(!ids.contains(&foreign.to_string()), "{ids:?}");
    let page = app
        .get(
            reply
                .header("location")
                .unwrap()
                .trim_start_matches("http://localhost"),
        )
        .await;
    assert!(page.body.contains("left dead-lettered"), "{}", page.body);
}

/// A resource's timeline and a dead letter's attempt history show the newest of a long trail,
/// and say how many older rows they leave out, rather than only its oldest thousand rows.
#[tokio::test]
async fn a_long_audit_trail_shows_its_newest_rows_and_says_what_it_leaves_out() {
    let mut app = app::spawn().await;
    let (resource, _, id) = app.dead_letter("dial tcp: connection refused").await;
    sqlx::query(
        "INSERT INTO audit_events (kind, actor, resource_id, attributes, occurred_at) \
         SELECT 'propagation.retrying', 'system', $1, \
                jsonb_build_object('propagation_id', $2::text, 'attempt', g::text, \
                                   'marker', CASE WHEN g = 1 THEN 'oldestrowmarker' \
                                                  WHEN g = 1200 THEN 'newestrowmarker' \
                                                  ELSE 'middle' END), \
                now() \
         FROM generate_series(1, 1200) g",
    )
    .bind(resource)
    .bind(id.to_string())
    .execute(app.db.pool())
    .await
    .unwrap();
    app.sign_in().await;
    for path in [
        format!("/resources/{resource}"),
        format!("/dead-letters/{id}"),
    ] {
        let page = app.get(&path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        assert!(
            page.body.contains("newestrowmarker"),
            "{path}: the newest row"
        );
        assert!(
            !page.body.contains("oldestrowmarker"),
            "{path}: the oldest row is one of those left out"
        );
        assert!(
            page.body
                .contains("The newest 1000 rows are shown; 200 older ones are not."),
            "{path}"
        );
    }
}

/// Candidates that stay for good (quarantined after a refusal, here 600 of them seen for a
/// month) never push a newer candidate an armed sweep would reclaim off the orphan review, and
/// the page says how many it leaves out.
#[tokio::test]
async fn the_orphan_review_shows_what_an_armed_sweep_would_reclaim_before_what_stays() {
    let mut app = app::spawn().await;
    sqlx::query(
        "WITH recorded AS (INSERT INTO orphan_sweep_recorded (inventory, last_period) \
                           VALUES ('postgres', 10) ON CONFLICT DO NOTHING) \
         INSERT INTO orphan_sighting_runs (inventory, key, first_seen, quarantined) \
         SELECT 'postgres', 'database:' || lpad(to_hex(i), 48, '0'), now() - interval '30 days', \
                'refused' \
         FROM generate_series(1, 600) i",
    )
    .execute(app.db.pool())
    .await
    .unwrap();
    let newer = "ab".repeat(24);
    sqlx::query(
        "INSERT INTO orphan_sighting_runs \
           (inventory, key, first_seen, reclaimable_since, reclaimable_period) \
         VALUES ('postgres', $1, now() - interval '1 day', now() - interval '1 day', 8)",
    )
    .bind(format!("database:{newer}"))
    .execute(app.db.pool())
    .await
    .unwrap();
    app.sign_in().await;
    let review = app.get("/orphans").await;
    assert_eq!(review.status, 200);
    assert!(
        review.body.contains(&newer),
        "the candidate an armed sweep would reclaim is not on the page"
    );
    assert!(review.body.contains("500 of 601 candidates are shown"));
}

#[tokio::test]
async fn protect_and_unprotect_are_audited_with_the_operator_like_the_cli_and_destroy_nothing() {
    let mut app = app::spawn().await;
    let digest = "0123456789abcdef".repeat(3);
    sqlx::query(
        "WITH recorded AS (INSERT INTO orphan_sweep_recorded (inventory, last_period) \
                           VALUES ('postgres', 10) ON CONFLICT DO NOTHING) \
         INSERT INTO orphan_sighting_runs (inventory, key, first_seen, reclaimable_since, reclaimable_period, \
                                           failed_reclaims) \
         VALUES ('postgres', $1, now() - interval '3 days', now() - interval '2 days', 7, 2)",
    )
    .bind(format!("database:{digest}"))
    .execute(app.db.pool())
    .await
    .unwrap();
    let csrf = app.sign_in().await;
    let review = app.get("/orphans").await;
    assert_eq!(review.status, 200);
    assert!(review.body.contains(&digest));
    assert!(review.body.contains("yes, when armed"));
    // Four sightings in a row (periods 7 to 10), two failed reclaims.
    assert!(review.body.contains("<th>failed reclaims</th>"));
    assert!(
        review.body.contains("<td>4</td><td>2</td>"),
        "{}",
        review.body
    );

    let reply = app
        .post(
            "/orphans/protect",
            &[
                ("digest", &digest),
                ("reason", "legal hold"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(reply.status, 303, "{}", reply.body);
    let review = app.get("/orphans").await;
    assert!(review.body.contains("legal hold"));
    assert!(
        review
            .body
            .contains(&format!("protected by {}", app.actor()))
    );
    let again = app
        .post(
            "/orphans/protect",
            &[
                ("digest", &digest),
                ("reason", "legal hold"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(again.header("location"), Some("/orphans?note=unchanged"));
    let reply = app
        .post(
            "/orphans/unprotect",
            &[("digest", &digest), ("reason", "released"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(reply.status, 303);
    let bad = app
        .post(
            "/orphans/protect",
            &[("digest", "not-a-digest"), ("reason", "x"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(bad.status, 400);
    let no_reason = app
        .post(
            "/orphans/protect",
            &[("digest", &digest), ("reason", " "), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(no_reason.status, 400);

    // The CLI's path (`keel-orphan-sweep protections protect`): the same function, same rows.
    let operator = Actor::parse("operator:alice").unwrap();
    let parsed = TokenDigest::parse(&digest).unwrap();
    assert!(
        keel_orphan_sweep::protections::protect(
            app.db.pool(),
            &parsed,
            "legal hold",
            &operator,
            time::OffsetDateTime::now_utc()
        )
        .await
        .unwrap()
    );
    let rows = app.audit_rows("resource.reclaim_protected").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, app.actor());
    assert_eq!(rows[1].0, "operator:alice");
    assert_eq!(
        rows[0].1, rows[1].1,
        "the console and the CLI write the same attributes"
    );
    assert_eq!(rows[0].1["digest"], digest.as_str());
    let lifted = app.audit_rows("resource.reclaim_unprotected").await;
    assert_eq!(lifted.len(), 1);
    assert_eq!(lifted[0].1["reason"], "released");
    // The sighting is still there: nothing was reclaimed or deleted.
    let sightings: i64 = sqlx::query_scalar("SELECT count(*) FROM orphan_sightings")
        .fetch_one(app.db.pool())
        .await
        .unwrap();
    assert_eq!(sightings, 1);
}

#[tokio::test]
async fn every_page_renders_for_an_operator_and_shows_no_token_or_connection_url() {
    let mut app = app::spawn().await;
    let (resource, token, id) = app.dead_letter("connection refused").await;
    sqlx::query(
        "INSERT INTO rater_runs (started_at, finished_at, window_start, window_end, explicit_window, inserted, deleted, exit_code) \
         VALUES (now() - interval '1 hour', now() - interval '59 minutes', now() - interval '3 hours', now() - interval '2 hours', false, 12, 1, 2)",
    )
    .execute(app.db.pool())
    .await
    .unwrap();
    app.sign_in().await;
    for path in [
        "/".to_owned(),
        "/dead-letters".to_owned(),
        format!("/dead-letters/{id}"),
        "/orphans".to_owned(),
        "/rater-runs".to_owned(),
        "/audit".to_owned(),
        format!("/resources/{resource}"),
    ] {
        let page = app.get(&path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        assert!(page.body.contains("Sign out"), "{path}");
        assert!(!page.body.contains(&token), "{path} shows the token");
        assert!(
            !page.body.contains("postgres://"),
            "{path} shows a connection URL"
        );
        assert!(!page.body.contains(&app.key), "{path} shows the key");
    }
    let resource_page = app.get(&format!("/resources/{resource}")).await;
    assert!(resource_page.body.contains(&keel_audit::mask(&token)));
    let runs = app.get("/rater-runs").await;
    assert!(runs.body.contains("rows of this run"));
    let times = app.get("/").await;
    assert!(times.body.contains("Z</td>"), "times are RFC 3339 UTC");
    for bad in [
        "/audit?since=yesterday",
        "/audit?kind=nope",
        "/audit?after=1-2-3",
        // An instant UTC cannot hold (the year 10000 there) is a bad request, never a panic
        // binding it.
        "/audit?until=9999-12-31T23:00:00-01:00",
        "/audit?since=0001-01-01T00:30:00%2B01:00",
        "/resources/x",
    ] {
        assert_eq!(app.get(bad).await.status, 400, "{bad}");
    }
}

/// A ledger row another writer dated at the very end of year 9999 (still a time every reader
/// can decode) takes neither the overview nor the rater page down: the link to its audit rows
/// has no end, where adding an hour and a second to it panicked the page for every operator.
#[tokio::test]
async fn a_rater_run_dated_at_the_end_of_time_does_not_take_a_page_down() {
    let mut app = app::spawn().await;
    sqlx::query(
        "INSERT INTO rater_runs (started_at, window_start, window_end, explicit_window) \
         VALUES ('9999-12-31 23:30:00+00', now() - interval '1 hour', now(), false), \
                ('9999-12-31 23:00:00+00', now() - interval '1 hour', now(), false)",
    )
    .execute(app.db.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE rater_runs SET finished_at = '9999-12-31 23:59:59.999999+00', exit_code = 0 \
         WHERE started_at = '9999-12-31 23:00:00+00'",
    )
    .execute(app.db.pool())
    .await
    .unwrap();
    app.sign_in().await;
    for path in ["/", "/rater-runs"] {
        let page = app.get(path).await;
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        assert!(page.body.contains("9999-12-31T23:30:00Z"), "{path}");
        assert!(page.body.contains("rows of this run"), "{path}");
    }
}

#[tokio::test]
async fn the_audit_trail_pages_by_cursor_through_every_row_once() {
    let mut app = app::spawn_with(7).await;
    let team = app.db.team_id("pro").await;
    for i in 0..30 {
        let event = keel_audit::AuditEvent::new(
            keel_audit::AuditKind::TeamTierChanged,
            Actor::parse("operator:seed").unwrap(),
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
    app.sign_in().await;
    // Rows show once every older transaction on the server has ended (other tests' too):
    // page through again until the whole set is visible, boundedly.
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = page_through(&mut app, &format!("/audit?team={team}")).await;
        if seen.len() == 30 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
}

#[tokio::test]
async fn signing_out_or_revoking_the_key_ends_the_session() {
    let mut app = app::spawn().await;
    let csrf = app.sign_in().await;
    let reply = app.post("/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(reply.status, 303);
    assert_eq!(app.get("/").await.status, 303);
    let out = app.audit_rows("console.signed_out").await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, app.actor());

    app.sign_in().await;
    assert_eq!(app.get("/").await.status, 200);
    keel_provision_http::keys::revoke(
        app.db.pool(),
        &keel_provision_http::keys::KeyId::parse(&app.key_id).unwrap(),
        Actor::parse("operator:setup").unwrap(),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    assert_eq!(
        app.get("/").await.status,
        303,
        "a revoked key's session is over"
    );
}

/// Follows the audit trail's "next" links from `path`, collecting the `n` attribute of each row.
async fn page_through(app: &mut App, path: &str) -> Vec<u32> {
    let mut path = path.to_owned();
    let mut seen = Vec::new();
    for _ in 0..20 {
        let page = app.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.body);
        for part in page.body.split("<code>n=").skip(1) {
            seen.push(part[..part.find('<').unwrap()].parse().unwrap());
        }
        let Some(at) = page.body.find("id=\"next\" href=\"") else {
            break;
        };
        let rest = &page.body[at + "id=\"next\" href=\"".len()..];
        path = rest[..rest.find('"').unwrap()].replace("&amp;", "&");
    }
    seen
}

#[tokio::test]
async fn sessions_over_for_a_day_are_cleared_at_the_next_sign_in() {
    let mut app = app::spawn().await;
    for (seed, expired) in [("old", "3 days"), ("recent", "1 hour")] {
        sqlx::query(
            "INSERT INTO provision_api.console_sessions (id_sha256, key_id, csrf_token, created_at, expires_at) \
             VALUES (sha256(convert_to($1, 'UTF8')), $2, repeat('a', 43), now() - interval '9 days', now() - $3::interval)",
        )
        .bind(seed)
        .bind(&app.key_id)
        .bind(expired)
        .execute(app.db.pool())
        .await
        .unwrap();
    }
    app.sign_in().await;
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT CASE WHEN id_sha256 = sha256(convert_to('recent', 'UTF8')) THEN 'recent' \
                     WHEN id_sha256 = sha256(convert_to('old', 'UTF8')) THEN 'old' ELSE 'new' END \
         FROM provision_api.console_sessions ORDER BY 1",
    )
    .fetch_all(app.db.pool())
    .await
    .unwrap();
    assert_eq!(left, ["new", "recent"]);
}
