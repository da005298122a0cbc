//! `cargo xtask bench audit`: the documented audit-trail queries (`keel-audit list` by kind,
//! team, resource, actor, request id, a time range, and the next page after a cursor) on the
//! monthly-partitioned `audit_events` holding N rows over twelve months, beside the same query
//! on an unpartitioned copy of the same rows with the same indexes (the peer), in the same run.
//!
//! Rows are seeded set-based (`generate_series`) in commit order over the transaction ids the
//! cluster has used, as a trail written over a year would have them. Each query runs through `keel_audit::list::list` on the
//! partitioned table; the peer runs the same SQL on the copy. Printed: median and min-max of
//! `RUNS` timed runs after one warm-up.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_audit::list::{ListQuery, list};
use keel_audit::postgres::CommitCursor;
use keel_audit::{Actor, AuditKind, RequestId, ResourceId, TeamId};
use keel_testkit::PgServer;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;

const RUNS: usize = 15;
const TEAMS: i64 = 10_000;
const RESOURCES: i64 = 100_000;
const ACTORS: i64 = 50;
const KINDS: [&str; 6] = [
    "propagation.applied",
    "provision.created",
    "resource.deprovisioned",
    "team.tier_changed",
    "notification.delivered",
    "rater.reconcile_deleted",
];
/// The same filters `list` writes, for the unpartitioned peer.
const PEER_SELECT: &str = "SELECT txid::text::bigint, id, kind, actor, team_id, resource_id, \
                           request_id, attributes, occurred_at, recorded_at FROM audit_events_flat \
                           WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) \
                             AND (txid, id) > ($1::text::xid8, $2)";

fn team(n: i64) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x7ea0_0000_0000_4000_8000_0000_0000_0000 | n as u128)
}

fn resource(n: i64) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x7e50_0000_0000_4000_8000_0000_0000_0000 | n as u128)
}

/// Runs the benchmark and prints its figures.
pub fn bench(rows: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = PgServer::start_throwaway_with(&keel_testkit::ThrowawayOptions {
        settings: vec![
            ("shared_buffers".into(), "512MB".into()),
            ("work_mem".into(), "32MB".into()),
            ("maintenance_work_mem".into(), "512MB".into()),
            ("max_wal_size".into(), "4GB".into()),
        ],
        password_auth: true,
    })
    .context("could not start a throwaway Postgres")?;
    rt.block_on(async {
        server.create_database("bench_audit", None).await?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(server.options_for("bench_audit"))
            .await?;
        keel_schema::migrate(&pool).await?;
        println!(
            "audit benchmark: {rows} rows over 12 months, {}",
            server.describe()
        );
        let start = seed(&pool, i64::try_from(rows)?).await?;
        let mut conn = pool.acquire().await?;
        queries(&mut conn, start).await
    })
}

