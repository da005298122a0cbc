//! `keel-audit`: tamper evidence for the audit trail.
//!
//! - `seal` (single-flight across replicas) chains the rows of finished transactions into
//!   `audit_seals` in commit order and signs a checkpoint after each batch, every
//!   `--interval-secs` (or once with `--once`). Run it as the schema's owner (or a role that may
//!   insert into `audit_seals` and `audit_checkpoints`), never as the application role.
//! - `verify` recomputes the chain from the rows, from the start or from a signed checkpoint
//!   (`--from-checkpoint N`), and names the first row changed, deleted or inserted out of band:
//!   exit 0 when the chain holds, 2 when it does not, 64 when checkpoint N does not exist, 1 on
//!   an error.
//! - `dispatch` (single-flight across replicas) delivers every customer-notification kind of
//!   the trail to `--webhook-url`, at least once, in commit order, as JSON signed with
//!   HMAC-SHA256 (`keel-event-id`, `keel-timestamp`, `keel-signature: v1=<hex>` over
//!   `"<timestamp>.<body>"`); retries with exponential backoff and jitter, dead-letters after
//!   `--max-attempts`, and audits each outcome. Runs as the application role. Serves
//!   `/metrics`, `/healthz` and `/readyz` on `--listen`.
//! - `dead-letters` lists dead-lettered notifications; `requeue` re-arms one under its event id.
//! - `list` reads the trail: filters by kind, team, resource, actor, request id and a
//!   `recorded_at` range, pages in commit order (`--after` the cursor a page prints), `--json`.
//! - `partitions ensure` creates the coming monthly partitions of `audit_events` (the sealer
//!   does too, on every run); rows of a month without one land in the default partition.
//! - `retention export | verify | detach` retires a past month as the owner: export its rows to
//!   a new file (with each row's global event UUID and seal link), verify the file against the
//!   partition and the seal chain, then detach the partition; each step is recorded and
//!   audited, and detaching refuses a month not exported and verified.
//! - `migrate`, as every binary.
//!
//! The seal signing key (at least 32 bytes, a file of at most 4096) is read from
//! `--seal-key-file` (`KEEL_AUDIT_SEAL_KEY_FILE`) and named by `--seal-key-id`
//! (`KEEL_AUDIT_SEAL_KEY_ID`); keep it out of the database and away from the owner role's
//! operators.
//!
//! A flag value that would disable or overflow the work (a batch or limit of 0, a month or a
//! time out of range, a webhook URL that could never be posted to) is a usage error (exit 64)
//! at parse time, before anything connects.

mod dispatch;
mod webhook;

use keel_service::text::printable;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use keel_audit::Actor;
use keel_audit::notify::{NotifyKey, RetryPolicy};
use keel_audit::seal::{SealKey, SealOutcome, Tampering, seal, verify};
use keel_service::cli::{DatabaseArgs, LogArgs};
use keel_service::http::HttpArgs;

use crate::dispatch::Dispatcher;
use crate::webhook::{HttpWebhook, WebhookUrl, WebhookUrlParser};

/// The process's allocator: jemalloc, which keeps freed memory for reuse across the work
/// loop's ticks and batches instead of returning and re-faulting it (`BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Months after the current one whose partitions the sealer keeps created.
const PARTITIONS_AHEAD: u32 = 3;

/// Exit code of `verify` when the chain does not hold.
const EXIT_TAMPERED: u8 = 2;

/// The most bytes a key file may hold: a key is 32 bytes to a few hundred, never more.
const MAX_KEY_FILE_BYTES: u64 = 4096;

#[derive(Parser)]
#[command(
    name = "keel-audit",
    version,
    about = "Seal and verify Keel's audit trail"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct KeyArgs {
    /// File holding the checkpoint signing key (at least 32 bytes, a file of at most 4096; a
    /// trailing newline is ignored). Never logged.
    #[arg(long, env = "KEEL_AUDIT_SEAL_KEY_FILE", value_name = "PATH")]
    seal_key_file: PathBuf,
    /// The key's id, stored with each checkpoint it signs.
    #[arg(long, env = "KEEL_AUDIT_SEAL_KEY_ID", default_value = "seal-1")]
    seal_key_id: String,
}

