//! `keel-propagation-runner`: runs due propagations across replicas — applied, retrying or
//! dead-lettered, never silently skipped.
//!
//! Subcommands: `run` (the default; `--once` drains what is due and exits), `reconcile` (one
//! entitlement-reconciler pass), `dead-letters list|requeue`, `deferred list`, `enqueue`,
//! `prune`, and `migrate`. While running it serves `/metrics` and `/healthz`, and its
//! housekeeping (single-flight across replicas) keeps the queue and deferral gauges, runs the
//! reconciler, dead-letters rows no runner could read within the grace, and prunes finished
//! rows; if that housekeeping task dies, the runner drains and exits 1 (logged at ERROR), to be
//! restarted. Every flag has an environment variable.

use keel_service::text::printable;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_audit::{Actor, ResourceId, ResourceType, TeamId, Tier};
use keel_propagation::kube::{KubeQuotaApplier, TierQuotas};
use keel_propagation::postgres::{
    EnqueueRequest, Housekeeping, HousekeepingSchedule, PgPropagationStore, PgRoleApplier,
    RequeueReason, RequeueTarget, Retention, TierRoleSettings, listen_for_wakeups,
    run_housekeeping,
};
use keel_propagation::runner::{LeaseError, Runner, RunnerConfig};
use keel_propagation::{
    ByResourceType, Metrics, Payload, PropagationId, PropagationKind, WorkerId,
};
use keel_service::cli::{DatabaseArgs, DatabaseUrl, LogArgs};
use keel_service::http::HttpArgs;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The process's allocator: jemalloc, which keeps freed memory for reuse across the work
/// loop's ticks and batches instead of returning and re-faulting it (`BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs due propagations across replicas: applied, retrying or dead-lettered, never silently skipped.
#[derive(Parser)]
#[command(name = "keel-propagation-runner", version, after_help = keel_service::cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Claim and apply due propagations until SIGTERM (the default), or once with --once.
    Run(RunArgs),
    /// One entitlement-reconciler pass: enqueue a propagation for every drifted resource. Exits
    /// 75 when another replica's pass holds the reconciler's lock (nothing was checked).
    Reconcile(DatabaseArgs),
    /// Inspect or requeue dead-lettered propagations.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Enqueue (or coalesce) one tier elevation, validated and audited (propagation.enqueued).
    Enqueue(EnqueueArgs),
    /// Inspect rows this build cannot run (unknown kind, resource type or payload version).
    #[command(subcommand)]
    Deferred(Deferred),
    /// Delete finished rows past their retention, in bounded batches (audit rows are kept).
    Prune(PruneArgs),
    /// Apply the embedded database migrations and exit.
    Migrate(keel_service::MigrateArgs),
}

/// Whether this runner applies `namespace` and `redis` resources (through Kubernetes).
/// `postgres` resources always go to the role applier: each row is routed by its own
/// resource type, never by a deployment-wide choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kubernetes {
    /// Use Kubernetes when a client can be configured (in-cluster or KUBECONFIG); otherwise
    /// warn, and namespace/redis rows retry as unexpected skips until a runner that has it
    /// takes them.
    Auto,
    /// Require a Kubernetes client; refuse to start without one.
    Required,
    /// Never use Kubernetes (namespace/redis rows retry as unexpected skips, loudly).
    Disabled,
}

#[derive(Args)]
struct RetentionArgs {
    /// Days applied rows are kept, 1 to 36500 (a century).
    #[arg(long, env = "KEEL_RETAIN_APPLIED_DAYS", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    retain_applied_days: u32,
    /// Days dead-lettered rows are kept (while kept, they hold the reconciler back for their
    /// tier change), 1 to 36500 (a century).
    #[arg(long, env = "KEEL_RETAIN_DEAD_LETTERED_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    retain_dead_lettered_days: u32,
}