/// Seeds `rows` rows over the twelve months from `start`, on the partitioned table and on an
/// unpartitioned copy with the same indexes; returns `start`.
async fn seed(pool: &PgPool, rows: i64) -> anyhow::Result<OffsetDateTime> {
    let started = Instant::now();
    let now = OffsetDateTime::now_utc();
    let start = keel_audit::retention::Month::containing(now - time::Duration::days(365)).start();
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT audit_events_ensure_partitions($1, $2)")
        .bind(start)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    // Indexes are built after the load (faster than maintaining them row by row).
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = 'audit_events'::regclass AND NOT i.indisprimary",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (name, _) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {name}")))
            .execute(&mut *conn)
            .await?;
    }
    // The stamp trigger would set every row's recorded_at to now: off for the load only.
    sqlx::raw_sql("ALTER TABLE audit_events DISABLE TRIGGER audit_events_stamp")
        .execute(&mut *conn)
        .await?;
    let span = (now - start).whole_seconds();
    // Commit positions must be of finished transactions (readers only see rows older than
    // every running one): spread over the transaction ids this cluster has used so far, in
    // time order, several rows per transaction.
    let used: i64 = sqlx::query_scalar("SELECT txid_current()")
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO audit_events (id, kind, actor, team_id, resource_id, request_id, attributes, \
                                   occurred_at, recorded_at, txid) \
         OVERRIDING SYSTEM VALUE \
         SELECT g, ($3::text[])[1 + g % 6], 'service:actor-' || (g % $4), \
                ('7ea00000-0000-4000-8000-' || lpad(to_hex(g % $5), 12, '0'))::uuid, \
                ('7e500000-0000-4000-8000-' || lpad(to_hex(g % $6), 12, '0'))::uuid, \
                'req-' || g, jsonb_build_object('tier', 'pro', 'n', g::text), \
                $2 + make_interval(secs => g * $7 / $1), $2 + make_interval(secs => g * $7 / $1), \
                (3 + g * ($8 - 10) / $1)::text::xid8 \
         FROM generate_series(1, $1) g",
    )
    .bind(rows)
    .bind(start)
    .bind(&KINDS[..])
    .bind(ACTORS)
    .bind(TEAMS)
    .bind(RESOURCES)
    .bind(span as f64)
    .bind(used)
    .execute(&mut *conn)
    .await?;
    sqlx::raw_sql("ALTER TABLE audit_events ENABLE TRIGGER audit_events_stamp")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT setval(pg_get_serial_sequence('audit_events', 'id'), $1)")
        .bind(rows + 1)
        .execute(&mut *conn)
        .await?;
    println!(
        "loaded the partitioned table in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let copied = Instant::now();
    sqlx::raw_sql(
        "CREATE TABLE audit_events_flat (LIKE audit_events INCLUDING DEFAULTS); \
         INSERT INTO audit_events_flat SELECT * FROM audit_events; \
         ALTER TABLE audit_events_flat ADD PRIMARY KEY (id, recorded_at)",
    )
    .execute(&mut *conn)
    .await?;
    println!(
        "copied it unpartitioned in {:.1} s",
        copied.elapsed().as_secs_f64()
    );
    let indexed = Instant::now();
    for (name, definition) in &indexes {
        // The definition of a partitioned index reads `ON ONLY`, which would build it on
        // the parent alone: built on every partition instead.
        sqlx::query(sqlx::AssertSqlSafe(definition.replacen(
            " ON ONLY ",
            " ON ",
            1,
        )))
        .execute(&mut *conn)
        .await?;
        let flat = definition
            .replacen(&format!("INDEX {name} "), &format!("INDEX {name}_flat "), 1)
            .replacen("ONLY public.audit_events ", "public.audit_events_flat ", 1)
            .replacen(" public.audit_events ", " public.audit_events_flat ", 1);
        sqlx::query(sqlx::AssertSqlSafe(flat))
            .execute(&mut *conn)
            .await?;
    }
    // One statement each: several statements in one simple query run as one transaction
    // block, where VACUUM is refused.
    for table in ["audit_events", "audit_events_flat"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(&mut *conn)
            .await?;
    }
    println!(
        "built {} indexes on both and analysed them in {:.1} s (loading: {:.1} s in all, not \
         counted)\n",
        indexes.len(),
        indexed.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(start)
}

struct Figures(Vec<Duration>);

impl Figures {
    fn summary(mut self) -> String {
        self.0.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "{:>8.2} ms ({:.2}-{:.2})",
            ms(self.0[self.0.len() / 2]),
            ms(self.0[0]),
            ms(self.0[self.0.len() - 1])
        )
    }
}

/// One documented query: the `list` filters, and the same predicate on the peer.
struct Case {
    name: &'static str,
    query: ListQuery,
    peer: String,
    binds: Vec<Bind>,
}

enum Bind {
    Text(String),
    Uuid(uuid::Uuid),
    Time(OffsetDateTime),
}

async fn time_list(conn: &mut PgConnection, query: &ListQuery) -> anyhow::Result<(Figures, usize)> {
    let mut runs = Vec::with_capacity(RUNS);
    let mut found = 0;
    for run in 0..=RUNS {
        let started = Instant::now();
        let (page, _) = list(conn, query).await?;
        if run > 0 {
            runs.push(started.elapsed());
        }
        found = page.len();
    }
    Ok((Figures(runs), found))
}

