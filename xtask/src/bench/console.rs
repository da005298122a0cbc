//! `cargo xtask bench console`: the operator console's pages at scale (1M audit rows, 100k dead
//! letters by default), each page's render time over HTTP (median and min–max of several
//! requests) printed beside the bare SQL of that page's main query on the same Postgres.
//! Seeding is set-based (`generate_series`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use keel_audit::Actor;
use keel_console::{Console, ConsoleConfig};
use keel_provision_http::keys::{self, Scope};
use keel_testkit::PgServer;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SAMPLES: usize = 7;

/// Runs the benchmark.
pub fn bench(audit_rows: u64, dead_letters: u64) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(run(audit_rows, dead_letters))
}

async fn run(audit_rows: u64, dead_letters: u64) -> anyhow::Result<()> {
    let server = tokio::task::spawn_blocking(PgServer::start_throwaway)
        .await?
        .context("could not start a throwaway Postgres")?;
    server.create_database("keel_bench_console", None).await?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(server.options_for("keel_bench_console"))
        .await?;
    keel_schema::migrate(&pool).await?;
    let started = Instant::now();
    seed(&pool, audit_rows, dead_letters).await?;
    println!(
        "seeded {audit_rows} audit rows and {dead_letters} dead letters in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (team, resource, dead_letter) = sample_ids(&pool).await?;

    let console = Arc::new(Console::new(
        pool.clone(),
        ConsoleConfig {
            secure_cookies: false,
            ..ConsoleConfig::default()
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Served as the `keel-console` binary serves it.
    tokio::spawn(keel_http_serve::serve(
        listener,
        keel_console::router(console),
        tokio_util::sync::CancellationToken::new(),
        keel_http_serve::Limits::default(),
    ));
    let cookie = sign_in(&pool, addr).await?;

    let pages: Vec<(String, String)> = vec![
        (
            "/".to_owned(),
            "SELECT kind, last_error, count(*) FROM pending_propagations \
             WHERE status = 'dead_lettered' GROUP BY kind, last_error"
                .to_owned(),
        ),
        (
            "/dead-letters".to_owned(),
            "SELECT id, kind, team_id, resource_id, last_error, dead_lettered_at \
             FROM pending_propagations WHERE status = 'dead_lettered' \
             ORDER BY dead_lettered_at DESC, id DESC LIMIT 1000"
                .to_owned(),
        ),
        (
            "/dead-letters?kind=tier_elevation&bucket=pod_not_found&older_than_hours=1".to_owned(),
            "SELECT id, last_error FROM pending_propagations WHERE status = 'dead_lettered' \
             AND kind = 'tier_elevation' AND dead_lettered_at <= now() - interval '1 hour' \
             ORDER BY dead_lettered_at DESC, id DESC LIMIT 1000"
                .to_owned(),
        ),
        (
            format!("/dead-letters/{dead_letter}"),
            format!(
                "SELECT id, kind, actor, attributes FROM audit_events WHERE resource_id = '{resource}' \
                 ORDER BY txid, id LIMIT 1000"
            ),
        ),
        (
            "/orphans".to_owned(),
            "SELECT s.key, p.reason FROM orphan_sightings s LEFT JOIN reclaim_protections p \
             ON p.token_digest = split_part(s.key, ':', 2) ORDER BY s.first_seen LIMIT 500"
                .to_owned(),
        ),
        (
            "/rater-runs".to_owned(),
            "SELECT * FROM rater_runs ORDER BY started_at DESC, id DESC LIMIT 100".to_owned(),
        ),
        (
            "/audit".to_owned(),
            "SELECT id, kind, actor, attributes FROM audit_events ORDER BY txid, id LIMIT 50"
                .to_owned(),
        ),
        (
            "/audit?kind=propagation.dead_lettered".to_owned(),
            "SELECT id FROM audit_events WHERE kind = 'propagation.dead_lettered' \
             ORDER BY txid, id LIMIT 50"
                .to_owned(),
        ),
        (
            format!("/audit?team={team}"),
            format!(
                "SELECT id FROM audit_events WHERE team_id = '{team}' ORDER BY txid, id LIMIT 50"
            ),
        ),
        (
            format!("/resources/{resource}"),
            format!(
                "SELECT id, kind FROM audit_events WHERE resource_id = '{resource}' \
                 ORDER BY txid, id LIMIT 1000"
            ),
        ),
    ];
    println!(
        "\n{:<72} {:>22} {:>22}",
        "page", "render ms med (min-max)", "bare SQL ms med (min-max)"
    );
    for (path, sql) in pages {
        let mut page = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let t = Instant::now();
            let (status, bytes) = get(addr, &path, &cookie).await?;
            page.push(t.elapsed());
            ensure!(status == 200, "{path} answered {status}");
            ensure!(bytes > 0, "{path} was empty");
        }
        let mut bare = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let t = Instant::now();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&pool)
                .await
                .with_context(|| format!("the baseline of {path}"))?;
            bare.push(t.elapsed());
        }
        println!(
            "{:<72} {:>22} {:>22}",
            path,
            stats(&mut page),
            stats(&mut bare)
        );
    }
    pool.close().await;
    Ok(())
}

fn stats(samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.1} ({:.1}-{:.1})",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1])
    )
}