impl RetentionArgs {
    fn retention(&self) -> Retention {
        Retention {
            applied: time::Duration::days(i64::from(self.retain_applied_days)),
            dead_lettered: time::Duration::days(i64::from(self.retain_dead_lettered_days)),
        }
    }
}

#[derive(Args)]
struct PruneArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    retention: RetentionArgs,
    /// Rows deleted per statement.
    #[arg(long, env = "KEEL_PRUNE_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
}

#[derive(Subcommand)]
enum Deferred {
    /// List rows left for a newer runner, oldest first.
    List {
        #[command(flatten)]
        db: DatabaseArgs,
        /// At most this many, 1 to 10000.
        #[arg(long, env = "KEEL_LIMIT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// One JSON document instead of a table.
        #[arg(long, env = "KEEL_JSON")]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// Drain what is due now, then exit.
    #[arg(long, env = "KEEL_RUN_ONCE")]
    once: bool,
    /// This replica's id in claimed_by (defaults to $HOSTNAME, the pod name).
    #[arg(long, env = "KEEL_WORKER_ID")]
    worker_id: Option<String>,
    /// Whether namespace and redis resources are applied through Kubernetes.
    #[arg(long, env = "KEEL_KUBERNETES", value_enum, default_value_t = Kubernetes::Auto)]
    kubernetes: Kubernetes,
    /// The shared customer Postgres cluster for the role applier (defaults to --database-url;
    /// either way the applier gets its own pool, of at most --cluster-max-connections).
    #[arg(
        long,
        env = "KEEL_CLUSTER_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    cluster_database_url: Option<DatabaseUrl>,
    /// Connections the role applier opens to the shared customer cluster (1 to 1,000; default
    /// 8): at most this many applies talk to it at once, whatever --batch-size is, so a large
    /// batch never takes the connections the cluster's customers need. An apply that waits for
    /// one past half its timeout is given back without spending an attempt.
    #[arg(long, env = "KEEL_CLUSTER_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    cluster_max_connections: u32,
    /// Rows claimed per batch, which is also how many applies run at once.
    #[arg(long, env = "KEEL_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// Seconds a claim is held before another replica may take the row over; it must exceed
    /// --apply-timeout-seconds + --shutdown-grace-seconds + 10 (checked before connecting), and
    /// be at most a day (86400).
    #[arg(long, env = "KEEL_LEASE_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    lease_seconds: u32,
    /// Seconds one apply may take.
    #[arg(long, env = "KEEL_APPLY_TIMEOUT_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    apply_timeout_seconds: u32,
    /// Seconds between polls when no notification arrives.
    #[arg(long, env = "KEEL_POLL_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    poll_seconds: u32,
    /// Seconds in-flight applies get after SIGTERM before their rows are released.
    #[arg(long, env = "KEEL_SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    shutdown_grace_seconds: u32,
    /// Seconds between entitlement-reconciler passes while running (0: never).
    #[arg(long, env = "KEEL_RECONCILE_SECONDS", default_value_t = 300)]
    reconcile_seconds: u32,
    /// Seconds a row no runner can read (unknown kind, resource type or payload version) may
    /// wait before it is dead-lettered as unsupported.
    #[arg(long, env = "KEEL_UNSUPPORTED_GRACE_SECONDS", default_value_t = 6 * 3600, value_parser = clap::value_parser!(u32).range(60..))]
    unsupported_grace_seconds: u32,
    #[command(flatten)]
    retention: RetentionArgs,
}

#[derive(Subcommand)]
enum DeadLetters {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        db: DatabaseArgs,
        /// Only this kind.
        #[arg(long, env = "KEEL_PROPAGATION_KIND", value_parser = parse_kind)]
        kind: Option<PropagationKind>,
        /// At most this many, 1 to 10000.
        #[arg(long, env = "KEEL_LIMIT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// One JSON document instead of a table.
        #[arg(long, env = "KEEL_JSON")]
        json: bool,
    },
    /// Make dead letters pending again with a fresh budget (writes propagation.requeued).
    Requeue {
        #[command(flatten)]
        db: DatabaseArgs,
        /// One dead letter, by id.
        #[arg(
            long,
            env = "KEEL_PROPAGATION_ID",
            conflicts_with = "kind",
            required_unless_present = "kind"
        )]
        id: Option<i64>,
        /// Every dead letter of this kind.
        #[arg(long, env = "KEEL_PROPAGATION_KIND", value_parser = parse_kind)]
        kind: Option<PropagationKind>,
        /// Who is requeueing, for the audit trail (e.g. operator:alice).
        #[arg(long, env = "KEEL_ACTOR", value_parser = parse_actor)]
        actor: Actor,
        /// Why, for the audit trail (1 to 200 characters; the console asks for the same).
        #[arg(long, env = "KEEL_REQUEUE_REASON", value_parser = parse_reason)]
        reason: RequeueReason,
    },
}

