//! `keel-propagation-runner`: runs due propagations across replicas — applied, retrying or
//! dead-lettered, never silently skipped.
//!
//! Subcommands: `run` (the default; `--once` drains what is due and exits), `reconcile` (one
//! entitlement-reconciler pass), `dead-letters list|requeue`, `enqueue`, and `migrate`. While
//! running it serves `/metrics` and `/healthz`. Every flag has an environment variable.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_audit::{Actor, ResourceId, ResourceType, TeamId, Tier};
use keel_propagation::kube::{KubeQuotaApplier, TierQuotas};
use keel_propagation::postgres::{
    EnqueueRequest, PgPropagationStore, PgRoleApplier, RequeueTarget, TierRoleSettings,
    listen_for_wakeups,
};
use keel_propagation::runner::{Runner, RunnerConfig};
use keel_propagation::{
    AllOf, Applier, ApplyError, ApplyOutcome, Metrics, Payload, Propagation, PropagationId,
    PropagationKind, WorkerId,
};
use keel_service::cli::{DatabaseArgs, DatabaseUrl, LogArgs};
use keel_service::http::HttpArgs;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

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
    /// One entitlement-reconciler pass: enqueue a propagation for every drifted resource.
    Reconcile(DatabaseArgs),
    /// Inspect or requeue dead-lettered propagations.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Enqueue (or coalesce) one tier elevation.
    Enqueue(EnqueueArgs),
    /// Apply the embedded database migrations and exit.
    Migrate(DatabaseArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Appliers {
    /// ALTER ROLE on the shared Postgres cluster.
    Role,
    /// A ResourceQuota in the customer's Kubernetes namespace.
    Quota,
    /// Both: the role, then the quota.
    RoleAndQuota,
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
    /// Which backends to apply to.
    #[arg(long, env = "KEEL_APPLIERS", value_enum, default_value_t = Appliers::Role)]
    appliers: Appliers,
    /// The shared customer Postgres cluster for the role applier (defaults to --database-url).
    #[arg(
        long,
        env = "KEEL_CLUSTER_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    cluster_database_url: Option<DatabaseUrl>,
    /// Rows claimed per batch, which is also how many applies run at once.
    #[arg(long, env = "KEEL_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// Seconds a claim is held before another replica may take the row over.
    #[arg(long, env = "KEEL_LEASE_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
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
        /// At most this many.
        #[arg(long, env = "KEEL_LIMIT", default_value_t = 100)]
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
    /// The tier to apply.
    #[arg(long, env = "KEEL_TARGET_TIER", value_parser = parse_tier)]
    target_tier: Tier,
}

fn parse_kind(s: &str) -> Result<PropagationKind, String> {
    s.parse().map_err(|e| format!("{e}"))
}
/// An operator actor, `operator:NAME`: a requeue is an operator's act, so the audit row must
/// not name the API, the system or a bare string.
fn parse_actor(s: &str) -> Result<Actor, String> {
    match s.strip_prefix("operator:") {
        Some(name) if !name.is_empty() => Actor::parse(s).map_err(|e| e.to_string()),
        _ => Err("expected operator:NAME (the person requeueing, e.g. operator:alice)".to_owned()),
    }
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

/// The appliers this deployment runs, chosen at start-up.
enum Chosen {
    Role(PgRoleApplier),
    Quota(KubeQuotaApplier),
    Both(AllOf<PgRoleApplier, KubeQuotaApplier>),
}

impl Applier for Chosen {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        match self {
            Chosen::Role(a) => a.apply(propagation).await,
            Chosen::Quota(a) => a.apply(propagation).await,
            Chosen::Both(a) => a.apply(propagation).await,
        }
    }
}

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

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let worker = args
        .worker_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("keel-runner-{}", std::process::id()));
    // A per-process suffix keeps two processes in one pod (a `kubectl exec … run --once` beside
    // the running replica) from sharing an identity, which the completion fence relies on.
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let worker = WorkerId::parse(&format!("{worker}-{suffix}")).context(
        "--worker-id / KEEL_WORKER_ID / HOSTNAME is not a valid worker id \
         (1 to 57 characters of [A-Za-z0-9._:-])",
    )?;
    let store = Arc::new(store(&args.db, 8).await?);
    let applier = Arc::new(build_applier(&args, &store).await?);

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let mut config = RunnerConfig::new(worker);
    config.batch_size = args.batch_size;
    config.lease = time::Duration::seconds(i64::from(args.lease_seconds));
    config.apply_timeout = Duration::from_secs(u64::from(args.apply_timeout_seconds));
    config.poll_interval = Duration::from_secs(u64::from(args.poll_seconds));
    config.shutdown_grace = Duration::from_secs(u64::from(args.shutdown_grace_seconds));
    config.check()?;
    let runner = Runner::new(Arc::clone(&store), applier, metrics.clone(), config);
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
    let http = tokio::spawn(keel_service::http::serve_with_readiness(
        listener,
        Arc::new(registry),
        keel_service::http::Readiness::new(store.pool().clone()),
        shutdown.clone(),
    ));
    let wake = Arc::new(tokio::sync::Notify::new());
    let wakeups = match listen_for_wakeups(store.pool().clone(), Arc::clone(&wake)).await {
        Ok(handle) => Some(handle),
        Err(e) => {
            // E.g. behind a transaction-pooling proxy, where LISTEN does not work: poll instead.
            tracing::warn!(error = %e, poll_seconds = args.poll_seconds, "no LISTEN/NOTIFY wake-ups; polling only");
            None
        }
    };
    let housekeeping = tokio::spawn(housekeeping(
        Arc::clone(&store),
        metrics,
        args.reconcile_seconds,
        shutdown.clone(),
    ));

    runner.run(wake, shutdown.clone()).await;
    if let Some(wakeups) = wakeups {
        wakeups.abort();
    }
    housekeeping.abort();
    let _ = http.await;
    tracing::info!("propagation runner stopped");
    Ok(ExitCode::SUCCESS)
}