impl KeyArgs {
    fn load(&self) -> anyhow::Result<SealKey> {
        let bytes = read_key_file(&self.seal_key_file, "--seal-key-file")?;
        Ok(SealKey::new(&self.seal_key_id, bytes)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Chain newly committed audit rows and sign a checkpoint, periodically.
    Seal {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Seal what is committed, then exit.
        #[arg(long, env = "KEEL_AUDIT_SEAL_ONCE")]
        once: bool,
        /// Seconds between sealing runs.
        #[arg(long, env = "KEEL_AUDIT_SEAL_INTERVAL_SECS", default_value_t = 60)]
        interval_secs: u64,
        /// Most rows per batch (one checkpoint per batch), 1 to 100000.
        #[arg(
            long,
            env = "KEEL_AUDIT_SEAL_BATCH",
            default_value_t = 10_000,
            value_parser = clap::value_parser!(u32).range(1..=100_000)
        )]
        batch: u32,
    },
    /// Recompute the chain from the rows and name the first one changed, deleted or inserted.
    Verify {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Start from this signed checkpoint (its sequence number, from 1) instead of the first
        /// row. A checkpoint that does not exist is a usage error (exit 64), not tampering.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        from_checkpoint: Option<i64>,
    },
    /// Deliver customer notifications from the audit trail to a signed webhook.
    Dispatch(Box<DispatchArgs>),
    /// List dead-lettered customer notifications, newest first.
    DeadLetters {
        #[command(flatten)]
        db: DatabaseArgs,
        /// Most rows to list (1 to 10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// Only those older than this position (the last one a full page printed), to page back
        /// through every dead letter.
        #[arg(long, value_name = "POSITION", value_parser = clap::value_parser!(i64).range(1..))]
        before: Option<i64>,
        /// Only this audit kind (e.g. provision.created).
        #[arg(long, value_parser = parse_kind, value_name = "KIND")]
        kind: Option<keel_audit::AuditKind>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-arm a dead-lettered notification (same event id, attempts from zero).
    Requeue {
        #[command(flatten)]
        db: DatabaseArgs,
        /// The notification's event id (from `dead-letters`).
        #[arg(long)]
        event_id: uuid::Uuid,
        /// Who requeues it, recorded in `notification.requeued`: operator:NAME.
        #[arg(long, value_parser = parse_operator, value_name = "operator:NAME")]
        actor: Actor,
    },
    /// List audit rows in commit order, filtered.
    List(Box<ListArgs>),
    /// Monthly partitions of the trail.
    Partitions {
        #[command(subcommand)]
        command: PartitionsCommand,
    },
    /// Retire a month of the trail: export, verify, then detach (as the owner).
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Apply the embedded migrations.
    Migrate(keel_service::MigrateArgs),
}

#[derive(Subcommand)]
enum PartitionsCommand {
    /// Create the monthly partitions from this month through `--months-ahead` (as the owner).
    Ensure {
        #[command(flatten)]
        db: DatabaseArgs,
        /// How many months after the current one to create, 0 to 120 (ten years; the database
        /// refuses a range of more than 100 years).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=120))]
        months_ahead: u32,
    },
}

#[derive(Args)]
struct RetentionArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The month, YYYY-MM (UTC, from 2000 on); it must be over.
    #[arg(
        long,
        required_unless_present = "months_ago",
        conflicts_with = "months_ago",
        value_parser = parse_month,
        value_name = "YYYY-MM"
    )]
    month: Option<keel_audit::retention::Month>,
    /// The month this many months before the current one (by the database's clock), e.g. 13
    /// to retire what is older than a year (for a scheduled job); 1 to 1200.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1200))]
    months_ago: Option<u32>,
    /// Who runs the step, recorded in its audit row (e.g. operator:alice, or
    /// service:keel-audit-retention for a scheduled job).
    #[arg(long, value_parser = parse_actor, value_name = "ACTOR")]
    actor: Actor,
}