#[derive(Args)]
struct EnqueueArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The team whose entitlement this carries.
    #[arg(long, env = "KEEL_TEAM_ID", value_parser = parse_id::<TeamId>)]
    team_id: TeamId,
    /// The resource to apply it to.
    #[arg(long, env = "KEEL_RESOURCE_ID", value_parser = parse_id::<ResourceId>)]
    resource_id: ResourceId,
    /// The resource's type.
    #[arg(long, env = "KEEL_RESOURCE_TYPE", value_parser = parse_resource_type)]
    resource_type: ResourceType,
    /// The tier to apply (must be the team's current tier).
    #[arg(long, env = "KEEL_TARGET_TIER", value_parser = parse_tier)]
    target_tier: Tier,
    /// Who is enqueueing, for the audit trail (e.g. operator:alice).
    #[arg(long, env = "KEEL_ACTOR", value_parser = parse_actor)]
    actor: Actor,
}

fn parse_kind(s: &str) -> Result<PropagationKind, String> {
    s.parse().map_err(|e| format!("{e}"))
}
/// An operator actor, `operator:NAME`: a requeue is an operator's act, so the audit row must
/// not name the API, the system or a bare string.
fn parse_actor(s: &str) -> Result<Actor, String> {
    Actor::operator(s).map_err(|e| e.to_string())
}
fn parse_reason(s: &str) -> Result<RequeueReason, String> {
    RequeueReason::parse(s).map_err(|e| e.to_string())
}
fn parse_tier(s: &str) -> Result<Tier, String> {
    Tier::parse(s).map_err(|e| e.to_string())
}
fn parse_resource_type(s: &str) -> Result<ResourceType, String> {
    s.parse().map_err(|e| format!("{e}"))
}
fn parse_id<T: std::str::FromStr<Err = keel_audit::InvalidId>>(s: &str) -> Result<T, String> {
    s.parse().map_err(|e: keel_audit::InvalidId| e.to_string())
}

/// The appliers: each row goes to the one for its own resource type.
type Routed = ByResourceType<PgRoleApplier, KubeQuotaApplier>;

fn main() -> ExitCode {
    let cli: Cli = keel_service::cli::parse();
    let command = match cli.command {
        Some(command) => command,
        // `run` is the default; its flags then come from the environment.
        None => {
            match keel_service::cli::try_parse_from::<RunOnly, _, _>(["keel-propagation-runner"]) {
                Ok(run) => Command::Run(run.args),
                Err(exit) => return keel_service::cli::report(exit),
            }
        }
    };
    keel_service::run(&cli.log, async move {
        match command {
            Command::Run(args) => run(args).await,
            Command::Reconcile(db) => reconcile(db).await,
            Command::DeadLetters(cmd) => dead_letters(cmd).await,
            Command::Enqueue(args) => enqueue(args).await,
            Command::Deferred(cmd) => deferred(cmd).await,
            Command::Prune(args) => prune(args).await,
            Command::Migrate(db) => keel_service::migrate(&db).await,
        }
    })
}