async fn seed(pool: &PgPool, audit_rows: u64, dead_letters: u64) -> anyhow::Result<()> {
    let statements = [
        "INSERT INTO teams (id, tier) SELECT gen_random_uuid(), 'pro' FROM generate_series(1, 1000)".to_owned(),
        "CREATE TEMP TABLE bench_teams AS SELECT id, row_number() OVER () AS n FROM teams".to_owned(),
        format!(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
             SELECT gen_random_uuid(), 'tok' || lpad(i::text, 20, '0'), t.id, 'postgres', 'pro', 'active', 'cust_' || i, 'postgres://bench' \
             FROM generate_series(1, {dead_letters}) i JOIN bench_teams t ON t.n = 1 + i % 1000"
        ),
        "CREATE TEMP TABLE bench_resources AS SELECT id, team_id, row_number() OVER () AS n FROM resources".to_owned(),
        format!(
            "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, status, attempts, last_error, dead_lettered_at) \
             SELECT 'tier_elevation', r.team_id, r.id, 'postgres', '{{\"target_tier\":\"pro\"}}', 'dead_lettered', 8, \
                    (ARRAY['pod not found', 'dial tcp: connection refused', 'namespace not found', 'the applier failed', 'secret postgres-admin not found'])[1 + i % 5], \
                    now() - make_interval(secs => i) \
             FROM generate_series(1, {dead_letters}) i JOIN bench_resources r ON r.n = i"
        ),
        format!(
            "INSERT INTO audit_events (kind, actor, team_id, resource_id, attributes, occurred_at) \
             SELECT (ARRAY['propagation.applied', 'propagation.retrying', 'provision.created', 'propagation.dead_lettered', 'resource.deprovisioned'])[1 + i % 5], \
                    'system:bench', r.team_id, r.id, jsonb_build_object('n', i::text), now() - make_interval(secs => i) \
             FROM generate_series(1, {audit_rows}) i JOIN bench_resources r ON r.n = 1 + i % {dead_letters}"
        ),
        "INSERT INTO orphan_sweep_recorded (inventory, last_period) VALUES ('postgres', 10)".to_owned(),
        "INSERT INTO orphan_sighting_runs (inventory, key, first_seen, reclaimable_since, reclaimable_period) \
         SELECT 'postgres', 'database:' || left(encode(sha256(i::text::bytea), 'hex'), 48), now() - interval '3 days', now() - interval '2 days', 8 \
         FROM generate_series(1, 10000) i".to_owned(),
        "INSERT INTO rater_runs (started_at, finished_at, window_start, window_end, explicit_window, inserted, exit_code) \
         SELECT now() - make_interval(hours => i), now() - make_interval(hours => i) + interval '30 seconds', \
                now() - make_interval(hours => i + 2), now() - make_interval(hours => i + 1), false, 1000, 0 \
         FROM generate_series(1, 2000) i".to_owned(),
        "ANALYZE".to_owned(),
    ];
    // One connection: the temporary tables are its own.
    let mut conn = pool.acquire().await?;
    for statement in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("seeding: {}", &statement[..statement.len().min(80)]))?;
    }
    Ok(())
}

async fn sample_ids(pool: &PgPool) -> anyhow::Result<(uuid::Uuid, uuid::Uuid, i64)> {
    let (id, team, resource): (i64, uuid::Uuid, uuid::Uuid) = sqlx::query_as(
        "SELECT id, team_id, resource_id FROM pending_propagations ORDER BY id LIMIT 1 OFFSET 500",
    )
    .fetch_one(pool)
    .await?;
    Ok((team, resource, id))
}

async fn sign_in(pool: &PgPool, addr: SocketAddr) -> anyhow::Result<String> {
    let (_, key) = keys::create(
        pool,
        Scope::Operator,
        "bench",
        Actor::parse("operator:bench")?,
        time::OffsetDateTime::now_utc(),
    )
    .await?;
    let form = raw(
        addr,
        "GET /sign-in HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let csrf_cookie = header_cookie(&form, "keel_console_sign_in").context("no sign-in cookie")?;
    let body = format!("key={}&csrf={}", key.expose(), csrf_cookie);
    let reply = raw(
        addr,
        &format!(
            "POST /sign-in HTTP/1.1\r\nHost: b\r\nConnection: close\r\nCookie: keel_console_sign_in={csrf_cookie}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await?;
    header_cookie(&reply, "keel_console_session").context("the sign-in set no session")
}

fn header_cookie(reply: &str, name: &str) -> Option<String> {
    reply
        .lines()
        .filter_map(|l| l.strip_prefix("set-cookie: "))
        .find_map(|c| c.strip_prefix(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap_or("").to_owned())
}

async fn raw(addr: SocketAddr, request: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn get(addr: SocketAddr, path: &str, cookie: &str) -> anyhow::Result<(u16, usize)> {
    let reply = raw(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\nCookie: keel_console_session={cookie}\r\n\r\n"
        ),
    )
    .await?;
    let status = reply.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, reply.len()))
}