fn parse_actor(s: &str) -> Result<Actor, String> {
    Actor::parse(s).map_err(|e| e.to_string())
}

fn parse_operator(s: &str) -> Result<Actor, String> {
    Actor::operator(s).map_err(|e| e.to_string())
}

fn parse_month(s: &str) -> Result<keel_audit::retention::Month, String> {
    keel_audit::retention::Month::parse(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Write every row of a sealed, past month to a new file (one JSON object per line).
    Export {
        #[command(flatten)]
        args: RetentionArgs,
        /// The file to create (never overwritten), or a directory to create
        /// `audit_events_YYYY_MM.jsonl` in.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Check the export against the partition and the seal chain.
    Verify {
        #[command(flatten)]
        args: RetentionArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// The exported file, or the directory holding `audit_events_YYYY_MM.jsonl`.
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
    },
    /// Detach the month's partition (only after its export was verified).
    Detach {
        #[command(flatten)]
        args: RetentionArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
}

async fn run_partitions(command: PartitionsCommand) -> anyhow::Result<ExitCode> {
    match command {
        PartitionsCommand::Ensure { db, months_ahead } => {
            let pool = keel_service::connect(&db, "keel-audit-partitions", 1).await?;
            let mut conn = pool.acquire().await.context("could not connect")?;
            let created = keel_audit::retention::ensure_partitions(
                &mut conn,
                time::OffsetDateTime::now_utc(),
                months_ahead,
            )
            .await?;
            println!("created {created} monthly partitions of audit_events");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_retention(command: RetentionCommand) -> anyhow::Result<ExitCode> {
    use keel_audit::retention::{Month, detach_month, export_month, verify_export};
    let args = match &command {
        RetentionCommand::Export { args, .. }
        | RetentionCommand::Verify { args, .. }
        | RetentionCommand::Detach { args, .. } => args,
    };
    let actor = args.actor.clone();
    let pool = keel_service::connect(&args.db, "keel-audit-retention", 1).await?;
    let mut conn = pool.acquire().await.context("could not connect")?;
    // The database's clock decides whether the month is over, as for every replica.
    let now: time::OffsetDateTime = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await
        .context("could not read the database clock")?;
    let month = match (args.month, args.months_ago) {
        (Some(month), _) => month,
        (None, Some(ago)) => Month::containing(now).months_before(ago),
        (None, None) => anyhow::bail!("give --month YYYY-MM or --months-ago N"),
    };
    let in_dir = |path: &std::path::Path| {
        if path.is_dir() {
            path.join(format!("{}.jsonl", month.partition()))
        } else {
            path.to_path_buf()
        }
    };
    match &command {
        RetentionCommand::Export { out, .. } => {
            let out = &in_dir(out);
            let export = export_month(&mut conn, month, out, &actor, now).await?;
            println!(
                "exported {} rows of {month} to {}",
                export.rows,
                out.display()
            );
        }
        RetentionCommand::Verify { key, file, .. } => {
            let checked =
                verify_export(&mut conn, month, &in_dir(file), &key.load()?, &actor, now).await?;
            println!(
                "the export of {month} holds: {} rows match the partition and their seals; \
                 {} links of the chain verified",
                checked.rows, checked.links
            );
        }
        RetentionCommand::Detach { key, .. } => {
            detach_month(&mut conn, month, &key.load()?, &actor, now).await?;
            println!(
                "detached {}: its rows stay in that table until you archive or drop it",
                month.partition()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Only this kind (its wire name, e.g. provision.created).
    #[arg(long, value_parser = parse_kind, value_name = "KIND")]
    kind: Option<keel_audit::AuditKind>,
    /// Only rows about this team (UUID).
    #[arg(long)]
    team: Option<uuid::Uuid>,
    /// Only rows about this resource (UUID).
    #[arg(long)]
    resource: Option<uuid::Uuid>,
    /// Only rows by this actor.
    #[arg(long, value_parser = parse_actor, value_name = "ACTOR")]
    actor: Option<Actor>,
    /// Only rows of this request id.
    #[arg(long, value_parser = parse_request_id, value_name = "ID")]
    request_id: Option<keel_audit::RequestId>,
    /// Only rows recorded at or after this time (RFC 3339, e.g. 2026-11-30T00:00:00Z).
    #[arg(long, value_parser = parse_rfc3339, value_name = "TIME")]
    since: Option<time::OffsetDateTime>,
    /// Only rows recorded before this time (RFC 3339); after --since.
    #[arg(long, value_parser = parse_rfc3339, value_name = "TIME")]
    until: Option<time::OffsetDateTime>,
    /// Resume after this cursor (`<txid>-<id>`, printed by the previous page).
    #[arg(long, value_parser = parse_list_cursor, value_name = "CURSOR")]
    after: Option<keel_audit::postgres::CommitCursor>,
    /// Most rows per page (1 to 10000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// One JSON document: `{"events": [...], "next": "<cursor>"}`.
    #[arg(long)]
    json: bool,
}

fn parse_kind(s: &str) -> Result<keel_audit::AuditKind, String> {
    s.parse::<keel_audit::AuditKind>()
        .map_err(|e| e.to_string())
}

fn parse_request_id(s: &str) -> Result<keel_audit::RequestId, String> {
    keel_audit::RequestId::parse(s).map_err(|e| e.to_string())
}

/// An RFC 3339 time, as UTC. One whose UTC instant falls outside the years 1 to 9999 is refused:
/// the `time` crate (and so the database driver binding it) cannot hold every such instant.
fn parse_rfc3339(s: &str) -> Result<time::OffsetDateTime, String> {
    let at = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| "not an RFC 3339 time (e.g. 2026-11-30T00:00:00Z)".to_owned())?;
    at.checked_to_offset(time::UtcOffset::UTC)
        .filter(|utc| (1..=9999).contains(&utc.year()))
        .ok_or_else(|| {
            "out of range: an RFC 3339 time must fall in the years 0001 to 9999 in UTC".to_owned()
        })
}

fn parse_list_cursor(s: &str) -> Result<keel_audit::postgres::CommitCursor, String> {
    keel_audit::list::parse_cursor(s).map_err(|e| e.to_string())
}

async fn run_list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    use keel_audit::list::{ListQuery, format_cursor, list};
    if let (Some(since), Some(until)) = (args.since, args.until)
        && since >= until
    {
        eprintln!("error: --since must be before --until (the span would hold no row)");
        return Ok(ExitCode::from(keel_service::cli::EXIT_USAGE));
    }
    let query = ListQuery {
        kind: args.kind,
        team_id: args.team.map(keel_audit::TeamId::from_uuid),
        resource_id: args.resource.map(keel_audit::ResourceId::from_uuid),
        actor: args.actor.clone(),
        request_id: args.request_id.clone(),
        since: args.since,
        until: args.until,
        after: args
            .after
            .unwrap_or(keel_audit::postgres::CommitCursor::START),
        limit: Some(args.limit),
    };
    let pool = keel_service::connect(&args.db, "keel-audit-list", 1).await?;
    let mut conn = pool.acquire().await.context("could not connect")?;
    let (rows, next) = list(&mut conn, &query).await?;
    let time = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let mut events = Vec::with_capacity(rows.len());
    for listed in &rows {
        let cursor = format_cursor(listed.cursor);
        match &listed.row {
            Ok(stored) => {
                let event = &stored.event;
                if args.json {
                    let attributes: serde_json::Map<String, serde_json::Value> = event
                        .attributes()
                        .iter()
                        .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
                        .collect();
                    events.push(serde_json::json!({
                        "cursor": cursor,
                        "id": stored.id.0,
                        "kind": event.kind().as_str(),
                        "actor": event.actor().as_str(),
                        "team_id": event.team_id().map(|t| t.as_uuid()),
                        "resource_id": event.resource_id().map(|r| r.as_uuid()),
                        "request_id": event.request_id().map(|r| r.as_str()),
                        "occurred_at": time(event.occurred_at()),
                        "recorded_at": time(stored.recorded_at),
                        "attributes": attributes,
                    }));
                } else {
                    let attributes: Vec<String> = event
                        .attributes()
                        .iter()
                        .map(|(k, v)| format!("{}={}", printable(k), printable(v)))
                        .collect();
                    println!(
                        "{}  {}  {}  actor={}  team={}  resource={}  request={}  {}",
                        time(stored.recorded_at),
                        stored.id.0,
                        event.kind(),
                        printable(event.actor().as_str()),
                        event
                            .team_id()
                            .map_or("-".to_owned(), |t| t.as_uuid().to_string()),
                        event
                            .resource_id()
                            .map_or("-".to_owned(), |r| r.as_uuid().to_string()),
                        printable(event.request_id().map_or("-", |r| r.as_str())),
                        attributes.join(" "),
                    );
                }
            }
            Err(e) => {
                if args.json {
                    events.push(serde_json::json!({ "cursor": cursor, "error": e.to_string() }));
                } else {
                    println!("{cursor}  unreadable: {}", printable(&e.to_string()));
                }
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "events": events, "next": format_cursor(next) })
        );
    } else if rows.is_empty() {
        println!("no audit rows match");
    } else {
        println!("next page: --after {}", format_cursor(next));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct DispatchArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// The receiver's URL (https://, or http:// inside the cluster). Never logged, nor quoted
    /// when refused; it may carry a token in its query, never user:password@.
    #[arg(
        long,
        env = "KEEL_AUDIT_WEBHOOK_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = WebhookUrlParser
    )]
    webhook_url: WebhookUrl,
    /// File holding the HMAC-SHA256 signing key shared with the receiver (at least 32 bytes, a
    /// file of at most 4096; a trailing newline is ignored). Never logged.
    #[arg(long, env = "KEEL_AUDIT_NOTIFY_KEY_FILE", value_name = "PATH")]
    signing_key_file: PathBuf,
    /// Attempts before a notification is dead-lettered, 1 to 10000.
    #[arg(
        long,
        env = "KEEL_AUDIT_NOTIFY_MAX_ATTEMPTS",
        default_value_t = 12,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    max_attempts: u32,
    /// First retry backoff, in milliseconds (doubling per attempt, with jitter), 1 to 3600000
    /// (an hour).
    #[arg(
        long,
        env = "KEEL_AUDIT_NOTIFY_BASE_BACKOFF_MS",
        default_value_t = 5_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000)
    )]
    base_backoff_ms: u64,
    /// Longest retry backoff, in seconds, 1 to 604800 (a week).
    #[arg(
        long,
        env = "KEEL_AUDIT_NOTIFY_MAX_BACKOFF_SECS",
        default_value_t = 3_600,
        value_parser = clap::value_parser!(u64).range(1..=7 * 86_400)
    )]
    max_backoff_secs: u64,
    /// Pause between passes when nothing is due, in milliseconds, 10 to 3600000 (an hour).
    #[arg(
        long,
        env = "KEEL_AUDIT_NOTIFY_POLL_MS",
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u64).range(10..=3_600_000)
    )]
    poll_ms: u64,
    /// Seconds to wait for the receiver's answer, 1 to 300.
    #[arg(
        long,
        env = "KEEL_AUDIT_NOTIFY_TIMEOUT_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    request_timeout_secs: u64,
    /// Audit rows per ingest, and deliveries per pass, 1 to 1000.
    #[arg(
        long,
        env = "KEEL_AUDIT_NOTIFY_BATCH",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    batch: u32,
    /// Deliver what is due, then exit (no listener).
    #[arg(long)]
    once: bool,
}