/// `run` with no subcommand given: flags from the environment only.
#[derive(Parser)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

async fn store(db: &DatabaseArgs, connections: u32) -> anyhow::Result<PgPropagationStore> {
    Ok(PgPropagationStore::new(
        keel_service::connect(db, "keel-propagation-runner", connections).await?,
    ))
}

/// The runner's timing flags as a configuration for `worker`, or a usage error naming the flags
/// when the lease would not outlast an apply ([`RunnerConfig::check`]).
fn runner_config(args: &RunArgs, worker: WorkerId) -> Result<RunnerConfig, String> {
    let mut config = RunnerConfig::new(worker);
    config.batch_size = args.batch_size;
    config.lease = std::time::Duration::from_secs(u64::from(args.lease_seconds));
    config.apply_timeout = Duration::from_secs(u64::from(args.apply_timeout_seconds));
    config.poll_interval = Duration::from_secs(u64::from(args.poll_seconds));
    config.shutdown_grace = Duration::from_secs(u64::from(args.shutdown_grace_seconds));
    config.check().map_err(|e| match e {
        LeaseError::TooShort(e) => format!(
            "--lease-seconds must exceed --apply-timeout-seconds + --shutdown-grace-seconds + 10: \
             {e}"
        ),
        LeaseError::TooLong { .. } => format!("--lease-seconds is too long: {e}"),
        other => format!("--lease-seconds: {other}"),
    })?;
    Ok(config)
}

/// The longest worker id given or taken from the host: a worker id is at most 64 characters,
/// and the per-process suffix takes 7.
const WORKER_BASE_MAX: usize = 57;

fn worker_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

fn worker_base_is_valid(base: &str) -> bool {
    (1..=WORKER_BASE_MAX).contains(&base.chars().count()) && base.chars().all(worker_char)
}

