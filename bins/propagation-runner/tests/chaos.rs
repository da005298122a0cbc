//! Two `keel-propagation-runner` processes over 1,000 propagations of every resource type —
//! some with an extra payload key, some that cannot be applied, some re-targeted mid-run —
//! while one runner after another is SIGKILLed and the database restarts. Afterwards: no row
//! lost, nothing applied whose effect did not happen, one `propagation.applied` per applied
//! row, attempts within budget, and every unexpected skip counted in
//! `instant_propagation_unexpected_skip_total`.
//!
//! The test runs its own PostgreSQL cluster (so it can restart it without disturbing other
//! tests), started with `pg_ctl` from the machine's binaries and removed at the end.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keel_audit::{Actor, TeamId, Tier};
use keel_propagation::postgres::{TierRoleSettings, change_team_tier};
use sqlx::PgPool;

use cluster::{Cluster, connect};

mod cluster;

const TEAMS_WITH_ROLES: usize = 7;
const PER_TEAM: usize = 100;

/// One runner process, with its own metrics port.
struct RunnerProcess {
    child: Child,
    metrics_port: u16,
}

fn spawn_runner(url: &str, worker: &str) -> RunnerProcess {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_keel-propagation-runner"))
        .arg("run")
        .env("DATABASE_URL", url)
        .env("KEEL_WORKER_ID", worker)
        .env("KEEL_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("KEEL_KUBERNETES", "disabled")
        .env("KEEL_BATCH_SIZE", "16")
        .env("KEEL_POLL_SECONDS", "1")
        .env("KEEL_LEASE_SECONDS", "20")
        .env("KEEL_APPLY_TIMEOUT_SECONDS", "5")
        .env("KEEL_SHUTDOWN_GRACE_SECONDS", "2")
        .env("KEEL_RECONCILE_SECONDS", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keel-propagation-runner");
    RunnerProcess {
        child,
        metrics_port,
    }
}

/// The sum of `instant_propagation_unexpected_skip_total` over every label set.
async fn unexpected_skips_counted(port: u16) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("instant_propagation_unexpected_skip_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}

async fn wait_until(what: &str, pool: &PgPool, sql: &str) {
    for _ in 0..1200 {
        if let Ok(true) = sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(pool)
            .await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gave up waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_survive_sigkills_and_a_database_restart_without_a_silent_row() {
    let cluster = Cluster::start_migrated().await;
    let url = cluster.url();
    let pool = connect(&url).await;

    // Seven teams of 100 postgres resources whose roles exist; one team of 100 whose roles are
    // missing; one of 100 redis and one of 100 namespace resources (the runners here have no
    // Kubernetes applier): 1,000 resources, 300 of them unappliable.
    let mut teams = Vec::new();
    let mut n = 0;
    let groups: Vec<(&str, bool)> = std::iter::repeat_n(("postgres", true), TEAMS_WITH_ROLES)
        .chain([("postgres", false), ("redis", false), ("namespace", false)])
        .collect();
    for (resource_type, with_role) in &groups {
        let team = TeamId::new_random();
        sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'free')")
            .bind(team.as_uuid())
            .execute(&pool)
            .await
            .unwrap();
        for _ in 0..PER_TEAM {
            n += 1;
            let token = format!("chaos{n:08}");
            // Named as keel-provision names the resource's backend object.
            let parsed = keel_audit::Token::parse(&token).unwrap();
            let provider = match *resource_type {
                "postgres" => keel_provision::RoleName::for_database(
                    &keel_provision::DatabaseName::for_token(&parsed),
                )
                .expose()
                .to_owned(),
                _ => keel_provision::NamespaceName::for_token(&parsed)
                    .expose()
                    .to_owned(),
            };
            if *with_role {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE ROLE {provider} CONNECTION LIMIT 1"
                )))
                .execute(&pool)
                .await
                .unwrap();
            }
            sqlx::query(
                "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
                 VALUES (gen_random_uuid(), $1, $2, $3, 'free', 'active', $4, 'postgres://x')",
            )
            .bind(&token)
            .bind(team.as_uuid())
            .bind(resource_type)
            .bind(&provider)
            .execute(&pool)
            .await
            .unwrap();
        }
        teams.push((team, *with_role));
    }
    // Every team upgrades to pro: the propagations are enqueued with the change.
    let actor = Actor::parse("operator:chaos").unwrap();
    let pro = Tier::parse("pro").unwrap();
    let now: time::OffsetDateTime = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await
        .unwrap();
    for (team, _) in &teams {
        let mut tx = pool.begin().await.unwrap();
        change_team_tier(&mut tx, *team, &pro, &actor, now)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    // A tenth of the rows carry a key this build does not know.
    sqlx::query(
        "UPDATE pending_propagations SET payload = payload || '{\"requested_by\": \"billing-webhook\"}' \
         WHERE id % 10 = 0",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The unappliable rows wait until the chaos is over, so their unexpected skips are counted
    // by runners that are still alive to be scraped.
    sqlx::query(
        "UPDATE pending_propagations p SET next_attempt_at = now() + interval '1 day' \
         FROM resources r WHERE r.id = p.resource_id \
           AND (r.resource_type <> 'postgres' OR r.team_id = $1)",
    )
    .bind(teams[TEAMS_WITH_ROLES].0.as_uuid())
    .execute(&pool)
    .await
    .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_propagations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 1000);

    // Chaos: two runners; every 700 ms one of them is SIGKILLed and replaced; two teams are
    // re-targeted to `team` mid-run; the database restarts once.
    let mut names = ["chaos-a0".to_owned(), "chaos-b0".to_owned()];
    let mut runners = vec![spawn_runner(&url, &names[0]), spawn_runner(&url, &names[1])];
    let team_tier = Tier::parse("team").unwrap();
    let mut pool = pool;
    for round in 0..12usize {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let victim = round % 2;
        runners[victim].child.kill().unwrap();
        runners[victim].child.wait().unwrap();
        names[victim] = format!("chaos-{}{round}", if victim == 0 { 'a' } else { 'b' });
        runners[victim] = spawn_runner(&url, &names[victim]);
        if round == 3 || round == 7 {
            let (team, _) = teams[round / 4];
            let now: time::OffsetDateTime = sqlx::query_scalar("SELECT clock_timestamp()")
                .fetch_one(&pool)
                .await
                .unwrap();
            let mut tx = pool.begin().await.unwrap();
            change_team_tier(&mut tx, team, &team_tier, &actor, now)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        if round == 5 {
            pool.close().await;
            cluster.stop();
            cluster.start();
            pool = connect(&url).await;
        }
    }

    // The rows the killed runners held come back after their lease, and rows that failed while
    // the database was down after their backoff. Bring both forward (the test is about what
    // happens, not about waiting), until every appliable row is applied.
    let mut settled = false;
    for _ in 0..240 {
        sqlx::query(
            "UPDATE pending_propagations SET lease_expires_at = now() \
             WHERE claimed_by IS NOT NULL AND claimed_by NOT LIKE $1 AND claimed_by NOT LIKE $2",
        )
        .bind(format!("{}-%", names[0]))
        .bind(format!("{}-%", names[1]))
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE pending_propagations SET next_attempt_at = now() \
             WHERE status = 'pending' AND claimed_by IS NULL \
               AND next_attempt_at BETWEEN now() AND now() + interval '1 hour'",
        )
        .execute(&pool)
        .await
        .unwrap();
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pending_propagations \
             WHERE status = 'pending' AND next_attempt_at < now() + interval '1 hour'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if open == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(settled, "appliable rows were left pending");
    let skipped_under_chaos: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE kind = 'propagation.unexpected_skip'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        skipped_under_chaos, 0,
        "no appliable row is ever an unexpected skip"
    );

    // The unappliable rows, with two fresh runners that stay alive to be scraped.
    for (runner, name) in runners.iter_mut().zip(["chaos-a-final", "chaos-b-final"]) {
        runner.child.kill().unwrap();
        runner.child.wait().unwrap();
        *runner = spawn_runner(&url, name);
    }
    sqlx::query(
        "UPDATE pending_propagations SET next_attempt_at = now(), lease_expires_at = \
                CASE WHEN claimed_by IS NULL THEN NULL ELSE now() END \
         WHERE status = 'pending'",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_until(
        "every unappliable row was attempted and recorded",
        &pool,
        "SELECT count(*) = 300 FROM pending_propagations \
         WHERE status = 'pending' AND attempts >= 1 AND claimed_by IS NULL \
           AND last_error LIKE 'unexpected skip%'",
    )
    .await;
    let mut counted = 0;
    for runner in &runners {
        counted += unexpected_skips_counted(runner.metrics_port)
            .await
            .expect("scrape /metrics");
    }
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE kind = 'propagation.unexpected_skip'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        counted as i64, audited,
        "every unexpected skip is counted in instant_propagation_unexpected_skip_total"
    );
    assert!(audited >= 300);
    for mut runner in runners {
        runner.child.kill().unwrap();
        runner.child.wait().unwrap();
    }

    // No row lost: every resource has a propagation for its team's current tier.
    let lost: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM resources r JOIN teams t ON t.id = r.team_id \
         WHERE NOT EXISTS (SELECT 1 FROM pending_propagations p \
                           WHERE p.resource_id = r.id AND p.payload->>'target_tier' = t.tier)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(lost, 0, "a resource lost its propagation");
    // Nothing applied whose effect did not happen: every appliable resource is at its team's
    // tier, and its role has exactly that tier's settings; nothing unappliable is applied.
    let settings = TierRoleSettings::standard();
    let states: Vec<(String, String, String, i32)> = sqlx::query_as(
        "SELECT r.provider_resource_id, r.tier, t.tier, g.rolconnlimit \
         FROM resources r JOIN teams t ON t.id = r.team_id \
         JOIN pg_roles g ON g.rolname = r.provider_resource_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(states.len(), TEAMS_WITH_ROLES * PER_TEAM);
    let mut by_tier: BTreeMap<String, usize> = BTreeMap::new();
    for (role, applied, wanted, limit) in &states {
        assert_eq!(
            applied, wanted,
            "{role}: the recorded tier is not the team's"
        );
        let expected = settings
            .get(&Tier::parse(wanted).unwrap())
            .unwrap()
            .connection_limit;
        assert_eq!(
            *limit, expected,
            "{role}: recorded {applied} but the role says otherwise"
        );
        *by_tier.entry(wanted.clone()).or_default() += 1;
    }
    assert_eq!(by_tier.get("team"), Some(&(2 * PER_TEAM)), "{by_tier:?}");
    let applied_unappliable: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pending_propagations p JOIN resources r ON r.id = p.resource_id \
         WHERE p.status = 'applied' \
           AND NOT EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = r.provider_resource_id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(applied_unappliable, 0);
    // Exactly one propagation.applied per applied row, and none for any other.
    let (applied_rows, applied_audits, mismatched): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pending_propagations WHERE status = 'applied'), \
                (SELECT count(*) FROM audit_events WHERE kind = 'propagation.applied'), \
                (SELECT count(*) FROM pending_propagations p WHERE p.status = 'applied' AND \
                   (SELECT count(*) FROM audit_events a WHERE a.kind = 'propagation.applied' \
                      AND a.attributes->>'propagation_id' = p.id::text) <> 1)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((applied_audits, mismatched), (applied_rows, 0));
    assert!(applied_rows >= (TEAMS_WITH_ROLES * PER_TEAM) as i64);
    // Attempts never over budget.
    let most: i32 = sqlx::query_scalar("SELECT max(attempts) FROM pending_propagations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(most <= 10, "{most} attempts");
    pool.close().await;
    drop(cluster);
}