/// Reads the key file `flag` names, trailing newlines dropped. Reads at most
/// [`MAX_KEY_FILE_BYTES`] and one more, so a larger file (a wrong path, a device) is refused
/// without being read whole; no error shows the file's content.
fn read_key_file(path: &std::path::Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let could_not_read = || format!("could not read the file {flag} names ({})", path.display());
    let file = std::fs::File::open(path).with_context(could_not_read)?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(could_not_read)?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        anyhow::bail!(
            "the file {flag} names ({}) holds more than {MAX_KEY_FILE_BYTES} bytes: a key file \
             holds the key alone (its content is not shown)",
            path.display()
        );
    }
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

async fn run_dispatcher(args: &DispatchArgs) -> anyhow::Result<ExitCode> {
    let key = NotifyKey::new(read_key_file(&args.signing_key_file, "--signing-key-file")?)?;
    let webhook = HttpWebhook::new(
        &args.webhook_url,
        Duration::from_secs(args.request_timeout_secs),
    )?;
    let dispatcher = Dispatcher {
        webhook,
        key,
        policy: RetryPolicy {
            max_attempts: args.max_attempts,
            base_backoff: Duration::from_millis(args.base_backoff_ms),
            max_backoff: Duration::from_secs(args.max_backoff_secs),
        },
        batch: args.batch,
        poll: Duration::from_millis(args.poll_ms),
        once: args.once,
    };
    let pool = keel_service::connect(&args.db, "keel-audit-dispatch", 2).await?;
    let shutdown = keel_service::shutdown::on_signal()?;
    let (registry, metrics) = dispatch::registry();
    let http = if args.once {
        None
    } else {
        let listener = keel_service::http::bind(args.http.listen)
            .await
            .with_context(|| format!("could not listen on {}", args.http.listen))?;
        // Its own stop: /metrics keeps answering while the dispatcher drains (FND-16).
        Some(keel_service::http::OpsServer::spawn_with_readiness(
            listener,
            registry,
            keel_service::http::Readiness::new(pool.clone()),
        ))
    };
    tracing::info!(listen = %args.http.listen, "notification dispatcher started");
    dispatcher.run(&pool, &metrics, &shutdown).await?;
    shutdown.cancel();
    if let Some(http) = http {
        http.stop().await.context("the metrics listener failed")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli: Cli = keel_service::cli::parse();
    keel_service::run(&cli.log, async move {
        match cli.command {
            Command::Migrate(args) => keel_service::migrate(&args).await,
            Command::Dispatch(args) => run_dispatcher(&args).await,
            Command::List(args) => run_list(&args).await,
            Command::Partitions { command } => run_partitions(command).await,
            Command::Retention { command } => run_retention(command).await,
            Command::DeadLetters {
                db,
                limit,
                before,
                kind,
                json,
            } => {
                let pool = keel_service::connect(&db, "keel-audit-dead-letters", 1).await?;
                let mut conn = pool.acquire().await.context("could not connect")?;
                let page = keel_audit::notify::DeadLetterPage {
                    before,
                    kind,
                    limit,
                };
                let rows = keel_audit::notify::dead_letters(&mut conn, &page).await?;
                for row in &rows {
                    let when = row.dead_lettered_at.and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    });
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "position": row.seq,
                                "event_id": row.event_id,
                                "audit_id": row.audit_id,
                                "kind": row.kind,
                                "template": row.template,
                                "attempts": row.attempts,
                                "last_outcome": row.last_outcome,
                                "dead_lettered_at": when,
                            })
                        );
                    } else {
                        println!(
                            "{}  {}  {}  audit row {}  {} attempts  last {}  dead since {}",
                            row.seq,
                            row.event_id,
                            printable(&row.template),
                            row.audit_id,
                            row.attempts,
                            printable(row.last_outcome.as_deref().unwrap_or("-")),
                            when.as_deref().unwrap_or("-"),
                        );
                    }
                }
                // A full page: older ones may follow, reached from the last position listed.
                if rows.len() == usize::try_from(limit).unwrap_or(usize::MAX)
                    && let Some(last) = rows.last()
                {
                    eprintln!(
                        "{limit} listed, newest first; older dead letters may follow: add --before {}",
                        last.seq
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Requeue {
                db,
                event_id,
                actor,
            } => {
                let pool = keel_service::connect(&db, "keel-audit-requeue", 1).await?;
                let mut conn = pool.acquire().await.context("could not connect")?;
                if keel_audit::notify::requeue(&mut conn, event_id, &actor).await? {
                    println!("requeued {event_id}");
                    Ok(ExitCode::SUCCESS)
                } else {
                    eprintln!("no dead-lettered notification has the event id {event_id}");
                    Ok(ExitCode::from(EXIT_TAMPERED - 1))
                }
            }
            Command::Seal {
                db,
                key,
                once,
                interval_secs,
                batch,
            } => run_sealer(&db, &key.load()?, once, interval_secs, batch).await,
            Command::Verify {
                db,
                key,
                from_checkpoint,
            } => {
                let key = key.load()?;
                let pool = keel_service::connect(&db, "keel-audit-verify", 1).await?;
                let mut conn = pool.acquire().await.context("could not connect")?;
                let found = verify(&mut conn, &key, from_checkpoint).await?;
                if let Some(Tampering::NoSuchCheckpoint { seq }) = &found.tampering {
                    // A mistyped number, not evidence: nothing was verified.
                    eprintln!(
                        "error: no checkpoint {seq}: --from-checkpoint takes the position of a \
                         checkpoint in audit_checkpoints (or leave it out to verify from the \
                         first row)"
                    );
                    return Ok(ExitCode::from(keel_service::cli::EXIT_USAGE));
                }
                match &found.tampering {
                    None => {
                        println!(
                            "the audit trail holds: {} links, {} signed checkpoints, {} links \
                             of detached months",
                            found.links, found.checkpoints, found.retired
                        );
                        Ok(ExitCode::SUCCESS)
                    }
                    Some(tampering) => {
                        tracing::error!(%tampering, "the audit trail was tampered with");
                        println!("TAMPERED: {tampering}");
                        Ok(ExitCode::from(EXIT_TAMPERED))
                    }
                }
            }
        }
    })
}