/// The worker id's base from the host name: its characters a worker id may hold, the last
/// [`WORKER_BASE_MAX`] of them; `keel-runner-<pid>` when none is left.
fn worker_base_from_host(hostname: Option<&str>) -> String {
    let usable: Vec<char> = hostname
        .unwrap_or("")
        .chars()
        .filter(|c| worker_char(*c))
        .collect();
    let tail: String = usable[usable.len().saturating_sub(WORKER_BASE_MAX)..]
        .iter()
        .collect();
    if tail.is_empty() {
        format!("keel-runner-{}", std::process::id())
    } else {
        tail
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // A per-process suffix keeps two processes in one pod (a `kubectl exec … run --once` beside
    // the running replica) from sharing an identity, which the completion fence relies on.
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let base = match &args.worker_id {
        // Given: it must be a worker id as it is, or it is a usage error.
        Some(given) if worker_base_is_valid(given) => given.clone(),
        Some(_) => {
            eprintln!(
                "error: --worker-id / KEEL_WORKER_ID must be 1 to {WORKER_BASE_MAX} characters \
                 of [A-Za-z0-9._:-] (a 7-character per-process suffix is added)"
            );
            return Ok(ExitCode::from(keel_service::EXIT_USAGE));
        }
        // Taken from the host: a pod name may be up to 63 characters, so its tail (where a
        // pod's unique part is) is kept.
        None => worker_base_from_host(std::env::var("HOSTNAME").ok().as_deref()),
    };
    let worker = WorkerId::parse(&format!("{base}-{suffix}"))
        .context("the worker id made from the host name is not valid")?;
    // Before connecting: a lease that would not outlast an apply is a usage error.
    let config = match runner_config(&args, worker) {
        Ok(config) => config,
        Err(why) => {
            eprintln!("error: {why}");
            return Ok(ExitCode::from(keel_service::EXIT_USAGE));
        }
    };
    let store = Arc::new(store(&args.db, 8).await?);
    let applier = Arc::new(build_applier(&args).await?);

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let runner = Runner::new(Arc::clone(&store), applier, metrics.clone(), config)?;
    let shutdown =
        keel_service::shutdown::on_signal().context("could not install signal handlers")?;

    if args.once {
        let report = runner.drain(&shutdown).await?;
        tracing::info!(
            claimed = report.claimed,
            applied = report.applied,
            retried = report.retried,
            unexpected_skips = report.unexpected_skips,
            dead_lettered = report.dead_lettered,
            stale = report.stale,
            released = report.released,
            "drained due propagations"
        );
        println!("{}", serde_json::to_string(&report_json(&report))?);
        return Ok(ExitCode::SUCCESS);
    }

    let listener = keel_service::http::bind(args.http.listen)
        .await
        .with_context(|| format!("could not listen on {}", args.http.listen))?;
    tracing::info!(listen = %args.http.listen, worker = %runner.config().worker, "propagation runner started");
    // Its own stop: /metrics keeps answering while the runner drains (FND-16).
    let http = keel_service::http::OpsServer::spawn_with_readiness(
        listener,
        Arc::new(registry),
        keel_service::http::Readiness::new(store.pool().clone()),
    );
    let wake = Arc::new(tokio::sync::Notify::new());
    let wakeups = match listen_for_wakeups(store.pool().clone(), Arc::clone(&wake)).await {
        Ok(handle) => Some(warn_when_wakeups_end(handle, args.poll_seconds)),
        Err(e) => {
            // E.g. behind a transaction-pooling proxy, where LISTEN does not work: poll instead.
            tracing::warn!(error = %e, poll_seconds = args.poll_seconds, "no LISTEN/NOTIFY wake-ups; polling only");
            None
        }
    };
    // Supervised: if housekeeping dies, nothing reconciles, settles or prunes again, so the
    // runner drains and exits 1 to be restarted rather than running on without it.
    let housekeeping = keel_service::supervise::spawn("housekeeping", shutdown.clone(), {
        let pass = housekeeping(
            Arc::clone(&store),
            metrics,
            args.reconcile_seconds,
            Housekeeping {
                unsupported_grace: time::Duration::seconds(i64::from(
                    args.unsupported_grace_seconds,
                )),
                retention: args.retention.retention(),
                prune_batch: 1000,
                actor: runner.config().actor.clone(),
            },
            shutdown.clone(),
        );
        async move {
            pass.await;
            Ok(())
        }
    });

    // Returns on SIGTERM/SIGINT, or once a dead housekeeping task cancelled `shutdown`.
    runner.run(wake, shutdown.clone()).await;
    if let Some(wakeups) = wakeups {
        wakeups.abort();
    }
    let housekeeping = housekeeping.stop().await;
    let _ = http.stop().await;
    tracing::info!("propagation runner stopped");
    housekeeping?;
    Ok(ExitCode::SUCCESS)
}

/// Watches the LISTEN wake-up task: it only ends if it panicked, and the runner still polls
/// every `--poll-seconds`, so its end is logged at WARN and the runner keeps running. The
/// handle returned stops it at shutdown.
fn warn_when_wakeups_end(
    wakeups: tokio::task::JoinHandle<()>,
    poll_seconds: u32,
) -> tokio::task::AbortHandle {
    let abort = wakeups.abort_handle();
    tokio::spawn(async move {
        match wakeups.await {
            // Stopped at shutdown.
            Err(e) if e.is_cancelled() => {}
            // Never the panic's payload: the panic hook printed it already.
            Ok(()) | Err(_) => tracing::warn!(
                poll_seconds,
                "the LISTEN/NOTIFY wake-up task ended; polling only"
            ),
        }
    });
    abort
}

async fn build_applier(args: &RunArgs) -> anyhow::Result<Routed> {
    // The role applier never shares the store's pool, and opens at most
    // --cluster-max-connections to the shared cluster (never more than a batch can use):
    // waiting for one is bounded well inside the apply timeout, and an apply that could not get
    // one is given back uncharged.
    let cluster_url = args
        .cluster_database_url
        .as_ref()
        .unwrap_or(&args.db.database_url);
    let acquire =
        Duration::from_secs(u64::from(args.apply_timeout_seconds.div_ceil(2)).clamp(1, 10));
    let cluster = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.cluster_max_connections.min(args.batch_size.max(2)))
        .min_connections(0)
        .acquire_timeout(acquire)
        .connect_lazy_with(
            PgRoleApplier::cluster_options(cluster_url.connect_options()?)
                .application_name("keel-propagation-runner-applier"),
        );
    let role = PgRoleApplier::new(cluster, TierRoleSettings::standard());
    let kubernetes = match args.kubernetes {
        Kubernetes::Disabled => None,
        Kubernetes::Auto | Kubernetes::Required => match kube::Client::try_default().await {
            Ok(client) => Some(KubeQuotaApplier::new(client, TierQuotas::standard())),
            Err(e) if args.kubernetes == Kubernetes::Auto => {
                tracing::warn!(error = %e, "no Kubernetes client: namespace and redis propagations retry as unexpected skips on this runner");
                None
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(
                    "could not configure a Kubernetes client (in-cluster or KUBECONFIG)",
                ));
            }
        },
    };
    Ok(ByResourceType {
        postgres: Some(role),
        kubernetes,
    })
}