async fn time_peer(
    conn: &mut PgConnection,
    case: &Case,
    after: CommitCursor,
) -> anyhow::Result<(Figures, usize)> {
    let sql = format!(
        "{PEER_SELECT}{} ORDER BY txid, id LIMIT {}",
        case.peer,
        case.query.limit.unwrap_or(100)
    );
    let mut runs = Vec::with_capacity(RUNS);
    let mut found = 0;
    for run in 0..=RUNS {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(after.txid.to_string())
            .bind(after.id);
        for bind in &case.binds {
            query = match bind {
                Bind::Text(text) => query.bind(text.clone()),
                Bind::Uuid(uuid) => query.bind(*uuid),
                Bind::Time(at) => query.bind(*at),
            };
        }
        let started = Instant::now();
        let page = query.fetch_all(&mut *conn).await?;
        if run > 0 {
            runs.push(started.elapsed());
        }
        found = page.len();
    }
    Ok((Figures(runs), found))
}

async fn queries(conn: &mut PgConnection, start: OffsetDateTime) -> anyhow::Result<()> {
    let day = start + time::Duration::days(200);
    let base = ListQuery::default();
    let mut cases = vec![
        Case {
            name: "by kind",
            query: ListQuery {
                kind: Some(AuditKind::ProvisionCreated),
                ..base.clone()
            },
            peer: " AND kind = $3".into(),
            binds: vec![Bind::Text("provision.created".into())],
        },
        Case {
            name: "by team",
            query: ListQuery {
                team_id: Some(TeamId::from_uuid(team(4242))),
                ..base.clone()
            },
            peer: " AND team_id = $3".into(),
            binds: vec![Bind::Uuid(team(4242))],
        },
        Case {
            name: "by resource",
            query: ListQuery {
                resource_id: Some(ResourceId::from_uuid(resource(77_777))),
                ..base.clone()
            },
            peer: " AND resource_id = $3".into(),
            binds: vec![Bind::Uuid(resource(77_777))],
        },
        Case {
            name: "by actor",
            query: ListQuery {
                actor: Some(Actor::parse("service:actor-7")?),
                ..base.clone()
            },
            peer: " AND actor = $3".into(),
            binds: vec![Bind::Text("service:actor-7".into())],
        },
        Case {
            name: "by request id",
            query: ListQuery {
                request_id: Some(RequestId::parse("req-123457")?),
                ..base.clone()
            },
            peer: " AND request_id = $3".into(),
            binds: vec![Bind::Text("req-123457".into())],
        },
        Case {
            name: "time range (1 h)",
            query: ListQuery {
                since: Some(day),
                until: Some(day + time::Duration::hours(1)),
                ..base.clone()
            },
            peer: " AND recorded_at >= $3 AND recorded_at < $4".into(),
            binds: vec![Bind::Time(day), Bind::Time(day + time::Duration::hours(1))],
        },
        Case {
            name: "team + time range (30 d)",
            query: ListQuery {
                team_id: Some(TeamId::from_uuid(team(4242))),
                since: Some(day),
                until: Some(day + time::Duration::days(30)),
                ..base.clone()
            },
            peer: " AND team_id = $3 AND recorded_at >= $4 AND recorded_at < $5".into(),
            binds: vec![
                Bind::Uuid(team(4242)),
                Bind::Time(day),
                Bind::Time(day + time::Duration::days(30)),
            ],
        },
    ];
    // The next page of the whole trail after a cursor in the middle of the year.
    let (middle, _) = list(
        conn,
        &ListQuery {
            since: Some(day),
            limit: Some(1),
            ..base.clone()
        },
    )
    .await?;
    let after = middle.first().map_or(CommitCursor::START, |l| l.cursor);
    cases.push(Case {
        name: "cursor page (after mid-year)",
        query: ListQuery {
            after,
            ..base.clone()
        },
        peer: String::new(),
        binds: vec![],
    });

    println!(
        "{:<30} {:>28} {:>28}  rows",
        "query (100 per page)", "partitioned: median (min-max)", "unpartitioned peer"
    );
    for case in &cases {
        let (partitioned, found) = time_list(conn, &case.query).await?;
        let (peer, peer_found) = time_peer(conn, case, case.query.after).await?;
        println!(
            "{:<30} {:>28} {:>28}  {found}{}",
            case.name,
            partitioned.summary(),
            peer.summary(),
            if found == peer_found {
                String::new()
            } else {
                format!(" (peer: {peer_found})")
            }
        );
    }
    println!("\n{RUNS} timed runs each after one warm-up; the target is < 50 ms per query.");
    Ok(())
}