async fn build_applier(args: &RunArgs, store: &PgPropagationStore) -> anyhow::Result<Chosen> {
    let role = || async {
        let cluster = match &args.cluster_database_url {
            Some(url) => {
                let cluster = DatabaseArgs {
                    database_url: url.clone(),
                };
                keel_service::connect(&cluster, "keel-propagation-runner", 8).await?
            }
            None => {
                tracing::info!(
                    "the role applier acts on the platform database's server \
                     (set KEEL_CLUSTER_DATABASE_URL for a separate customer cluster)"
                );
                store.pool().clone()
            }
        };
        anyhow::Ok(PgRoleApplier::new(cluster, TierRoleSettings::standard()))
    };
    let quota = || async {
        let client = kube::Client::try_default()
            .await
            .context("could not configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
        anyhow::Ok(KubeQuotaApplier::new(client, TierQuotas::standard()))
    };
    Ok(match args.appliers {
        Appliers::Role => Chosen::Role(role().await?),
        Appliers::Quota => Chosen::Quota(quota().await?),
        Appliers::RoleAndQuota => Chosen::Both(AllOf {
            first: role().await?,
            second: quota().await?,
        }),
    })
}

/// Queue gauges every 15 s and, if enabled, the entitlement reconciler.
async fn housekeeping(
    store: Arc<PgPropagationStore>,
    metrics: Metrics,
    reconcile_seconds: u32,
    shutdown: CancellationToken,
) {
    let mut gauges = tokio::time::interval(Duration::from_secs(15));
    let mut reconcile =
        tokio::time::interval(Duration::from_secs(u64::from(reconcile_seconds.max(1))));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = gauges.tick() => match store.queue_stats(OffsetDateTime::now_utc()).await {
                Ok(stats) => for stat in stats {
                    metrics.set_queue(stat.kind, stat.due, stat.oldest_due_age_seconds);
                },
                Err(e) => tracing::warn!(error = %e, "could not read the queue depth"),
            },
            _ = reconcile.tick(), if reconcile_seconds > 0 => match store.reconcile(OffsetDateTime::now_utc()).await {
                Ok(enqueued) if !enqueued.is_empty() => tracing::info!(enqueued = enqueued.len(), "reconciler enqueued drifted resources"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "entitlement reconciler pass failed"),
            },
        }
    }
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
    })
}

async fn reconcile(db: DatabaseArgs) -> anyhow::Result<ExitCode> {
    let enqueued = store(&db, 2)
        .await?
        .reconcile(OffsetDateTime::now_utc())
        .await?;
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
                        l.kind,
                        l.resource_id,
                        l.resource_type,
                        l.target_tier.as_deref().unwrap_or("-"),
                        l.dead_lettered_at.date().to_string()
                            + " "
                            + &l.dead_lettered_at.time().to_string(),
                        l.last_error.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        DeadLetters::Requeue {
            db,
            id,
            kind,
            actor,
        } => {
            let target = match (id, kind) {
                (Some(id), _) => RequeueTarget::One(PropagationId(id)),
                (None, Some(kind)) => RequeueTarget::AllOfKind(kind),
                (None, None) => bail!("give --id or --kind"),
            };
            let report = store(&db, 2)
                .await?
                .requeue(target, &actor, OffsetDateTime::now_utc())
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
            println!(
                "{} requeued, {} left alone",
                report.requeued.len(),
                report.skipped_open.len() + report.skipped_superseded.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn enqueue(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let request = EnqueueRequest {
        team_id: args.team_id,
        resource_id: args.resource_id,
        resource_type: args.resource_type,
        payload: Payload::TierElevation {
            target_tier: args.target_tier,
        },
    };
    let enqueued = store(&args.db, 2)
        .await?
        .enqueue(&request, OffsetDateTime::now_utc())
        .await?;
    println!("{enqueued:?}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

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