/// Every 15 s a housekeeping pass (gauges, unsupported rows, retention) and, if enabled, the
/// entitlement reconciler.
async fn housekeeping(
    store: Arc<PgPropagationStore>,
    metrics: Metrics,
    reconcile_seconds: u32,
    plan: Housekeeping,
    shutdown: CancellationToken,
) {
    let reconcile_every =
        (reconcile_seconds > 0).then(|| Duration::from_secs(u64::from(reconcile_seconds)));
    let schedule = HousekeepingSchedule::new(Duration::from_secs(15), reconcile_every);
    run_housekeeping(&store, &metrics, &plan, schedule, &shutdown).await;
}

fn report_json(report: &keel_propagation::runner::BatchReport) -> serde_json::Value {
    serde_json::json!({
        "claimed": report.claimed,
        "applied": report.applied,
        "retried": report.retried,
        "unexpected_skips": report.unexpected_skips,
        "dead_lettered": report.dead_lettered,
        "stale": report.stale,
        "released": report.released,
        "not_attempted": report.not_attempted,
        "unrecorded": report.unrecorded,
    })
}

async fn reconcile(db: DatabaseArgs) -> anyhow::Result<ExitCode> {
    let store = store(&db, 2).await?;
    let Some(enqueued) = store.try_reconcile(store.db_now().await?).await? else {
        // Said, not passed off as "no drift".
        eprintln!(
            "error: another replica holds the reconciler's lock and is reconciling now; this \
             call checked nothing; run it again later"
        );
        return Ok(ExitCode::from(EXIT_BUSY));
    };
    for (id, resource) in &enqueued {
        println!("enqueued propagation {id} for resource {resource}");
    }
    println!("{} drifted resource(s) enqueued", enqueued.len());
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters(cmd: DeadLetters) -> anyhow::Result<ExitCode> {
    match cmd {
        DeadLetters::List {
            db,
            kind,
            limit,
            json,
        } => {
            let letters = store(&db, 2).await?.dead_letters(kind, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else if letters.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:<8} {:<16} {:<36} {:<10} {:<8} {:<20} LAST ERROR",
                    "ID", "KIND", "RESOURCE", "TYPE", "TIER", "DEAD-LETTERED"
                );
                for l in letters {
                    println!(
                        "{:<8} {:<16} {:<36} {:<10} {:<8} {:<20} {}",
                        l.id,
                        printable(&l.kind),
                        l.resource_id,
                        printable(&l.resource_type),
                        printable(l.target_tier.as_deref().unwrap_or("-")),
                        l.dead_lettered_at.date().to_string()
                            + " "
                            + &l.dead_lettered_at.time().to_string(),
                        printable(l.last_error.as_deref().unwrap_or("-"))
                    );
                }
            }
        }
        DeadLetters::Requeue {
            db,
            id,
            kind,
            actor,
            reason,
        } => {
            let target = match (id, kind) {
                (Some(id), _) => RequeueTarget::One(PropagationId(id)),
                (None, Some(kind)) => RequeueTarget::AllOfKind(kind),
                (None, None) => bail!("give --id or --kind"),
            };
            let store = store(&db, 2).await?;
            let report = store
                .requeue(target, &actor, &reason, store.db_now().await?)
                .await?;
            for id in &report.requeued {
                println!("requeued propagation {id}");
            }
            for id in &report.skipped_open {
                println!(
                    "left propagation {id} dead-lettered: its resource already has a pending propagation"
                );
            }
            for id in &report.skipped_superseded {
                println!("left propagation {id} dead-lettered: a newer target superseded it");
            }
            for (id, why) in &report.skipped_unrecordable {
                println!(
                    "left propagation {id} dead-lettered: its audit row cannot be written ({why}); repair the row"
                );
            }
            println!(
                "{} requeued, {} left alone",
                report.requeued.len(),
                report.left_alone()
            );
            if !report.skipped_unrecordable.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn enqueue(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let request = EnqueueRequest::new(
        args.team_id,
        args.resource_id,
        args.resource_type,
        Payload::TierElevation {
            target_tier: args.target_tier,
        },
    );
    let store = store(&args.db, 2).await?;
    match store
        .enqueue_audited(&request, &args.actor, store.db_now().await?)
        .await
    {
        Ok(enqueued) => {
            println!("{enqueued:?}");
            Ok(ExitCode::SUCCESS)
        }
        Err(keel_propagation::StoreError::Rejected(why)) => {
            eprintln!("error: enqueue refused, nothing was written: {why}");
            Ok(ExitCode::from(64))
        }
        Err(e) => Err(e.into()),
    }
}

async fn deferred(cmd: Deferred) -> anyhow::Result<ExitCode> {
    match cmd {
        Deferred::List { db, limit, json } => {
            let rows = store(&db, 2).await?.deferred(limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no deferred propagations");
            } else {
                println!(
                    "{:<8} {:<24} {:<16} {:<36} {:<10} {:<4} {:<20} LAST ERROR",
                    "ID", "REASON", "KIND", "RESOURCE", "TYPE", "VER", "ENQUEUED"
                );
                for r in rows {
                    println!(
                        "{:<8} {:<24} {:<16} {:<36} {:<10} {:<4} {:<20} {}",
                        r.id,
                        r.reason.as_str(),
                        printable(&r.kind),
                        r.resource_id,
                        printable(&r.resource_type),
                        r.payload_version,
                        r.created_at.date().to_string() + " " + &r.created_at.time().to_string(),
                        printable(r.last_error.as_deref().unwrap_or("-"))
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The exit code of `prune` and `reconcile` when another replica held their lock (sysexits'
/// `EX_TEMPFAIL`): nothing failed, but the work due may still be there.
const EXIT_BUSY: u8 = 75;

async fn prune(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let store = store(&args.db, 2).await?;
    let retention = args.retention.retention();
    let mut total = keel_propagation::postgres::Pruned::default();
    loop {
        let pruned = store
            .prune(&retention, args.batch, store.db_now().await?)
            .await?;
        if pruned.busy {
            // Said, not passed off as "nothing was due".
            eprintln!(
                "error: another replica holds the retention lock and is pruning now; this call \
                 pruned {} applied and {} dead-lettered propagation(s) before it; run it again \
                 later",
                total.applied, total.dead_lettered
            );
            return Ok(ExitCode::from(EXIT_BUSY));
        }
        total.applied += pruned.applied;
        total.dead_lettered += pruned.dead_lettered;
        if pruned.applied < u64::from(args.batch) && pruned.dead_lettered < u64::from(args.batch) {
            break;
        }
    }
    println!(
        "pruned {} applied and {} dead-lettered propagation(s)",
        total.applied, total.dead_lettered
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// A pod name of up to 63 characters still makes a worker id: its tail (where a pod's
    /// unique part is) is kept, characters a worker id cannot hold are left out, and an empty
    /// or missing host name falls back to the process id.
    #[test]
    fn any_host_name_makes_a_worker_id() {
        let long = format!("{}-7d9c5b6f4-x2k8p", "a".repeat(47));
        assert_eq!(long.len(), 63);
        let base = super::worker_base_from_host(Some(&long));
        assert_eq!(base.len(), super::WORKER_BASE_MAX);
        assert!(base.ends_with("-7d9c5b6f4-x2k8p"));
        assert!(keel_propagation::WorkerId::parse(&format!("{base}-abcdef")).is_ok());
        assert_eq!(super::worker_base_from_host(Some("runner 1/é")), "runner1");
        for empty in [None, Some(""), Some("///")] {
            assert!(super::worker_base_from_host(empty).starts_with("keel-runner-"));
        }
        assert!(super::worker_base_is_valid(&"w".repeat(57)));
        assert!(!super::worker_base_is_valid(&"w".repeat(58)));
        assert!(!super::worker_base_is_valid("bad id!"));
        assert!(!super::worker_base_is_valid(""));
    }

    fn flags_without_env(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if !arg.is_positional() && !builtin && arg.get_env().is_none() {
                missing.push(format!(
                    "{path} --{}",
                    arg.get_long().unwrap_or(arg.get_id().as_str())
                ));
            }
        }
        for sub in command.get_subcommands() {
            flags_without_env(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    /// OPS-15: a requeue's actor is an operator, never the API, the system or a bare name.
    #[test]
    fn requeue_actor_must_be_an_operator() {
        assert!(super::parse_actor("operator:alice").is_ok());
        for bad in ["api", "alice", "operator:", "system", "api:operator:alice"] {
            let err = super::parse_actor(bad).unwrap_err();
            assert!(err.contains("operator:NAME"), "{bad}: {err}");
        }
        let exit = keel_service::cli::try_parse_from::<Cli, _, _>([
            "keel-propagation-runner",
            "dead-letters",
            "requeue",
            "--database-url",
            "postgres://u@h/db",
            "--id",
            "1",
            "--actor",
            "api",
        ])
        .err()
        .expect("--actor api was accepted");
        assert_eq!(exit.code, keel_service::EXIT_USAGE, "{}", exit.message);
    }

    /// A requeue records why: without `--reason`, or with a blank one, the CLI refuses (64).
    #[test]
    fn requeue_needs_a_reason() {
        let base = [
            "keel-propagation-runner",
            "dead-letters",
            "requeue",
            "--database-url",
            "postgres://u@h/db",
            "--id",
            "1",
            "--actor",
            "operator:alice",
        ];
        for extra in [&[][..], &["--reason", "  "][..]] {
            let exit = keel_service::cli::try_parse_from::<Cli, _, _>(
                base.iter().chain(extra.iter()).copied(),
            )
            .err()
            .expect("a requeue without a reason was accepted");
            assert_eq!(exit.code, keel_service::EXIT_USAGE, "{}", exit.message);
        }
        assert!(
            keel_service::cli::try_parse_from::<Cli, _, _>(
                base.iter().chain(&["--reason", "quota restored"]).copied()
            )
            .is_ok()
        );
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        let mut missing = Vec::new();
        flags_without_env(&Cli::command(), "keel-propagation-runner", &mut missing);
        assert!(
            missing.is_empty(),
            "flags without an env equivalent:\n{}",
            missing.join("\n")
        );
    }
}