async fn run_sealer(
    db: &DatabaseArgs,
    key: &SealKey,
    once: bool,
    interval_secs: u64,
    batch: u32,
) -> anyhow::Result<ExitCode> {
    let pool = keel_service::connect(db, "keel-audit-seal", 1).await?;
    let shutdown = keel_service::shutdown::on_signal()?;
    loop {
        let mut conn = pool.acquire().await.context("could not connect")?;
        // The coming months' partitions, ahead of time (the default partition takes any row
        // whose month has none, so this never blocks an insert).
        match keel_audit::retention::ensure_partitions(
            &mut conn,
            time::OffsetDateTime::now_utc(),
            PARTITIONS_AHEAD,
        )
        .await
        {
            Ok(0) => {}
            Ok(created) => tracing::info!(created, "created monthly audit partitions"),
            Err(e) => tracing::warn!(error = %e, "could not create the coming audit partitions"),
        }
        loop {
            match seal(&mut conn, key, batch).await? {
                SealOutcome::Sealed { rows, last_seq } => {
                    tracing::info!(rows, last_seq, "sealed audit rows and signed a checkpoint");
                }
                SealOutcome::UpToDate => break,
                SealOutcome::Busy => {
                    tracing::info!("another sealer holds the lock; skipping this run");
                    break;
                }
                SealOutcome::KeyMismatch { checkpoint } => {
                    tracing::error!(
                        checkpoint,
                        key_id = key.id(),
                        "the seal key does not verify the newest checkpoint signed under its id: \
                         the key was replaced under the same id; nothing was sealed. Give the new \
                         key an id of its own (--seal-key-id) and keep the old one for verify"
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        drop(conn);
        if once {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(Duration::from_secs(interval_secs.max(1))) => {}
        }
    }
}
